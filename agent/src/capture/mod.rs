//! The virtual TAP's agent side: a libpcap capture on its own thread, rate control, batching, and a
//! bounded queue towards the `Mirror` stream.
//!
//! ```text
//! kernel ring ──pcap_dispatch──▶ capture thread ──try_send──▶ bounded queue ──▶ mirror stream
//!   (drops: kernel)            watchdog, bucket, batch     (drops: queue)      (session task)
//!                               (drops: limiter)
//! ```
//!
//! The capture thread never blocks on anything but the kernel: a batch that finds the queue full,
//! or over its byte budget, is dropped and counted. Each batch is one buffer, filled by the only
//! copy out of the capture ring, which writes the packets in their wire form ([`wire`]).
//!
//! Counters are cumulative since the agent started, across captures and sessions, and balance:
//! captured = sent + dropped by the limiter + dropped by the queue + in flight.
//!
//! One stage per file: [`reader`] (the capture thread: libpcap open and dispatch, batching),
//! [`limit`] (the token bucket and the breach watchdog it applies), [`wire`] (the packets' wire
//! form), [`queue`] (the bounded queue and its drops) and [`forwarder`] (the mirror stream). This
//! file keeps the [`Tap`] the session drives, and what the stages share: the settings, the
//! counters and the events.

pub mod direct;
pub mod forwarder;
pub mod limit;
pub mod queue;
pub mod reader;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tapgraph::policy::{CaptureMode, PolicySpec};
use tapgraph::proto;
use tokio::sync::mpsc;

use direct::DirectStats;
use limit::Breach;
use queue::{Batch, QueueTx, queue};
use reader::{Prepared, Running};

pub use forwarder::forward;
pub use queue::QueueRx;
pub use reader::OpenError;

/// What a capture needs from the policy: the policy itself, with the fields that do not concern
/// capture (the mirror's targets unless the agent sends to them itself, dedup, the snapshot and
/// heartbeat intervals) at their defaults, so two policies that capture alike have equal settings
/// and share a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub spec: PolicySpec,
}

impl Settings {
    /// `None` when the policy does not capture.
    pub fn from_policy(p: &PolicySpec) -> Option<Self> {
        let unused = PolicySpec::default();
        // A field added to PolicySpec counts for the capture unless it is set aside here: at
        // worst a change of it restarts the capture, never leaves a stale one running.
        p.capture.then(|| Self {
            spec: PolicySpec {
                // In direct mode the capture's batches go to the targets from here.
                targets: if p.direct {
                    p.targets.clone()
                } else {
                    unused.targets
                },
                dedup: unused.dedup,
                snapshot_interval: unused.snapshot_interval,
                heartbeat_interval: unused.heartbeat_interval,
                ..p.clone()
            },
        })
    }

    /// libpcap's read timeout, in whole milliseconds (its resolution), at least 1.
    fn read_timeout_ms(&self) -> i32 {
        let t = match self.spec.mode {
            CaptureMode::Buffered => self.spec.buffer_timeout,
            // Immediate mode delivers each packet at once; the timeout only wakes an idle thread
            // to flush a partial batch and close watchdog intervals.
            CaptureMode::Immediate => self.spec.batch_delay,
        };
        t.as_millis().clamp(1, 1000) as i32
    }
}

/// Cumulative capture counters, shared by the capture thread and the mirror stream.
#[derive(Debug, Default)]
pub struct Counters {
    captured: AtomicU64,
    bytes_captured: AtomicU64,
    dropped_kernel: AtomicU64,
    dropped_limiter: AtomicU64,
    bytes_dropped_limiter: AtomicU64,
    dropped_queue: AtomicU64,
    bytes_dropped_queue: AtomicU64,
    sent: AtomicU64,
    bytes_sent: AtomicU64,
    batches_sent: AtomicU64,
    in_flight: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> proto::Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        proto::Counters {
            packets_captured: get(&self.captured),
            bytes_captured: get(&self.bytes_captured),
            packets_sent: get(&self.sent),
            bytes_sent: get(&self.bytes_sent),
            packets_dropped_kernel: get(&self.dropped_kernel),
            packets_dropped_limiter: get(&self.dropped_limiter),
            bytes_dropped_limiter: get(&self.bytes_dropped_limiter),
            packets_dropped_queue: get(&self.dropped_queue),
            bytes_dropped_queue: get(&self.bytes_dropped_queue),
            batches_sent: get(&self.batches_sent),
            packets_in_flight: get(&self.in_flight),
        }
    }

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// A queued batch could not be delivered (queue full, or the stream is gone).
    pub fn dropped_in_queue(&self, batch: &Batch) {
        Self::add(&self.dropped_queue, batch.count);
        Self::add(&self.bytes_dropped_queue, batch.bytes);
    }
}

/// Something the session must report at once.
#[derive(Debug, Clone)]
pub enum Event {
    /// The breach rule stopped capture.
    Breach(Breach),
    /// Capture failed while running (the interface went away, for example).
    Failed(String),
}

/// The agent's virtual TAP across policies and sessions: at most one running capture, the
/// counters, the queue, and the state reported in control records.
///
/// It guarantees that at most one capture thread runs; that a policy whose capture cannot open
/// leaves the running capture as it was; that a capture replacing another mirrors no packet
/// twice; that a capture the breach rule stopped stays stopped until a new policy version; and
/// that the counters survive captures and sessions and always balance.
pub struct Tap {
    counters: Arc<Counters>,
    queue: QueueTx,
    /// Taken by the session that streams batches, given back when it ends.
    pub outbound: Option<QueueRx>,
    events_tx: mpsc::Sender<Event>,
    pub events: mpsc::Receiver<Event>,
    running: Option<Running>,
    /// Settings of the last capture started, kept after it stopped: the same policy sent again
    /// (a reconnect) must not resume a capture the breach rule stopped.
    settings: Option<Settings>,
    state: proto::CaptureState,
    last_error: String,
    breach: Option<Breach>,
    /// Direct mode's counters per target, across captures.
    direct: DirectStats,
}

impl Default for Tap {
    fn default() -> Self {
        let counters = Arc::new(Counters::default());
        let (queue, outbound) = queue(counters.clone());
        let (events_tx, events) = mpsc::channel(16);
        Self {
            counters,
            queue,
            outbound: Some(outbound),
            events_tx,
            events,
            running: None,
            settings: None,
            state: proto::CaptureState::Disabled,
            last_error: String::new(),
            breach: None,
            direct: DirectStats::default(),
        }
    }
}

impl Tap {
    /// Applies the capture part of a policy. `new_version` says the policy is new, not the same
    /// one sent again after a reconnect: only a new policy resumes a capture the breach rule
    /// stopped. On error the running capture is untouched. Returns whether a capture started.
    pub fn apply(
        &mut self,
        wanted: Option<Settings>,
        new_version: bool,
    ) -> Result<bool, OpenError> {
        let Some(settings) = wanted else {
            if let Some(running) = self.running.take() {
                running.stop();
                tracing::info!("capture disabled");
            }
            self.settings = None;
            self.state = proto::CaptureState::Disabled;
            self.breach = None;
            self.last_error.clear();
            return Ok(false);
        };
        let same = self.settings.as_ref() == Some(&settings);
        let stopped = matches!(
            self.state,
            proto::CaptureState::StoppedBreach | proto::CaptureState::Failed
        );
        if same && !(stopped && new_version) {
            return Ok(false);
        }
        let prepared = Prepared::open(settings)
            .and_then(|p| p.open_direct(&mut self.direct))
            .inspect_err(|e| {
                tracing::warn!(error = %e, "capture not changed");
            })?;
        let after_ns = self.running.take().map_or(0, Running::stop);
        let settings_started = prepared.settings().clone();
        let s = &prepared.settings().spec;
        tracing::info!(
            interface = %s.interface,
            filter = %s.filter,
            snaplen = s.snaplen,
            mode = ?s.mode,
            limit = %tapgraph::units::format_bitrate(s.limit_bps),
            breach_intervals = s.breach_intervals,
            direct = s.direct,
            "capture started"
        );
        self.running = Some(prepared.start(
            after_ns,
            self.counters.clone(),
            self.queue.clone(),
            self.events_tx.clone(),
        ));
        self.settings = Some(settings_started);
        self.state = proto::CaptureState::Running;
        self.breach = None;
        self.last_error.clear();
        Ok(true)
    }

    /// Records what the capture thread reported.
    pub fn on_event(&mut self, event: &Event) {
        match event {
            Event::Breach(b) => {
                self.state = proto::CaptureState::StoppedBreach;
                self.breach = Some(*b);
                self.last_error = format!(
                    "capture stopped: offered {} above the limit {} for {} intervals",
                    tapgraph::units::format_bitrate(b.measured_bps),
                    tapgraph::units::format_bitrate(b.limit_bps),
                    b.intervals
                );
            }
            Event::Failed(reason) => {
                self.state = proto::CaptureState::Failed;
                self.last_error = reason.clone();
            }
        }
        // The thread has ended: release its handle now, so a stopped capture costs nothing.
        if self.running.as_ref().is_some_and(Running::ended) {
            self.running = None;
        }
    }

    pub fn counters(&self) -> proto::Counters {
        self.counters.snapshot()
    }

    /// What direct mode sent to each target, for control records.
    pub fn direct_targets(&self) -> Vec<proto::DirectTarget> {
        self.direct.snapshot()
    }

    pub fn state(&self) -> proto::CaptureState {
        self.state
    }

    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    pub fn breach(&self) -> Option<proto::Breach> {
        self.breach.map(|b| proto::Breach {
            measured_bits_per_second: b.measured_bps,
            limit_bits_per_second: b.limit_bps,
            intervals: b.intervals,
            at_unix_nanos: b.at_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;
    use tapgraph::policy::Target;

    pub(super) fn settings(filter: &str) -> Settings {
        let mut p = PolicySpec {
            capture: true,
            interface: "lo".into(),
            filter: filter.into(),
            ..PolicySpec::default()
        };
        p.batch_packets = 16;
        p.limit_bps = 0;
        Settings::from_policy(&p).unwrap()
    }

    pub(super) fn root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!(
                "\n*** SKIPPED: live capture needs root or CAP_NET_RAW; CI runs as root ***\n"
            );
        }
        root
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn captured_packets_arrive_in_batches_with_their_bytes_and_counters_balance() {
        if !root() {
            return;
        }
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sink.local_addr().unwrap().port();
        let mut tap = Tap::default();
        let mut rx = tap.outbound.take().unwrap();
        tap.apply(Some(settings(&format!("udp dst port {port}"))), true)
            .unwrap();
        let src = UdpSocket::bind("127.0.0.1:0").unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        for p in &payloads {
            src.send_to(p, ("127.0.0.1", port)).unwrap();
        }
        let mut got = Vec::new();
        while got.len() < payloads.len() {
            let batch = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("a batch within 5 s")
                .unwrap();
            assert_eq!(batch.linktype, 1, "loopback is Ethernet-framed");
            let packets = batch.packets();
            assert_eq!(packets.len() as u64, batch.count);
            assert!(packets.len() <= 16);
            assert_eq!(
                batch.bytes,
                packets.iter().map(|p| p.data.len() as u64).sum::<u64>()
            );
            rx.settle_sent(batch.count, batch.bytes);
            got.extend(packets);
        }
        for (packet, payload) in got.iter().zip(&payloads) {
            // Ethernet 14 + IPv4 20 + UDP 8 bytes of headers.
            assert_eq!(&packet.data[42..], &payload[..]);
            assert_eq!(packet.original_length as usize, packet.data.len());
            assert!(packet.timestamp_unix_nanos > 0);
        }
        let c = tap.counters();
        assert_eq!(c.packets_captured, 40);
        assert_eq!(c.packets_sent, 40);
        assert_eq!(c.packets_in_flight, 0);
        // The same settings again (a reconnect) keep the capture; disabling releases it.
        tap.apply(Some(settings(&format!("udp dst port {port}"))), false)
            .unwrap();
        assert_eq!(tap.state(), proto::CaptureState::Running);
        tap.apply(None, true).unwrap();
        assert_eq!(tap.state(), proto::CaptureState::Disabled);
        assert!(tap.running.is_none());
    }

    #[test]
    fn after_a_breach_only_a_new_policy_version_resumes_capture() {
        if !root() {
            return;
        }
        let mut tap = Tap::default();
        let s = settings("udp dst port 9");
        assert!(tap.apply(Some(s.clone()), true).unwrap());
        tap.on_event(&Event::Breach(Breach {
            measured_bps: 9_000_000,
            limit_bps: 1_000_000,
            intervals: 3,
            at_ns: 1,
        }));
        tap.running = None; // what on_event does once the thread has ended
        assert_eq!(tap.state(), proto::CaptureState::StoppedBreach);
        // The same policy again, as after a reconnect: stays stopped.
        assert!(!tap.apply(Some(s.clone()), false).unwrap());
        assert_eq!(tap.state(), proto::CaptureState::StoppedBreach);
        assert!(tap.running.is_none() && tap.breach().is_some());
        // A new version of it: capture resumes.
        assert!(tap.apply(Some(s), true).unwrap());
        assert_eq!(tap.state(), proto::CaptureState::Running);
        assert!(tap.breach().is_none());
    }

    /// Two policies that capture alike share a capture: what capture does not use is no part of
    /// its settings, and each thing it uses is.
    #[test]
    fn settings_are_the_capture_part_of_the_policy() {
        let p = PolicySpec {
            capture: true,
            ..PolicySpec::default()
        };
        let s = Settings::from_policy(&p).unwrap();
        let unrelated = PolicySpec {
            targets: vec![Target::Interface("tap0".into())],
            snapshot_interval: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(30),
            ..p.clone()
        };
        assert_eq!(Settings::from_policy(&unrelated), Some(s.clone()));
        // Sent from here, the targets concern the capture.
        let direct = |targets| PolicySpec {
            direct: true,
            targets,
            ..p.clone()
        };
        let vxlan = |vni| Target::Vxlan {
            host: "10.0.0.9".into(),
            port: 4789,
            vni,
        };
        assert_ne!(
            Settings::from_policy(&direct(vec![vxlan(1)])),
            Settings::from_policy(&direct(vec![vxlan(2)]))
        );
        type Change = fn(&mut PolicySpec);
        let changes: [(&str, Change); 12] = [
            ("interface", |p| p.interface = "eth1".into()),
            ("filter", |p| p.filter = "tcp".into()),
            ("snaplen", |p| p.snaplen = 128),
            ("mode", |p| p.mode = CaptureMode::Immediate),
            ("buffer_timeout", |p| {
                p.buffer_timeout = Duration::from_millis(7)
            }),
            ("buffer_size", |p| p.buffer_size = 7 << 20),
            ("batch_packets", |p| p.batch_packets = 7),
            ("batch_delay", |p| p.batch_delay = Duration::from_millis(7)),
            ("limit_bps", |p| p.limit_bps = 7_000_000),
            ("check_interval", |p| {
                p.check_interval = Duration::from_secs(7)
            }),
            ("breach_intervals", |p| p.breach_intervals = 7),
            ("direct", |p| p.direct = true),
        ];
        for (field, change) in changes {
            let mut q = p.clone();
            change(&mut q);
            let t = Settings::from_policy(&q).unwrap();
            assert_ne!(t, s, "{field} is part of the capture's settings");
        }
        let off = PolicySpec {
            capture: false,
            ..p
        };
        assert_eq!(Settings::from_policy(&off), None);
    }
}
