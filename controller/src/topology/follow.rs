//! With replicas on one database, each holds the whole map. It applies its own agents' snapshots
//! and writes them (each agent's table with its sequence, and each edge that changed), and it
//! applies the tables the other replicas write. An agent's table is written once, by the replica
//! the agent sent it to. The edges a table changes are written by every replica that applies it
//! (only those that changed, never a refreshed last-seen alone): two tables applied at once on
//! two replicas (the two ends of a connection, say) each change the edge in a different order,
//! and only the last write of each replica is the edge as every replica ends up holding it. So
//! the store's edges equal the map once the replicas have heard each other, as a restart needs.
//!
//! A table from another replica is applied as it was applied there, at its own
//! `last_snapshot_ms`, so edges are first and last seen at the same times and turn inactive and
//! expire at the same moments on every replica; the map depends on the tables, not on the
//! replica nor the order they arrived in (but for an address two hosts claim: the first claimant
//! a replica saw owns it there). Its sequence comes with it: when the agent moves to this replica
//! its next delta applies on top of it. The newer table of an agent wins (`last_snapshot_ms`): a
//! record older than the model's is ignored, and rewritten if this replica holds the newer one.
//!
//! Edges' history (first and last seen of edges no agent reports any more) comes from
//! `topology_edges` at start and from the tables as they arrive: an edge is first seen at the
//! earliest time of the rows that made it, whatever order they arrived in. An edge that came and
//! went entirely while this replica heard nothing (its listening session was reconnecting) is not
//! restored: after a resync it would be a phantom as likely as history. Expired edges leave every
//! replica's model by the same rule; the leader alone deletes them from the store, and a replica
//! that starts leading deletes those the last leader left there.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use tokio::sync::broadcast;

use super::model::Changes;
use super::now_ms;
use super::persist::{self, AgentRecord};
use super::task::Task;
use crate::store::Change;

/// Changes of other replicas' tables read at once at most: notifications for one agent that
/// piled up meanwhile make one read.
const BATCH: usize = 256;

/// The next change another replica made; a lag (changes missed) is a [`Change::Resync`]. Waits
/// forever once the store is gone.
pub(super) async fn next_change(changes: &mut Option<broadcast::Receiver<Change>>) -> Change {
    loop {
        let Some(rx) = changes else {
            return std::future::pending().await;
        };
        match rx.recv().await {
            Ok(change) => return change,
            Err(broadcast::error::RecvError::Lagged(_)) => return Change::Resync,
            Err(broadcast::error::RecvError::Closed) => *changes = None,
        }
    }
}

impl Task {
    /// A change another replica made: `first`, and those already waiting behind it. The agents'
    /// tables among them are read once each; after a resync, every table.
    pub(super) fn heard(
        &mut self,
        first: Change,
        changes: &mut Option<broadcast::Receiver<Change>>,
    ) {
        let mut agents = BTreeSet::new();
        let mut resync = false;
        let mut note = |change: Change, agents: &mut BTreeSet<String>| match change {
            Change::Row { table, key } => {
                if let Some(agent) = persist::agent_changed(&table, &key) {
                    agents.insert(agent.to_string());
                }
            }
            Change::Resync => resync = true,
        };
        note(first, &mut agents);
        if let Some(rx) = changes.as_mut() {
            while agents.len() < BATCH {
                match rx.try_recv() {
                    Ok(change) => note(change, &mut agents),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => {
                        note(Change::Resync, &mut agents)
                    }
                    Err(_) => break,
                }
            }
        }
        if resync {
            self.reload();
            return;
        }
        for agent in agents {
            match persist::read_agent(&self.store, &agent) {
                Ok(Some(record)) => self.take_remote(record),
                Ok(None) => self.forget(&agent),
                Err(error) => {
                    // The others would fail alike: all are read again once the store answers.
                    tracing::warn!(%agent, %error, "cannot read the map another replica wrote; reading it all again shortly");
                    self.reload_due = true;
                    return;
                }
            }
        }
    }

    /// Applies the table another replica wrote for `record.id`, unless the model has it already
    /// or a newer one.
    pub(super) fn take_remote(&mut self, record: AgentRecord) {
        if let Some(have) = self.model.agents.get(&record.id) {
            let stored = record.table.last_snapshot_ms;
            if have.last_snapshot_ms > stored {
                // Another replica wrote an older table (it could not write it earlier): this
                // replica's newer one is written again, if it is its own.
                if self.local.contains(&record.id) {
                    self.write([record.id].into(), BTreeSet::new());
                }
                return;
            }
            if have.last_snapshot_ms == stored
                && self.sequences.get(&record.id) == Some(&record.sequence)
            {
                return;
            }
        }
        self.adopt(record);
    }

    /// Makes `record` the agent's table and sequence, as the replica that wrote it applied it.
    fn adopt(&mut self, record: AgentRecord) {
        let AgentRecord {
            id,
            sequence,
            table,
        } = record;
        let seen = table.last_snapshot_ms;
        // The flows its last snapshot moved: a connection that lived between two snapshots has
        // its edge only through them, as on the replica that applied it.
        let moved: Vec<_> = table
            .traffic
            .iter()
            .filter(|(_, f)| f.last_ms == seen)
            .map(|(flow, _)| flow.clone())
            .collect();
        let mut changes = self.model.replace(&id, table, seen);
        for flow in &moved {
            self.model.ensure_flow_edge(&id, flow, seen, &mut changes);
        }
        self.local.remove(&id);
        self.sequences.insert(id, sequence);
        self.stats.remote_tables_applied += 1;
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.write_edges(changes);
    }

    /// Writes the edges a table from another replica changed (see the module's doc).
    fn write_edges(&mut self, changes: Changes) {
        let mut edges = changes.edges_upserted;
        edges.extend(changes.edges_removed);
        self.write(BTreeSet::new(), edges);
    }

    /// The store no longer has `agent`'s table: the map drops it, unless it is this replica's
    /// own, not yet written.
    fn forget(&mut self, agent: &str) {
        if self.unwritten.agents.contains(agent) || !self.model.agents.contains_key(agent) {
            return;
        }
        let changes = self.model.remove(agent);
        self.sequences.remove(agent);
        self.local.remove(agent);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.write_edges(changes);
    }

    /// A delta from `agent` based on `base`, which is not the last sequence this replica
    /// applied: the agent may have sent `base` to another replica before it moved here, and
    /// its record not be heard yet. True when the store's record is `base`, now in the model.
    pub(super) fn catch_up(&mut self, agent: &str, base: u64) -> bool {
        match persist::read_agent(&self.store, agent) {
            Ok(Some(record)) if record.sequence == base => {
                self.adopt(record);
                true
            }
            Ok(_) => false,
            Err(error) => {
                tracing::debug!(%agent, %error, "cannot read the agent's stored table");
                false
            }
        }
    }

    /// Reads every table again (changes may have been missed): applies the tables that differ and
    /// drops the agents the store no longer has.
    pub(super) fn reload(&mut self) {
        self.reload_due = false;
        let records = match persist::read_agents(&self.store) {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, "cannot read the map other replicas wrote; trying again shortly");
                self.reload_due = true;
                return;
            }
        };
        let stored: BTreeSet<String> = records.iter().map(|r| r.id.clone()).collect();
        for record in records {
            self.take_remote(record);
        }
        let gone: Vec<String> = self
            .model
            .agents
            .keys()
            .filter(|a| !stored.contains(*a))
            .cloned()
            .collect();
        for agent in gone {
            self.forget(&agent);
        }
    }

    /// This replica starts or stops leading the cleanup. Starting, it deletes from the store the
    /// edges that expired while another replica led (this model dropped them, the store may
    /// still have them).
    pub(super) fn lead(&mut self, leads: bool) {
        let was = std::mem::replace(&mut self.stats.leader, leads);
        if leads && !was {
            tracing::info!("this replica removes expired edges of the map from the store now");
            self.sweep_expired_edges();
        }
    }

    /// Deletes from the store the edges past retention that the model no longer has: they
    /// expired here while another replica led the cleanup, and it may not have deleted them.
    fn sweep_expired_edges(&mut self) {
        let records = match persist::read_edges(&self.store) {
            Ok(records) => records,
            Err(error) => {
                tracing::warn!(%error, "cannot read the map's edges from the store");
                return;
            }
        };
        let retention = self.settings.retention.as_millis() as u64;
        let now = now_ms();
        let expired: BTreeSet<_> = records
            .into_iter()
            .map(|r| r.edge)
            .filter(|e| {
                !self.model.edges.contains_key(&e.key)
                    && now.saturating_sub(e.last_seen_ms) >= retention
            })
            .map(|e| e.key)
            .collect();
        if !expired.is_empty() {
            tracing::info!(
                removed = expired.len(),
                "expired edges another replica left in the store removed"
            );
            self.write(BTreeSet::new(), expired);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};

    use tapgraph::proto;
    use tokio::sync::watch;

    use super::super::graph::Graph;
    use super::super::task::tests::{apply, settings};
    use super::super::{GraphQuery, Topology};
    use super::*;
    use crate::events::Events;
    use crate::store::{Store, StoreSettings, testpg};

    fn entry(
        direction: proto::Direction,
        local: &str,
        remote: &str,
        port: u32,
        process: &str,
        control_plane: bool,
    ) -> proto::ConnectionEntry {
        proto::ConnectionEntry {
            direction: direction as i32,
            local_ip: local.into(),
            remote_ip: remote.into(),
            server_port: port,
            protocol: proto::Protocol::Tcp as i32,
            process: Some(proto::ProcessInfo {
                name: process.into(),
                ..Default::default()
            }),
            sockets: 1,
            control_plane,
            ..Default::default()
        }
    }

    fn listener(port: u32, process: &str) -> proto::ListeningService {
        proto::ListeningService {
            ip: "0.0.0.0".into(),
            port,
            protocol: proto::Protocol::Tcp as i32,
            process: Some(proto::ProcessInfo {
                name: process.into(),
                ..Default::default()
            }),
            netns: String::new(),
        }
    }

    fn full(
        address: &str,
        listeners: Vec<proto::ListeningService>,
        entries: Vec<proto::ConnectionEntry>,
    ) -> proto::ConnectionSnapshot {
        proto::ConnectionSnapshot {
            sequence: 1,
            full: true,
            addresses: vec![address.into(), "127.0.0.1".into()],
            listeners,
            entries,
            ..Default::default()
        }
    }

    /// x (10.0.0.1) is the client of y's redis (10.0.0.2:6379), and of an external endpoint,
    /// and talks to the controller (control plane).
    fn x() -> proto::ConnectionSnapshot {
        use proto::Direction::Client;
        full(
            "10.0.0.1",
            vec![],
            vec![
                entry(Client, "10.0.0.1", "10.0.0.2", 6379, "app", false),
                entry(Client, "10.0.0.1", "203.0.113.7", 443, "curl", false),
                entry(
                    Client,
                    "10.0.0.1",
                    "192.0.2.1",
                    7443,
                    "tapgraph-agent",
                    true,
                ),
            ],
        )
    }

    /// y serves x, and an agentless client (10.0.0.9).
    fn y() -> proto::ConnectionSnapshot {
        use proto::Direction::Server;
        full(
            "10.0.0.2",
            vec![listener(6379, "redis")],
            vec![
                entry(Server, "10.0.0.2", "10.0.0.1", 6379, "redis", false),
                entry(Server, "10.0.0.2", "10.0.0.9", 6379, "redis", false),
            ],
        )
    }

    /// z listens and talks to nobody: a host alone on the map.
    fn z() -> proto::ConnectionSnapshot {
        full("10.0.0.3", vec![listener(80, "nginx")], vec![])
    }

    /// x's delta on `base`: the external endpoint gone, another one new.
    fn x_delta(base: u64) -> proto::ConnectionSnapshot {
        use proto::Direction::Client;
        proto::ConnectionSnapshot {
            sequence: base + 1,
            full: false,
            base_sequence: base,
            entries: vec![entry(
                Client,
                "10.0.0.1",
                "203.0.113.8",
                443 + base as u32,
                "curl",
                false,
            )],
            removed: vec![entry(Client, "10.0.0.1", "203.0.113.7", 443, "curl", false)],
            ..Default::default()
        }
    }

    fn spawn(store: Store) -> Topology {
        let (topology, run) = Topology::spawn(store, settings(), Events::new(64)).unwrap();
        tokio::spawn(run);
        topology
    }

    async fn map(t: &Topology) -> Graph {
        t.map(GraphQuery {
            include_control: true,
            include_inactive: true,
        })
        .await
    }

    /// `g` without the times: one controller applies a snapshot at its own moment.
    fn untimed(mut g: Graph) -> Graph {
        for e in &mut g.edges {
            e.first_seen_ms = 0;
            e.last_seen_ms = 0;
        }
        g
    }

    /// Waits until both replicas show the same map, and the map `one` controller shows (times
    /// aside); fails showing the difference after 15 s.
    async fn converge(a: &Topology, b: &Topology, one: &Topology) -> Graph {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (ga, gb, g1) = (map(a).await, map(b).await, map(one).await);
            let done = ga == gb && untimed(ga.clone()) == untimed(g1.clone());
            if done {
                return ga;
            }
            if Instant::now() > deadline {
                assert_eq!(ga.nodes, gb.nodes, "replicas' nodes");
                assert_eq!(ga.edges, gb.edges, "replicas' edges");
                assert_eq!(untimed(ga.clone()).nodes, untimed(g1.clone()).nodes);
                assert_eq!(untimed(ga).edges, untimed(g1).edges);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_every_replica_shows_the_map_one_controller_shows() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings::Postgres(pg);
        let a = spawn(Store::connect(&settings, dir.path(), "a").await.unwrap());
        let b = spawn(Store::connect(&settings, dir.path(), "b").await.unwrap());
        let one = spawn(Store::open(&dir.path().join("one.redb")).unwrap());
        // x reports to A, y to B (both ends of one connection), z to A.
        a.snapshot("x", "x-host", x()).await.unwrap();
        b.snapshot("y", "y-host", y()).await.unwrap();
        a.snapshot("z", "z-host", z()).await.unwrap();
        for (agent, s) in [("x", x()), ("y", y()), ("z", z())] {
            one.snapshot(agent, &format!("{agent}-host"), s)
                .await
                .unwrap();
        }
        let g = converge(&a, &b, &one).await;
        // What the map is: the connection once, both ends known; the external endpoint, the
        // agentless client, the control plane and the lone host.
        let connects: Vec<(&str, &str, bool)> = g
            .edges
            .iter()
            .filter(|e| e.kind == super::super::graph::EdgeKind::ConnectsTo)
            .map(|e| (e.from.as_str(), e.to.as_str(), e.control_plane))
            .collect();
        assert_eq!(
            connects,
            [
                ("host:x", "addr:192.0.2.1", true),
                ("host:x", "addr:203.0.113.7", false),
                ("host:x", "svc:y/tcp/6379", false),
                ("addr:10.0.0.9", "svc:y/tcp/6379", false),
            ]
        );
        assert!(g.nodes.iter().any(|n| n.id == "host:z"));

        // x moves to B: its delta continues from the sequence A wrote.
        b.snapshot("x", "x-host", x_delta(1)).await.unwrap();
        one.snapshot("x", "x-host", x_delta(1)).await.unwrap();
        converge(&a, &b, &one).await;
        // And back to A, which heard B's write.
        a.snapshot("x", "x-host", x_delta(2)).await.unwrap();
        one.snapshot("x", "x-host", x_delta(2)).await.unwrap();
        let g = converge(&a, &b, &one).await;
        let external: Vec<(&str, bool)> = g
            .edges
            .iter()
            .filter(|e| e.to.starts_with("addr:203.0.113."))
            .map(|e| (e.to.as_str(), e.sockets > 0))
            .collect();
        assert_eq!(external.len(), 3, "{external:?}");
        let (sa, sb) = (a.stats().await, b.stats().await);
        assert_eq!(sa.snapshots_refused_gap + sb.snapshots_refused_gap, 0);
        assert!(sa.remote_tables_applied >= 2, "{sa:?}");
        assert!(sb.remote_tables_applied >= 2, "{sb:?}");
        // One writer per snapshot: A applied 3 of them, B 2.
        assert_eq!((sa.snapshots_applied, sb.snapshots_applied), (3, 2));
        // A replica started now reads the same map back from the store: the edges written by
        // both, in whatever order they applied the tables, are the map's.
        let c = spawn(Store::connect(&settings, dir.path(), "c").await.unwrap());
        let gc = map(&c).await;
        assert_eq!(gc.nodes, g.nodes);
        assert_eq!(gc.edges, g.edges);
    }

    /// `x`'s table as another replica wrote it: its snapshot `s` applied there at `at_ms`.
    fn record(sequence: u64, at_ms: u64, s: &proto::ConnectionSnapshot) -> AgentRecord {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("other.redb")).unwrap();
        let (mut other, _) = task(&store, true);
        apply(&mut other, "x", s).unwrap();
        let mut table = other.model.agents["x"].clone();
        table.last_snapshot_ms = at_ms;
        AgentRecord {
            id: "x".into(),
            sequence,
            table,
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn another_replica_s_table_is_taken_once_and_never_over_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (mut t, _) = task(&store, true);
        let applied = |t: &Task| t.stats.remote_tables_applied;
        t.take_remote(record(1, 1_000, &x()));
        assert_eq!(applied(&t), 1);
        assert_eq!(t.model.agents["x"].last_snapshot_ms, 1_000);
        // The same record heard twice is applied once.
        t.take_remote(record(1, 1_000, &x()));
        assert_eq!(applied(&t), 1);
        // The agent restarted (its sequence starts over) and reported later: taken.
        t.take_remote(record(1, 2_000, &z()));
        assert_eq!(applied(&t), 2);
        assert_eq!(t.model.agents["x"].addresses.len(), 2);
        // Another sequence at the same moment: taken.
        t.take_remote(record(2, 2_000, &x()));
        assert_eq!((applied(&t), t.sequences["x"]), (3, 2));
        // An older table (a write late after an outage) is not.
        t.take_remote(record(9, 1_500, &z()));
        assert_eq!((applied(&t), t.sequences["x"]), (3, 2));
        assert_eq!(t.model.agents["x"].last_snapshot_ms, 2_000);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_delta_on_a_sequence_another_replica_took_applies_and_on_another_is_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (mut t, _) = task(&store, true);
        // x's first snapshot went to another replica, whose write this one has not heard of.
        store
            .put(persist::AGENTS, "x", &record(1, now_ms(), &x()))
            .unwrap();
        assert_eq!(
            apply(&mut t, "x", &x_delta(5)),
            Err(super::super::Refusal::SequenceGap {
                base: 5,
                have: None
            })
        );
        apply(&mut t, "x", &x_delta(1)).unwrap();
        assert_eq!(t.sequences["x"], 2);
        assert!(t.local.contains("x"));
        let stored = persist::read_agent(&store, "x").unwrap().unwrap();
        assert_eq!(stored.sequence, 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_agent_gone_from_the_store_stays_while_its_own_write_waits() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let (mut t, _) = task(&store, true);
        apply(&mut t, "x", &x()).unwrap();
        t.unwritten.agents.insert("x".into());
        t.forget("x");
        assert!(t.model.agents.contains_key("x"));
        t.unwritten.agents.clear();
        let generation = t.generation.load(Ordering::Acquire);
        t.forget("nobody");
        assert_eq!(t.generation.load(Ordering::Acquire), generation);
        t.forget("x");
        assert!(!t.model.agents.contains_key("x"));
        assert!(!t.sequences.contains_key("x"));
        assert!(t.generation.load(Ordering::Acquire) > generation);
    }

    /// Agent `i` of a ring of `n`: the client of the next one's redis, the server of the one
    /// before, and the client of an address no agent has.
    fn ring(i: usize, n: usize) -> proto::ConnectionSnapshot {
        use proto::Direction::{Client, Server};
        let ip = |i: usize| format!("10.0.1.{}", i % n + 1);
        let me = ip(i);
        full(
            &me,
            vec![listener(6379, "redis")],
            vec![
                entry(Client, &me, &ip(i + 1), 6379, "app", false),
                entry(Server, &me, &ip(i + n - 1), 6379, "redis", false),
                entry(Client, &me, "10.0.9.9", 5432, "app", false),
            ],
        )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_tables_racing_through_two_replicas_make_one_map_and_the_store_holds_it() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings::Postgres(pg);
        let a = spawn(Store::connect(&settings, dir.path(), "a").await.unwrap());
        let b = spawn(Store::connect(&settings, dir.path(), "b").await.unwrap());
        let one = spawn(Store::open(&dir.path().join("one.redb")).unwrap());
        let n = 24;
        // Every other agent through each replica, all at once: each end of every connection
        // reaches the replicas in no particular order.
        let sent = (0..n).map(|i| {
            let replica = if i % 2 == 0 { a.clone() } else { b.clone() };
            async move { replica.snapshot(&format!("r{i:02}"), "h", ring(i, n)).await }
        });
        for r in futures::future::join_all(sent).await {
            r.unwrap();
        }
        for i in 0..n {
            one.snapshot(&format!("r{i:02}"), "h", ring(i, n))
                .await
                .unwrap();
        }
        let g = converge(&a, &b, &one).await;
        let live = g
            .edges
            .iter()
            .filter(|e| e.kind == super::super::graph::EdgeKind::ConnectsTo)
            .count();
        assert_eq!(live, 2 * n, "the ring and each agent's external endpoint");
        let c = spawn(Store::connect(&settings, dir.path(), "c").await.unwrap());
        let gc = map(&c).await;
        assert_eq!(gc.nodes, g.nodes);
        assert_eq!(gc.edges, g.edges);
    }

    /// A task on `store` (not running: the test drives it), leading the cleanup or not.
    fn task(store: &Store, leads: bool) -> (Task, Option<broadcast::Receiver<Change>>) {
        let changes = store.changes();
        let restored = persist::load(store, now_ms()).unwrap();
        let mut t = Task::new(
            store.clone(),
            settings(),
            Events::new(64),
            restored,
            Arc::new(AtomicU64::new(1)),
            changes,
            watch::channel(leads).1,
        );
        let changes = t.changes.take();
        (t, changes)
    }

    /// Feeds `t` the changes it hears until `done` holds.
    async fn hear_until(
        t: &mut Task,
        changes: &mut Option<broadcast::Receiver<Change>>,
        done: impl Fn(&Task) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !done(t) {
            let left = deadline.saturating_duration_since(Instant::now());
            let change = tokio::time::timeout(left, next_change(changes))
                .await
                .expect("heard within 15 s");
            t.heard(change, changes);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_only_the_leader_deletes_expired_edges_and_a_new_leader_finishes_the_job() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings::Postgres(pg);
        let sa = Store::connect(&settings, dir.path(), "a").await.unwrap();
        let sb = Store::connect(&settings, dir.path(), "b").await.unwrap();
        let (mut a, _) = task(&sa, true);
        let (mut b, mut heard) = task(&sb, false);
        apply(&mut a, "x", &x()).unwrap();
        hear_until(&mut b, &mut heard, |t| t.model.agents.contains_key("x")).await;
        assert_eq!(b.sequences.get("x"), Some(&1));
        let edges: Vec<_> = a.model.edges.keys().cloned().collect();
        assert_eq!(b.model.edges.keys().cloned().collect::<Vec<_>>(), edges);
        let stored = |s: &Store| persist::read_edges(s).unwrap().len();
        assert_eq!(stored(&sa), edges.len());
        // Past retention on B, which does not lead: its model drops them, the store keeps them.
        b.settings.retention = Duration::from_millis(1);
        tokio::time::sleep(Duration::from_millis(5)).await;
        b.expire();
        assert!(b.model.edges.is_empty());
        assert_eq!(stored(&sa), edges.len(), "a follower writes nothing");
        // Still not leading, told so again: nothing written.
        b.lead(false);
        assert_eq!(stored(&sa), edges.len(), "a follower writes nothing");
        // B starts leading (A died before its cleanup ran): it deletes them from the store.
        b.lead(true);
        assert_eq!(stored(&sb), 0);
        assert!(b.unwritten.is_empty());
        // A, the store emptied behind it, still has them until its own expiry.
        assert_eq!(a.model.edges.len(), edges.len());
        // Edges the model has are never swept, however old their stored last-seen: a live
        // edge's is written only when it changes.
        apply(&mut a, "y", &y()).unwrap();
        hear_until(&mut b, &mut heard, |t| t.model.agents.contains_key("y")).await;
        let live = b.model.edges.len();
        assert!(live > 0);
        tokio::time::sleep(Duration::from_millis(5)).await;
        b.lead(false);
        b.lead(true);
        assert_eq!(stored(&sb), live);
        assert_eq!(b.model.edges.len(), live);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_an_older_record_never_replaces_a_newer_table_and_gone_agents_leave() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let settings = StoreSettings::Postgres(pg);
        let sa = Store::connect(&settings, dir.path(), "a").await.unwrap();
        let sb = Store::connect(&settings, dir.path(), "b").await.unwrap();
        let (mut a, _) = task(&sa, true);
        let (mut b, mut heard) = task(&sb, false);
        apply(&mut a, "x", &x()).unwrap();
        hear_until(&mut b, &mut heard, |t| t.model.agents.contains_key("x")).await;
        let old = persist::read_agent(&sa, "x").unwrap().unwrap();
        // x moves to B and reports again; then A writes its old table late (as after an
        // outage): B keeps the newer one and writes it again.
        tokio::time::sleep(Duration::from_millis(5)).await;
        apply(&mut b, "x", &x()).unwrap();
        let newer = b.model.agents["x"].last_snapshot_ms;
        assert!(newer > old.table.last_snapshot_ms);
        sa.put(persist::AGENTS, "x", &old).unwrap();
        hear_until(&mut b, &mut heard, |t| {
            t.stats.remote_tables_applied > 1 || {
                persist::read_agent(&t.store, "x")
                    .unwrap()
                    .is_some_and(|r| r.table.last_snapshot_ms == newer)
            }
        })
        .await;
        assert_eq!(b.model.agents["x"].last_snapshot_ms, newer);
        assert_eq!(
            b.stats.remote_tables_applied, 1,
            "only the first table, from A"
        );
        // An agent whose table leaves the store leaves every map.
        let mut batch = crate::store::Batch::default();
        batch.delete(persist::AGENTS, "x");
        sa.commit(batch).unwrap();
        hear_until(&mut b, &mut heard, |t| !t.model.agents.contains_key("x")).await;
        assert!(b.model.edges.values().all(|e| e.reporters.is_empty()));
    }

    /// What a table costs a replica, its own agent's snapshot against another replica's table
    /// (BENCHMARKS.md): `cargo test --release -p tapgraph-controller --bin tapgraph-controller
    /// remote_table_probe -- --ignored --nocapture`. PROBE_AGENTS (500) tables of 200 rows, each
    /// agent a client of five of the others' services and of a few external endpoints.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore]
    async fn remote_table_probe() {
        let agents: usize = std::env::var("PROBE_AGENTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500);
        let ip = |a: usize| format!("10.0.{}.{}", a / 200, a % 200 + 1);
        let snapshot = |a: usize, sequence: u64| {
            use proto::Direction::Client;
            let me = ip(a);
            let entries = (0..200)
                .map(|n| {
                    let remote = if n % 5 == 0 {
                        format!("203.0.113.{}", n % 64 + 1)
                    } else {
                        ip((a + 1 + n % 5) % agents)
                    };
                    entry(Client, &me, &remote, 6379, &format!("worker-{n}"), false)
                })
                .collect();
            proto::ConnectionSnapshot {
                sequence,
                ..full(&me, vec![listener(6379, "redis")], entries)
            }
        };
        let name = |a: usize| format!("agent-{a:04}");
        // Process CPU (all threads: the database driver's included), in ms.
        let cpu = || {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            let ticks: u64 =
                fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
            ticks * 10
        };
        let report = |what: &str, ms: u64, n: usize| {
            eprintln!("{what:<58} {:>7.3} ms CPU per table", ms as f64 / n as f64);
        };
        let dir = tempfile::tempdir().unwrap();

        // One controller: snapshots in, written to redb.
        let embedded = Store::open(&dir.path().join("one.redb")).unwrap();
        let (mut one, _) = task(&embedded, true);
        let roomy = |t: &mut Task| {
            t.settings.max_entries = 1_000;
            t.settings.max_rows = 10_000_000;
        };
        roomy(&mut one);
        for round in 1..=2u64 {
            let start = cpu();
            for a in 0..agents {
                apply(&mut one, &name(a), &snapshot(a, round)).unwrap();
            }
            let what = if round == 1 {
                "new"
            } else {
                "the same rows again"
            };
            report(
                &format!("local snapshot, {what} (embedded)"),
                cpu() - start,
                agents,
            );
        }

        let Some(pg) = testpg::database().await else {
            return;
        };
        let settings = StoreSettings::Postgres(pg);
        let sa = Store::connect(&settings, dir.path(), "a").await.unwrap();
        let sb = Store::connect(&settings, dir.path(), "b").await.unwrap();
        let (mut a, _) = task(&sa, true);
        let (mut b, mut heard) = task(&sb, false);
        roomy(&mut a);
        roomy(&mut b);
        for round in 1..=2u64 {
            let start = cpu();
            for x in 0..agents {
                apply(&mut a, &name(x), &snapshot(x, round)).unwrap();
            }
            let what = if round == 1 {
                "new"
            } else {
                "the same rows again"
            };
            report(
                &format!("local snapshot, {what} (postgres)"),
                cpu() - start,
                agents,
            );
            let start = cpu();
            let before = b.stats.remote_tables_applied;
            hear_until(&mut b, &mut heard, |t| {
                t.stats.remote_tables_applied >= before + agents as u64
            })
            .await;
            report(
                &format!("another replica's table, {what} (read, applied)"),
                cpu() - start,
                agents,
            );
        }
        assert_eq!(a.model.edges.len(), b.model.edges.len());
    }
}
