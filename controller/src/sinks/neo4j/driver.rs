//! The writer task: when to run a pass, the session with the database, and a pass itself (the
//! view read, diffed against what the database holds, the difference written in batches).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use neo4rs::{BoltType, ConfigBuilder, query};
use tapgraph::backoff::{Backoff, BackoffPolicy};
use tapgraph::proto;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::config::Neo4jSettings;
use super::cypher;
use super::diff::{Changes, Held};
use super::failure::{Failure, timed, worth_reporting};
use super::rows::{Kind, Label, NodeRow, RelRow, desired, next_flip_ms};
use crate::enrollment::Enrollment;
use crate::events::Events;
use crate::sinks::SinkHandle;
use crate::topology::graph::Graph;
use crate::topology::{GraphQuery, Naming, Topology, view};

/// The longest a pass is skipped because the model did not change, or paced.
const FULL_PASS_EVERY: Duration = Duration::from_secs(60);

/// How often the sink reads every id back from the database even without a failure.
const RECONCILE_EVERY: Duration = Duration::from_secs(600);

/// How long the sink waits after refused credentials: an operator has to act, so retrying
/// faster would only fill the server's log.
const AUTH_RETRY: Duration = Duration::from_secs(60);

/// How the sink waits after any other failure: half a second doubling to 30 s, no jitter (one
/// writer per controller, nothing to spread out).
fn retry_policy() -> BackoffPolicy {
    // The bounds are constants that `new` accepts (pinned by retries_wait_half_a_second_doubling_to_30s);
    // the default would only stand in if they were edited into something invalid.
    BackoffPolicy::new(Duration::from_millis(500), Duration::from_secs(30), 0.0).unwrap_or_default()
}

/// How long to wait after `failure`, advancing `retry`. Refused credentials wait a minute, and a
/// failure of another kind right after them waits the longest step (30 s), as it did when each
/// wait doubled the last one.
fn wait_after(retry: &mut Backoff, failure: &Failure) -> Duration {
    match failure {
        Failure::Auth(_) => {
            while retry.base_delay() < retry_policy().max() {
                retry.next_delay();
            }
            AUTH_RETRY
        }
        _ => retry.next_delay(),
    }
}

/// The Neo4j sink: one task that keeps a Bolt database equal to the map.
///
/// Eventually consistent: every pass leaves the database equal to the view it read (nodes,
/// relationships and their properties; `last_seen` within a `last_seen_step`), and a pass runs
/// within an `interval` of any change to the map or its decorations. During a database outage
/// the map stays whole in the controller and nothing is queued: the sink retries with backoff
/// (credentials refused: once a minute), and on reconnecting reads every id back and writes the
/// difference, so the database catches up to the map as it is then, without duplicates or
/// stale edges. Failures are logged once per kind, not per retry, and show in its
/// [`SinkHandle`]'s stats (state, last error, lag) for the JSON API and `/metrics`.
///
/// With replicas, one writes: the sink works only while its replica leads [`ROLE`] (state
/// `standby` meanwhile, holding no session). A replica that starts leading reads every id back and
/// writes the difference, so the database again equals the map, which is the same on every replica.
pub struct Sink {
    settings: Neo4jSettings,
    topology: Topology,
    enrollment: Enrollment,
    naming: Naming,
    /// Anything operators are told of may have changed the view's decorations (labels, rules, an
    /// agent's state): each event makes the next tick a pass.
    events: Events,
    /// `topology.ttl`: an edge turns inactive this long after its `last_seen`.
    ttl: Duration,
    handle: SinkHandle,
    /// Whether this replica writes to the database (always, with the embedded store).
    leading: watch::Receiver<bool>,
}

/// The role whose leader runs the sink (`tapgraph_leader{role="neo4j_sink"}`).
pub const ROLE: &str = "neo4j_sink";

/// What a successful pass leaves for the next ones.
struct Pass {
    /// Time spent finding the difference.
    cost: Duration,
    /// When (ms since 1970) the first edge still active turns inactive.
    next_flip_ms: Option<u64>,
}

/// The sink's session with the database: what it knows the database holds.
struct Session {
    graph: neo4rs::Graph,
    opened: Instant,
    held: Held,
}

/// What the run loop remembers between ticks.
struct Progress {
    session: Option<Session>,
    retry: Backoff,
    /// How long to wait before the next attempt, after a failure.
    wait: Option<Duration>,
    /// The last failure logged, until a pass succeeds.
    reported: Option<Failure>,
    /// When the database last equalled the model.
    in_sync_at: Instant,
    /// The model's generation the last successful pass saw.
    synced_generation: u64,
    /// When the last successful pass ran, and what it cost.
    last_pass: Option<(Instant, Duration)>,
    /// When the last successful pass read the map: changes after it wait for the next pass.
    last_read: Option<Instant>,
    /// Whether an event came since the last pass read the view, and when the next edge turns
    /// inactive: both change the view without changing the model's generation.
    poked: bool,
    next_flip_ms: Option<u64>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            session: None,
            retry: retry_policy().start(),
            wait: None,
            reported: None,
            in_sync_at: Instant::now(),
            synced_generation: 0,
            last_pass: None,
            last_read: None,
            poked: false,
            next_flip_ms: None,
        }
    }

    /// A pass diffs the whole map: skipped when nothing changed, except once a minute (reverse-DNS
    /// names change the view by themselves); and never diff more than a twentieth of the time,
    /// however large the map.
    fn skip(&self, generation: u64) -> bool {
        let (Some(_), Some((at, cost))) = (&self.session, self.last_pass) else {
            return false;
        };
        let flipped = self.next_flip_ms.is_some_and(|t| now_ms() >= t);
        let unchanged = generation == self.synced_generation
            && !self.poked
            && !flipped
            && at.elapsed() < FULL_PASS_EVERY;
        unchanged || at.elapsed() < (cost * 20).min(FULL_PASS_EVERY)
    }

    /// The database may have been restored, emptied or edited without the sink seeing an error
    /// (the driver replaces dead connections quietly): it is read back now and then.
    fn reconcile_if_due(&mut self) {
        if self
            .session
            .as_ref()
            .is_some_and(|s| s.opened.elapsed() >= RECONCILE_EVERY)
        {
            self.session = None;
        }
    }
}

impl Sink {
    /// The sink; it writes while `leading` says this replica leads [`ROLE`]
    /// (`Store::leadership`).
    pub fn new(
        settings: Neo4jSettings,
        topology: Topology,
        enrollment: Enrollment,
        naming: Naming,
        events: Events,
        ttl: Duration,
        leading: watch::Receiver<bool>,
    ) -> (Sink, SinkHandle) {
        let handle = SinkHandle::default();
        handle.set_state("connecting");
        (
            Sink {
                settings,
                topology,
                enrollment,
                naming,
                events,
                ttl,
                handle: handle.clone(),
                leading,
            },
            handle,
        )
    }

    pub async fn run(self, stop: CancellationToken) {
        let mut progress = Progress::new();
        let mut events = Some(self.events.subscribe());
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leading = self.leading.clone();
        let mut leads = *leading.borrow_and_update();
        self.handle.update(|s| s.leader = leads);
        if !leads {
            self.handle.set_state("standby");
        }
        // The embedded store's leadership is final (its channel is closed): not listened to.
        let mut leadership_open = true;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
                event = next_event(&mut events) => {
                    progress.poked |= event;
                    continue;
                }
                changed = leading.changed(), if leadership_open => {
                    if changed.is_err() {
                        leadership_open = false;
                        continue;
                    }
                    leads = *leading.borrow_and_update();
                    self.lead(&mut progress, leads);
                    // A new leader syncs at once, not an interval later.
                    if !leads {
                        continue;
                    }
                }
            }
            if !leads {
                continue;
            }
            let generation = self.topology.generation();
            if progress.skip(generation) {
                continue;
            }
            progress.reconcile_if_due();
            if let Some(wait) = progress.wait {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let read_at = Instant::now();
            // Events from now on are for the next pass: this one reads the view after them.
            progress.poked = false;
            match self.attempt(&mut progress.session).await {
                Ok(pass) => self.succeeded(&mut progress, pass, generation, read_at),
                Err(failure) => self.failed(&mut progress, failure),
            }
        }
    }

    /// This replica starts or stops leading: either way it starts over without a session, so a
    /// new leader reads every id back before its first pass (whatever the last leader wrote),
    /// and a replica that stops leading holds no connection.
    fn lead(&self, progress: &mut Progress, leads: bool) {
        *progress = Progress::new();
        self.handle.update(|s| s.leader = leads);
        if leads {
            self.handle.set_state("connecting");
            tracing::info!(address = %self.settings.address, "this replica runs the neo4j sink now");
        } else {
            self.handle.set_state("standby");
            tracing::info!(address = %self.settings.address, "another replica runs the neo4j sink; this one stands by");
        }
    }

    /// One pass, on the session there is or a new one. A failed pass drops the session: the
    /// next one reconnects and reads the ids back.
    async fn attempt(&self, session: &mut Option<Session>) -> Result<Pass, Failure> {
        let mut s = match session.take() {
            Some(s) => s,
            None => self.open().await?,
        };
        let pass = self.sync(&mut s).await?;
        *session = Some(s);
        Ok(pass)
    }

    fn succeeded(&self, progress: &mut Progress, pass: Pass, generation: u64, read_at: Instant) {
        progress.next_flip_ms = pass.next_flip_ms;
        let delay = progress
            .last_read
            .filter(|_| generation != progress.synced_generation)
            .map(|at| at.elapsed().as_secs_f64());
        progress.last_read = Some(read_at);
        progress.synced_generation = generation;
        progress.last_pass = Some((Instant::now(), pass.cost));
        if progress.reported.take().is_some() {
            tracing::info!(address = %self.settings.address, "neo4j sink recovered; the database is reconciled with the model");
        }
        progress.retry.reset();
        progress.wait = None;
        progress.in_sync_at = Instant::now();
        self.handle.record_in_sync(delay);
    }

    fn failed(&self, progress: &mut Progress, failure: Failure) {
        if worth_reporting(progress.reported.as_ref(), &failure) {
            self.report(&failure);
        }
        progress.wait = Some(wait_after(&mut progress.retry, &failure));
        let lag = progress.in_sync_at.elapsed().as_secs_f64();
        self.handle
            .record_failure(failure.state(), failure.text(), lag);
        progress.reported = Some(failure);
    }

    fn report(&self, failure: &Failure) {
        match failure {
            Failure::Auth(text) => tracing::error!(
                address = %self.settings.address,
                user = %self.settings.user,
                error = %text,
                "neo4j refused the credentials: fix graph.neo4j.user/password; the map stays in the embedded store and the sink retries once a minute"
            ),
            Failure::Unreachable(text) => tracing::warn!(
                address = %self.settings.address,
                error = %text,
                "neo4j unreachable; the map stays in the embedded store and the sink catches up when it is back"
            ),
            Failure::Other(text) => tracing::warn!(
                address = %self.settings.address,
                error = %text,
                "neo4j write failed; retrying with backoff"
            ),
        }
    }

    /// Connects, creates the constraints, and reads back every id the database holds.
    async fn open(&self) -> Result<Session, Failure> {
        let s = &self.settings;
        let mut config = ConfigBuilder::default()
            .uri(s.address.as_str())
            .user(s.user.as_str())
            .password(s.password.0.as_str())
            .max_connections(2);
        if !s.database.is_empty() {
            config = config.db(s.database.as_str());
        }
        let config = config
            .build()
            .map_err(|e| Failure::Other(format!("neo4j configuration: {e}")))?;
        let graph = neo4rs::Graph::connect(config).map_err(Failure::of)?;
        for label in Label::ALL {
            let cypher = cypher::create_constraint(label);
            timed("create constraint", graph.run(query(&cypher))).await?;
        }
        for kind in Kind::ALL {
            let cypher = cypher::create_index(kind);
            timed("create index", graph.run(query(&cypher))).await?;
        }
        let mut session = Session {
            graph,
            opened: Instant::now(),
            held: Held::default(),
        };
        self.read_back(&mut session).await?;
        self.handle.update(|st| st.reconciliations += 1);
        tracing::info!(
            address = %s.address,
            nodes = session.held.nodes.len(),
            relationships = session.held.rels.len(),
            "neo4j sink connected; reconciling the database with the model"
        );
        Ok(session)
    }

    /// Reads every id of ours the database holds into the session, and deletes copies of a
    /// relationship id (another writer's, or a commit that landed after the sink gave up on it):
    /// all but one go.
    async fn read_back(&self, session: &mut Session) -> Result<(), Failure> {
        for label in Label::ALL {
            for id in read_ids(&session.graph, &cypher::read_node_ids(label)).await? {
                session.held.nodes.insert(id, (label, 0));
            }
        }
        for kind in Kind::ALL {
            let mut twice = Vec::new();
            for id in read_ids(&session.graph, &cypher::read_rel_ids(kind)).await? {
                if session.held.rels.insert(id.clone(), (kind, 0)).is_some() {
                    twice.push(id);
                }
            }
            twice.sort_unstable();
            twice.dedup();
            let cypher = cypher::delete_copies(kind);
            for chunk in twice.chunks(self.settings.batch_size) {
                self.write(
                    &session.graph,
                    &cypher,
                    cypher::id_rows(chunk),
                    chunk.len(),
                    true,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// One pass: the difference between the model and what the database holds, written. Returns
    /// the time spent finding the difference (the controller's own work, not the database's) and
    /// when the view will next change by itself.
    async fn sync(&self, session: &mut Session) -> Result<Pass, Failure> {
        let started = Instant::now();
        let graph = self.read_view().await;
        let want = desired(&graph, self.settings.last_seen_step);
        let next_flip_ms = next_flip_ms(&graph, self.ttl);
        let changes = Changes::between(&want, &session.held);
        let cost = started.elapsed();
        if changes.rows() > 0 {
            self.handle.set_state("writing");
            tracing::debug!(
                node_upserts = changes.node_upserts.len(),
                rel_upserts = changes.rel_upserts.len(),
                rel_deletes = changes.rel_deletes.len(),
                node_deletes = changes.node_deletes.len(),
                "neo4j sink writing changes"
            );
        }
        self.upsert_nodes(session, &changes.node_upserts).await?;
        self.upsert_rels(session, &changes.rel_upserts).await?;
        self.delete_rels(session, &changes.rel_deletes).await?;
        self.delete_nodes(session, &changes.node_deletes).await?;
        let (nodes, rels) = (
            session.held.nodes.len() as u64,
            session.held.rels.len() as u64,
        );
        self.handle.update(|s| {
            s.nodes = nodes;
            s.relationships = rels;
            s.last_diff_seconds = cost.as_secs_f64();
        });
        Ok(Pass { cost, next_flip_ms })
    }

    /// The map as operators see it, control-plane and inactive edges included.
    async fn read_view(&self) -> Graph {
        view::map(
            &self.topology,
            &self.enrollment,
            &self.naming,
            GraphQuery {
                include_control: true,
                include_inactive: true,
            },
        )
        .await
    }

    async fn upsert_nodes(
        &self,
        session: &mut Session,
        upserts: &[(u64, &NodeRow)],
    ) -> Result<(), Failure> {
        for label in Label::ALL {
            let rows: Vec<(u64, &NodeRow)> = upserts
                .iter()
                .copied()
                .filter(|(_, n)| n.label == label)
                .collect();
            let cypher = cypher::upsert_nodes(label);
            for chunk in rows.chunks(self.settings.batch_size) {
                let params = cypher::node_rows(chunk);
                self.write(&session.graph, &cypher, params, chunk.len(), false)
                    .await?;
                for (hash, n) in chunk {
                    session.held.nodes.insert(n.id.clone(), (n.label, *hash));
                }
            }
        }
        Ok(())
    }

    /// Grouped by type and end labels, which the statement names, and by whether the database
    /// has the relationship: the session knows (it read every id back), so a new one is
    /// `CREATE`d ([`cypher::create_rels`]), a known one found through the index on its id.
    async fn upsert_rels(&self, session: &mut Session, upserts: &[RelRow]) -> Result<(), Failure> {
        let mut groups: BTreeMap<(Kind, Label, Label, bool), Vec<&RelRow>> = BTreeMap::new();
        for r in upserts {
            let known = session.held.rels.contains_key(&r.id);
            groups
                .entry((r.kind, r.from.0, r.to.0, known))
                .or_default()
                .push(r);
        }
        for ((kind, from, to, known), rows) in groups {
            let cypher = if known {
                cypher::update_rels(kind)
            } else {
                cypher::create_rels(kind, from, to)
            };
            for chunk in rows.chunks(self.settings.batch_size) {
                let params = if known {
                    cypher::known_rel_rows(chunk)
                } else {
                    cypher::new_rel_rows(chunk)
                };
                self.write(&session.graph, &cypher, params, chunk.len(), false)
                    .await?;
                for r in chunk {
                    session.held.rels.insert(r.id.clone(), (r.kind, r.hash));
                }
            }
        }
        Ok(())
    }

    async fn delete_rels(
        &self,
        session: &mut Session,
        deletes: &[(String, Kind)],
    ) -> Result<(), Failure> {
        for kind in Kind::ALL {
            let ids: Vec<&String> = deletes
                .iter()
                .filter(|(_, k)| *k == kind)
                .map(|(id, _)| id)
                .collect();
            let cypher = cypher::delete_rels(kind);
            for chunk in ids.chunks(self.settings.batch_size) {
                self.write(
                    &session.graph,
                    &cypher,
                    cypher::id_rows(chunk),
                    chunk.len(),
                    true,
                )
                .await?;
                for id in chunk {
                    session.held.rels.remove(*id);
                }
            }
        }
        Ok(())
    }

    async fn delete_nodes(
        &self,
        session: &mut Session,
        deletes: &[(String, Label)],
    ) -> Result<(), Failure> {
        for label in Label::ALL {
            let ids: Vec<&String> = deletes
                .iter()
                .filter(|(_, l)| *l == label)
                .map(|(id, _)| id)
                .collect();
            let cypher = cypher::delete_nodes(label);
            for chunk in ids.chunks(self.settings.batch_size) {
                self.write(
                    &session.graph,
                    &cypher,
                    cypher::id_rows(chunk),
                    chunk.len(),
                    true,
                )
                .await?;
                for id in chunk {
                    session.held.nodes.remove(*id);
                }
            }
        }
        Ok(())
    }

    /// One batch of `n` rows in one explicit transaction. neo4rs does not retry explicit
    /// transactions; a failed one is rolled back by the server, and the caller's next pass redoes
    /// it.
    async fn write(
        &self,
        graph: &neo4rs::Graph,
        cypher: &str,
        rows: Vec<BoltType>,
        n: usize,
        delete: bool,
    ) -> Result<(), Failure> {
        let started = Instant::now();
        let mut txn = timed("begin", graph.start_txn()).await?;
        timed("write", txn.run(query(cypher).param("rows", rows))).await?;
        timed("commit", txn.commit()).await?;
        self.handle
            .record_batch(n as u64, delete, started.elapsed());
        Ok(())
    }
}

fn now_ms() -> u64 {
    tapgraph::time::unix_nanos() / 1_000_000
}

/// Whether an event came (true), or the channel closed (false, and it is listened to no more).
/// A watcher that fell behind missed events, which counts as one.
async fn next_event(events: &mut Option<broadcast::Receiver<proto::Event>>) -> bool {
    let Some(rx) = events else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => true,
        Err(broadcast::error::RecvError::Closed) => {
            *events = None;
            false
        }
    }
}

async fn read_ids(graph: &neo4rs::Graph, cypher: &str) -> Result<Vec<String>, Failure> {
    let mut stream = timed("read ids", graph.execute(query(cypher))).await?;
    let mut ids = Vec::new();
    while let Some(row) = timed("read ids", stream.next()).await? {
        // A node without an id is not ours (another writer's); it is left alone.
        if let Ok(id) = row.get::<String>("id") {
            ids.push(id);
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::SinkStats;

    /// A running sink: its stats, its leadership in the test's hands, its stop, and its store's
    /// directory.
    type Running = (
        SinkHandle,
        watch::Sender<bool>,
        CancellationToken,
        tempfile::TempDir,
    );

    /// A sink towards an address where nothing listens, with its leadership in the test's hands.
    async fn sink(leads: bool) -> Running {
        use crate::enrollment::limits::EnrollLimits;
        use crate::health::Health;
        use crate::registry::Registry;
        use crate::store::Store;
        use crate::topology::{TopologySettings, labels, names};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb")).unwrap();
        let events = Events::new(16);
        let (registry, registry_task) =
            Registry::spawn("test", events.clone(), Health::default(), 10);
        tokio::spawn(registry_task);
        let ca =
            tapgraph::pki::CertAuthority::generate("test CA", Duration::from_secs(3600)).unwrap();
        let (enrollment, enrollment_task) = Enrollment::spawn(
            store.clone(),
            ca,
            Duration::from_secs(3600),
            registry,
            events.clone(),
            EnrollLimits::new(100.0, 100),
        )
        .unwrap();
        tokio::spawn(enrollment_task);
        let settings = TopologySettings {
            ttl: Duration::from_secs(120),
            retention: Duration::from_secs(3600),
            history_retention: Duration::from_secs(86_400),
            history_interval: Duration::from_secs(3600),
            max_entries: 100,
            max_rows: 1000,
            queue: 16,
        };
        let (topology, topology_task) =
            Topology::spawn(store.clone(), settings, events.clone()).unwrap();
        tokio::spawn(topology_task);
        let naming = Naming {
            config_rules: Default::default(),
            operator_rules: labels::OperatorRules::load(store).unwrap(),
            names: names::Names::disabled(),
            agents: Health::default(),
        };
        // Nothing listens on port 1: a leader's every pass fails as unreachable.
        let neo4j = Neo4jSettings {
            address: "bolt://127.0.0.1:1".into(),
            user: "neo4j".into(),
            password: crate::sinks::Secret("x".into()),
            database: String::new(),
            batch_size: 10,
            interval: Duration::from_millis(20),
            last_seen_step: Duration::from_secs(600),
        };
        let (leading, rx) = watch::channel(leads);
        let (sink, handle) = Sink::new(
            neo4j,
            topology,
            enrollment,
            naming,
            events,
            Duration::from_secs(120),
            rx,
        );
        let stop = CancellationToken::new();
        tokio::spawn(sink.run(stop.clone()));
        (handle, leading, stop, dir)
    }

    async fn until(handle: &SinkHandle, what: &str, f: impl Fn(&SinkStats) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(&handle.stats()) {
            assert!(
                Instant::now() < deadline,
                "{what}: not within 10 s: {:?}",
                handle.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_leading_replica_s_sink_works_and_a_new_leader_starts_over() {
        let (handle, leading, stop, _dir) = sink(false).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = handle.stats();
        assert_eq!(
            (s.state.as_str(), s.leader, s.errors),
            ("standby", false, 0)
        );
        leading.send_replace(true);
        until(&handle, "a leader tries the database", |s| {
            s.leader && s.state == "unreachable" && s.errors > 0
        })
        .await;
        leading.send_replace(false);
        until(&handle, "stands by", |s| !s.leader && s.state == "standby").await;
        let errors = handle.stats().errors;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            handle.stats().errors,
            errors,
            "a replica standing by tries nothing"
        );
        stop.cancel();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_controller_s_sink_always_leads() {
        let (handle, leading, stop, _dir) = sink(true).await;
        drop(leading);
        until(&handle, "tries the database", |s| s.leader && s.errors > 0).await;
        stop.cancel();
    }

    #[test]
    fn after_refused_credentials_a_minute_then_the_longest_step() {
        let mut retry = retry_policy().start();
        let auth = Failure::Auth("refused".into());
        let other = Failure::Unreachable("connection refused".into());
        assert_eq!(wait_after(&mut retry, &other), Duration::from_millis(500));
        assert_eq!(wait_after(&mut retry, &auth), Duration::from_secs(60));
        assert_eq!(wait_after(&mut retry, &other), Duration::from_secs(30));
        retry.reset();
        assert_eq!(wait_after(&mut retry, &other), Duration::from_millis(500));
    }

    #[test]
    fn retries_wait_half_a_second_doubling_to_30s() {
        let mut retry = retry_policy().start();
        let waits: Vec<u64> = (0..9)
            .map(|_| retry.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(
            waits,
            [
                500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000
            ]
        );
        retry.reset();
        assert_eq!(retry.next_delay(), Duration::from_millis(500));
    }
}
