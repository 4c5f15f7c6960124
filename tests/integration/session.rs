//! Issue 2: the agent↔controller mTLS session, its refusals, restarts and configuration errors.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tapgraph::identity::Identity;
use tapgraph::proto::{self, agent_message::Msg, agent_service_client::AgentServiceClient};
use tapgraph::transport::{self, ChannelOptions};

use crate::harness::{
    Controller, Netns, Proc, World, bin, http_get, refused_config, require_root, veth, wait_for,
};

const FAST: &[(&str, &str)] = &[("TAPGRAPH_POLICY__HEARTBEAT_INTERVAL", "200ms")];

#[test]
fn agent_connects_gets_its_policy_and_sends_heartbeats() {
    let world = World::new();
    let controller = Controller::start(&world, FAST);
    world.issue_agent("a1");
    let _agent = Proc::spawn(
        "agent",
        world.agent_cmd("a1", controller.grpc),
        world.path(),
    );
    let agent = controller.wait_agent("a1", "connected", Duration::from_secs(20), |a| {
        a["control_records"].as_u64() >= Some(2)
    });
    assert_eq!(agent["policy_version_sent"], 1);
    assert_eq!(agent["policy_version_applied"], 1);
    assert!(agent["policy_error"].is_null(), "{agent}");
    let hostname = nix::unistd::gethostname().unwrap().into_string().unwrap();
    assert_eq!(agent["hostname"], hostname);
    assert!(
        agent["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i.as_str().unwrap().starts_with("lo 127.0.0.1/8")),
        "{agent}"
    );
    assert!(controller.proc.log_text().contains("agent connected"));
}

#[test]
fn agent_reconnects_after_the_controller_is_killed_and_restarted() {
    let world = World::new();
    let mut controller = Controller::start(&world, FAST);
    world.issue_agent("a1");
    let (grpc, http) = (controller.grpc, controller.http);
    let _agent = Proc::spawn("agent", world.agent_cmd("a1", grpc), world.path());
    controller.wait_agent("a1", "connected", Duration::from_secs(20), |_| true);

    controller.proc.kill_hard();
    // Let the agent notice and start backing off before the controller returns.
    std::thread::sleep(Duration::from_secs(1));
    let restarted_at = Instant::now();
    let controller = Controller::start_at(&world, grpc, http, FAST);
    controller.wait_agent("a1", "connected", Duration::from_secs(10), |a| {
        a["policy_version_applied"] == 1
    });
    eprintln!(
        "agent reconnected {:?} after the controller restarted",
        restarted_at.elapsed()
    );
}

/// Opens `AgentService.Connect` as `identity` (certificate, key) trusting `ca`, sending `first`,
/// and says what happened: `stream accepted…`, `connect: …` or `Code: message`.
async fn open_stream(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    first: Msg,
) -> String {
    match try_stream(addr, ca, identity, first).await {
        Ok(first) => format!("stream accepted; first message {first:?}"),
        Err(e) => e,
    }
}

async fn try_stream(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    first: Msg,
) -> Result<Option<proto::ControllerMessage>, String> {
    let tls = tapgraph::tls::client_config_files(ca, identity).map_err(|e| e.to_string())?;
    let options = ChannelOptions {
        connect_timeout: Duration::from_secs(5),
        ..ChannelOptions::default()
    };
    let channel = transport::connect(&addr.to_string(), "127.0.0.1", tls, &options)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(proto::AgentMessage { msg: Some(first) })
        .await
        .unwrap();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.connect(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| "no answer".to_string())?;
    match response {
        // Accepted: the first pushed message proves the stream is live.
        Ok(mut stream) => stream
            .get_mut()
            .message()
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
        Err(status) => Err(format!("{:?}: {}", status.code(), status.message())),
    }
}

fn hello() -> Msg {
    Msg::Hello(proto::Hello {
        hostname: "intruder".into(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_certificate_are_refused() {
    let world = World::new();
    let controller = Controller::start(&world, FAST);
    let ca = world.ca_pem();

    // Without a certificate the connection is allowed (agents enroll on this port), but no agent
    // stream opens.
    let none = open_stream(controller.grpc, &ca, None, hello()).await;
    assert_eq!(
        none,
        "Unauthenticated: a client certificate is required (enroll first)"
    );

    // A certificate from another CA fails the TLS handshake.
    let other = tempfile::tempdir().unwrap();
    let foreign =
        tapgraph::pki::CertAuthority::generate("someone else's CA", Duration::from_secs(3600))
            .unwrap()
            .issue(
                &Identity::agent("a1").unwrap(),
                &[],
                Duration::from_secs(3600),
            )
            .unwrap();
    tapgraph::pki::write_pair(other.path(), "a1", &foreign).unwrap();
    let refused = open_stream(
        controller.grpc,
        &ca,
        Some((&other.path().join("a1.pem"), &other.path().join("a1.key"))),
        hello(),
    )
    .await;
    assert!(!refused.starts_with("stream accepted"), "{refused}");
    let log = wait_for(
        "a refused handshake in the log",
        Duration::from_secs(5),
        || {
            let log = controller.proc.log_text();
            log.contains("TLS handshake refused").then_some(log)
        },
    );
    assert!(
        log.contains("invalid peer certificate: UnknownIssuer"),
        "{log}"
    );
    assert!(controller.agents().is_empty(), "nobody may register");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_does_not_open_with_hello_is_refused() {
    let world = World::new();
    let controller = Controller::start(&world, FAST);
    let dir = world.issue_agent("a1");
    let (cert, key) = (dir.join("agent.pem"), dir.join("agent.key"));
    let record = Msg::Control(proto::ControlRecord {
        sequence: 1,
        ..Default::default()
    });
    let refused = open_stream(
        controller.grpc,
        &world.ca_pem(),
        Some((&cert, &key)),
        record,
    )
    .await;
    assert_eq!(
        refused,
        "InvalidArgument: the first message on Connect must be Hello, got ControlRecord"
    );

    // Identity is the certificate: a Hello claiming another id is refused.
    let claim = Msg::Hello(proto::Hello {
        hostname: "h".into(),
        agent_id: "a2".into(),
        ..Default::default()
    });
    let refused = open_stream(controller.grpc, &world.ca_pem(), Some((&cert, &key)), claim).await;
    assert_eq!(
        refused,
        "PermissionDenied: Hello claims agent id a2, but the certificate is agent a1"
    );
    assert!(controller.agents().is_empty());

    // An operator certificate is valid, but may not pose as an agent.
    let op = world
        .ca()
        .issue(
            &Identity::operator("admin").unwrap(),
            &[],
            Duration::from_secs(600),
        )
        .unwrap();
    tapgraph::pki::write_pair(world.path(), "op", &op).unwrap();
    let refused = open_stream(
        controller.grpc,
        &world.ca_pem(),
        Some((&world.path().join("op.pem"), &world.path().join("op.key"))),
        hello(),
    )
    .await;
    assert!(
        refused.starts_with("PermissionDenied: operator admin may not open agent streams"),
        "{refused}"
    );
}

#[test]
fn bad_configuration_exits_78_and_names_every_bad_key() {
    let world = World::new();
    let file = world.path().join("controller.toml");
    std::fs::write(
        &file,
        "listen = 'nowhere'\nlisten_typo = 1\n[pki]\nserver_names = 'ok.example,bad name!'\n[topology]\ncidr_labels = '10.0.0.0/33 a=b'\n[policy]\nlimit = 'fast'\nfilter = 'tcp port banana'\nheartbeat_interval = '5'\n",
    )
    .unwrap();
    let mut cmd = Command::new(bin("tapgraph-controller"));
    cmd.arg("--config")
        .arg(&file)
        .arg("--log-format")
        .arg("yaml");
    let stderr = refused_config(&mut cmd);
    for key in [
        "listen:",
        "listen_typo:",
        "policy.limit:",
        "policy.filter:",
        "policy.heartbeat_interval:",
        "log.format:",
        "pki.server_names:",
        "topology.cidr_labels:",
    ] {
        assert!(stderr.contains(key), "{key} not named in:\n{stderr}");
    }
    // libpcap's own words for the filter, and the reason for the interval.
    assert!(stderr.contains("banana"), "{stderr}");
    assert!(stderr.contains("`5` has no unit"), "{stderr}");
    // Flags override the file: with a good --listen, that key is no longer named.
    let mut cmd = Command::new(bin("tapgraph-controller"));
    cmd.arg("--config")
        .arg(&file)
        .arg("--listen")
        .arg("127.0.0.1:9");
    let stderr = String::from_utf8_lossy(&cmd.output().unwrap().stderr).to_string();
    assert!(!stderr.contains("\n  listen:"), "{stderr}");

    // The agent refuses a bad configuration the same way, with its keys.
    let mut agent = world.agent_cmd("missing", "127.0.0.1:1".parse().unwrap());
    agent.env("TAPGRAPH_BACKOFF__JITTER", "2");
    let stderr = refused_config(&mut agent);
    assert!(
        stderr.contains("tls.cert:") && stderr.contains("no certificate yet"),
        "{stderr}"
    );
    assert!(
        stderr.contains("backoff:") && stderr.contains("jitter 2"),
        "{stderr}"
    );
}

#[test]
fn sigterm_shuts_both_daemons_down_cleanly() {
    let world = World::new();
    let mut controller = Controller::start(&world, FAST);
    world.issue_agent("a1");
    let mut agent = Proc::spawn(
        "agent",
        world.agent_cmd("a1", controller.grpc),
        world.path(),
    );
    controller.wait_agent("a1", "connected", Duration::from_secs(20), |_| true);

    controller.proc.signal(Signal::SIGTERM);
    let status = controller
        .proc
        .wait_exit(Duration::from_secs(15))
        .expect("controller exits within its shutdown deadline");
    assert!(status.success(), "controller exit: {status:?}");
    let log = controller.proc.log_text();
    // The main task logs `shutting down signal="SIGTERM"`; a session's own log line may or may not
    // say "controller shutting down", depending on whether the agent hung up first.
    assert!(log.contains("shutting down signal=\"SIGTERM\""), "{log}");
    assert!(log.contains("controller stopped"), "{log}");
    assert!(!log.contains("aborted tasks"), "{log}");

    // The agent sees the controller leave, keeps running, and stops on its own SIGTERM.
    wait_for("agent to notice", Duration::from_secs(10), || {
        agent
            .log_text()
            .contains("no session with the controller")
            .then_some(())
    });
    agent.signal(Signal::SIGTERM);
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent exits");
    assert!(status.success(), "agent exit: {status:?}");
}

#[test]
fn agent_in_its_own_network_namespace_reaches_the_controller_across_a_veth_link() {
    if !require_root("agent_in_its_own_network_namespace_reaches_the_controller_across_a_veth_link")
    {
        return;
    }
    let world = World::new();
    let hub = Netns::new("hub");
    let edge = Netns::new("edge");
    veth(
        &hub,
        "hub0",
        "198.18.0.1/30",
        &edge,
        "edge0",
        "198.18.0.2/30",
    );
    let grpc: SocketAddr = "198.18.0.1:7443".parse().unwrap();
    let http: SocketAddr = "127.0.0.1:7080".parse().unwrap();
    let mut cmd = hub.wrap(world.controller_cmd(grpc, http));
    cmd.envs(FAST.iter().copied());
    let _controller = Proc::spawn("controller", cmd, world.path());
    wait_for(
        "controller /readyz in its namespace",
        Duration::from_secs(20),
        || hub.run(|| matches!(http_get(http, "/readyz"), Ok((200, _))).then_some(())),
    );
    world.issue_agent("edge");
    let _agent = Proc::spawn(
        "agent",
        edge.wrap(world.agent_cmd("edge", grpc)),
        world.path(),
    );
    let agent: serde_json::Value =
        wait_for("agent edge connected", Duration::from_secs(20), || {
            let (_, body) = hub.run(|| http_get(http, "/api/v1/agents")).ok()?;
            let agents: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
            agents
                .into_iter()
                .find(|a| a["id"] == "edge" && a["state"] == "connected")
        });
    assert!(
        agent["remote_addr"]
            .as_str()
            .unwrap()
            .starts_with("198.18.0.2:"),
        "{agent}"
    );
    assert!(
        agent["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i.as_str().unwrap().starts_with("edge0 198.18.0.2/30")),
        "the agent reports its namespace's interfaces: {agent}"
    );
}
