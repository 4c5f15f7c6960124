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

pub mod limit;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tapgraph::policy::{CaptureMode, PolicySpec};
use tapgraph::proto;
use tokio::sync::mpsc;

use limit::{Breach, BreachWatchdog, TokenBucket};

/// The kernel ring libpcap gets: room for ~50 ms at 1 Gbit/s. It counts towards the agent's RSS
/// once touched, so it stays well under the 32 MB budget.
const RING_BYTES: i32 = 4 << 20;
/// A batch never exceeds this, far below gRPC's message limit.
const BATCH_MAX_BYTES: usize = 1 << 20;
/// Bytes the queued batches hold at most (payloads and their framing); more is dropped and counted.
pub const QUEUE_MAX_BYTES: u64 = 8 << 20;
const QUEUE_MAX_BATCHES: usize = 256;
/// How often kernel drop counters are read.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// A backlog above this is a burst; once the queue is back below [`BURST_OVER`], the memory it
/// held is handed back to the system (see [`release_memory`]).
const BURST_BYTES: u64 = 1 << 20;
const BURST_OVER: u64 = 64 << 10;

/// What a capture needs from the policy; two policies with equal settings share a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub interface: String,
    pub filter: String,
    pub snaplen: u32,
    pub mode: CaptureMode,
    pub buffer_timeout: Duration,
    pub batch_packets: u32,
    pub batch_delay: Duration,
    pub limit_bps: u64,
    pub check_interval: Duration,
    pub breach_intervals: u32,
}

impl Settings {
    /// `None` when the policy does not capture.
    pub fn from_policy(p: &PolicySpec) -> Option<Self> {
        p.capture.then(|| Self {
            interface: p.interface.clone(),
            filter: p.filter.clone(),
            snaplen: p.snaplen,
            mode: p.mode,
            buffer_timeout: p.buffer_timeout,
            batch_packets: p.batch_packets,
            batch_delay: p.batch_delay,
            limit_bps: p.limit_bps,
            check_interval: p.check_interval,
            breach_intervals: p.breach_intervals,
        })
    }

    /// libpcap's read timeout, in whole milliseconds (its resolution), at least 1.
    fn read_timeout_ms(&self) -> i32 {
        let t = match self.mode {
            CaptureMode::Buffered => self.buffer_timeout,
            // Immediate mode delivers each packet at once; the timeout only wakes an idle thread
            // to flush a partial batch and close watchdog intervals.
            CaptureMode::Immediate => self.batch_delay,
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

/// Packets captured together, with their link type.
#[derive(Debug)]
pub struct Batch {
    pub linktype: u32,
    pub interface: String,
    pub snaplen: u32,
    /// The packets as `MirrorBatch.packets` entries ([`wire::put_packet`]).
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
    pub fn packets(&self) -> Vec<proto::Packet> {
        use prost::Message;
        proto::MirrorBatch::decode(self.encoded.clone())
            .expect("a batch decodes")
            .packets
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
    fn queued_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Queues a batch without waiting; when the queue is full or over its byte budget the batch
    /// is dropped and counted. Its packets are in flight already (since they were admitted).
    fn offer(&self, batch: Batch, counters: &Counters) {
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

/// A capture handle opened and filtered, not yet reading: opening is where a bad interface or
/// filter fails, before the running capture is touched.
pub struct Prepared {
    cap: pcap::Capture<pcap::Active>,
    settings: Settings,
}

/// Why a capture could not start, with libpcap's own words.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    #[error("interface: cannot capture on {interface}: {reason}")]
    Open { interface: String, reason: String },
    #[error("filter: {reason}")]
    Filter { reason: String },
}

impl Prepared {
    pub fn open(settings: Settings) -> Result<Self, OpenError> {
        let open_err = |e: pcap::Error| OpenError::Open {
            interface: settings.interface.clone(),
            reason: e.to_string(),
        };
        let mut cap = pcap::Capture::from_device(settings.interface.as_str())
            .map_err(open_err)?
            .snaplen(settings.snaplen as i32)
            .precision(pcap::Precision::Nano)
            .immediate_mode(settings.mode == CaptureMode::Immediate)
            .timeout(settings.read_timeout_ms())
            .buffer_size(RING_BYTES)
            .promisc(false)
            .open()
            .map_err(open_err)?;
        cap.filter(&settings.filter, true)
            .map_err(|e| OpenError::Filter {
                reason: e.to_string(),
            })?;
        Ok(Self { cap, settings })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Starts reading on a new thread. Packets stamped at or before `after_ns` are skipped: they
    /// were delivered by the capture this one replaces.
    pub fn start(
        mut self,
        after_ns: u64,
        counters: Arc<Counters>,
        queue: QueueTx,
        events: mpsc::Sender<Event>,
    ) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = self.cap.breakloop_handle();
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("capture".into())
                .spawn(move || Reader::new(self, after_ns, counters, queue, events, stop).run())
        };
        match thread {
            Ok(thread) => Running {
                stop,
                wake,
                thread: Some(thread),
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the capture thread");
                Running {
                    stop,
                    wake,
                    thread: None,
                }
            }
        }
    }
}

/// A capture thread; stopped and joined on [`Running::stop`] or drop.
pub struct Running {
    stop: Arc<AtomicBool>,
    /// Wakes the thread out of a blocking read (libpcap ≥ 1.10 on Linux): an idle buffered
    /// capture would otherwise sleep until the next packet.
    wake: pcap::BreakLoop,
    thread: Option<JoinHandle<u64>>,
}

impl Running {
    /// Whether the thread has ended by itself (breach or failure).
    pub fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the thread and returns the timestamp of the last packet it handled, after flushing
    /// its partial batch.
    pub fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.breakloop();
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The capture thread: the handle, and everything its packet callback touches.
struct Reader {
    cap: pcap::Capture<pcap::Active>,
    state: ReaderState,
}

struct ReaderState {
    settings: Settings,
    linktype: u32,
    after_ns: u64,
    counters: Arc<Counters>,
    queue: QueueTx,
    events: mpsc::Sender<Event>,
    stop: Arc<AtomicBool>,
    bucket: Option<TokenBucket>,
    watchdog: BreachWatchdog,
    /// The batch being filled, in its wire form, and how many packets and payload bytes it holds.
    arena: BytesMut,
    pending: u64,
    pending_bytes: u64,
    last_ns: u64,
    breach: Option<Breach>,
    kernel_seen: u64,
    /// The queue held more than [`BURST_BYTES`] since memory was last released.
    burst: bool,
}

/// A capture timestamp in Unix nanoseconds: with nanosecond precision requested, libpcap puts
/// nanoseconds in `tv_usec`.
fn unix_nanos(sec: i64, nanos: i64) -> u64 {
    (sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(nanos.max(0) as u64)
}

impl Reader {
    fn new(
        prepared: Prepared,
        after_ns: u64,
        counters: Arc<Counters>,
        queue: QueueTx,
        events: mpsc::Sender<Event>,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let s = &prepared.settings;
        let linktype = prepared.cap.get_datalink().0 as u32;
        let state = ReaderState {
            bucket: (s.limit_bps > 0).then(|| TokenBucket::new(s.limit_bps)),
            watchdog: BreachWatchdog::new(s.limit_bps, s.check_interval, s.breach_intervals),
            arena: BytesMut::new(),
            pending: 0,
            pending_bytes: 0,
            settings: prepared.settings,
            linktype,
            after_ns,
            counters,
            queue,
            events,
            stop,
            last_ns: after_ns,
            breach: None,
            kernel_seen: 0,
            burst: false,
        };
        Self {
            cap: prepared.cap,
            state,
        }
    }

    /// Reads until stopped, breached or failed; returns the last packet's timestamp.
    fn run(self) -> u64 {
        let Self {
            mut cap,
            state: mut st,
        } = self;
        let mut next_stats = Instant::now() + STATS_EVERY;
        while !st.stop.load(Ordering::Relaxed) {
            let read = cap.dispatch(None, |packet| st.packet(&packet));
            if st.stop.load(Ordering::Relaxed) {
                break;
            }
            if let Err(e) = &read {
                let reason = format!("capture on {} failed: {e}", st.settings.interface);
                tracing::error!(error = %reason, "capture stopped");
                let _ = st.events.try_send(Event::Failed(reason));
                break;
            }
            let now = tapgraph::time::unix_nanos();
            if st.breach.is_none() {
                st.breach = st.watchdog.advance(now);
            }
            if st.breach.is_some() {
                break;
            }
            // A read returns everything the ring holds (a kernel block in buffered mode, what
            // arrived meanwhile in immediate mode), and the next read may sleep until more traffic
            // comes (libpcap's TPACKET_V3 poll does not time out on an idle ring): send what we
            // have now. Under load reads return more at a time, so batches grow by themselves;
            // batch_packets and the byte cap split them.
            st.flush();
            if Instant::now() >= next_stats {
                st.kernel_drops(&mut cap);
                st.release_after_burst();
                next_stats = Instant::now() + STATS_EVERY;
            }
        }
        st.flush();
        st.kernel_drops(&mut cap);
        drop(cap);
        if let Some(breach) = st.breach {
            tracing::warn!(
                interface = %st.settings.interface,
                measured = %tapgraph::units::format_bitrate(breach.measured_bps),
                limit = %tapgraph::units::format_bitrate(breach.limit_bps),
                intervals = breach.intervals,
                "capture stopped: the offered rate stayed above the limit; it resumes with a new policy"
            );
            let _ = st.events.try_send(Event::Breach(breach));
        }
        st.last_ns
    }
}

impl ReaderState {
    fn packet(&mut self, packet: &pcap::Packet<'_>) {
        if self.breach.is_some() {
            return;
        }
        #[allow(clippy::unnecessary_cast)] // time_t and suseconds_t differ by platform.
        let ts = unix_nanos(
            packet.header.ts.tv_sec as i64,
            packet.header.ts.tv_usec as i64,
        );
        if ts <= self.after_ns {
            return;
        }
        self.last_ns = self.last_ns.max(ts);
        let len = packet.data.len() as u32;
        Counters::add(&self.counters.captured, 1);
        Counters::add(&self.counters.bytes_captured, u64::from(len));
        if let Some(breach) = self.watchdog.offer(ts, len) {
            // This packet completed the breach; it and everything after it are not sent.
            self.breach = Some(breach);
            Counters::add(&self.counters.dropped_limiter, 1);
            Counters::add(&self.counters.bytes_dropped_limiter, u64::from(len));
            return;
        }
        if let Some(bucket) = &mut self.bucket
            && !bucket.admit(ts, len)
        {
            Counters::add(&self.counters.dropped_limiter, 1);
            Counters::add(&self.counters.bytes_dropped_limiter, u64::from(len));
            return;
        }
        let need = packet.data.len() + wire::PACKET_OVERHEAD;
        if self.arena.len() + need > BATCH_MAX_BYTES {
            self.flush();
        }
        if self.pending == 0 {
            let want = (self.settings.batch_packets as usize
                * need.max(64 + wire::PACKET_OVERHEAD))
            .clamp(need, BATCH_MAX_BYTES);
            self.arena.reserve(want);
        }
        // In flight from here until it is sent or dropped: the counters balance at every moment,
        // a batch still being filled included.
        Counters::add(&self.counters.in_flight, 1);
        wire::put_packet(&mut self.arena, ts, packet.header.len, packet.data);
        self.pending += 1;
        self.pending_bytes += u64::from(len);
        if self.pending >= u64::from(self.settings.batch_packets) {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.pending == 0 {
            return;
        }
        let batch = Batch {
            linktype: self.linktype,
            interface: self.settings.interface.clone(),
            snaplen: self.settings.snaplen,
            encoded: self.arena.split().freeze(),
            count: std::mem::take(&mut self.pending),
            bytes: std::mem::take(&mut self.pending_bytes),
        };
        self.queue.offer(batch, &self.counters);
        self.burst |= self.queue.queued_bytes() > BURST_BYTES;
    }

    /// After a burst has drained, gives the memory its batches held back to the system.
    fn release_after_burst(&mut self) {
        if self.burst && self.queue.queued_bytes() < BURST_OVER {
            self.burst = false;
            release_memory();
        }
    }

    /// Adds the kernel's drops since the last read to the counters.
    fn kernel_drops(&mut self, cap: &mut pcap::Capture<pcap::Active>) {
        if let Ok(stat) = cap.stats() {
            let total = u64::from(stat.dropped) + u64::from(stat.if_dropped);
            if total > self.kernel_seen {
                Counters::add(&self.counters.dropped_kernel, total - self.kernel_seen);
                self.kernel_seen = total;
            }
        }
    }
}

/// Returns the heap's free pages to the system. A burst leaves megabytes of batches freed in
/// glibc's arenas, which glibc keeps (it only trims an arena's top, and the capture thread's
/// arena is fragmented by batches freed out of order on the stream's thread); without this the
/// agent's RSS stays at a burst's high-water mark for good.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_memory() {
    // SAFETY: malloc_trim takes no pointer and has no precondition; it locks each arena itself,
    // so it is safe to call while other threads allocate.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_memory() {}

/// The agent's virtual TAP across policies and sessions: at most one running capture, the
/// counters, the queue, and the state reported in control records.
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
        let prepared = Prepared::open(settings).inspect_err(|e| {
            tracing::warn!(error = %e, "capture not changed");
        })?;
        let after_ns = self.running.take().map_or(0, Running::stop);
        let settings_started = prepared.settings().clone();
        let s = prepared.settings();
        tracing::info!(
            interface = %s.interface,
            filter = %s.filter,
            snaplen = s.snaplen,
            mode = ?s.mode,
            limit = %tapgraph::units::format_bitrate(s.limit_bps),
            breach_intervals = s.breach_intervals,
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
        queue.sequence += 1;
        head.sequence = queue.sequence;
        queue.settle_sent(packets, bytes);
        head.counters = Some(queue.counters.snapshot());
        head.sent_at_unix_nanos = tapgraph::time::unix_nanos();
        permit.send(wire::Outbound {
            head,
            packets: batch.encoded,
        });
    }
    queue
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    fn settings(filter: &str) -> Settings {
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

    fn root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!(
                "\n*** SKIPPED: live capture needs root or CAP_NET_RAW; CI runs as root ***\n"
            );
        }
        root
    }

    #[test]
    fn a_bad_filter_or_interface_fails_at_open_with_libpcap_text() {
        if !root() {
            return;
        }
        let e = Prepared::open(settings("udp port banana")).err().unwrap();
        assert!(e.to_string().starts_with("filter: "), "{e}");
        assert!(e.to_string().contains("banana"), "{e}");
        let mut s = settings("");
        s.interface = "nosuch0".into();
        let e = Prepared::open(s).err().unwrap();
        assert!(e.to_string().contains("nosuch0"), "{e}");
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
        s.batch_packets = 1;
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

    /// The last packet before a silence goes out at once, in both modes, and is in flight (never
    /// uncounted) while it waits.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_lone_packet_is_not_held_for_a_batch() {
        if !root() {
            return;
        }
        for mode in [CaptureMode::Immediate, CaptureMode::Buffered] {
            let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = sink.local_addr().unwrap().port();
            let mut tap = Tap::default();
            let mut rx = tap.outbound.take().unwrap();
            let mut s = settings(&format!("udp dst port {port}"));
            s.mode = mode;
            s.batch_delay = Duration::from_secs(1);
            tap.apply(Some(s), true).unwrap();
            UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .send_to(b"lone", ("127.0.0.1", port))
                .unwrap();
            let batch = tokio::time::timeout(Duration::from_millis(500), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{mode:?}: the packet waited for a batch"))
                .unwrap();
            assert_eq!(batch.count, 1);
            let c = tap.counters();
            assert_eq!(c.packets_captured, 1, "{mode:?}");
            assert_eq!(c.packets_in_flight, 1, "{mode:?}: queued, not yet sent");
        }
    }
}
