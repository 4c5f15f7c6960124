//! Issue 23, part 4: what changed on the map. Real redis clients come and go in a namespace lab;
//! the controller's history answers `graph diff` and `graph --at`, `tapgraphctl events` carries
//! the `edge` events, and a webhook whose selector reads labels ("a new edge into env=prod from
//! outside it") reaches a local receiver, signed, after a retry.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Proc, bin, require_root, wait_for};
use crate::topology::{Lab, start_servers};

/// A webhook receiver: answers 503 to the first request (the controller must retry), 204 to the
/// others, and appends each request as a JSON line, with whether its signature is the body's
/// HMAC-SHA256 under the key, as computed here.
const RECEIVER: &str = r#"
import hashlib, hmac, http.server, json, sys
port, key_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
key = open(key_file, 'rb').read().strip()
seen = []
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        want = 'sha256=' + hmac.new(key, body, hashlib.sha256).hexdigest()
        seen.append(1)
        status = 503 if len(seen) == 1 else 204
        rec = {'status': status, 'path': self.path,
               'valid': hmac.compare_digest(want, self.headers.get('X-Tapgraph-Signature', '')),
               'delivery': self.headers.get('X-Tapgraph-Delivery'), 'body': json.loads(body)}
        with open(out, 'a') as f:
            f.write(json.dumps(rec) + '\n')
        self.send_response(status)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(('127.0.0.1', port), H).serve_forever()
"#;

const HOOK_PORT: u16 = 7099;

fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|l| {
            l.iter()
                .filter(|c| c["kind"] == "edge")
                .map(|c| {
                    format!(
                        "{} -> {}",
                        c["from"].as_str().unwrap(),
                        c["to"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn what_changed_is_kept_diffed_told_and_alerted() {
    if !require_root("what_changed_is_kept_diffed_told_and_alerted") {
        return;
    }
    let world_key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(world_key.path(), "s3cret-alert-key\n").unwrap();
    let key_path = world_key.path().display().to_string();
    let url = format!("http://127.0.0.1:{HOOK_PORT}/hooks/tapgraph");
    let mut lab = Lab::new(
        &["db", "app", "ext"],
        &[
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
            ("TAPGRAPH_TOPOLOGY__TTL", "4s"),
            ("TAPGRAPH_TOPOLOGY__HISTORY_INTERVAL", "2s"),
            // Every agent host is prod; the agentless host's network is a partner's.
            ("TAPGRAPH_TOPOLOGY__HOSTNAME_LABELS", "* env=prod"),
            (
                "TAPGRAPH_TOPOLOGY__CIDR_LABELS",
                "198.18.3.0/30 env=partner",
            ),
            ("TAPGRAPH_ALERTS__WEBHOOK_URL", &url),
            (
                "TAPGRAPH_ALERTS__SELECTOR",
                "change=new to.env=prod from.env!=prod",
            ),
            ("TAPGRAPH_ALERTS__SECRET_FILE", &key_path),
        ],
    );
    let hooks = lab.world.path().join("hooks.jsonl");
    let mut receiver = lab.hub.command("python3");
    receiver.args([
        "-c",
        RECEIVER,
        &HOOK_PORT.to_string(),
        &key_path,
        hooks.to_str().unwrap(),
    ]);
    lab.procs
        .push(Proc::spawn("webhook-receiver", receiver, lab.world.path()));
    let mut watch = lab.hub.command(bin("tapgraphctl"));
    watch
        .arg("--config")
        .arg(&lab.ctl)
        .args(["-o", "json", "events"]);
    let events = Proc::spawn("events", watch, lab.world.path());

    start_servers(&mut lab, &["db"], "app");
    let db_ip = lab.host("db").1.to_string();
    let ping = ["-h", db_ip.as_str(), "-r", "-1", "-i", "0.2", "ping"];
    lab.run("app", "redis-cli-app", "redis-cli", &ping);
    let app_client = lab.procs.len() - 1;
    lab.agent("db");
    lab.agent("app");
    let inside = "host:app -> svc:db/tcp/6379".to_string();
    wait_for("the app's edge", Duration::from_secs(30), || {
        lab.edges(&[])
            .iter()
            .any(|e| e.starts_with(&inside))
            .then_some(())
    });
    // History records every few seconds: let it see the map as it is now.
    std::thread::sleep(Duration::from_secs(3));
    let t1 = tapgraph::time::rfc3339(std::time::SystemTime::now());
    eprintln!("t1 = {t1}");

    // A new client from outside prod, and the app's client gone.
    lab.run("ext", "redis-cli-ext", "redis-cli", &ping);
    let ext = format!("addr:{} -> svc:db/tcp/6379", lab.host("ext").1);
    lab.procs[app_client].kill_hard();

    let diff = wait_for(
        "graph diff to show the new edge and the gone one",
        Duration::from_secs(40),
        || {
            let d = lab.ctl(&["graph", "diff", "--since", &t1]);
            (ids(&d["new"]) == [ext.clone()] && ids(&d["gone"]) == [inside.clone()]).then_some(d)
        },
    );
    eprintln!("diff: {diff}");
    assert_eq!(diff["gone"][0]["process"], "redis-cli");
    // Between t1 and now nothing came and went; listeners and hosts stayed.
    assert_eq!(diff["between"], serde_json::json!([]));
    assert_eq!(
        ids(&diff["new"]).len(),
        diff["new"].as_array().unwrap().len()
    );

    // What the edges carried is summed per history interval: the app's pings before it went,
    // the newcomer's after it came, each once.
    let carried = wait_for("traffic sums in the diff", Duration::from_secs(20), || {
        let d = lab.ctl(&["graph", "diff", "--since", "5m"]);
        let sums: Vec<(String, u64, u64)> = d["traffic"]
            .as_array()?
            .iter()
            .map(|t| {
                (
                    format!(
                        "{} -> {}",
                        t["from"].as_str().unwrap(),
                        t["to"].as_str().unwrap()
                    ),
                    t["bytes_sent"].as_u64().unwrap(),
                    t["bytes_received"].as_u64().unwrap(),
                )
            })
            .collect();
        let moved = |edge: &str| sums.iter().any(|(e, s, r)| e == edge && *s > 0 && *r > 0);
        (moved(&inside) && moved(&ext)).then_some(sums)
    });
    eprintln!("carried: {carried:?}");

    // The map as it was at t1: the app's edge, not the newcomer's.
    let then: Vec<String> = lab
        .ctl(&["graph", "--at", &t1])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} -> {}",
                e["from"].as_str().unwrap(),
                e["to"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(then, std::slice::from_ref(&inside));

    // `tapgraphctl events` told both.
    let told = wait_for("the edge events", Duration::from_secs(10), || {
        let log = events.log_text();
        let edge: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["kind"] == "edge")
            .collect();
        let new = edge.iter().any(|e| {
            e["fields"]["change"] == "appeared"
                && e["fields"]["first"] == "true"
                && e["fields"]["to"] == "svc:db/tcp/6379"
                && e["fields"]["from"].as_str() == ext.split(' ').next()
        });
        let gone = edge
            .iter()
            .any(|e| e["fields"]["change"] == "gone" && e["fields"]["from"] == "host:app");
        (new && gone).then_some(edge)
    });
    eprintln!("edge events: {told:?}");

    // The webhook: one alert, for the edge from outside prod only, retried once after the 503,
    // signed with the key.
    let got = wait_for("the webhook delivery", Duration::from_secs(20), || {
        let got = json_lines(&hooks);
        got.iter().any(|r| r["status"] == 204).then_some(got)
    });
    std::thread::sleep(Duration::from_secs(2));
    let got = {
        let later = json_lines(&hooks);
        assert_eq!(later.len(), got.len(), "nothing else alerted: {later:?}");
        later
    };
    assert_eq!(got.len(), 2, "a 503, then the retry: {got:?}");
    assert_eq!(
        got[0]["delivery"], got[1]["delivery"],
        "the same delivery retried"
    );
    for r in &got {
        assert_eq!(r["valid"], true, "signature: {r}");
        assert_eq!(r["path"], "/hooks/tapgraph");
        let b = &r["body"];
        assert_eq!(b["change"], "new");
        assert_eq!(b["to"], "svc:db/tcp/6379");
        assert_eq!(
            format!(
                "{} -> {}",
                b["from"].as_str().unwrap(),
                b["to"].as_str().unwrap()
            ),
            ext
        );
        assert_eq!(b["to_labels"]["env"], "prod");
        assert_eq!(b["from_labels"]["env"], "partner");
    }
    // The console's source: the same history over HTTP.
    let (status, body) = lab
        .hub
        .run(|| crate::harness::http_get(crate::topology::HTTP.parse().unwrap(), "/api/v1/history"))
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    let froms: Vec<&str> = h["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "edge" && c["appeared"] == true)
        .filter_map(|c| c["from"].as_str())
        .collect();
    assert!(
        froms.contains(&"host:app") && froms.contains(&ext.split(' ').next().unwrap()),
        "{h}"
    );
    assert!(h["horizon"].as_u64().unwrap() < h["now"].as_u64().unwrap());
    let metrics = {
        let (_, body) = lab
            .hub
            .run(|| crate::harness::http_get(crate::topology::HTTP.parse().unwrap(), "/metrics"))
            .unwrap();
        body
    };
    assert!(
        metrics.contains("tapgraph_alerts_total{outcome=\"delivered\"} 1"),
        "{metrics}"
    );
    drop(events);
}
