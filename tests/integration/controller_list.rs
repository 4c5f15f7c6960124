//! Issue 21: the agent's `controller` lists several addresses (the replicas). Each (re)connect and
//! each enrollment tries every address in random order; one that does not answer costs a connect
//! attempt, never a backoff step.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Controller, Proc, World, bin, ctl_json, wait_for};

/// Loopback addresses with nothing listening: bound at once (so they differ), then freed.
fn dead_addresses(n: usize) -> Vec<SocketAddr> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners.iter().map(|l| l.local_addr().unwrap()).collect()
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The agent binary with `controller` as given and a backoff of a minute: an attempt that failed
/// would keep the agent away for longer than any wait below.
fn agent_cmd(world: &World, id: &str, controller: &str) -> Command {
    let mut cmd = Command::new(bin("tapgraph-agent"));
    cmd.arg("--controller")
        .arg(controller)
        .arg("--state-dir")
        .arg(world.agent_dir(id))
        .env("TAPGRAPH_METRICS__LISTEN", "127.0.0.1:0")
        .env("TAPGRAPH_BACKOFF__MIN", "60s")
        .env("TAPGRAPH_BACKOFF__MAX", "60s")
        .env("TAPGRAPH_BACKOFF__JITTER", "0");
    cmd
}

fn connected(ops: &Path, id: &str) -> Option<Value> {
    ctl_json(ops, &["agent", "list"])
        .as_array()?
        .iter()
        .find(|a| a["id"] == id && a["state"] == "connected")
        .cloned()
}

#[test]
fn agents_reach_the_live_controller_past_dead_addresses_without_backing_off() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let ops = world.operator("ops", controller.grpc);
    let dead = dead_addresses(5);
    let live = controller.grpc;
    // Five dead addresses and the live one, in random order per attempt: the live one comes
    // first for one agent in six, so these three almost surely pass dead addresses first.
    let mut agents: Vec<(&str, String)> = ["list-a", "list-b", "list-c"]
        .into_iter()
        .map(|id| (id, list(&[dead.as_slice(), &[live]].concat())))
        .collect();
    agents.push(("live-first", list(&[live, dead[0]])));
    // A name (its own server name, in the controller's certificate) beside a dead IP entry.
    agents.push(("by-name", format!("{},localhost:{}", dead[1], live.port())));
    let mut procs = Vec::new();
    for (id, controllers) in &agents {
        world.issue_agent(id);
        procs.push(Proc::spawn(
            &format!("agent-{id}"),
            agent_cmd(&world, id, controllers),
            world.path(),
        ));
    }
    // Within the wait, shorter than the backoff's first step: no attempt failed.
    for (id, controllers) in &agents {
        wait_for(
            &format!("agent {id} ({controllers}) in `tapgraphctl agent list`"),
            Duration::from_secs(30),
            || connected(&ops, id),
        );
    }
    let mut passed_dead = 0;
    for (proc, (id, _)) in procs.iter().zip(&agents) {
        let log = proc.log_text();
        assert!(
            !log.contains("no session with the controller"),
            "{id}: no attempt may fail while a listed controller is up:\n{log}"
        );
        let line = log
            .lines()
            .find(|l| l.contains("connected to controller"))
            .unwrap_or_else(|| panic!("{id}: no connection logged:\n{log}"));
        assert!(
            line.contains(&format!("controller={live}")),
            "{id}: the log names the address it connected to: {line}"
        );
        if log.contains("some controller addresses did not answer") {
            passed_dead += 1;
        }
    }
    eprintln!(
        "{passed_dead} of {} agents passed dead addresses before the live one",
        agents.len()
    );
}

#[test]
fn enrollment_tries_every_listed_address() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let ops = world.operator("ops", controller.grpc);
    let token = ctl_json(&ops, &["token", "create", "--uses", "4"]);
    let (token, fp) = (
        token["token"].as_str().unwrap(),
        token["ca_fingerprint"].as_str().unwrap(),
    );
    let dead = dead_addresses(3);
    let controllers = list(&[dead.as_slice(), &[controller.grpc]].concat());
    // `tapgraph-agent enroll` makes one attempt: with dead addresses listed, it must still reach
    // the live one, every time.
    for id in ["enroll-a", "enroll-b", "enroll-c"] {
        let out = agent_cmd(&world, id, &controllers)
            .args([
                "enroll",
                "--token",
                token,
                "--ca-fingerprint",
                fp,
                "--name",
                id,
            ])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{id}: {text}");
        assert!(text.contains(&format!("Enrolled as agent {id}")), "{text}");
    }
    // The daemon enrolls by itself through the list, then connects.
    let mut cmd = agent_cmd(&world, "auto", &controllers);
    cmd.env("TAPGRAPH_ENROLL__TOKEN", token)
        .env("TAPGRAPH_ENROLL__CA_FINGERPRINT", fp)
        .env("TAPGRAPH_ENROLL__NAME", "auto");
    let agent = Proc::spawn("agent-auto", cmd, world.path());
    wait_for(
        "the self-enrolled agent in `tapgraphctl agent list`",
        Duration::from_secs(30),
        || connected(&ops, "auto"),
    );
    let log = agent.log_text();
    assert!(!log.contains("enrollment failed; retrying"), "{log}");
    assert!(!log.contains("no session with the controller"), "{log}");
}

#[test]
fn with_no_listed_controller_up_the_agent_names_each_address_and_backs_off() {
    let world = World::new();
    // The CA and an agent certificate exist; the controller is stopped at once.
    let controller = Controller::start(&world, &[]);
    world.issue_agent("alone");
    drop(controller);
    let dead = dead_addresses(2);
    let mut cmd = agent_cmd(&world, "alone", &list(&dead));
    cmd.env("TAPGRAPH_BACKOFF__MIN", "100ms")
        .env("TAPGRAPH_BACKOFF__MAX", "100ms");
    let agent = Proc::spawn("agent-alone", cmd, world.path());
    let line = wait_for("a failed attempt logged", Duration::from_secs(20), || {
        agent
            .log_text()
            .lines()
            .find(|l| l.contains("no session with the controller"))
            .map(String::from)
    });
    assert!(line.contains("no controller answered"), "{line}");
    for addr in &dead {
        assert!(line.contains(&addr.to_string()), "{addr} in {line}");
    }
}

/// Two controllers sharing one operator-supplied CA (as replicas do): each in its own world.
fn two_controllers_one_ca(
    env: &[(&str, &str)],
) -> (World, Vec<(World, Controller, std::path::PathBuf)>) {
    let shared = World::new();
    let ca =
        tapgraph::pki::CertAuthority::generate("replicas CA", Duration::from_secs(3600)).unwrap();
    let (cert, key) = (shared.path().join("ca.pem"), shared.path().join("ca.key"));
    tapgraph::fsutil::write_private(&cert, ca.cert_pem().as_bytes()).unwrap();
    tapgraph::fsutil::write_private(&key, ca.key_pem().as_bytes()).unwrap();
    let mut all_env = vec![
        ("TAPGRAPH_PKI__CA_CERT", cert.to_str().unwrap()),
        ("TAPGRAPH_PKI__CA_KEY", key.to_str().unwrap()),
    ];
    all_env.extend_from_slice(env);
    let mut controllers = Vec::new();
    for name in ["replica-a", "replica-b"] {
        let world = World::new();
        let mut env = all_env.clone();
        env.push(("TAPGRAPH_REPLICA", name));
        let controller = Controller::start(&world, &env);
        let ops = world.path().join("ctl.toml");
        let issued = Command::new(bin("tapgraph-controller"))
            .args(["operator", "issue", "ops", "--state-dir"])
            .arg(world.state_dir())
            .arg("--listen")
            .arg(controller.grpc.to_string())
            .arg("--out")
            .arg(&ops)
            .envs(all_env.iter().copied())
            .output()
            .unwrap();
        assert!(
            issued.status.success(),
            "{}",
            String::from_utf8_lossy(&issued.stderr)
        );
        controllers.push((world, controller, ops));
    }
    let agent = ca
        .issue(
            &tapgraph::identity::Identity::agent("mover").unwrap(),
            &[],
            Duration::from_secs(3600),
        )
        .unwrap();
    let dir = shared.agent_dir("mover");
    tapgraph::fsutil::private_dir(&dir).unwrap();
    tapgraph::fsutil::write_private(&dir.join("agent.pem"), agent.cert_pem.as_bytes()).unwrap();
    tapgraph::fsutil::write_private(&dir.join("agent.key"), agent.key_pem.as_bytes()).unwrap();
    tapgraph::fsutil::write_private(&dir.join("ca.pem"), ca.cert_pem().as_bytes()).unwrap();
    (shared, controllers)
}

/// The map's edges on the controller `ops` reaches, by port: (port, control_plane) for each.
fn edges_by_port(ops: &Path, extra: &[&str]) -> Vec<(u64, bool)> {
    let mut args = vec!["graph"];
    args.extend_from_slice(extra);
    ctl_json(ops, &args)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["port"].as_u64().unwrap(),
                e["control_plane"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_control_plane_marking_follows_the_agent_to_another_controller() {
    let (shared, mut controllers) =
        two_controllers_one_ca(&[("TAPGRAPH_POLICY__SNAPSHOT_INTERVAL", "1s")]);
    let grpc: Vec<SocketAddr> = controllers.iter().map(|(_, c, _)| c.grpc).collect();
    let ports: Vec<u64> = grpc.iter().map(|a| u64::from(a.port())).collect();
    let mut cmd = agent_cmd(&shared, "mover", &list(&grpc));
    cmd.env("TAPGRAPH_BACKOFF__MIN", "100ms")
        .env("TAPGRAPH_BACKOFF__MAX", "100ms");
    let _agent = Proc::spawn("agent-mover", cmd, shared.path());
    let first = wait_for(
        "the agent on either controller",
        Duration::from_secs(20),
        || (0..2).find(|&i| connected(&controllers[i].2, "mover").is_some()),
    );
    let held = ports[first];
    // Its session is control plane: hidden from the map unless asked for.
    wait_for(
        "the agent's session as a control-plane edge",
        Duration::from_secs(20),
        || {
            edges_by_port(&controllers[first].2, &["--include-control"])
                .contains(&(held, true))
                .then_some(())
        },
    );
    // The controller it holds dies: it moves to the other.
    drop(controllers.remove(first));
    let ops = &controllers[0].2;
    let now = ports[1 - first];
    wait_for(
        "the agent on the other controller",
        Duration::from_secs(20),
        || connected(ops, "mover"),
    );
    let edges = wait_for(
        "the new session as a control-plane edge",
        Duration::from_secs(20),
        || {
            let edges = edges_by_port(ops, &["--include-control"]);
            edges.contains(&(now, true)).then_some(edges)
        },
    );
    // Rows towards either controller (a socket left towards the dead one too) are the control
    // plane's, and the default map shows none of them.
    for (port, control_plane) in &edges {
        if ports.contains(port) {
            assert!(control_plane, "port {port} in {edges:?}");
        }
    }
    let shown = edges_by_port(ops, &[]);
    assert!(
        shown.iter().all(|(port, _)| !ports.contains(port)),
        "{shown:?}"
    );
}
