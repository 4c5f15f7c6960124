//! Issue 19: floods on the controller's listeners. A slow-header flood from a namespace host is
//! bounded and leaves gRPC, `tapgraphctl` and `/healthz` working; when descriptors run out, gRPC's
//! accept backs off and accepts again.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;
use crate::http_hardening::connect_from;

/// Runs `f` on a new thread inside namespace `ns` (its sockets live there).
fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = File::open(&path).expect("netns handle");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// What the flood saw.
#[derive(Debug)]
struct Flooded {
    opened: usize,
    /// Connections the server had not closed when the flood gave up on them.
    still_open: usize,
}

/// A flood thread and its `pressure` flag. Dropped (a failed check during the flood), it lets go
/// of the pressure and waits for the thread, so no thread floods on inside a deleted namespace.
struct FloodGuard {
    pressure: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Flooded>>,
}

impl FloodGuard {
    /// Lets go of the pressure and waits for the flood to end.
    fn stop(mut self) -> Flooded {
        self.pressure.store(false, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined once");
        thread.join().expect("flood thread")
    }
}

impl Drop for FloodGuard {
    fn drop(&mut self) {
        self.pressure.store(false, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The longest a flood keeps up its pressure, whatever `pressure` says: a test that never lets
/// go still gets its thread back.
const MAX_PRESSURE: Duration = Duration::from_secs(120);

/// A slow-header flood on `target`: `count` connections, each sending a request head one byte
/// per `every`; closed ones are opened again while `pressure` holds (at most `count * 4` in all,
/// for at most [`MAX_PRESSURE`]), then the flood waits (at most `give_up`) for the server to close
/// the rest.
fn flood(
    sources: &[IpAddr],
    target: SocketAddr,
    count: usize,
    every: Duration,
    pressure: Arc<AtomicBool>,
    held: Arc<AtomicUsize>,
    give_up: Duration,
) -> Flooded {
    let open = |opened: &mut usize| -> Option<TcpStream> {
        // Three in four from the first source (past its cap), the rest spread over the others.
        let from = match *opened % 4 {
            0 => sources[1 + (*opened / 4) % (sources.len() - 1)],
            _ => sources[0],
        };
        *opened += 1;
        let s = connect_from(from, target).ok()?;
        s.set_nonblocking(true).ok()?;
        let mut s = s;
        let _ = s.write_all(b"GET / HTTP/1.1\r\nX-Slow: ");
        Some(s)
    };
    let mut opened = 0;
    let mut socks: Vec<Option<TcpStream>> = (0..count).map(|_| open(&mut opened)).collect();
    let mut ended_at: Option<Instant> = None;
    let began = Instant::now();
    let pressing = || pressure.load(Ordering::Relaxed) && began.elapsed() < MAX_PRESSURE;
    loop {
        let pressing_now = pressing();
        for slot in socks.iter_mut() {
            if let Some(s) = slot {
                let mut buf = [0u8; 512];
                let closed = match s.read(&mut buf) {
                    Ok(_) => true, // EOF, or the server's answer before closing
                    Err(e) if e.kind() == ErrorKind::WouldBlock => s
                        .write_all(b"a")
                        .is_err_and(|e| e.kind() != ErrorKind::WouldBlock),
                    Err(_) => true,
                };
                if closed {
                    *slot = None;
                }
            }
            if slot.is_none() && pressing_now && opened < count * 4 {
                *slot = open(&mut opened);
            }
        }
        let still_open = socks.iter().flatten().count();
        held.store(still_open, Ordering::Relaxed);
        if !pressing() {
            let since = *ended_at.get_or_insert_with(Instant::now);
            if still_open == 0 || since.elapsed() > give_up {
                return Flooded { opened, still_open };
            }
        }
        std::thread::sleep(every);
    }
}

/// The value of the series `series` (name with labels, as written) in a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn a_slow_header_flood_is_bounded_and_grpc_ctl_and_healthz_keep_working() {
    if !require_root("a_slow_header_flood_is_bounded_and_grpc_ctl_and_healthz_keep_working") {
        return;
    }
    // Declared first, dropped last: after every process in them.
    let srv = Netns::new("srv");
    let attacker = Netns::new("flood");
    veth(
        &srv,
        "srv0",
        "198.18.0.1/24",
        &attacker,
        "flood0",
        "198.18.0.2/24",
    );
    // Ten source addresses on the namespace host: together they can fill the connection cap,
    // which the per-source cap alone would not prevent.
    let sources: Vec<IpAddr> = (2..12).map(|n| IpAddr::from([198, 18, 0, n])).collect();
    for source in &sources[1..] {
        let out = Command::new("ip")
            .args(["-n", &attacker.name, "addr", "add"])
            .arg(format!("{source}/24"))
            .args(["dev", "flood0"])
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let world = World::new();
    let grpc: SocketAddr = "198.18.0.1:7443".parse().unwrap();
    let http: SocketAddr = "198.18.0.1:7080".parse().unwrap();

    // The controller with 512 descriptors: the flood below opens more connections than that,
    // which used to take every descriptor, gRPC's accept included.
    let mut controller_cmd = with_nofile(world.controller_cmd(grpc, http), 512);
    controller_cmd.env("TAPGRAPH_HTTP__HEADER_READ_TIMEOUT", "3s");
    let controller = Proc::spawn("controller", srv.wrap(controller_cmd), world.path());
    wait_for("controller ready", Duration::from_secs(20), || {
        controller
            .log_text()
            .contains("controller ready")
            .then_some(())
    });
    let ops = world.operator("ops", grpc);
    let ctl_in_srv = |args: &[&str]| {
        let mut cmd = Command::new(bin("tapgraphctl"));
        cmd.arg("--config").arg(&ops).args(args);
        let out = srv.wrap(cmd).output().expect("tapgraphctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let agent_connected = || -> Result<(), String> {
        let (code, out, err) = ctl_in_srv(&["-o", "json", "agent", "list"]);
        if code != 0 {
            return Err(format!("tapgraphctl agent list: exit {code}: {err}"));
        }
        let agents: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let a1 = agents
            .as_array()
            .and_then(|a| a.iter().find(|a| a["id"] == "a1"))
            .ok_or_else(|| format!("no agent a1: {out}"))?;
        (a1["state"] == "connected")
            .then_some(())
            .ok_or_else(|| format!("a1 is not connected: {a1}"))
    };
    world.issue_agent("a1");
    let _agent = Proc::spawn("agent", srv.wrap(world.agent_cmd("a1", grpc)), world.path());
    wait_for("agent a1 connected", Duration::from_secs(30), || {
        agent_connected().ok()
    });
    let healthz = || srv.run(|| http_get(http, "/healthz"));
    assert!(matches!(healthz(), Ok((200, _))));

    // The flood: 700 connections from ten addresses of the namespace host, each trickling a header
    // byte a second, reopened when closed for 8 s (at most 2,800 connections), then left to the
    // server. The controller's cap is 128 connections (512 descriptors), 64 per source.
    let pressure = Arc::new(AtomicBool::new(true));
    let held = Arc::new(AtomicUsize::new(0));
    let thread = spawn_in(&attacker, {
        let (pressure, held, sources) = (pressure.clone(), held.clone(), sources.clone());
        move || {
            flood(
                &sources,
                http,
                700,
                Duration::from_secs(1),
                pressure,
                held,
                Duration::from_secs(30),
            )
        }
    });
    let flooding = FloodGuard {
        pressure,
        thread: Some(thread),
    };
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let mut checks = 0;
    while started.elapsed() < Duration::from_secs(8) {
        // A new gRPC connection each time: tapgraphctl dials anew.
        agent_connected().unwrap_or_else(|e| panic!("during the flood: {e}"));
        let h = healthz();
        assert!(
            matches!(h, Ok((200, _))),
            "/healthz during the flood: {h:?}"
        );
        checks += 1;
    }
    assert!(checks >= 2);
    let flooded = flooding.stop();
    assert!(flooded.opened >= 700, "{flooded:?}");
    assert_eq!(
        flooded.still_open, 0,
        "the server closes every slow connection (header read timeout): {flooded:?}"
    );

    // Counted by reason, logged a few times rather than per connection, no descriptor ran out.
    let (status, metrics) = srv.run(|| http_get(http, "/metrics")).unwrap();
    assert_eq!(status, 200);
    let per_source = sample(
        &metrics,
        "tapgraph_http_refused_connections_total{reason=\"per_source\"}",
    )
    .unwrap_or_else(|| panic!("{metrics}"));
    assert!(per_source > 0.0, "{metrics}");
    let timed_out = sample(
        &metrics,
        "tapgraph_http_closed_connections_total{reason=\"header_timeout\"}",
    )
    .unwrap_or_default();
    assert!(timed_out > 0.0, "{metrics}");
    // At capacity, the oldest connections without a request made room for /healthz's.
    let evicted = sample(
        &metrics,
        "tapgraph_http_closed_connections_total{reason=\"evicted\"}",
    )
    .unwrap_or_default();
    assert!(evicted > 0.0, "{metrics}");
    eprintln!(
        "flood: {flooded:?}; refused per source {per_source}, closed by the header timeout {timed_out}, evicted {evicted}, {checks} rounds of checks"
    );
    let capacity = sample(
        &metrics,
        "tapgraph_http_refused_connections_total{reason=\"capacity\"}",
    )
    .unwrap_or_default();
    let log = controller.log_text();
    let refusals = log
        .lines()
        .filter(|l| l.contains("HTTP connections refused past a cap"))
        .count();
    assert!(
        refusals >= 1 && (refusals as f64) < per_source + capacity,
        "refusals are logged, once for many: {refusals} lines for {} refusals",
        per_source + capacity
    );
    assert!(
        !log.contains("Too many open files"),
        "descriptors ran out:\n{log}"
    );
    agent_connected().unwrap_or_else(|e| panic!("after the flood: {e}"));
}

/// `cmd` run with at most `nofile` descriptors (prlimit), keeping its arguments and environment.
fn with_nofile(cmd: Command, nofile: u32) -> Command {
    let mut limited = Command::new("prlimit");
    limited
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            limited.env(k, v);
        }
    }
    limited
}

#[test]
fn grpc_accept_backs_off_when_descriptors_run_out_and_accepts_again() {
    let world = World::new();
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut cmd = with_nofile(world.controller_cmd(any, any), 96);
    cmd.env("TAPGRAPH_SESSION__HANDSHAKE_TIMEOUT", "2s");
    let controller = Proc::spawn("controller", cmd, world.path());
    let grpc: SocketAddr = wait_for("controller ready", Duration::from_secs(20), || {
        let log = controller.log_text();
        let line = log.lines().find(|l| l.contains("controller ready"))?;
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("grpc="))?
            .parse()
            .ok()
    });
    let ops = world.operator("ops", grpc);
    // More silent TCP connections than the controller has descriptors: accept fails (EMFILE)
    // until the handshake timeout closes the first ones, and so on through the backlog.
    let began = Instant::now();
    let silent: Vec<TcpStream> = (0..160)
        .filter_map(|_| TcpStream::connect_timeout(&grpc, Duration::from_secs(2)).ok())
        .collect();
    assert!(silent.len() > 96, "{} connections", silent.len());
    wait_for("accept to fail", Duration::from_secs(20), || {
        controller
            .log_text()
            .contains("gRPC accept failed")
            .then_some(())
    });
    // Every silent connection is closed by the server in the end.
    wait_for(
        "the silent connections closed",
        Duration::from_secs(60),
        || {
            silent
                .iter()
                .all(|s| {
                    s.set_nonblocking(true).unwrap();
                    let mut buf = [0u8; 64];
                    !matches!((&*s).read(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock)
                })
                .then_some(())
        },
    );
    drop(silent);
    let (code, _, err) = ctl(&ops, &["agent", "list"]);
    assert_eq!(code, 0, "gRPC accepts again: {err}");
    let log = controller.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("gRPC accept failed"))
        .count();
    // No /metrics counter holds gRPC accept failures, so the bound is the logging interval's:
    // at most one line per 10 s the failures could have spanned, on a machine however slow.
    let spanned = began.elapsed();
    assert!(
        lines >= 1 && lines as u64 <= 1 + spanned.as_secs() / 10,
        "accept failures are logged once per 10 s, not per try: {lines} lines in {spanned:?}"
    );
}
