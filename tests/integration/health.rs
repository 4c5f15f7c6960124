//! Issue 8: fleet health with real daemons on loopback: a stopped agent is lost and comes back
//! without flapping, a delayed path shows in the delivery delay, a shifted clock in the offset.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::{Controller, Proc, World, bin, ctl, require_root, wait_for};

/// A controller with a policy of short heartbeats (`extra` flags added), and an operator config.
fn controller_with_policy(world: &World, extra: &[&str]) -> (Controller, std::path::PathBuf) {
    let controller = Controller::start(world, &[]);
    let operator = world.operator("admin", controller.grpc);
    let mut args = vec![
        "policy",
        "set",
        "fleet",
        "--all",
        "--heartbeat-interval",
        "500ms",
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = ctl(&operator, &args);
    assert_eq!(code, 0, "{err}");
    (controller, operator)
}

fn wait_policy(controller: &Controller, id: &str) -> Value {
    controller.wait_agent(id, "connected", Duration::from_secs(20), |a| {
        a["policy_name"] == "fleet"
            && a["policy_version_applied"] == a["policy_version_sent"]
            && a["control_records"].as_u64() >= Some(2)
    })
}

#[test]
fn a_stopped_agent_is_lost_within_three_intervals_and_recovers_without_flapping() {
    let world = World::new();
    let (controller, operator) = controller_with_policy(&world, &[]);
    world.issue_agent("a1");
    let agent = Proc::spawn(
        "agent",
        world.agent_cmd("a1", controller.grpc),
        world.path(),
    );
    wait_policy(&controller, "a1");
    let mut watch = Command::new(bin("tapgraphctl"));
    watch
        .arg("--config")
        .arg(&operator)
        .args(["-o", "json", "events"]);
    let events = Proc::spawn("events", watch, world.path());
    std::thread::sleep(Duration::from_millis(500));

    agent.signal(Signal::SIGSTOP);
    let lost = controller.wait_agent("a1", "lost", Duration::from_secs(10), |_| true);
    let reason = lost["state_reason"].as_str().unwrap();
    assert!(
        reason.contains("3 heartbeat intervals of 0.5 s"),
        "{reason}"
    );
    let (code, out, err) = ctl(&operator, &["-o", "json", "agent", "show", "a1"]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["state"], "lost", "{shown}");
    assert!(
        shown["state_reason"]
            .as_str()
            .unwrap()
            .contains("heartbeat"),
        "{shown}"
    );
    // It stays lost while stopped: nothing flips it back.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(controller.agent("a1").unwrap()["state"], "lost");

    agent.signal(Signal::SIGCONT);
    controller.wait_agent("a1", "connected", Duration::from_secs(20), |_| true);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(controller.agent("a1").unwrap()["state"], "connected");

    let states: Vec<String> = events
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "state" && e["agent"] == "a1")
        .map(|e| {
            e["fields"]["state"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        states,
        ["lost", "connected"],
        "one change each way, no flapping"
    );
}

#[test]
fn a_shifted_agent_clock_shows_as_its_offset() {
    // libfaketime preloaded into the agent itself (the `faketime` wrapper forks, and its child
    // would outlive the test): CLOCK_REALTIME moves 3 s ahead for this one process, while its
    // timers keep the real monotonic clock.
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists())
        .expect(
            "libfaketime is missing: scripts/install-deps installs it (Debian package faketime)",
        );
    let world = World::new();
    let (controller, _) = controller_with_policy(&world, &[]);
    world.issue_agent("shifted");
    world.issue_agent("true");
    let mut shifted = world.agent_cmd("shifted", controller.grpc);
    shifted
        .env("LD_PRELOAD", &lib)
        .env("FAKETIME", "+3s")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    let _a = Proc::spawn("agent-shifted", shifted, world.path());
    let _b = Proc::spawn(
        "agent-true",
        world.agent_cmd("true", controller.grpc),
        world.path(),
    );
    for (id, expected) in [("shifted", 3000.0), ("true", 0.0)] {
        // Several probes, so the shortest round trip is a quiet one.
        let a = controller.wait_agent(id, "connected", Duration::from_secs(20), |a| {
            a["control_records"].as_u64() >= Some(8) && a["clock_offset_ms"].is_number()
        });
        let offset = a["clock_offset_ms"].as_f64().unwrap();
        assert!(
            (offset - expected).abs() < 5.0,
            "agent {id}: offset {offset} ms, expected {expected} ms"
        );
    }
}

/// A TCP relay that holds every chunk `delay` before passing it on, each way: a slow WAN link
/// between agent and controller. TLS passes through it untouched.
fn delaying_relay(target: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let Ok(up) = TcpStream::connect(target) else {
                continue;
            };
            let _ = conn.set_nodelay(true);
            let _ = up.set_nodelay(true);
            pipe(conn.try_clone().unwrap(), up.try_clone().unwrap(), delay);
            pipe(up, conn, delay);
        }
    });
    addr
}

fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, data) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

/// With 40 ms added each way between agent and controller, the mirrored packets' delivery delay
/// is 40 ms more than the capture itself adds, and the offset stays near zero (the path is
/// symmetric, as NTP assumes).
#[test]
fn a_delayed_path_shows_in_the_delivery_delay() {
    if !require_root("a_delayed_path_shows_in_the_delivery_delay") {
        return;
    }
    let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sink.local_addr().unwrap().port();
    let world = World::new();
    let filter = format!("udp and dst port {port}");
    let (controller, _) = controller_with_policy(
        &world,
        &[
            "--capture",
            "--interface",
            "lo",
            "--filter",
            &filter,
            "--mode",
            "immediate",
            "--batch-delay",
            "200us",
            "--target",
            "none",
        ],
    );
    let relay = delaying_relay(controller.grpc, Duration::from_millis(40));
    world.issue_agent("far");
    let _agent = Proc::spawn("agent", world.agent_cmd("far", relay), world.path());
    wait_policy(&controller, "far");
    let src = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..500u32 {
        src.send_to(&i.to_be_bytes(), ("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let a = wait_for(
        "500 packets sent and an offset",
        Duration::from_secs(20),
        || {
            let a = controller.agent("far")?;
            eprintln!("far: {} {}", a["capture"], a["clock_offset_ms"]);
            (a["capture"]["packets_sent"] == 500 && a["clock_offset_ms"].is_number()).then_some(a)
        },
    );
    let offset = a["clock_offset_ms"].as_f64().unwrap();
    assert!(offset.abs() < 5.0, "offset {offset} ms on a symmetric path");
    let (_, body) = crate::harness::http_get(controller.http, "/api/v1/mirror").unwrap();
    let stats: Value = serde_json::from_str(&body).unwrap();
    let m = stats
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["agent"] == "far")
        .unwrap()
        .clone();
    assert_eq!(m["packets_written"], 500, "{m}");
    assert_eq!(m["lost_in_transit"], 0, "{m}");
    let p50_ms = m["delay_p50_us"].as_f64().unwrap() / 1e3;
    assert!(
        (40.0..45.0).contains(&p50_ms),
        "delivery delay p50 {p50_ms} ms with 40 ms added: {m}"
    );
}

/// Both /metrics endpoints parse with Prometheus' own OpenMetrics parser (scripts/check-metrics)
/// and carry the names dashboards are built on.
#[test]
fn metrics_parse_and_their_names_are_stable() {
    let world = World::new();
    let (controller, _) = controller_with_policy(&world, &[]);
    world.issue_agent("m1");
    let agent = Proc::spawn(
        "agent",
        world.agent_cmd("m1", controller.grpc),
        world.path(),
    );
    wait_policy(&controller, "m1");
    let agent_addr: SocketAddr = wait_for("agent /metrics", Duration::from_secs(10), || {
        let log = agent.log_text();
        let line = log.lines().find(|l| l.contains("serving /metrics"))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))?
            .parse()
            .ok()
    });
    let check = |addr: SocketAddr, expected: &[&str]| {
        let (status, body) = crate::harness::http_get(addr, "/metrics").unwrap();
        assert_eq!(status, 200, "{body}");
        let names = crate::harness::check_metrics(&body)
            .unwrap_or_else(|e| panic!("check-metrics refused {addr}/metrics: {e}\n{body}"));
        for name in expected {
            assert!(
                names.lines().any(|n| n == *name),
                "{name} missing from {names}"
            );
        }
    };
    check(
        controller.http,
        &[
            "tapgraph_agents",
            "tapgraph_agent_dropped_packets",
            "tapgraph_agent_snapshot_entries",
            "tapgraph_mirror_received_packets",
            "tapgraph_mirror_written_packets",
            "tapgraph_mirror_dropped_packets",
            "tapgraph_mirror_delay_seconds",
            "tapgraph_neo4j_lag_seconds",
        ],
    );
    check(
        agent_addr,
        &[
            "tapgraph_capture_packets",
            "tapgraph_capture_dropped_packets",
            "tapgraph_control_records",
            "process_resident_memory_bytes",
        ],
    );
}
