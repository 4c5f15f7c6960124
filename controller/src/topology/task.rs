//! The task that owns the map. Its loop only dispatches: snapshots (applied in groups and written
//! by one commit), queries, the sync tick (deferred commits made durable, writes a failure left
//! pending retried, memory handed back), the expiry tick (inactive edges past retention removed),
//! and, with replicas, the tables other replicas wrote and this replica's leadership of the
//! cleanup ([`super::follow`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tapgraph::proto;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::announce::Announced;
use super::model::{self, AgentTable, Changes, Conflict, Model};
use super::persist::{self, Restored};
use super::{
    Command, GraphQuery, Offered, Refusal, Stats, TopologySettings, graph, ingest, now_ms,
};
use crate::events::Events;
use crate::store::{Change, Store, StoreError};

/// Inactive edges past retention are looked for this often.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// Owns the map: the model, its store and its counters, touched by [`Task::run`] alone.
pub(super) struct Task {
    pub(super) events: Events,
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
    synced: Instant,
    deferred: bool,
    pub(super) generation: Arc<AtomicU64>,
    pub(super) model: Model,
    pub(super) sequences: BTreeMap<String, u64>,
    pub(super) store: Store,
    pub(super) settings: TopologySettings,
    pub(super) stats: Stats,
    /// What the store could not take yet: written again until it does.
    pub(super) unwritten: Unwritten,
    /// Agents whose last table this replica applied from their own snapshot (not from another
    /// replica's record): it writes them, and only it.
    pub(super) local: BTreeSet<String>,
    /// Other replicas' changes, subscribed before the map was loaded; `None` once the store is
    /// gone (and always empty for the embedded store).
    pub(super) changes: Option<broadcast::Receiver<Change>>,
    /// A read of other replicas' tables failed: read them all again at the next tick.
    pub(super) reload_due: bool,
    /// Whether this replica runs the cleanup (always, for the embedded store).
    pub(super) leading: watch::Receiver<bool>,
    /// What changed on the map, recorded while this replica leads the cleanup.
    pub(super) history: super::history::State,
}

/// Agents' tables and edges the store refused (the database is down): kept, and written again as
/// the model has them then, until the store takes them. So the store never stays behind the model.
#[derive(Default)]
pub(super) struct Unwritten {
    pub(super) agents: BTreeSet<String>,
    pub(super) edges: BTreeSet<model::EdgeKey>,
    /// The last try.
    tried: Option<Instant>,
}

impl Unwritten {
    pub(super) fn is_empty(&self) -> bool {
        self.agents.is_empty() && self.edges.is_empty()
    }
}

/// While the database is known to be down, pending writes are tried this often, not at every
/// sync tick: a try may wait for a connection timeout, and the task answers nothing meanwhile.
const RETRY_WHILE_DOWN: Duration = Duration::from_secs(5);

/// Agents' tables and edges written again per commit at most, when the store takes writes again
/// after an outage: a fleet's worth in one transaction would hold the task for long.
const RETRY_AGENTS: usize = 256;
const RETRY_EDGES: usize = 4096;

/// The role whose leader removes expired edges from the store (`tapgraph_leader{role=…}`).
pub const CLEANUP_ROLE: &str = "topology_cleanup";

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
pub(super) struct Pending {
    agents: BTreeSet<String>,
    edges: BTreeSet<model::EdgeKey>,
    replies: Vec<Reply>,
}

impl Pending {
    pub(super) fn add(&mut self, changes: Changes) {
        self.edges.extend(changes.edges_upserted);
        self.edges.extend(changes.edges_removed);
    }
}

impl Task {
    /// The task for the map `restored` from `store`; it bumps `generation` at every change.
    /// `changes` (subscribed before the restore) brings other replicas' tables; `leading` says
    /// whether this replica removes expired edges from the store.
    pub(super) fn new(
        store: Store,
        settings: TopologySettings,
        events: Events,
        restored: Restored,
        generation: Arc<AtomicU64>,
        changes: broadcast::Receiver<Change>,
        leading: watch::Receiver<bool>,
    ) -> Self {
        Task {
            unwritten: Unwritten::default(),
            local: BTreeSet::new(),
            changes: Some(changes),
            reload_due: false,
            leading,
            events,
            announced: Announced::default(),
            restored_conflicts: restored.conflicts,
            over_budget: BTreeMap::new(),
            collect_due: false,
            synced: Instant::now(),
            deferred: false,
            generation,
            model: restored.model,
            sequences: restored.sequences,
            store,
            settings,
            stats: Stats::default(),
            history: Default::default(),
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let restored = std::mem::take(&mut self.restored_conflicts);
        self.announced
            .announce(&self.events, None, &restored, Instant::now());
        let mut expiry = tokio::time::interval(EXPIRE_EVERY);
        let mut history = tokio::time::interval(super::history::RECORD_EVERY);
        history.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sync = tokio::time::interval(SYNC_EVERY);
        sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leading = self.leading.clone();
        self.stats.leader = *leading.borrow_and_update();
        // The embedded store's leadership is final (its channel is closed): not listened to.
        let mut leadership_open = true;
        let mut changes = self.changes.take();
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Snapshot(offered)) => self.apply_waiting(offered, &mut rx),
                    Some(cmd) => self.answer(cmd),
                    None => {
                        self.sync();
                        return;
                    }
                },
                _ = sync.tick() => self.tick(rx.is_empty()),
                _ = expiry.tick() => self.expire(),
                _ = history.tick() => self.record_history(),
                change = super::follow::next_change(&mut changes) => self.heard(change, &mut changes),
                changed = leading.changed(), if leadership_open => match changed {
                    Ok(()) => {
                        let leads = *leading.borrow_and_update();
                        self.lead(leads);
                    }
                    Err(_) => leadership_open = false,
                },
            }
        }
    }

    /// Applies `first` and the snapshots waiting behind it, up to [`GROUP`], and writes them by
    /// one commit; a query among them ends the group and is answered after it.
    fn apply_waiting(&mut self, first: Offered, rx: &mut mpsc::Receiver<Command>) {
        let mut pending = Pending::default();
        self.take_offered(&mut pending, first);
        let mut next = None;
        while pending.replies.len() < GROUP {
            match rx.try_recv() {
                Ok(Command::Snapshot(offered)) => self.take_offered(&mut pending, offered),
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

    /// Every [`SYNC_EVERY`]: makes the deferred commits durable, and once no snapshot waits
    /// (`idle`) hands back the memory a large snapshot freed.
    fn tick(&mut self, idle: bool) {
        if self.synced.elapsed() >= SYNC_EVERY {
            self.sync();
        }
        self.retry_unwritten();
        // While the database is known to be down the listener's reconnection brings a resync:
        // no read waits for a timeout meanwhile.
        if self.reload_due && self.store.unavailable().is_none() {
            self.reload();
        }
        if self.collect_due && idle {
            self.collect_due = false;
            release_memory();
        }
    }

    /// Removes the inactive edges past retention. The leader of the cleanup deletes them from
    /// the store; every other replica drops them from its own model only: the same rule on the
    /// same map removes the same edges, and the store is written once.
    pub(super) fn expire(&mut self) {
        let retention = self.settings.retention.as_millis() as u64;
        let changes = self.model.expire(now_ms(), retention);
        if changes.edges_removed.is_empty() {
            return;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        let leads = *self.leading.borrow();
        tracing::info!(
            removed = changes.edges_removed.len(),
            from_the_store = leads,
            "inactive edges past retention removed"
        );
        if leads {
            self.write(BTreeSet::new(), changes.edges_removed);
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
                stats.history_dropped = self.history.dropped;
                let _ = reply.send(stats);
            }
            Command::Snapshot(offered) => {
                let mut pending = Pending::default();
                self.take_offered(&mut pending, offered);
                self.flush(pending);
            }
        }
    }

    /// [`Task::take`] for a snapshot as it came off the queue.
    fn take_offered(&mut self, pending: &mut Pending, offered: Offered) {
        let Offered {
            agent,
            hostname,
            snapshot,
            reply,
        } = offered;
        self.take(pending, &agent, &hostname, &snapshot, reply);
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
        let Pending {
            agents,
            edges,
            replies,
        } = pending;
        if replies.iter().any(|(_, r)| r.is_ok()) {
            self.generation.fetch_add(1, Ordering::AcqRel);
            // The model has the snapshots. A failed write is not the agents' fault: a resync
            // would fail the same way, so what it held is kept and written again.
            self.write(agents, edges);
        }
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
    }

    /// Writes `agents`' tables and `edges` as the model has them. What the store refuses is kept
    /// with what waits already, and written again by [`Task::retry_unwritten`]: while anything
    /// waits, new writes join it instead of each trying the database.
    pub(super) fn write(&mut self, agents: BTreeSet<String>, edges: BTreeSet<model::EdgeKey>) {
        if agents.is_empty() && edges.is_empty() {
            return;
        }
        if self.unwritten.is_empty() {
            match self.persist(&agents, &edges) {
                Ok(()) => return,
                Err(error) => {
                    self.stats.store_errors += 1;
                    self.unwritten.tried = Some(Instant::now());
                    tracing::error!(agents = agents.len(), edges = edges.len(), %error, "cannot persist the map; kept, and written again once the store takes it");
                }
            }
        }
        self.unwritten.agents.extend(agents);
        self.unwritten.edges.extend(edges);
    }

    /// Writes again what the store refused, as the model has it now, in commits of a bounded
    /// size; what it refuses again waits for the next tick (or longer while the database is
    /// known to be down).
    fn retry_unwritten(&mut self) {
        if self.unwritten.is_empty() {
            return;
        }
        if self.store.unavailable().is_some()
            && self
                .unwritten
                .tried
                .is_some_and(|t| t.elapsed() < RETRY_WHILE_DOWN)
        {
            return;
        }
        self.unwritten.tried = Some(Instant::now());
        let (agents, edges) = (self.unwritten.agents.len(), self.unwritten.edges.len());
        while !self.unwritten.is_empty() {
            let chunk_agents: BTreeSet<String> =
                std::iter::from_fn(|| self.unwritten.agents.pop_first())
                    .take(RETRY_AGENTS)
                    .collect();
            let chunk_edges: BTreeSet<model::EdgeKey> =
                std::iter::from_fn(|| self.unwritten.edges.pop_first())
                    .take(RETRY_EDGES)
                    .collect();
            if let Err(error) = self.persist(&chunk_agents, &chunk_edges) {
                self.stats.store_errors += 1;
                tracing::debug!(%error, "the map's pending writes are refused again");
                self.unwritten.agents.extend(chunk_agents);
                self.unwritten.edges.extend(chunk_edges);
                return;
            }
        }
        tracing::info!(
            agents,
            edges,
            "the map's pending writes are in the store: it holds the map again"
        );
    }

    /// Applies `s` to the model, or says why not: it is too large, its base is not the last
    /// applied, or it would take the map past its budget.
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
        let mut have = self.sequences.get(agent).copied();
        if !s.full && have != Some(s.base_sequence) && self.catch_up(agent, s.base_sequence) {
            have = Some(s.base_sequence);
        }
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
            // Traffic totals are history, not state: a full snapshot keeps them.
            AgentTable {
                traffic: self
                    .model
                    .agents
                    .get(agent)
                    .map(|t| t.traffic.clone())
                    .unwrap_or_default(),
                ..AgentTable::default()
            }
        } else {
            self.model.agents.get(agent).cloned().unwrap_or_default()
        };
        let skipped = ingest::merge(&mut table, s, &mut self.stats);
        let (skipped_flows, flows) = ingest::merge_traffic(
            &mut table,
            s,
            now,
            self.settings.max_entries,
            &mut self.stats,
        );
        self.stats.rows_skipped += skipped_flows.count;
        if let Some(first) = &skipped_flows.first {
            tracing::warn!(%agent, sequence = s.sequence, refused = skipped_flows.count, %first, "snapshot traffic refused");
        }
        let retention = self.settings.retention.as_millis() as u64;
        table
            .traffic
            .retain(|_, f| now.saturating_sub(f.last_ms) < retention);
        // Flows outlive their sockets (for the retention): bounded like a snapshot's rows, the
        // least recently moved go first.
        let over = table
            .traffic
            .len()
            .saturating_sub(self.settings.max_entries);
        if over > 0 {
            let mut by_age: Vec<(u64, model::FlowKey)> = table
                .traffic
                .iter()
                .map(|(k, f)| (f.last_ms, k.clone()))
                .collect();
            by_age.sort_unstable();
            for (_, key) in by_age.into_iter().take(over) {
                table.traffic.remove(&key);
            }
            self.stats.traffic_flows_evicted += over as u64;
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
        let mut changes = self.model.replace(agent, table, now);
        for flow in &flows {
            self.model.ensure_flow_edge(agent, flow, now, &mut changes);
        }
        self.announced.announce(
            &self.events,
            Some(agent),
            &changes.conflicts,
            Instant::now(),
        );
        self.sequences.insert(agent.to_string(), s.sequence);
        self.local.insert(agent.to_string());
        self.stats.snapshots_applied += 1;
        pending.agents.insert(agent.to_string());
        pending.add(changes);
        Ok(())
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

    /// Writes `agents`' tables and `edges` as the model has them now.
    /// Durable at once when the last durable commit is [`SYNC_EVERY`] old, deferred otherwise.
    pub(super) fn persist(
        &mut self,
        agents: &BTreeSet<String>,
        edges: &BTreeSet<model::EdgeKey>,
    ) -> Result<(), StoreError> {
        let batch = persist::batch(&self.model, &self.sequences, agents, edges)?;
        if self.synced.elapsed() >= SYNC_EVERY {
            self.store.commit(batch)?;
            self.synced = Instant::now();
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
pub(super) mod tests {
    use super::*;
    use crate::topology::Topology;

    pub(in crate::topology) fn settings() -> TopologySettings {
        TopologySettings {
            ttl: Duration::from_secs(120),
            retention: Duration::from_secs(3600),
            history_retention: Duration::from_secs(86_400),
            history_interval: Duration::from_secs(3600),
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
            unwritten: Unwritten::default(),
            local: BTreeSet::new(),
            changes: None,
            reload_due: false,
            leading: watch::channel(true).1,
            history: Default::default(),
        }
    }

    /// A full snapshot of nothing but `addresses`.
    pub(in crate::topology) fn addresses(
        sequence: u64,
        addresses: &[String],
    ) -> proto::ConnectionSnapshot {
        proto::ConnectionSnapshot {
            sequence,
            full: true,
            addresses: addresses.to_vec(),
            ..Default::default()
        }
    }

    pub(in crate::topology) fn apply(
        task: &mut Task,
        agent: &str,
        s: &proto::ConnectionSnapshot,
    ) -> Result<(), Refusal> {
        let mut pending = Pending::default();
        let (reply, mut rx) = oneshot::channel();
        task.take(&mut pending, agent, agent, s, reply);
        task.flush(pending);
        rx.try_recv().unwrap()
    }

    fn traffic_row(
        direction: proto::Direction,
        local: &str,
        remote: &str,
        port: u32,
        sent: u64,
        received: u64,
    ) -> proto::FlowTraffic {
        proto::FlowTraffic {
            direction: direction as i32,
            local_ip: local.into(),
            remote_ip: remote.into(),
            server_port: port,
            bytes_sent: sent,
            bytes_received: received,
            segments_sent: 1,
            segments_received: 1,
            srtt_us: 10_000,
            min_rtt_us: 9_000,
            ..Default::default()
        }
    }

    /// `web` (10.0.0.1) talks to `db` (10.0.0.2:5432); both measure it. An agentless client
    /// (10.0.0.9) talks to `db` too; only `db` measures that. A connection of `web` to
    /// 203.0.113.7:443 lived between two snapshots: no row, only its traffic.
    #[test]
    fn edges_carry_traffic_counted_once_and_kept_across_full_snapshots() {
        use proto::Direction::{Client, Server};
        let dir = tempfile::tempdir().unwrap();
        let mut t = task(&dir, Events::new(16));
        let row = |direction: proto::Direction, local: &str, remote: &str, port: u32| {
            proto::ConnectionEntry {
                direction: direction as i32,
                local_ip: local.into(),
                remote_ip: remote.into(),
                server_port: port,
                protocol: proto::Protocol::Tcp as i32,
                sockets: 1,
                ..Default::default()
            }
        };
        let snapshot =
            |sequence: u64,
             full: bool,
             address: &str,
             entries: Vec<proto::ConnectionEntry>,
             traffic: Vec<proto::FlowTraffic>| proto::ConnectionSnapshot {
                sequence,
                full,
                base_sequence: sequence - 1,
                taken_at_unix_nanos: 3_000_000_000 * sequence,
                traffic_since_unix_nanos: 3_000_000_000 * (sequence - 1),
                addresses: vec![address.into()],
                entries,
                listeners: vec![proto::ListeningService {
                    ip: "0.0.0.0".into(),
                    port: 5432,
                    protocol: proto::Protocol::Tcp as i32,
                    ..Default::default()
                }],
                traffic,
                ..Default::default()
            };
        let db_rows = vec![
            row(Server, "10.0.0.2", "10.0.0.1", 5432),
            row(Server, "10.0.0.2", "10.0.0.9", 5432),
        ];
        let db_traffic = vec![
            traffic_row(Server, "10.0.0.2", "10.0.0.1", 5432, 300, 1000),
            traffic_row(Server, "10.0.0.2", "10.0.0.9", 5432, 70, 20),
        ];
        apply(
            &mut t,
            "db",
            &snapshot(1, true, "10.0.0.2", db_rows.clone(), db_traffic),
        )
        .unwrap();
        let web_rows = vec![row(Client, "10.0.0.1", "10.0.0.2", 5432)];
        let web_traffic = vec![
            // Received counts the server's FIN here: the server's own count of what it sent
            // is the one shown.
            traffic_row(Client, "10.0.0.1", "10.0.0.2", 5432, 1000, 301),
            traffic_row(Client, "10.0.0.1", "203.0.113.7", 443, 5, 6),
        ];
        apply(
            &mut t,
            "web",
            &snapshot(1, true, "10.0.0.1", web_rows.clone(), web_traffic),
        )
        .unwrap();
        // Another interval: web sent 500 more; then a full snapshot (a resync) without traffic.
        let more = vec![traffic_row(Client, "10.0.0.1", "10.0.0.2", 5432, 500, 0)];
        apply(&mut t, "web", &snapshot(2, false, "10.0.0.1", vec![], more)).unwrap();
        let query = GraphQuery {
            include_control: true,
            include_inactive: true,
        };
        let web_db = |t: &Task| {
            t.map(&query)
                .edges
                .into_iter()
                .find(|e| e.to == "svc:db/tcp/5432" && e.from == "host:web")
                .and_then(|e| e.traffic)
                .unwrap()
        };
        // The last interval was 3 s long and carried 500 bytes up.
        let tr = web_db(&t);
        assert_eq!((tr.sent_per_second, tr.received_per_second), (166, 0));
        assert_eq!((tr.srtt_us, tr.min_rtt_us), (10_000, 9_000));
        apply(
            &mut t,
            "web",
            &snapshot(3, true, "10.0.0.1", web_rows, vec![]),
        )
        .unwrap();
        // Nothing moved in the latest one.
        assert_eq!(web_db(&t).sent_per_second, 0);
        let figures: BTreeMap<(String, String), (u64, u64, &str)> = t
            .map(&query)
            .edges
            .iter()
            .filter_map(|e| {
                let tr = e.traffic.as_ref()?;
                let by = tr.measured_by.as_str();
                Some((
                    (e.from.clone(), e.to.clone()),
                    (tr.bytes_sent, tr.bytes_received, by),
                ))
            })
            .collect();
        let key = |from: &str, to: &str| (from.to_string(), to.to_string());
        assert_eq!(
            figures,
            BTreeMap::from([
                (key("host:web", "svc:db/tcp/5432"), (1500, 300, "both")),
                (key("addr:10.0.0.9", "svc:db/tcp/5432"), (20, 70, "server")),
                (key("host:web", "addr:203.0.113.7"), (5, 6, "client")),
            ])
        );
    }

    /// An agent's flows are bounded like its rows: past `topology.max_entries` (100 here) the
    /// least recently moved go, counted.
    #[test]
    fn traffic_flows_are_bounded_least_recently_moved_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = task(&dir, Events::new(16));
        let flows = |sequence: u64, range: std::ops::Range<u32>| proto::ConnectionSnapshot {
            sequence,
            full: sequence == 1,
            base_sequence: sequence - 1,
            addresses: vec!["10.0.0.1".into()],
            traffic: range
                .map(|i| {
                    let remote = format!("10.1.{}.{}", i / 250, i % 250 + 1);
                    traffic_row(proto::Direction::Client, "10.0.0.1", &remote, 443, 1, 1)
                })
                .collect(),
            ..Default::default()
        };
        apply(&mut t, "web", &flows(1, 0..80)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        apply(&mut t, "web", &flows(2, 80..150)).unwrap();
        let kept = &t.model.agents["web"].traffic;
        assert_eq!(kept.len(), 100);
        assert_eq!(t.stats.traffic_flows_evicted, 50);
        // The 70 of the later snapshot are all kept.
        let remote = |i: u32| -> std::net::IpAddr {
            format!("10.1.{}.{}", i / 250, i % 250 + 1).parse().unwrap()
        };
        assert!((80..150).all(|i| kept.keys().any(|k| k.remote_ip == remote(i))));
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

    /// The first start of a version that records history, over a map restored from the store:
    /// that map is history's starting point, recorded without announcing each edge as a new
    /// dependency; what changes after is announced.
    #[test]
    fn history_starts_from_the_map_without_announcing_it() {
        use crate::topology::history::{Change, HISTORY};
        let dir = tempfile::tempdir().unwrap();
        let events = Events::new(64);
        let mut rx = events.subscribe();
        let mut t = task(&dir, events);
        let client = |remote: &str| proto::ConnectionSnapshot {
            sequence: 1,
            full: true,
            addresses: vec!["10.0.0.1".into()],
            entries: vec![proto::ConnectionEntry {
                direction: proto::Direction::Client as i32,
                local_ip: "10.0.0.1".into(),
                remote_ip: remote.into(),
                server_port: 6379,
                protocol: proto::Protocol::Tcp as i32,
                process: Some(proto::ProcessInfo {
                    name: "redis-cli".into(),
                    ..Default::default()
                }),
                sockets: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        apply(&mut t, "web", &client("10.0.0.9")).unwrap();
        t.record_history();
        let edges = |rx: &mut tokio::sync::broadcast::Receiver<proto::Event>| {
            drain(rx).into_iter().filter(|e| e.kind == "edge").count()
        };
        assert_eq!(edges(&mut rx), 0, "the map as it was is no news");
        let recorded: Vec<Change> = t.store.load(HISTORY).unwrap();
        assert!(
            recorded.iter().any(|c| c.item.kind() == "edge"),
            "{recorded:?}"
        );
        apply(&mut t, "app", &client("10.0.0.8")).unwrap();
        t.record_history();
        assert_eq!(edges(&mut rx), 1, "a new dependency after it is");
    }

    /// Two replicas on one database: the one leading the cleanup records history, the other
    /// reads the same records; when the lead moves, the new leader reads history back first,
    /// so nothing is recorded twice, and records what changes from then on.
    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_replicas_share_history_and_record_each_change_once() {
        use crate::store::{StoreSettings, testpg};
        use crate::topology::history::{Change, HISTORY};
        let Some(pg) = testpg::database().await else {
            return;
        };
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut replicas = Vec::new();
        for (dir, name, leads) in [(&dir_a, "a", true), (&dir_b, "b", false)] {
            let store = Store::connect(&StoreSettings::Postgres(pg.clone()), dir.path(), name)
                .await
                .unwrap();
            let mut t = task(dir, Events::new(16));
            t.store = store;
            let (lead, leading) = watch::channel(leads);
            t.leading = leading;
            // Both replicas hold the whole map (the follower's comes through `follow`).
            apply(&mut t, "web", &addresses(1, &["10.0.0.1".into()])).unwrap();
            apply(&mut t, "db", &addresses(1, &["10.0.0.2".into()])).unwrap();
            replicas.push((t, lead));
        }
        let read = |t: &Task| -> Vec<(bool, String)> {
            let mut changes: Vec<Change> = t.store.load(HISTORY).unwrap();
            changes.sort_by_key(|c| (c.at_ms, c.item.id()));
            changes.iter().map(|c| (c.appeared, c.item.id())).collect()
        };
        let record = |replicas: &mut Vec<(Task, watch::Sender<bool>)>| {
            for (t, _) in replicas.iter_mut() {
                t.record_history();
            }
        };
        record(&mut replicas);
        let both = vec![
            (true, "host:db".to_string()),
            (true, "host:web".to_string()),
        ];
        assert_eq!(read(&replicas[1].0), both, "b reads what a recorded");
        // The lead moves to b.
        replicas[0].1.send(false).unwrap();
        replicas[1].1.send(true).unwrap();
        record(&mut replicas);
        assert_eq!(read(&replicas[0].0), both, "nothing recorded twice");
        for (t, _) in replicas.iter_mut() {
            t.model.remove("web");
        }
        record(&mut replicas);
        let mut all = both.clone();
        all.push((false, "host:web".into()));
        assert_eq!(read(&replicas[0].0), all, "b recorded the change, once");
    }

    /// The database refuses the map's writes (here: its table is gone for a while): the
    /// snapshots are answered, and what they changed is written once the store takes it again.
    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_a_refused_write_is_kept_and_written_once_the_store_takes_it() {
        use crate::store::{StoreSettings, testpg};
        let Some(pg) = testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&StoreSettings::Postgres(pg.clone()), dir.path(), "a")
            .await
            .unwrap();
        let mut t = task(&dir, Events::new(16));
        t.store = store.clone();
        let admin = crate::store::testpg::client(&pg.url).await;
        let rename = |from: &str, to: &str| format!("ALTER TABLE tapgraph.{from} RENAME TO {to}");
        admin
            .batch_execute(&rename("topology_agents", "away"))
            .await
            .unwrap();
        apply(&mut t, "web", &addresses(1, &["10.0.0.1".into()])).unwrap();
        assert_eq!(t.stats.store_errors, 1);
        assert!(t.unwritten.agents.contains("web"));
        // The next one waits with it: the database is tried again at the tick, not per snapshot.
        apply(&mut t, "web", &addresses(2, &["10.0.0.2".into()])).unwrap();
        assert_eq!(t.stats.store_errors, 1);
        t.tick(true);
        assert_eq!(t.stats.store_errors, 2, "still refused");
        assert!(!t.unwritten.is_empty());
        admin
            .batch_execute(&rename("away", "topology_agents"))
            .await
            .unwrap();
        t.tick(true);
        assert!(t.unwritten.is_empty());
        let stored = persist::read_agent(&store, "web").unwrap().unwrap();
        assert_eq!(stored.sequence, 2);
        assert_eq!(stored.table, t.model.agents["web"]);
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
                history_retention: Duration::from_secs(86_400),
                history_interval: Duration::from_secs(3600),
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
                unwritten: Unwritten::default(),
                local: BTreeSet::new(),
                changes: None,
                reload_due: false,
                leading: watch::channel(true).1,
                history: Default::default(),
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
