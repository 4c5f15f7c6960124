//! Issue 6's benchmark of the Neo4j sink, run by `bench/neo4j-sink.sh` (ignored by `cargo test`).

use std::process::Command;
use std::time::Duration;

use neo4rs::{ConfigBuilder, Graph, query};
use tapgraph::proto::{self, agent_message::Msg};

use crate::harness::{Controller, World, wait_for};
use crate::neo4j::{Bolt, PASSWORD, entry, sink_stats};
use crate::topology::raw_agent_as;

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
