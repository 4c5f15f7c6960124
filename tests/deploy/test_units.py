"""The systemd units: `systemd-analyze verify` finds nothing to say, their hardening scores stay
low, and the agent's capability set is exactly enough: an unprivileged user holding only the
unit's ambient capabilities attributes a root process's socket and can capture, and without the
/proc pair it cannot (so the check can fail).

No systemd runs as PID 1 here: the units are verified and their privileges reproduced with
setpriv, not started."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import unittest

from support import ROOT, built

UNITS = os.path.join(ROOT, "deploy", "systemd")
NOBODY = 65534


def unit_key(unit, key):
    with open(os.path.join(UNITS, unit)) as f:
        values = [line.split("=", 1)[1].strip() for line in f if line.startswith(key + "=")]
    return values[-1] if values else None


class Verify(unittest.TestCase):
    def test_units_verify_without_a_word(self):
        # verify checks that ExecStart's binary exists: point it at the built ones.
        with tempfile.TemporaryDirectory() as tmp:
            for unit in ("tapgraph-controller.service", "tapgraph-agent.service"):
                binary = built(unit.removesuffix(".service"))
                with open(os.path.join(UNITS, unit)) as f:
                    text = f.read()
                self.assertIn(f"ExecStart=/usr/local/bin/{unit.removesuffix('.service')} run", text)
                text = text.replace("/usr/local/bin/" + os.path.basename(binary), binary)
                path = os.path.join(tmp, unit)
                with open(path, "w") as f:
                    f.write(text)
                with self.subTest(unit=unit):
                    run = subprocess.run(["systemd-analyze", "verify", path],
                                         capture_output=True, text=True)
                    # Unknown keys and bad values are only warnings to systemd: any output fails.
                    self.assertEqual((run.returncode, run.stdout + run.stderr), (0, ""))

    def test_verify_would_speak_up(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bad.service")
            with open(path, "w") as f:
                f.write("[Service]\nExecStart=/bin/true\nProtectSystm=strict\n")
            run = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True)
            self.assertIn("ProtectSystm", run.stdout + run.stderr)

    def test_hardening_exposure_stays_low(self):
        # systemd's own score, 0 (locked down) to 10 (exposed); "OK" is below 4.
        for unit, most in (("tapgraph-controller.service", 2.5), ("tapgraph-agent.service", 3.5)):
            with self.subTest(unit=unit):
                run = subprocess.run(
                    ["systemd-analyze", "security", "--offline=true", "--no-pager",
                     os.path.join(UNITS, unit)], capture_output=True, text=True)
                found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", run.stdout)
                self.assertTrue(found, run.stdout + run.stderr)
                self.assertLessEqual(float(found.group(1)), most, run.stdout)

    def test_units_keep_their_promises(self):
        agent = "tapgraph-agent.service"
        self.assertEqual(unit_key(agent, "AmbientCapabilities"), unit_key(agent, "CapabilityBoundingSet"))
        self.assertEqual(set(unit_key(agent, "AmbientCapabilities").split()),
                         {"CAP_NET_RAW", "CAP_NET_ADMIN", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"})
        for unit in (agent, "tapgraph-controller.service"):
            with self.subTest(unit=unit):
                self.assertEqual(unit_key(unit, "ProtectSystem"), "strict")
                self.assertEqual(unit_key(unit, "NoNewPrivileges"), "yes")
                self.assertTrue(unit_key(unit, "StateDirectory"))
                self.assertNotIn(unit_key(unit, "User"), (None, "root"))
                self.assertEqual(unit_key(unit, "RestartPreventExitStatus"), "78")
        self.assertEqual(unit_key("tapgraph-controller.service", "AmbientCapabilities"), "")


@unittest.skipUnless(os.geteuid() == 0, "needs root to switch users (setpriv)")
class AgentCapabilities(unittest.TestCase):
    def setUp(self):
        self.agent = built("tapgraph-agent")
        # A listener owned by root (this test process), like most of a host's services.
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.addCleanup(self.listener.close)
        self.port = self.listener.getsockname()[1]
        self.tmp = tempfile.mkdtemp(prefix="tapgraph-units-")
        os.chmod(self.tmp, 0o755)
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def as_nobody(self, caps, *args):
        """The agent as `nobody` with exactly `caps` ambient, as systemd would start it."""
        spec = ",".join("+" + c.lower().removeprefix("cap_") for c in caps) or "-all"
        run = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             f"--inh-caps={spec}", f"--ambient-caps={spec}", f"--bounding-set={spec}"
             if caps else "--bounding-set=-all", self.agent, *args,
             "--state-dir", self.tmp],
            capture_output=True, text=True, timeout=60)
        self.assertEqual(run.returncode, 0, run.stderr)
        return run.stdout

    def listener_attributed(self, caps):
        rows = [json.loads(line) for line in self.as_nobody(caps, "snapshot", "--json").splitlines()
                if line.startswith("{")]
        return any(r.get("port") == self.port and r.get("pid") == os.getpid() for r in rows)

    def test_the_units_capabilities_attribute_root_sockets(self):
        caps = unit_key("tapgraph-agent.service", "AmbientCapabilities").split()
        self.assertTrue(self.listener_attributed(caps))

    def test_without_the_proc_pair_they_are_not(self):
        self.assertFalse(self.listener_attributed(["CAP_NET_RAW", "CAP_NET_ADMIN"]))

    def test_the_units_capabilities_can_capture(self):
        caps = unit_key("tapgraph-agent.service", "AmbientCapabilities").split()
        self.assertTrue(json.loads(self.as_nobody(caps, "interfaces", "--json"))["capture_permitted"])
        self.assertFalse(json.loads(self.as_nobody([], "interfaces", "--json"))["capture_permitted"])


if __name__ == "__main__":
    unittest.main()
