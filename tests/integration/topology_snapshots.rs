//! Issue 5: the map from agents the test plays itself, speaking gRPC directly: label rules set by
//! operators, and snapshots refused or skipped without losing the map. The raw agents here are
//! used by many other test files.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{World, http_get, wait_for};

fn row(
    direction: tapgraph::proto::Direction,
    remote: &str,
    port: u32,
) -> tapgraph::proto::ConnectionEntry {
    tapgraph::proto::ConnectionEntry {
        direction: direction as i32,
        local_ip: "10.9.0.1".into(),
        remote_ip: remote.into(),
        server_port: port,
        protocol: tapgraph::proto::Protocol::Tcp as i32,
        sockets: 1,
        process: Some(tapgraph::proto::ProcessInfo {
            name: "app".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub(crate) type Sender = Box<
    dyn Fn(tapgraph::proto::agent_message::Msg) -> futures::future::BoxFuture<'static, ()>
        + Send
        + Sync,
>;

/// An agent `raw` speaking gRPC directly, its session open (Hello sent): a sender of messages and
/// the controller's side of the stream.
async fn raw_agent(
    world: &World,
    controller: &crate::harness::Controller,
) -> (Sender, tonic::Streaming<tapgraph::proto::ControllerMessage>) {
    raw_agent_as(world, controller, "raw", "raw").await
}

/// An mTLS channel to the controller as agent `id`, with a freshly issued certificate.
pub(crate) async fn raw_channel(
    world: &World,
    controller: &crate::harness::Controller,
    id: &str,
) -> tonic::transport::Channel {
    let dir = world.issue_agent(id);
    let tls = tapgraph::tls::client_config_files(
        &dir.join("ca.pem"),
        Some((&dir.join("agent.pem"), &dir.join("agent.key"))),
    )
    .unwrap();
    tapgraph::transport::connect(
        &controller.grpc.to_string(),
        "127.0.0.1",
        tls,
        &Default::default(),
    )
    .await
    .unwrap()
}

/// [`raw_agent`] with a given agent id and the hostname its Hello claims.
pub(crate) async fn raw_agent_as(
    world: &World,
    controller: &crate::harness::Controller,
    id: &str,
    hostname: &str,
) -> (Sender, tonic::Streaming<tapgraph::proto::ControllerMessage>) {
    use tapgraph::proto::{self, agent_message::Msg};
    let channel = raw_channel(world, controller, id).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let send: Sender = Box::new(move |msg: Msg| {
        let tx = tx.clone();
        Box::pin(async move {
            tx.send(proto::AgentMessage { msg: Some(msg) })
                .await
                .unwrap()
        })
    });
    send(Msg::Hello(proto::Hello {
        hostname: hostname.into(),
        ..Default::default()
    }))
    .await;
    let inbound = proto::agent_service_client::AgentServiceClient::new(channel)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (send, inbound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_set_label_rules_that_name_external_endpoints() {
    use tapgraph::proto::{self, agent_message::Msg};
    let world = World::new();
    let controller = crate::harness::Controller::start(&world, &[]);
    let (send, _inbound) = raw_agent(&world, &controller).await;
    send(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 1,
        full: true,
        addresses: vec!["10.9.0.1".into()],
        entries: vec![row(proto::Direction::Client, "203.0.113.9", 443)],
        ..Default::default()
    }))
    .await;
    let ctl = world.operator("admin", controller.grpc);
    let ctl_run = |args: &[&str]| crate::harness::ctl(&ctl, args);
    wait_for("the snapshot on the map", Duration::from_secs(10), || {
        (crate::harness::ctl_json(&ctl, &["graph"]).as_array()?.len() == 1).then_some(())
    });
    let (code, out, err) = ctl_run(&[
        "graph",
        "rules",
        "set",
        "--cidr",
        "203.0.113.0/24 owner=saas",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cidr      203.0.113.0/24 owner=saas"), "{out}");
    let saas = crate::harness::ctl_json(&ctl, &["graph", "--label", "owner=saas"]);
    assert_eq!(saas.as_array().unwrap().len(), 1, "{saas}");

    // A bad rule is refused with the reason, and the rules in force stay.
    let (code, _, err) = ctl_run(&["graph", "rules", "set", "--cidr", "203.0.113.0/33 owner=x"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("InvalidArgument: cidr_labels: rule `203.0.113.0/33 owner=x`"),
        "{err}"
    );
    let rules = crate::harness::ctl_json(&ctl, &["graph", "rules"]);
    assert_eq!(rules["cidr"], "203.0.113.0/24 owner=saas");

    // They survive a controller restart.
    drop(_inbound);
    let (controller, _) = controller.restart(&world, &[]);
    let rules = crate::harness::ctl_json(&ctl, &["graph", "rules"]);
    assert_eq!(rules["cidr"], "203.0.113.0/24 owner=saas");
    let saas = crate::harness::ctl_json(
        &ctl,
        &["graph", "--label", "owner=saas", "--include-inactive"],
    );
    assert_eq!(saas.as_array().unwrap().len(), 1, "{saas}");
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshots_are_refused_or_skipped_and_the_map_is_kept() {
    use tapgraph::proto::{self, agent_message::Msg, controller_message};
    let world = World::new();
    let controller =
        crate::harness::Controller::start(&world, &[("TAPGRAPH_TOPOLOGY__MAX_ENTRIES", "10")]);
    let (send, mut inbound) = raw_agent(&world, &controller).await;
    let mut next_resync = async || loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .expect("an answer")
            .unwrap()
            .unwrap();
        if let Some(controller_message::Msg::Resync(r)) = msg.msg {
            return r.reason;
        }
    };
    let stats = || -> Value {
        let (_, body) = http_get(controller.http, "/api/v1/topology/stats").unwrap();
        serde_json::from_str(&body).unwrap()
    };

    // A delta before any full snapshot: a sequence gap.
    send(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 6,
        base_sequence: 5,
        entries: vec![row(proto::Direction::Client, "203.0.113.9", 443)],
        ..Default::default()
    }))
    .await;
    let reason = next_resync().await;
    assert!(reason.contains("delta based on snapshot 5"), "{reason}");

    // A full snapshot with one good row and rows that make no sense: the good one is applied.
    let mut bad_ip = row(proto::Direction::Client, "not-an-ip", 443);
    bad_ip.local_ip = "10.9.0.1".into();
    let no_direction = row(proto::Direction::Unspecified, "203.0.113.8", 443);
    let port_zero = row(proto::Direction::Client, "203.0.113.7", 0);
    send(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 1,
        full: true,
        addresses: vec!["10.9.0.1".into()],
        entries: vec![
            row(proto::Direction::Client, "203.0.113.9", 443),
            bad_ip,
            no_direction,
            port_zero,
        ],
        ..Default::default()
    }))
    .await;
    let s = wait_for("the full snapshot applied", Duration::from_secs(10), || {
        let s = stats();
        (s["snapshots_applied"] == 1).then_some(s)
    });
    assert_eq!(s["rows_skipped"], 3, "{s}");
    assert_eq!(s["snapshots_refused_gap"], 1, "{s}");

    // An absurd size is refused, and the map keeps what it had.
    send(Msg::Snapshot(proto::ConnectionSnapshot {
        sequence: 2,
        base_sequence: 1,
        entries: (1..=11)
            .map(|p| row(proto::Direction::Client, "203.0.113.10", p))
            .collect(),
        ..Default::default()
    }))
    .await;
    let reason = next_resync().await;
    assert!(reason.contains("11 rows; at most 10"), "{reason}");
    assert_eq!(stats()["snapshots_refused_size"], 1);
    let ctl = world.operator("admin", controller.grpc);
    let edges = crate::harness::ctl_json(&ctl, &["graph"]);
    let edges: Vec<String> = edges
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
    assert_eq!(edges, ["host:raw -> addr:203.0.113.9"]);
}
