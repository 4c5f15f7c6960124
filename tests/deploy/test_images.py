"""The container images, which cannot be built here (no Docker engine): hadolint finds nothing,
every binary the Dockerfile copies is one the workspace builds, and the runtime stage's Debian
packages provide every shared library those binaries load (checked against this machine, which
runs the same Debian release as the images)."""

import os
import re
import subprocess
import unittest

from support import ROOT, built, tool

DOCKERFILE = os.path.join(ROOT, "deploy", "docker", "Dockerfile")
# In every Debian base image: the C library and the GCC runtime (Rust's unwinder).
BASE = {"libc6", "libgcc-s1"}


def dockerfile():
    with open(DOCKERFILE) as f:
        return f.read()


def stage(text, name):
    """The instructions of stage `name`, continuation lines joined."""
    text = text.replace("\\\n", " ")
    found = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)
    if not found:
        raise AssertionError(f"no stage {name} in {DOCKERFILE}")
    return found.group(1)


def depends_closure(packages):
    """Installed packages `packages` need, recursively (every alternative), from dpkg's records."""
    seen, todo = set(), list(packages)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        run = subprocess.run(["dpkg-query", "-W", "-f=${Depends},${Pre-Depends}", name],
                             capture_output=True, text=True)
        if run.returncode != 0:
            continue
        for dep in re.split(r"[,|]", run.stdout):
            dep = dep.strip().split(" ")[0].split(":")[0]
            if dep:
                todo.append(dep)
    return seen


class Dockerfile(unittest.TestCase):
    def test_hadolint_finds_nothing(self):
        run = subprocess.run([tool("hadolint"), DOCKERFILE], capture_output=True, text=True)
        self.assertEqual((run.returncode, run.stdout + run.stderr), (0, ""))

    def test_hadolint_would_speak_up(self):
        run = subprocess.run([tool("hadolint"), "-"], input="FROM debian\nRUN apt-get install curl\n",
                             capture_output=True, text=True)
        self.assertNotEqual(run.returncode, 0)

    def test_runtime_packages_provide_every_library_the_binaries_load(self):
        text = dockerfile()
        runtime = stage(text, "runtime")
        install = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", runtime)
        self.assertTrue(install, runtime)
        provided = depends_closure(set(install.group(1).split()) | BASE)
        copied = set()
        for target in ("controller", "agent"):
            for line in re.findall(r"^COPY --from=build (.+)$", stage(text, target), re.M):
                copied.update(os.path.basename(p) for p in line.split()[:-1])
        self.assertEqual(copied, {"tapgraph-controller", "tapgraphctl", "tapgraph-agent"})
        for binary in sorted(copied):
            path = built(binary)
            with self.subTest(binary=binary):
                ldd = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
                libs = re.findall(r"=> (/\S+)", ldd)
                self.assertTrue(libs, ldd)
                for lib in libs:
                    owner = subprocess.run(["dpkg", "-S", os.path.realpath(lib)],
                                           capture_output=True, text=True)
                    if owner.returncode != 0:  # merged /usr: dpkg knows the /lib path
                        owner = subprocess.run(["dpkg", "-S", lib], capture_output=True, text=True)
                    self.assertEqual(owner.returncode, 0, f"{lib}: {owner.stderr}")
                    package = owner.stdout.split(":")[0]
                    self.assertIn(package, provided, f"{binary} loads {lib} from {package}")

    def test_the_build_builds_every_binary_it_copies(self):
        build = stage(dockerfile(), "build")
        self.assertIn("cargo build --release --locked --workspace --bins", build)
        for binary in ("tapgraph-controller", "tapgraph-agent", "tapgraphctl"):
            self.assertIn(f"target/release/{binary}", build)

    def test_the_controller_is_built_with_the_web_console(self):
        text = dockerfile()
        console = stage(text, "console")
        self.assertIn("npm ci", console)
        self.assertIn("npm run build", console)
        build = stage(text, "build")
        copy = build.index("COPY --from=console /console/dist/ console/dist/")
        self.assertLess(copy, build.index("cargo build"), "the console is in place before cargo embeds it")

    def test_controller_image_runs_unprivileged(self):
        controller = stage(dockerfile(), "controller")
        users = re.findall(r"^USER (\S+)", controller, re.M)
        self.assertEqual(users[-1], "65532:65532")


if __name__ == "__main__":
    unittest.main()
