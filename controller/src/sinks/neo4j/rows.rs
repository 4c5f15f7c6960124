//! The rows the sink writes: the map's nodes and edges as Neo4j labels, relationship types and
//! properties, each with a hash of what it holds so that only what changed is written.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use tapgraph::proto;

/// A node's label in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Label {
    Host,
    Address,
    Service,
}

impl Label {
    pub(super) const ALL: [Label; 3] = [Label::Host, Label::Address, Label::Service];

    pub(super) fn name(self) -> &'static str {
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

/// A relationship's type in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Kind {
    HasAddress,
    Listens,
    ConnectsTo,
}

impl Kind {
    pub(super) const ALL: [Kind; 3] = [Kind::HasAddress, Kind::Listens, Kind::ConnectsTo];

    pub(super) fn name(self) -> &'static str {
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

/// A property's value, as the database types it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

pub(super) type Props = BTreeMap<String, Value>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct NodeRow {
    pub(super) label: Label,
    pub(super) id: String,
    pub(super) props: Props,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RelRow {
    pub(super) kind: Kind,
    pub(super) from: (Label, String),
    pub(super) to: (Label, String),
    pub(super) id: String,
    /// As [`desired`] hashed it.
    pub(super) hash: u64,
    pub(super) props: Props,
}

/// The model by id, with a hash of what each element should hold. Nodes are few and become rows
/// at once; a relationship becomes a row ([`rel_row`]) only when it must be written, since the
/// whole map is diffed on every pass.
#[derive(Debug, Default)]
pub(super) struct Desired<'g> {
    pub(super) nodes: HashMap<&'g str, (u64, NodeRow)>,
    pub(super) rels: HashMap<String, (u64, Kind, &'g proto::GraphEdge)>,
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

/// What the database should hold for `graph`: nodes of the three kinds and the relationships
/// between them, hashed; anything else, or an edge to a node not in the graph, is left out.
pub(super) fn desired(graph: &proto::Graph, last_seen_step: Duration) -> Desired<'_> {
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
pub(super) fn rel_row(
    want: &Desired<'_>,
    id: &str,
    hash: u64,
    kind: Kind,
    e: &proto::GraphEdge,
) -> RelRow {
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

/// When (ms since 1970) the first active edge of `graph` turns inactive, as the topology decides
/// it: `ttl` after its `last_seen`.
pub(super) fn next_flip_ms(graph: &proto::Graph, ttl: Duration) -> Option<u64> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    graph
        .edges
        .iter()
        .filter(|e| e.active && e.kind == Kind::ConnectsTo.name())
        .map(|e| (e.last_seen_unix_nanos / 1_000_000).saturating_add(ttl_ms))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

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
