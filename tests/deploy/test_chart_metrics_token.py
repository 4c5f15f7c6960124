"""The chart's /metrics token (issue 19): controller.metricsTokenSecret mounts an existing Secret's
key as a file and points http.metrics_token_file at it; the token never appears in a manifest;
a bad Secret name is refused by values.schema.json, naming the key."""

import unittest

import helm_python as helm

from test_chart import CHART, container, env_of, find, render


class MetricsToken(unittest.TestCase):
    def test_without_a_secret_metrics_needs_no_token(self):
        docs, _ = render({})
        c = container(find(docs, "StatefulSet"), "controller")
        self.assertNotIn("TAPGRAPH_HTTP__METRICS_TOKEN_FILE", env_of(c))
        volumes = find(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
        self.assertNotIn("metrics-token", [v["name"] for v in volumes])

    def test_a_secret_becomes_the_token_file(self):
        docs, _ = render({"controller": {"metricsTokenSecret": {"name": "scrape", "key": "t"}}})
        sts = find(docs, "StatefulSet")
        c = container(sts, "controller")
        self.assertEqual(env_of(c)["TAPGRAPH_HTTP__METRICS_TOKEN_FILE"], "/etc/tapgraph/metrics/token")
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        self.assertEqual(mounts["metrics-token"]["mountPath"], "/etc/tapgraph/metrics")
        self.assertTrue(mounts["metrics-token"]["readOnly"])
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        secret = volumes["metrics-token"]["secret"]
        self.assertEqual(secret["secretName"], "scrape")
        self.assertEqual(secret["items"], [{"key": "t", "path": "token"}])

    def test_a_bad_secret_name_is_refused_naming_the_key(self):
        chart = helm.Chart.load(CHART)
        with self.assertRaises(helm.HelmValuesError) as caught:
            chart.validate_schema({"controller": {"metricsTokenSecret": {"name": "Not_A_Name"}}})
        self.assertIn("/controller/metricsTokenSecret/name", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
