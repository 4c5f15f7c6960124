//! Issue 19: `last_seen` and `active` are exact in the database, and labels and rules (which
//! change the view, not the model) are written at once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use tapgraph::proto::{self, agent_message::Msg};

use crate::harness::{World, ctl_json, wait_for};
use crate::neo4j::{
    Bolt, answer, curl_to_outside, entry, listener, model, now_ms, rfc3339_ms, sink_stats, start,
    text, wait_equal,
};
use crate::neo4j_readme::readme_queries;
use crate::topology::raw_agent_as;

/// Issue 19: `last_seen` was floored to 10-minute steps, so an edge looked last seen before it
/// was first seen, and `active` reached the database only with the minute's full pass. Now no
/// edge is last seen before it was first seen, and once its edges turn inactive (nothing else
/// changing), the database says so, with the exact `last_seen`, well within that minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_and_active_are_exact_in_the_database() {
    let world = World::new();
    let bolt = Bolt::start(world.path());
    let controller = start(&world, &bolt, &[("TAPGRAPH_TOPOLOGY__TTL", "3s")]);
    let ctl = world.operator("admin", controller.grpc);
    let (agent, _in) = raw_agent_as(&world, &controller, "web-1", "web-1").await;
    agent(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 1,
        full: true,
        addresses: vec!["10.9.0.1".into()],
        listeners: vec![listener("0.0.0.0", 80, "nginx")],
        entries: vec![
            entry(
                proto::Direction::Client,
                "10.9.0.1",
                "203.0.113.9",
                443,
                "curl",
            ),
            entry(
                proto::Direction::Server,
                "10.9.0.1",
                "192.0.2.50",
                80,
                "nginx",
            ),
        ],
        ..Default::default()
    }))
    .await;
    let graph = bolt.graph().await;
    let edges = async || {
        answer(
            &graph,
            "MATCH (a)-[c:CONNECTS_TO]->(b) RETURN a.id AS from, b.id AS to, \
             c.first_seen AS first_seen, c.last_seen AS last_seen, c.active AS active",
        )
        .await
    };
    // The model's edges by (from, to): first seen, last seen (ms), active.
    let model = || -> BTreeMap<(String, String), (i64, i64, bool)> {
        ctl_json(&ctl, &["graph", "--include-inactive"])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    (text(&e["from"]), text(&e["to"])),
                    (
                        rfc3339_ms(e["first_seen"].as_str().unwrap()),
                        rfc3339_ms(e["last_seen"].as_str().unwrap()),
                        e["active"] == true,
                    ),
                )
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let written = loop {
        let written = edges().await;
        if written.len() == 2 {
            break written;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the edges reach the database: {written:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for e in &written {
        assert!(
            e["last_seen"].as_i64() >= e["first_seen"].as_i64(),
            "last seen before first seen: {e}"
        );
    }

    // What the step is for: snapshots that move nothing but last_seen make passes that write
    // nothing (unless a step boundary passed meanwhile: then each edge once).
    let written_ms = written
        .iter()
        .map(|e| e["last_seen"].as_i64().unwrap())
        .max()
        .unwrap();
    let before = sink_stats(&controller);
    let bucket = now_ms() / 600_000;
    for sequence in 2..=3 {
        agent(Msg::Snapshot(proto::ConnectionSnapshot {
            sequence,
            full: false,
            base_sequence: sequence - 1,
            ..Default::default()
        }))
        .await;
    }
    wait_for(
        "last_seen refreshed on the map",
        Duration::from_secs(10),
        || {
            model()
                .values()
                .all(|&(_, last_seen, _)| last_seen > written_ms)
                .then_some(())
        },
    );
    let passes = sink_stats(&controller)["passes"].as_u64().unwrap();
    let after = wait_for("a pass after the refresh", Duration::from_secs(10), || {
        let s = sink_stats(&controller);
        (s["passes"].as_u64()? > passes).then_some(s)
    });
    let crossed = now_ms() / 600_000 != bucket;
    let rows = |s: &Value| s["rows_written"].as_u64().unwrap();
    assert!(
        rows(&after) == rows(&before) || crossed && rows(&after) <= rows(&before) + 2,
        "a refreshed last_seen alone was written: before {before}, after {after}"
    );

    // The agent says nothing more: its edges turn inactive on the map after the TTL, without a
    // change to the model; the database follows without waiting for the next snapshot, and
    // holds the exact last_seen.
    wait_for(
        "the edges inactive on the map",
        Duration::from_secs(30),
        || model().values().all(|(_, _, active)| !active).then_some(()),
    );
    let want = model();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let have: BTreeMap<(String, String), (i64, i64, bool)> = edges()
            .await
            .iter()
            .map(|e| {
                (
                    (text(&e["from"]), text(&e["to"])),
                    (
                        e["first_seen"].as_i64().unwrap(),
                        e["last_seen"].as_i64().unwrap(),
                        e["active"] == true,
                    ),
                )
            })
            .collect();
        if have == want {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database differs from the map (first_seen, last_seen, active):\n\
             map: {want:#?}\ndatabase: {have:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // "Seen in the last 5 minutes", as the README asks it, finds both.
    let recent = answer(&graph, &readme_queries()[5]).await;
    assert_eq!(recent.len(), 2, "{recent:#?}");
}

/// Issue 19: a label set with `tapgraphctl agent label`, or a rule set with `graph rules set`,
/// changes the view but not the model; it reached the database only with the minute's full
/// pass. Now it is written at once, no snapshot needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_reaches_the_database_without_a_snapshot() {
    let world = World::new();
    let bolt = Bolt::start(world.path());
    let controller = start(&world, &bolt, &[]);
    let ctl = world.operator("admin", controller.grpc);
    let (agent, _in) = raw_agent_as(&world, &controller, "web-1", "web-1").await;
    agent(curl_to_outside()).await;
    wait_equal(&bolt, &ctl, "after the snapshot").await;
    let graph = bolt.graph().await;
    let property = async |id: &str, key: &str| -> Value {
        let rows = answer(
            &graph,
            &format!("MATCH (n {{id: '{id}'}}) RETURN properties(n) AS p"),
        )
        .await;
        rows.first()
            .map(|r| r["p"][key].clone())
            .unwrap_or_default()
    };
    let (code, _, err) = crate::harness::ctl(&ctl, &["agent", "label", "web-1", "team=payments"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = crate::harness::ctl(
        &ctl,
        &[
            "graph",
            "rules",
            "set",
            "--cidr",
            "203.0.113.0/24 owner=saas",
        ],
    );
    assert_eq!(code, 0, "{err}");
    // Well within the minute after which the old sink wrote them.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let team = property("host:web-1", "label.team").await;
        let owner = property("addr:203.0.113.9", "label.owner").await;
        if team == "payments" && owner == "saas" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "labels not in the database: label.team={team} label.owner={owner}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        wait_equal(&bolt, &ctl, "after the labels").await,
        model(&ctl),
        "nothing else changed"
    );
}
