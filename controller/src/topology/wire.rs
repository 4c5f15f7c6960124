//! The map's wire form: the one conversion of a typed [`Graph`] into `proto::Graph`, which the
//! AdminService sends as is and the HTTP API turns into JSON, Graphviz or GraphML
//! (`tapgraph::graph`, shared with `tapgraphctl`). It sits beside the types it converts, so a
//! field added to the map has its wire form written in the same module, once for every handler.

use tapgraph::proto;

use super::graph::{Edge, EdgeKind, Graph, Node, Prop};
use super::history::{Change, Item};
use super::model::{self, Protocol};

fn protocol(p: Protocol) -> proto::Protocol {
    match p {
        Protocol::Tcp => proto::Protocol::Tcp,
        Protocol::Udp => proto::Protocol::Udp,
    }
}

impl From<&Node> for proto::GraphNode {
    fn from(n: &Node) -> Self {
        let mut properties: std::collections::HashMap<String, String> = n
            .properties()
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Prop::Text(text) => text.to_string(),
                    Prop::Number(n) => n.to_string(),
                };
                (k.to_string(), v)
            })
            .collect();
        for (k, v) in &n.labels {
            properties.insert(format!("label.{k}"), v.clone());
        }
        proto::GraphNode {
            id: n.id.clone(),
            kind: n.kind.as_str().into(),
            name: n.name.clone(),
            properties,
        }
    }
}

impl From<&Edge> for proto::GraphEdge {
    fn from(e: &Edge) -> Self {
        proto::GraphEdge {
            from: e.from.clone(),
            to: e.to.clone(),
            kind: e.kind.as_str().into(),
            port: u32::from(e.port),
            protocol: e.protocol.map_or(0, |p| protocol(p) as i32),
            process: e.process.clone(),
            sockets: e.sockets,
            first_seen_unix_nanos: e.first_seen_ms.saturating_mul(1_000_000),
            last_seen_unix_nanos: e.last_seen_ms.saturating_mul(1_000_000),
            active: e.active,
            control_plane: e.control_plane,
            via: e.via.clone(),
            traffic: e.traffic.as_ref().map(|t| proto::EdgeTraffic {
                bytes_sent: t.bytes_sent,
                bytes_received: t.bytes_received,
                segments_sent: t.segments_sent,
                segments_received: t.segments_received,
                retransmits: t.retransmits,
                srtt_us: t.srtt_us,
                min_rtt_us: t.min_rtt_us,
                sent_per_second: t.sent_per_second,
                received_per_second: t.received_per_second,
                closed_connections: t.closed,
                measured_by: t.measured_by.as_str().into(),
            }),
            process_note: e.process_note.clone(),
        }
    }
}

impl From<&Change> for proto::HistoryChange {
    fn from(c: &Change) -> Self {
        let mut out = proto::HistoryChange {
            at_unix_nanos: c.at_ms.saturating_mul(1_000_000),
            kind: c.item.kind().into(),
            appeared: c.appeared,
            id: c.item.id(),
            first: c.first,
            ..Default::default()
        };
        match &c.item {
            Item::Edge { key, process, via } => {
                out.edge = Some(proto::GraphEdge {
                    process: process.clone(),
                    via: via.clone(),
                    ..connects_to(key)
                });
            }
            Item::Listener {
                agent,
                listener,
                process,
            } => {
                let service = model::Node::Service {
                    host: agent.clone(),
                    protocol: listener.protocol,
                    port: listener.port,
                };
                out.agent_id = agent.clone();
                out.ip = listener.ip.to_string();
                out.edge = Some(proto::GraphEdge {
                    from: model::Node::Host(agent.clone()).id(),
                    to: service.id(),
                    kind: EdgeKind::Listens.as_str().into(),
                    port: u32::from(listener.port),
                    protocol: protocol(listener.protocol) as i32,
                    process: process.clone(),
                    ..Default::default()
                });
            }
            Item::Host { agent, hostname } => {
                out.agent_id = agent.clone();
                out.hostname = hostname.clone();
            }
            Item::Traffic {
                key,
                interval_ms,
                bytes_sent,
                bytes_received,
            } => {
                out.edge = Some(connects_to(key));
                out.interval_ms = *interval_ms;
                out.bytes_sent = *bytes_sent;
                out.bytes_received = *bytes_received;
            }
        }
        out
    }
}

/// A `CONNECTS_TO` edge's ends, port and protocol, as a history record names it.
fn connects_to(key: &model::EdgeKey) -> proto::GraphEdge {
    proto::GraphEdge {
        from: key.from.id(),
        to: key.to.id(),
        kind: EdgeKind::ConnectsTo.as_str().into(),
        port: u32::from(key.port),
        protocol: protocol(key.protocol) as i32,
        ..Default::default()
    }
}

impl From<&Graph> for proto::Graph {
    fn from(g: &Graph) -> Self {
        proto::Graph {
            nodes: g.nodes.iter().map(Into::into).collect(),
            edges: g.edges.iter().map(Into::into).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::topology::GraphQuery;
    use crate::topology::graph::{NodeKind, build};
    use crate::topology::model::{
        AgentTable, Direction, ListenerKey, Model, ObsKey, ObsValue, Protocol,
    };

    fn listener(ip: &str, port: u16, process: &str) -> (ListenerKey, String) {
        let key = ListenerKey {
            ip: ip.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            netns: String::new(),
        };
        (key, process.to_string())
    }

    fn client(local: &str, remote: &str, port: u16, process: &str) -> (ObsKey, ObsValue) {
        let key = ObsKey {
            netns: Box::default(),
            direction: Direction::Client,
            local_ip: local.parse().unwrap(),
            remote_ip: remote.parse().unwrap(),
            server_port: port,
            protocol: Protocol::Tcp,
            process: process.into(),
            via: None,
        };
        let value = ObsValue {
            sockets: 2,
            control_plane: false,
            short_lived: false,
            process_note: String::new(),
        };
        (key, value)
    }

    fn properties(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The wire form of a small map, field by field: what the admin API, the HTTP API and the
    /// console have always been sent.
    #[test]
    fn the_wire_form_names_kinds_and_properties_as_the_api_always_has() {
        let mut model = Model::default();
        let db = AgentTable {
            hostname: "db.example".into(),
            addresses: ["10.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap()].into(),
            // Two addresses on one port: one service.
            listeners: [
                listener("0.0.0.0", 6379, "redis-server"),
                listener("10.0.0.2", 6379, "redis-server"),
            ]
            .into(),
            ..Default::default()
        };
        model.replace("db", db, 1_000);
        let web = AgentTable {
            hostname: "web.example".into(),
            addresses: ["10.0.0.1".parse().unwrap()].into(),
            entries: [client("10.0.0.1", "10.0.0.2", 6379, "app")].into(),
            ..Default::default()
        };
        model.replace("web", web, 2_000);
        // A second claim on db's address: shown on the address node.
        let rogue = AgentTable {
            addresses: ["10.0.0.2".parse().unwrap()].into(),
            ..Default::default()
        };
        model.replace("rogue", rogue, 2_000);

        let mut map = build(&model, &GraphQuery::default(), 3_000, 60_000);
        // Decorations as `view::map` puts them.
        for node in &mut map.nodes {
            match &mut node.kind {
                NodeKind::Host { agent_state, .. } if node.name == "web" => {
                    *agent_state = Some("connected");
                    node.labels = BTreeMap::from([("team".into(), "shop".into())]);
                }
                NodeKind::Address { dns, .. } => *dns = Some("db.internal".into()),
                _ => {}
            }
        }
        let wire = proto::Graph::from(&map);

        let node = |id: &str, kind: &str, name: &str, props: &[(&str, &str)]| proto::GraphNode {
            id: id.into(),
            kind: kind.into(),
            name: name.into(),
            properties: properties(props),
        };
        let conflict = "claimed by agents db, rogue; the map keeps it on db";
        let address = [("conflict", conflict), ("dns", "db.internal")];
        assert_eq!(
            wire.nodes,
            [
                node(
                    "addr:10.0.0.1",
                    "address",
                    "10.0.0.1",
                    &[("dns", "db.internal")]
                ),
                node("addr:10.0.0.2", "address", "10.0.0.2", &address),
                node("host:db", "host", "db", &[("hostname", "db.example")]),
                node("host:rogue", "host", "rogue", &[("hostname", "")]),
                node(
                    "host:web",
                    "host",
                    "web",
                    &[
                        ("hostname", "web.example"),
                        ("agent_state", "connected"),
                        ("label.team", "shop"),
                    ]
                ),
                node(
                    "svc:db/tcp/6379",
                    "service",
                    "db:6379/tcp",
                    &[
                        ("host", "db"),
                        ("process", "redis-server"),
                        ("port", "6379"),
                        ("protocol", "tcp"),
                    ]
                ),
            ]
        );
        let edge = |from: &str, to: &str, kind: &str, port: u32, protocol: i32| proto::GraphEdge {
            from: from.into(),
            to: to.into(),
            kind: kind.into(),
            port,
            protocol,
            active: true,
            ..Default::default()
        };
        let tcp = proto::Protocol::Tcp as i32;
        assert_eq!(
            wire.edges,
            [
                edge("host:db", "addr:10.0.0.2", "HAS_ADDRESS", 0, 0),
                edge("host:db", "svc:db/tcp/6379", "LISTENS", 6379, tcp),
                edge("host:rogue", "addr:10.0.0.2", "HAS_ADDRESS", 0, 0),
                edge("host:web", "addr:10.0.0.1", "HAS_ADDRESS", 0, 0),
                proto::GraphEdge {
                    process: "app".into(),
                    sockets: 2,
                    first_seen_unix_nanos: 2_000_000_000,
                    last_seen_unix_nanos: 2_000_000_000,
                    ..edge("host:web", "svc:db/tcp/6379", "CONNECTS_TO", 6379, tcp)
                },
            ]
        );
    }
}
