"""What the deployment tests share: where things are, and the tools pip installed."""

import os
import shutil
import sysconfig
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "debug")


def built(name):
    """A binary of the workspace's debug build; skips the test, saying why, when it is missing."""
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        raise unittest.SkipTest(f"needs {path}: run `cargo build --workspace --bins` (scripts/test does)")
    return path


def tool(name):
    """A command a pip package installed (hadolint, kubernetes-validate): this python's scripts
    directory first, where pip puts it even when a pyenv shim is not there yet."""
    path = os.path.join(sysconfig.get_path("scripts"), name)
    found = path if os.access(path, os.X_OK) else shutil.which(name)
    if not found:
        raise AssertionError(f"{name} is not installed: run scripts/install-deps")
    return found
