"""Controller replicas on PostgreSQL in the chart (issue 21): controller.replicas > 1 only with
store.backend=postgres and pki.existingCASecret, refused otherwise with the key named (by the
schema, and by the templates when the schema is skipped); three replicas render, pass the
Kubernetes schemas, and get a PodDisruptionBudget, a spread across nodes, their pod name as
replica name and the PostgreSQL password as a file. Then the rendered configuration runs for
real: three controllers on one PostgreSQL this test starts, an agent enrolled through one of them.
That last part needs the controller's PostgreSQL backend; until the binary knows store.backend it
is skipped, saying so."""

import copy
import json
import os
import shutil
import subprocess
import tempfile
import time
import unittest
import urllib.request

import helm_python as helm
import yaml

from support import BIN, needs_postgres_store, tool
from test_chart import CHART, KUBE_VERSIONS, Process, container, env_of, find, free_port, render

URL = "postgres://tapgraph@postgres.db.svc:5432/tapgraph?sslmode=verify-full"
POSTGRES = {"backend": "postgres",
            "postgres": {"url": URL, "passwordSecret": {"name": "tapgraph-postgres", "key": "pw"}}}
REPLICAS = {"controller": {"replicas": 3}, "store": POSTGRES, "pki": {"existingCASecret": "tapgraph-ca"}}


def with_values(base, **changes):
    values = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return values


def selector_of(sts):
    return sts["spec"]["selector"]["matchLabels"]


class ThreeReplicas(unittest.TestCase):
    def test_three_replicas_render_and_pass_the_kubernetes_schemas(self):
        for persistence in (True, False):
            values = with_values(REPLICAS, persistence__enabled=persistence)
            docs, _ = render(values)
            with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
                yaml.safe_dump_all(docs, f)
                f.flush()
                for version in KUBE_VERSIONS:
                    with self.subTest(persistence=persistence, kubernetes=version):
                        run = subprocess.run(
                            [tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, f.name],
                            capture_output=True, text=True)
                        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)

    def test_a_disruption_budget_of_one(self):
        docs, _ = render(REPLICAS)
        sts = find(docs, "StatefulSet")
        pdb = find(docs, "PodDisruptionBudget", "tg-tapgraph")
        self.assertEqual(pdb["apiVersion"], "policy/v1")
        self.assertEqual(pdb["spec"]["maxUnavailable"], 1)
        self.assertEqual(pdb["spec"]["selector"]["matchLabels"], selector_of(sts))
        self.assertEqual(sts["spec"]["template"]["metadata"]["labels"], selector_of(sts))

    def test_replicas_spread_across_nodes(self):
        docs, _ = render(REPLICAS)
        sts = find(docs, "StatefulSet")
        self.assertEqual(sts["spec"]["replicas"], 3)
        spread = sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
        self.assertEqual(spread, [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                   "whenUnsatisfiable": "ScheduleAnyway",
                                   "labelSelector": {"matchLabels": selector_of(sts)}}])
        # Equal replicas: one that cannot start does not hold back the others.
        self.assertEqual(sts["spec"]["podManagementPolicy"], "Parallel")

    def test_an_operators_spread_replaces_the_default(self):
        own = [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "controller"}}}]
        docs, _ = render(with_values(REPLICAS, controller__topologySpreadConstraints=own))
        self.assertEqual(find(docs, "StatefulSet")["spec"]["template"]["spec"]["topologySpreadConstraints"], own)

    def test_each_replica_is_named_after_its_pod_and_shares_the_store_and_the_ca(self):
        docs, _ = render(REPLICAS)
        sts = find(docs, "StatefulSet")
        env = env_of(container(sts, "controller"))
        self.assertEqual(env["TAPGRAPH_REPLICA"], {"fieldRef": {"fieldPath": "metadata.name"}})
        self.assertEqual(env["TAPGRAPH_STORE__BACKEND"], "postgres")
        self.assertEqual(env["TAPGRAPH_STORE__POSTGRES__URL"], URL)
        self.assertEqual(env["TAPGRAPH_PKI__CA_CERT"], "/etc/tapgraph/ca/tls.crt")
        self.assertEqual(env["TAPGRAPH_PKI__CA_KEY"], "/etc/tapgraph/ca/tls.key")
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes["ca-secret"]["secret"]["secretName"], "tapgraph-ca")

    def test_the_postgres_password_is_a_file_from_the_secret(self):
        docs, _ = render(REPLICAS)
        sts = find(docs, "StatefulSet")
        c = container(sts, "controller")
        env = env_of(c)
        self.assertEqual(env["TAPGRAPH_STORE__POSTGRES__PASSWORD_FILE"], "/etc/tapgraph/postgres/password")
        self.assertFalse([name for name in env if name.endswith("POSTGRES__PASSWORD")])
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        self.assertEqual(mounts["postgres-password"]["mountPath"], "/etc/tapgraph/postgres")
        self.assertTrue(mounts["postgres-password"]["readOnly"])
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        secret = volumes["postgres-password"]["secret"]
        self.assertEqual(secret["secretName"], "tapgraph-postgres")
        self.assertEqual(secret["items"], [{"key": "pw", "path": "password"}])

    def test_a_ca_secret_for_postgres_becomes_the_urls_sslrootcert(self):
        docs, _ = render(with_values(REPLICAS, store__postgres__caSecret={"name": "pg-ca"}))
        sts = find(docs, "StatefulSet")
        c = container(sts, "controller")
        self.assertEqual(env_of(c)["TAPGRAPH_STORE__POSTGRES__URL"],
                         URL + "&sslrootcert=/etc/tapgraph/postgres-ca/ca.crt")
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        self.assertEqual(mounts["postgres-ca"], {"name": "postgres-ca", "mountPath": "/etc/tapgraph/postgres-ca",
                                                 "readOnly": True})
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes["postgres-ca"]["secret"]["secretName"], "pg-ca")
        self.assertEqual(volumes["postgres-ca"]["secret"]["items"], [{"key": "ca.crt", "path": "ca.crt"}])
        # A URL without a query gets one.
        docs, _ = render(with_values(REPLICAS, store__postgres__caSecret={"name": "pg-ca"},
                                     store__postgres__url="postgres://tapgraph@db/tapgraph"))
        self.assertEqual(env_of(container(find(docs, "StatefulSet"), "controller"))["TAPGRAPH_STORE__POSTGRES__URL"],
                         "postgres://tapgraph@db/tapgraph?sslrootcert=/etc/tapgraph/postgres-ca/ca.crt")
        # Without one: the system's roots, no volume.
        docs, _ = render(REPLICAS)
        volumes = find(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
        self.assertNotIn("postgres-ca", [v["name"] for v in volumes])

    def test_the_volume_is_optional_on_postgres(self):
        docs, notes = render(with_values(REPLICAS, persistence__enabled=False))
        sts = find(docs, "StatefulSet")
        self.assertNotIn("volumeClaimTemplates", sts["spec"])
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        self.assertEqual(volumes["state"], {"name": "state", "emptyDir": {}})
        # The CA is the Secret's and the rest is in PostgreSQL: nothing is lost with the pod.
        self.assertNotIn("WARNING", notes)
        self.assertIn("shared by 3 controller replicas that sign with the CA in Secret tapgraph-ca", notes)
        # Without the CA Secret (one replica), the CA is the volume's: the NOTES warn.
        _, notes = render(with_values(REPLICAS, persistence__enabled=False, controller__replicas=1,
                                      pki__existingCASecret=""))
        self.assertIn("WARNING: persistence.enabled=false and no pki.existingCASecret. The CA lives in an emptyDir",
                      notes)
        docs, _ = render(REPLICAS)
        claim = find(docs, "StatefulSet")["spec"]["volumeClaimTemplates"][0]
        self.assertEqual(claim["metadata"]["name"], "state")

    def test_one_embedded_controller_gets_none_of_it(self):
        docs, notes = render({})
        sts = find(docs, "StatefulSet")
        self.assertFalse([d for d in docs if d["kind"] == "PodDisruptionBudget"])
        self.assertNotIn("topologySpreadConstraints", sts["spec"]["template"]["spec"])
        self.assertEqual(sts["spec"]["podManagementPolicy"], "OrderedReady")
        env = env_of(container(sts, "controller"))
        self.assertFalse([n for n in env if n.startswith("TAPGRAPH_STORE__") or n == "TAPGRAPH_REPLICA"])
        self.assertNotIn("PostgreSQL", notes)

    def test_one_replica_on_postgres_has_no_budget_and_no_spread(self):
        docs, _ = render(with_values(REPLICAS, controller__replicas=1))
        sts = find(docs, "StatefulSet")
        self.assertFalse([d for d in docs if d["kind"] == "PodDisruptionBudget"])
        self.assertNotIn("topologySpreadConstraints", sts["spec"]["template"]["spec"])
        self.assertEqual(env_of(container(sts, "controller"))["TAPGRAPH_STORE__BACKEND"], "postgres")

    def test_agents_can_dial_a_headless_service_of_every_ready_replica(self):
        values = with_values(REPLICAS, service__agentsHeadless={"enabled": True},
                             agent={"enabled": True, "joinToken": {"existingSecret": "tapgraph-join"}})
        docs, _ = render(values)
        svc = find(docs, "Service", "tg-tapgraph-agents")
        self.assertEqual(svc["spec"]["clusterIP"], "None")
        self.assertFalse(svc["spec"].get("publishNotReadyAddresses", False))
        self.assertEqual(svc["spec"]["selector"], selector_of(find(docs, "StatefulSet")))
        self.assertEqual([p["name"] for p in svc["spec"]["ports"]], ["grpc"])
        agent_env = env_of(container(find(docs, "DaemonSet"), "agent"))
        self.assertEqual(agent_env["TAPGRAPH_CONTROLLER"], "tg-tapgraph-agents.obs.svc:7443")
        names = env_of(container(find(docs, "StatefulSet"), "controller"))["TAPGRAPH_PKI__SERVER_NAMES"]
        self.assertIn("tg-tapgraph-agents.obs.svc", names.split(","))
        # Off (the default), the agents dial the Service, and there is no such Service.
        docs, _ = render(with_values(values, service__agentsHeadless={"enabled": False}))
        self.assertFalse([d for d in docs if d["metadata"]["name"] == "tg-tapgraph-agents"])
        agent_env = env_of(container(find(docs, "DaemonSet"), "agent"))
        self.assertEqual(agent_env["TAPGRAPH_CONTROLLER"], "tg-tapgraph.obs.svc:7443")


class RefusedReplicas(unittest.TestCase):
    """More than one controller without PostgreSQL, or without one CA for all, is refused by
    values.schema.json naming the key to set (and controller.replicas, the other way out); the
    templates refuse it too when an install skips the schema."""

    def refused(self, values):
        chart = helm.Chart.load(CHART)
        with self.assertRaises(helm.HelmValuesError) as caught:
            chart.validate_schema(values)
        with self.assertRaises(helm.HelmError):
            chart.render(values, name="tg", namespace="obs")
        return str(caught.exception)

    def test_two_replicas_on_the_embedded_store_are_refused_naming_the_key(self):
        message = self.refused({"controller": {"replicas": 2}, "pki": {"existingCASecret": "tapgraph-ca"}})
        self.assertIn("at '/store/backend': value must be 'postgres'", message)
        self.assertIn("at '/controller/replicas': maximum: got 2, want 1", message)
        self.assertNotIn("existingCASecret", message)

    def test_two_replicas_on_postgres_without_a_ca_secret_are_refused_naming_the_key(self):
        message = self.refused({"controller": {"replicas": 2}, "store": POSTGRES})
        self.assertIn("at '/pki/existingCASecret': minLength: got 0, want 1", message)
        self.assertIn("at '/controller/replicas': maximum: got 2, want 1", message)
        self.assertNotIn("/store/backend", message)

    def test_two_replicas_with_neither_name_both_keys(self):
        message = self.refused({"controller": {"replicas": 2}})
        self.assertIn("at '/store/backend': value must be 'postgres'", message)
        self.assertIn("at '/pki/existingCASecret': minLength: got 0, want 1", message)

    def test_postgres_needs_a_url_and_a_password_secret(self):
        message = self.refused({"store": {"backend": "postgres"}})
        self.assertIn("at '/store/postgres/url': minLength: got 0, want 1", message)
        self.assertIn("at '/store/postgres/passwordSecret/name': minLength: got 0, want 1", message)

    def test_bad_store_values_are_refused_naming_the_key(self):
        cases = [
            ("an unknown backend", {"store": {"backend": "mysql"}}, "/store/backend"),
            ("a password in the URL", with_values({"store": POSTGRES}, store__postgres__url=
                                                  "postgres://tapgraph:hunter2@db:5432/tapgraph"),
             "/store/postgres/url"),
            ("a password in the query", with_values({"store": POSTGRES}, store__postgres__url=
                                                    "postgres://tapgraph@db/tapgraph?password=hunter2"),
             "/store/postgres/url"),
            ("not a postgres URL", with_values({"store": POSTGRES}, store__postgres__url="mysql://db/x"),
             "/store/postgres/url"),
            ("a secret name with capitals", with_values({"store": POSTGRES},
                                                        store__postgres__passwordSecret={"name": "PG"}),
             "/store/postgres/passwordSecret/name"),
            ("a misspelled key", {"store": {"backnd": "postgres"}}, "backnd"),
        ]
        for what, values, key in cases:
            with self.subTest(what):
                self.assertIn(key, self.refused(values))

    def test_good_urls_pass(self):
        chart = helm.Chart.load(CHART)
        for url in (URL, "postgresql://tapgraph@[2001:db8::5]:5432/tapgraph",
                    "postgres://tapgraph@pg-a:5432,pg-b:5432/tapgraph?target_session_attrs=read-write",
                    "postgres://pg.db.svc/tapgraph"):
            with self.subTest(url):
                chart.validate_schema(with_values(REPLICAS, store__postgres__url=url))

    def test_the_templates_refuse_them_when_the_schema_is_skipped(self):
        # `helm install --skip-schema-validation`: the chart without its schema.
        tmp = tempfile.mkdtemp(prefix="tapgraph-chart-")
        self.addCleanup(shutil.rmtree, tmp, True)
        copy_ = os.path.join(tmp, "tapgraph")
        shutil.copytree(CHART, copy_)
        os.remove(os.path.join(copy_, "values.schema.json"))
        chart = helm.Chart.load(copy_)
        cases = [
            ({"controller": {"replicas": 2}, "pki": {"existingCASecret": "tapgraph-ca"}},
             "controller.replicas=2 needs store.backend=postgres: the embedded store is one "
             "controller's file (set store.backend, store.postgres.url and "
             "store.postgres.passwordSecret, or controller.replicas=1)"),
            ({"controller": {"replicas": 3}, "store": POSTGRES},
             "controller.replicas=3 needs pki.existingCASecret: every replica must sign with the "
             "same CA (a kubernetes.io/tls Secret with tls.crt and tls.key)"),
        ]
        for values, message in cases:
            with self.subTest(message):
                with self.assertRaises(helm.HelmRenderError) as caught:
                    chart.render(values, name="tg", namespace="obs")
                self.assertIn(message, str(caught.exception))
        chart.render(REPLICAS, name="tg", namespace="obs")


@unittest.skipUnless(os.path.exists(os.path.join(BIN, "tapgraph-controller")),
                     "needs target/debug binaries: run `cargo build --workspace --bins` (scripts/test does)")
class ThreeReplicasRun(unittest.TestCase):
    """Three controllers started with exactly the configuration the chart renders for
    controller.replicas=3 (each with its pod's name, its own emptyDir, the CA through the init
    container's own command, the PostgreSQL password file with the Secret volume's mode), on one
    PostgreSQL this test starts with password authentication, all at once as a Parallel
    StatefulSet starts them. An operator identity issued in pod 0 works against pod 1; an agent
    with the DaemonSet's environment enrolls through pod 2, and pod 1 shows it connected to
    tg-tapgraph-2."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="tapgraph-replicas-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.postgres = needs_postgres_store(self)

    def make_ca(self, sts):
        """The CA Secret's files as the kubelet makes them (0440), copied by the init container's
        own command; returns the copied files' directory and the CA's fingerprint."""
        secret, copied = os.path.join(self.tmp, "ca-secret"), os.path.join(self.tmp, "ca")
        os.makedirs(secret)
        os.makedirs(copied)
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "30", "-subj", "/CN=corp CA", "-keyout", os.path.join(secret, "tls.key"),
             "-out", os.path.join(secret, "tls.crt")], capture_output=True, text=True)
        self.assertEqual(made.returncode, 0, made.stderr)
        for name in ("tls.crt", "tls.key"):
            os.chmod(os.path.join(secret, name), 0o440)
        init = next(i for i in sts["spec"]["template"]["spec"]["initContainers"] if i["name"] == "ca-key")
        command = [arg.replace("/etc/tapgraph/ca-secret", secret).replace("/etc/tapgraph/ca", copied)
                   for arg in init["command"]]
        run = subprocess.run(command, capture_output=True, text=True)
        self.assertEqual(run.returncode, 0, run.stderr)
        fingerprint = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", os.path.join(secret, "tls.crt")],
            capture_output=True, text=True, check=True).stdout.split("=", 1)[1].strip()
        return copied, fingerprint

    def test_three_rendered_replicas_share_one_postgres_and_one_ca(self):
        values = with_values(REPLICAS, persistence__enabled=False,
                             store__postgres__caSecret={"name": "postgres-ca"},
                             agent={"enabled": True, "joinToken": {"existingSecret": "tapgraph-join"}})
        docs, notes = render(values)
        sts = find(docs, "StatefulSet")
        self.assertEqual(sts["spec"]["replicas"], 3)
        c = container(sts, "controller")
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}

        password = "pg-secret-for-the-test"
        port = self.postgres.start(self.tmp, password)
        secret_file = os.path.join(self.tmp, "postgres-password")
        with open(secret_file, "w") as f:
            f.write(password + "\n")
        os.chmod(secret_file, volumes["postgres-password"]["secret"]["defaultMode"])
        ca_dir, fingerprint = self.make_ca(sts)
        # The file sslrootcert names: any CA certificate (the server here speaks no TLS), read at start.
        postgres_ca = os.path.join(self.tmp, "postgres-ca.crt")
        shutil.copy(os.path.join(ca_dir, "tls.crt"), postgres_ca)
        os.chmod(postgres_ca, volumes["postgres-ca"]["secret"]["defaultMode"])
        files = {"/etc/tapgraph/ca/tls.crt": os.path.join(ca_dir, "tls.crt"),
                 "/etc/tapgraph/ca/tls.key": os.path.join(ca_dir, "tls.key"),
                 "/etc/tapgraph/postgres/password": secret_file}
        config = os.path.join(self.tmp, "controller.toml")
        with open(config, "w") as f:
            f.write(find(docs, "ConfigMap")["data"]["controller.toml"])
        self.assertEqual(c["args"], ["run", "--config", "/etc/tapgraph/controller.toml"])

        # Pods tg-tapgraph-0, -1, -2: the same environment but for the pod name, started at once.
        replicas = []
        for ordinal in range(3):
            pod = f"tg-tapgraph-{ordinal}"
            grpc, http = free_port(), free_port()
            env = dict(os.environ)
            for name, value in env_of(c).items():
                if isinstance(value, dict):
                    self.assertEqual((name, value), ("TAPGRAPH_REPLICA", {"fieldRef": {"fieldPath": "metadata.name"}}))
                    value = pod
                elif value.startswith("/etc/"):
                    self.assertIn(value, files, f"{name} names a file this test does not provide")
                    value = files[value]
                env[name] = value
            self.assertEqual(env["TAPGRAPH_LISTEN"], "0.0.0.0:7443")
            env["TAPGRAPH_LISTEN"] = f"127.0.0.1:{grpc}"
            env["TAPGRAPH_HTTP__LISTEN"] = f"127.0.0.1:{http}"
            self.assertTrue(env["TAPGRAPH_STATE_DIR"].startswith("/var/lib/tapgraph/"))
            state = os.path.join(self.tmp, pod, "volume", "controller")
            os.makedirs(os.path.dirname(state))
            env["TAPGRAPH_STATE_DIR"] = state
            rendered = URL + "&sslrootcert=/etc/tapgraph/postgres-ca/ca.crt"
            self.assertEqual(env["TAPGRAPH_STORE__POSTGRES__URL"], rendered)
            env["TAPGRAPH_STORE__POSTGRES__URL"] = rendered.replace("postgres.db.svc:5432", f"127.0.0.1:{port}") \
                .replace("sslmode=verify-full", "sslmode=disable") \
                .replace("/etc/tapgraph/postgres-ca/ca.crt", postgres_ca)
            process = Process(self, [os.path.join(BIN, "tapgraph-controller"), "run", "--config", config],
                              env, os.path.join(self.tmp, f"{pod}.log"))
            replicas.append({"pod": pod, "env": env, "grpc": grpc, "http": http, "state": state,
                             "process": process})
        deadline = time.time() + 60
        for r in replicas:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{r['http']}/readyz", timeout=1) as got:
                        if got.status == 200:
                            break
                except OSError:
                    pass
                if r["process"].proc.poll() is not None or time.time() > deadline:
                    self.fail(f"{r['pod']} did not become ready:\n{r['process'].text()}")
                time.sleep(0.1)

        # NOTES step 1 in pod 0; the identity it issues is good on pod 1.
        self.assertIn("kubectl -n obs exec tg-tapgraph-0 -c controller", notes)
        issued = subprocess.run(
            [os.path.join(BIN, "tapgraph-controller"), "operator", "issue", "ops", "--config", config,
             "--address", f"127.0.0.1:{replicas[1]['grpc']}", "--out", "-"],
            env=replicas[0]["env"], capture_output=True, text=True, timeout=30)
        self.assertEqual(issued.returncode, 0, issued.stderr)
        ctl_config = os.path.join(self.tmp, "tapgraphctl.toml")
        with open(ctl_config, "w") as f:
            f.write(issued.stdout)
        os.chmod(ctl_config, 0o600)

        def ctl(*args, pod=1):
            run = subprocess.run([os.path.join(BIN, "tapgraphctl"), "-o", "json", "--controller",
                                  f"127.0.0.1:{replicas[pod]['grpc']}", *args],
                                 env=dict(os.environ, TAPGRAPHCTL_CONFIG=ctl_config),
                                 capture_output=True, text=True, timeout=30)
            self.assertEqual(run.returncode, 0, run.stderr)
            return json.loads(run.stdout)

        token = ctl("token", "create", "--uses", "10", "--label", "cluster=replicas")
        normalize = lambda fp: fp.replace(":", "").lower().removeprefix("sha256")
        self.assertEqual(normalize(token["ca_fingerprint"]), normalize(fingerprint))
        # Made on pod 1, known to pod 2 (which hears of it from PostgreSQL) within a few seconds.
        deadline = time.time() + 5
        while token["id"] not in [t["id"] for t in ctl("token", "list", pod=2)]:
            if time.time() > deadline:
                self.fail(f"token {token['id']} made on tg-tapgraph-1 is not listed by tg-tapgraph-2 "
                          f"after 5 s:\n{replicas[2]['process'].text()}")
            time.sleep(0.1)

        # The DaemonSet's agent, enrolling and connecting through pod 2.
        join = os.path.join(self.tmp, "join")
        os.makedirs(join)
        with open(os.path.join(join, "token"), "w") as f:
            f.write(token["token"])
        a = container(find(docs, "DaemonSet"), "agent")
        agent_env = dict(os.environ)
        for name, value in env_of(a).items():
            if isinstance(value, str):
                agent_env[name] = value
            elif "fieldRef" in value:
                agent_env[name] = "node-7"
            else:
                agent_env[name] = token["ca_fingerprint"]
        host, _ = agent_env["TAPGRAPH_CONTROLLER"].rsplit(":", 1)
        self.assertEqual(host, "tg-tapgraph.obs.svc")
        agent_env.update({"TAPGRAPH_CONTROLLER": f"127.0.0.1:{replicas[2]['grpc']}",
                          "TAPGRAPH_SERVER_NAME": host,
                          "TAPGRAPH_STATE_DIR": os.path.join(self.tmp, "agent-state"),
                          "TAPGRAPH_ENROLL__TOKEN_FILE": os.path.join(join, "token"),
                          "TAPGRAPH_METRICS__LISTEN": "127.0.0.1:0",
                          "TAPGRAPH_SNAPSHOT__SCOPE": "own"})
        agent = Process(self, [os.path.join(BIN, "tapgraph-agent"), *a["args"]], agent_env,
                        os.path.join(self.tmp, "agent.log"))
        deadline = time.time() + 30
        while True:
            agents = ctl("agent", "list")
            rows = agents if isinstance(agents, list) else agents.get("agents", [])
            mine = [row for row in rows if row.get("id") == "node-7"]
            if mine and mine[0].get("state") == "connected" and mine[0].get("controller"):
                break
            if agent.proc.poll() is not None or time.time() > deadline:
                self.fail(f"agent node-7 did not connect: {agents}\n{agent.text()}\n"
                          + "\n".join(r["process"].text() for r in replicas))
            time.sleep(0.2)
        self.assertEqual(mine[0]["controller"], "tg-tapgraph-2", mine[0])
        self.assertEqual(mine[0].get("labels", {}).get("cluster"), "replicas", mine[0])

        # What the chart's values.yaml says is left in a replica's state directory with
        # PostgreSQL and a CA Secret: its serving certificate, nothing else.
        for r in replicas:
            kept = sorted(os.path.relpath(os.path.join(d, name), r["state"])
                          for d, _, names in os.walk(r["state"]) for name in names)
            self.assertEqual(kept, ["pki/server.key", "pki/server.names", "pki/server.pem"], r["pod"])
