//! The capture thread: opens libpcap on the policy's interface and filter, then reads the
//! kernel ring with `pcap_dispatch`. Each packet passes the breach watchdog and the token bucket
//! ([`super::limit`]) and is written once, in its wire form ([`super::wire`]), into the batch being
//! filled; full batches, and whatever a read returned, are offered to the queue without waiting.
//!
//! The thread blocks on nothing but the kernel. It ends when stopped, when the breach rule trips,
//! or when the read fails, and reports the last two as [`Event`]s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tapgraph::policy::CaptureMode;
use tokio::sync::mpsc;

use super::direct::{Direct, DirectStats};
use super::limit::{Breach, BreachWatchdog, TokenBucket};
use super::queue::{Batch, QueueTx};
use super::{Counters, Event, Settings, wire};

/// A batch never exceeds this, far below gRPC's message limit.
const BATCH_MAX_BYTES: usize = 1 << 20;
/// How often kernel drop counters are read.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// A backlog above this is a burst; once the queue is back below [`BURST_OVER`], the memory it
/// held is handed back to the system (see [`release_memory`]).
const BURST_BYTES: u64 = 1 << 20;
const BURST_OVER: u64 = 64 << 10;

/// A capture handle opened and filtered, not yet reading: opening is where a bad interface or
/// filter fails, before the running capture is touched.
pub struct Prepared {
    cap: pcap::Capture<pcap::Active>,
    settings: Settings,
    /// In direct mode, the targets' writers, which every batch carries to the forwarder.
    direct: Option<Arc<Direct>>,
}

/// Why a capture could not start, with libpcap's own words.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    #[error("interface: cannot capture on {interface}: {reason}")]
    Open { interface: String, reason: String },
    #[error("filter: {reason}")]
    Filter { reason: String },
    #[error("direct: {reason}")]
    Direct { reason: String },
}

impl Prepared {
    pub fn open(settings: Settings) -> Result<Self, OpenError> {
        let open_err = |e: pcap::Error| OpenError::Open {
            interface: settings.spec.interface.clone(),
            reason: e.to_string(),
        };
        let mut cap = pcap::Capture::from_device(settings.spec.interface.as_str())
            .map_err(open_err)?
            .snaplen(settings.spec.snaplen as i32)
            .precision(pcap::Precision::Nano)
            .immediate_mode(settings.spec.mode == CaptureMode::Immediate)
            .timeout(settings.read_timeout_ms())
            .buffer_size(i32::try_from(settings.spec.buffer_size).unwrap_or(i32::MAX))
            .promisc(false)
            .open()
            .map_err(open_err)?;
        cap.filter(&settings.spec.filter, true)
            .map_err(|e| OpenError::Filter {
                reason: e.to_string(),
            })?;
        Ok(Self {
            cap,
            settings,
            direct: None,
        })
    }

    /// In direct mode, opens the policy's targets, counting on their rows in `stats`.
    pub fn open_direct(mut self, stats: &mut DirectStats) -> Result<Self, OpenError> {
        if self.settings.spec.direct {
            let direct = Direct::open(&self.settings.spec.targets, stats).map_err(|e| {
                OpenError::Direct {
                    reason: e.to_string(),
                }
            })?;
            self.direct = Some(Arc::new(direct));
        }
        Ok(self)
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
        let tick = Arc::new(AtomicBool::new(false));
        let wake = self.cap.breakloop_handle();
        let ticker = {
            let (stop, tick, wake) = (stop.clone(), tick.clone(), self.cap.breakloop_handle());
            std::thread::Builder::new()
                .name("capture-tick".into())
                .spawn(move || tick_every(STATS_EVERY, &stop, &tick, &wake))
        };
        let thread = {
            let (stop, tick) = (stop.clone(), tick.clone());
            std::thread::Builder::new()
                .name("capture".into())
                .spawn(move || {
                    Reader::new(self, after_ns, counters, queue, events, stop, tick).run()
                })
        };
        let log = |e: &std::io::Error| tracing::error!(error = %e, "cannot start a capture thread");
        Running {
            stop,
            wake,
            thread: thread.inspect_err(log).ok(),
            ticker: ticker.inspect_err(log).ok(),
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
    /// Wakes the capture thread every [`STATS_EVERY`] (see [`tick_every`]).
    ticker: Option<JoinHandle<()>>,
}

/// Wakes the capture thread out of its read every `every`, so it reads the kernel's drop counter
/// even while no packet comes: a ring that overflowed in a burst and then went quiet would
/// otherwise hide the burst's last drops until traffic resumed (bench/burst.sh saw 35 drops
/// reported of 5,387). A wake-up without packets costs one system call a second.
fn tick_every(every: Duration, stop: &AtomicBool, tick: &AtomicBool, wake: &pcap::BreakLoop) {
    loop {
        std::thread::park_timeout(every);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        tick.store(true, Ordering::Relaxed);
        wake.breakloop();
    }
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
        if let Some(ticker) = self.ticker.take() {
            ticker.thread().unpark();
            let _ = ticker.join();
        }
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
    direct: Option<Arc<Direct>>,
    linktype: u32,
    after_ns: u64,
    counters: Arc<Counters>,
    queue: QueueTx,
    events: mpsc::Sender<Event>,
    stop: Arc<AtomicBool>,
    /// Set by [`tick_every`] before it breaks the read loop: that read's error is the wake-up.
    tick: Arc<AtomicBool>,
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
        tick: Arc<AtomicBool>,
    ) -> Self {
        let s = &prepared.settings.spec;
        let linktype = prepared.cap.get_datalink().0 as u32;
        let state = ReaderState {
            bucket: (s.limit_bps > 0).then(|| TokenBucket::new(s.limit_bps)),
            watchdog: BreachWatchdog::new(s.limit_bps, s.check_interval, s.breach_intervals),
            arena: BytesMut::new(),
            pending: 0,
            pending_bytes: 0,
            settings: prepared.settings,
            direct: prepared.direct,
            linktype,
            after_ns,
            counters,
            queue,
            events,
            stop,
            tick,
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
        tapgraph::runtime::realtime_thread("capture");
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
            // A tick breaks the read loop: libpcap then returns an error that is no failure.
            let ticked = read.is_err() && st.tick.swap(false, Ordering::Relaxed);
            if let Err(e) = &read
                && !ticked
            {
                let reason = format!("capture on {} failed: {e}", st.settings.spec.interface);
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
                interface = %st.settings.spec.interface,
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
            let want = (self.settings.spec.batch_packets as usize
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
        if self.pending >= u64::from(self.settings.spec.batch_packets) {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.pending == 0 {
            return;
        }
        let batch = Batch {
            linktype: self.linktype,
            interface: self.settings.spec.interface.clone(),
            snaplen: self.settings.spec.snaplen,
            direct: self.direct.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Tap;
    use crate::capture::tests::{root, settings};
    use std::net::UdpSocket;

    #[test]
    fn a_bad_filter_or_interface_fails_at_open_with_libpcap_text() {
        if !root() {
            return;
        }
        let e = Prepared::open(settings("udp port banana")).err().unwrap();
        assert!(e.to_string().starts_with("filter: "), "{e}");
        assert!(e.to_string().contains("banana"), "{e}");
        let mut s = settings("");
        s.spec.interface = "nosuch0".into();
        let e = Prepared::open(s).err().unwrap();
        assert!(e.to_string().contains("nosuch0"), "{e}");
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
            s.spec.mode = mode;
            s.spec.batch_delay = Duration::from_secs(1);
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
