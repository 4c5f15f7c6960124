//! Issue 6: the map mirrored into a real Bolt server (ArcadeDB, installed by scripts/install-deps and
//! run by scripts/bolt-server), compared node by node and edge by edge with the controller's model,
//! across a database outage, a controller restart and stale data left in the database.
//!
//! The Bolt server of a test's own and the comparable forms of the database and the model live
//! here; beside this file, with the same fixture: the README's queries and schema table
//! (`neo4j_readme.rs`), exact `last_seen` and `active` and labels written at once
//! (`neo4j_freshness.rs`), and the sink's benchmark (`neo4j_bench.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use neo4rs::{ConfigBuilder, Graph, query};
use serde_json::Value;
use tapgraph::proto::{self, agent_message::Msg};

use crate::harness::{Controller, World, ctl_json, http_get, wait_for};
use crate::topology::raw_agent_as;

pub(crate) const PASSWORD: &str = "tapgraph-test";

const DATABASE: &str = "tapgraph";

const INJECTION: &str = "x'}) DETACH DELETE n //";

/// A Bolt server of this test's own, on free loopback ports; stopped on drop.
pub(crate) struct Bolt {
    dir: PathBuf,
    port: u16,
    pub(crate) http: u16,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bolt-server")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Bolt {
    pub(crate) fn start(dir: &Path) -> Bolt {
        let bolt = Bolt {
            dir: dir.join("bolt"),
            port: free_port(),
            http: free_port(),
        };
        bolt.up();
        bolt
    }

    pub(crate) fn up(&self) {
        let out = Command::new(script())
            .arg("start")
            .arg("--dir")
            .arg(&self.dir)
            .args(["--port", &self.port.to_string()])
            .args(["--http-port", &self.http.to_string()])
            .args(["--password", PASSWORD, "--database", DATABASE])
            .output()
            .expect("scripts/bolt-server");
        assert!(
            out.status.success(),
            "the Bolt test server did not start (scripts/install-deps installs it):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub(crate) fn down(&self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg("--dir")
            .arg(&self.dir)
            .output();
    }

    pub(crate) fn uri(&self) -> String {
        format!("bolt://127.0.0.1:{}", self.port)
    }

    pub(crate) fn env(&self) -> Vec<(String, String)> {
        vec![
            ("TAPGRAPH_GRAPH__NEO4J__URI".into(), self.uri()),
            ("TAPGRAPH_GRAPH__NEO4J__USER".into(), "root".into()),
            ("TAPGRAPH_GRAPH__NEO4J__PASSWORD".into(), PASSWORD.into()),
            ("TAPGRAPH_GRAPH__NEO4J__DATABASE".into(), DATABASE.into()),
            // Small batches and a short interval, so that several transactions make one pass.
            ("TAPGRAPH_GRAPH__NEO4J__BATCH_SIZE".into(), "3".into()),
            ("TAPGRAPH_GRAPH__NEO4J__INTERVAL".into(), "200ms".into()),
        ]
    }

    pub(crate) async fn graph(&self) -> Graph {
        let config = ConfigBuilder::default()
            .uri(self.uri())
            .user("root")
            .password(PASSWORD)
            .db(DATABASE)
            .build()
            .unwrap();
        Graph::connect(config).unwrap()
    }

    /// Every node and relationship, in the comparable form of [`model`], sorted; a duplicate
    /// shows as a repeated line.
    pub(crate) async fn contents(&self) -> Vec<String> {
        let graph = self.graph().await;
        let mut out = Vec::new();
        {
            let mut rows = graph
                .execute(query("MATCH (n) RETURN labels(n) AS l, properties(n) AS p"))
                .await
                .unwrap();
            while let Some(row) = rows.next().await.unwrap() {
                let labels: Vec<String> = row.get("l").unwrap();
                let p: Value = row.get("p").unwrap();
                out.push(node_line(&labels.join(":"), &p));
            }
        }
        let mut rows = graph
            .execute(query(
                "MATCH (a)-[r]->(b) RETURN type(r) AS t, a.id AS a, b.id AS b, properties(r) AS p",
            ))
            .await
            .unwrap();
        while let Some(row) = rows.next().await.unwrap() {
            let t: String = row.get("t").unwrap();
            let a: String = row.get("a").unwrap();
            let b: String = row.get("b").unwrap();
            let p: Value = row.get("p").unwrap();
            out.push(edge_line(&t, &a, &b, &p));
        }
        out.sort();
        out
    }

    pub(crate) async fn cypher(&self, text: &str) {
        self.graph().await.run(query(text)).await.unwrap();
    }
}

impl Drop for Bolt {
    fn drop(&mut self) {
        self.down();
    }
}

fn label_of(kind: &str) -> &'static str {
    match kind {
        "host" => "Host",
        "address" => "Address",
        _ => "Service",
    }
}

/// A node as a line: label, id, name and every string property, sorted.
fn node_line(label: &str, props: &Value) -> String {
    let mut p: Vec<String> = props
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect();
    p.sort();
    format!("({label} {})", p.join(" "))
}

/// An edge as a line: type, ends, and the properties both sides carry the same way.
fn edge_line(kind: &str, from: &str, to: &str, p: &Value) -> String {
    let field = |k: &str| p.get(k).map(|v| v.to_string()).unwrap_or_default();
    format!(
        "{from} -[{kind} port={} protocol={} process={} sockets={} active={} control={}]-> {to}",
        field("port"),
        field("protocol"),
        field("process"),
        field("sockets"),
        field("active"),
        field("control_plane")
    )
}

/// The model, as the operator's API exports it, in the form of [`Bolt::contents`].
pub(crate) fn model(ctl: &Path) -> Vec<String> {
    let g = ctl_json(
        ctl,
        &[
            "graph",
            "export",
            "--format",
            "json",
            "--include-control",
            "--include-inactive",
        ],
    );
    let mut out = BTreeSet::new();
    for n in g["nodes"].as_array().unwrap() {
        let mut p = n["properties"].clone();
        let p = p.as_object_mut().unwrap();
        p.insert("id".into(), n["id"].clone());
        p.insert("name".into(), n["name"].clone());
        if let Some(port) = p.get("port").and_then(|v| v.as_str()?.parse::<i64>().ok()) {
            p.insert("port".into(), port.into());
        }
        out.insert(node_line(
            label_of(n["kind"].as_str().unwrap()),
            &Value::Object(p.clone()),
        ));
    }
    for e in g["edges"].as_array().unwrap() {
        let kind = e["kind"].as_str().unwrap();
        let mut p = serde_json::Map::new();
        if kind != "HAS_ADDRESS" {
            p.insert("port".into(), e["port"].clone());
            p.insert("protocol".into(), e["protocol"].clone());
        }
        if kind == "CONNECTS_TO" {
            for k in ["process", "sockets", "active", "control_plane"] {
                p.insert(k.into(), e[k].clone());
            }
        }
        out.insert(edge_line(
            kind,
            e["from"].as_str().unwrap(),
            e["to"].as_str().unwrap(),
            &Value::Object(p),
        ));
    }
    out.into_iter().collect()
}

pub(crate) fn entry(
    direction: proto::Direction,
    local: &str,
    remote: &str,
    port: u32,
    process: &str,
) -> proto::ConnectionEntry {
    proto::ConnectionEntry {
        direction: direction as i32,
        local_ip: local.into(),
        remote_ip: remote.into(),
        server_port: port,
        protocol: proto::Protocol::Tcp as i32,
        sockets: 2,
        process: Some(proto::ProcessInfo {
            name: process.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) fn listener(ip: &str, port: u32, process: &str) -> proto::ListeningService {
    proto::ListeningService {
        ip: ip.into(),
        port,
        protocol: proto::Protocol::Tcp as i32,
        process: Some(proto::ProcessInfo {
            name: process.into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Waits until the database holds exactly the model, and returns it.
pub(crate) async fn wait_equal(bolt: &Bolt, ctl: &Path, what: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let want = model(ctl);
        let have = bolt.contents().await;
        if want == have {
            return have;
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<_> = want.iter().filter(|l| !have.contains(l)).collect();
            let extra: Vec<_> = have.iter().filter(|l| !want.contains(l)).collect();
            panic!(
                "{what}: the database differs from the model\nmissing: {missing:#?}\nextra: {extra:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every row of `text`'s answer, as JSON objects.
pub(crate) async fn answer(graph: &Graph, text: &str) -> Vec<Value> {
    let mut rows = graph
        .execute(query(text))
        .await
        .unwrap_or_else(|e| panic!("{text}: {e}"));
    let mut out = Vec::new();
    while let Some(row) = rows.next().await.unwrap_or_else(|e| panic!("{text}: {e}")) {
        out.push(row.to::<Value>().unwrap_or_else(|e| panic!("{text}: {e}")));
    }
    out
}

pub(crate) fn text(v: &Value) -> String {
    v.as_str()
        .map(String::from)
        .unwrap_or_else(|| v.to_string())
}

pub(crate) fn texts(v: &Value) -> BTreeSet<String> {
    v.as_array().unwrap().iter().map(text).collect()
}

/// `2026-12-06T15:01:02.5Z` in ms since 1970 (UTC only, as tapgraphctl prints times).
pub(crate) fn rfc3339_ms(t: &str) -> i64 {
    let (date, time) = t.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let h: Vec<i64> = hms.split(':').map(|x| x.parse().unwrap()).collect();
    // Days from civil (Howard Hinnant).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms: i64 = format!("{fraction:0<3}")[..3].parse().unwrap();
    ((days * 24 + h[0]) * 60 + h[1]) * 60_000 + h[2] * 1000 + ms
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

pub(crate) fn sink_stats(controller: &Controller) -> Value {
    let (_, body) = http_get(controller.http, "/api/v1/topology/stats").unwrap();
    serde_json::from_str::<Value>(&body).unwrap()["neo4j"].clone()
}

/// A controller with a Bolt server, `env` added to the sink's settings.
pub(crate) fn start(world: &World, bolt: &Bolt, env: &[(&str, &str)]) -> Controller {
    let mut all = bolt.env();
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let all: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Controller::start(world, &all)
}

/// An agent's link to the controller, as the agent marks it.
pub(crate) fn control(local: &str) -> proto::ConnectionEntry {
    proto::ConnectionEntry {
        control_plane: true,
        ..entry(
            proto::Direction::Client,
            local,
            "10.9.0.100",
            7443,
            "tapgraph-agent",
        )
    }
}

/// A host's first, full snapshot: 10.9.0.1 with one curl to an outside HTTPS server.
pub(crate) fn curl_to_outside() -> Msg {
    Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 1,
        full: true,
        addresses: vec!["10.9.0.1".into()],
        entries: vec![entry(
            proto::Direction::Client,
            "10.9.0.1",
            "203.0.113.9",
            443,
            "curl",
        )],
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_equals_the_model_through_outages_and_restarts() {
    let world = World::new();
    let bolt = Bolt::start(world.path());
    let env = bolt.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let controller = Controller::start(&world, &env);
    let ctl = world.operator("admin", controller.grpc);

    // Three hosts: web → app:8080, app → db:5432, web → an external endpoint; the app's process
    // and web's hostname are an injection attempt, which must arrive as text.
    let (web, _web_in) = raw_agent_as(&world, &controller, "web-1", INJECTION).await;
    let (app, _app_in) = raw_agent_as(&world, &controller, "app-1", "app-1").await;
    let (db, _db_in) = raw_agent_as(&world, &controller, "db-1", "db-1").await;
    use proto::Direction::{Client, Server};
    web(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 1,
        full: true,
        addresses: vec!["10.9.0.1".into()],
        entries: vec![
            entry(Client, "10.9.0.1", "10.9.0.2", 8080, "nginx"),
            entry(Client, "10.9.0.1", "203.0.113.9", 443, "curl"),
        ],
        ..Default::default()
    }))
    .await;
    app(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 1,
        full: true,
        addresses: vec!["10.9.0.2".into()],
        listeners: vec![listener("0.0.0.0", 8080, "java")],
        entries: vec![
            entry(Server, "10.9.0.2", "10.9.0.1", 8080, "java"),
            entry(Client, "10.9.0.2", "10.9.0.3", 5432, INJECTION),
        ],
        ..Default::default()
    }))
    .await;
    db(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 1,
        full: true,
        addresses: vec!["10.9.0.3".into()],
        listeners: vec![listener("0.0.0.0", 5432, "postgres")],
        entries: vec![entry(Server, "10.9.0.3", "10.9.0.2", 5432, "postgres")],
        ..Default::default()
    }))
    .await;
    wait_for(
        "three hosts' edges on the map",
        Duration::from_secs(15),
        || (ctl_json(&ctl, &["graph"]).as_array()?.len() == 3).then_some(()),
    );
    let first = wait_equal(&bolt, &ctl, "after the first snapshots").await;
    assert!(
        first
            .iter()
            .any(|l| l.contains(&format!("process=\"{INJECTION}\""))),
        "the process name is stored verbatim: {first:#?}"
    );
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("(Host ") && l.contains(&format!("hostname={INJECTION}"))),
        "the hostname is stored verbatim: {first:#?}"
    );
    assert!(
        first
            .iter()
            .any(|l| l.starts_with("(Address ") && l.contains("id=addr:203.0.113.9"))
    );
    let stats = sink_stats(&controller);
    assert_eq!(stats["state"], "in_sync", "{stats}");
    assert!(
        stats["transactions"].as_u64().unwrap() > 3,
        "batches of 3: {stats}"
    );
    assert!(
        stats["largest_batch_rows"].as_u64().unwrap() <= 3,
        "{stats}"
    );

    // The database goes away; the map changes (app stops using db, starts using a cache); the
    // controller keeps working, and the database catches up when it is back.
    bolt.down();
    app(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 2,
        full: false,
        base_sequence: 1,
        removed: vec![entry(Client, "10.9.0.2", "10.9.0.3", 5432, INJECTION)],
        entries: vec![entry(Client, "10.9.0.2", "10.9.0.77", 6379, "java")],
        ..Default::default()
    }))
    .await;
    db(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 2,
        full: false,
        base_sequence: 1,
        removed: vec![entry(Server, "10.9.0.3", "10.9.0.2", 5432, "postgres")],
        ..Default::default()
    }))
    .await;
    wait_for("the new edge on the map", Duration::from_secs(15), || {
        let edges = ctl_json(&ctl, &["graph"]);
        edges
            .as_array()?
            .iter()
            .any(|e| e["port"] == 6379)
            .then_some(())
    });
    let down = wait_for(
        "the sink to notice the outage",
        Duration::from_secs(20),
        || {
            let s = sink_stats(&controller);
            (s["state"] == "unreachable").then_some(s)
        },
    );
    let noticed = std::time::Instant::now();
    assert!(!down["last_error"].as_str().unwrap().is_empty(), "{down}");
    assert_eq!(
        http_get(controller.http, "/readyz").unwrap().0,
        200,
        "the controller stays ready without its database"
    );
    let outage = noticed.elapsed().as_secs_f64();
    bolt.up();
    let after_outage = wait_equal(&bolt, &ctl, "after the database came back").await;
    assert!(after_outage.iter().any(|l| l.contains("addr:10.9.0.77")));
    // The new edge waited out the outage, and the sink says so.
    wait_for(
        "the delay to cover the outage",
        Duration::from_secs(20),
        || {
            let s = sink_stats(&controller);
            (s["delay_seconds"].as_f64()? >= outage).then_some(())
        },
    );
    // The sink retried all along the outage, and said so once.
    let log = controller.proc.log_text();
    let reported = log
        .lines()
        .filter(|l| l.contains("neo4j unreachable"))
        .count();
    assert_eq!(reported, 1, "{log}");
    assert!(log.contains("neo4j sink recovered"), "{log}");

    // While the controller is down, someone leaves stale data in the database: a node and an
    // edge with ids of ours. The restarted controller reconciles them away.
    let (grpc, http) = (controller.grpc, controller.http);
    drop(controller);
    bolt.cypher(
        "CREATE (h:Host {id: 'host:ghost', name: 'ghost'}) \
         WITH h MATCH (s:Service) CREATE (h)-[:CONNECTS_TO {id: 'CONNECTS_TO|host:ghost|x|1/tcp'}]->(s)",
    )
    .await;
    // And a second copy of a real relationship, id and all.
    bolt.cypher(
        "MATCH (a:Host)-[r:CONNECTS_TO]->(b) WITH a, b, r LIMIT 1 \
         CREATE (a)-[c:CONNECTS_TO]->(b) SET c = properties(r)",
    )
    .await;
    let planted = bolt.contents().await;
    assert!(
        planted.windows(2).any(|w| w[0] == w[1]),
        "a copy planted: {planted:#?}"
    );
    let controller = Controller::start_at(&world, grpc, http, &env);
    let after_restart = wait_equal(&bolt, &ctl, "after a controller restart").await;
    assert!(!after_restart.iter().any(|l| l.contains("ghost")));
    assert_eq!(sink_stats(&controller)["reconciliations"], 1);
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_once_and_the_map_keeps_working() {
    let world = World::new();
    let bolt = Bolt::start(world.path());
    let mut env = bolt.env();
    env.retain(|(k, _)| !k.ends_with("PASSWORD"));
    let secret = world.path().join("neo4j-password");
    std::fs::write(&secret, "not-the-password\n").unwrap();
    env.push((
        "TAPGRAPH_GRAPH__NEO4J__PASSWORD_FILE".into(),
        secret.display().to_string(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let controller = Controller::start(&world, &env);
    let ctl = world.operator("admin", controller.grpc);
    let (agent, _in) = raw_agent_as(&world, &controller, "solo", "solo").await;
    agent(curl_to_outside()).await;
    let failed = wait_for(
        "the sink to give up on the credentials",
        Duration::from_secs(20),
        || {
            let s = sink_stats(&controller);
            (s["state"] == "auth_failed").then_some(s)
        },
    );
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("Authentication"),
        "{failed}"
    );
    // The map works without the database.
    assert_eq!(ctl_json(&ctl, &["graph"]).as_array().unwrap().len(), 1);
    // Several sink intervals later: one clear line, not a storm, and the password never logged.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = controller.proc.log_text();
    let reports = log
        .lines()
        .filter(|l| l.contains("neo4j refused the credentials"))
        .count();
    assert_eq!(reports, 1, "{log}");
    assert!(!log.contains("not-the-password"), "{log}");
    assert_eq!(
        bolt.contents().await,
        Vec::<String>::new(),
        "nothing written"
    );
}

#[test]
fn bad_neo4j_settings_are_refused_with_the_reason() {
    let world = World::new();
    let any: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut cmd = world.controller_cmd(any, any);
    cmd.env("TAPGRAPH_GRAPH__NEO4J__URI", "http://db:7474")
        .env("TAPGRAPH_GRAPH__NEO4J__PASSWORD", "a")
        .env("TAPGRAPH_GRAPH__NEO4J__PASSWORD_FILE", "/nonexistent")
        .env("TAPGRAPH_GRAPH__NEO4J__BATCH_SIZE", "0");
    let err = crate::harness::refused_config(&mut cmd);
    for needle in [
        "graph.neo4j.uri",
        "unknown scheme",
        "not both",
        "graph.neo4j.batch_size",
    ] {
        assert!(err.contains(needle), "{needle} missing from: {err}");
    }
}

/// The controller compiles two crypto providers into rustls, its own aws-lc-rs and ring through
/// neo4rs, and neo4rs builds its TLS configuration without naming one. A `bolt+s://` sink must
/// meet the default the controller installs first, and fail on the handshake, not panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_bolt_address_reaches_the_handshake_and_fails_with_the_reason() {
    let world = World::new();
    // Accepts and hangs up at once: the TLS handshake meets the peer's close.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(stream);
        }
    });
    let uri = format!("bolt+s://127.0.0.1:{port}");
    let env = [
        ("TAPGRAPH_GRAPH__NEO4J__URI", uri.as_str()),
        ("TAPGRAPH_GRAPH__NEO4J__PASSWORD", "unused"),
    ];
    let controller = Controller::start(&world, &env);
    let failed = wait_for(
        "the sink to report the failed handshake",
        Duration::from_secs(20),
        || {
            let s = sink_stats(&controller);
            s["last_error"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
                .then_some(s)
        },
    );
    assert!(accepted.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert_ne!(failed["state"], "in_sync", "{failed}");
    let log = controller.proc.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
    // The controller still serves: its map answers.
    let ctl = world.operator("admin", controller.grpc);
    assert_eq!(ctl_json(&ctl, &["graph"]), serde_json::json!([]));
    server.abort();
}
