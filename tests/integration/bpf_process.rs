//! Issue 23, part 1: a process on every connection. A real nginx and a real command-line client
//! (curl, run in a loop: each process lives a few milliseconds, each connection well under one)
//! in network-namespace hosts with agents on both. With BPF, every short-lived edge carries the
//! client's process (from the agent's BPF connect tracer) and the server's (from its listener);
//! with BPF turned off by configuration, the agent says so in its capabilities and on the edges.
//!
//! Each connection goes to a port of its own (nginx listens on all of them), so each is an edge
//! of its own on the map: "every edge is named" is then "every connection was named", not "one
//! connection of many named an edge".

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Proc, bin, http_get, require_root, wait_for};
use crate::topology::Lab;

/// Runs `n` curl processes one after the other at `per_minute`, paced from the start (a late one
/// does not delay the schedule), each to the next port from `first`; prints how many failed and
/// how long the run took, and fails if any did.
const CLIENT_LOOP: &str = r#"import subprocess, sys, time
host, first, n, per_min = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
dt = 60.0 / per_min
t0 = time.monotonic()
failed = 0
for i in range(n):
    d = t0 + i * dt - time.monotonic()
    if d > 0:
        time.sleep(d)
    url = "http://%s:%d/" % (host, first + i)
    r = subprocess.run(["curl", "-fsS", "-o", "/dev/null", "--max-time", "5", url])
    failed += r.returncode != 0
took = time.monotonic() - t0
rate = 60 * (n - 1) / took if n > 1 else 0
print("%d connects in %.1f s (%.0f/min), %d failed" % (n, took, rate, failed), flush=True)
sys.exit(1 if failed else 0)
"#;

/// Where the test itself asks whether nginx is up: not a port whose edges are counted.
const PROBE_PORT: u16 = 8080;

/// nginx answering on every port of `ports` and on [`PROBE_PORT`] (one worker, no logs, no
/// keep-alive).
fn nginx_conf(dir: &Path, ports: &[Range<u16>]) -> std::path::PathBuf {
    let listen: String = ports
        .iter()
        .flat_map(|r| r.clone())
        .chain([PROBE_PORT])
        .map(|p| format!("listen {p} backlog=64; "))
        .collect();
    let conf = dir.join("nginx-ports.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_timeout 0;\n\
               client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
               server {{ {listen} location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    conf
}

/// A lab: hosts `srv` (nginx on `ports`) and `cli`, the controller snapshotting every second.
/// Agents are started by the caller.
fn lab(ports: &[Range<u16>]) -> Lab {
    let mut lab = Lab::new(
        &["srv", "cli"],
        &[
            ("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s"),
            ("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "1s"),
        ],
    );
    let conf = nginx_conf(lab.world.path(), ports);
    let log = lab.world.path().join("nginx-startup.log");
    lab.run(
        "srv",
        "nginx",
        "nginx",
        &["-c", conf.to_str().unwrap(), "-e", log.to_str().unwrap()],
    );
    lab
}

/// An agent on `name` with `env` added, its /metrics on 127.0.0.1:9464 of its own namespace.
fn agent(lab: &mut Lab, name: &str, env: &[(&str, &str)]) {
    agent_without(lab, name, env, &[]);
}

/// The same, without the capabilities `drop` (setpriv names: `bpf`, `perfmon`, `sys_admin`).
fn agent_without(lab: &mut Lab, name: &str, env: &[(&str, &str)], drop: &[&str]) {
    lab.world.issue_agent(name);
    let (ns, _, net) = lab.host(name);
    let mut cmd = lab
        .world
        .agent_cmd(name, format!("198.18.{net}.1:7443").parse().unwrap());
    cmd.args(["--server-name", "localhost"])
        .env("TAPGRAPH_METRICS__LISTEN", "127.0.0.1:9464")
        .envs(env.iter().copied());
    if !drop.is_empty() {
        // Inside the namespace (`ip netns exec` itself needs CAP_SYS_ADMIN): the agent runs as
        // root whose bounding set lacks them, as under a unit that does not grant them.
        let bounding: Vec<String> = drop.iter().map(|c| format!("-{c}")).collect();
        let mut wrapped = std::process::Command::new("setpriv");
        wrapped
            .arg(format!("--bounding-set={}", bounding.join(",")))
            .arg("--")
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                wrapped.env(k, v);
            }
        }
        cmd = wrapped;
    }
    let cmd = ns.wrap(cmd);
    let p = Proc::spawn(&format!("agent-{name}"), cmd, lab.world.path());
    lab.procs.push(p);
}

fn wait_connected(lab: &Lab, ids: &[&str]) {
    wait_for("agents connected", Duration::from_secs(30), || {
        let agents = lab.ctl(&["agent", "list"]);
        let connected = agents
            .as_array()?
            .iter()
            .filter(|a| a["state"] == "connected" && ids.contains(&a["id"].as_str().unwrap_or("")))
            .count();
        (connected == ids.len()).then_some(())
    });
}

/// Waits until nginx answers, from `cli`, on the probe port.
fn wait_nginx(lab: &Lab, srv_ip: &str) {
    let (cli, _, _) = lab.host("cli");
    let addr: SocketAddr = format!("{srv_ip}:{PROBE_PORT}").parse().unwrap();
    wait_for("nginx listening", Duration::from_secs(20), || {
        cli.run(|| http_get(addr, "/").ok().filter(|(s, _)| *s == 200))
    });
}

/// The edges on `ports` once every connection's edge is on the map with both sides reported
/// (a client process or a note saying why there is none, and the service's process), or as
/// they are after 30 s, for the assertions to show what is missing.
fn settled_edges(lab: &Lab, ports: &Range<u16>) -> BTreeMap<u16, (String, String, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let edges = edges_on(lab, ports);
        let settled = edges.len() == ports.len()
            && edges
                .values()
                .all(|(c, note, s)| (!c.is_empty() || !note.is_empty()) && !s.is_empty());
        if settled || std::time::Instant::now() > deadline {
            return edges;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs the client loop on `cli` over `ports` at `per_minute`; returns its summary line.
fn client_loop(lab: &Lab, srv_ip: &str, ports: &Range<u16>, per_minute: u32) -> String {
    let (cli, _, _) = lab.host("cli");
    let out = cli
        .command("python3")
        .args([
            "-c",
            CLIENT_LOOP,
            srv_ip,
            &ports.start.to_string(),
            &ports.len().to_string(),
            &per_minute.to_string(),
        ])
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "client loop: {summary} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    summary
}

/// The map's edges from `cli` to `srv` on `ports` (inactive ones included), by port: the edge's
/// client process and note, and the server's process (its service node's).
fn edges_on(lab: &Lab, ports: &Range<u16>) -> BTreeMap<u16, (String, String, String)> {
    let export = lab.ctl(&["graph", "export", "--format", "json", "--include-inactive"]);
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let services: BTreeMap<String, String> = export["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (text(&n["id"]), text(&n["properties"]["process"])))
        .collect();
    let edges = lab.ctl(&["graph", "--include-inactive", "--host", "cli"]);
    edges
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["from"] == "host:cli")
        .filter_map(|e| {
            let port = u16::try_from(e["port"].as_u64()?).ok()?;
            ports.contains(&port).then(|| {
                let to = text(&e["to"]);
                let server = services.get(&to).cloned().unwrap_or_default();
                (
                    port,
                    (text(&e["process"]), text(&e["process_note"]), server),
                )
            })
        })
        .collect()
}

/// The agent's `/metrics` on `host` (served on its namespace's 127.0.0.1:9464).
fn agent_metrics(lab: &Lab, host: &str) -> String {
    let (ns, _, _) = lab.host(host);
    let addr: SocketAddr = "127.0.0.1:9464".parse().unwrap();
    let (status, body) = ns.run(|| http_get(addr, "/metrics")).unwrap();
    assert_eq!(status, 200);
    body
}

fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn every_short_lived_edge_names_its_client_and_server_process_at_240_and_2000_per_minute() {
    let test =
        "every_short_lived_edge_names_its_client_and_server_process_at_240_and_2000_per_minute";
    if !require_root(test) {
        return;
    }
    // 120 connections at 240 a minute (30 s), then 500 at 2,000 a minute (15 s).
    let runs: [(Range<u16>, u32); 2] = [(20_000..20_120, 240), (21_000..21_500, 2_000)];
    let ranges: Vec<Range<u16>> = runs.iter().map(|(r, _)| r.clone()).collect();
    let mut lab = lab(&ranges);
    agent(&mut lab, "srv", &[]);
    agent(&mut lab, "cli", &[]);
    wait_connected(&lab, &["srv", "cli"]);
    let shown = lab.ctl(&["agent", "show", "cli"]);
    assert_eq!(
        shown["connect_process"]["bpf"], true,
        "the cli agent runs BPF: {shown}"
    );
    let (_, srv_ip, _) = lab.host("srv");
    let srv_ip = srv_ip.to_string();
    wait_nginx(&lab, &srv_ip);
    for (ports, per_minute) in runs {
        let summary = client_loop(&lab, &srv_ip, &ports, per_minute);
        eprintln!("{per_minute}/min: {summary}");
        // Every connection's edge reaches the map (the agents' next snapshots), then each must
        // name both processes.
        let edges = settled_edges(&lab, &ports);
        assert_eq!(
            edges.len(),
            ports.len(),
            "one edge per connection: {edges:?}"
        );
        let unnamed: Vec<_> = edges
            .iter()
            .filter(|(_, (client, _, server))| client != "curl" || server != "nginx")
            .collect();
        let named = edges.len() - unnamed.len();
        eprintln!(
            "{per_minute}/min: {named} of {} short-lived edges name client (curl) and server (nginx)",
            edges.len()
        );
        assert!(
            unnamed.is_empty(),
            "{per_minute}/min: {} of {} edges lack a process (port: client, note, server): {unnamed:?}",
            unnamed.len(),
            edges.len()
        );
    }
    let metrics = agent_metrics(&lab, "cli");
    for reason in ["ring_full", "queue_full", "malformed"] {
        let series = format!("tapgraph_bpf_dropped_connects_total{{reason=\"{reason}\"}}");
        assert_eq!(metric(&metrics, &series), Some(0.0), "{series}");
    }
    let seen = metric(&metrics, "tapgraph_bpf_connects_total").unwrap_or(0.0);
    assert!(seen >= 620.0, "the tracer read every connect: {seen}");
}

#[test]
fn with_bpf_off_by_configuration_the_agent_and_the_edges_say_so() {
    let test = "with_bpf_off_by_configuration_the_agent_and_the_edges_say_so";
    if !require_root(test) {
        return;
    }
    let ports = 22_000..22_005;
    let mut lab = lab(std::slice::from_ref(&ports));
    agent(&mut lab, "srv", &[]);
    agent(&mut lab, "cli", &[("TAPGRAPH_SNAPSHOT__BPF", "false")]);
    wait_connected(&lab, &["srv", "cli"]);
    let shown = lab.ctl(&["agent", "show", "cli"]);
    assert_eq!(shown["connect_process"]["bpf"], false, "{shown}");
    let reason = shown["connect_process"]["off_reason"]
        .as_str()
        .unwrap_or("");
    assert!(reason.contains("snapshot.bpf = false"), "{shown}");
    // The same in the text operators read.
    let out = lab
        .hub
        .command(bin("tapgraphctl"))
        .arg("--config")
        .arg(&lab.ctl)
        .args(["agent", "show", "cli"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("connect process") && l.contains("no BPF on this host")),
        "{text}"
    );

    let (_, srv_ip, _) = lab.host("srv");
    let srv_ip = srv_ip.to_string();
    wait_nginx(&lab, &srv_ip);
    let summary = client_loop(&lab, &srv_ip, &ports, 240);
    eprintln!("bpf off: {summary}");
    let edges = settled_edges(&lab, &ports);
    assert_eq!(
        edges.len(),
        ports.len(),
        "one edge per connection: {edges:?}"
    );
    // Without BPF a curl that lived a few milliseconds cannot be named (the SYN-ACK capture saw
    // its connection, /proc never saw its socket): the edge says why. Should a table read have
    // caught one live, that edge is named and needs no note.
    let noted = edges
        .values()
        .filter(|(client, note, _)| {
            assert!(
                !client.is_empty() || note == "process unknown: no BPF on this host",
                "an unnamed edge says why: {edges:?}"
            );
            client.is_empty()
        })
        .count();
    assert!(noted > 0, "curl was never named without BPF: {edges:?}");
    assert!(edges.values().all(|(_, _, server)| server == "nginx"));
    let out = lab
        .hub
        .command(bin("tapgraphctl"))
        .arg("--config")
        .arg(&lab.ctl)
        .args(["graph", "--include-inactive", "--host", "cli"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("- (process unknown: no BPF on this host)"),
        "{text}"
    );
}

#[test]
fn where_the_kernel_refuses_bpf_the_agent_keeps_the_syn_ack_capture_and_says_why() {
    let test = "where_the_kernel_refuses_bpf_the_agent_keeps_the_syn_ack_capture_and_says_why";
    if !require_root(test) {
        return;
    }
    let ports = 23_000..23_005;
    let mut lab = lab(std::slice::from_ref(&ports));
    agent(&mut lab, "srv", &[]);
    agent_without(&mut lab, "cli", &[], &["bpf", "perfmon", "sys_admin"]);
    wait_connected(&lab, &["srv", "cli"]);
    let shown = lab.ctl(&["agent", "show", "cli"]);
    assert_eq!(shown["connect_process"]["bpf"], false, "{shown}");
    let reason = shown["connect_process"]["off_reason"]
        .as_str()
        .unwrap_or("");
    assert!(
        reason.contains("Operation not permitted") && reason.contains("CAP_BPF"),
        "the kernel's refusal, and what would allow it: {shown}"
    );
    let (_, srv_ip, _) = lab.host("srv");
    let srv_ip = srv_ip.to_string();
    wait_nginx(&lab, &srv_ip);
    let summary = client_loop(&lab, &srv_ip, &ports, 240);
    eprintln!("bpf refused: {summary}");
    // The SYN-ACK capture still puts every short-lived connection on the map.
    let edges = settled_edges(&lab, &ports);
    assert_eq!(
        edges.len(),
        ports.len(),
        "one edge per connection: {edges:?}"
    );
    let noted = edges
        .values()
        .filter(|(client, note, _)| {
            client.is_empty() && note == "process unknown: no BPF on this host"
        })
        .count();
    assert!(noted > 0, "{edges:?}");
    assert!(edges.values().all(|(_, _, server)| server == "nginx"));
}
