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
    let (ok, report, stderr) = loadgen(
        &controller,
        &token,
        &ops,
        &[
            "--agents",
            "30",
            "--entries",
            "200",
            "--duration",
            "4s",
            "--rollouts",
            "2",
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(report["connected"], 30, "{report}");
    assert_eq!(report["enrolled_now"], 30, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    assert!(
        stderr.contains("connected 30/30"),
        "a progress line: {stderr}"
    );
    for rollout in report["rollouts"].as_array().unwrap() {
        assert_eq!(
            rollout["agents"], 30,
            "every agent got each new version: {report}"
        );
    }
    assert_eq!(report["rollouts"].as_array().unwrap().len(), 2);
    // The controller took every agent's full table and deltas.
    let (_, body) = http_get(controller.http, "/api/v1/topology/stats").unwrap();
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert!(
        stats["snapshots_applied"].as_u64().unwrap() >= 60,
        "{stats}"
    );
    assert_eq!(stats["snapshots_refused_gap"], 0, "{stats}");
    let agents = controller.agents();
    assert_eq!(
        agents
            .iter()
            .filter(|a| a["labels"]["env"] == "loadgen")
            .count(),
        30
    );
    // The token is used up: a second run cannot enroll more.
    let (ok, _, again) = loadgen(
        &controller,
        &token,
        &ops,
        &["--agents", "1", "--duration", "0s", "--prefix", "more"],
    );
    assert!(!ok);
    assert!(again.contains("no uses left"), "{again}");
}

/// Runs the simulator with `args` against `controller`, as operator `ops` for its rollouts;
/// returns (success, JSON report, stderr).
fn loadgen(
    controller: &Controller,
    token: &Value,
    ops: &std::path::Path,
    args: &[&str],
) -> (bool, Value, String) {
    let out = Command::new(bin("tapgraph-loadgen"))
        .args(["--controller", &controller.grpc.to_string()])
        .args(["--server-name", "127.0.0.1"])
        .args(["--token", token["token"].as_str().unwrap()])
        .args([
            "--ca-fingerprint",
            token["ca_fingerprint"].as_str().unwrap(),
        ])
        .arg("--json")
        .args(args)
        .env("TAPGRAPHCTL_CONFIG", ops)
        .output()
        .expect("tapgraph-loadgen");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_overloaded_controller_sheds_with_clear_statuses_and_recovers_losing_nothing() {
    let world = World::new();
    let env = [
        ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
        ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
        ("TAPGRAPH_SESSION__MAX_AGENTS", "10"),
        ("TAPGRAPH_ENROLLMENT__RATE", "5"),
        ("TAPGRAPH_ENROLLMENT__BURST", "5"),
        ("TAPGRAPH_TOPOLOGY__QUEUE", "1"),
    ];
    let controller = Controller::start(&world, &env);
    let ops = world.operator("ops", controller.grpc);
    let (code, _, err) = ctl(
        &ops,
        &[
            "policy",
            "set",
            "keep",
            "--selector",
            "env=loadgen",
            "--snapshot-interval",
            "1s",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let policy_before = ctl_json(&ops, &["policy", "get", "keep"]);
    let token = ctl_json(
        &ops,
        &["token", "create", "--uses", "15", "--label", "env=loadgen"],
    );

    // 15 agents against 10 sessions, 5 enrollments a second, and big tables into a queue of one.
    let (ok, report, stderr) = loadgen(
        &controller,
        &token,
        &ops,
        &[
            "--agents",
            "15",
            "--entries",
            "20000",
            "--duration",
            "4s",
            "--concurrency",
            "15",
        ],
    );
    assert!(!ok, "not every agent can connect: {stderr}");
    assert_eq!(
        report["enrolled_now"], 15,
        "the rate limit delays, it does not refuse: {report}"
    );
    assert!(report["enroll_retries"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["connected"], 10, "{report}");
    assert_eq!(report["errors"]["session"], 5, "{report}");
    assert!(
        stderr.contains("session limit (10 agents, session.max_agents)"),
        "the refusal says why: {stderr}"
    );
    assert!(
        report["resync_requests"].as_u64().unwrap() > 0,
        "shed snapshots are resent in full: {report}"
    );
    let (_, body) = http_get(controller.http, "/api/v1/topology/stats").unwrap();
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert!(
        stats["snapshots_shed_busy"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(stats["snapshots_applied"].as_u64().unwrap() > 0, "{stats}");

    // Recovered: ready, every enrolled agent and the policy still there, new work applied.
    assert_eq!(http_get(controller.http, "/readyz").unwrap().0, 200);
    let enrolled = ctl_json(&ops, &["agent", "list"]);
    let sims = enrolled
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["id"].as_str().unwrap().starts_with("sim-"))
        .count();
    assert_eq!(sims, 15, "no enrolled agent lost: {enrolled}");
    assert_eq!(ctl_json(&ops, &["policy", "get", "keep"]), policy_before);
    world.issue_agent("after");
    let _agent = Proc::spawn(
        "agent",
        world.agent_cmd("after", controller.grpc),
        world.path(),
    );
    let applied = stats["snapshots_applied"].as_u64().unwrap();
    wait_for(
        "a snapshot applied after the load",
        std::time::Duration::from_secs(20),
        || {
            let (_, body) = http_get(controller.http, "/api/v1/topology/stats").ok()?;
            let now: Value = serde_json::from_str(&body).ok()?;
            (now["snapshots_applied"].as_u64()? > applied).then_some(())
        },
    );
}

#[test]
fn bad_limits_are_refused_by_key() {
    let world = World::new();
    let any = "127.0.0.1:0".parse().unwrap();
    for (key, value, name) in [
        ("TAPGRAPH_SESSION__MAX_STREAMS", "1", "session.max_streams"),
        ("TAPGRAPH_SESSION__MAX_AGENTS", "0", "session.max_agents"),
        ("TAPGRAPH_ENROLLMENT__RATE", "0", "enrollment.rate"),
        ("TAPGRAPH_ENROLLMENT__BURST", "many", "enrollment.burst"),
        ("TAPGRAPH_TOPOLOGY__QUEUE", "0", "topology.queue"),
    ] {
        let mut cmd = world.controller_cmd(any, any);
        cmd.env(key, value);
        let err = refused_config(&mut cmd);
        assert!(err.contains(name), "{key}={value}: {err}");
    }
}
