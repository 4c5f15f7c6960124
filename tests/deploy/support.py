"""What the deployment tests share: where things are, and the tools pip installed."""

import os
import shutil
import socket
import subprocess
import sysconfig
import tempfile
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def store_settings_unknown():
    """What the controller binary says about `replica` and `store.backend` when it does not know
    them yet (before the PostgreSQL backend); None when it knows them. It is given a configuration
    file with a bad backend, and stops at once either way: with "unknown key" only when the key is
    unknown."""
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "probe.toml")
        with open(config, "w") as f:
            f.write('replica = "probe"\n[store]\nbackend = "not-a-backend"\n')
        try:
            run = subprocess.run(
                [built("tapgraph-controller"), "run", "--config", config, "--state-dir",
                 os.path.join(tmp, "state"), "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
                capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError('the controller started with store.backend = "not-a-backend"')
    said = [line.strip() for line in run.stderr.splitlines() if "unknown key" in line]
    return "; ".join(said) or None


class Postgres:
    """PostgreSQL servers for a test (Debian keeps the programs off PATH): each on 127.0.0.1 with
    password authentication (scram-sha-256, so a password file is really read), the superuser
    "tapgraph" and its database "tapgraph", stopped at the test's end."""

    def __init__(self, test, programs):
        self.test, self.programs = test, programs

    def run(self, program, *args, **kw):
        """initdb refuses root: as root, the server's programs run as the user postgres."""
        command = [os.path.join(self.programs, program), *args]
        if os.geteuid() == 0 and program in ("initdb", "pg_ctl"):
            command = ["runuser", "-u", "postgres", "--", *command]
        run = subprocess.run(command, capture_output=True, text=True, timeout=60, **kw)
        self.test.assertEqual(run.returncode, 0, f"{program}: {run.stdout}{run.stderr}")
        return run

    def start(self, tmp, password):
        """A new server under `tmp`; returns its port."""
        home = tempfile.mkdtemp(prefix="pg-", dir=tmp)
        pwfile = os.path.join(home, "pwfile")
        with open(pwfile, "w") as f:
            f.write(password + "\n")
        if os.geteuid() == 0:
            os.chmod(tmp, 0o755)
            shutil.chown(home, "postgres")
            shutil.chown(pwfile, "postgres")
        data, port = os.path.join(home, "data"), free_port()
        self.run("initdb", "-D", data, "-U", "tapgraph", "-A", "scram-sha-256", f"--pwfile={pwfile}",
                 "-E", "UTF8", "--no-locale")
        self.run("pg_ctl", "-D", data, "-l", os.path.join(home, "server.log"), "-w", "-t", "30",
                 "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start")
        self.test.addCleanup(self.run, "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        self.run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "tapgraph", "tapgraph",
                 env=dict(os.environ, PGPASSWORD=password))
        return port


def postgres_programs():
    """The directory of PostgreSQL's server programs, newest version first, or None."""
    versions = os.listdir("/usr/lib/postgresql") if os.path.isdir("/usr/lib/postgresql") else []
    for version in sorted(versions, key=lambda v: int(v) if v.isdigit() else 0, reverse=True):
        programs = os.path.join("/usr/lib/postgresql", version, "bin")
        if os.path.exists(os.path.join(programs, "initdb")):
            return programs
    initdb = shutil.which("initdb")
    return os.path.dirname(os.path.realpath(initdb)) if initdb else None


def needs_postgres_store(test):
    """For a test that runs controllers on PostgreSQL: skips it, saying so loudly, while the
    controller binary does not know the store settings yet; fails it when PostgreSQL is not
    installed. Returns a Postgres for it."""
    unknown = store_settings_unknown()
    if unknown:
        reason = (f"the controller does not know the PostgreSQL store settings yet ({unknown}): "
                  "this test waits for them")
        print(f"\nNOTE: SKIPPED {test.id()}: {reason}", flush=True)
        raise unittest.SkipTest(reason)
    programs = postgres_programs()
    if not programs:
        raise AssertionError("PostgreSQL is not installed: run scripts/install-deps")
    return Postgres(test, programs)
