//! What operators' tools show and read: text an agent sent is escaped where people read it and kept
//! verbatim in JSON; a map of any size is readable with tapgraphctl; a generic gRPC client finds
//! the services and their health by reflection alone.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tapgraph::proto::{self, agent_message::Msg};
use tapgraph::transport;

use crate::harness::{Controller, World, ctl, ctl_json};
use crate::topology::raw_agent_as;

/// A hostname that, printed raw, clears the screen, turns the text red, starts a forged table row
/// (or log line) and carries a NUL.
const HOSTILE: &str = "evil\x1b[2J\x1b[31m\nFORGED  connected  -\0x";
/// The same trick in a Hello, with a bidi override and a C1 control.
const HOSTILE_HELLO: &str = "web\r\n2026-01-01T00:00:00Z  INFO forged\u{202e}\u{9b}2J";

/// True for a byte or character a terminal or a log reader would act on: anything [`is_unsafe`]
/// but the newline that ends each line.
///
/// [`is_unsafe`]: tapgraph::text::is_unsafe
fn raw_control(text: &str) -> Option<char> {
    text.chars()
        .find(|c| *c != '\n' && tapgraph::text::is_unsafe(*c))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_hostnames_are_escaped_for_people_and_kept_verbatim_in_json() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let ctl_config = world.operator("admin", controller.grpc);

    // One agent enrolls with the hostile hostname; another claims one in its Hello.
    let token = ctl_json(&ctl_config, &["token", "create", "--uses", "1"]);
    let (_key, csr_pem) = tapgraph::pki::new_key_and_csr("evil").unwrap();
    let tls =
        tapgraph::tls::pinned_client_config(token["ca_fingerprint"].as_str().unwrap()).unwrap();
    let channel = transport::connect(
        &controller.grpc.to_string(),
        "127.0.0.1",
        tls,
        &Default::default(),
    )
    .await
    .unwrap();
    let enrolled = proto::enrollment_service_client::EnrollmentServiceClient::new(channel)
        .enroll(proto::EnrollRequest {
            token: token["token"].as_str().unwrap().into(),
            csr_pem,
            hostname: HOSTILE.into(),
            ..Default::default()
        })
        .await
        .expect("the controller accepts the hostname (it is data)")
        .into_inner();
    let (_send, _inbound) = raw_agent_as(&world, &controller, "web", HOSTILE_HELLO).await;
    controller.wait_agent("web", "connected", Duration::from_secs(20), |_| true);

    // -o json: the values exactly as sent.
    let agents = ctl_json(&ctl_config, &["agent", "list"]);
    let hostname_of = |id: &str| {
        agents
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == id)
            .unwrap_or_else(|| panic!("agent {id} in {agents:#}"))["hostname"]
            .clone()
    };
    assert_eq!(hostname_of(&enrolled.agent_id), HOSTILE);
    assert_eq!(hostname_of("web"), HOSTILE_HELLO);

    // The table: one line per agent under the header, nothing a terminal acts on, the hostnames
    // readable as escapes.
    let (code, table, err) = ctl(&ctl_config, &["agent", "list"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        raw_control(&table),
        None,
        "agent list prints a raw control character: {table:?}"
    );
    assert_eq!(table.lines().count(), 1 + 2, "{table}");
    assert!(
        table.contains("evil\\x1b[2J\\x1b[31m\\nFORGED  connected  -\\0x"),
        "{table}"
    );
    assert!(
        table.contains("web\\r\\n2026-01-01T00:00:00Z  INFO forged\\u{202e}\\u{9b}2J"),
        "{table}"
    );
    for args in [
        &["agent", "show", &enrolled.agent_id][..],
        &["agent", "show", "web"],
        &["mirror"],
    ] {
        let (code, out, err) = ctl(&ctl_config, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert_eq!(raw_control(&out), None, "{args:?} prints {out:?}");
    }

    // The controller's text log: the hostnames it logged (enrollment, session), escaped; no line
    // was forged.
    let log = controller.proc.log_text();
    assert!(log.contains("hostname=evil\\x1b[2J"), "{log}");
    assert!(log.contains("web\\r\\n2026-01-01T00:00:00Z"), "{log}");
    assert_eq!(
        raw_control(&log),
        None,
        "the log holds a raw control character"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("FORGED") || l.starts_with("2026-01-01T00:00:00Z")),
        "a forged log line: {log}"
    );
}

/// An mTLS AdminService client as operator `name`, with a certificate straight from the CA.
async fn admin_client(
    world: &World,
    controller: &Controller,
) -> proto::admin_service_client::AdminServiceClient<tonic::transport::Channel> {
    let ca = world.ca();
    let cert = ca
        .issue(
            &tapgraph::identity::Identity::operator("probe").unwrap(),
            &[],
            Duration::from_secs(3600),
        )
        .unwrap();
    let tls = tapgraph::tls::client_config(
        tapgraph::tls::roots_from_pem(ca.cert_pem().as_bytes()).unwrap(),
        Some((
            tapgraph::tls::parse_certs(cert.cert_pem.as_bytes()).unwrap(),
            tapgraph::tls::parse_key(cert.key_pem.as_bytes()).unwrap(),
        )),
    )
    .unwrap();
    let channel = transport::connect(
        &controller.grpc.to_string(),
        "127.0.0.1",
        tls,
        &Default::default(),
    )
    .await
    .unwrap();
    proto::admin_service_client::AdminServiceClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_larger_than_4_mib_is_read_whole_by_tapgraphctl() {
    const ROWS: u32 = 60_000;
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let ctl_config = world.operator("admin", controller.grpc);
    let (send, _inbound) = raw_agent_as(&world, &controller, "big", "big").await;
    let entries = (0..ROWS)
        .map(|i| proto::ConnectionEntry {
            direction: proto::Direction::Client as i32,
            local_ip: "10.9.0.1".into(),
            remote_ip: format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256),
            server_port: 443,
            protocol: proto::Protocol::Tcp as i32,
            sockets: 1,
            process: Some(proto::ProcessInfo {
                name: "client".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    send(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 1,
        full: true,
        addresses: vec!["10.9.0.1".into()],
        entries,
        ..Default::default()
    }))
    .await;

    // The map, once applied, is past tonic's default 4 MiB limit in one message: a client that
    // keeps the default (tapgraphctl did) cannot read it with GetGraph.
    let mut admin = admin_client(&world, &controller).await;
    let mut unbounded = admin.clone().max_decoding_message_size(usize::MAX);
    let waiting = Instant::now();
    let whole = loop {
        if let Ok(graph) = unbounded.get_graph(proto::GetGraphRequest::default()).await
            && graph.get_ref().edges.len() >= ROWS as usize
        {
            break graph.into_inner();
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "timed out waiting for the snapshot on the map"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let size = prost::Message::encoded_len(&whole);
    assert!(size > 4 << 20, "the map is only {size} bytes");
    let refused = admin
        .get_graph(proto::GetGraphRequest::default())
        .await
        .expect_err("past the default limit");
    assert!(
        refused.message().contains("the limit is: 4194304"),
        "{refused:?}"
    );

    // tapgraphctl reads it whole, every edge.
    let edges = ctl_json(&ctl_config, &["graph"]);
    let edges = edges.as_array().unwrap();
    assert_eq!(edges.len(), ROWS as usize);
    let targets: std::collections::BTreeSet<&str> =
        edges.iter().filter_map(|e| e["to"].as_str()).collect();
    assert_eq!(targets.len(), ROWS as usize, "every remote once");
    let (code, table, err) = ctl(&ctl_config, &["graph", "--port", "443"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(table.lines().count(), 1 + ROWS as usize);
}

fn probe_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/grpc_probe.py")
}

/// Runs grpcio's Python clients (`grpc_probe.py`) against the controller.
fn grpc_probe(controller: &Controller, ca_pem: &Path, services: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(probe_script())
        .arg(controller.grpc.to_string())
        .arg(ca_pem)
        .args(services)
        .output()
        .expect("python3 (scripts/install-deps installs it with grpcio)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "grpc_probe.py failed (grpcio, grpcio-reflection and grpcio-health-checking come from scripts/install-deps): {stderr}"
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

#[test]
fn a_generic_grpc_client_finds_every_service_and_its_health_by_reflection() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let services = [
        "tapgraph.v1.AgentService",
        "tapgraph.v1.EnrollmentService",
        "tapgraph.v1.AdminService",
    ];
    let seen = grpc_probe(&controller, &world.ca_pem(), &services);

    // Both reflection versions list the same services, health among them.
    let listed = |version: &str| -> Vec<String> {
        serde_json::from_value(seen[version].clone()).unwrap_or_else(|e| panic!("{e}: {seen}"))
    };
    let v1alpha = listed("v1alpha_services");
    assert_eq!(v1alpha, listed("v1_services"), "{seen}");
    for name in services.iter().chain(&[
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]) {
        assert!(
            v1alpha.iter().any(|s| s == name),
            "{name} not listed: {seen}"
        );
    }
    // Their methods come from the reflected descriptors: no local .proto needed.
    assert_eq!(
        seen["methods"]["grpc.health.v1.Health"],
        serde_json::json!(["Check", "Watch"])
    );
    let admin = &seen["methods"]["tapgraph.v1.AdminService"];
    assert!(
        admin.as_array().unwrap().iter().any(|m| m == "StreamGraph"),
        "{seen}"
    );

    // Health answers for the server and for every service.
    for name in std::iter::once("").chain(services) {
        assert_eq!(seen["health"][name], "SERVING", "{name}: {seen}");
    }

    // ... and says NOT_SERVING once the controller begins to shut down.
    let mut watcher = Command::new("python3")
        .arg(probe_script())
        .arg(controller.grpc.to_string())
        .arg(world.ca_pem())
        .args(["--watch", "tapgraph.v1.AdminService"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(watcher.stdout.take().unwrap()).lines();
    let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(next(), "SERVING");
    controller.proc.signal(Signal::SIGTERM);
    let last = next();
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(last, "NOT_SERVING");
}
