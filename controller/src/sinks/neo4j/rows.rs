//! The rows the sink writes: the map's nodes and edges as Neo4j labels, relationship types and
//! properties, each with a hash of what it holds so that only what changed is written. The map
//! comes typed ([`Graph`]); this file alone decides how each field is stored, as the wire form
//! (`topology/wire.rs`) does for the API.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::time::Duration;

use crate::topology::graph::{Edge, EdgeKind, Graph, Node, NodeKind, Prop};

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

    fn of(kind: &NodeKind) -> Label {
        match kind {
            NodeKind::Host { .. } => Label::Host,
            NodeKind::Address { .. } => Label::Address,
            NodeKind::Service { .. } => Label::Service,
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

    fn of(kind: EdgeKind) -> Kind {
        match kind {
            EdgeKind::HasAddress => Kind::HasAddress,
            EdgeKind::Listens => Kind::Listens,
            EdgeKind::ConnectsTo => Kind::ConnectsTo,
        }
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
    pub(super) rels: HashMap<String, (u64, Kind, &'g Edge)>,
}

fn hash_of(value: &impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    // 0 means "in the database, contents unknown".
    h.finish() | 1
}

fn protocol_name(e: &Edge) -> &'static str {
    e.protocol.map_or("", |p| p.as_str())
}

fn ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// The `last_seen` written for `e`: the model's, in ms, never before its `first_seen`.
fn last_seen_ms(e: &Edge) -> i64 {
    ms(e.last_seen_ms.max(e.first_seen_ms))
}

/// Which `last_seen_step` an edge's `last_seen` falls in: a change of step is written, a change
/// within one is not.
fn last_seen_bucket(e: &Edge, last_seen_step: Duration) -> i64 {
    let step = i64::try_from(last_seen_step.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    last_seen_ms(e) / step
}

/// A node's properties: what the map knows of it by kind (a service's `port` a number), its
/// labels as `label.KEY`, its `id` and `name`.
fn node_props(n: &Node) -> Props {
    let mut props = Props::new();
    let mut put = |k: &str, v: Value| {
        props.insert(k.to_string(), v);
    };
    let text = |v: &str| Value::Str(v.to_string());
    for (k, v) in n.properties() {
        put(
            k,
            match v {
                Prop::Text(t) => text(t),
                Prop::Number(n) => Value::Int(i64::from(n)),
            },
        );
    }
    for (k, v) in &n.labels {
        put(&format!("label.{k}"), text(v));
    }
    put("id", text(&n.id));
    put("name", text(&n.name));
    props
}

/// What the database should hold for `graph`: its nodes and the relationships between them,
/// hashed; an edge to a node not in the graph is left out.
pub(super) fn desired(graph: &Graph, last_seen_step: Duration) -> Desired<'_> {
    let mut out = Desired::default();
    for n in &graph.nodes {
        let row = NodeRow {
            label: Label::of(&n.kind),
            id: n.id.clone(),
            props: node_props(n),
        };
        out.nodes.insert(n.id.as_str(), (hash_of(&row), row));
    }
    out.rels.reserve(graph.edges.len());
    for e in &graph.edges {
        let kind = Kind::of(e.kind);
        if !out.nodes.contains_key(e.from.as_str()) || !out.nodes.contains_key(e.to.as_str()) {
            continue;
        }
        let id = format!(
            "{}|{}|{}|{}/{}",
            kind.name(),
            e.from,
            e.to,
            e.port,
            protocol_name(e)
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
            e.first_seen_ms,
            last_seen_bucket(e, last_seen_step),
            e.active,
            e.control_plane,
            (
                &e.via,
                // Counters only: an edge whose bytes did not move is not written again.
                e.traffic.as_ref().map(|t| {
                    (
                        t.bytes_sent,
                        t.bytes_received,
                        t.retransmits,
                        t.srtt_us,
                        t.min_rtt_us,
                    )
                }),
            ),
        ));
        out.rels.insert(id, (hash, kind, e));
    }
    out
}

/// The row of a relationship [`desired`] found changed.
pub(super) fn rel_row(want: &Desired<'_>, id: &str, hash: u64, kind: Kind, e: &Edge) -> RelRow {
    let label = |node: &str| want.nodes.get(node).map_or(Label::Host, |(_, n)| n.label);
    let mut props = Props::new();
    props.insert("id".into(), Value::Str(id.to_string()));
    if kind != Kind::HasAddress {
        props.insert("port".into(), Value::Int(i64::from(e.port)));
        props.insert("protocol".into(), Value::Str(protocol_name(e).into()));
    }
    if kind == Kind::ConnectsTo {
        props.insert("process".into(), Value::Str(e.process.clone()));
        props.insert("sockets".into(), Value::Int(i64::from(e.sockets)));
        props.insert("first_seen".into(), Value::Int(ms(e.first_seen_ms)));
        props.insert("last_seen".into(), Value::Int(last_seen_ms(e)));
        props.insert("active".into(), Value::Bool(e.active));
        props.insert("control_plane".into(), Value::Bool(e.control_plane));
        if !e.via.is_empty() {
            props.insert("via".into(), Value::Str(e.via.clone()));
        }
        if let Some(t) = &e.traffic {
            let int = |v: u64| Value::Int(i64::try_from(v).unwrap_or(i64::MAX));
            props.insert("bytes_sent".into(), int(t.bytes_sent));
            props.insert("bytes_received".into(), int(t.bytes_received));
            props.insert("segments_sent".into(), int(t.segments_sent));
            props.insert("segments_received".into(), int(t.segments_received));
            props.insert("retransmits".into(), int(t.retransmits));
            props.insert("rtt_us".into(), int(u64::from(t.srtt_us)));
            props.insert("min_rtt_us".into(), int(u64::from(t.min_rtt_us)));
            props.insert("closed_connections".into(), int(t.closed));
            props.insert(
                "traffic_measured_by".into(),
                Value::Str(t.measured_by.as_str().into()),
            );
        }
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
pub(super) fn next_flip_ms(graph: &Graph, ttl: Duration) -> Option<u64> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    graph
        .edges
        .iter()
        .filter(|e| e.active && e.kind == EdgeKind::ConnectsTo)
        .map(|e| e.last_seen_ms.saturating_add(ttl_ms))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::model::Protocol;

    fn host(id: &str, hostname: &str) -> Node {
        Node {
            id: id.into(),
            name: id.into(),
            kind: NodeKind::Host {
                hostname: Some(hostname.into()),
                agent_state: None,
            },
            labels: BTreeMap::new(),
        }
    }

    fn service(id: &str, port: u16, process: &str) -> Node {
        Node {
            id: id.into(),
            name: id.into(),
            kind: NodeKind::Service {
                host: "b".into(),
                process: process.into(),
                port,
                protocol: Protocol::Tcp,
            },
            labels: BTreeMap::new(),
        }
    }

    fn edge(kind: EdgeKind, from: &str, to: &str) -> Edge {
        Edge {
            from: from.into(),
            to: to.into(),
            kind,
            port: 0,
            protocol: None,
            process: String::new(),
            sockets: 0,
            first_seen_ms: 0,
            last_seen_ms: 0,
            active: false,
            control_plane: false,
            via: String::new(),
            traffic: None,
            process_note: String::new(),
        }
    }

    #[test]
    fn the_view_becomes_rows_with_stable_hashes() {
        let graph = Graph {
            nodes: vec![
                host("host:a", "x'}) DETACH DELETE n //"),
                service("svc:b/tcp/80", 80, "nginx"),
            ],
            edges: vec![
                Edge {
                    port: 80,
                    protocol: Some(Protocol::Tcp),
                    process: "curl".into(),
                    sockets: 2,
                    last_seen_ms: 125_000,
                    active: true,
                    ..edge(EdgeKind::ConnectsTo, "host:a", "svc:b/tcp/80")
                },
                edge(EdgeKind::ConnectsTo, "host:a", "nowhere"),
            ],
        };
        let step = Duration::from_secs(60);
        let want = desired(&graph, step);
        // Kinds are an enum: none is unknown, every node is a row.
        assert_eq!(want.nodes.len(), 2);
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
        let hash_of_edge = |g: &Graph| desired(g, step).rels.values().next().unwrap().0;
        // A later last_seen within the same minute alone is not worth a write; in the next one,
        // it is.
        let mut later = graph.clone();
        later.edges[0].last_seen_ms = 170_000;
        assert_eq!(hash, hash_of_edge(&later));
        later.edges[0].last_seen_ms = 180_000;
        assert_ne!(hash, hash_of_edge(&later));
        // Anything else that is written changes the hash, `active` included.
        let mut busier = graph.clone();
        busier.edges[0].sockets = 3;
        assert_ne!(hash, hash_of_edge(&busier));
        let mut gone = graph.clone();
        gone.edges[0].active = false;
        assert_ne!(hash, hash_of_edge(&gone));
    }

    /// An edge's traffic becomes the properties Neo4j users query, and bytes that moved are
    /// written again.
    #[test]
    fn traffic_becomes_relationship_properties() {
        use crate::topology::graph::{MeasuredBy, Traffic};
        let traffic = Traffic {
            bytes_sent: 1000,
            bytes_received: 300,
            segments_sent: 5,
            segments_received: 4,
            retransmits: 1,
            srtt_us: 10_500,
            min_rtt_us: 10_100,
            sent_per_second: 0,
            received_per_second: 0,
            closed: 2,
            measured_by: MeasuredBy::Client,
        };
        let graph = Graph {
            nodes: vec![host("host:a", "a"), service("svc:b/tcp/80", 80, "nginx")],
            edges: vec![Edge {
                port: 80,
                protocol: Some(Protocol::Tcp),
                traffic: Some(traffic),
                ..edge(EdgeKind::ConnectsTo, "host:a", "svc:b/tcp/80")
            }],
        };
        let step = Duration::from_secs(60);
        let want = desired(&graph, step);
        let (id, &(hash, kind, e)) = want.rels.iter().next().unwrap();
        let props = rel_row(&want, id, hash, kind, e).props;
        for (name, value) in [
            ("bytes_sent", 1000),
            ("bytes_received", 300),
            ("rtt_us", 10_500),
            ("min_rtt_us", 10_100),
            ("retransmits", 1),
            ("closed_connections", 2),
        ] {
            assert_eq!(props[name], Value::Int(value), "{name}");
        }
        assert_eq!(props["traffic_measured_by"], Value::Str("client".into()));
        let mut moved = graph.clone();
        moved.edges[0].traffic.as_mut().unwrap().bytes_received += 1;
        assert_ne!(hash, desired(&moved, step).rels.values().next().unwrap().0);
    }

    #[test]
    fn last_seen_is_never_before_first_seen() {
        let e = Edge {
            first_seen_ms: 130_000,
            last_seen_ms: 125_000,
            ..edge(EdgeKind::ConnectsTo, "a", "b")
        };
        assert_eq!(last_seen_ms(&e), 130_000);
    }

    #[test]
    fn the_sink_wakes_when_the_first_active_edge_turns_inactive() {
        let edge = |kind: EdgeKind, last_seen_s: u64, active: bool| Edge {
            last_seen_ms: last_seen_s * 1_000,
            active,
            ..edge(kind, "a", "b")
        };
        let graph = Graph {
            nodes: vec![],
            edges: vec![
                edge(EdgeKind::ConnectsTo, 100, true),
                edge(EdgeKind::ConnectsTo, 90, true),
                edge(EdgeKind::ConnectsTo, 10, false),
                edge(EdgeKind::HasAddress, 0, true),
            ],
        };
        let ttl = Duration::from_secs(120);
        assert_eq!(next_flip_ms(&graph, ttl), Some(210_000));
        assert_eq!(next_flip_ms(&Graph::default(), ttl), None);
    }

    fn props(pairs: &[(&str, Value)]) -> Props {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn text(v: &str) -> Value {
        Value::Str(v.into())
    }

    #[test]
    fn the_labels_and_types_are_the_ones_operators_query() {
        assert_eq!(Label::ALL.map(Label::name), ["Host", "Address", "Service"]);
        assert_eq!(
            Kind::ALL.map(Kind::name),
            ["HAS_ADDRESS", "LISTENS", "CONNECTS_TO"]
        );
    }

    #[test]
    fn every_kind_of_node_keeps_its_fields_as_properties() {
        let mut web = host("host:web", "web.example");
        web.kind = NodeKind::Host {
            hostname: Some("web.example".into()),
            agent_state: Some("lost"),
        };
        web.labels.insert("team".into(), "db".into());
        let address = Node {
            id: "addr:10.0.0.9".into(),
            name: "10.0.0.9".into(),
            kind: NodeKind::Address {
                ip: "10.0.0.9".parse().unwrap(),
                conflict: Some("claimed by agents a, b".into()),
                dns: Some("nine.example".into()),
            },
            labels: BTreeMap::new(),
        };
        let mut dns = Node {
            id: "svc:web/udp/53".into(),
            name: "web:53/udp".into(),
            kind: NodeKind::Service {
                host: "web".into(),
                process: "named".into(),
                port: 53,
                protocol: Protocol::Udp,
            },
            labels: BTreeMap::new(),
        };
        dns.labels.insert("port".into(), "not a number".into());
        let bare = Node {
            kind: NodeKind::Host {
                hostname: None,
                agent_state: None,
            },
            ..host("host:bare", "")
        };
        let graph = Graph {
            nodes: vec![web, address, dns, bare],
            edges: vec![],
        };
        let want = desired(&graph, Duration::from_secs(60));
        let row = |id: &str| &want.nodes[id].1;
        assert_eq!(row("host:web").label, Label::Host);
        assert_eq!(
            row("host:web").props,
            props(&[
                ("hostname", text("web.example")),
                ("agent_state", text("lost")),
                ("label.team", text("db")),
                ("id", text("host:web")),
                ("name", text("host:web")),
            ])
        );
        assert_eq!(row("addr:10.0.0.9").label, Label::Address);
        assert_eq!(
            row("addr:10.0.0.9").props,
            props(&[
                ("conflict", text("claimed by agents a, b")),
                ("dns", text("nine.example")),
                ("id", text("addr:10.0.0.9")),
                ("name", text("10.0.0.9")),
            ])
        );
        assert_eq!(row("svc:web/udp/53").label, Label::Service);
        assert_eq!(
            row("svc:web/udp/53").props,
            props(&[
                ("host", text("web")),
                ("process", text("named")),
                ("port", Value::Int(53)),
                ("protocol", text("udp")),
                ("label.port", text("not a number")),
                ("id", text("svc:web/udp/53")),
                ("name", text("web:53/udp")),
            ])
        );
        assert_eq!(
            row("host:bare").props,
            props(&[("id", text("host:bare")), ("name", text("host:bare"))]),
            "what the map does not know is left out, not written empty"
        );
    }

    #[test]
    fn each_relationship_type_carries_what_it_has() {
        let address = Node {
            id: "addr:10.0.0.9".into(),
            name: "10.0.0.9".into(),
            kind: NodeKind::Address {
                ip: "10.0.0.9".parse().unwrap(),
                conflict: None,
                dns: None,
            },
            labels: BTreeMap::new(),
        };
        let graph = Graph {
            nodes: vec![
                host("host:a", "a"),
                address,
                service("svc:a/udp/53", 53, "named"),
            ],
            edges: vec![
                edge(EdgeKind::HasAddress, "host:a", "addr:10.0.0.9"),
                Edge {
                    port: 53,
                    protocol: Some(Protocol::Udp),
                    active: true,
                    ..edge(EdgeKind::Listens, "host:a", "svc:a/udp/53")
                },
                Edge {
                    port: 53,
                    protocol: Some(Protocol::Udp),
                    process: "dig".into(),
                    sockets: 4,
                    first_seen_ms: 100_000,
                    last_seen_ms: 160_000,
                    active: false,
                    control_plane: true,
                    ..edge(EdgeKind::ConnectsTo, "host:a", "addr:10.0.0.9")
                },
            ],
        };
        let want = desired(&graph, Duration::from_secs(60));
        let row = |id: &str| {
            let (hash, kind, e) = want.rels[id];
            rel_row(&want, id, hash, kind, e)
        };
        let has = row("HAS_ADDRESS|host:a|addr:10.0.0.9|0/");
        assert_eq!(has.kind, Kind::HasAddress);
        assert_eq!(has.from, (Label::Host, "host:a".to_string()));
        assert_eq!(has.to, (Label::Address, "addr:10.0.0.9".to_string()));
        assert_eq!(
            has.props,
            props(&[("id", text("HAS_ADDRESS|host:a|addr:10.0.0.9|0/"))])
        );
        let listens = row("LISTENS|host:a|svc:a/udp/53|53/udp");
        assert_eq!(listens.kind, Kind::Listens);
        assert_eq!(
            listens.props,
            props(&[
                ("id", text("LISTENS|host:a|svc:a/udp/53|53/udp")),
                ("port", Value::Int(53)),
                ("protocol", text("udp")),
            ])
        );
        let connects = row("CONNECTS_TO|host:a|addr:10.0.0.9|53/udp");
        assert_eq!(connects.kind, Kind::ConnectsTo);
        assert_eq!(connects.to.0, Label::Address);
        assert_eq!(
            connects.props,
            props(&[
                ("id", text("CONNECTS_TO|host:a|addr:10.0.0.9|53/udp")),
                ("port", Value::Int(53)),
                ("protocol", text("udp")),
                ("process", text("dig")),
                ("sockets", Value::Int(4)),
                ("first_seen", Value::Int(100_000)),
                ("last_seen", Value::Int(160_000)),
                ("active", Value::Bool(false)),
                ("control_plane", Value::Bool(true)),
            ])
        );
        assert_eq!(connects.hash, want.rels[connects.id.as_str()].0);
    }

    #[test]
    fn hashes_are_never_zero_which_means_contents_unknown() {
        for i in 0..64u32 {
            assert_eq!(hash_of(&i) & 1, 1, "hash of {i}");
        }
    }

    #[test]
    fn a_node_changes_its_hash_with_any_property() {
        let hash = |n: Node| {
            let g = Graph {
                nodes: vec![n],
                edges: vec![],
            };
            desired(&g, Duration::from_secs(60)).nodes["host:a"].0
        };
        let before = hash(host("host:a", "a"));
        assert_eq!(before, hash(host("host:a", "a")));
        assert_ne!(before, hash(host("host:a", "b")));
        let mut labelled = host("host:a", "a");
        labelled.labels.insert("team".into(), "db".into());
        assert_ne!(before, hash(labelled));
    }
}
