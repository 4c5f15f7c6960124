//! Issue 6: the map mirrored into a real Bolt server (ArcadeDB, installed by scripts/install-deps and
//! run by scripts/bolt-server), compared node by node and edge by edge with the controller's model,
//! across a database outage, a controller restart and stale data left in the database.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use neo4rs::{ConfigBuilder, Graph, query};
use serde_json::Value;
use tapgraph::proto::{self, agent_message::Msg};

use crate::harness::{Controller, World, ctl_json, http_get, wait_for};
use crate::topology::raw_agent_as;

const PASSWORD: &str = "tapgraph-test";
const DATABASE: &str = "tapgraph";
const INJECTION: &str = "x'}) DETACH DELETE n //";

/// A Bolt server of this test's own, on free loopback ports; stopped on drop.
struct Bolt {
    dir: PathBuf,
    port: u16,
    http: u16,
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
    fn start(dir: &Path) -> Bolt {
        let bolt = Bolt {
            dir: dir.join("bolt"),
            port: free_port(),
            http: free_port(),
        };
        bolt.up();
        bolt
    }

    fn up(&self) {
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

    fn down(&self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg("--dir")
            .arg(&self.dir)
            .output();
    }

    fn uri(&self) -> String {
        format!("bolt://127.0.0.1:{}", self.port)
    }

    fn env(&self) -> Vec<(String, String)> {
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

    async fn graph(&self) -> Graph {
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
    async fn contents(&self) -> Vec<String> {
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

    async fn cypher(&self, text: &str) {
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
fn model(ctl: &Path) -> Vec<String> {
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

fn entry(
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

fn listener(ip: &str, port: u32, process: &str) -> proto::ListeningService {
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
async fn wait_equal(bolt: &Bolt, ctl: &Path, what: &str) -> Vec<String> {
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

/// The README's five Cypher queries, run on the mirrored map: each must parse and answer.
async fn readme_queries_answer(bolt: &Bolt) {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let block = readme
        .split("```cypher\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a cypher block in the README");
    let queries: Vec<String> = block
        .split(";\n")
        .map(|q| {
            q.lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .filter(|q| !q.trim().is_empty())
        .collect();
    assert_eq!(queries.len(), 5, "{queries:#?}");
    let graph = bolt.graph().await;
    let mut answers = Vec::new();
    for q in &queries {
        let mut rows = graph
            .execute(query(q))
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        let mut out = Vec::new();
        while let Some(row) = rows.next().await.unwrap_or_else(|e| panic!("{q}: {e}")) {
            out.push(row.to::<Value>().unwrap_or_default().to_string());
        }
        answers.push(out.join(" "));
    }
    // Clusters: web talks to app, app to db.
    assert!(
        answers[0].contains("web-1") && answers[0].contains("app-1"),
        "{answers:#?}"
    );
    // Everything web-1 depends on: app's service, and the external endpoint.
    assert!(answers[1].contains("app-1:8080/tcp"), "{answers:#?}");
    assert!(answers[1].contains("203.0.113.9"), "{answers:#?}");
    assert!(
        answers[1].contains("db-1:5432/tcp"),
        "and app's own: {answers:#?}"
    );
    // No orphans among the three.
    assert!(!answers[2].contains("web-1"), "{answers:#?}");
    // The external endpoint.
    assert!(answers[3].contains("203.0.113.9"), "{answers:#?}");
    // Who serves 5432.
    assert!(
        answers[4].contains("db-1") && answers[4].contains("postgres"),
        "{answers:#?}"
    );
}

fn sink_stats(controller: &Controller) -> Value {
    let (_, body) = http_get(controller.http, "/api/v1/topology/stats").unwrap();
    serde_json::from_str::<Value>(&body).unwrap()["neo4j"].clone()
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
    readme_queries_answer(&bolt).await;
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
    agent(Msg::Snapshot(proto::ConnectionSnapshot {
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
    }))
    .await;
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

/// Issue 6's benchmark, not a test: `bench/neo4j-sink.sh` runs it. 100,000 CONNECTS_TO edges among
/// 2,020 nodes (20 agents, 2,000 remote addresses, 50 ports each) written by the sink, timed from
/// the snapshots' sending until the sink reports the database in sync; side by side, the naive way
/// (one auto-committed MERGE statement per edge, as the seed project wrote them) into another
/// database of the same server, with the same constraints, on a sample of the same edges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: bench/neo4j-sink.sh"]
async fn bench_neo4j_sink_against_one_statement_per_edge() {
    const AGENTS: u32 = 20;
    const REMOTES: u32 = 100;
    const PORTS: u32 = 50;
    const NAIVE_SAMPLE: u32 = REMOTES * PORTS;
    let edges = AGENTS * REMOTES * PORTS;
    let world = World::new();
    let bolt = Bolt::start(world.path());
    let mut env = bolt.env();
    env.retain(|(k, _)| !k.ends_with("BATCH_SIZE"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let controller = Controller::start(
        &world,
        &[
            env.as_slice(),
            &[("TAPGRAPH_TOPOLOGY__MAX_ENTRIES", "200000")],
        ]
        .concat(),
    );
    let remote = |k: u32| format!("10.200.{}.{}", k / 250, k % 250 + 1);
    let mut agents = Vec::new();
    for a in 0..AGENTS {
        agents.push(raw_agent_as(&world, &controller, &format!("bench-{a}"), "bench").await);
    }
    // Wait until the sink has written the (empty) hosts, so that the timing starts from a
    // connected, reconciled sink.
    wait_for("the sink connected", Duration::from_secs(60), || {
        (sink_stats(&controller)["state"] == "in_sync").then_some(())
    });
    let started = std::time::Instant::now();
    for (a, (send, _)) in agents.iter().enumerate() {
        let a = a as u32;
        let local = format!("10.100.0.{}", a + 1);
        let entries = (0..REMOTES)
            .flat_map(|j| (0..PORTS).map(move |p| (j, p)))
            .map(|(j, p)| {
                entry(
                    proto::Direction::Client,
                    &local,
                    &remote(a * REMOTES + j),
                    1000 + p,
                    "client",
                )
            })
            .collect();
        send(Msg::Snapshot(proto::ConnectionSnapshot {
            sequence: 1,
            full: true,
            addresses: vec![local.clone()],
            entries,
            ..Default::default()
        }))
        .await;
    }
    let total = u64::from(edges + AGENTS);
    let stats = wait_for("the sink in sync", Duration::from_secs(1800), || {
        let s = sink_stats(&controller);
        (s["state"] == "in_sync" && s["relationships"].as_u64() == Some(total)).then_some(s)
    });
    let sink_secs = started.elapsed().as_secs_f64();
    let sink_rate = f64::from(edges) / sink_secs;
    // The database's share: the time the sink spent in its write transactions.
    let write_secs = stats["write_seconds"].as_f64().unwrap();
    let write_rate = f64::from(edges) / write_secs;
    // What the controller costs in steady state, sink included: every agent reports once in 15 s
    // (the default interval), spread out, and each report changes the model.
    let cpu = |pid: i32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0
    };
    let pid = controller.proc.pid().as_raw();
    let (cpu0, t0) = (cpu(pid), std::time::Instant::now());
    for (send, _) in &agents {
        send(Msg::Snapshot(proto::ConnectionSnapshot {
            sequence: 2,
            full: false,
            base_sequence: 1,
            ..Default::default()
        }))
        .await;
        tokio::time::sleep(Duration::from_millis(750)).await;
    }
    let idle_share = (cpu(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;

    // The naive way, in a database of its own with the same constraints.
    let out = Command::new("curl")
        .args(["-sf", "-u", &format!("root:{PASSWORD}"), "-X", "POST"])
        .arg(format!("http://127.0.0.1:{}/api/v1/server", bolt.http))
        .args(["-d", "{\"command\":\"create database naive\"}"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let naive = Graph::connect(
        ConfigBuilder::default()
            .uri(bolt.uri())
            .user("root")
            .password(PASSWORD)
            .db("naive")
            .build()
            .unwrap(),
    )
    .unwrap();
    for cypher in [
        "CREATE CONSTRAINT host_id IF NOT EXISTS FOR (n:Host) REQUIRE n.id IS UNIQUE",
        "CREATE CONSTRAINT address_id IF NOT EXISTS FOR (n:Address) REQUIRE n.id IS UNIQUE",
        "CREATE INDEX connects_id IF NOT EXISTS FOR ()-[r:CONNECTS_TO]-() ON (r.id)",
    ] {
        naive.run(query(cypher)).await.unwrap();
    }
    let started = std::time::Instant::now();
    // The first agent's edges, in the order the sink got them: the same per-host degree.
    for i in 0..NAIVE_SAMPLE {
        let (a, j, p) = (0, i / PORTS, i % PORTS);
        let (from, to) = (
            format!("host:bench-{a}"),
            format!("addr:{}", remote(a * REMOTES + j)),
        );
        naive
            .run(
                query(
                    "MERGE (a:Host {id: $from}) MERGE (b:Address {id: $to}) \
                     MERGE (a)-[r:CONNECTS_TO {id: $id}]->(b) \
                     SET r.port = $port, r.protocol = 'tcp', r.process = 'client', r.sockets = 2",
                )
                .param("from", from.as_str())
                .param("to", to.as_str())
                .param("id", format!("{from}|{to}|{}", 1000 + p))
                .param("port", i64::from(1000 + p)),
            )
            .await
            .unwrap();
    }
    let naive_secs = started.elapsed().as_secs_f64();
    let naive_rate = f64::from(NAIVE_SAMPLE) / naive_secs;
    println!(
        "\n| writer | edges | seconds | edges/s |\n|---|---|---|---|\n\
         | sink, end to end: snapshots in, database in sync | {edges} | {sink_secs:.1} | {sink_rate:.0} |\n\
         | sink, its write transactions (UNWIND batches of 5,000) | {edges} | {write_secs:.1} | {write_rate:.0} |\n\
         | naive: one auto-committed MERGE per edge | {NAIVE_SAMPLE} (one host's) | {naive_secs:.1} | {naive_rate:.0} |\n\
         \nratio, write transactions to statements: {:.1}x; end to end: {:.1}x; sink transactions {}, largest batch {} rows; one diff of the whole map {}s; \
         controller CPU, sink included, while the 20 agents report every 15 s: {idle_share:.1}% of a core",
        write_rate / naive_rate,
        sink_rate / naive_rate,
        stats["transactions"],
        stats["largest_batch_rows"],
        sink_stats(&controller)["last_diff_seconds"]
    );
    drop(agents);
    drop(controller);
}
