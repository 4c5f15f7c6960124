//! The topology task: owns the dependency map. Snapshots arrive as messages from agent sessions;
//! each is validated, applied to the model and written through to the state store, so a restart
//! loses nothing. Queries read the model; nothing else touches it.

pub mod graph;
pub mod labels;
pub mod model;
pub mod names;
pub mod view;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redb::TableDefinition;
use serde::{Deserialize, Serialize};
use tapgraph::proto;
use tokio::sync::{mpsc, oneshot};

use crate::events::Events;
use crate::store::{Batch, Store, StoreError, Table};
use model::{
    AgentTable, Changes, Conflict, Direction, Edge, Invalid, ListenerKey, Model, ObsKey, ObsValue,
    Protocol,
};

const AGENTS: Table = TableDefinition::new("topology_agents");
const EDGES: Table = TableDefinition::new("topology_edges");

/// What names and labels the map's nodes at query time: rules from configuration, rules from
/// operators (they win a tie), reverse-DNS names, and each agent's state on its Host node.
#[derive(Clone)]
pub struct Naming {
    pub config_rules: labels::LabelRules,
    pub operator_rules: labels::OperatorRules,
    pub names: names::Names,
    pub agents: crate::health::Health,
}

/// Limits and timings of the map.
#[derive(Debug, Clone, Copy)]
pub struct TopologySettings {
    /// An edge unseen this long turns inactive.
    pub ttl: Duration,
    /// An inactive edge is removed this long after it was last seen.
    pub retention: Duration,
    /// Largest number of rows in one snapshot; a larger one is refused.
    pub max_entries: usize,
    /// Rows the whole fleet's map may hold (entries, listeners and addresses of every agent's
    /// table). A snapshot that would grow the map past it is refused; one that keeps or shrinks
    /// its agent's table is always taken.
    pub max_rows: usize,
    /// Snapshots waiting to be applied at most. Beyond, the controller is overloaded: a snapshot
    /// is shed at once (the agent is asked for a full resync later) instead of piling up.
    pub queue: usize,
}

/// Why a snapshot was not applied. The session asks the agent for a full resync after any of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "delta based on snapshot {base}, but the last applied is {have:?}: a full resync is needed"
    )]
    SequenceGap { base: u64, have: Option<u64> },
    #[error("snapshot has {rows} rows; at most {max} are accepted")]
    TooLarge { rows: usize, max: usize },
    #[error("{0}")]
    Store(String),
    #[error(
        "controller busy: {queued} snapshots are waiting (topology.queue); this one was shed, send a full one later"
    )]
    Busy { queued: usize },
    #[error(
        "the fleet's map would hold {rows} rows, over its budget of {max} (topology.max_rows): snapshot refused, the map keeps this agent's previous table"
    )]
    OverBudget { rows: usize, max: usize },
}

impl Refusal {
    /// Whether the agent should be asked for a full snapshot after this refusal. A full snapshot
    /// refused for the budget is not: the agent would send it again at once, and again be
    /// refused. Its next delta is refused with the budget named, and that asks for a full one.
    pub fn asks_resync(&self, full: bool) -> bool {
        !(full && matches!(self, Refusal::OverBudget { .. }))
    }
}

/// Counters of what arrived and what was refused or skipped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub snapshots_applied: u64,
    pub snapshots_refused_gap: u64,
    pub snapshots_refused_size: u64,
    /// Refused because the fleet's map would pass `topology.max_rows`.
    pub snapshots_refused_budget: u64,
    /// Shed because the controller was overloaded (the queue was full).
    pub snapshots_shed_busy: u64,
    pub rows_skipped: u64,
    /// `rows_skipped` by [`Invalid::reason`].
    pub rows_skipped_by_reason: BTreeMap<&'static str, u64>,
    pub store_errors: u64,
    /// Rows the map holds now, and its budget (`topology.max_rows`).
    pub rows: u64,
    pub max_rows: u64,
    /// Addresses claimed by more than one host now.
    pub address_conflicts: u64,
}

/// Persisted per agent: its table and the last sequence applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AgentRecord {
    id: String,
    sequence: u64,
    table: AgentTable,
}

/// An [`AgentRecord`] as written: the table is serialized where the model holds it, not copied.
#[derive(Serialize)]
struct AgentRecordRef<'a> {
    id: &'a str,
    sequence: u64,
    table: &'a AgentTable,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EdgeRecord {
    id: String,
    edge: Edge,
}

/// What an operator asks of the map.
#[derive(Debug, Clone, Default)]
pub struct GraphQuery {
    pub include_control: bool,
    pub include_inactive: bool,
}

enum Command {
    Snapshot {
        agent: String,
        hostname: String,
        snapshot: Box<proto::ConnectionSnapshot>,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    Map {
        query: GraphQuery,
        reply: oneshot::Sender<graph::Graph>,
    },
    Stats {
        reply: oneshot::Sender<Stats>,
    },
}

/// The handle to the map: one task owns the model ([`Topology::spawn`] starts it) and this
/// handle, cloned freely, only sends it messages.
///
/// Guarantees: snapshots wait in one bounded queue (`topology.queue`) and are applied in the
/// order they arrive; when the queue is full a snapshot is shed at once with
/// [`Refusal::Busy`] and counted (`snapshots_shed_busy`, `reason="busy"` on
/// `tapgraph_topology_snapshots_refused`), so an overloaded map never holds up a session.
/// A snapshot is answered once it is in the model and committed to the store (a commit is
/// durable within [`SYNC_EVERY`]). Queries wait for room instead of being shed;
/// [`Topology::map`] answers with the typed map as of every snapshot answered before it.
#[derive(Clone)]
pub struct Topology {
    tx: mpsc::Sender<Command>,
    /// Bumped whenever the model changes: readers that mirror it can skip a pass when it did not.
    generation: Arc<AtomicU64>,
    /// Snapshots shed because the queue was full.
    shed: Arc<AtomicU64>,
}

fn now_ms() -> u64 {
    tapgraph::time::unix_nanos() / 1_000_000
}

impl Topology {
    /// Loads the persisted map and starts the task. Address conflicts and refusals for the
    /// budget go to `events`.
    pub fn spawn(
        store: Store,
        settings: TopologySettings,
        events: Events,
    ) -> Result<(Self, impl std::future::Future<Output = ()>), StoreError> {
        let mut model = Model::default();
        for record in store.load::<EdgeRecord>(EDGES)? {
            model.restore_edge(record.edge);
        }
        let mut sequences = BTreeMap::new();
        let now = now_ms();
        // Claim order is not stored: the tables come back in agent-id order, so of two hosts
        // claiming an address the first by id owns it now. The conflicts found are announced
        // once the task runs, so a restart does not move an address silently.
        let mut tables = Vec::new();
        for mut record in store.load::<AgentRecord>(AGENTS)? {
            record.table.last_snapshot_ms = record.table.last_snapshot_ms.min(now);
            sequences.insert(record.id.clone(), record.sequence);
            tables.push((record.id, record.table));
        }
        let restored_conflicts = model.restore_tables(tables);
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let generation = Arc::new(AtomicU64::new(1));
        let task = Task {
            events,
            announced: Announced::default(),
            restored_conflicts,
            over_budget: BTreeMap::new(),
            collect_due: false,
            synced: std::time::Instant::now(),
            deferred: false,
            generation: generation.clone(),
            model,
            sequences,
            store,
            settings,
            stats: Stats::default(),
        };
        let shed = Arc::new(AtomicU64::new(0));
        Ok((
            Self {
                tx,
                generation,
                shed,
            },
            task.run(rx),
        ))
    }

    /// Changes when the model does (snapshots applied, edges expired).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Applies a snapshot from `agent` (the id of its verified certificate); `hostname` is what
    /// its Hello said.
    pub async fn snapshot(
        &self,
        agent: &str,
        hostname: &str,
        snapshot: proto::ConnectionSnapshot,
    ) -> Result<(), Refusal> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Snapshot {
            agent: agent.to_string(),
            hostname: hostname.to_string(),
            snapshot: Box::new(snapshot),
            reply,
        };
        match self.tx.try_send(cmd) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shed.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::Busy {
                    queued: self.tx.max_capacity(),
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                return Err(Refusal::Store("topology task stopped".into()));
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(Refusal::Store("topology task stopped".into())))
    }

    /// The map for `query`, undecorated (see [`view::map`]); empty if the task has stopped.
    pub async fn map(&self, query: GraphQuery) -> graph::Graph {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Map { query, reply }).await;
        rx.await.unwrap_or_default()
    }

    pub async fn stats(&self) -> Stats {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Stats { reply }).await;
        let mut stats = rx.await.unwrap_or_default();
        stats.snapshots_shed_busy = self.shed.load(Ordering::Relaxed);
        stats
    }
}

struct Task {
    events: Events,
    /// Address conflicts announced lately, not announced again for a while.
    announced: Announced,
    /// Address conflicts the restore found, announced when the task starts.
    restored_conflicts: Vec<Conflict>,
    /// Agents whose last snapshot was refused for the budget, and the rows the map would have
    /// held: their deltas are refused naming the budget until a full snapshot fits.
    over_budget: BTreeMap<String, usize>,
    /// A large snapshot was applied: hand the memory it freed back to the system when idle.
    collect_due: bool,
    /// The last durable commit of the map, and whether deferred commits came after it.
    synced: std::time::Instant,
    deferred: bool,
    generation: Arc<AtomicU64>,
    model: Model,
    sequences: BTreeMap<String, u64>,
    store: Store,
    settings: TopologySettings,
    stats: Stats,
}

fn malformed(field: &'static str, value: impl ToString) -> Invalid {
    Invalid::Malformed {
        field,
        value: value.to_string(),
    }
}

fn ip(field: &'static str, text: &str) -> Result<IpAddr, Invalid> {
    text.parse().map_err(|_| malformed(field, text))
}

fn port(field: &'static str, value: u32) -> Result<u16, Invalid> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or(Invalid::Port { field, value })
}

/// Converts one wire row; a row carrying a value no host reports is refused (counted, skipped).
/// A removed row only needs to parse: it can only remove what was accepted.
fn row(e: &proto::ConnectionEntry, removed: bool) -> Result<(ObsKey, ObsValue), Invalid> {
    let direction = match proto::Direction::try_from(e.direction) {
        Ok(proto::Direction::Client) => Direction::Client,
        Ok(proto::Direction::Server) => Direction::Server,
        _ => return Err(malformed("direction", e.direction)),
    };
    let protocol = protocol(e.protocol)?;
    let name = e.process.as_ref().map(|p| p.name.as_str()).unwrap_or("");
    model::check_name("process name", name)?;
    model::check_name("container", &e.container)?;
    // In scope `all` the container says more than the program: `redis-server (docker:4f1c2e9a7b3d)`.
    let process = if e.container.is_empty() {
        name.into()
    } else {
        format!("{name} ({})", e.container).into()
    };
    let key = ObsKey {
        netns: e.netns.as_str().into(),
        direction,
        local_ip: ip("local_ip", &e.local_ip)?,
        remote_ip: ip("remote_ip", &e.remote_ip)?,
        server_port: port("server_port", e.server_port)?,
        protocol,
        process,
    };
    let value = ObsValue {
        sockets: e.sockets.max(1),
        control_plane: e.control_plane,
        short_lived: e.short_lived,
    };
    if !removed {
        model::check_row(&key, &value)?;
    }
    Ok((key, value))
}

fn protocol(p: i32) -> Result<Protocol, Invalid> {
    match proto::Protocol::try_from(p) {
        Ok(proto::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(proto::Protocol::Udp) => Ok(Protocol::Udp),
        _ => Err(malformed("protocol", p)),
    }
}

fn listener(l: &proto::ListeningService) -> Result<(ListenerKey, String), Invalid> {
    let key = ListenerKey {
        ip: ip("listener ip", &l.ip)?,
        port: port("port", l.port)?,
        protocol: protocol(l.protocol)?,
        netns: l.netns.clone(),
    };
    let process = l
        .process
        .as_ref()
        .map(|p| p.name.clone())
        .unwrap_or_default();
    model::check_listener(&key, &process)?;
    Ok((key, process))
}

/// Rows refused in one snapshot: how many, and the first one's reason.
#[derive(Default)]
struct Skipped {
    count: u64,
    first: Option<Invalid>,
}

impl Skipped {
    fn add(&mut self, stats: &mut Stats, invalid: Invalid) {
        self.count += 1;
        *stats
            .rows_skipped_by_reason
            .entry(invalid.reason())
            .or_default() += 1;
        self.first.get_or_insert(invalid);
    }
}

/// After applying snapshots that carried at least this many rows, the task hands the memory they
/// freed back to the system once it is idle.
const LARGE: usize = 10_000;

/// Hands the memory the allocator holds free back to the system. mimalloc keeps freed pages for
/// reuse and returns them only as the thread that owns them goes on allocating; after a burst of
/// large snapshots the threads that decoded and applied them may stay idle, and the controller
/// would keep the burst's high-water mark as RSS.
fn release_memory() {
    // SAFETY: `mi_collect` takes no pointer and may be called from any thread at any time; it
    // only frees what the allocator itself holds unused.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Snapshots applied in one store transaction at most. When they arrive faster than one commit
/// each can keep up with, those already waiting are applied together and written by one commit.
const GROUP: usize = 64;

/// The map's writes wait for the disk at most this often: in between, commits are deferred
/// (`Store::commit_deferred`). A crash loses at most this much of the map, which the agents send
/// again in full when they reconnect; a disk that takes 20 ms to sync no longer limits ingest to
/// a few dozen commits a second.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Where a snapshot's outcome goes, and the outcome.
type Reply = (oneshot::Sender<Result<(), Refusal>>, Result<(), Refusal>);

/// Snapshots applied and not yet written: the agents whose tables and the edges that changed.
#[derive(Default)]
struct Pending {
    agents: BTreeSet<String>,
    edges: BTreeSet<model::EdgeKey>,
    replies: Vec<Reply>,
}

impl Pending {
    fn add(&mut self, changes: Changes) {
        self.edges.extend(changes.edges_upserted);
        self.edges.extend(changes.edges_removed);
    }
}

/// Address conflicts announced at most at once (one snapshot, or the restore); the rest are
/// counted in one summary line. The map and `address_conflicts` show them all.
const CONFLICTS_SHOWN: usize = 3;

/// A conflict (address, claimant) announced is not announced again for this long: a host that
/// drops its addresses and claims them again on alternate snapshots is announced once a minute,
/// not once a cycle.
const CONFLICT_QUIET: Duration = Duration::from_secs(60);

/// Conflicts remembered at most; past it the oldest is forgotten, and may be announced again
/// sooner.
const CONFLICTS_REMEMBERED: usize = 4_096;

/// The conflicts announced within [`CONFLICT_QUIET`], oldest first.
#[derive(Default)]
struct Announced {
    order: VecDeque<((IpAddr, String), Instant)>,
    recent: HashSet<(IpAddr, String)>,
}

impl Announced {
    /// Which of `conflicts` to announce at `now`: the first [`CONFLICTS_SHOWN`] not announced
    /// within [`CONFLICT_QUIET`]; and how many were left out as announced lately. Those left
    /// out past the limit are not remembered: a later claim may announce them.
    fn select<'a>(
        &mut self,
        conflicts: &'a [Conflict],
        now: Instant,
    ) -> (Vec<&'a Conflict>, usize) {
        while let Some((key, at)) = self.order.front() {
            if now.saturating_duration_since(*at) < CONFLICT_QUIET
                && self.order.len() < CONFLICTS_REMEMBERED
            {
                break;
            }
            self.recent.remove(key);
            self.order.pop_front();
        }
        let mut shown = Vec::new();
        let mut quiet = 0;
        for c in conflicts {
            let key = (c.address, c.claimant.clone());
            if self.recent.contains(&key) {
                quiet += 1;
                continue;
            }
            if shown.len() == CONFLICTS_SHOWN {
                continue;
            }
            if self.order.len() == CONFLICTS_REMEMBERED
                && let Some((old, _)) = self.order.pop_front()
            {
                self.recent.remove(&old);
            }
            self.recent.insert(key.clone());
            self.order.push_back((key, now));
            shown.push(c);
        }
        (shown, quiet)
    }
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let restored = std::mem::take(&mut self.restored_conflicts);
        self.announce(None, &restored, Instant::now());
        let mut expiry = tokio::time::interval(Duration::from_secs(60));
        let mut sync = tokio::time::interval(SYNC_EVERY);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => {
                        self.sync();
                        return;
                    }
                    Some(Command::Snapshot { agent, hostname, snapshot, reply }) => {
                        let mut pending = Pending::default();
                        self.take(&mut pending, &agent, &hostname, &snapshot, reply);
                        // Whatever else waits joins this commit; another command ends the group.
                        let mut next = None;
                        while pending.replies.len() < GROUP {
                            match rx.try_recv() {
                                Ok(Command::Snapshot { agent, hostname, snapshot, reply }) => {
                                    self.take(&mut pending, &agent, &hostname, &snapshot, reply);
                                }
                                Ok(other) => {
                                    next = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.flush(pending);
                        if let Some(cmd) = next {
                            self.answer(cmd);
                        }
                    }
                    Some(cmd) => self.answer(cmd),
                },
                _ = sync.tick() => {
                    if self.synced.elapsed() >= SYNC_EVERY {
                        self.sync();
                    }
                    if self.collect_due && rx.is_empty() {
                        self.collect_due = false;
                        release_memory();
                    }
                }
                _ = expiry.tick() => {
                    let retention = self.settings.retention.as_millis() as u64;
                    let changes = self.model.expire(now_ms(), retention);
                    if !changes.edges_removed.is_empty() {
                        self.generation.fetch_add(1, Ordering::AcqRel);
                        tracing::info!(removed = changes.edges_removed.len(), "inactive edges past retention removed");
                        let mut pending = Pending::default();
                        pending.add(changes);
                        if let Err(error) = self.persist(&pending) {
                            tracing::error!(%error, "cannot persist expired edges");
                        }
                    }
                }
            }
        }
    }

    /// Answers a query (a snapshot here is applied and written on its own).
    fn answer(&mut self, cmd: Command) {
        match cmd {
            Command::Map { query, reply } => {
                let _ = reply.send(self.map(&query));
            }
            Command::Stats { reply } => {
                let mut stats = self.stats.clone();
                stats.rows = self.model.rows() as u64;
                stats.max_rows = self.settings.max_rows as u64;
                stats.address_conflicts = self.model.conflicts() as u64;
                let _ = reply.send(stats);
            }
            Command::Snapshot {
                agent,
                hostname,
                snapshot,
                reply,
            } => {
                let mut pending = Pending::default();
                self.take(&mut pending, &agent, &hostname, &snapshot, reply);
                self.flush(pending);
            }
        }
    }

    /// Applies one snapshot to the model; it is written, and answered, by the next
    /// [`Task::flush`].
    fn take(
        &mut self,
        pending: &mut Pending,
        agent: &str,
        hostname: &str,
        snapshot: &proto::ConnectionSnapshot,
        reply: oneshot::Sender<Result<(), Refusal>>,
    ) {
        let result = self.apply(agent, hostname, snapshot, pending);
        if let Err(refusal) = &result {
            tracing::warn!(%agent, sequence = snapshot.sequence, %refusal, "snapshot refused");
        }
        pending.replies.push((reply, result));
    }

    /// Writes what the pending snapshots changed in one transaction, then answers them.
    fn flush(&mut self, pending: Pending) {
        if pending.replies.iter().any(|(_, r)| r.is_ok()) {
            self.generation.fetch_add(1, Ordering::AcqRel);
            // The model has the snapshots. A failed write is not the agents' fault: a resync
            // would fail the same way, so it is logged for the operator and retried with the
            // next snapshots.
            if let Err(error) = self.persist(&pending) {
                self.stats.store_errors += 1;
                tracing::error!(agents = pending.agents.len(), %error, "cannot persist the map; a restart now would lose recent changes");
            }
        }
        for (reply, result) in pending.replies {
            let _ = reply.send(result);
        }
    }

    fn apply(
        &mut self,
        agent: &str,
        hostname: &str,
        s: &proto::ConnectionSnapshot,
        pending: &mut Pending,
    ) -> Result<(), Refusal> {
        let rows = s.entries.len()
            + s.removed.len()
            + s.listeners.len()
            + s.removed_listeners.len()
            + s.addresses.len();
        if rows > self.settings.max_entries {
            self.stats.snapshots_refused_size += 1;
            return Err(Refusal::TooLarge {
                rows,
                max: self.settings.max_entries,
            });
        }
        let have = self.sequences.get(agent).copied();
        if !s.full && have != Some(s.base_sequence) {
            // An agent whose full snapshot did not fit hears why, and sends another.
            if let Some(&rows) = self.over_budget.get(agent) {
                self.stats.snapshots_refused_budget += 1;
                return Err(Refusal::OverBudget {
                    rows,
                    max: self.settings.max_rows,
                });
            }
            self.stats.snapshots_refused_gap += 1;
            return Err(Refusal::SequenceGap {
                base: s.base_sequence,
                have,
            });
        }
        let now = now_ms();
        let mut table = if s.full {
            AgentTable::default()
        } else {
            self.model.agents.get(agent).cloned().unwrap_or_default()
        };
        let mut skipped = Skipped::default();
        for e in &s.removed {
            match row(e, true) {
                Ok((k, _)) => {
                    table.entries.remove(&k);
                }
                Err(invalid) => skipped.add(&mut self.stats, invalid),
            }
        }
        for e in &s.entries {
            match row(e, false) {
                Ok((k, v)) => {
                    table.entries.insert(k, v);
                }
                Err(invalid) => skipped.add(&mut self.stats, invalid),
            }
        }
        for l in &s.removed_listeners {
            if let Ok((k, _)) = listener(l) {
                table.listeners.remove(&k);
            }
        }
        for l in &s.listeners {
            match listener(l) {
                Ok((k, p)) => {
                    table.listeners.insert(k, p);
                }
                Err(invalid) => skipped.add(&mut self.stats, invalid),
            }
        }
        if s.full || !s.addresses.is_empty() {
            table.addresses.clear();
            for a in &s.addresses {
                match ip("address", a).and_then(|ip| model::check_host_address(&ip).map(|()| ip)) {
                    Ok(ip) => {
                        table.addresses.insert(ip);
                    }
                    Err(invalid) => skipped.add(&mut self.stats, invalid),
                }
            }
        }
        self.stats.rows_skipped += skipped.count;
        if let Some(first) = &skipped.first {
            tracing::warn!(%agent, sequence = s.sequence, refused = skipped.count, %first, "snapshot rows refused");
        }
        self.check_budget(agent, &table)?;
        table.last_snapshot_ms = now;
        table.hostname = hostname.to_string();
        self.collect_due |= rows >= LARGE;
        // Replacing re-attaches every row at `now`: each edge this agent still reports is marked
        // seen and listed in the changes, at a cost in this agent's rows, not the whole map's.
        let changes = self.model.replace(agent, table, now);
        self.announce(Some(agent), &changes.conflicts, Instant::now());
        self.sequences.insert(agent.to_string(), s.sequence);
        self.stats.snapshots_applied += 1;
        pending.agents.insert(agent.to_string());
        pending.add(changes);
        Ok(())
    }

    /// Announces new address conflicts as `address_conflict` events and WARN lines: at most
    /// [`CONFLICTS_SHOWN`] per snapshot (`agent`), or per restore (`None`), and none announced
    /// within [`CONFLICT_QUIET`]; one summary line counts those held back.
    fn announce(&mut self, agent: Option<&str>, conflicts: &[Conflict], now: Instant) {
        if conflicts.is_empty() {
            return;
        }
        let (shown, quiet) = self.announced.select(conflicts, now);
        let when = if agent.is_some() {
            ""
        } else {
            "after a restart, "
        };
        for c in &shown {
            tracing::warn!(address = %c.address, owner = %c.owner, claimant = %c.claimant, restored = agent.is_none(), "address claimed by two hosts; the map keeps it on the owner");
            self.events.emit_with(
                "address_conflict",
                &c.claimant,
                format!(
                    "{when}agents {} and {} both claim address {}; the map keeps it on {}",
                    c.owner, c.claimant, c.address, c.owner
                ),
                BTreeMap::from([
                    ("address".to_string(), c.address.to_string()),
                    ("owner".to_string(), c.owner.clone()),
                    ("claimant".to_string(), c.claimant.clone()),
                ]),
            );
        }
        let over = conflicts.len() - shown.len() - quiet;
        let agent = agent.unwrap_or("(restore)");
        if over > 0 {
            tracing::warn!(%agent, conflicts = conflicts.len(), announced = shown.len(), not_announced = over + quiet, "address conflicts past the {CONFLICTS_SHOWN} announced at once; the map shows them all");
        } else if quiet > 0 {
            tracing::debug!(%agent, conflicts = conflicts.len(), announced = shown.len(), not_announced = quiet, "address conflicts announced within the last minute, not again");
        }
    }

    /// Refuses `table` for `agent` when it would grow the fleet's map past `topology.max_rows`.
    /// A table no larger than the agent's current one always fits: an agent can always shrink.
    fn check_budget(&mut self, agent: &str, table: &AgentTable) -> Result<(), Refusal> {
        let old = self.model.agents.get(agent).map_or(0, model::rows);
        let new = model::rows(table);
        let total = self.model.rows() - old + new;
        if new <= old || total <= self.settings.max_rows {
            self.over_budget.remove(agent);
            return Ok(());
        }
        self.stats.snapshots_refused_budget += 1;
        // Once per agent until one of its snapshots fits again, not at every retry.
        if self.over_budget.insert(agent.to_string(), total).is_none() {
            self.events.emit(
                "snapshot_refused",
                agent,
                format!(
                    "a snapshot of agent {agent} would take the map to {total} rows, over the fleet's budget of {} (topology.max_rows); refused, the map keeps what it had",
                    self.settings.max_rows
                ),
            );
        }
        Err(Refusal::OverBudget {
            rows: total,
            max: self.settings.max_rows,
        })
    }

    /// Makes the deferred commits durable.
    fn sync(&mut self) {
        if !self.deferred {
            return;
        }
        match self.store.sync() {
            Ok(()) => {
                self.deferred = false;
                self.synced = std::time::Instant::now();
            }
            Err(error) => {
                self.stats.store_errors += 1;
                tracing::error!(%error, "cannot sync the map to disk; a crash now would lose recent changes");
            }
        }
    }

    /// Writes the pending agents' tables and the pending edges as the model has them now: an
    /// edge the model no longer has is deleted. Durable at once when the last durable commit is
    /// [`SYNC_EVERY`] old, deferred otherwise.
    fn persist(&mut self, pending: &Pending) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        for agent in &pending.agents {
            if let Some(table) = self.model.agents.get(agent) {
                let record = AgentRecordRef {
                    id: agent,
                    sequence: self.sequences.get(agent).copied().unwrap_or(0),
                    table,
                };
                batch.put(AGENTS, agent, &record)?;
            }
        }
        for key in &pending.edges {
            let id = key.id();
            match self.model.edges.get(key) {
                Some(edge) => batch.put(
                    EDGES,
                    &id,
                    &EdgeRecord {
                        id: id.clone(),
                        edge: edge.clone(),
                    },
                )?,
                None => batch.delete(EDGES, &id),
            }
        }
        if self.synced.elapsed() >= SYNC_EVERY {
            self.store.commit(batch)?;
            self.synced = std::time::Instant::now();
            self.deferred = false;
        } else {
            self.store.commit_deferred(batch)?;
            self.deferred = true;
        }
        Ok(())
    }

    fn map(&self, query: &GraphQuery) -> graph::Graph {
        graph::build(
            &self.model,
            query,
            now_ms(),
            self.settings.ttl.as_millis() as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TopologySettings {
        TopologySettings {
            ttl: Duration::from_secs(120),
            retention: Duration::from_secs(3600),
            max_entries: 100,
            max_rows: 100_000,
            queue: 64,
        }
    }

    fn task(dir: &tempfile::TempDir, events: Events) -> Task {
        Task {
            events,
            announced: Announced::default(),
            restored_conflicts: Vec::new(),
            over_budget: BTreeMap::new(),
            collect_due: false,
            synced: Instant::now(),
            deferred: false,
            generation: Arc::new(AtomicU64::new(1)),
            model: Model::default(),
            sequences: BTreeMap::new(),
            store: Store::open(&dir.path().join("s.redb")).unwrap(),
            settings: settings(),
            stats: Stats::default(),
        }
    }

    /// A full snapshot of nothing but `addresses`.
    fn addresses(sequence: u64, addresses: &[String]) -> proto::ConnectionSnapshot {
        proto::ConnectionSnapshot {
            sequence,
            full: true,
            addresses: addresses.to_vec(),
            ..Default::default()
        }
    }

    fn apply(task: &mut Task, agent: &str, s: &proto::ConnectionSnapshot) -> Result<(), Refusal> {
        let mut pending = Pending::default();
        let (reply, mut rx) = oneshot::channel();
        task.take(&mut pending, agent, agent, s, reply);
        task.flush(pending);
        rx.try_recv().unwrap()
    }

    fn conflict(address: u32, claimant: &str) -> Conflict {
        Conflict {
            address: IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + address)),
            owner: "db".into(),
            claimant: claimant.into(),
        }
    }

    #[test]
    fn a_conflict_is_announced_a_few_at_once_and_not_again_within_a_minute() {
        let mut a = Announced::default();
        let five: Vec<_> = (1..=5).map(|n| conflict(n, "rogue")).collect();
        let t0 = Instant::now();
        let (shown, quiet) = a.select(&five, t0);
        assert_eq!(shown, five[..3].iter().collect::<Vec<_>>());
        assert_eq!(quiet, 0);
        // The claims made again: the two held back by the limit now, the rest not again.
        let (shown, quiet) = a.select(&five, t0 + Duration::from_secs(1));
        assert_eq!(shown, five[3..].iter().collect::<Vec<_>>());
        assert_eq!(quiet, 3);
        let (shown, quiet) = a.select(&five, t0 + Duration::from_secs(30));
        assert!(shown.is_empty());
        assert_eq!(quiet, 5);
        // Another claimant of the same address is another conflict.
        let other = [conflict(1, "other")];
        assert_eq!(a.select(&other, t0 + Duration::from_secs(30)).0.len(), 1);
        // A minute after it was announced, a conflict is announced again.
        let (shown, quiet) = a.select(&five, t0 + CONFLICT_QUIET);
        assert_eq!(shown, five[..3].iter().collect::<Vec<_>>());
        assert_eq!(quiet, 2);
    }

    #[test]
    fn the_conflicts_remembered_are_bounded() {
        let mut a = Announced::default();
        let t0 = Instant::now();
        for n in 0..(CONFLICTS_REMEMBERED as u32 + 10) {
            let one = [conflict(n, "rogue")];
            assert_eq!(a.select(&one, t0).0.len(), 1);
        }
        assert_eq!(a.order.len(), CONFLICTS_REMEMBERED);
        assert_eq!(a.recent.len(), CONFLICTS_REMEMBERED);
        // The oldest were forgotten, the newest not.
        assert_eq!(a.select(&[conflict(0, "rogue")], t0).0.len(), 1);
        let newest = CONFLICTS_REMEMBERED as u32 + 9;
        assert_eq!(a.select(&[conflict(newest, "rogue")], t0).1, 1);
    }

    fn drain(rx: &mut tokio::sync::broadcast::Receiver<proto::Event>) -> Vec<proto::Event> {
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    #[test]
    fn a_host_claiming_addresses_on_alternate_snapshots_is_announced_once_per_address() {
        let dir = tempfile::tempdir().unwrap();
        let events = Events::new(1024);
        let mut rx = events.subscribe();
        let mut t = task(&dir, events);
        let owned: Vec<String> = (1..=5).map(|n| format!("10.0.0.{n}")).collect();
        apply(&mut t, "db", &addresses(1, &owned)).unwrap();
        let mut per_snapshot = Vec::new();
        for cycle in 0..10u64 {
            apply(&mut t, "rogue", &addresses(2 * cycle + 1, &owned)).unwrap();
            per_snapshot.push(drain(&mut rx).len());
            apply(&mut t, "rogue", &addresses(2 * cycle + 2, &[])).unwrap();
            assert!(drain(&mut rx).is_empty());
        }
        // Three at once, the other two at the next claim, then nothing within the minute.
        assert_eq!(per_snapshot, [3, 2, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn a_snapshot_s_addresses_count_against_its_row_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = task(&dir, Events::new(16));
        let many: Vec<String> = (0..=settings().max_entries)
            .map(|n| format!("10.1.{}.{}", n / 200, n % 200 + 1))
            .collect();
        let refused = apply(&mut t, "rogue", &addresses(1, &many)).unwrap_err();
        assert_eq!(
            refused,
            Refusal::TooLarge {
                rows: many.len(),
                max: settings().max_entries
            }
        );
        apply(&mut t, "rogue", &addresses(2, &many[1..])).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_snapshot_past_a_full_queue_is_shed_and_counted_as_busy() {
        use futures::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let settings = TopologySettings {
            queue: 1,
            ..settings()
        };
        let (topology, run) = Topology::spawn(store, settings, Events::new(16)).unwrap();
        // The task is not running yet: the first snapshot stays in the queue and fills it.
        let waiting = topology.snapshot("web", "web", addresses(1, &[]));
        assert_eq!(waiting.now_or_never(), None);
        let shed = topology.snapshot("db", "db", addresses(1, &[]));
        assert_eq!(shed.now_or_never(), Some(Err(Refusal::Busy { queued: 1 })));
        tokio::spawn(run);
        let stats = topology.stats().await;
        assert_eq!(stats.snapshots_shed_busy, 1);
        assert_eq!(stats.snapshots_applied, 1);
        let scrape = crate::metrics::Scrape {
            topology: stats,
            ..Default::default()
        };
        let text = scrape.render().unwrap();
        assert!(
            text.contains("tapgraph_topology_snapshots_refused_total{reason=\"busy\"} 1"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn conflicts_a_restart_finds_are_announced_naming_the_owner_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("restart.redb");
        {
            let mut t = task(&dir, Events::new(16));
            t.store = Store::open(&path).unwrap();
            let address = ["10.0.0.5".to_string()];
            apply(&mut t, "db", &addresses(1, &address)).unwrap();
            apply(&mut t, "aaa-rogue", &addresses(1, &address)).unwrap();
            assert_eq!(
                t.model.claimants(&"10.0.0.5".parse().unwrap()),
                ["db", "aaa-rogue"]
            );
            t.sync();
        }
        let events = Events::new(16);
        let mut rx = events.subscribe();
        let (topology, run) =
            Topology::spawn(Store::open(&path).unwrap(), settings(), events).unwrap();
        let run = tokio::spawn(run);
        let event = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("an event after the restart")
            .unwrap();
        assert_eq!(event.kind, "address_conflict");
        // Claim order is not stored: the first by agent id owns the address after a restart,
        // and the operator is told so.
        assert_eq!(
            event.message,
            "after a restart, agents aaa-rogue and db both claim address 10.0.0.5; the map keeps it on aaa-rogue"
        );
        assert_eq!(topology.stats().await.address_conflicts, 1);
        drop(topology);
        run.await.unwrap();
    }
}

#[cfg(test)]
mod memory_probe {
    //! Where a large snapshot's memory goes, stage by stage (BENCHMARKS.md, "The map's memory"):
    //! `PROBE_COLLECT=1 cargo test --release -p tapgraph-controller memory_probe -- --ignored
    //! --nocapture`. With PROBE_COLLECT the allocator returns what is free before each reading,
    //! so RSS follows live memory; PROBE_ROWS (90,000) and PROBE_AGENTS (1) size the tables, and
    //! PROBE_DISTINCT gives every row its own far end (an edge each).
    use super::*;
    use prost::Message;

    fn rss_mb() -> f64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096.0 / 1e6
    }

    /// Rows like the loadgen's (few far ends: 81 edges), or with PROBE_DISTINCT one edge each.
    fn snapshot(agent: usize, rows: usize) -> proto::ConnectionSnapshot {
        let distinct = std::env::var_os("PROBE_DISTINCT").is_some();
        let local = format!("10.0.{}.{}", agent / 200, agent % 200 + 1);
        let entries = (0..rows)
            .map(|n| proto::ConnectionEntry {
                direction: proto::Direction::Client as i32,
                local_ip: local.clone(),
                remote_ip: if distinct {
                    format!("10.{}.{}.{}", 100 + n / 62_500, n / 250 % 250, n % 250 + 1)
                } else if n % 5 == 0 {
                    format!("203.0.113.{}", n % 64 + 1)
                } else {
                    format!("10.0.0.{}", n % 20 + 1)
                },
                server_port: [80, 443, 8080, 9000][n % 4],
                protocol: proto::Protocol::Tcp as i32,
                process: Some(proto::ProcessInfo {
                    pid: 1000,
                    name: format!("worker-{n}"),
                    cmdline: String::new(),
                }),
                sockets: 1,
                ..Default::default()
            })
            .collect();
        proto::ConnectionSnapshot {
            sequence: 1,
            full: true,
            addresses: vec![local],
            entries,
            ..Default::default()
        }
    }

    #[test]
    #[ignore]
    fn memory_probe() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("s.redb")).unwrap();
            let settings = TopologySettings {
                ttl: Duration::from_secs(120),
                retention: Duration::from_secs(3600),
                max_entries: 100_000,
                max_rows: 10_000_000,
                queue: 64,
            };
            let mut task = Task {
                events: Events::new(16),
                announced: Announced::default(),
                restored_conflicts: Vec::new(),
                over_budget: BTreeMap::new(),
                collect_due: false,
                synced: std::time::Instant::now(),
                deferred: false,
                generation: Arc::new(AtomicU64::new(1)),
                model: Model::default(),
                sequences: BTreeMap::new(),
                store,
                settings,
                stats: Stats::default(),
            };
            let rows: usize = std::env::var("PROBE_ROWS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(90_000);
            let agents: usize = std::env::var("PROBE_AGENTS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let mut last = rss_mb();
            let collect = std::env::var_os("PROBE_COLLECT").is_some();
            let mut report = |stage: &str| {
                if collect {
                    release_memory();
                }
                let now = rss_mb();
                eprintln!("{stage:<34} RSS {now:7.1} MB  (+{:6.1})", now - last);
                last = now;
            };
            report("start");
            for a in 0..agents {
                let wire = snapshot(a, rows).encode_to_vec();
                report(&format!(
                    "agent {a}: encoded ({} MB)",
                    wire.len() / 1_000_000
                ));
                let s = proto::ConnectionSnapshot::decode(wire.as_slice()).unwrap();
                drop(wire);
                report("decoded");
                let mut pending = Pending::default();
                let (tx, _rx) = oneshot::channel();
                task.take(&mut pending, &format!("agent-{a}"), "h", &s, tx);
                report("applied to the model");
                task.flush(pending);
                report("written to redb");
                drop(s);
                report("snapshot dropped");
                let g = task.map(&GraphQuery::default());
                report(&format!("graph built ({} edges)", g.edges.len()));
                drop(g);
                report("graph dropped");
            }
            release_memory();
            report("after mi_collect");
        });
    }
}
