//! The mirror stream: the session task that takes batches out of the queue and sends them on
//! the `Mirror` RPC, numbering each one only once it is certain to go out. In direct mode a
//! batch goes to its capture's tunnel targets instead ([`super::direct`]), written on a blocking
//! thread; the `Mirror` stream is then never opened.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tapgraph::proto;
use tokio::sync::mpsc;

use prost::Message;

use super::queue::{Batch, QueueRx};
use super::wire;

/// Streams queued batches on the `Mirror` RPC until `stop`; returns the queue for the next
/// session. The RPC opens with the first batch, so an agent that does not capture never opens it.
/// Batches that find the stream gone are dropped and counted.
pub async fn forward(
    mut queue: QueueRx,
    channel: tonic::transport::Channel,
    policy_version: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
) -> QueueRx {
    let mut stream: Option<mpsc::Sender<wire::Outbound>> = None;
    loop {
        let batch = tokio::select! {
            () = stop.cancelled() => break,
            b = queue.recv() => match b {
                Some(b) => b,
                None => break,
            },
        };
        if let Some(direct) = batch.direct.clone() {
            send_direct(&queue, direct, batch).await;
            continue;
        }
        let tx = stream.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(4);
            let channel = channel.clone();
            tokio::spawn(async move {
                match wire::mirror(channel, tokio_stream::wrappers::ReceiverStream::new(rx)).await {
                    Ok(summary) => tracing::debug!(summary = ?summary.into_inner(), "mirror stream ended"),
                    Err(status) => tracing::warn!(code = ?status.code(), error = %status.message(), "mirror stream failed"),
                }
            });
            tx
        });
        let tx = tx.clone();
        let (packets, bytes) = (batch.count, batch.bytes);
        // Numbered only once it is certain to be sent: a gap in sequence numbers is loss in transit.
        let mut head = proto::MirrorBatch {
            sequence: 0,
            sent_at_unix_nanos: 0,
            policy_version: policy_version.load(Ordering::Relaxed),
            counters: None,
            packets: Vec::new(),
            linktype: batch.linktype,
            interface: batch.interface.clone(),
            snaplen: batch.snaplen,
        };
        let permit = tokio::select! {
            () = stop.cancelled() => { queue.settle_dropped(&batch); break; }
            p = tx.reserve() => p,
        };
        let Ok(permit) = permit else {
            queue.settle_dropped(&batch);
            stream = None;
            continue;
        };
        head.sequence = queue.next_sequence();
        queue.settle_sent(packets, bytes);
        head.counters = Some(queue.counters().snapshot());
        head.sent_at_unix_nanos = tapgraph::time::unix_nanos();
        permit.send(wire::Outbound {
            head,
            packets: batch.encoded,
        });
    }
    queue
}

/// Writes a direct-mode batch to its targets on a blocking thread (the sockets may block) and
/// settles it: sent once handed to the targets, whose rows count what each did with it.
async fn send_direct(queue: &QueueRx, direct: std::sync::Arc<super::direct::Direct>, batch: Batch) {
    let (encoded, interface) = (batch.encoded.clone(), batch.interface.clone());
    let (linktype, snaplen) = (batch.linktype, batch.snaplen);
    let written = tokio::task::spawn_blocking(move || {
        proto::MirrorBatch::decode(encoded)
            .map(|decoded| direct.write(&interface, linktype, snaplen, &decoded.packets))
            .map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("the write panicked: {e}")));
    match written {
        Ok(()) => queue.settle_sent(batch.count, batch.bytes),
        // Not expected: the capture thread wrote these bytes, and writers do not panic.
        Err(error) => {
            tracing::error!(%error, "direct mirror batch dropped");
            queue.settle_dropped(&batch);
        }
    }
}
