//! Presence: which replica holds each agent's live session, recorded in the shared database so
//! that any replica answers for the whole fleet (`agent list`, `policy status`, `/api/v1/agents`,
//! the console, the fleet gauges of `/metrics`).
//!
//! Only with a shared store. Each replica writes, once a [`INTERVAL`], in one batch:
//! - its lease: a `replicas` row renewed every round ([`ReplicaRow`]);
//! - a `presence` row ([`PresenceRow`]) per agent whose session it holds, when what operators see
//!   of the agent changed (connect, disconnect, state, policy sent/applied/refused, labels), and
//!   at least every [`REFRESH`] for its counters and last heartbeat.
//!
//! A row is the replica's only while it still holds what that replica last wrote there: every
//! update carries it as a precondition ([`Batch::expect`]). An agent that moved to another
//! replica has that replica's row, so the one it left gives the row up instead of taking it back.
//! A replica that dies stops renewing its lease; once the lease is older than [`LEASE`], or the
//! replica restarted (its lease names a newer start), its agents show as lost, until they
//! reconnect elsewhere and the new replica overwrites their rows.
//!
//! The writer is a task of its own ([`Writer::run`]): the registry hands it the agents it holds
//! through a watch channel (the latest list wins), so the registry never waits for the database.
//! A round that fails (the database is down) is counted and its changes are written by the next
//! one. Queries read both tables whole ([`Fleet::load`]): cheap at thousands of rows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use redb::{TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::health::AgentState;
use super::view::AgentView;
use crate::store::{Batch, Store, StoreError, Table};

/// A replica whose lease row is older than this is taken for dead, and its agents for lost.
/// Replicas' clocks are compared: they must agree within a small part of it (NTP).
pub const LEASE: Duration = Duration::from_secs(10);
/// A held agent's row is rewritten at least this often, with its counters and last heartbeat.
pub const REFRESH: Duration = Duration::from_secs(15);
/// How often the registry hands over its agents and the writer renews the lease.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Conflicts (agents taken over by another replica) resolved within one round at most.
const CONFLICT_RETRIES: usize = 8;

/// `presence`: per agent id, the replica holding (or last holding) its session.
const PRESENCE: Table = TableDefinition::new("presence");
/// `replicas`: per replica name, its lease.
const REPLICAS: Table = TableDefinition::new("replicas");
/// `mirrors`: per replica name, the mirror streams landing on it ([`MirrorsRow`]).
const MIRRORS: Table = TableDefinition::new("mirrors");

/// A replica's lease: alive while `heartbeat_unix_ms` is younger than [`LEASE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaRow {
    pub replica: String,
    /// When this run of the replica started: rows written by an earlier run are not covered.
    pub started_at_unix_ms: u64,
    pub heartbeat_unix_ms: u64,
    /// Where it serves (gRPC, HTTP), for operators reading the table.
    pub addresses: Vec<String>,
    /// Its network interfaces: where an `interface:` mirror target can be delivered.
    #[serde(default)]
    pub interfaces: Vec<String>,
}

/// An agent's presence, as the replica holding its session last wrote it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceRow {
    pub agent_id: String,
    pub replica: String,
    /// The run of `replica` that wrote it ([`ReplicaRow::started_at_unix_ms`]).
    pub replica_started_at_unix_ms: u64,
    /// When the session started.
    pub since_unix_ms: u64,
    /// The agent's last message when the row was written (refreshed every [`REFRESH`]).
    pub last_heartbeat_unix_ms: u64,
    pub state: AgentState,
    /// What operators see of the agent, as the holding replica saw it.
    pub agent: AgentView,
}

/// The mirror streams landing on one replica, rewritten every [`INTERVAL`] while they change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MirrorsRow<T> {
    pub replica: String,
    /// [`ReplicaRow::started_at_unix_ms`] of the run that wrote it.
    pub replica_started_at_unix_ms: u64,
    /// Per (agent, target), as `GET /api/v1/mirror` shows them.
    pub targets: Vec<T>,
}

/// One mirror stream of another replica: [`crate::mirror::StatsView`] as read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteTarget {
    pub agent: String,
    pub target: String,
    pub batches: u64,
    pub batches_lost: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
    pub packets_written: u64,
    pub bytes_written: u64,
    pub dropped: BTreeMap<String, u64>,
    #[serde(default)]
    pub dedup_evicted: u64,
    pub lost_in_transit: u64,
    pub invalid_batches: BTreeMap<String, u64>,
    pub last_error: Option<String>,
    pub delay_p50_us: Option<u64>,
    pub delay_p99_us: Option<u64>,
    #[serde(default)]
    pub target_note: Option<String>,
    /// The replica it lands on (not in the row: added when read).
    #[serde(default)]
    pub replica: String,
}

impl RemoteTarget {
    /// As `tapgraphctl mirror` reads it.
    pub fn into_proto(self) -> tapgraph::proto::MirrorTargetStats {
        tapgraph::proto::MirrorTargetStats {
            target: self.target,
            batches: self.batches,
            batches_lost: self.batches_lost,
            packets_received: self.packets_received,
            bytes_received: self.bytes_received,
            packets_written: self.packets_written,
            bytes_written: self.bytes_written,
            dropped: self.dropped.into_iter().collect(),
            last_error: self.last_error.unwrap_or_default(),
            delay_p50_us: self.delay_p50_us.unwrap_or(0),
            delay_p99_us: self.delay_p99_us.unwrap_or(0),
            target_note: self.target_note.unwrap_or_default(),
            direct: false,
        }
    }
}

/// Writes the mirror streams landing on this replica (`stats`, read each [`INTERVAL`]) while
/// they change, until `stop`; a failed write is counted and done again the next second.
pub async fn write_mirrors(
    store: Store,
    replica: String,
    started_at_unix_ms: u64,
    stats: impl Fn() -> Vec<crate::mirror::StatsView>,
    presence: Arc<PresenceStats>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: Option<serde_json::Value> = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => break,
        }
        let row = MirrorsRow {
            replica: replica.clone(),
            replica_started_at_unix_ms: started_at_unix_ms,
            targets: stats(),
        };
        let Ok(value) = serde_json::to_value(&row) else {
            continue;
        };
        if written.as_ref() == Some(&value) {
            continue;
        }
        let mut batch = Batch::default();
        if batch.put(MIRRORS, &replica, &value).is_err() {
            continue;
        }
        match store.commit_deferred(batch) {
            Ok(()) => written = Some(value),
            Err(e) => {
                presence.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "cannot write this replica's mirror streams");
            }
        }
    }
}

/// Presence reads and writes that failed, by the store's error: the writer retries the next
/// round, a query answers with this replica's agents only.
#[derive(Debug, Default)]
pub struct PresenceStats {
    pub write_errors: AtomicU64,
    pub read_errors: AtomicU64,
    /// Rows given up because another replica took the agent over meanwhile.
    pub taken_over: AtomicU64,
}

impl PresenceStats {
    /// (writes, reads) that failed.
    pub fn errors(&self) -> (u64, u64) {
        (
            self.write_errors.load(Ordering::Relaxed),
            self.read_errors.load(Ordering::Relaxed),
        )
    }
}

/// What a session is, across its lifetime on one replica.
fn session_key(v: &AgentView) -> (u64, u64) {
    (v.connected_at_unix_ms, v.sessions)
}

/// The fields whose change is written at once; the rest (counters, rates, last seen) waits for
/// the next [`REFRESH`].
#[derive(PartialEq)]
struct Steady<'a> {
    state: AgentState,
    controller: &'a str,
    hostname: &'a str,
    remote_addr: &'a str,
    agent_version: &'a str,
    kernel: &'a str,
    interfaces: &'a [String],
    last_disconnect_reason: &'a Option<String>,
    labels: &'a BTreeMap<String, String>,
    policy: (&'a str, u64, u64, &'a Option<String>),
    capture_state: &'a str,
    heartbeat_ms: u64,
}

fn steady(v: &AgentView) -> Steady<'_> {
    Steady {
        state: v.state,
        controller: &v.controller,
        hostname: &v.hostname,
        remote_addr: &v.remote_addr,
        agent_version: &v.agent_version,
        kernel: &v.kernel,
        interfaces: &v.interfaces,
        last_disconnect_reason: &v.last_disconnect_reason,
        labels: &v.labels,
        policy: (
            &v.policy_name,
            v.policy_version_sent,
            v.policy_version_applied,
            &v.policy_error,
        ),
        capture_state: &v.capture.state,
        heartbeat_ms: v.heartbeat_ms,
    }
}

/// This host's network interfaces (`/sys/class/net`); empty if they cannot be read.
pub(crate) fn local_interfaces() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn now_unix_ms() -> u64 {
    super::agents::unix_ms(SystemTime::now())
}

/// The agents the registry holds, handed to the writer.
pub(super) type Held = Arc<Vec<AgentView>>;

/// Each replica's network interfaces, by replica name.
pub(super) type Interfaces = BTreeMap<String, std::collections::BTreeSet<String>>;

/// Per agent with a live session here, the policy version it applied as the other replicas can
/// read it now (committed). `policy status` counts an ack once it is there, so that `--wait`
/// returning on one replica means every replica sees the ack.
pub(super) type Published = Arc<std::sync::Mutex<BTreeMap<String, u64>>>;

/// A row this replica committed, and when.
struct Written {
    row: PresenceRow,
    /// The row as stored: the next write's precondition, not serialised again.
    bytes: Arc<[u8]>,
    at_unix_ms: u64,
}

/// One row to write, and the value it must replace (`None`: whatever is there).
struct Planned {
    row: PresenceRow,
    /// `row` serialised, once, whatever the number of attempts.
    bytes: Arc<[u8]>,
    expect: Option<Arc<[u8]>>,
}

/// Writes this replica's lease and its agents' presence.
pub struct Writer {
    store: Store,
    replica: String,
    started_at_unix_ms: u64,
    addresses: Vec<String>,
    refresh: Duration,
    /// The rows this replica holds, as last committed.
    written: BTreeMap<String, Written>,
    /// Sessions whose row another replica took over: not written again.
    yielded: BTreeMap<String, (u64, u64)>,
    stats: Arc<PresenceStats>,
    /// The database is down and that was logged.
    down_logged: bool,
    published: Published,
}

impl Writer {
    pub fn new(
        store: Store,
        replica: &str,
        addresses: Vec<String>,
        refresh: Duration,
        stats: Arc<PresenceStats>,
    ) -> Self {
        Writer {
            store,
            replica: replica.to_string(),
            started_at_unix_ms: now_unix_ms(),
            addresses,
            refresh,
            written: BTreeMap::new(),
            yielded: BTreeMap::new(),
            stats,
            down_logged: false,
            published: Published::default(),
        }
    }

    /// What the registry's `policy status` reads of what this writer committed.
    pub(super) fn published(&self) -> Published {
        self.published.clone()
    }

    /// When this run of the replica started, as its lease says.
    pub fn started_at_unix_ms(&self) -> u64 {
        self.started_at_unix_ms
    }

    /// Writes a round each time the registry hands over its agents, until it stops; then
    /// gives the lease back, so the others see its agents lost at once.
    pub(super) async fn run(mut self, mut held: watch::Receiver<Held>) {
        while held.changed().await.is_ok() {
            let agents = held.borrow_and_update().clone();
            let store = self.store.clone();
            let _ = self.round(&agents, now_unix_ms(), &mut |b| store.commit_deferred(b));
        }
        let mut batch = Batch::default();
        batch.delete(REPLICAS, &self.replica);
        if let Err(e) = self.store.commit(batch) {
            tracing::debug!(replica = %self.replica, error = %e, "could not give the lease back");
        }
    }

    /// One round at `now`: the lease, and the rows of `agents` that changed or are due a
    /// refresh, in one batch committed by `commit`. A row another replica took over is given up
    /// and the rest written again. How many agent rows were written.
    pub(super) fn round(
        &mut self,
        agents: &[AgentView],
        now: u64,
        commit: &mut dyn FnMut(Batch) -> Result<(), StoreError>,
    ) -> Result<usize, StoreError> {
        let mut plan = self.plan(agents, now)?;
        for _ in 0..CONFLICT_RETRIES {
            let batch = self.batch(&plan, now)?;
            match commit(batch) {
                Ok(()) => {
                    if self.down_logged {
                        tracing::info!(replica = %self.replica, "presence written again");
                        self.down_logged = false;
                    }
                    let n = plan.len();
                    self.publish(&plan);
                    for p in plan {
                        let written = Written {
                            row: p.row,
                            bytes: p.bytes,
                            at_unix_ms: now,
                        };
                        self.written.insert(written.row.agent_id.clone(), written);
                    }
                    return Ok(n);
                }
                Err(StoreError::Conflict { table, key }) if table == PRESENCE.name() => {
                    self.stats.taken_over.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(agent = %key, replica = %self.replica, "another replica holds the agent's session now; its row is theirs");
                    plan.retain(|p| p.row.agent_id != key);
                    self.published
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                    if let Some(w) = self.written.remove(&key) {
                        self.yielded.insert(key, session_key(&w.row.agent));
                    }
                }
                Err(e) => return Err(self.failed(e)),
            }
        }
        Err(self.failed(StoreError::Failed(format!(
            "presence: still conflicting after {CONFLICT_RETRIES} attempts"
        ))))
    }

    /// Records the policy versions `plan` committed for the agents live here.
    fn publish(&self, plan: &[Planned]) {
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        for p in plan {
            let a = &p.row.agent;
            if a.controller == self.replica {
                published.insert(a.id.clone(), a.policy_version_applied);
            } else {
                published.remove(&a.id);
            }
        }
    }

    fn failed(&mut self, e: StoreError) -> StoreError {
        self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
        if !self.down_logged {
            tracing::warn!(replica = %self.replica, error = %e, "cannot write presence; its sessions go on, and it is written again once the database answers");
            self.down_logged = true;
        }
        e
    }

    /// The rows to write at `now`: new sessions whatever their row holds; changed or stale rows
    /// only over what this replica wrote.
    fn plan(&self, agents: &[AgentView], now: u64) -> Result<Vec<Planned>, StoreError> {
        let refresh = self.refresh.as_millis() as u64;
        let mut plan = Vec::new();
        for v in agents {
            let session = session_key(v);
            if self.yielded.get(&v.id) == Some(&session) {
                continue;
            }
            let live = v.controller == self.replica;
            let expect = match self.written.get(&v.id) {
                None if !live => continue,
                None => None,
                Some(w) if session_key(&w.row.agent) != session && live => None,
                Some(w) => {
                    let changed = steady(&w.row.agent) != steady(v);
                    let due = live && now.saturating_sub(w.at_unix_ms) >= refresh;
                    if !changed && !due {
                        continue;
                    }
                    Some(w.bytes.clone())
                }
            };
            let row = self.row(v);
            let bytes = serde_json::to_vec(&row).map_err(crate::store::failed)?;
            plan.push(Planned {
                row,
                bytes: bytes.into(),
                expect,
            });
        }
        Ok(plan)
    }

    fn row(&self, v: &AgentView) -> PresenceRow {
        PresenceRow {
            agent_id: v.id.clone(),
            replica: self.replica.clone(),
            replica_started_at_unix_ms: self.started_at_unix_ms,
            since_unix_ms: v.connected_at_unix_ms,
            last_heartbeat_unix_ms: v.last_seen_unix_ms,
            state: v.state,
            agent: v.clone(),
        }
    }

    fn batch(&self, plan: &[Planned], now: u64) -> Result<Batch, StoreError> {
        let mut batch = Batch::default();
        let lease = ReplicaRow {
            replica: self.replica.clone(),
            started_at_unix_ms: self.started_at_unix_ms,
            heartbeat_unix_ms: now,
            addresses: self.addresses.clone(),
            interfaces: local_interfaces().into_iter().collect(),
        };
        batch.put(REPLICAS, &self.replica, &lease)?;
        for p in plan {
            if let Some(old) = &p.expect {
                batch.expect_raw(PRESENCE, &p.row.agent_id, Some(old.to_vec()));
            }
            batch.put_raw(PRESENCE, &p.row.agent_id, p.bytes.to_vec());
        }
        Ok(batch)
    }
}

/// The fleet as every replica's rows show it: what queries merge with this replica's agents.
pub struct Fleet {
    store: Store,
    lease: Duration,
    stats: Arc<PresenceStats>,
    /// A failed read was logged, until one succeeds.
    read_logged: AtomicBool,
    /// The last read that succeeded: what queries answer with while the database is down.
    last: std::sync::Mutex<Option<Arc<Snapshot>>>,
    /// This run of this replica ([`ReplicaRow::started_at_unix_ms`]), once its writer exists.
    pub(super) started_at_unix_ms: u64,
}

/// Both tables as read at one moment.
pub struct Snapshot {
    pub rows: Vec<PresenceRow>,
    pub replicas: Vec<ReplicaRow>,
    /// When: leases are judged as of then.
    pub read_at_unix_ms: u64,
}

/// One agent of the fleet: whose record it is (the replica holding or last holding its session),
/// and what operators see.
#[derive(Debug, Clone)]
pub struct FleetAgent {
    pub replica: String,
    pub view: AgentView,
}

impl Fleet {
    pub fn new(store: Store, lease: Duration, stats: Arc<PresenceStats>) -> Self {
        Fleet {
            store,
            lease,
            stats,
            read_logged: AtomicBool::new(false),
            last: std::sync::Mutex::new(None),
            started_at_unix_ms: 0,
        }
    }

    pub fn stats(&self) -> &PresenceStats {
        &self.stats
    }

    /// The task that writes the mirror streams landing on `replica` (`mirrors`), until `stop`.
    pub fn mirror_writer(
        &self,
        replica: &str,
        mirrors: crate::mirror::Mirrors,
        stop: tokio_util::sync::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + use<> {
        write_mirrors(
            self.store.clone(),
            replica.to_string(),
            self.started_at_unix_ms,
            move || mirrors.stats(),
            self.stats.clone(),
            stop,
        )
    }

    /// Both tables now; while the database cannot be read (counted, logged once), as last read
    /// (`None` if never).
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        let read = || -> Result<_, StoreError> {
            // Known to be down: no waiting for a connection that will time out.
            if let Some(reason) = self.store.unavailable() {
                return Err(StoreError::Unavailable {
                    database: self.store.describe(),
                    reason,
                });
            }
            Ok(Snapshot {
                rows: self.store.load(PRESENCE)?,
                replicas: self.store.load(REPLICAS)?,
                read_at_unix_ms: now_unix_ms(),
            })
        };
        let read = read();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match read {
            Ok(snapshot) => {
                self.read_logged.store(false, Ordering::Relaxed);
                let snapshot = Arc::new(snapshot);
                *last = Some(snapshot.clone());
                Some(snapshot)
            }
            Err(e) => {
                self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                if !self.read_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot read the other replicas' agents; answering with them as last read");
                }
                last.clone()
            }
        }
    }

    /// This replica's agents (`local`, as its registry lists them) with every other replica's,
    /// by agent id. While the database cannot be read, the others' as last read, their leases
    /// judged as of then; never read, `local` alone.
    pub fn merge(&self, replica: &str, local: Vec<AgentView>) -> FleetView {
        match self.load() {
            Some(s) => merge(
                replica,
                local,
                &s.rows,
                &s.replicas,
                s.read_at_unix_ms,
                self.lease,
            ),
            None => FleetView {
                agents: local
                    .into_iter()
                    .map(|view| FleetAgent {
                        replica: replica.to_string(),
                        view,
                    })
                    .collect(),
                replicas: vec![replica.to_string()],
            },
        }
    }

    /// The mirror streams landing on the other replicas holding a lease (as last read while
    /// the database cannot be read: none).
    pub fn remote_mirrors(&self, replica: &str) -> Vec<RemoteTarget> {
        let Some(snapshot) = self.load() else {
            return Vec::new();
        };
        let rows = match self.store.load::<MirrorsRow<RemoteTarget>>(MIRRORS) {
            Ok(rows) => rows,
            Err(e) => {
                self.stats.read_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "cannot read the other replicas' mirror streams");
                return Vec::new();
            }
        };
        let replicas: BTreeMap<&str, &ReplicaRow> = snapshot
            .replicas
            .iter()
            .map(|r| (r.replica.as_str(), r))
            .collect();
        let (now, lease) = (snapshot.read_at_unix_ms, self.lease);
        rows.into_iter()
            .filter(|r| r.replica != replica)
            .filter(|r| {
                expired(
                    &r.replica,
                    r.replica_started_at_unix_ms,
                    &replicas,
                    now,
                    lease,
                )
                .is_none()
            })
            .flat_map(|r| {
                let on = r.replica;
                r.targets.into_iter().map(move |mut t| {
                    t.replica = on.clone();
                    t
                })
            })
            .collect()
    }

    /// Each replica's network interfaces, as its lease row gave them at the last read (no read
    /// of its own: a query reads the fleet first).
    pub fn interfaces(&self) -> BTreeMap<String, std::collections::BTreeSet<String>> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        last.map(|s| {
            s.replicas
                .iter()
                .map(|r| (r.replica.clone(), r.interfaces.iter().cloned().collect()))
                .collect()
        })
        .unwrap_or_default()
    }

    /// The agents with a live session on another replica, as it last wrote them; `local` are
    /// this replica's.
    pub fn remote_live(&self, replica: &str, local: Vec<AgentView>) -> Vec<AgentView> {
        let held: std::collections::BTreeSet<String> = local
            .iter()
            .filter(|v| v.controller == replica)
            .map(|v| v.id.clone())
            .collect();
        self.merge(replica, local)
            .agents
            .into_iter()
            .filter(|a| a.replica != replica && !a.view.controller.is_empty())
            .filter(|a| !held.contains(&a.view.id))
            .map(|a| a.view)
            .collect()
    }
}

/// The fleet at one moment.
#[derive(Debug, Default)]
pub struct FleetView {
    /// Every agent, by id.
    pub agents: Vec<FleetAgent>,
    /// The replicas holding a lease, this one included, by name.
    pub replicas: Vec<String>,
}

impl FleetView {
    /// Agents per replica (the one whose record each is) and state; every replica holding a
    /// lease shows each state, if only as 0.
    pub fn counts(&self) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
        let states = [
            AgentState::Connected,
            AgentState::Degraded,
            AgentState::Lost,
        ];
        let zero = || states.iter().map(|s| (s.name(), 0)).collect();
        let mut counts: BTreeMap<String, BTreeMap<&'static str, u64>> =
            self.replicas.iter().map(|r| (r.clone(), zero())).collect();
        for a in &self.agents {
            *counts
                .entry(a.replica.clone())
                .or_insert_with(zero)
                .entry(a.view.state.name())
                .or_default() += 1;
        }
        counts
    }
}

/// The merge of [`Fleet::merge`], at `now`: per agent, this replica's live session first, then
/// another's live one, then this replica's record of a past session, then the last row of a
/// replica that died (shown lost). Of two live sessions (the agent moved, the old replica has
/// not noticed yet), the newer.
pub(super) fn merge(
    replica: &str,
    local: Vec<AgentView>,
    rows: &[PresenceRow],
    replicas: &[ReplicaRow],
    now: u64,
    lease: Duration,
) -> FleetView {
    let replicas: BTreeMap<&str, &ReplicaRow> =
        replicas.iter().map(|r| (r.replica.as_str(), r)).collect();
    let mut alive: Vec<String> = replicas
        .values()
        .filter(|r| expired(&r.replica, r.started_at_unix_ms, &replicas, now, lease).is_none())
        .map(|r| r.replica.clone())
        .collect();
    if !alive.iter().any(|r| r == replica) {
        alive.push(replica.to_string());
        alive.sort();
    }
    let mut out: BTreeMap<String, FleetAgent> = BTreeMap::new();
    let mut remote: BTreeMap<String, FleetAgent> = BTreeMap::new();
    for row in rows {
        let mut view = row.agent.clone();
        view.id = row.agent_id.clone();
        view.state = row.state;
        match expired(
            &row.replica,
            row.replica_started_at_unix_ms,
            &replicas,
            now,
            lease,
        ) {
            Some(why) => {
                view.state = AgentState::Lost;
                view.controller = String::new();
                view.state_reason = Some(why);
            }
            None if view.state == AgentState::Lost => view.controller = String::new(),
            None => view.controller = row.replica.clone(),
        }
        remote.insert(
            view.id.clone(),
            FleetAgent {
                replica: row.replica.clone(),
                view,
            },
        );
    }
    for view in local {
        let live_here = view.controller == replica;
        let id = view.id.clone();
        let here = FleetAgent {
            replica: replica.to_string(),
            view,
        };
        let chosen = match remote.remove(&id) {
            None => here,
            Some(r) if r.replica == replica => here,
            Some(r) => {
                let live_there = !r.view.controller.is_empty();
                let newer = r.view.connected_at_unix_ms > here.view.connected_at_unix_ms;
                if live_there && (!live_here || newer) {
                    r
                } else {
                    here
                }
            }
        };
        out.insert(id, chosen);
    }
    for (id, r) in remote {
        out.insert(id, r);
    }
    FleetView {
        agents: out.into_values().collect(),
        replicas: alive,
    }
}

/// Why the run `started` of replica `holder` no longer vouches for its rows at `now`, if it
/// does not: it gave its lease back, restarted, or has not renewed it for [`LEASE`].
fn expired(
    holder: &str,
    started: u64,
    replicas: &BTreeMap<&str, &ReplicaRow>,
    now: u64,
    lease: Duration,
) -> Option<String> {
    let Some(r) = replicas.get(holder) else {
        return Some(format!("its controller {holder} has stopped"));
    };
    if r.started_at_unix_ms != started {
        return Some(format!(
            "its controller {holder} restarted since the session began"
        ));
    }
    let age = now.saturating_sub(r.heartbeat_unix_ms);
    (age >= lease.as_millis() as u64).then(|| {
        format!(
            "its controller {holder} has not renewed its lease for {:.0} s",
            age as f64 / 1e3
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tapgraph::proto::{self, agent_message::Msg};

    use super::super::{Registry, Sharing, fixture};
    use super::*;
    use crate::events::Events;
    use crate::health::Health;
    use crate::policy_rules::{Selector, StoredPolicy, StoredSpec};
    use crate::store::{StoreSettings, testpg};

    const T0: u64 = 1_000_000;
    const SECOND: u64 = 1_000;

    /// Agent `id` as a registry on replica `controller` lists it ("" once its session ended).
    fn view(id: &str, controller: &str, state: AgentState) -> AgentView {
        let (mut task, _health, _events) = fixture::task();
        let (_registered, _rx) = fixture::connect(&mut task, id, 8);
        let mut v = task.list().remove(0);
        v.controller = controller.to_string();
        v.state = state;
        v
    }

    fn writer(dir: &std::path::Path) -> Writer {
        let store = Store::open(&dir.join("s.redb")).unwrap();
        Writer::new(store, "a", Vec::new(), REFRESH, Arc::default())
    }

    /// What a batch writes and what it expects, as "table/key".
    type Keys = (Vec<String>, Vec<String>);

    /// A commit that writes nothing: it records each batch and answers with the next of
    /// `answers` (`None`: Ok; Ok once they are used up).
    fn recorder(
        batches: &mut Vec<Keys>,
        mut answers: Vec<Option<StoreError>>,
    ) -> impl FnMut(Batch) -> Result<(), StoreError> + '_ {
        answers.reverse();
        move |b: Batch| {
            let keys = |v: &[(Table, String, Option<Vec<u8>>)]| {
                v.iter()
                    .map(|(t, k, _)| format!("{}/{k}", t.name()))
                    .collect()
            };
            batches.push((keys(&b.changes), keys(&b.expected)));
            answers.pop().flatten().map_or(Ok(()), Err)
        }
    }

    fn keys(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_round_renews_the_lease_and_writes_only_what_changed_or_is_due() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        let mut batches = Vec::new();
        let mut commit = recorder(&mut batches, Vec::new());
        let mut x = view("x", "a", AgentState::Connected);
        let gone = view("old", "", AgentState::Lost);
        assert_eq!(
            w.round(&[x.clone(), gone.clone()], T0, &mut commit)
                .unwrap(),
            1
        );
        // Counters and last seen wait for the refresh.
        x.last_seen_unix_ms += 5 * SECOND;
        x.control_records += 1;
        assert_eq!(
            w.round(std::slice::from_ref(&x), T0 + SECOND, &mut commit)
                .unwrap(),
            0
        );
        x.state = AgentState::Degraded;
        assert_eq!(
            w.round(&[x.clone()], T0 + 2 * SECOND, &mut commit).unwrap(),
            1
        );
        assert_eq!(
            w.round(&[x.clone()], T0 + 16 * SECOND, &mut commit)
                .unwrap(),
            0
        );
        assert_eq!(
            w.round(&[x.clone()], T0 + 17 * SECOND, &mut commit)
                .unwrap(),
            1
        );
        // The session ends: written once as lost, and then left alone.
        x.controller.clear();
        x.state = AgentState::Lost;
        for s in [18, 40, 80] {
            let n = w.round(&[x.clone()], T0 + s * SECOND, &mut commit).unwrap();
            assert_eq!(n, usize::from(s == 18), "at {s} s");
        }
        drop(commit);
        let lease = "replicas/a".to_string();
        let expected: Vec<Keys> = vec![
            (vec![lease.clone(), "presence/x".into()], vec![]),
            (vec![lease.clone()], vec![]),
            (
                vec![lease.clone(), "presence/x".into()],
                keys(&["presence/x"]),
            ),
            (vec![lease.clone()], vec![]),
            (
                vec![lease.clone(), "presence/x".into()],
                keys(&["presence/x"]),
            ),
            (
                vec![lease.clone(), "presence/x".into()],
                keys(&["presence/x"]),
            ),
            (vec![lease.clone()], vec![]),
            (vec![lease], vec![]),
        ];
        assert_eq!(batches, expected);
    }

    #[test]
    fn a_failed_round_is_counted_and_its_rows_written_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        let mut batches = Vec::new();
        let down = StoreError::Unavailable {
            database: "db".into(),
            reason: "refused".into(),
        };
        let mut commit = recorder(&mut batches, vec![Some(down)]);
        let x = view("x", "a", AgentState::Connected);
        assert!(
            w.round(std::slice::from_ref(&x), T0, &mut commit)
                .unwrap_err()
                .is_unavailable()
        );
        assert_eq!(w.stats.write_errors.load(Ordering::Relaxed), 1);
        assert!(w.published().lock().unwrap().is_empty(), "not committed");
        assert_eq!(
            w.round(std::slice::from_ref(&x), T0 + SECOND, &mut commit)
                .unwrap(),
            1
        );
        assert_eq!(w.round(&[x], T0 + 2 * SECOND, &mut commit).unwrap(), 0);
        assert_eq!(w.stats.write_errors.load(Ordering::Relaxed), 1);
        assert_eq!(w.published().lock().unwrap().get("x"), Some(&0));
    }

    /// `policy status` on the agent's own replica counts an ack once the others can read it.
    #[test]
    fn an_ack_counts_once_it_is_committed() {
        let (mut task, _health, _events) = fixture::task();
        let published = Published::default();
        let (held, _handed) = watch::channel(Held::default());
        task.share(held, INTERVAL, published.clone());
        let (_registered, _rx) = fixture::connect(&mut task, "vm", 8);
        task.set_policies(Vec::new(), policy(4));
        let applied = proto::PolicyStatus {
            version: 4,
            applied: true,
            error: String::new(),
        };
        task.policy_report("vm", applied);
        let status = |task: &super::super::task::RegistryTask| task.policy_status(None).remove(0);
        assert_eq!(task.agents["vm"].view.policy_version_applied, 4);
        let s = status(&task);
        assert_eq!((s.version_applied, s.pending), (0, true));
        published.lock().unwrap().insert("vm".into(), 4);
        let s = status(&task);
        assert_eq!((s.version_applied, s.pending), (4, false));
    }

    #[test]
    fn a_row_another_replica_took_over_is_given_up_until_a_new_session_here() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        let mut batches = Vec::new();
        let moved = StoreError::Conflict {
            table: "presence".into(),
            key: "x".into(),
        };
        let mut commit = recorder(&mut batches, vec![None, Some(moved)]);
        let mut x = view("x", "a", AgentState::Connected);
        let y = view("y", "a", AgentState::Connected);
        w.round(&[x.clone(), y.clone()], T0, &mut commit).unwrap();
        // x moved to another replica; this one has not noticed and judges it degraded.
        x.state = AgentState::Degraded;
        assert_eq!(
            w.round(&[x.clone(), y.clone()], T0 + SECOND, &mut commit)
                .unwrap(),
            0
        );
        assert_eq!(w.stats.taken_over.load(Ordering::Relaxed), 1);
        x.state = AgentState::Lost;
        x.controller.clear();
        assert_eq!(
            w.round(&[x.clone(), y.clone()], T0 + 2 * SECOND, &mut commit)
                .unwrap(),
            0
        );
        // It comes back here: a new session, written whatever the row holds.
        x.sessions += 1;
        x.connected_at_unix_ms += 3 * SECOND;
        x.controller = "a".into();
        assert_eq!(w.round(&[x, y], T0 + 3 * SECOND, &mut commit).unwrap(), 1);
        drop(commit);
        let lease = "replicas/a".to_string();
        let (x, y) = ("presence/x".to_string(), "presence/y".to_string());
        let expected: Vec<Keys> = vec![
            (vec![lease.clone(), x.clone(), y.clone()], vec![]),
            (vec![lease.clone(), x.clone()], vec![x.clone()]),
            (vec![lease.clone()], vec![]),
            (vec![lease.clone()], vec![]),
            (vec![lease, x], vec![]),
        ];
        assert_eq!(batches, expected);
    }

    fn row(v: &AgentView, replica: &str, started: u64) -> PresenceRow {
        PresenceRow {
            agent_id: v.id.clone(),
            replica: replica.into(),
            replica_started_at_unix_ms: started,
            since_unix_ms: v.connected_at_unix_ms,
            last_heartbeat_unix_ms: v.last_seen_unix_ms,
            state: v.state,
            agent: v.clone(),
        }
    }

    fn lease(replica: &str, started: u64, heartbeat: u64) -> ReplicaRow {
        ReplicaRow {
            replica: replica.into(),
            started_at_unix_ms: started,
            heartbeat_unix_ms: heartbeat,
            addresses: Vec::new(),
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn rows_of_a_replica_without_a_lease_show_lost_and_the_newer_session_wins() {
        let lease_time = Duration::from_secs(10);
        let on_b = view("on-b", "b", AgentState::Degraded);
        let on_c = view("on-c", "c", AgentState::Connected);
        let on_old_b = view("on-old-b", "b", AgentState::Connected);
        let gone = view("gone", "d", AgentState::Connected);
        // Moved from here (a) to b: a still holds a stale, older session.
        let mut moved_here = view("moved", "a", AgentState::Connected);
        moved_here.connected_at_unix_ms = 1;
        let moved_there = view("moved", "b", AgentState::Connected);
        let mine_lost = view("mine", "", AgentState::Lost);
        let rows = vec![
            row(&on_b, "b", 7),
            row(&on_c, "c", 7),
            row(&on_old_b, "b", 6),
            row(&gone, "d", 7),
            row(&moved_there, "b", 7),
        ];
        let replicas = [
            lease("b", 7, T0 - 2 * SECOND),
            lease("c", 7, T0 - 10 * SECOND),
        ];
        let local = vec![moved_here, mine_lost];
        let fleet = merge("a", local, &rows, &replicas, T0, lease_time);
        let seen: Vec<(&str, &str, &str, AgentState)> = fleet
            .agents
            .iter()
            .map(|a| {
                let v = &a.view;
                (
                    v.id.as_str(),
                    a.replica.as_str(),
                    v.controller.as_str(),
                    v.state,
                )
            })
            .collect();
        use AgentState::*;
        assert_eq!(
            seen,
            [
                ("gone", "d", "", Lost),
                ("mine", "a", "", Lost),
                ("moved", "b", "b", Connected),
                ("on-b", "b", "b", Degraded),
                ("on-c", "c", "", Lost),
                ("on-old-b", "b", "", Lost),
            ]
        );
        let reason = |id: &str| {
            let a = fleet.agents.iter().find(|a| a.view.id == id).unwrap();
            a.view.state_reason.clone().unwrap_or_default()
        };
        assert!(
            reason("on-c").contains("has not renewed its lease for 10 s"),
            "{}",
            reason("on-c")
        );
        assert!(reason("on-old-b").contains("restarted"));
        assert!(reason("gone").contains("stopped"));
        assert_eq!(fleet.replicas, ["a", "b"]);
        let counts = fleet.counts();
        assert_eq!(
            counts["a"],
            BTreeMap::from([("connected", 0), ("degraded", 0), ("lost", 1)])
        );
        assert_eq!(
            counts["b"],
            BTreeMap::from([("connected", 1), ("degraded", 1), ("lost", 1)])
        );
        assert_eq!(counts["c"]["lost"], 1);
    }

    fn policy(version: u64) -> StoredPolicy {
        StoredPolicy {
            name: "default".into(),
            selector: Selector::All,
            spec: StoredSpec(tapgraph::policy::PolicySpec::default().to_proto(0, "default")),
            version,
            updated_at_ms: 0,
        }
    }

    /// A registry on replica `name` of the shared store `settings`, with a short lease; its two
    /// tasks (registry, presence writer).
    async fn replica(
        settings: &StoreSettings,
        dir: &std::path::Path,
        name: &str,
    ) -> (Registry, Store, [tokio::task::JoinHandle<()>; 2]) {
        let store = Store::connect(settings, dir, name).await.unwrap();
        assert!(store.is_shared());
        let sharing = Sharing {
            lease: Duration::from_secs(1),
            interval: Duration::from_millis(100),
            ..Sharing::new(store.clone(), vec![format!("{name}:7443")])
        };
        let (registry, task, writer) =
            Registry::spawn_shared(name, Events::new(16), Health::default(), 10, sharing);
        let tasks = [tokio::spawn(task), tokio::spawn(writer)];
        (registry, store, tasks)
    }

    /// Polls `check` until it holds, for a few seconds at most.
    async fn eventually<T: std::fmt::Debug>(
        what: &str,
        mut get: impl AsyncFnMut() -> T,
        check: impl Fn(&T) -> bool,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = get().await;
            if check(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "{what}: still {got:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn connect(
        registry: &Registry,
        id: &str,
    ) -> (u64, tokio::sync::mpsc::Receiver<super::super::Pushed>) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let hello = proto::Hello {
            hostname: format!("{id}.example"),
            ..Default::default()
        };
        let remote = "192.0.2.1:40000".parse().unwrap();
        let registered = registry
            .register(id.into(), hello, BTreeMap::new(), remote, tx)
            .await
            .unwrap();
        (registered.session, rx)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn every_replica_lists_the_fleet_and_a_dead_replicas_agents_turn_lost() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let settings = StoreSettings::Postgres(pg);
        let dir = tempfile::tempdir().unwrap();
        let (a, _sa, a_tasks) = replica(&settings, dir.path(), "a").await;
        let (b, _sb, _b_tasks) = replica(&settings, dir.path(), "b").await;
        let (_session, _rx) = connect(&a, "vm-1").await;
        let listed = eventually(
            "b lists a's agent",
            async || b.list().await,
            |l| l.iter().any(|v| v.id == "vm-1"),
        )
        .await;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].controller.as_str(), listed[0].state),
            ("a", AgentState::Connected)
        );
        assert_eq!(listed[0].hostname, "vm-1.example");
        assert!(b.list_local().await.is_empty(), "b holds no session");
        let fleet = b.fleet().await.unwrap();
        assert_eq!(fleet.replicas, ["a", "b"]);
        assert_eq!(fleet.counts()["a"]["connected"], 1);
        // Each lease names the replica's interfaces, for `interface:` targets' status.
        let status = b.policy_status(None).await;
        assert_eq!(status.len(), 1, "{status:?}");
        let interfaces = b.fleet.as_ref().unwrap().interfaces();
        if !local_interfaces().is_empty() {
            assert_eq!(interfaces["a"], local_interfaces());
        }

        // a dies without a word (the writer first, so that it cannot give its lease back): its
        // lease runs out.
        let [registry_task, writer] = a_tasks;
        writer.abort();
        assert!(writer.await.unwrap_err().is_cancelled());
        registry_task.abort();
        let listed = eventually(
            "b shows a's agent lost",
            async || b.list().await,
            |l| l.first().is_some_and(|v| v.state == AgentState::Lost),
        )
        .await;
        assert_eq!(listed[0].controller, "");
        let why = listed[0].state_reason.clone().unwrap_or_default();
        assert!(why.contains("has not renewed its lease"), "{why}");
        assert_eq!(b.fleet().await.unwrap().replicas, ["b"]);

        // It reconnects to b, which takes its row over.
        let (_session, _rx) = connect(&b, "vm-1").await;
        let listed = b.list().await;
        assert_eq!(
            (listed[0].controller.as_str(), listed[0].state),
            ("b", AgentState::Connected)
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_policy_applied_on_one_replica_shows_in_the_others_status() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let settings = StoreSettings::Postgres(pg);
        let dir = tempfile::tempdir().unwrap();
        let (a, _sa, _a_tasks) = replica(&settings, dir.path(), "a").await;
        let (b, _sb, _b_tasks) = replica(&settings, dir.path(), "b").await;
        a.set_policies(Vec::new(), policy(5)).await;
        b.set_policies(Vec::new(), policy(5)).await;
        let (session, _rx) = connect(&a, "vm-1").await;
        let status = eventually(
            "b sees the rollout pending",
            async || b.policy_status(None).await,
            |s| !s.is_empty(),
        )
        .await;
        assert_eq!((status[0].version_wanted, status[0].pending), (5, true));
        let applied = proto::PolicyStatus {
            version: 5,
            applied: true,
            error: String::new(),
        };
        let acked = Instant::now();
        a.message("vm-1", session, Msg::PolicyStatus(applied)).await;
        let status = eventually(
            "b sees the ack",
            async || b.policy_status(Some("default".into())).await,
            |s| s.first().is_some_and(|s| !s.pending),
        )
        .await;
        eprintln!("an ack on a seen on b after {:?}", acked.elapsed());
        assert_eq!(status[0].agent_id, "vm-1");
        assert_eq!(status[0].version_applied, 5);
        // A newer policy set through b is pending there until a's agent applies it, and an
        // old refusal does not count against it.
        b.set_policies(Vec::new(), policy(6)).await;
        let s = b.policy_status(None).await;
        assert_eq!(
            (s[0].version_wanted, s[0].pending, s[0].error.as_str()),
            (6, true, "")
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_embedded_store_is_not_shared_and_lists_this_controllers_agents() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&StoreSettings::default(), dir.path(), "a")
            .await
            .unwrap();
        assert!(!store.is_shared());
        let (registry, task) = Registry::spawn("a", Events::new(16), Health::default(), 10);
        tokio::spawn(task);
        let (_session, _rx) = connect(&registry, "vm-1").await;
        assert!(registry.fleet().await.is_none());
        assert!(registry.presence_stats().is_none());
        assert_eq!(registry.list().await.len(), 1);
        assert!(store.load::<PresenceRow>(PRESENCE).unwrap().is_empty());
        assert!(store.load::<ReplicaRow>(REPLICAS).unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_fleet_that_cannot_be_read_is_counted_and_answered_as_last_read() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let url = pg.url.clone();
        let settings = StoreSettings::Postgres(pg);
        let dir = tempfile::tempdir().unwrap();
        let (a, _sa, _a_tasks) = replica(&settings, dir.path(), "a").await;
        let (b, _sb, _b_tasks) = replica(&settings, dir.path(), "b").await;
        let (_session, _rx) = connect(&a, "vm-1").await;
        eventually(
            "b lists a's agent",
            async || b.list().await,
            |l| !l.is_empty(),
        )
        .await;
        assert_eq!(b.presence_stats().unwrap().errors(), (0, 0));
        let client = crate::store::testpg::client(&url).await;
        client
            .batch_execute("DROP TABLE tapgraph.replicas")
            .await
            .unwrap();
        // Long after a's lease would have run out, b answers with the fleet as last read.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let listed = b.list().await;
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].controller.as_str(), listed[0].state),
            ("a", AgentState::Connected)
        );
        assert!(b.presence_stats().unwrap().errors().1 >= 1);
        // The writers' leases go to that table: their rounds fail, and are counted.
        eventually(
            "a counts the failed writes",
            async || a.presence_stats().unwrap().errors().0,
            |w| *w > 0,
        )
        .await;
        // a's own agent is listed on a whatever the database says.
        assert_eq!(a.list().await[0].controller, "a");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_mirror_streams_of_a_replica_show_on_the_others_while_it_holds_its_lease() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let settings = StoreSettings::Postgres(pg);
        let dir = tempfile::tempdir().unwrap();
        let (a, store_a, a_tasks) = replica(&settings, dir.path(), "a").await;
        let (b, _sb, _b_tasks) = replica(&settings, dir.path(), "b").await;
        let stream = || crate::mirror::StatsView {
            agent: "vm-1".into(),
            target: "pcap:vm-1".into(),
            batches: 3,
            batches_lost: 0,
            packets_received: 30,
            bytes_received: 3_000,
            packets_written: 29,
            bytes_written: 2_900,
            dropped: BTreeMap::from([("queue", 1)]),
            dedup_evicted: 0,
            lost_in_transit: 0,
            invalid_batches: BTreeMap::new(),
            last_error: None,
            target_note: None,
            delay_p50_us: Some(120),
            delay_p99_us: None,
            direct: false,
        };
        let started = a.fleet.as_ref().unwrap().started_at_unix_ms;
        let stop = tokio_util::sync::CancellationToken::new();
        let writer = tokio::spawn(write_mirrors(
            store_a,
            "a".into(),
            started,
            move || vec![stream()],
            Arc::default(),
            stop.clone(),
        ));
        let seen = eventually(
            "b shows a's mirror stream",
            async || b.remote_mirrors().await,
            |m| !m.is_empty(),
        )
        .await;
        assert_eq!(seen.len(), 1);
        let t = &seen[0];
        assert_eq!((t.replica.as_str(), t.agent.as_str()), ("a", "vm-1"));
        assert_eq!((t.packets_written, t.dropped["queue"]), (29, 1));
        let wire = t.clone().into_proto();
        assert_eq!((wire.delay_p50_us, wire.delay_p99_us), (120, 0));
        assert!(
            a.remote_mirrors().await.is_empty(),
            "its own are not remote"
        );
        // a dies: once its lease runs out, its streams are not shown.
        stop.cancel();
        writer.await.unwrap();
        let [registry_task, presence_writer] = a_tasks;
        presence_writer.abort();
        let _ = presence_writer.await;
        registry_task.abort();
        eventually(
            "b stops showing a's streams",
            async || b.remote_mirrors().await,
            |m| m.is_empty(),
        )
        .await;
    }

    #[test]
    fn the_fleet_shows_on_metrics_per_replica_and_state() {
        let scrape = crate::metrics::Scrape {
            fleet: BTreeMap::from([(
                "b".to_string(),
                BTreeMap::from([("connected", 2), ("degraded", 0), ("lost", 1)]),
            )]),
            presence_errors: Some((3, 4)),
            ..Default::default()
        };
        let text = scrape.render().unwrap();
        for line in [
            "tapgraph_fleet_agents{replica=\"b\",state=\"connected\"} 2",
            "tapgraph_fleet_agents{replica=\"b\",state=\"lost\"} 1",
            "tapgraph_presence_errors_total{operation=\"write\"} 3",
            "tapgraph_presence_errors_total{operation=\"read\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
        if std::env::var_os("TAPGRAPH_PRINT_METRICS").is_some() {
            println!("{text}");
        }
    }

    /// What a query pays to read the fleet: both tables at 2,000 agents (printed, not asserted).
    #[tokio::test(flavor = "multi_thread")]
    async fn reading_two_thousand_agents() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let settings = StoreSettings::Postgres(pg);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&settings, dir.path(), "a").await.unwrap();
        let template = view("x", "a", AgentState::Connected);
        let mut batch = Batch::default();
        for n in 0..2_000 {
            let mut v = template.clone();
            v.id = format!("agent-{n:04}");
            batch.put(PRESENCE, &v.id, &row(&v, "a", 1)).unwrap();
        }
        batch
            .put(REPLICAS, "a", &lease("a", 1, now_unix_ms()))
            .unwrap();
        store.commit(batch).unwrap();
        let fleet = Fleet::new(store, LEASE, Arc::default());
        let mut best = Duration::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            let view = fleet.merge("b", Vec::new());
            best = best.min(t.elapsed());
            assert_eq!(view.agents.len(), 2_000);
        }
        let bytes = serde_json::to_vec(&row(&template, "a", 1)).unwrap().len();
        eprintln!("fleet read of 2,000 agents ({bytes} bytes a row): {best:?} (best of 5)");
    }
}
