"""The systemd units: `systemd-analyze verify` finds nothing to say, their hardening scores stay
low, and the agent's capability set is exactly enough: an unprivileged user holding only the
unit's ambient capabilities attributes a root process's socket and can capture, and without the
/proc pair it cannot (so the check can fail). The example controller configurations start a
controller: controller.toml one on its own, controller-replica.toml two VMs on one PostgreSQL.

No systemd runs as PID 1 here: the units are verified and their privileges reproduced with
setpriv, not started."""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import unittest
import urllib.request

from support import ROOT, built, free_port, needs_postgres_store
from test_chart import Process

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


class ExampleConfigs(unittest.TestCase):
    """Each example configuration file, as the unit runs it (`run --config FILE`,
    TAPGRAPH_STATE_DIR), with its paths and addresses moved onto this machine, starts a
    controller that becomes ready: a misspelled key or a bad value would stop it with status 78."""

    def setUp(self):
        self.controller = built("tapgraph-controller")
        self.tmp = tempfile.mkdtemp(prefix="tapgraph-units-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def start(self, name, text):
        """A controller with configuration `text` (as /etc/tapgraph/controller.toml); the flags
        move its listeners onto loopback. Returns its environment, config path and gRPC port."""
        config = os.path.join(self.tmp, f"{name}.toml")
        with open(config, "w") as f:
            f.write(text)
        grpc, http = free_port(), free_port()
        env = dict(os.environ, TAPGRAPH_STATE_DIR=os.path.join(self.tmp, name, "state"))
        os.makedirs(os.path.join(self.tmp, name))
        process = Process(self, [self.controller, "run", "--config", config, "--listen", f"127.0.0.1:{grpc}",
                                 "--http-listen", f"127.0.0.1:{http}"], env,
                          os.path.join(self.tmp, f"{name}.log"))
        return {"name": name, "env": env, "config": config, "grpc": grpc, "http": http, "process": process}

    def wait_ready(self, controller):
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{controller['http']}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if controller["process"].proc.poll() is not None or time.time() > deadline:
                self.fail(f"{controller['name']} did not become ready:\n{controller['process'].text()}")
            time.sleep(0.1)

    def test_the_example_controller_toml_starts_a_controller(self):
        self.assertEqual(unit_key("tapgraph-controller.service", "ExecStart"),
                         "/usr/local/bin/tapgraph-controller run --config /etc/tapgraph/controller.toml")
        with open(os.path.join(UNITS, "controller.toml")) as f:
            self.wait_ready(self.start("controller", f.read()))

    def test_two_vms_share_one_postgres_with_the_replica_example(self):
        postgres = needs_postgres_store(self)
        with open(os.path.join(UNITS, "controller-replica.toml")) as f:
            text = f.read()
        # The second VM's file: only its replica name and its own server name differ.
        second = text.replace("ctl-a", "ctl-b")
        changed = [(a, b) for a, b in zip(text.splitlines(), second.splitlines()) if a != b]
        self.assertEqual([a.split("=")[0].strip() for a, _ in changed], ["replica", "server_names"], changed)

        password = "pg-secret-for-the-vms"
        port = postgres.start(self.tmp, password)
        etc = os.path.join(self.tmp, "etc")
        os.makedirs(etc)
        # The files the example's comments install, with the modes they give.
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "30", "-subj", "/CN=corp CA", "-keyout", os.path.join(etc, "ca.key"),
             "-out", os.path.join(etc, "ca.pem")], capture_output=True, text=True)
        self.assertEqual(made.returncode, 0, made.stderr)
        os.chmod(os.path.join(etc, "ca.key"), 0o600)
        with open(os.path.join(etc, "postgres.password"), "w") as f:
            f.write(password + "\n")
        os.chmod(os.path.join(etc, "postgres.password"), 0o640)
        url = "postgres://tapgraph@db.example.internal:5432/tapgraph?sslmode=verify-full"
        self.assertIn(f'url = "{url}"', text)
        local = f"postgres://tapgraph@127.0.0.1:{port}/tapgraph?sslmode=disable"
        vms = []
        for name, vm_text in (("ctl-a", text), ("ctl-b", second)):
            moved = vm_text.replace("/etc/tapgraph/", etc + "/").replace(url, local)
            vms.append(self.start(name, moved))
        for vm in vms:
            self.wait_ready(vm)

        # An operator identity issued on VM a works on VM b, signed by the shared CA.
        issued = subprocess.run(
            [self.controller, "operator", "issue", "ops", "--config", vms[0]["config"],
             "--address", f"127.0.0.1:{vms[1]['grpc']}", "--out", "-"],
            env=vms[0]["env"], capture_output=True, text=True, timeout=30)
        self.assertEqual(issued.returncode, 0, issued.stderr)
        ctl_config = os.path.join(self.tmp, "tapgraphctl.toml")
        with open(ctl_config, "w") as f:
            f.write(issued.stdout)
        os.chmod(ctl_config, 0o600)
        run = subprocess.run([built("tapgraphctl"), "-o", "json", "token", "create"],
                             env=dict(os.environ, TAPGRAPHCTL_CONFIG=ctl_config),
                             capture_output=True, text=True, timeout=30)
        self.assertEqual(run.returncode, 0, run.stderr)
        fingerprint = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", os.path.join(etc, "ca.pem")],
            capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip()
        normalize = lambda fp: fp.replace(":", "").lower().removeprefix("sha256")
        self.assertEqual(normalize(json.loads(run.stdout)["ca_fingerprint"]), normalize(fingerprint))
        # What the example says /var/lib/tapgraph keeps: the serving certificate.
        for vm in vms:
            state = vm["env"]["TAPGRAPH_STATE_DIR"]
            kept = sorted(os.path.relpath(os.path.join(d, name), state)
                          for d, _, names in os.walk(state) for name in names)
            self.assertEqual(kept, ["pki/server.key", "pki/server.names", "pki/server.pem"], vm["name"])


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
