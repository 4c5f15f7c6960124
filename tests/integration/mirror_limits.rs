//! Issue 19, items 7 and 10: a Mirror stream cannot wreck its counters with a crafted header, and
//! Mirror streams beyond the limit are refused at once instead of queued until the client gives up.
//! Both speak gRPC as an agent would, with a real agent certificate, to a real controller.

use std::time::Duration;

use serde_json::Value;
use tapgraph::proto::{self, agent_service_client::AgentServiceClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::{Controller, World, http_get, wait_for};

/// A hang guard only: a refusal comes back in milliseconds; the old controller never answered.
const HANG: Duration = Duration::from_secs(60);

/// A batch of one packet captured 1 ms before it was sent now, by an agent that has sent one
/// packet per batch since its first.
fn batch(sequence: u64) -> proto::MirrorBatch {
    let now = tapgraph::time::unix_nanos();
    proto::MirrorBatch {
        sequence,
        sent_at_unix_nanos: now,
        counters: Some(proto::Counters {
            packets_sent: sequence,
            ..Default::default()
        }),
        policy_version: 1,
        linktype: 1,
        interface: "eth0".into(),
        snaplen: 65535,
        packets: vec![proto::Packet {
            timestamp_unix_nanos: now - 1_000_000,
            original_length: 60,
            data: vec![0xab; 60].into(),
        }],
    }
}

/// The `/api/v1/mirror` row of `agent` once `ready` holds for it.
fn mirror_row(controller: &Controller, agent: &str, ready: impl Fn(&Value) -> bool) -> Value {
    wait_for("mirror stats", Duration::from_secs(10), || {
        let (_, body) = http_get(controller.http, "/api/v1/mirror").ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        v.as_array()?
            .iter()
            .find(|m| m["agent"] == agent && ready(m))
            .cloned()
    })
}

/// The value of the `/metrics` sample `name` (with its suffix) for `agent`.
fn metric(controller: &Controller, name: &str, agent: &str) -> f64 {
    let (status, body) = http_get(controller.http, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    let label = format!("agent=\"{agent}\"");
    body.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} for {agent} in:\n{body}"))
}

/// The probe: a sequence that jumps to 2^64−1 and back, a replay, a `sent_at` an hour old
/// and an in-band counter claiming 2^64−1 packets sent. None of it reaches `lost_batches`,
/// `lost_in_transit` or the delay histogram; each is counted as an invalid batch by field, and only
/// the batches with an impossible sequence are dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_batch_headers_cannot_wreck_the_mirror_counters() {
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    // A session first, so the controller knows the agent and its policy (target none).
    let (_send, _inbound) =
        crate::topology::raw_agent_as(&world, &controller, "crafted", "crafted").await;
    let channel = crate::topology::raw_channel(&world, &controller, "crafted").await;
    // Sent, and its packet captured, 4,112,874 ms ago: the delay the issue saw.
    let mut stale = batch(5);
    stale.sent_at_unix_nanos -= 4_112_874_000_000;
    stale.packets[0].timestamp_unix_nanos -= 4_112_874_000_000;
    let mut bragging = batch(6);
    bragging.counters = Some(proto::Counters {
        packets_sent: u64::MAX,
        ..Default::default()
    });
    let batches = vec![
        batch(1),
        batch(2),
        batch(u64::MAX),
        batch(3),
        batch(4),
        stale,
        batch(2),
        bragging,
        batch(7),
    ];
    let summary = AgentServiceClient::new(channel)
        .mirror(tokio_stream::iter(batches))
        .await
        .expect("the stream is not refused")
        .into_inner();
    assert_eq!(summary.batches_received, 9);

    // Batches 1 to 7 delivered, one packet each; 2^64−1 and the replayed 2 dropped.
    let row = mirror_row(&controller, "crafted", |m| m["packets_written"] == 7);
    assert_eq!(row["batches"], 9, "{row}");
    assert_eq!(row["batches_lost"], 0, "{row}");
    assert_eq!(row["lost_in_transit"], 0, "{row}");
    assert_eq!(row["packets_received"], 9, "{row}");
    assert_eq!(row["dropped"]["invalid"], 2, "{row}");
    assert_eq!(row["invalid_batches"]["sequence"], 2, "{row}");
    assert_eq!(row["invalid_batches"]["time"], 1, "{row}");
    assert_eq!(row["invalid_batches"]["counters"], 1, "{row}");
    // The delay histogram holds the six packets whose times were believed, none of them an hour.
    assert!(
        row["delay_p99_us"]
            .as_u64()
            .is_some_and(|us| us < 4_000_000_000),
        "{row}"
    );
    let metrics = tokio::task::block_in_place(|| {
        [
            "tapgraph_mirror_lost_batches_total",
            "tapgraph_mirror_lost_packets_total",
            "tapgraph_mirror_delay_seconds_count",
        ]
        .map(|name| metric(&controller, name, "crafted"))
    });
    assert_eq!(metrics, [0.0, 0.0, 6.0]);
    let log = controller.proc.log_text();
    assert!(
        log.contains("batch sequence 18446744073709551615 after 2 skips"),
        "{log}"
    );
}

/// An agent opens more Mirror streams on one connection than `session.max_streams` (16) allows:
/// the extra ones are refused at once with RESOURCE_EXHAUSTED naming the limit and counted in
/// `/metrics`, the first 16 go on, and once they close a new one is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_streams_over_the_limit_are_refused_at_once_naming_it() {
    const LIMIT: usize = 16;
    let world = World::new();
    let controller = Controller::start(&world, &[]);
    let (_send, _inbound) =
        crate::topology::raw_agent_as(&world, &controller, "many", "many").await;
    let channel = crate::topology::raw_channel(&world, &controller, "many").await;

    // Opens a Mirror stream that sends `first` and then whatever goes into the returned sender.
    let open = |first: proto::MirrorBatch| {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(first).unwrap();
        let mut client = AgentServiceClient::new(channel.clone());
        let call = tokio::spawn(async move {
            client
                .mirror(ReceiverStream::new(rx))
                .await
                .map(|r| r.into_inner())
        });
        (tx, call)
    };
    let streams: Vec<_> = (0..LIMIT).map(|_| open(batch(1))).collect();
    // All 16 are open once each one's first batch is counted.
    tokio::task::block_in_place(|| mirror_row(&controller, "many", |m| m["batches"] == LIMIT));

    // The next ones, on the same connection, fail at once and say why.
    let extra: Vec<_> = (0..4).map(|_| open(batch(1))).collect();
    for (_tx, call) in extra {
        let refused = tokio::time::timeout(HANG, call)
            .await
            .expect("a stream over the limit was left waiting instead of refused")
            .unwrap()
            .expect_err("a stream over the limit was accepted");
        assert_eq!(
            refused.code(),
            tonic::Code::ResourceExhausted,
            "{refused:?}"
        );
        assert!(
            refused.message().contains("session.max_streams") && refused.message().contains("16"),
            "{refused:?}"
        );
    }

    // Each refusal is counted.
    let refused = tokio::task::block_in_place(|| {
        let (status, body) = http_get(controller.http, "/metrics").unwrap();
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|l| {
                l.strip_prefix("tapgraph_mirror_streams_refused_total{reason=\"limit\"} ")
            })
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no refused-streams counter in\n{body}"))
    });
    assert_eq!(refused, "4");

    // The first 16 keep working.
    for (tx, _) in &streams {
        tx.send(batch(2)).await.unwrap();
    }
    for (tx, call) in streams {
        drop(tx);
        let summary = tokio::time::timeout(HANG, call)
            .await
            .expect("an accepted stream did not end")
            .unwrap()
            .expect("an accepted stream failed");
        assert_eq!(summary.batches_received, 2);
    }
    // Their slots are free again.
    let (tx, call) = open(batch(1));
    drop(tx);
    let summary = tokio::time::timeout(HANG, call)
        .await
        .expect("a stream after the others closed was left waiting")
        .unwrap()
        .expect("a stream after the others closed was refused");
    assert_eq!(summary.batches_received, 1);
    assert!(
        controller
            .proc
            .log_text()
            .contains("mirror stream refused: too many open")
    );
}
