//! Issue 11: the load simulator against a real controller: simulated agents enroll through the
//! real flow with one token of N uses, hold their own mTLS sessions, send snapshots and control
//! records, and acknowledge timed policy rollouts.

use std::process::Command;

use serde_json::Value;

use crate::harness::*;

#[test]
fn simulated_agents_enroll_connect_report_and_take_policies() {
    let world = World::new();
    let controller = Controller::start(
        &world,
        &[
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
        ],
    );
    let ops = world.operator("ops", controller.grpc);
    let token = ctl_json(
        &ops,
        &["token", "create", "--uses", "30", "--label", "env=loadgen"],
    );
    let out = Command::new(bin("tapgraph-loadgen"))
        .args(["--controller", &controller.grpc.to_string()])
        .args(["--server-name", "127.0.0.1"])
        .args(["--token", token["token"].as_str().unwrap()])
        .args(["--ca-fingerprint", token["ca_fingerprint"].as_str().unwrap()])
        .args(["--agents", "30", "--entries", "200", "--duration", "4s"])
        .args(["--rollouts", "2", "--json"])
        .env("TAPGRAPHCTL_CONFIG", &ops)
        .output()
        .expect("tapgraph-loadgen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["connected"], 30, "{report}");
    assert_eq!(report["enrolled_now"], 30, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(stderr.contains("connected 30/30"), "a progress line: {stderr}");
    for rollout in report["rollouts"].as_array().unwrap() {
        assert_eq!(rollout["agents"], 30, "every agent got each new version: {report}");
    }
    assert_eq!(report["rollouts"].as_array().unwrap().len(), 2);
    // The controller took every agent's full table and deltas.
    let (_, body) = http_get(controller.http, "/api/v1/topology/stats").unwrap();
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert!(stats["snapshots_applied"].as_u64().unwrap() >= 60, "{stats}");
    assert_eq!(stats["snapshots_refused_gap"], 0, "{stats}");
    let agents = controller.agents();
    assert_eq!(
        agents.iter().filter(|a| a["labels"]["env"] == "loadgen").count(),
        30
    );
    // The token is used up: a second run cannot enroll more.
    let again = Command::new(bin("tapgraph-loadgen"))
        .args(["--controller", &controller.grpc.to_string()])
        .args(["--server-name", "127.0.0.1"])
        .args(["--token", token["token"].as_str().unwrap()])
        .args(["--ca-fingerprint", token["ca_fingerprint"].as_str().unwrap()])
        .args(["--agents", "1", "--duration", "0s", "--prefix", "more"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("no uses left"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}
