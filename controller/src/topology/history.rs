//! What changed on the map, and when: each edge, listener and host appearing and going, kept in
//! the state store for `topology.history_retention` (so replicas on PostgreSQL share it like the
//! rest of the map).
//!
//! History is not hooked into every model change: a [`Recorder`] compares, every few seconds,
//! what the map holds present with what history holds open, and writes the difference. So a
//! change is recorded whatever path made it (snapshot, expiry, another replica's table, a
//! restart), and once: only the replica leading the map's cleanup records, and a replica that
//! takes the lead reads the open items back from the store first.
//!
//! - An edge is present while active (seen within `topology.ttl`): a connection that lives a
//!   millisecond is an edge that appears and goes once, not at every snapshot. It appears at its
//!   first sighting when history never held it, else when it was seen again. It goes when no
//!   agent reported it any more (as noticed, within [`RECORD_EVERY`]), or at its last sighting
//!   when its agent went silent. The agents' own connections to the controller are left out.
//! - A listener is present while its host's table holds it, a host while the map holds its
//!   table; both change at the time they were noticed.
//!
//! Beside the changes, each edge's traffic is summed per `topology.history_interval` (1 h by
//! default): one record per edge that moved bytes in the interval, dated at its end.
//!
//! Retention keeps every change younger than the horizon, and of older ones only each item's
//! last if it appeared: the map at any time inside the horizon can be rebuilt, and an item
//! present for months costs one record.

use std::collections::{BTreeMap, HashMap};

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use std::time::{Duration, Instant};

use super::model::{AgentId, EdgeKey, ListenerKey, Model};
use super::now_ms;
use super::task::Task;
use crate::events::Events;
use crate::store::{Batch, Table};

pub(crate) const HISTORY: Table = TableDefinition::new("topology_history");

/// Something that can appear on the map and go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Item {
    Edge {
        key: EdgeKey,
        /// The connecting process when it appeared.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        process: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        via: String,
    },
    Listener {
        agent: AgentId,
        listener: ListenerKey,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        process: String,
    },
    Host {
        agent: AgentId,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        hostname: String,
    },
    /// What an edge carried over one interval, ending at the change's time: not something that
    /// appears or goes, a sum kept beside the changes.
    Traffic {
        key: EdgeKey,
        interval_ms: u64,
        bytes_sent: u64,
        bytes_received: u64,
    },
}

/// An item's identity, whatever its details.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ItemKey {
    Edge(EdgeKey),
    Listener(AgentId, ListenerKey),
    Host(AgentId),
    Traffic(EdgeKey),
}

impl Item {
    pub fn key(&self) -> ItemKey {
        match self {
            Item::Edge { key, .. } => ItemKey::Edge(key.clone()),
            Item::Listener {
                agent, listener, ..
            } => ItemKey::Listener(agent.clone(), listener.clone()),
            Item::Host { agent, .. } => ItemKey::Host(agent.clone()),
            Item::Traffic { key, .. } => ItemKey::Traffic(key.clone()),
        }
    }

    /// Stable text id: an edge's id (`host:web|svc:db/tcp/6379|6379/tcp`),
    /// `listener:db|0.0.0.0:6379/tcp` (and `|NETNS` in scope `all`), `host:db`.
    pub fn id(&self) -> String {
        match self {
            Item::Edge { key, .. } => key.id(),
            Item::Listener {
                agent, listener, ..
            } => {
                let l = listener;
                let netns = if l.netns.is_empty() {
                    String::new()
                } else {
                    format!("|{}", l.netns)
                };
                let addr = std::net::SocketAddr::new(l.ip, l.port);
                format!("listener:{agent}|{addr}/{}{netns}", l.protocol.as_str())
            }
            Item::Host { agent, .. } => format!("host:{agent}"),
            Item::Traffic { key, .. } => format!("traffic:{}", key.id()),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Item::Edge { .. } => "edge",
            Item::Listener { .. } => "listener",
            Item::Host { .. } => "host",
            Item::Traffic { .. } => "traffic",
        }
    }
}

/// One item appearing or going.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Unix time in ms.
    pub at_ms: u64,
    /// False: it went.
    pub appeared: bool,
    /// It appeared for the first time within the history kept: a new dependency, not one back.
    #[serde(default)]
    pub first: bool,
    pub item: Item,
}

impl Change {
    /// Its key in the store: time first, so the table reads in order.
    pub fn store_key(&self) -> String {
        format!(
            "{:015}|{}|{}",
            self.at_ms,
            self.item.id(),
            if self.appeared { "+" } else { "-" }
        )
    }
}

/// What history holds open, to find what changed since. Edges apart, keyed by their own key:
/// a pass over a large map looks each one up without building a key.
#[derive(Debug, Default)]
pub(super) struct Recorder {
    /// Edges present as history holds them, with the change that opened them.
    open_edges: HashMap<EdgeKey, Change>,
    /// Listeners and hosts, likewise.
    open: HashMap<ItemKey, Change>,
    /// The time of each item's last change, open or not: a new change is never dated before it.
    last: HashMap<ItemKey, u64>,
    /// Open edges no agent reports any more, since when this recorder noticed: such an edge
    /// stays active for the TTL, then goes at that time (it was still reported just before).
    unreported: HashMap<EdgeKey, u64>,
}

impl Recorder {
    /// The recorder for history as `changes` (in any order) left it.
    pub(super) fn replay(changes: &[Change]) -> Self {
        let mut sorted: Vec<&Change> = changes.iter().collect();
        sorted.sort_by_key(|c| (c.at_ms, c.appeared));
        let mut r = Recorder::default();
        for c in sorted {
            r.note(c);
        }
        r
    }

    fn note(&mut self, change: &Change) {
        if matches!(change.item, Item::Traffic { .. }) {
            return;
        }
        let key = change.item.key();
        self.last.insert(key.clone(), change.at_ms);
        match (key, change.appeared) {
            (ItemKey::Edge(k), true) => {
                self.open_edges.insert(k, change.clone());
            }
            (ItemKey::Edge(k), false) => {
                self.open_edges.remove(&k);
            }
            (key, true) => {
                self.open.insert(key, change.clone());
            }
            (key, false) => {
                self.open.remove(&key);
            }
        }
    }

    /// Items history holds present now.
    #[cfg(test)]
    fn open(&self) -> Vec<Change> {
        self.open_edges
            .values()
            .chain(self.open.values())
            .cloned()
            .collect()
    }

    /// The changes since the last call: what `model` holds present at `now_ms` that history
    /// does not, and the reverse. Sorted by time.
    pub(super) fn reconcile(&mut self, model: &Model, now_ms: u64, ttl_ms: u64) -> Vec<Change> {
        let present = |e: &super::model::Edge| !e.control_plane && e.active(now_ms, ttl_ms);
        let mut changes = Vec::new();
        for e in model.edges.values() {
            if !present(e) || self.open_edges.contains_key(&e.key) {
                continue;
            }
            let last = self.last.get(&ItemKey::Edge(e.key.clone()));
            let at_ms = match last {
                None => e.first_seen_ms,
                Some(last) => e.last_seen_ms.max(*last),
            };
            changes.push(Change {
                at_ms,
                appeared: true,
                first: last.is_none(),
                item: Item::Edge {
                    key: e.key.clone(),
                    process: e.process.clone(),
                    via: e.via.clone(),
                },
            });
        }
        for (key, opened) in &self.open_edges {
            match model.edges.get(key) {
                Some(e) if present(e) => {
                    if e.reporters.is_empty() {
                        self.unreported.entry(key.clone()).or_insert(now_ms);
                    } else {
                        self.unreported.remove(key);
                    }
                }
                // It went when its rows did (as noticed here); when its agent went silent
                // instead, at its last sighting.
                seen => {
                    let last_seen = seen.map_or(now_ms, |e| e.last_seen_ms);
                    let at_ms = self.unreported.remove(key).unwrap_or(last_seen);
                    changes.push(Change {
                        at_ms: at_ms.max(last_seen).max(opened.at_ms),
                        appeared: false,
                        first: false,
                        item: opened.item.clone(),
                    });
                }
            }
        }
        let noticed = |item: Item| Change {
            at_ms: now_ms,
            appeared: true,
            first: !self.last.contains_key(&item.key()),
            item,
        };
        for (agent, table) in &model.agents {
            for (listener, process) in &table.listeners {
                let key = ItemKey::Listener(agent.clone(), listener.clone());
                if !self.open.contains_key(&key) {
                    changes.push(noticed(Item::Listener {
                        agent: agent.clone(),
                        listener: listener.clone(),
                        process: process.clone(),
                    }));
                }
            }
            if !self.open.contains_key(&ItemKey::Host(agent.clone())) {
                changes.push(noticed(Item::Host {
                    agent: agent.clone(),
                    hostname: table.hostname.clone(),
                }));
            }
        }
        for (key, opened) in &self.open {
            let still = match key {
                ItemKey::Listener(agent, l) => model
                    .agents
                    .get(agent)
                    .is_some_and(|t| t.listeners.contains_key(l)),
                ItemKey::Host(agent) => model.agents.contains_key(agent),
                ItemKey::Edge(_) | ItemKey::Traffic(_) => true,
            };
            if !still {
                changes.push(Change {
                    at_ms: now_ms.max(opened.at_ms),
                    appeared: false,
                    first: false,
                    item: opened.item.clone(),
                });
            }
        }
        for c in &mut changes {
            if let Some(last) = self.last.get(&c.item.key()) {
                c.at_ms = c.at_ms.max(*last);
            }
        }
        changes.sort_by_cached_key(|c| (c.at_ms, c.item.id()));
        for c in &changes {
            self.note(c);
        }
        changes
    }
}

/// History is brought up to date this often (an edge's going is noticed within the TTL and
/// this).
pub(super) const RECORD_EVERY: Duration = Duration::from_secs(2);
/// Retention is applied this often.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Changes the store could not take yet, kept at most: beyond, the oldest are dropped (counted).
const PENDING_MAX: usize = 100_000;

/// Each edge's byte totals (sent, received).
type ByteTotals = HashMap<EdgeKey, (u64, u64)>;

/// The task's history: the recorder while this replica records, and what waits to be written.
#[derive(Debug, Default)]
pub(crate) struct State {
    recorder: Option<Recorder>,
    /// The start of the traffic interval running now, and each edge's byte totals then (sent,
    /// received): the next interval's sums are the differences.
    traffic_base: Option<(u64, ByteTotals)>,
    pending: Vec<Change>,
    pruned: Option<Instant>,
    /// History was empty while the map was not (the first start of a version that records it,
    /// over a map restored from the store): the next changes are that map, recorded without
    /// an `edge` event each, or every dependency would be announced (and alerted) as new.
    baseline: bool,
    /// Changes dropped because the store refused them for too long.
    pub(super) dropped: u64,
}

impl Task {
    /// Records what changed since the last call, tells watchers of `events` about edges, and
    /// writes it; applies retention every hour. Only the replica leading the cleanup records
    /// (always the one, with the embedded store); one that takes the lead reads history first.
    pub(super) fn record_history(&mut self) {
        if !*self.leading.borrow() {
            self.history.recorder = None;
            self.history.pruned = None;
            self.history.traffic_base = None;
            return;
        }
        let now = now_ms();
        if self
            .history
            .pruned
            .is_none_or(|at| at.elapsed() >= PRUNE_EVERY)
        {
            self.prune_history(now);
        }
        let Some(recorder) = &mut self.history.recorder else {
            return;
        };
        let ttl = self.settings.ttl.as_millis() as u64;
        let changes = recorder.reconcile(&self.model, now, ttl);
        if std::mem::take(&mut self.history.baseline) {
            if !changes.is_empty() {
                tracing::info!(
                    changes = changes.len(),
                    "history starts from the map as it is; its edges are not announced as new"
                );
            }
        } else {
            for c in &changes {
                announce(&self.events, c);
            }
        }
        self.history.pending.extend(changes);
        let sums = self.sum_traffic(now);
        self.history.pending.extend(sums);
        if self.history.pending.is_empty() {
            return;
        }
        let mut batch = Batch::default();
        let written = self
            .history
            .pending
            .iter()
            .try_for_each(|c| batch.put(HISTORY, &c.store_key(), c))
            .and_then(|()| self.store.commit(batch));
        match written {
            Ok(()) => self.history.pending.clear(),
            Err(error) => {
                let over = self.history.pending.len().saturating_sub(PENDING_MAX);
                if over > 0 {
                    self.history.pending.drain(..over);
                    self.history.dropped += over as u64;
                    tracing::error!(
                        dropped = over,
                        "history changes dropped: the store has refused them too long (tapgraph_topology_history_dropped_changes)"
                    );
                }
                tracing::warn!(pending = self.history.pending.len(), %error, "cannot write the map's history; kept, and written again");
            }
        }
    }

    /// At the end of each `topology.history_interval`: what each edge carried during it, from
    /// the differences of its byte totals. The first interval after this replica starts
    /// recording only takes the totals (what came before is not this interval's).
    fn sum_traffic(&mut self, now: u64) -> Vec<Change> {
        let interval = (self.settings.history_interval.as_millis() as u64).max(1);
        let bucket = now - now % interval;
        if self
            .history
            .traffic_base
            .as_ref()
            .is_some_and(|(start, _)| *start == bucket)
        {
            return Vec::new();
        }
        let ttl = self.settings.ttl.as_millis() as u64;
        let totals: ByteTotals = super::graph::traffic(&self.model, now, ttl)
            .into_iter()
            .filter(|(k, _)| self.model.edges.get(k).is_none_or(|e| !e.control_plane))
            .map(|(k, t)| (k, (t.bytes_sent, t.bytes_received)))
            .collect();
        let mut sums = Vec::new();
        if let Some((start, base)) = self.history.traffic_base.take() {
            for (key, &(sent, received)) in &totals {
                let (sent0, received0) = base.get(key).copied().unwrap_or((0, 0));
                // A total below its base started again (its agent's table was replaced).
                let since = |now: u64, then: u64| if now >= then { now - then } else { now };
                let (sent, received) = (since(sent, sent0), since(received, received0));
                if sent == 0 && received == 0 {
                    continue;
                }
                sums.push(Change {
                    at_ms: bucket,
                    appeared: true,
                    first: false,
                    item: Item::Traffic {
                        key: key.clone(),
                        interval_ms: bucket.saturating_sub(start),
                        bytes_sent: sent,
                        bytes_received: received,
                    },
                });
            }
        }
        sums.sort_by_cached_key(|c| c.item.id());
        self.history.traffic_base = Some((bucket, totals));
        sums
    }

    /// Drops what retention no longer keeps and reads history back: the recorder starts from
    /// what the store holds (another replica may have recorded until now).
    fn prune_history(&mut self, now: u64) {
        let changes: Vec<Change> = match self.store.load(HISTORY) {
            Ok(changes) => changes,
            Err(error) => {
                tracing::warn!(%error, "cannot read the map's history; not recording until it can");
                self.history.recorder = None;
                return;
            }
        };
        let horizon = now.saturating_sub(self.settings.history_retention.as_millis() as u64);
        let expired = expired(&changes, horizon);
        if !expired.is_empty() {
            let mut batch = Batch::default();
            for key in &expired {
                batch.delete(HISTORY, key);
            }
            if let Err(error) = self.store.commit(batch) {
                tracing::warn!(%error, "cannot apply the history's retention; tried again in an hour");
            } else {
                tracing::info!(
                    removed = expired.len(),
                    "history past its retention removed"
                );
            }
        }
        if self.history.recorder.is_none() {
            self.history.baseline = changes.is_empty() && !self.model.agents.is_empty();
        }
        let mut recorder = Recorder::replay(&changes);
        // What waits to be written is history too.
        for c in &self.history.pending {
            recorder.note(c);
        }
        self.history.recorder = Some(recorder);
        self.history.pruned = Some(Instant::now());
    }
}

/// An `edge` event for an edge's change: a new dependency, one back, one gone.
fn announce(events: &Events, c: &Change) {
    let Item::Edge { key, process, via } = &c.item else {
        return;
    };
    let what = match (c.appeared, c.first) {
        (true, true) => "new dependency",
        (true, false) => "dependency back",
        (false, _) => "dependency gone",
    };
    let agent = match &key.from {
        super::model::Node::Host(h) => h.as_str(),
        _ => "",
    };
    let mut fields = BTreeMap::from([
        (
            "change".to_string(),
            if c.appeared { "appeared" } else { "gone" }.to_string(),
        ),
        ("first".to_string(), c.first.to_string()),
        ("from".to_string(), key.from.id()),
        ("to".to_string(), key.to.id()),
        ("port".to_string(), key.port.to_string()),
        ("protocol".to_string(), key.protocol.as_str().to_string()),
        ("at_unix_ms".to_string(), c.at_ms.to_string()),
    ]);
    if !process.is_empty() {
        fields.insert("process".into(), process.clone());
    }
    if !via.is_empty() {
        fields.insert("via".into(), via.clone());
    }
    let process = if process.is_empty() {
        String::new()
    } else {
        format!(" ({process})")
    };
    events.emit_with(
        "edge",
        agent,
        format!(
            "{what}: {} → {} {}/{}{process}",
            key.from.id(),
            key.to.id(),
            key.port,
            key.protocol.as_str()
        ),
        fields,
    );
}

/// The store keys of `changes` that retention drops at `horizon_ms`: every change older than it
/// but each item's last, and that one too when the item went.
pub(super) fn expired(changes: &[Change], horizon_ms: u64) -> Vec<String> {
    let mut old: BTreeMap<ItemKey, Vec<&Change>> = BTreeMap::new();
    let mut drop = Vec::new();
    for c in changes.iter().filter(|c| c.at_ms < horizon_ms) {
        match c.item {
            // A sum says nothing of the map after it.
            Item::Traffic { .. } => drop.push(c.store_key()),
            _ => old.entry(c.item.key()).or_default().push(c),
        }
    }
    for (_, mut cs) in old {
        cs.sort_by_key(|c| (c.at_ms, c.appeared));
        let keep_last = cs.last().is_some_and(|c| c.appeared);
        let n = cs.len() - usize::from(keep_last);
        drop.extend(cs[..n].iter().map(|c| c.store_key()));
    }
    drop
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::model::{AgentTable, Direction, Node, ObsKey, ObsValue, Protocol};

    fn table(listens: bool, client_of: Option<&str>) -> AgentTable {
        let mut t = AgentTable {
            hostname: "h".into(),
            ..Default::default()
        };
        if listens {
            t.listeners.insert(
                ListenerKey {
                    ip: "0.0.0.0".parse().unwrap(),
                    port: 6379,
                    protocol: Protocol::Tcp,
                    netns: String::new(),
                },
                "redis-server".into(),
            );
        }
        if let Some(remote) = client_of {
            t.entries.insert(
                ObsKey {
                    netns: Box::default(),
                    direction: Direction::Client,
                    local_ip: "10.0.0.1".parse().unwrap(),
                    remote_ip: remote.parse().unwrap(),
                    server_port: 6379,
                    protocol: Protocol::Tcp,
                    process: "redis-cli".into(),
                    via: None,
                },
                ObsValue {
                    sockets: 1,
                    control_plane: false,
                    short_lived: false,
                    process_note: String::new(),
                },
            );
        }
        t
    }

    fn summary(changes: &[Change]) -> Vec<(u64, bool, String)> {
        changes
            .iter()
            .map(|c| (c.at_ms, c.appeared, c.item.id()))
            .collect()
    }

    /// An edge appears at its first sighting and goes at its last, once the TTL says so; a
    /// host and a listener at the time they were noticed; nothing is recorded twice.
    #[test]
    fn items_appear_and_go_once_each() {
        let ttl = 4_000;
        let mut m = Model::default();
        let mut r = Recorder::default();
        m.replace("web", table(false, Some("10.0.0.9")), 1_000);
        m.replace("db", table(true, None), 1_500);
        assert_eq!(
            summary(&r.reconcile(&m, 2_000, ttl)),
            vec![
                (1_000, true, "host:web|addr:10.0.0.9|6379/tcp".into()),
                (2_000, true, "host:db".into()),
                (2_000, true, "host:web".into()),
                (2_000, true, "listener:db|0.0.0.0:6379/tcp".into()),
            ]
        );
        // Seen again at 2.5 s: nothing changed.
        m.replace("web", table(false, Some("10.0.0.9")), 2_500);
        assert!(r.reconcile(&m, 2_600, ttl).is_empty(), "nothing changed");
        // The row is gone at 3 s, noticed at 3.1 s; the edge is still active until its TTL
        // passes, then went when its row did.
        m.replace("web", table(false, None), 3_000);
        assert!(r.reconcile(&m, 3_100, ttl).is_empty());
        assert!(r.reconcile(&m, 5_000, ttl).is_empty());
        assert_eq!(
            summary(&r.reconcile(&m, 7_500, ttl)),
            vec![(3_100, false, "host:web|addr:10.0.0.9|6379/tcp".into())]
        );
        // Seen again: it appears again when seen, after its last change.
        m.replace("web", table(false, Some("10.0.0.9")), 8_000);
        assert_eq!(
            summary(&r.reconcile(&m, 8_100, ttl)),
            vec![(8_000, true, "host:web|addr:10.0.0.9|6379/tcp".into())]
        );
        // The listener and its host go.
        m.remove("db");
        assert_eq!(
            summary(&r.reconcile(&m, 9_000, ttl)),
            vec![
                (9_000, false, "host:db".into()),
                (9_000, false, "listener:db|0.0.0.0:6379/tcp".into()),
            ]
        );
        // A recorder replayed from what was written picks up where this one is.
        let all = [
            r.open(),
            vec![Change {
                at_ms: 3_100,
                appeared: false,
                first: false,
                item: Item::Edge {
                    key: EdgeKey {
                        from: Node::Host("web".into()),
                        to: Node::Address("10.0.0.9".parse().unwrap()),
                        port: 6379,
                        protocol: Protocol::Tcp,
                    },
                    process: String::new(),
                    via: String::new(),
                },
            }],
        ]
        .concat();
        let mut again = Recorder::replay(&all);
        assert!(again.reconcile(&m, 9_100, ttl).is_empty());
    }

    #[test]
    fn retention_keeps_what_rebuilds_the_map_inside_the_horizon() {
        let edge = |at_ms, appeared, to: &str| Change {
            at_ms,
            appeared,
            first: false,
            item: Item::Host {
                agent: to.into(),
                hostname: String::new(),
            },
        };
        let changes = vec![
            edge(1, true, "a"),
            edge(2, false, "a"),
            edge(3, true, "a"),
            edge(4, true, "b"),
            edge(5, false, "b"),
            edge(20, false, "a"),
        ];
        let dropped = expired(&changes, 10);
        let kept: Vec<_> = changes
            .iter()
            .filter(|c| !dropped.contains(&c.store_key()))
            .map(|c| (c.at_ms, c.appeared, c.item.id()))
            .collect();
        assert_eq!(
            kept,
            vec![(3, true, "host:a".into()), (20, false, "host:a".into())]
        );
    }

    /// The storage cost of history, for BENCHMARKS.md: `cargo test -p tapgraph-controller --release
    /// history_storage -- --ignored --nocapture`. 20,000 edges of realistic names each appear and
    /// go once (a record each way), written in commits of 1,000 as the recorder would.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn history_storage() {
        use crate::store::Store;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.redb");
        let store = Store::open(&path).unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        let empty = size();
        let n = 20_000u64;
        let mut json_bytes = 0usize;
        for chunk in 0..n / 1_000 {
            let mut batch = Batch::default();
            for i in chunk * 1_000..(chunk + 1) * 1_000 {
                let key = EdgeKey {
                    from: Node::Host(format!("web-{:04}.prod.example", i % 500)),
                    to: Node::Service {
                        host: format!("db-{:03}.prod.example", i % 37),
                        protocol: Protocol::Tcp,
                        port: 5432,
                    },
                    port: 5432,
                    protocol: Protocol::Tcp,
                };
                for appeared in [true, false] {
                    let c = Change {
                        at_ms: 1_796_600_000_000 + i * 1_000 + u64::from(!appeared) * 500,
                        appeared,
                        first: appeared,
                        item: Item::Edge {
                            key: key.clone(),
                            process: "postgres-client".into(),
                            via: String::new(),
                        },
                    };
                    json_bytes += serde_json::to_vec(&c).unwrap().len() + c.store_key().len();
                    batch.put(HISTORY, &c.store_key(), &c).unwrap();
                }
            }
            store.commit(batch).unwrap();
        }
        let records = 2 * n;
        let file = size() - empty;
        eprintln!(
            "history: {records} records, key+JSON {:.0} B/record, redb file {:.0} B/record ({} MB)",
            json_bytes as f64 / records as f64,
            file as f64 / records as f64,
            file / 1_000_000
        );
    }
}
