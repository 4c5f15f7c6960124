//! The bounded queue between the capture thread and the mirror stream.
//!
//! The capture thread offers each batch without waiting: a batch that finds the queue full (in
//! batches) or over its byte budget is dropped and counted, never waited on, so the thread only
//! ever blocks on the kernel. The mirror stream takes batches out and settles each as sent or
//! dropped; until then its packets count as in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Counters;

/// Bytes the queued batches hold at most (payloads and their framing); more is dropped and counted.
pub const QUEUE_MAX_BYTES: u64 = 8 << 20;
const QUEUE_MAX_BATCHES: usize = 256;

/// Packets captured together, with their link type.
#[derive(Debug)]
pub struct Batch {
    pub linktype: u32,
    pub interface: String,
    pub snaplen: u32,
    /// In direct mode, where the forwarder writes the batch instead of the `Mirror` stream.
    pub direct: Option<Arc<super::direct::Direct>>,
    /// The packets as `MirrorBatch.packets` entries ([`super::wire::put_packet`]).
    pub encoded: Bytes,
    /// How many packets `encoded` holds.
    pub count: u64,
    /// Sum of the packets' captured lengths.
    pub bytes: u64,
}

impl Batch {
    /// Memory the batch holds, which the queue's byte budget counts: the payloads and their framing.
    fn held(&self) -> u64 {
        self.encoded.len() as u64
    }

    /// The packets, decoded.
    #[cfg(test)]
    pub fn packets(&self) -> Vec<tapgraph::proto::Packet> {
        use prost::Message;
        use tapgraph::proto;
        proto::MirrorBatch::decode(self.encoded.clone())
            .expect("a batch decodes")
            .packets
    }
}

/// The capture thread's end of the queue.
#[derive(Clone)]
pub struct QueueTx {
    tx: mpsc::Sender<Batch>,
    bytes: Arc<AtomicU64>,
}

/// The mirror stream's end of the queue.
pub struct QueueRx {
    rx: mpsc::Receiver<Batch>,
    bytes: Arc<AtomicU64>,
    counters: Arc<Counters>,
    /// Sequence number of the last `MirrorBatch` sent, across sessions.
    sequence: u64,
}

pub fn queue(counters: Arc<Counters>) -> (QueueTx, QueueRx) {
    let (tx, rx) = mpsc::channel(QUEUE_MAX_BATCHES);
    let bytes = Arc::new(AtomicU64::new(0));
    (
        QueueTx {
            tx,
            bytes: bytes.clone(),
        },
        QueueRx {
            rx,
            bytes,
            counters,
            sequence: 0,
        },
    )
}

impl QueueRx {
    /// The next batch; its packets stay counted in flight until [`QueueRx::sent`] or
    /// [`Counters::dropped_in_queue`] settles them.
    pub async fn recv(&mut self) -> Option<Batch> {
        let batch = self.rx.recv().await?;
        self.bytes.fetch_sub(batch.held(), Ordering::Relaxed);
        Some(batch)
    }

    /// Numbers the next batch sent. The numbers run on across sessions: a gap in them is loss in
    /// transit.
    pub fn next_sequence(&mut self) -> u64 {
        self.sequence += 1;
        self.sequence
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn settle_sent(&self, packets: u64, bytes: u64) {
        let c = &self.counters;
        Counters::add(&c.sent, packets);
        Counters::add(&c.bytes_sent, bytes);
        Counters::add(&c.batches_sent, 1);
        c.in_flight.fetch_sub(packets, Ordering::Relaxed);
    }

    pub fn settle_dropped(&self, batch: &Batch) {
        self.counters.dropped_in_queue(batch);
        self.counters
            .in_flight
            .fetch_sub(batch.count, Ordering::Relaxed);
    }
}

impl QueueTx {
    /// Bytes of the batches queued now.
    pub(super) fn queued_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Queues a batch without waiting; when the queue is full or over its byte budget the batch
    /// is dropped and counted. Its packets are in flight already (since they were admitted).
    pub(super) fn offer(&self, batch: Batch, counters: &Counters) {
        let n = batch.count;
        let drop = |batch: &Batch| {
            counters.in_flight.fetch_sub(n, Ordering::Relaxed);
            counters.dropped_in_queue(batch);
        };
        if self.bytes.load(Ordering::Relaxed) + batch.held() > QUEUE_MAX_BYTES {
            drop(&batch);
            return;
        }
        self.bytes.fetch_add(batch.held(), Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(batch) {
            let batch = match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
            };
            self.bytes.fetch_sub(batch.held(), Ordering::Relaxed);
            drop(&batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Tap;
    use crate::capture::tests::{root, settings};
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread")]
    async fn a_full_queue_drops_and_counts_instead_of_blocking() {
        if !root() {
            return;
        }
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sink.local_addr().unwrap().port();
        let mut tap = Tap::default();
        // Nobody reads the queue.
        let _rx = tap.outbound.take().unwrap();
        let mut s = settings(&format!("udp dst port {port}"));
        s.spec.batch_packets = 1;
        tap.apply(Some(s), true).unwrap();
        let src = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..QUEUE_MAX_BATCHES + 100 {
            src.send_to(&[0u8; 32], ("127.0.0.1", port)).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let c = tap.counters();
            if c.packets_captured == (QUEUE_MAX_BATCHES + 100) as u64 || Instant::now() > deadline {
                assert_eq!(c.packets_in_flight, QUEUE_MAX_BATCHES as u64, "{c:?}");
                assert_eq!(
                    c.packets_dropped_queue,
                    100 - c.packets_dropped_kernel,
                    "{c:?}"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A batch of `count` packets holding `held` bytes, admitted as the capture thread admits
    /// its packets: in flight from then on.
    fn admitted(counters: &Counters, count: u64, held: usize) -> Batch {
        Counters::add(&counters.in_flight, count);
        Batch {
            direct: None,
            linktype: 1,
            interface: "lo".into(),
            snaplen: 65_535,
            encoded: Bytes::from(vec![0; held]),
            count,
            bytes: held as u64,
        }
    }

    /// Either limit drops and counts at once, and a batch taken out frees its room; with no live
    /// capture needed, so the byte budget is checked where the full-queue test cannot run.
    #[tokio::test]
    async fn over_either_limit_a_batch_is_dropped_and_counted() {
        let counters = Arc::new(Counters::default());
        let (tx, mut rx) = queue(counters.clone());
        // The byte budget: 7 MiB and 1 MiB fit exactly, one byte more does not.
        tx.offer(admitted(&counters, 3, 7 << 20), &counters);
        tx.offer(admitted(&counters, 2, 1 << 20), &counters);
        assert_eq!(tx.queued_bytes(), QUEUE_MAX_BYTES);
        tx.offer(admitted(&counters, 5, 1), &counters);
        let c = counters.snapshot();
        assert_eq!((c.packets_dropped_queue, c.bytes_dropped_queue), (5, 1));
        assert_eq!(c.packets_in_flight, 5, "the queued batches stay in flight");
        // Taking a batch out frees its bytes; its packets stay in flight until settled.
        let first = rx.recv().await.unwrap();
        assert_eq!(first.count, 3);
        assert_eq!(tx.queued_bytes(), 1 << 20);
        rx.settle_sent(first.count, first.bytes);
        let second = rx.recv().await.unwrap();
        rx.settle_dropped(&second);
        let c = counters.snapshot();
        assert_eq!((c.packets_sent, c.batches_sent), (3, 1));
        assert_eq!(c.packets_dropped_queue, 5 + 2);
        assert_eq!((c.packets_in_flight, tx.queued_bytes()), (0, 0));
        // The batch limit: QUEUE_MAX_BATCHES small batches fit, the next one does not.
        for _ in 0..QUEUE_MAX_BATCHES {
            tx.offer(admitted(&counters, 1, 100), &counters);
        }
        tx.offer(admitted(&counters, 4, 100), &counters);
        let c = counters.snapshot();
        assert_eq!(c.packets_dropped_queue, 5 + 2 + 4);
        assert_eq!(c.packets_in_flight, QUEUE_MAX_BATCHES as u64);
        assert_eq!(
            tx.queued_bytes(),
            100 * QUEUE_MAX_BATCHES as u64,
            "a refused batch holds nothing"
        );
        // Batches are numbered from 1.
        assert_eq!((rx.next_sequence(), rx.next_sequence()), (1, 2));
        // With the stream's end gone, a batch is dropped and counted the same way.
        drop(rx);
        let before = counters.snapshot().packets_dropped_queue;
        tx.offer(admitted(&counters, 1, 1), &counters);
        assert_eq!(counters.snapshot().packets_dropped_queue, before + 1);
    }
}
