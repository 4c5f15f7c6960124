//! The topology task: owns the dependency map. Snapshots arrive as messages from agent sessions;
//! each is validated, applied to the model and written through to the state store, so a restart
//! loses nothing. Queries read the model; nothing else touches it.
//!
//! This file is the handle ([`Topology`]) and what crosses it. The rest, one job a file:
//! - [`task`](self::task): the owning task, its loop and what each message does;
//! - [`ingest`]: a snapshot's rows read and checked; [`model`]: the map itself, with
//!   [`reporters`] the observations backing each edge; [`persist`]: its form in the store;
//! - [`announce`]: address conflicts told to operators;
//! - [`follow`]: with replicas, the tables other replicas write, applied here, and the cleanup
//!   that one replica leads;
//! - [`graph`]: the typed map a query returns, [`view`] decorating it with names and labels,
//!   [`wire`] its protobuf form, made only where a handler sends it; [`labels`], [`names`].

mod announce;
mod follow;
pub mod graph;
pub mod history;
pub mod ingest;
pub mod labels;
pub mod model;
pub mod names;
mod persist;
mod reporters;
mod task;
pub mod view;
pub mod wire;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tapgraph::proto;
use tokio::sync::{mpsc, oneshot};

use crate::events::Events;
use crate::store::{Store, StoreError};
use task::Task;

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
    /// What changed on the map is kept this long (see [`history`]).
    pub history_retention: Duration,
    /// Each edge's traffic is summed in history over intervals of this length.
    pub history_interval: Duration,
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
    /// `rows_skipped` by [`ingest::Invalid::reason`].
    pub rows_skipped_by_reason: BTreeMap<&'static str, u64>,
    pub store_errors: u64,
    /// History changes dropped: the store refused them until more waited than are kept.
    pub history_dropped: u64,
    /// Rows the map holds now, and its budget (`topology.max_rows`).
    pub rows: u64,
    pub max_rows: u64,
    /// Addresses claimed by more than one host now.
    pub address_conflicts: u64,
    /// Agents' tables other replicas wrote, applied to this replica's map.
    pub remote_tables_applied: u64,
    /// Traffic flows an agent's table dropped, least recently moved first, to stay within
    /// `topology.max_entries`.
    pub traffic_flows_evicted: u64,
    /// Traffic flows past `topology.max_entries` in one snapshot, refused.
    pub traffic_flows_refused: u64,
    /// Whether this replica removes expired edges from the store (one replica does; always
    /// this one with the embedded store).
    pub leader: bool,
}

/// What an operator asks of the map.
#[derive(Debug, Clone, Default)]
pub struct GraphQuery {
    pub include_control: bool,
    pub include_inactive: bool,
}

/// A snapshot offered to the map, and where its outcome goes.
struct Offered {
    agent: String,
    hostname: String,
    snapshot: Box<proto::ConnectionSnapshot>,
    reply: oneshot::Sender<Result<(), Refusal>>,
}

enum Command {
    Snapshot(Offered),
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
/// durable within a second). Queries wait for room instead of being shed;
/// [`Topology::map`] answers with the typed map as of every snapshot answered before it.
#[derive(Clone)]
pub struct Topology {
    tx: mpsc::Sender<Command>,
    /// Bumped whenever the model changes: readers that mirror it can skip a pass when it did not.
    generation: Arc<AtomicU64>,
    /// Snapshots shed because the queue was full.
    shed: Arc<AtomicU64>,
    /// History is read from the store directly: the task only writes it.
    store: Store,
    history_retention: Duration,
}

fn now_ms() -> u64 {
    tapgraph::time::unix_nanos() / 1_000_000
}

impl Topology {
    /// Loads the persisted map and starts the task. Address conflicts and refusals for the
    /// budget go to `events`. With replicas, the task follows the tables the others write and
    /// removes expired edges from the store while it leads [`task::CLEANUP_ROLE`].
    pub fn spawn(
        store: Store,
        settings: TopologySettings,
        events: Events,
    ) -> Result<(Self, impl std::future::Future<Output = ()>), StoreError> {
        // Before the load: a table written meanwhile is heard, not missed.
        let changes = store.changes();
        let restored = persist::load(&store, now_ms())?;
        let leading = store.leadership(task::CLEANUP_ROLE);
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let history_store = store.clone();
        let generation = Arc::new(AtomicU64::new(1));
        let task = Task::new(
            store,
            settings,
            events,
            restored,
            generation.clone(),
            changes,
            leading,
        );
        let shed = Arc::new(AtomicU64::new(0));
        Ok((
            Self {
                tx,
                generation,
                shed,
                store: history_store,
                history_retention: settings.history_retention,
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
        let cmd = Command::Snapshot(Offered {
            agent: agent.to_string(),
            hostname: hostname.to_string(),
            snapshot: Box::new(snapshot),
            reply,
        });
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

    /// Every change history holds up to `to_ms` (Unix ms), oldest first, and the horizon: the
    /// oldest time history rebuilds the map at. Read from the store, so with replicas any of
    /// them answers with what the recording one wrote.
    pub async fn history(&self, to_ms: u64) -> Result<(Vec<history::Change>, u64), StoreError> {
        let store = self.store.clone();
        let mut changes =
            tokio::task::spawn_blocking(move || store.load::<history::Change>(history::HISTORY))
                .await
                .map_err(|e| StoreError::Failed(format!("reading history: {e}")))??;
        changes.retain(|c| c.at_ms <= to_ms);
        changes.sort_by_cached_key(|c| (c.at_ms, c.appeared, c.item.id()));
        let horizon = now_ms().saturating_sub(self.history_retention.as_millis() as u64);
        Ok((changes, horizon))
    }

    /// The task's counters and the map's size now, with the snapshots the handle shed.
    pub async fn stats(&self) -> Stats {
        let (reply, rx) = oneshot::channel();
        let _ = self.tx.send(Command::Stats { reply }).await;
        let mut stats = rx.await.unwrap_or_default();
        stats.snapshots_shed_busy = self.shed.load(Ordering::Relaxed);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::task::tests::{addresses, settings};
    use super::*;

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
        // metrics.rs's tests check that this count is rendered as reason="busy".
    }
}
