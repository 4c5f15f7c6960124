//! Issue 19, items 4 and 6: what one enrolled agent can do to the map. Each test is a rogue client
//! holding a real agent certificate, speaking gRPC to a real controller: a table past the fleet's
//! row budget, values no host reports, and a claim on another host's address.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tapgraph::proto::{self, Direction, agent_message::Msg, controller_message};

use crate::harness::{Controller, Proc, World, bin, http_get, wait_for};
use crate::topology::{Sender, raw_agent_as};

type Inbound = tonic::Streaming<proto::ControllerMessage>;

/// A client row of `local` towards `remote:port`, from process `app`, with `sockets`.
fn row(local: &str, remote: &str, port: u32, sockets: u32) -> proto::ConnectionEntry {
    proto::ConnectionEntry {
        direction: Direction::Client as i32,
        local_ip: local.into(),
        remote_ip: remote.into(),
        server_port: port,
        protocol: proto::Protocol::Tcp as i32,
        sockets,
        process: Some(proto::ProcessInfo {
            name: "app".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn listener(ip: &str, port: u32) -> proto::ListeningService {
    proto::ListeningService {
        ip: ip.into(),
        port,
        protocol: proto::Protocol::Tcp as i32,
        process: Some(proto::ProcessInfo {
            name: "server".into(),
            ..Default::default()
        }),
        netns: String::new(),
    }
}

fn full(
    sequence: u64,
    addresses: &[&str],
    listeners: Vec<proto::ListeningService>,
    entries: Vec<proto::ConnectionEntry>,
) -> Msg {
    Msg::Snapshot(proto::ConnectionSnapshot {
        sequence,
        full: true,
        addresses: addresses.iter().map(|a| a.to_string()).collect(),
        listeners,
        entries,
        ..Default::default()
    })
}

fn stats(controller: &Controller) -> Value {
    let (_, body) = http_get(controller.http, "/api/v1/topology/stats").unwrap();
    serde_json::from_str(&body).unwrap()
}

/// Waits until the map has applied `n` snapshots in all.
fn applied(controller: &Controller, n: u64) -> Value {
    wait_for(
        &format!("{n} snapshots applied"),
        Duration::from_secs(10),
        || {
            let s = stats(controller);
            (s["snapshots_applied"].as_u64() >= Some(n)).then_some(s)
        },
    )
}

/// The decorated map as the console reads it.
fn graph(controller: &Controller) -> Value {
    let (status, body) = http_get(controller.http, "/api/v1/graph?include_inactive=true").unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `FROM -> TO` of every CONNECTS_TO edge, as `tapgraphctl graph` lists them.
fn edges(ctl: &std::path::Path) -> Vec<String> {
    let edges = crate::harness::ctl_json(ctl, &["graph", "--include-inactive"]);
    let mut out: Vec<String> = edges
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
    out.sort();
    out
}

/// The next ResyncRequest's reason within 10 s, skipping other messages (policies, probes).
async fn next_resync(inbound: &mut Inbound) -> String {
    let wait = async {
        loop {
            let msg = inbound
                .message()
                .await
                .unwrap()
                .expect("the stream is open");
            if let Some(controller_message::Msg::Resync(r)) = msg.msg {
                return r.reason;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("a ResyncRequest from the controller")
}

/// `tapgraphctl -o json events`, subscribed once this returns; its events are read from its log.
struct Watcher(Proc);

impl Watcher {
    fn start(world: &World, controller: &Controller, ctl: &std::path::Path) -> Watcher {
        let before = controller
            .proc
            .log_text()
            .matches("event watcher connected")
            .count();
        let mut cmd = Command::new(bin("tapgraphctl"));
        cmd.arg("--config").arg(ctl).args(["-o", "json", "events"]);
        let proc = Proc::spawn("events", cmd, world.path());
        wait_for("the event watcher", Duration::from_secs(10), || {
            let log = controller.proc.log_text();
            (log.matches("event watcher connected").count() > before).then_some(())
        });
        Watcher(proc)
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        self.0
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["kind"] == kind)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_past_the_fleet_budget_is_refused_naming_it_and_the_map_keeps_what_it_had() {
    let world = World::new();
    // Ten rows for the whole fleet; each agent's own cap (topology.max_entries) is far above.
    let controller = Controller::start(&world, &[("TAPGRAPH_TOPOLOGY__MAX_ROWS", "10")]);
    let ctl = world.operator("admin", controller.grpc);
    let watcher = Watcher::start(&world, &controller, &ctl);

    // Agent a: one address and four rows, five in all.
    let (send_a, _in_a): (Sender, Inbound) = raw_agent_as(&world, &controller, "a", "a").await;
    let a_rows = (1..=4)
        .map(|i| row("10.9.0.1", &format!("203.0.113.{i}"), 443, 1))
        .collect();
    send_a(full(1, &["10.9.0.1"], vec![], a_rows)).await;
    applied(&controller, 1);
    let before = edges(&ctl);
    assert_eq!(before.len(), 4, "{before:?}");

    // Agent b, enrolled like any other (one token can enroll many), sends eight rows: the map
    // would hold thirteen. Its full snapshot is refused; its next delta hears why.
    let (send_b, mut in_b) = raw_agent_as(&world, &controller, "b", "b").await;
    let b_rows = (1..=7)
        .map(|i| row("10.9.0.2", &format!("198.51.100.{i}"), 443, 1))
        .collect();
    send_b(full(1, &["10.9.0.2"], vec![], b_rows)).await;
    send_b(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 2,
        base_sequence: 1,
        entries: vec![row("10.9.0.2", "198.51.100.9", 443, 1)],
        ..Default::default()
    }))
    .await;
    let reason = next_resync(&mut in_b).await;
    assert!(
        reason.contains("would hold 13 rows, over its budget of 10 (topology.max_rows)"),
        "{reason}"
    );
    let s = stats(&controller);
    assert_eq!(s["snapshots_refused_budget"], 2, "{s}");
    assert_eq!(s["rows"], 5, "{s}");
    assert_eq!(s["max_rows"], 10, "{s}");
    let (_, metrics) = http_get(controller.http, "/metrics").unwrap();
    assert!(
        metrics.contains("tapgraph_topology_snapshots_refused_total{reason=\"budget\"} 2"),
        "{metrics}"
    );

    // Nothing stored is lost, and b added nothing.
    assert_eq!(edges(&ctl), before);
    // Operators hear of it once, naming the budget, not at every retry.
    let refused = wait_for("the refusal event", Duration::from_secs(10), || {
        let e = watcher.events("snapshot_refused");
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["agent"], "b");
    let message = refused[0]["message"].as_str().unwrap();
    assert!(message.contains("topology.max_rows"), "{message}");

    // An agent can always shrink, even with the map full: a keeps working within its share.
    send_a(full(
        2,
        &["10.9.0.1"],
        vec![],
        vec![row("10.9.0.1", "203.0.113.1", 443, 1)],
    ))
    .await;
    applied(&controller, 2);
    assert_eq!(stats(&controller)["rows"], 2);
    // And b's table fits now.
    let b_rows = (1..=7)
        .map(|i| row("10.9.0.2", &format!("198.51.100.{i}"), 443, 1))
        .collect();
    send_b(full(3, &["10.9.0.2"], vec![], b_rows)).await;
    applied(&controller, 3);
    assert_eq!(stats(&controller)["rows"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_no_host_reports_are_refused_and_counted_by_reason() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let ctl = world.operator("admin", controller.grpc);
    let (send, _inbound) = raw_agent_as(&world, &controller, "rogue", "rogue").await;
    let mut long_name = row("10.9.0.1", "203.0.113.5", 443, 1);
    long_name.process = Some(proto::ProcessInfo {
        name: "x".repeat(4096),
        ..Default::default()
    });
    send(full(
        1,
        &["10.9.0.1", "255.255.255.255", "0.0.0.0"],
        vec![listener("0.0.0.0", 8080), listener("255.255.255.255", 80)],
        vec![
            row("10.9.0.1", "203.0.113.9", 443, 1),
            row("10.9.0.1", "255.255.255.255", 443, 1),
            row("10.9.0.1", "0.0.0.0", 443, 1),
            row("10.9.0.1", "224.0.0.1", 443, 1),
            row("10.9.0.1", "203.0.113.8", 443, u32::MAX),
            long_name,
        ],
    ))
    .await;
    let s = applied(&controller, 1);

    // The one real row is on the map; nothing of the impossible ones.
    assert_eq!(edges(&ctl), ["host:rogue -> addr:203.0.113.9"]);
    let g = graph(&controller);
    let addresses: Vec<&str> = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == "address")
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(addresses, ["10.9.0.1", "203.0.113.9"], "{g}");
    let services: Vec<&str> = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == "service")
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["rogue:8080/tcp"], "{g}");

    // Counted by reason: two host addresses, a listener and three endpoints; one socket count; one name.
    assert_eq!(s["rows_skipped"], 8, "{s}");
    assert_eq!(s["rows_skipped_by_reason"]["address"], 6, "{s}");
    assert_eq!(s["rows_skipped_by_reason"]["sockets"], 1, "{s}");
    assert_eq!(s["rows_skipped_by_reason"]["name"], 1, "{s}");
    let (_, metrics) = http_get(controller.http, "/metrics").unwrap();
    assert!(
        metrics.contains("tapgraph_topology_rows_skipped_total{reason=\"address\"} 6"),
        "{metrics}"
    );
    // The log names the first refused value.
    let log = controller.proc.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("snapshot rows refused"))
        .unwrap_or_else(|| panic!("no refusal logged: {log}"));
    assert!(
        line.contains("255.255.255.255 is the broadcast address"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_on_another_hosts_address_shows_as_a_conflict_naming_both_agents() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let ctl = world.operator("admin", controller.grpc);
    let watcher = Watcher::start(&world, &controller, &ctl);

    let (send_db, _in_db) = raw_agent_as(&world, &controller, "db", "db").await;
    send_db(full(
        1,
        &["10.9.0.5"],
        vec![listener("0.0.0.0", 6379)],
        vec![],
    ))
    .await;
    let (send_web, _in_web) = raw_agent_as(&world, &controller, "web", "web").await;
    send_web(full(
        1,
        &["10.9.0.1"],
        vec![],
        vec![row("10.9.0.1", "10.9.0.5", 6379, 2)],
    ))
    .await;
    applied(&controller, 2);
    assert_eq!(edges(&ctl), ["host:web -> svc:db/tcp/6379"]);

    // The rogue claims db's address and listens on the same port, in two snapshots.
    let (send_rogue, _in_rogue) = raw_agent_as(&world, &controller, "rogue", "rogue").await;
    for sequence in [1, 2] {
        send_rogue(full(
            sequence,
            &["10.9.0.5"],
            vec![listener("0.0.0.0", 6379)],
            vec![],
        ))
        .await;
    }
    let s = applied(&controller, 4);
    assert_eq!(s["address_conflicts"], 1, "{s}");

    // The first claimant keeps the address: web's dependency still goes to db.
    assert_eq!(edges(&ctl), ["host:web -> svc:db/tcp/6379"]);
    // On the map (GetGraph and /api/v1/graph): the Address node names both agents.
    let g = graph(&controller);
    let node = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "addr:10.9.0.5")
        .unwrap_or_else(|| panic!("no node for 10.9.0.5: {g}"));
    assert_eq!(
        node["properties"]["conflict"], "claimed by agents db, rogue; the map keeps it on db",
        "{node}"
    );
    let (code, out, err) = crate::harness::ctl(&ctl, &["graph"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: address 10.9.0.5: claimed by agents db, rogue"),
        "{out}\n{err}"
    );

    // In events: one conflict, naming both, not one per snapshot.
    let conflicts = wait_for("the conflict event", Duration::from_secs(10), || {
        let e = watcher.events("address_conflict");
        (!e.is_empty()).then_some(e)
    });
    send_rogue(full(
        3,
        &["10.9.0.5"],
        vec![listener("0.0.0.0", 6379)],
        vec![],
    ))
    .await;
    applied(&controller, 5);
    // Events arrive in order: once a later one is seen, a second conflict would have been too.
    let _marker = raw_agent_as(&world, &controller, "marker", "marker").await;
    wait_for("the marker's event", Duration::from_secs(10), || {
        let seen = watcher
            .events("connected")
            .iter()
            .any(|e| e["agent"] == "marker");
        seen.then_some(())
    });
    let conflicts_now = watcher.events("address_conflict");
    assert_eq!(conflicts_now.len(), 1, "{conflicts_now:?}");
    let e = &conflicts[0];
    assert_eq!(e["agent"], "rogue");
    assert_eq!(e["fields"]["owner"], "db");
    assert_eq!(e["fields"]["address"], "10.9.0.5");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("db") && message.contains("rogue"),
        "{message}"
    );

    // When the rogue lets the address go, the conflict is over.
    send_rogue(full(4, &["10.9.0.66"], vec![], vec![])).await;
    let s = applied(&controller, 6);
    assert_eq!(s["address_conflicts"], 0, "{s}");
    let g = graph(&controller);
    let node = g["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "addr:10.9.0.5")
        .unwrap();
    assert!(node["properties"].get("conflict").is_none(), "{node}");
}
