//! The mirror hub: routes each agent's batches to its policy's target, one writer thread per open
//! target, and keeps the counters operators read per agent and per target.
//!
//! ```text
//! Mirror stream (per agent) ──route by policy──▶ dedup ──▶ bounded job queue ──▶ writer thread (per target)
//!   drops: no route (batches), invalid,          drops:    drops: queue          drops: oversize, failed
//!          target unavailable                    duplicate
//! ```
//!
//! Each target deduplicates what its agents send (`dedup`): a packet that another agent's stream
//! brought first, captured at the other end of the connection, is dropped and counted as a
//! duplicate, before it takes room in the queue. The table is the target's, so it sees every
//! stream feeding it, in the order their batches arrive; whether an agent's packets take part is
//! its policy's (`dedup`), so agents whose policies differ on it still share one writer.
//!
//! A small batch for a quick target (a socket) that has nothing queued skips the queue: the stream
//! writes it itself under the writer's lock, which saves waking the thread (at 1 ms batches, two
//! context switches a millisecond).
//!
//! A target stays open while some stream uses it (streams hold it by `Arc`), so agents that share
//! an interface or a pcapng file share one writer, and the last one to leave closes it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Serialize;
use tapgraph::policy::Target;
use tapgraph::proto;

use super::check::Field;
use super::dedup::{Dedup, Fingerprints, Source};
use super::targets::{self, Origin, Writer};
pub use tapgraph::delay::{Histogram, HistogramSnapshot};

/// Jobs (batches) queued per target at most, and their bytes.
const QUEUE_JOBS: usize = 512;
const QUEUE_BYTES: u64 = 64 << 20;
/// A writer with nothing to do flushes after this.
const IDLE_FLUSH: Duration = Duration::from_millis(200);
/// Batches up to this many packets may be written by the stream itself (one `sendmmsg`).
const INLINE_PACKETS: usize = 64;
/// How long a stream waits before trying an unavailable target again.
const RETRY_TARGET: Duration = Duration::from_secs(5);

/// Counters of one agent's packets towards one target.
#[derive(Debug, Default)]
pub struct Stats {
    pub batches: AtomicU64,
    /// Batches the agent numbered but that never arrived.
    pub batches_lost: AtomicU64,
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    pub written: AtomicU64,
    pub written_bytes: AtomicU64,
    pub dropped_queue: AtomicU64,
    pub dropped_oversize: AtomicU64,
    pub dropped_failed: AtomicU64,
    pub dropped_invalid: AtomicU64,
    pub dropped_unavailable: AtomicU64,
    /// Copies of packets another agent sent the target first.
    pub dropped_duplicate: AtomicU64,
    /// Packets of the target's dedup table evicted before their hold to make room for this
    /// agent's: a late copy of one is delivered again.
    pub dedup_evicted: AtomicU64,
    /// Packets the agent counted as sent (in-band, in its batches) that never arrived.
    pub lost_in_transit: AtomicU64,
    /// Batches with a header not believed, by the field at fault (see `check`).
    pub invalid_sequence: AtomicU64,
    pub invalid_time: AtomicU64,
    pub invalid_counters: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// How the target was opened, if it says ([`Writer::note`]).
    pub target_note: Mutex<Option<&'static str>>,
    pub delay: Histogram,
}

impl Stats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one batch refused or partly disbelieved for `field`.
    pub fn invalid(&self, field: Field) {
        let c = match field {
            Field::Sequence => &self.invalid_sequence,
            Field::Time => &self.invalid_time,
            Field::Counters => &self.invalid_counters,
        };
        Self::add(c, 1);
    }

    fn set_error(&self, error: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error);
        }
    }
}

/// One row of `GET /api/v1/mirror`.
#[derive(Debug, Serialize)]
pub struct StatsView {
    pub agent: String,
    pub target: String,
    pub batches: u64,
    pub batches_lost: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
    pub packets_written: u64,
    pub bytes_written: u64,
    pub dropped: BTreeMap<&'static str, u64>,
    /// Packets forgotten by the target's dedup table early, to make room for this agent's.
    pub dedup_evicted: u64,
    pub lost_in_transit: u64,
    /// Batches with a header not believed, by field: `sequence` (dropped), `time` (delay not
    /// observed), `counters` (loss not counted).
    pub invalid_batches: BTreeMap<&'static str, u64>,
    pub last_error: Option<String>,
    /// How the target was opened: `created` or `opened` for a TAP device.
    pub target_note: Option<&'static str>,
    /// Capture to write, corrected for the agent's clock offset.
    pub delay_p50_us: Option<u64>,
    pub delay_p99_us: Option<u64>,
    /// The agent sends to this target itself (policy `direct`): the counts are its control
    /// record's, and the controller receives no batch.
    pub direct: bool,
}

impl StatsView {
    /// The row of a target agent `agent` sends to itself, from its last control record. What
    /// it drops before sending (the queue) is in the agent's own counters.
    pub fn direct(agent: &str, d: &crate::registry::DirectView) -> Self {
        Self {
            agent: agent.to_string(),
            target: d.target.clone(),
            batches: d.batches,
            batches_lost: 0,
            packets_received: 0,
            bytes_received: 0,
            packets_written: d.packets_written,
            bytes_written: d.bytes_written,
            dropped: BTreeMap::from([
                ("oversize", d.packets_oversize),
                ("failed", d.packets_failed),
            ]),
            dedup_evicted: 0,
            lost_in_transit: 0,
            invalid_batches: BTreeMap::new(),
            last_error: d.last_error.clone(),
            target_note: Some("direct"),
            delay_p50_us: d.delay_p50_us,
            delay_p99_us: d.delay_p99_us,
            direct: true,
        }
    }
}

struct Job {
    agent_id: Arc<str>,
    hostname: Arc<str>,
    interface: String,
    linktype: u32,
    snaplen: u32,
    packets: Vec<proto::Packet>,
    bytes: u64,
    stats: Arc<Stats>,
    /// The agent's clock minus ours, in ns, when the batch arrived.
    offset_ns: i64,
    /// Whether the batch's times were believed, so its packets' delay is recorded.
    observe_delay: bool,
}

/// An open target: its writer thread's queue.
pub struct TargetHandle {
    tx: SyncSender<Job>,
    queued_bytes: Arc<AtomicU64>,
    shared: Arc<Shared>,
    note: Option<&'static str>,
    fingerprints: Fingerprints,
    dedup: Mutex<Dedup>,
}

/// A target's writer, driven by its thread and, for a quick target with nothing queued, by the
/// streams themselves: a small batch is then written at once, without waking the thread.
struct Shared {
    writer: Mutex<Box<dyn Writer>>,
    /// Jobs queued for the thread or being written by it. A stream writes inline only when it is
    /// 0, so its batches are written in the order they came.
    pending: AtomicUsize,
    /// [`Writer::quick`]: its writes may run on an async thread.
    inline: bool,
}

#[derive(Default)]
struct Inner {
    targets: HashMap<String, Weak<TargetHandle>>,
    stats: BTreeMap<(String, String), Arc<Stats>>,
    /// Open Mirror streams per agent.
    streams: HashMap<String, usize>,
    /// Mirror streams refused because their agent had `limit` open.
    streams_refused: u64,
    /// Batches dropped whole because their agent had no route to a target.
    batches_no_route: u64,
}

/// An agent's open Mirror stream, counted until dropped.
pub struct StreamSlot {
    inner: Arc<Mutex<Inner>>,
    agent_id: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = inner.streams.get_mut(&self.agent_id) {
            *open -= 1;
            if *open == 0 {
                inner.streams.remove(&self.agent_id);
            }
        }
    }
}

/// A handle to the mirror hub, shared by every Mirror stream and the handlers that read its
/// counters. Guarantees: a target is open once however many streams use it, and closed (flushed)
/// when the last one detaches; a stream's batches reach the target in the order they came; and a
/// batch or packet that is not written is counted, per agent and target by reason, or here as
/// `no_route` when there is no target to count it against. It never blocks a stream on a slow
/// target: a full queue drops.
#[derive(Clone)]
pub struct Mirrors {
    inner: Arc<Mutex<Inner>>,
    state_dir: PathBuf,
    health: crate::health::Health,
    /// With replicas, this replica's name, put into `pcap:` file names ([`replica_file`]).
    replica: Option<Arc<str>>,
}

/// A Mirror stream's route: the attachments its batches of one policy version go to, one per
/// target of the policy (`none` when it has none).
pub struct Route {
    policy_version: u64,
    /// When the targets were looked up and attached (or found unavailable).
    at: tokio::time::Instant,
    attachments: Vec<Attachment>,
}

/// A stream's attachment to its current target.
pub struct Attachment {
    agent_id: Arc<str>,
    hostname: Arc<str>,
    target: Option<Arc<TargetHandle>>,
    pub stats: Arc<Stats>,
    offset_ns: Arc<AtomicI64>,
    /// Why the target could not be opened.
    pub unavailable: Option<String>,
    /// Whether its packets are deduplicated against other agents' (the policy's `dedup`).
    dedup: bool,
}

/// `path` with `.REPLICA` before its extension (`captures/web.pcapng` → `captures/web.r1.pcapng`;
/// without an extension, at the end). Replica names are checked to be file-name safe (`replica`).
pub fn replica_file(path: &str, replica: &str) -> String {
    let p = std::path::Path::new(path);
    let (Some(stem), ext) = (
        p.file_stem().and_then(|s| s.to_str()),
        p.extension().and_then(|e| e.to_str()),
    ) else {
        return format!("{path}.{replica}");
    };
    let name = match ext {
        Some(ext) => format!("{stem}.{replica}.{ext}"),
        None => format!("{stem}.{replica}"),
    };
    match p.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir.join(name).to_string_lossy().into_owned(),
        None => name,
    }
}

/// A key that tells two targets apart by every setting, not only by their display form.
fn key(target: &Target) -> String {
    format!("{target:?}")
}

impl Mirrors {
    pub fn new(state_dir: PathBuf, health: crate::health::Health) -> Self {
        Self {
            inner: Arc::default(),
            state_dir,
            health,
            replica: None,
        }
    }

    /// With replicas: `pcap:` files written here carry `replica` in their names, so that two
    /// replicas never write one file (a shared volume) and an operator knows whose file it is.
    pub fn naming_files_after(mut self, replica: &str) -> Self {
        self.replica = Some(replica.into());
        self
    }

    /// Counts a new Mirror stream of `agent_id`, unless it already has `limit` open: then `Err`
    /// with how many it has.
    pub fn open_stream(&self, agent_id: &str, limit: usize) -> Result<StreamSlot, usize> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let open = inner.streams.get(agent_id).copied().unwrap_or(0);
        if open >= limit {
            inner.streams_refused += 1;
            return Err(open);
        }
        *inner.streams.entry(agent_id.to_string()).or_default() += 1;
        Ok(StreamSlot {
            inner: self.inner.clone(),
            agent_id: agent_id.to_string(),
        })
    }

    /// Mirror streams refused so far because their agent had as many open as allowed.
    pub fn streams_refused(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .streams_refused
    }

    /// Batches dropped whole because their agent had no route to a target (`no_route`).
    pub fn batches_no_route(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .batches_no_route
    }

    /// The attachments a batch of `policy_version` from `agent_id` goes to: `route`'s while it is
    /// for that version (and its targets opened, or were tried less than [`RETRY_TARGET`] ago),
    /// otherwise those to the targets `lookup` resolves now (its hostname and targets), which
    /// then become `route`. Never empty: a policy without targets has the `none` target. `None`
    /// when `lookup` finds no route (the registry does not know the agent, or its policy does not
    /// parse): the batch is dropped and counted as `no_route`, and the next batch looks again.
    pub async fn route<'a>(
        &self,
        route: &'a mut Option<Route>,
        agent_id: &str,
        policy_version: u64,
        lookup: impl Future<Output = Option<(String, Vec<Target>, bool)>>,
    ) -> Option<&'a [Attachment]> {
        let stale = route.as_ref().is_none_or(|r| {
            r.policy_version != policy_version
                || (r.attachments.iter().any(|a| a.unavailable.is_some())
                    && r.at.elapsed() >= RETRY_TARGET)
        });
        if stale {
            let Some((hostname, mut targets, dedup)) = lookup.await else {
                self.inner
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .batches_no_route += 1;
                return None;
            };
            if targets.is_empty() {
                targets.push(Target::None);
            }
            let mut attachments = Vec::with_capacity(targets.len());
            for target in &targets {
                attachments.push(self.attach(agent_id, &hostname, target, dedup).await);
            }
            *route = Some(Route {
                policy_version,
                at: tokio::time::Instant::now(),
                attachments,
            });
        }
        route.as_ref().map(|r| r.attachments.as_slice())
    }

    fn stats_for(&self, agent_id: &str, target: &Target) -> Arc<Stats> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .stats
            .entry((agent_id.to_string(), target.to_string()))
            .or_default()
            .clone()
    }

    /// Attaches agent `agent_id` to `target`, opening it if no other stream has. Opening can
    /// block (a device, a file, a name lookup), so it runs off the async threads. With `dedup`,
    /// the agent's packets are deduplicated against those of the target's other agents.
    pub async fn attach(
        &self,
        agent_id: &str,
        hostname: &str,
        target: &Target,
        dedup: bool,
    ) -> Attachment {
        let stats = self.stats_for(agent_id, target);
        let k = key(target);
        let existing = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.targets.get(&k).and_then(Weak::upgrade)
        };
        let mut attachment = Attachment {
            agent_id: agent_id.into(),
            hostname: hostname.into(),
            target: existing,
            stats,
            offset_ns: self.health.offset(agent_id),
            unavailable: None,
            dedup,
        };
        if attachment.target.is_some() {
            attachment.note_target();
            return attachment;
        }
        let t = match (target, &self.replica) {
            (
                Target::Pcap {
                    path,
                    rotate_bytes,
                    rotate_interval,
                },
                Some(replica),
            ) => Target::Pcap {
                path: replica_file(path, replica),
                rotate_bytes: *rotate_bytes,
                rotate_interval: *rotate_interval,
            },
            _ => target.clone(),
        };
        if let (Target::Pcap { path, .. }, Some(replica)) = (&t, &self.replica) {
            tracing::info!(agent = %agent_id, target = %target, file = %path, %replica, "this replica writes the capture file named after it");
        }
        let dir = self.state_dir.clone();
        let opened = tokio::task::spawn_blocking(move || targets::open(&t, &dir)).await;
        match opened {
            Ok(Ok(writer)) => {
                let handle = Arc::new(spawn_writer(writer, target.to_string()));
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                // Another stream may have opened it meanwhile: use theirs, close ours.
                if let Some(theirs) = inner.targets.get(&k).and_then(Weak::upgrade) {
                    attachment.target = Some(theirs);
                } else {
                    inner.targets.insert(k, Arc::downgrade(&handle));
                    attachment.target = Some(handle);
                }
                tracing::info!(agent = %agent_id, target = %target, "mirror target attached");
            }
            // Another stream may have opened it meanwhile, and a TAP device takes one writer.
            Ok(Err(_))
                if let Some(theirs) = self
                    .inner
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .targets
                    .get(&k)
                    .and_then(Weak::upgrade) =>
            {
                attachment.target = Some(theirs);
            }
            Ok(Err(e)) => {
                let reason = e.to_string();
                tracing::warn!(agent = %agent_id, target = %target, error = %reason, "mirror target unavailable; packets are dropped and counted");
                attachment.stats.set_error(reason.clone());
                attachment.unavailable = Some(reason);
            }
            Err(e) => attachment.unavailable = Some(format!("opening {target} panicked: {e}")),
        }
        attachment.note_target();
        attachment
    }

    /// The delay histogram of every agent and target, keyed like [`Mirrors::stats`].
    pub fn delays(&self) -> BTreeMap<(String, String), HistogramSnapshot> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .stats
            .iter()
            .map(|(key, s)| (key.clone(), s.delay.snapshot()))
            .collect()
    }

    pub fn stats(&self) -> Vec<StatsView> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .stats
            .iter()
            .map(|((agent, target), s)| {
                let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
                StatsView {
                    agent: agent.clone(),
                    target: target.clone(),
                    batches: get(&s.batches),
                    batches_lost: get(&s.batches_lost),
                    packets_received: get(&s.received),
                    bytes_received: get(&s.received_bytes),
                    packets_written: get(&s.written),
                    bytes_written: get(&s.written_bytes),
                    dropped: BTreeMap::from([
                        ("queue", get(&s.dropped_queue)),
                        ("oversize", get(&s.dropped_oversize)),
                        ("failed", get(&s.dropped_failed)),
                        ("invalid", get(&s.dropped_invalid)),
                        ("target_unavailable", get(&s.dropped_unavailable)),
                        ("duplicate", get(&s.dropped_duplicate)),
                    ]),
                    dedup_evicted: get(&s.dedup_evicted),
                    lost_in_transit: get(&s.lost_in_transit),
                    invalid_batches: [
                        (Field::Sequence, &s.invalid_sequence),
                        (Field::Time, &s.invalid_time),
                        (Field::Counters, &s.invalid_counters),
                    ]
                    .into_iter()
                    .map(|(field, c)| (field.label(), get(c)))
                    .collect(),
                    last_error: s.last_error.lock().ok().and_then(|e| e.clone()),
                    target_note: s.target_note.lock().ok().and_then(|n| *n),
                    delay_p50_us: s.delay.quantile(0.5),
                    delay_p99_us: s.delay.quantile(0.99),
                    direct: false,
                }
            })
            .collect()
    }
}

/// Hands a batch to every attachment of a route: each target gets the same packets (their
/// bytes are shared, not copied) and counts them on its own; a slow one drops at its own queue.
pub fn submit_all(attachments: &[Attachment], batch: proto::MirrorBatch, observe_delay: bool) {
    let Some((last, others)) = attachments.split_last() else {
        return;
    };
    for a in others {
        a.submit(batch.clone(), observe_delay);
    }
    last.submit(batch, observe_delay);
}

impl TargetHandle {
    /// Takes out of `batch` the packets another agent brought first; returns how many. The keys
    /// are computed before the table is locked, so streams hash in parallel.
    fn deduplicate(
        &self,
        source: Source,
        batch: &mut proto::MirrorBatch,
        offset_ns: i64,
        stats: &Stats,
    ) -> u64 {
        let keys: Vec<Option<u64>> = batch
            .packets
            .iter()
            .map(|p| self.fingerprints.key(batch.linktype, &p.data))
            .collect();
        if keys.iter().all(Option::is_none) {
            return 0;
        }
        let mut deliver = Vec::with_capacity(keys.len());
        let mut evicted = 0;
        {
            let mut table = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
            let now = monotonic_ns();
            for (p, key) in batch.packets.iter().zip(&keys) {
                let Some(key) = key else {
                    deliver.push(true);
                    continue;
                };
                // The capture time on our clock: the agent's minus its offset.
                let captured = i64::try_from(p.timestamp_unix_nanos)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(offset_ns);
                let admitted = table.admit(*key, source, captured, now);
                evicted += admitted.evicted;
                deliver.push(admitted.deliver);
            }
        }
        Stats::add(&stats.dedup_evicted, evicted);
        let duplicates = deliver.iter().filter(|d| !**d).count() as u64;
        if duplicates > 0 {
            let mut keep = deliver.into_iter();
            batch.packets.retain(|_| keep.next().unwrap_or(true));
        }
        duplicates
    }
}

/// Nanoseconds on a clock that never goes back, from its first reading in this process.
fn monotonic_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let epoch = EPOCH.get_or_init(std::time::Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

impl Attachment {
    /// Which agent its packets come from, for deduplication: the same for all its streams.
    fn source(&self) -> Source {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        BuildHasherDefault::<DefaultHasher>::default().hash_one(&*self.agent_id)
    }

    /// Records how its target was opened in its counters, for operators.
    fn note_target(&self) {
        if let (Some(target), Ok(mut note)) = (&self.target, self.stats.target_note.lock()) {
            *note = target.note;
        }
    }

    /// The agent's clock minus ours, in ns, as last measured.
    pub fn offset_ns(&self) -> i64 {
        self.offset_ns.load(Ordering::Relaxed)
    }

    /// Hands a batch's packets to the target's writer, or counts why it cannot. Their delay is
    /// recorded once written if `observe_delay`: a batch whose times are not believed is still
    /// delivered.
    pub fn submit(&self, mut batch: proto::MirrorBatch, observe_delay: bool) {
        let n = batch.packets.len() as u64;
        let mut bytes: u64 = batch.packets.iter().map(|p| p.data.len() as u64).sum();
        let s = &self.stats;
        Stats::add(&s.received, n);
        Stats::add(&s.received_bytes, bytes);
        let Some(target) = &self.target else {
            Stats::add(&s.dropped_unavailable, n);
            return;
        };
        if self.dedup {
            let offset_ns = self.offset_ns.load(Ordering::Relaxed);
            let duplicates = target.deduplicate(self.source(), &mut batch, offset_ns, s);
            if duplicates > 0 {
                Stats::add(&s.dropped_duplicate, duplicates);
                if batch.packets.is_empty() {
                    return;
                }
                bytes = batch.packets.iter().map(|p| p.data.len() as u64).sum();
            }
        }
        let job = Job {
            agent_id: self.agent_id.clone(),
            hostname: self.hostname.clone(),
            interface: batch.interface,
            linktype: batch.linktype,
            snaplen: batch.snaplen,
            packets: batch.packets,
            bytes,
            stats: self.stats.clone(),
            offset_ns: self.offset_ns.load(Ordering::Relaxed),
            observe_delay,
        };
        let shared = &target.shared;
        if shared.inline
            && job.packets.len() <= INLINE_PACKETS
            && shared.pending.load(Ordering::Acquire) == 0
            && let Ok(mut writer) = shared.writer.try_lock()
            && shared.pending.load(Ordering::Acquire) == 0
        {
            write_job(&mut **writer, &job);
            return;
        }
        if target.queued_bytes.load(Ordering::Relaxed) + bytes > QUEUE_BYTES {
            Stats::add(&s.dropped_queue, n);
            return;
        }
        target.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        shared.pending.fetch_add(1, Ordering::AcqRel);
        if let Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) =
            target.tx.try_send(job)
        {
            target.queued_bytes.fetch_sub(job.bytes, Ordering::Relaxed);
            shared.pending.fetch_sub(1, Ordering::AcqRel);
            Stats::add(&s.dropped_queue, n);
        }
    }
}

fn spawn_writer(writer: Box<dyn Writer>, name: String) -> TargetHandle {
    let (tx, rx) = sync_channel(QUEUE_JOBS);
    let note = writer.note();
    let queued_bytes = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared {
        inline: writer.quick(),
        writer: Mutex::new(writer),
        pending: AtomicUsize::new(0),
    });
    let (q, s) = (queued_bytes.clone(), shared.clone());
    let spawned = std::thread::Builder::new()
        .name("mirror-writer".into())
        .spawn(move || write_loop(&s, rx, q, name));
    if let Err(e) = spawned {
        // The receiver went with the closure: every job will count as a queue drop.
        tracing::error!(error = %e, "cannot start a mirror writer thread");
    }
    TargetHandle {
        tx,
        queued_bytes,
        shared,
        note,
        fingerprints: Fingerprints::default(),
        dedup: Mutex::new(Dedup::default()),
    }
}

/// Writes one job and counts what became of its packets.
fn write_job(writer: &mut dyn Writer, job: &Job) {
    let origin = Origin {
        agent_id: &job.agent_id,
        hostname: &job.hostname,
        interface: &job.interface,
        linktype: job.linktype,
        snaplen: job.snaplen,
    };
    let w = writer.write(&origin, &job.packets);
    let now = tapgraph::time::unix_nanos();
    let s = &job.stats;
    Stats::add(&s.written, w.packets);
    Stats::add(&s.written_bytes, w.bytes);
    Stats::add(&s.dropped_oversize, w.oversize);
    Stats::add(&s.dropped_failed, w.failed);
    if let Some(error) = w.error {
        s.set_error(error);
    }
    if !job.observe_delay {
        return;
    }
    // Our clock at write minus the capture time moved to our clock (agent − offset).
    let now = i128::from(now) + i128::from(job.offset_ns);
    s.delay.record_all(
        job.packets
            .iter()
            .map(|p| ((now - i128::from(p.timestamp_unix_nanos)).max(0) / 1_000) as u64),
    );
}

fn write_loop(shared: &Shared, rx: Receiver<Job>, queued: Arc<AtomicU64>, name: String) {
    tapgraph::runtime::realtime_thread("mirror-writer");
    let lock = || shared.writer.lock().unwrap_or_else(|e| e.into_inner());
    let mut dirty = false;
    loop {
        let job = match rx.recv_timeout(IDLE_FLUSH) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                if dirty {
                    flush(&mut **lock(), &name);
                    dirty = false;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        queued.fetch_sub(job.bytes, Ordering::Relaxed);
        let mut writer = lock();
        write_job(&mut **writer, &job);
        // Under the lock: a stream that sees no job pending knows this one is written.
        shared.pending.fetch_sub(1, Ordering::Release);
        drop(writer);
        dirty = true;
    }
    flush(&mut **lock(), &name);
    tracing::info!(target = %name, "mirror target closed");
}

fn flush(writer: &mut dyn Writer, name: &str) {
    if let Err(e) = writer.flush() {
        tracing::warn!(target = %name, error = %e, "mirror target flush failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::targets::Written;

    /// A quick target that records the first byte of each packet; its first write waits for
    /// `gate`, as a slow write would.
    struct Recorder {
        seen: Arc<Mutex<Vec<u8>>>,
        gate: Option<Receiver<()>>,
    }

    impl Writer for Recorder {
        fn write(&mut self, _: &Origin<'_>, packets: &[proto::Packet]) -> Written {
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            let mut seen = self.seen.lock().unwrap();
            seen.extend(packets.iter().map(|p| p.data[0]));
            Written {
                packets: packets.len() as u64,
                ..Written::default()
            }
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }

        fn quick(&self) -> bool {
            true
        }
    }

    fn batch(mark: u8, packets: usize) -> proto::MirrorBatch {
        proto::MirrorBatch {
            linktype: 1,
            packets: (0..packets)
                .map(|_| proto::Packet {
                    timestamp_unix_nanos: 1,
                    original_length: 60,
                    data: vec![mark; 60].into(),
                })
                .collect(),
            ..proto::MirrorBatch::default()
        }
    }

    #[test]
    fn small_batches_are_written_inline_only_when_nothing_is_queued_so_order_holds() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (open, gate) = sync_channel(1);
        let recorder = Recorder {
            seen: seen.clone(),
            gate: Some(gate),
        };
        let attachment = Attachment {
            agent_id: "a1".into(),
            hostname: "web-1".into(),
            target: Some(Arc::new(spawn_writer(Box::new(recorder), "test".into()))),
            stats: Arc::default(),
            offset_ns: Arc::default(),
            unavailable: None,
            dedup: true,
        };
        // Too large to write inline: queued, and its write waits at the gate.
        attachment.submit(batch(1, INLINE_PACKETS + 1), true);
        // Small, but a batch is pending: it must queue behind it, not overtake it.
        attachment.submit(batch(2, 1), true);
        assert!(seen.lock().unwrap().is_empty());
        open.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().len() < INLINE_PACKETS + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer thread stalled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Nothing pending now: a small batch is written before `submit` returns.
        attachment.submit(batch(3, 2), true);
        let seen = seen.lock().unwrap().clone();
        let mut want = vec![1; INLINE_PACKETS + 1];
        want.extend([2, 3, 3]);
        assert_eq!(seen, want);
        assert_eq!(
            attachment.stats.written.load(Ordering::Relaxed),
            INLINE_PACKETS as u64 + 4
        );
    }

    fn attach(writer: Recorder) -> Attachment {
        Attachment {
            agent_id: "a1".into(),
            hostname: "web-1".into(),
            target: Some(Arc::new(spawn_writer(Box::new(writer), "test".into()))),
            stats: Arc::default(),
            offset_ns: Arc::default(),
            unavailable: None,
            dedup: true,
        }
    }

    /// Two targets of one policy: the first stalls on its first write. The stream never waits
    /// for it, the other target gets every packet at once, and only the stalled one drops (at
    /// its own queue, counted).
    #[test]
    fn a_slow_target_holds_up_neither_the_stream_nor_the_other_targets() {
        let (slow_seen, fast_seen) = (Arc::default(), Arc::default());
        let (open, gate) = sync_channel(1);
        let both = [
            attach(Recorder {
                seen: Arc::clone(&slow_seen),
                gate: Some(gate),
            }),
            attach(Recorder {
                seen: Arc::clone(&fast_seen),
                gate: None,
            }),
        ];
        let (rounds, per) = (QUEUE_JOBS + 100, INLINE_PACKETS + 1);
        for i in 0..rounds {
            submit_all(&both, batch(i as u8, per), true);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fast_seen.lock().unwrap().len() < rounds * per {
            assert!(
                std::time::Instant::now() < deadline,
                "the fast target stalled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let count =
            |a: &Attachment, c: fn(&Stats) -> &AtomicU64| c(&a.stats).load(Ordering::Relaxed);
        assert_eq!(count(&both[1], |s| &s.dropped_queue), 0);
        assert_eq!(count(&both[1], |s| &s.written), (rounds * per) as u64);
        let slow_dropped = count(&both[0], |s| &s.dropped_queue);
        assert!(slow_dropped > 0, "the stalled target's queue never filled");
        assert!(slow_seen.lock().unwrap().is_empty());
        // Released, the slow one writes what it queued: every packet is accounted for.
        open.send(()).unwrap();
        while count(&both[0], |s| &s.written) + slow_dropped < (rounds * per) as u64 {
            assert!(
                std::time::Instant::now() < deadline,
                "the slow target never drained"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// One IPv4 UDP packet with this TTL, in an Ethernet frame whose MACs are `mark`.
    fn udp_batch(mark: u8, ttl: u8) -> proto::MirrorBatch {
        let mut data = vec![mark; 12];
        data.extend([0x08, 0x00, 0x45, 0, 0, 30, 0, 1, 0, 0, ttl, 17, 0, 0]);
        data.extend([
            10, 0, 0, 1, 10, 0, 0, 2, 0x13, 0x88, 0x17, 0x70, 0, 10, 0, 0, 0xaa, 0xbb,
        ]);
        proto::MirrorBatch {
            linktype: 1,
            packets: vec![proto::Packet {
                timestamp_unix_nanos: 1_000_000_000,
                original_length: data.len() as u32,
                data: data.into(),
            }],
            ..proto::MirrorBatch::default()
        }
    }

    /// Both ends of a connection send the target the same packet: it is written once, the other
    /// copy counts as a duplicate (and as received, so the stream's loss accounting holds). An
    /// agent whose policy turns dedup off has every packet written.
    #[test]
    fn a_target_fed_by_two_agents_writes_each_packet_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let target = Arc::new(spawn_writer(
            Box::new(Recorder {
                seen: seen.clone(),
                gate: None,
            }),
            "test".into(),
        ));
        let on = |agent: &str, dedup| Attachment {
            agent_id: agent.into(),
            hostname: agent.into(),
            target: Some(target.clone()),
            stats: Arc::default(),
            offset_ns: Arc::default(),
            unavailable: None,
            dedup,
        };
        let (sender, receiver, other) = (on("a1", true), on("a2", true), on("a3", false));
        sender.submit(udp_batch(1, 64), true);
        receiver.submit(udp_batch(2, 63), true);
        // The same agent again: a retransmission, delivered.
        sender.submit(udp_batch(1, 64), true);
        other.submit(udp_batch(3, 62), true);
        let count =
            |a: &Attachment, c: fn(&Stats) -> &AtomicU64| c(&a.stats).load(Ordering::Relaxed);
        assert_eq!(*seen.lock().unwrap(), vec![1, 1, 3]);
        assert_eq!(count(&receiver, |s| &s.dropped_duplicate), 1);
        assert_eq!(count(&receiver, |s| &s.received), 1);
        assert_eq!(count(&receiver, |s| &s.written), 0);
        assert_eq!(count(&sender, |s| &s.written), 2);
        assert_eq!(count(&other, |s| &s.dropped_duplicate), 0);
    }

    #[test]
    fn a_replica_s_name_goes_before_the_extension() {
        assert_eq!(replica_file("web.pcapng", "r1"), "web.r1.pcapng");
        assert_eq!(
            replica_file("caps/web.pcapng", "r-2"),
            "caps/web.r-2.pcapng"
        );
        assert_eq!(replica_file("/abs/dir/x", "a.b"), "/abs/dir/x.a.b");
        assert_eq!(replica_file("noext", "r1"), "noext.r1");
    }

    /// With replicas, each writes its own file, named after it, beside where the policy said.
    #[tokio::test]
    async fn with_replicas_a_pcap_target_writes_a_file_named_after_the_replica() {
        let dir = tempfile::tempdir().unwrap();
        let mirrors = Mirrors::new(dir.path().to_path_buf(), crate::health::Health::default())
            .naming_files_after("r2");
        let mut route = None;
        let target: Target = "pcap:caps.pcapng".parse().unwrap();
        let found = async { Some(("web-1".to_string(), vec![target], true)) };
        let attachment = &mirrors.route(&mut route, "a1", 1, found).await.unwrap()[0];
        assert!(
            attachment.unavailable.is_none(),
            "{:?}",
            attachment.unavailable
        );
        assert!(dir.path().join("caps.r2.pcapng").exists());
        assert!(!dir.path().join("caps.pcapng").exists());
    }

    #[tokio::test]
    async fn a_batch_without_a_route_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mirrors = Mirrors::new(dir.path().to_path_buf(), crate::health::Health::default());
        let mut route = None;
        // The registry knows no route for the agent: the batch is dropped and counted.
        assert!(
            mirrors
                .route(&mut route, "a1", 1, async { None })
                .await
                .is_none()
        );
        assert_eq!(mirrors.batches_no_route(), 1);
        // With a route, batches of that version go to its target and nothing more is dropped.
        let found = async { Some(("web-1".to_string(), vec![], true)) };
        assert!(mirrors.route(&mut route, "a1", 1, found).await.is_some());
        let looked = std::sync::atomic::AtomicBool::new(false);
        let again = async {
            looked.store(true, Ordering::Relaxed);
            None
        };
        assert!(mirrors.route(&mut route, "a1", 1, again).await.is_some());
        assert!(
            !looked.load(Ordering::Relaxed),
            "a current route is looked up again"
        );
        assert_eq!(mirrors.batches_no_route(), 1);
        // A new policy version with no route: dropped and counted, however the old one was.
        assert!(
            mirrors
                .route(&mut route, "a1", 2, async { None })
                .await
                .is_none()
        );
        assert_eq!(mirrors.batches_no_route(), 2);
    }

    /// A target that cannot be opened is tried again after [`RETRY_TARGET`], not for every
    /// batch; an open one is kept for as long as the policy version holds.
    #[tokio::test(start_paused = true)]
    async fn an_unavailable_target_is_tried_again_after_a_while_not_per_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mirrors = Mirrors::new(dir.path().to_path_buf(), crate::health::Health::default());
        let missing = async {
            Some((
                "web-1".to_string(),
                vec![Target::Interface("tg-missing0".into())],
                true,
            ))
        };
        let (mut broken, mut working) = (None, None);
        let attached = mirrors.route(&mut broken, "a1", 1, missing).await.unwrap();
        assert!(attached[0].unavailable.is_some());
        let found = async { Some(("web-2".to_string(), vec![Target::None], true)) };
        let attached = mirrors.route(&mut working, "a2", 1, found).await.unwrap();
        assert!(attached[0].unavailable.is_none());
        let looked = std::sync::atomic::AtomicBool::new(false);
        let look = || async {
            looked.store(true, Ordering::Relaxed);
            None
        };
        tokio::time::advance(RETRY_TARGET - Duration::from_millis(1)).await;
        assert!(mirrors.route(&mut broken, "a1", 1, look()).await.is_some());
        assert!(!looked.load(Ordering::Relaxed), "retried too soon");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(mirrors.route(&mut working, "a2", 1, look()).await.is_some());
        assert!(
            !looked.load(Ordering::Relaxed),
            "an open target is looked up again"
        );
        // Time to retry the unavailable one: looked up again (and now there is no route).
        assert!(mirrors.route(&mut broken, "a1", 1, look()).await.is_none());
        assert!(looked.load(Ordering::Relaxed));
        assert_eq!(mirrors.batches_no_route(), 1);
    }
}
