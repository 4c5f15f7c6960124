//! The map as the controller hands it out: typed nodes and edges built from the model for a
//! query ([`build`]), decorated with names and labels by [`super::view`], and turned into
//! protobuf or JSON only by the handlers that send it ([`super::wire`]). Kinds are enums, ports
//! numbers and times milliseconds: nothing downstream parses a string the map made.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::GraphQuery;
use super::model::{self, Model, Protocol};

/// The map for one query.
///
/// Guarantees: nodes are sorted by id and each id appears once; every edge's `from` and `to`
/// name a node of `nodes`. Edges come host by host (addresses, then services), then the
/// connections in the model's key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

/// A node of the map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Stable text id: `host:web-1`, `addr:10.0.0.9`, `svc:db-1/tcp/5432`.
    pub id: String,
    /// What operators read: the agent id, the address, or `host:port/protocol`.
    pub name: String,
    pub kind: NodeKind,
    /// Labels from enrollment tokens, operators and rules; empty until [`super::view`] decorates
    /// the map. On the wire each is a `label.KEY` property.
    pub labels: BTreeMap<String, String>,
}

/// What a node is, and what the map knows of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// An agent's host; the node's name is the agent id.
    Host {
        /// As enrolled, else as the agent's Hello said, else the agent id once decorated;
        /// before, as the Hello said, or `None` for a host whose table is gone.
        hostname: Option<String>,
        /// `connected`, `degraded` or `lost`, once decorated; `None` for an agent the
        /// controller has not seen since it started.
        agent_state: Option<&'static str>,
    },
    /// An address: a host's own, or an endpoint no agent owns (external or agentless).
    Address {
        ip: IpAddr,
        /// Set when several hosts claim the address: names them, and the one the map keeps.
        conflict: Option<String>,
        /// The reverse-DNS name, once decorated and when the lookup found one.
        dns: Option<String>,
    },
    /// A port a host listens on; several addresses on one port are one service.
    Service {
        /// The agent id of the listening host.
        host: String,
        /// The listening process, empty when unknown.
        process: String,
        port: u16,
        protocol: Protocol,
    },
}

impl NodeKind {
    /// `host`, `address` or `service`: the kind's name on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            NodeKind::Host { .. } => "host",
            NodeKind::Address { .. } => "address",
            NodeKind::Service { .. } => "service",
        }
    }
}

/// A node's property value: text, or a number the API writes as text and Neo4j keeps as an integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prop<'a> {
    Text(&'a str),
    Number(u16),
}

impl Node {
    /// The properties the map knows of the node by kind, by the names operators query in the API
    /// and in Neo4j (labels aside, which each form writes as `label.KEY`). The one list of them:
    /// the wire form and the Neo4j sink both read it.
    pub fn properties(&self) -> Vec<(&'static str, Prop<'_>)> {
        let mut props = Vec::with_capacity(4);
        match &self.kind {
            NodeKind::Host {
                hostname,
                agent_state,
            } => {
                if let Some(hostname) = hostname {
                    props.push(("hostname", Prop::Text(hostname)));
                }
                if let Some(state) = agent_state {
                    props.push(("agent_state", Prop::Text(state)));
                }
            }
            NodeKind::Address { conflict, dns, .. } => {
                if let Some(conflict) = conflict {
                    props.push(("conflict", Prop::Text(conflict)));
                }
                if let Some(dns) = dns {
                    props.push(("dns", Prop::Text(dns)));
                }
            }
            NodeKind::Service {
                host,
                process,
                port,
                protocol,
            } => {
                props.push(("host", Prop::Text(host)));
                props.push(("process", Prop::Text(process)));
                props.push(("port", Prop::Number(*port)));
                props.push(("protocol", Prop::Text(protocol.as_str())));
            }
        }
        props
    }
}

/// What an edge says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EdgeKind {
    /// A host to one of its addresses (loopback left out).
    HasAddress,
    /// A host to a service it listens on.
    Listens,
    /// A host to the service or address it connects to.
    ConnectsTo,
}

impl EdgeKind {
    /// `HAS_ADDRESS`, `LISTENS` or `CONNECTS_TO`: the kind's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeKind::HasAddress => "HAS_ADDRESS",
            EdgeKind::Listens => "LISTENS",
            EdgeKind::ConnectsTo => "CONNECTS_TO",
        }
    }
}

/// An edge of the map. Fields a kind does not have are zero, empty or `None`: a `HAS_ADDRESS`
/// edge has no port nor protocol, only a `CONNECTS_TO` edge has a process, sockets, times and
/// the control-plane flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// The id of the node it starts at.
    pub from: String,
    /// The id of the node it ends at.
    pub to: String,
    pub kind: EdgeKind,
    /// The server port; 0 on `HAS_ADDRESS`.
    pub port: u16,
    /// `None` on `HAS_ADDRESS`.
    pub protocol: Option<Protocol>,
    /// The connecting process, when the client side was reported.
    pub process: String,
    pub sockets: u32,
    /// Unix time in ms; 0 when not set.
    pub first_seen_ms: u64,
    /// Unix time in ms; 0 when not set.
    pub last_seen_ms: u64,
    /// Seen within the TTL; `HAS_ADDRESS` and `LISTENS` edges always are.
    pub active: bool,
    /// An agent's own connection to the controller.
    pub control_plane: bool,
    /// The address the client dialled when NAT took the connection to this edge's service;
    /// empty otherwise.
    pub via: String,
    /// What a `CONNECTS_TO` edge carried, when an agent measured it.
    pub traffic: Option<Traffic>,
    /// Why `process` is empty, as the client's agent said; empty otherwise.
    pub process_note: String,
}

/// An edge's TCP traffic, counted once. Each direction comes from one side: bytes and segments
/// from the sender's agent when it measured the edge (its data-only count is exact), else from
/// the receiver's; RTT, closes and rates from the client side when it measured, else the
/// server side. "Sent" is client to server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segments_sent: u64,
    pub segments_received: u64,
    /// Segments retransmitted, by each measured side for what it sent.
    pub retransmits: u64,
    /// Mean over the measured flows with a sample, µs; 0: none.
    pub srtt_us: u32,
    /// Lowest over them, µs; 0: none.
    pub min_rtt_us: u32,
    /// Bytes per second each way over the latest interval of each agent that measured it (0
    /// for a flow that did not move in it, or whose agent has not reported within the TTL).
    pub sent_per_second: u64,
    pub received_per_second: u64,
    /// Connections counted at close.
    pub closed: u64,
    pub measured_by: MeasuredBy,
}

/// Which ends of an edge an agent measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasuredBy {
    Client,
    Server,
    Both,
}

impl MeasuredBy {
    /// `client`, `server` or `both`.
    pub fn as_str(self) -> &'static str {
        match self {
            MeasuredBy::Client => "client",
            MeasuredBy::Server => "server",
            MeasuredBy::Both => "both",
        }
    }
}

/// One side's flows of an edge, summed in that side's sense (sent = this side sent).
#[derive(Debug, Default)]
struct Side {
    sent: u64,
    received: u64,
    segs_out: u64,
    segs_in: u64,
    retransmits: u64,
    closed: u64,
    srtt_sum: u64,
    srtt_n: u64,
    min_rtt_us: u32,
    sent_rate: u64,
    received_rate: u64,
}

impl Side {
    /// `fresh`: the flow's agent reported within the TTL, so its latest increment is a rate.
    fn add(&mut self, f: &model::FlowTotals, fresh: bool) {
        self.sent = self.sent.saturating_add(f.bytes_sent);
        self.received = self.received.saturating_add(f.bytes_received);
        self.segs_out = self.segs_out.saturating_add(f.segments_sent);
        self.segs_in = self.segs_in.saturating_add(f.segments_received);
        self.retransmits = self.retransmits.saturating_add(f.retransmits);
        self.closed = self.closed.saturating_add(f.closed);
        if f.srtt_us > 0 {
            self.srtt_sum += u64::from(f.srtt_us);
            self.srtt_n += 1;
        }
        if f.min_rtt_us > 0 && (self.min_rtt_us == 0 || f.min_rtt_us < self.min_rtt_us) {
            self.min_rtt_us = f.min_rtt_us;
        }
        if fresh && f.last_interval_ms > 0 {
            self.sent_rate += f.last_sent.saturating_mul(1000) / f.last_interval_ms;
            self.received_rate += f.last_received.saturating_mul(1000) / f.last_interval_ms;
        }
    }

    fn srtt_us(&self) -> u32 {
        self.srtt_sum.checked_div(self.srtt_n).unwrap_or(0) as u32
    }
}

/// The edge's figures from what its client side and server side measured (at least one).
fn combine(client: Option<&Side>, server: Option<&Side>) -> Option<Traffic> {
    let measured_by = match (client, server) {
        (Some(_), Some(_)) => MeasuredBy::Both,
        (Some(_), None) => MeasuredBy::Client,
        (None, Some(_)) => MeasuredBy::Server,
        (None, None) => return None,
    };
    // Client to server: what the client sent, else what the server received; and back.
    let up = |c: &dyn Fn(&Side) -> u64, s: &dyn Fn(&Side) -> u64| {
        client.map(c).or(server.map(s)).unwrap_or(0)
    };
    let down = |s: &dyn Fn(&Side) -> u64, c: &dyn Fn(&Side) -> u64| {
        server.map(s).or(client.map(c)).unwrap_or(0)
    };
    let rtt_side = client.or(server)?;
    Some(Traffic {
        bytes_sent: up(&|c| c.sent, &|s| s.received),
        bytes_received: down(&|s| s.sent, &|c| c.received),
        segments_sent: up(&|c| c.segs_out, &|s| s.segs_in),
        segments_received: down(&|s| s.segs_out, &|c| c.segs_in),
        retransmits: client.map_or(0, |c| c.retransmits) + server.map_or(0, |s| s.retransmits),
        srtt_us: rtt_side.srtt_us(),
        min_rtt_us: rtt_side.min_rtt_us,
        sent_per_second: up(&|c| c.sent_rate, &|s| s.received_rate),
        received_per_second: down(&|s| s.sent_rate, &|c| c.received_rate),
        closed: rtt_side.closed,
        measured_by,
    })
}

/// Every edge's traffic, from the flows of every agent's table, counted once (see [`Traffic`]).
pub(super) fn traffic(model: &Model, now_ms: u64, ttl_ms: u64) -> HashMap<model::EdgeKey, Traffic> {
    let mut by_edge: HashMap<model::EdgeKey, [Option<Side>; 2]> = HashMap::new();
    for (agent, table) in &model.agents {
        let fresh = now_ms.saturating_sub(table.last_snapshot_ms) < ttl_ms;
        for (flow, totals) in &table.traffic {
            let key = model.edge_key(agent, &flow.obs());
            let side = match flow.direction {
                model::Direction::Client => 0,
                model::Direction::Server => 1,
            };
            by_edge.entry(key).or_default()[side]
                .get_or_insert_with(Side::default)
                .add(totals, fresh);
        }
    }
    by_edge
        .into_iter()
        .filter_map(|(key, [client, server])| {
            Some((key, combine(client.as_ref(), server.as_ref())?))
        })
        .collect()
}

impl Edge {
    /// A structural edge (`HAS_ADDRESS`, `LISTENS`): active, with no history.
    fn structural(
        from: String,
        to: String,
        kind: EdgeKind,
        port: u16,
        protocol: Option<Protocol>,
    ) -> Self {
        Edge {
            from,
            to,
            kind,
            port,
            protocol,
            process: String::new(),
            sockets: 0,
            first_seen_ms: 0,
            last_seen_ms: 0,
            active: true,
            control_plane: false,
            via: String::new(),
            traffic: None,
            process_note: String::new(),
        }
    }
}

/// The node `node` of the model, as the map shows it before decoration; `id` is `node.id()`.
fn node(model: &Model, node: &model::Node, id: String) -> Node {
    let (name, kind) = match node {
        model::Node::Host(h) => (
            h.clone(),
            NodeKind::Host {
                hostname: model.agents.get(h).map(|t| t.hostname.clone()),
                agent_state: None,
            },
        ),
        model::Node::Address(ip) => {
            // Two hosts claim it: shown where the address is, naming them all.
            let conflict = match model.claimants(ip) {
                [owner, others @ ..] if !others.is_empty() => Some(format!(
                    "claimed by agents {owner}, {}; the map keeps it on {owner}",
                    others.join(", ")
                )),
                _ => None,
            };
            (
                ip.to_string(),
                NodeKind::Address {
                    ip: *ip,
                    conflict,
                    dns: None,
                },
            )
        }
        model::Node::Service {
            host,
            protocol,
            port,
        } => {
            let process = model
                .agents
                .get(host)
                .and_then(|t| {
                    t.listeners
                        .iter()
                        .find(|(l, _)| l.port == *port && l.protocol == *protocol)
                        .map(|(_, p)| p.clone())
                })
                .unwrap_or_default();
            (
                format!("{host}:{port}/{}", protocol.as_str()),
                NodeKind::Service {
                    host: host.clone(),
                    process,
                    port: *port,
                    protocol: *protocol,
                },
            )
        }
    };
    Node {
        id,
        name,
        kind,
        labels: BTreeMap::new(),
    }
}

/// The map `model` holds for `query` at `now_ms`: every host with its addresses and services,
/// and the connections the query asks for (an edge unseen for `ttl_ms` is inactive).
pub(super) fn build(model: &Model, query: &GraphQuery, now_ms: u64, ttl_ms: u64) -> Graph {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut edges = Vec::new();
    // `id` is `node.id()`, made once by the caller: a large map has 100,000s of edge ends.
    let mut add_node = |n: &model::Node, id: &str| {
        if !nodes.contains_key(id) {
            nodes.insert(id.to_string(), node(model, n, id.to_string()));
        }
    };
    for (host, table) in &model.agents {
        let h = model::Node::Host(host.clone());
        add_node(&h, &h.id());
        for ip in table.addresses.iter().filter(|ip| !ip.is_loopback()) {
            let a = model::Node::Address(*ip);
            add_node(&a, &a.id());
            edges.push(Edge::structural(
                h.id(),
                a.id(),
                EdgeKind::HasAddress,
                0,
                None,
            ));
        }
        let mut services = BTreeSet::new();
        for l in table.listeners.keys() {
            let s = model::Node::Service {
                host: host.clone(),
                protocol: l.protocol,
                port: l.port,
            };
            // A port listened on several addresses is one service.
            if !services.insert(s.id()) {
                continue;
            }
            add_node(&s, &s.id());
            edges.push(Edge::structural(
                h.id(),
                s.id(),
                EdgeKind::Listens,
                l.port,
                Some(l.protocol),
            ));
        }
    }
    let mut traffic = traffic(model, now_ms, ttl_ms);
    for e in model.edges.values() {
        let active = e.active(now_ms, ttl_ms);
        if (e.control_plane && !query.include_control) || (!active && !query.include_inactive) {
            continue;
        }
        let (from, to) = (e.key.from.id(), e.key.to.id());
        add_node(&e.key.from, &from);
        add_node(&e.key.to, &to);
        edges.push(Edge {
            from,
            to,
            kind: EdgeKind::ConnectsTo,
            port: e.key.port,
            protocol: Some(e.key.protocol),
            process: e.process.clone(),
            sockets: e.sockets,
            first_seen_ms: e.first_seen_ms,
            last_seen_ms: e.last_seen_ms,
            active,
            control_plane: e.control_plane,
            via: e.via.clone(),
            traffic: traffic.remove(&e.key),
            process_note: e.process_note.clone(),
        });
    }
    Graph {
        nodes: nodes.into_values().collect(),
        edges,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::model::{AgentTable, Direction, ObsKey, ObsValue};

    /// `web` connects to 203.0.113.7:443, and to the controller at 192.0.2.1:50051 (its control
    /// plane), both last seen at 1,000 ms.
    fn model() -> Model {
        let row = |remote: &str, port: u16, control_plane: bool| {
            let key = ObsKey {
                netns: Box::default(),
                direction: Direction::Client,
                local_ip: "10.0.0.1".parse().unwrap(),
                remote_ip: remote.parse().unwrap(),
                server_port: port,
                protocol: Protocol::Tcp,
                process: "app".into(),
                via: None,
            };
            let value = ObsValue {
                sockets: 1,
                control_plane,
                short_lived: false,
                process_note: String::new(),
            };
            (key, value)
        };
        let web = AgentTable {
            addresses: ["10.0.0.1".parse().unwrap()].into(),
            entries: [
                row("203.0.113.7", 443, false),
                row("192.0.2.1", 50051, true),
            ]
            .into(),
            ..Default::default()
        };
        let mut model = Model::default();
        model.replace("web", web, 1_000);
        model
    }

    /// The CONNECTS_TO edges' far ends and whether each is active, and whether the far ends are
    /// nodes of the map.
    fn connections(g: &Graph) -> Vec<(&str, bool)> {
        let ids: BTreeSet<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        g.edges
            .iter()
            .filter(|e| e.kind == EdgeKind::ConnectsTo)
            .inspect(|e| assert!(ids.contains(e.to.as_str()), "{} has no node", e.to))
            .map(|e| (e.to.as_str(), e.active))
            .collect()
    }

    #[test]
    fn a_query_leaves_out_inactive_and_control_plane_edges_unless_asked() {
        let m = model();
        let ttl = 60_000;
        let query = |include_control, include_inactive| GraphQuery {
            include_control,
            include_inactive,
        };
        let external = "addr:203.0.113.7";
        let controller = "addr:192.0.2.1";
        // Seen within the TTL: active.
        let now = 1_000 + ttl - 1;
        let g = build(&m, &query(false, false), now, ttl);
        assert_eq!(connections(&g), [(external, true)]);
        assert!(!g.nodes.iter().any(|n| n.id == controller));
        let g = build(&m, &query(true, false), now, ttl);
        assert_eq!(connections(&g), [(controller, true), (external, true)]);
        // A TTL later: inactive, shown only when asked.
        let now = 1_000 + ttl;
        assert_eq!(connections(&build(&m, &query(true, false), now, ttl)), []);
        let g = build(&m, &query(false, true), now, ttl);
        assert_eq!(connections(&g), [(external, false)]);
        let g = build(&m, &query(true, true), now, ttl);
        assert_eq!(connections(&g), [(controller, false), (external, false)]);
        // Hosts, their addresses and services are always there.
        assert_eq!(g.edges[0].kind, EdgeKind::HasAddress);
        assert!(g.edges[0].active);
    }

    #[test]
    fn a_service_is_named_after_the_process_on_its_port_and_protocol() {
        let listener = |port: u16, protocol: Protocol, process: &str| {
            let key = model::ListenerKey {
                ip: "0.0.0.0".parse().unwrap(),
                port,
                protocol,
                netns: String::new(),
            };
            (key, process.to_string())
        };
        let dns = AgentTable {
            listeners: [
                listener(53, Protocol::Tcp, "named"),
                listener(53, Protocol::Udp, "unbound"),
                listener(80, Protocol::Tcp, "nginx"),
            ]
            .into(),
            ..Default::default()
        };
        let mut m = Model::default();
        m.replace("dns", dns, 1_000);
        let g = build(&m, &GraphQuery::default(), 1_000, 60_000);
        let services: Vec<(&str, &str)> = g
            .nodes
            .iter()
            .filter_map(|n| match &n.kind {
                NodeKind::Service { process, .. } => Some((n.name.as_str(), process.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            services,
            [
                ("dns:53/tcp", "named"),
                ("dns:80/tcp", "nginx"),
                ("dns:53/udp", "unbound")
            ]
        );
    }
}
