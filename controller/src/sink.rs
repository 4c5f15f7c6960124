//! The Neo4j sink: the map, as operators see it ([`view::graph`]), mirrored into a Bolt graph
//! database so that Cypher, Neo4j Browser and Bloom work on it.
//!
//! One writer task. Every `interval` it takes the view, diffs it against what it knows the
//! database holds (a hash per node and relationship id), and writes only the difference:
//! nodes upserted, then relationships upserted, then relationships deleted, then nodes deleted,
//! each in `UNWIND` batches of `batch_size` rows inside an explicit transaction. Values travel as
//! parameters only; labels and relationship types come from this file's constants, never from
//! data. Nodes are `MERGE`d on a unique `id`, under uniqueness constraints created at start
//! (`IF NOT EXISTS`); relationships, which Cypher cannot constrain portably, carry a unique `id`
//! too, indexed, and are created only when the session knows the database lacks them.
//!
//! What the database holds is known only while the connection lasts: at start, after any failed
//! write, and every 10 minutes, the sink reads every id back from the database before diffing
//! (and removes copies of an id, should another writer have made any). That one read is
//! the reconciliation: whatever the model lacks is deleted, whatever differs or is missing is
//! written. So after a restart of either side, or an outage during which the map changed,
//! the database ends up equal to the model, without duplicates or stale edges.
//!
//! Every snapshot refreshes the `last_seen` of every live edge, and rewriting all of them every
//! few seconds would make the "changes" the whole graph. So a change of `last_seen` alone is
//! written only when it enters a new `last_seen_step` (10 min by default); whatever is written is
//! the model's real `last_seen` at that pass, never before `first_seen`. An edge is rewritten,
//! with its exact `last_seen`, whenever anything else of it changes, `active` included: so an
//! inactive edge's `last_seen` is exact, and an active edge's trails the truth by less than a
//! step. `active` is exact: the sink wakes when the next active edge turns inactive (`ttl` after
//! its `last_seen`), the model's generation being unchanged by that.
//!
//! A pass costs a diff of the whole map (0.18 s for 100,000 edges), so it is skipped while the
//! model's generation is unchanged, no edge turned inactive and no event came (labels set, rules
//! changed, an agent connected or lost: they change the view without changing the model), for up
//! to a minute (reverse-DNS names), and diffing never takes more than a twentieth of the time.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use neo4rs::{BoltType, ConfigBuilder, Graph, query};
use serde::Serialize;
use tapgraph::proto;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::enrollment::Enrollment;
use crate::events::Events;
use crate::topology::{GraphQuery, Naming, Topology, view};

/// A password: kept out of logs and debug output.
#[derive(Clone, Default)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

#[derive(Debug, Clone)]
pub struct Neo4jSettings {
    /// What neo4rs connects to: `bolt://host:port` and the like, or `host:port`.
    pub address: String,
    pub user: String,
    pub password: Secret,
    /// Empty: the server's default database.
    pub database: String,
    pub batch_size: usize,
    pub interval: Duration,
    pub last_seen_step: Duration,
}

/// Checks `graph.neo4j.uri`: `bolt://`, `neo4j://` (with `+s` or `+ssc`), or a bare `host:port`.
pub fn bolt_address(uri: &str) -> Result<String, String> {
    const SCHEMES: [&str; 6] = [
        "bolt://",
        "neo4j://",
        "bolt+s://",
        "neo4j+s://",
        "bolt+ssc://",
        "neo4j+ssc://",
    ];
    let rest = SCHEMES
        .iter()
        .find_map(|s| uri.strip_prefix(s))
        .unwrap_or(uri);
    if rest.contains("://") {
        return Err(format!(
            "`{uri}`: unknown scheme; use bolt://HOST:PORT or neo4j://HOST:PORT (+s, +ssc for TLS)"
        ));
    }
    let hostport = rest.trim_end_matches('/');
    let ok = hostport
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        return Err(format!(
            "`{uri}`: expected HOST:PORT, e.g. bolt://neo4j.db:7687"
        ));
    }
    Ok(uri.trim_end_matches('/').to_string())
}

/// What the sink has done, for `/api/v1/topology/stats` and logs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStats {
    /// `connecting`, `in_sync`, `writing`, `unreachable`, `auth_failed` or `failing`.
    pub state: String,
    pub last_error: String,
    /// Seconds since the database last equalled the model (0 when it does now).
    pub lag_seconds: f64,
    /// How long, at most, a change to the map waited for the database in the last pass that
    /// wrote changes: from just after the pass before read the map until this one committed.
    pub delay_seconds: f64,
    pub transactions: u64,
    pub rows_written: u64,
    pub rows_deleted: u64,
    pub last_batch_rows: u64,
    pub largest_batch_rows: u64,
    pub errors: u64,
    /// Full reads of the database's ids (at start and after failures).
    pub reconciliations: u64,
    /// Passes that read the map and wrote its difference to the database (often none).
    pub passes: u64,
    pub nodes: u64,
    pub relationships: u64,
    /// Time the last pass took to find the difference (view and diff, before writing; waits for
    /// the topology task included).
    pub last_diff_seconds: f64,
    /// Time spent in write transactions, in all.
    pub write_seconds: f64,
}

#[derive(Clone, Default)]
pub struct SinkHandle(Arc<Mutex<SinkStats>>);

impl SinkHandle {
    pub fn stats(&self) -> SinkStats {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn update(&self, f: impl FnOnce(&mut SinkStats)) {
        if let Ok(mut s) = self.0.lock() {
            f(&mut s);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Label {
    Host,
    Address,
    Service,
}

impl Label {
    const ALL: [Label; 3] = [Label::Host, Label::Address, Label::Service];

    fn name(self) -> &'static str {
        match self {
            Label::Host => "Host",
            Label::Address => "Address",
            Label::Service => "Service",
        }
    }

    fn of_kind(kind: &str) -> Option<Label> {
        match kind {
            "host" => Some(Label::Host),
            "address" => Some(Label::Address),
            "service" => Some(Label::Service),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    HasAddress,
    Listens,
    ConnectsTo,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::HasAddress, Kind::Listens, Kind::ConnectsTo];

    fn name(self) -> &'static str {
        match self {
            Kind::HasAddress => "HAS_ADDRESS",
            Kind::Listens => "LISTENS",
            Kind::ConnectsTo => "CONNECTS_TO",
        }
    }

    fn of_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl From<&Value> for BoltType {
    fn from(v: &Value) -> BoltType {
        match v {
            Value::Str(s) => s.as_str().into(),
            Value::Int(i) => (*i).into(),
            Value::Bool(b) => (*b).into(),
        }
    }
}

type Props = BTreeMap<String, Value>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct NodeRow {
    label: Label,
    id: String,
    props: Props,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RelRow {
    kind: Kind,
    from: (Label, String),
    to: (Label, String),
    id: String,
    /// As [`desired`] hashed it.
    hash: u64,
    props: Props,
}

/// The model by id, with a hash of what each element should hold. Nodes are few and become rows
/// at once; a relationship becomes a row ([`rel_row`]) only when it must be written, since the
/// whole map is diffed on every pass.
#[derive(Debug, Default)]
struct Desired<'g> {
    nodes: HashMap<&'g str, (u64, NodeRow)>,
    rels: HashMap<String, (u64, Kind, &'g proto::GraphEdge)>,
}

fn hash_of(value: &impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    // 0 means "in the database, contents unknown".
    h.finish() | 1
}

/// Properties whose values are numbers in the database.
const INT_PROPERTIES: [&str; 1] = ["port"];

fn protocol_name(p: i32) -> &'static str {
    match proto::Protocol::try_from(p) {
        Ok(proto::Protocol::Tcp) => "tcp",
        Ok(proto::Protocol::Udp) => "udp",
        _ => "",
    }
}

fn ms(nanos: u64) -> i64 {
    (nanos / 1_000_000) as i64
}

/// The `last_seen` written for `e`: the model's, in ms, never before its `first_seen`.
fn last_seen_ms(e: &proto::GraphEdge) -> i64 {
    ms(e.last_seen_unix_nanos.max(e.first_seen_unix_nanos))
}

/// Which `last_seen_step` an edge's `last_seen` falls in: a change of step is written, a change
/// within one is not.
fn last_seen_bucket(e: &proto::GraphEdge, last_seen_step: Duration) -> i64 {
    let step = i64::try_from(last_seen_step.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    last_seen_ms(e) / step
}

fn desired(graph: &proto::Graph, last_seen_step: Duration) -> Desired<'_> {
    let mut out = Desired::default();
    for n in &graph.nodes {
        let Some(label) = Label::of_kind(&n.kind) else {
            continue;
        };
        let mut props = Props::new();
        for (k, v) in &n.properties {
            let value = match v.parse::<i64>() {
                Ok(i) if INT_PROPERTIES.contains(&k.as_str()) => Value::Int(i),
                _ => Value::Str(v.clone()),
            };
            props.insert(k.clone(), value);
        }
        props.insert("id".into(), Value::Str(n.id.clone()));
        props.insert("name".into(), Value::Str(n.name.clone()));
        let row = NodeRow {
            label,
            id: n.id.clone(),
            props,
        };
        out.nodes.insert(n.id.as_str(), (hash_of(&row), row));
    }
    out.rels.reserve(graph.edges.len());
    for e in &graph.edges {
        let Some(kind) = Kind::of_name(&e.kind) else {
            continue;
        };
        if !out.nodes.contains_key(e.from.as_str()) || !out.nodes.contains_key(e.to.as_str()) {
            continue;
        }
        let id = format!(
            "{}|{}|{}|{}/{}",
            kind.name(),
            e.from,
            e.to,
            e.port,
            protocol_name(e.protocol)
        );
        // What rel_row writes, without building it, except that `last_seen` counts only by its
        // step: a later `last_seen` in the same step alone is not worth a write.
        let hash = hash_of(&(
            kind,
            &e.from,
            &e.to,
            e.port,
            e.protocol,
            &e.process,
            e.sockets,
            ms(e.first_seen_unix_nanos),
            last_seen_bucket(e, last_seen_step),
            e.active,
            e.control_plane,
        ));
        out.rels.insert(id, (hash, kind, e));
    }
    out
}

/// The row of a relationship [`desired`] found changed.
fn rel_row(want: &Desired<'_>, id: &str, hash: u64, kind: Kind, e: &proto::GraphEdge) -> RelRow {
    let label = |node: &str| want.nodes.get(node).map_or(Label::Host, |(_, n)| n.label);
    let mut props = Props::new();
    props.insert("id".into(), Value::Str(id.to_string()));
    if kind != Kind::HasAddress {
        props.insert("port".into(), Value::Int(i64::from(e.port)));
        props.insert(
            "protocol".into(),
            Value::Str(protocol_name(e.protocol).into()),
        );
    }
    if kind == Kind::ConnectsTo {
        props.insert("process".into(), Value::Str(e.process.clone()));
        props.insert("sockets".into(), Value::Int(i64::from(e.sockets)));
        props.insert("first_seen".into(), Value::Int(ms(e.first_seen_unix_nanos)));
        props.insert("last_seen".into(), Value::Int(last_seen_ms(e)));
        props.insert("active".into(), Value::Bool(e.active));
        props.insert("control_plane".into(), Value::Bool(e.control_plane));
    }
    RelRow {
        kind,
        from: (label(&e.from), e.from.clone()),
        to: (label(&e.to), e.to.clone()),
        id: id.to_string(),
        hash,
        props,
    }
}

fn props_bolt(props: &Props) -> BoltType {
    let map: HashMap<String, BoltType> = props
        .iter()
        .map(|(k, v)| (k.clone(), BoltType::from(v)))
        .collect();
    map.into()
}

/// What went wrong, as far as what to do next is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// Wrong user or password: retried slowly, reported once.
    Auth(String),
    /// Connection refused, reset, timed out: retried with backoff.
    Unreachable(String),
    /// The server refused a statement or transaction.
    Other(String),
}

impl Failure {
    fn of(e: neo4rs::Error) -> Failure {
        let text = e.to_string();
        match e {
            neo4rs::Error::AuthenticationError(_) => Failure::Auth(text),
            // Unauthorized, CredentialsExpired, AuthenticationRateLimit; not Forbidden (a user
            // without the rights to write or to create constraints), which is a refusal.
            neo4rs::Error::Neo4j(ref n)
                if n.code().starts_with("Neo.ClientError.Security.")
                    && !n.code().ends_with(".Forbidden") =>
            {
                Failure::Auth(text)
            }
            neo4rs::Error::IOError { .. }
            | neo4rs::Error::ConnectionError
            | neo4rs::Error::IncompleteBoltExchange => Failure::Unreachable(text),
            _ => Failure::Other(text),
        }
    }

    fn text(&self) -> &str {
        match self {
            Failure::Auth(t) | Failure::Unreachable(t) | Failure::Other(t) => t,
        }
    }

    fn state(&self) -> &'static str {
        match self {
            Failure::Auth(_) => "auth_failed",
            Failure::Unreachable(_) => "unreachable",
            Failure::Other(_) => "failing",
        }
    }
}

/// The longest a pass is skipped because the model did not change, or paced.
const FULL_PASS_EVERY: Duration = Duration::from_secs(60);

/// How often the sink reads every id back from the database even without a failure.
const RECONCILE_EVERY: Duration = Duration::from_secs(600);

/// A failure is logged when it is the first, or of another kind than the last one logged; the
/// same failure again on every retry would be a storm.
fn worth_reporting(last: Option<&Failure>, new: &Failure) -> bool {
    last.is_none_or(|l| std::mem::discriminant(l) != std::mem::discriminant(new))
}

/// Time limit of one database round trip; a server that hangs counts as unreachable.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

async fn timed<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, neo4rs::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(STATEMENT_TIMEOUT, f).await {
        Ok(result) => result.map_err(Failure::of),
        Err(_) => Err(Failure::Unreachable(format!(
            "{what}: no answer in {}s",
            STATEMENT_TIMEOUT.as_secs()
        ))),
    }
}

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
}

/// What a successful pass leaves for the next ones.
struct Pass {
    /// Time spent finding the difference.
    cost: Duration,
    /// When (ms since 1970) the first edge still active turns inactive.
    next_flip_ms: Option<u64>,
}

/// The sink's session with the database: what it knows the database holds.
struct Session {
    graph: Graph,
    opened: Instant,
    nodes: HashMap<String, (Label, u64)>,
    rels: HashMap<String, (Kind, u64)>,
}

impl Sink {
    pub fn new(
        settings: Neo4jSettings,
        topology: Topology,
        enrollment: Enrollment,
        naming: Naming,
        events: Events,
        ttl: Duration,
    ) -> (Sink, SinkHandle) {
        let handle = SinkHandle::default();
        handle.update(|s| s.state = "connecting".into());
        (
            Sink {
                settings,
                topology,
                enrollment,
                naming,
                events,
                ttl,
                handle: handle.clone(),
            },
            handle,
        )
    }

    pub async fn run(self, stop: CancellationToken) {
        let mut session: Option<Session> = None;
        let mut backoff = Duration::ZERO;
        let mut reported: Option<Failure> = None;
        let mut in_sync_at = Instant::now();
        // What the last successful pass saw, when it ran, and what it cost.
        let mut synced_generation = 0;
        let mut last_pass: Option<(Instant, Duration)> = None;
        // When the last successful pass read the map: changes after it wait for the next pass.
        let mut last_read: Option<Instant> = None;
        // Whether an event came since the last pass read the view, and when the next edge turns
        // inactive: both change the view without changing the model's generation.
        let mut poked = false;
        let mut next_flip_ms: Option<u64> = None;
        let mut events = Some(self.events.subscribe());
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
                event = next_event(&mut events) => {
                    poked |= event;
                    continue;
                }
            }
            let generation = self.topology.generation();
            if let (Some(_), Some((at, cost))) = (&session, last_pass) {
                // A pass diffs the whole map: skipped when nothing changed, except once a minute
                // (reverse-DNS names change the view by themselves); and never diff more than a
                // twentieth of the time, however large the map.
                let flipped = next_flip_ms.is_some_and(|t| now_ms() >= t);
                let unchanged = generation == synced_generation
                    && !poked
                    && !flipped
                    && at.elapsed() < FULL_PASS_EVERY;
                if unchanged || at.elapsed() < (cost * 20).min(FULL_PASS_EVERY) {
                    continue;
                }
            }
            // The database may have been restored, emptied or edited without the sink seeing an
            // error (the driver replaces dead connections quietly): read it back now and then.
            if session
                .as_ref()
                .is_some_and(|s| s.opened.elapsed() >= RECONCILE_EVERY)
            {
                session = None;
            }

            if !backoff.is_zero() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            let read_at = Instant::now();
            // Events from now on are for the next pass: this one reads the view after them.
            poked = false;
            let result = match session.take() {
                Some(s) => Ok(s),
                None => self.open().await,
            };
            let outcome = match result {
                Ok(mut s) => match self.sync(&mut s).await {
                    Ok(pass) => {
                        session = Some(s);
                        Ok(pass)
                    }
                    // The session is dropped: the next pass reconnects and reads the ids back.
                    Err(f) => Err(f),
                },
                Err(f) => Err(f),
            };
            match outcome {
                Ok(Pass {
                    cost,
                    next_flip_ms: flip,
                }) => {
                    next_flip_ms = flip;
                    let delay = last_read
                        .filter(|_| generation != synced_generation)
                        .map(|at| at.elapsed().as_secs_f64());
                    last_read = Some(read_at);
                    synced_generation = generation;
                    last_pass = Some((Instant::now(), cost));
                    if reported.take().is_some() {
                        tracing::info!(address = %self.settings.address, "neo4j sink recovered; the database is reconciled with the model");
                    }
                    backoff = Duration::ZERO;
                    in_sync_at = Instant::now();
                    self.handle.update(|s| {
                        s.state = "in_sync".into();
                        s.passes += 1;
                        s.lag_seconds = 0.0;
                        if let Some(delay) = delay {
                            s.delay_seconds = delay;
                        }
                    });
                }
                Err(failure) => {
                    if worth_reporting(reported.as_ref(), &failure) {
                        match &failure {
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
                    backoff = match failure {
                        Failure::Auth(_) => Duration::from_secs(60),
                        _ => {
                            (backoff * 2).clamp(Duration::from_millis(500), Duration::from_secs(30))
                        }
                    };
                    let lag = in_sync_at.elapsed().as_secs_f64();
                    self.handle.update(|s| {
                        s.state = failure.state().into();
                        s.last_error = failure.text().to_string();
                        s.errors += 1;
                        s.lag_seconds = lag;
                    });
                    reported = Some(failure);
                }
            }
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
        let graph = Graph::connect(config).map_err(Failure::of)?;
        for label in Label::ALL {
            let name = label.name();
            let cypher = format!(
                "CREATE CONSTRAINT tapgraph_{}_id IF NOT EXISTS FOR (n:{name}) REQUIRE n.id IS UNIQUE",
                name.to_lowercase()
            );
            timed("create constraint", graph.run(query(&cypher))).await?;
        }
        for kind in Kind::ALL {
            let name = kind.name();
            let cypher = format!(
                "CREATE INDEX tapgraph_{}_id IF NOT EXISTS FOR ()-[r:{name}]-() ON (r.id)",
                name.to_lowercase()
            );
            timed("create index", graph.run(query(&cypher))).await?;
        }
        let mut session = Session {
            graph,
            opened: Instant::now(),
            nodes: HashMap::new(),
            rels: HashMap::new(),
        };
        for label in Label::ALL {
            let cypher = format!("MATCH (n:{}) RETURN n.id AS id", label.name());
            for id in read_ids(&session.graph, &cypher).await? {
                session.nodes.insert(id, (label, 0));
            }
        }
        for kind in Kind::ALL {
            let cypher = format!("MATCH ()-[r:{}]->() RETURN r.id AS id", kind.name());
            let mut twice = Vec::new();
            for id in read_ids(&session.graph, &cypher).await? {
                if session.rels.insert(id.clone(), (kind, 0)).is_some() {
                    twice.push(id);
                }
            }
            // Copies of one id (another writer, or a commit that landed after the sink gave up
            // on it): all but one go.
            twice.sort_unstable();
            twice.dedup();
            let cypher = format!(
                "UNWIND $rows AS id MATCH ()-[r:{} {{id: id}}]->() WITH id, collect(r) AS copies \
                 UNWIND copies[1..] AS extra DELETE extra",
                kind.name()
            );
            for chunk in twice.chunks(self.settings.batch_size) {
                let params: Vec<BoltType> = chunk.iter().map(|id| id.as_str().into()).collect();
                let n = params.len();
                self.write(&session.graph, &cypher, params, n, true).await?;
            }
        }
        self.handle.update(|st| st.reconciliations += 1);
        tracing::info!(
            address = %s.address,
            nodes = session.nodes.len(),
            relationships = session.rels.len(),
            "neo4j sink connected; reconciling the database with the model"
        );
        Ok(session)
    }

    /// One pass: the difference between the model and what the database holds, written. Returns
    /// the time spent finding the difference (the controller's own work, not the database's) and
    /// when the view will next change by itself.
    async fn sync(&self, session: &mut Session) -> Result<Pass, Failure> {
        let started = Instant::now();
        let graph = view::graph(
            &self.topology,
            &self.enrollment,
            &self.naming,
            GraphQuery {
                include_control: true,
                include_inactive: true,
            },
        )
        .await;
        let want = desired(&graph, self.settings.last_seen_step);
        let next_flip_ms = next_flip_ms(&graph, self.ttl);
        let batch = self.settings.batch_size;

        let node_upserts: Vec<(u64, &NodeRow)> = want
            .nodes
            .values()
            .filter(|(h, n)| session.nodes.get(&n.id).map(|&(_, have)| have) != Some(*h))
            .map(|(h, n)| (*h, n))
            .collect();
        let rel_rows: Vec<RelRow> = want
            .rels
            .iter()
            .filter(|(id, (h, ..))| session.rels.get(*id).map(|&(_, have)| have) != Some(*h))
            .map(|(id, &(h, kind, e))| rel_row(&want, id, h, kind, e))
            .collect();
        // In id order, which groups a start node's relationships together for the database.
        let mut rel_rows = rel_rows;
        rel_rows.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let rel_upserts: Vec<&RelRow> = rel_rows.iter().collect();
        let rel_deletes: Vec<(String, Kind)> = session
            .rels
            .iter()
            .filter(|(id, _)| !want.rels.contains_key(*id))
            .map(|(id, &(kind, _))| (id.clone(), kind))
            .collect();
        let node_deletes: Vec<(String, Label)> = session
            .nodes
            .iter()
            .filter(|(id, _)| !want.nodes.contains_key(id.as_str()))
            .map(|(id, &(label, _))| (id.clone(), label))
            .collect();
        let cost = started.elapsed();
        let work = node_upserts.len() + rel_upserts.len() + rel_deletes.len() + node_deletes.len();
        if work > 0 {
            self.handle.update(|s| s.state = "writing".into());
            tracing::debug!(
                node_upserts = node_upserts.len(),
                rel_upserts = rel_upserts.len(),
                rel_deletes = rel_deletes.len(),
                node_deletes = node_deletes.len(),
                "neo4j sink writing changes"
            );
        }

        for label in Label::ALL {
            let rows: Vec<(u64, &NodeRow)> = node_upserts
                .iter()
                .copied()
                .filter(|(_, n)| n.label == label)
                .collect();
            let cypher = format!(
                "UNWIND $rows AS row MERGE (n:{} {{id: row.id}}) SET n = row.props",
                label.name()
            );
            for chunk in rows.chunks(batch) {
                let params: Vec<BoltType> = chunk
                    .iter()
                    .map(|(_, n)| {
                        let mut m: HashMap<String, BoltType> = HashMap::new();
                        m.insert("id".into(), n.id.as_str().into());
                        m.insert("props".into(), props_bolt(&n.props));
                        m.into()
                    })
                    .collect();
                let n = params.len();
                self.write(&session.graph, &cypher, params, n, false)
                    .await?;
                for (hash, n) in chunk {
                    session.nodes.insert(n.id.clone(), (n.label, *hash));
                }
            }
        }
        // Grouped by type and end labels, which the statement names, and by whether the database
        // has the relationship: the session knows (it read every id back), so a new one is
        // CREATEd rather than MERGEd, which would compare it with every relationship of its
        // start node (a hub's thousands); a known one is found through the index on its id.
        let mut groups: BTreeMap<(Kind, Label, Label, bool), Vec<&RelRow>> = BTreeMap::new();
        for r in &rel_upserts {
            let known = session.rels.contains_key(&r.id);
            groups
                .entry((r.kind, r.from.0, r.to.0, known))
                .or_default()
                .push(r);
        }
        for ((kind, from, to, known), rows) in groups {
            let cypher = if known {
                format!(
                    "UNWIND $rows AS row MATCH ()-[r:{} {{id: row.id}}]->() SET r = row.props",
                    kind.name()
                )
            } else {
                // By start node: a hub's node is looked up once per batch, not once per edge.
                format!(
                    "UNWIND $rows AS g MATCH (a:{} {{id: g.from}}) UNWIND g.rows AS row \
                     MATCH (b:{} {{id: row.to}}) CREATE (a)-[r:{}]->(b) SET r = row.props",
                    from.name(),
                    to.name(),
                    kind.name()
                )
            };
            for chunk in rows.chunks(batch) {
                let params: Vec<BoltType> = if known {
                    chunk
                        .iter()
                        .map(|r| {
                            let mut m: HashMap<String, BoltType> = HashMap::new();
                            m.insert("id".into(), r.id.as_str().into());
                            m.insert("props".into(), props_bolt(&r.props));
                            m.into()
                        })
                        .collect()
                } else {
                    chunk
                        .chunk_by(|a, b| a.from.1 == b.from.1)
                        .map(|group| {
                            let rows: Vec<BoltType> = group
                                .iter()
                                .map(|r| {
                                    let mut m: HashMap<String, BoltType> = HashMap::new();
                                    m.insert("to".into(), r.to.1.as_str().into());
                                    m.insert("props".into(), props_bolt(&r.props));
                                    m.into()
                                })
                                .collect();
                            let mut g: HashMap<String, BoltType> = HashMap::new();
                            g.insert("from".into(), group[0].from.1.as_str().into());
                            g.insert("rows".into(), rows.into());
                            g.into()
                        })
                        .collect()
                };
                self.write(&session.graph, &cypher, params, chunk.len(), false)
                    .await?;
                for r in chunk {
                    session.rels.insert(r.id.clone(), (r.kind, r.hash));
                }
            }
        }
        for kind in Kind::ALL {
            let ids: Vec<&String> = rel_deletes
                .iter()
                .filter(|(_, k)| *k == kind)
                .map(|(id, _)| id)
                .collect();
            let cypher = format!(
                "UNWIND $rows AS id MATCH ()-[r:{} {{id: id}}]->() DELETE r",
                kind.name()
            );
            for chunk in ids.chunks(batch) {
                let params: Vec<BoltType> = chunk.iter().map(|id| id.as_str().into()).collect();
                let n = params.len();
                self.write(&session.graph, &cypher, params, n, true).await?;
                for id in chunk {
                    session.rels.remove(*id);
                }
            }
        }
        for label in Label::ALL {
            let ids: Vec<&String> = node_deletes
                .iter()
                .filter(|(_, l)| *l == label)
                .map(|(id, _)| id)
                .collect();
            let cypher = format!(
                "UNWIND $rows AS id MATCH (n:{} {{id: id}}) DETACH DELETE n",
                label.name()
            );
            for chunk in ids.chunks(batch) {
                let params: Vec<BoltType> = chunk.iter().map(|id| id.as_str().into()).collect();
                let n = params.len();
                self.write(&session.graph, &cypher, params, n, true).await?;
                for id in chunk {
                    session.nodes.remove(*id);
                }
            }
        }
        let (nodes, rels) = (session.nodes.len() as u64, session.rels.len() as u64);
        self.handle.update(|s| {
            s.nodes = nodes;
            s.relationships = rels;
            s.last_diff_seconds = cost.as_secs_f64();
        });
        Ok(Pass { cost, next_flip_ms })
    }

    /// One batch in one explicit transaction. neo4rs does not retry explicit transactions; a
    /// failed one is rolled back by the server, and the caller's next pass redoes it.
    async fn write(
        &self,
        graph: &Graph,
        cypher: &str,
        rows: Vec<BoltType>,
        n: usize,
        delete: bool,
    ) -> Result<(), Failure> {
        let n = n as u64;
        let started = Instant::now();
        let mut txn = timed("begin", graph.start_txn()).await?;
        timed("write", txn.run(query(cypher).param("rows", rows))).await?;
        timed("commit", txn.commit()).await?;
        let took = started.elapsed().as_secs_f64();
        self.handle.update(|s| {
            s.transactions += 1;
            s.write_seconds += took;
            if delete {
                s.rows_deleted += n;
            } else {
                s.rows_written += n;
            }
            s.last_batch_rows = n;
            s.largest_batch_rows = s.largest_batch_rows.max(n);
        });
        Ok(())
    }
}

fn now_ms() -> u64 {
    tapgraph::time::unix_nanos() / 1_000_000
}

/// When (ms since 1970) the first active edge of `graph` turns inactive, as the topology decides
/// it: `ttl` after its `last_seen`.
fn next_flip_ms(graph: &proto::Graph, ttl: Duration) -> Option<u64> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    graph
        .edges
        .iter()
        .filter(|e| e.active && e.kind == Kind::ConnectsTo.name())
        .map(|e| (e.last_seen_unix_nanos / 1_000_000).saturating_add(ttl_ms))
        .min()
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

async fn read_ids(graph: &Graph, cypher: &str) -> Result<Vec<String>, Failure> {
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

    #[test]
    fn a_failure_is_reported_once_until_another_kind_comes() {
        let auth = Failure::Auth("Authentication failed".into());
        let down = Failure::Unreachable("connection refused".into());
        assert!(worth_reporting(None, &auth));
        assert!(!worth_reporting(Some(&auth), &auth));
        assert!(!worth_reporting(
            Some(&down),
            &Failure::Unreachable("connection reset".into())
        ));
        assert!(worth_reporting(Some(&auth), &down));
    }

    #[test]
    fn addresses_are_checked() {
        assert_eq!(bolt_address("bolt://db:7687").unwrap(), "bolt://db:7687");
        assert_eq!(bolt_address("127.0.0.1:7687/").unwrap(), "127.0.0.1:7687");
        assert!(bolt_address("neo4j+s://graph.example:7687").is_ok());
        assert!(
            bolt_address("http://db:7474")
                .unwrap_err()
                .contains("scheme")
        );
        assert!(bolt_address("bolt://db").unwrap_err().contains("HOST:PORT"));
        assert!(bolt_address("db:0").is_err());
    }

    fn node(id: &str, kind: &str, props: &[(&str, &str)]) -> proto::GraphNode {
        proto::GraphNode {
            id: id.into(),
            kind: kind.into(),
            name: id.into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn the_view_becomes_rows_with_stable_hashes() {
        let graph = proto::Graph {
            nodes: vec![
                node("host:a", "host", &[("hostname", "x'}) DETACH DELETE n //")]),
                node(
                    "svc:b/tcp/80",
                    "service",
                    &[("port", "80"), ("process", "nginx")],
                ),
                node("odd", "unknown-kind", &[]),
            ],
            edges: vec![
                proto::GraphEdge {
                    from: "host:a".into(),
                    to: "svc:b/tcp/80".into(),
                    kind: "CONNECTS_TO".into(),
                    port: 80,
                    protocol: proto::Protocol::Tcp as i32,
                    process: "curl".into(),
                    sockets: 2,
                    last_seen_unix_nanos: 125_000_000_000,
                    active: true,
                    ..Default::default()
                },
                proto::GraphEdge {
                    from: "host:a".into(),
                    to: "nowhere".into(),
                    kind: "CONNECTS_TO".into(),
                    ..Default::default()
                },
            ],
        };
        let step = Duration::from_secs(60);
        let want = desired(&graph, step);
        assert_eq!(want.nodes.len(), 2, "unknown kinds are left out");
        assert_eq!(
            want.nodes["host:a"].1.props["hostname"],
            Value::Str("x'}) DETACH DELETE n //".into())
        );
        assert_eq!(want.nodes["svc:b/tcp/80"].1.props["port"], Value::Int(80));
        assert_eq!(want.rels.len(), 1, "edges to unknown nodes are left out");
        let (id, &(hash, kind, e)) = want.rels.iter().next().unwrap();
        let rel = rel_row(&want, id, hash, kind, e);
        assert_eq!(rel.id, "CONNECTS_TO|host:a|svc:b/tcp/80|80/tcp");
        assert_eq!(rel.to.0, Label::Service);
        assert_eq!(
            rel.props["last_seen"],
            Value::Int(125_000),
            "what is written is exact"
        );
        let hash_of_edge = |g: &proto::Graph| desired(g, step).rels.values().next().unwrap().0;
        // A later last_seen within the same minute alone is not worth a write; in the next one,
        // it is.
        let mut later = graph.clone();
        later.edges[0].last_seen_unix_nanos = 170_000_000_000;
        assert_eq!(hash, hash_of_edge(&later));
        later.edges[0].last_seen_unix_nanos = 180_000_000_000;
        assert_ne!(hash, hash_of_edge(&later));
        // Anything else that is written changes the hash, `active` included.
        let mut busier = graph.clone();
        busier.edges[0].sockets = 3;
        assert_ne!(hash, hash_of_edge(&busier));
        let mut gone = graph.clone();
        gone.edges[0].active = false;
        assert_ne!(hash, hash_of_edge(&gone));
    }

    #[test]
    fn last_seen_is_never_before_first_seen() {
        let e = proto::GraphEdge {
            first_seen_unix_nanos: 130_000_000_000,
            last_seen_unix_nanos: 125_000_000_000,
            ..Default::default()
        };
        assert_eq!(last_seen_ms(&e), 130_000);
    }

    #[test]
    fn the_sink_wakes_when_the_first_active_edge_turns_inactive() {
        let edge = |kind: &str, last_seen_s: u64, active: bool| proto::GraphEdge {
            kind: kind.into(),
            last_seen_unix_nanos: last_seen_s * 1_000_000_000,
            active,
            ..Default::default()
        };
        let graph = proto::Graph {
            nodes: vec![],
            edges: vec![
                edge("CONNECTS_TO", 100, true),
                edge("CONNECTS_TO", 90, true),
                edge("CONNECTS_TO", 10, false),
                edge("HAS_ADDRESS", 0, true),
            ],
        };
        let ttl = Duration::from_secs(120);
        assert_eq!(next_flip_ms(&graph, ttl), Some(210_000));
        assert_eq!(next_flip_ms(&proto::Graph::default(), ttl), None);
    }
}
