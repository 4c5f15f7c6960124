//! The dependency map's exchange formats, shared by `tapgraphctl graph export` and the
//! controller's HTTP API: JSON (what the web console reads), Graphviz dot and GraphML.

use serde_json::{Value, json};

use crate::proto;

/// An export format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Dot,
    Graphml,
}

impl Format {
    /// `json`, `dot` or `graphml`.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "json" => Ok(Self::Json),
            "dot" => Ok(Self::Dot),
            "graphml" => Ok(Self::Graphml),
            other => Err(format!("unknown format `{other}`: json, dot or graphml")),
        }
    }

    /// The file extension and media type of an export.
    pub fn file(self) -> (&'static str, &'static str) {
        match self {
            Self::Json => ("json", "application/json"),
            Self::Dot => ("dot", "text/vnd.graphviz"),
            Self::Graphml => ("graphml", "application/graphml+xml"),
        }
    }
}

/// RFC 3339, or `-` for a time never set (0).
fn ns_time(ns: u64) -> String {
    if ns == 0 {
        return "-".into();
    }
    crate::time::rfc3339(crate::time::from_unix_nanos(ns))
}

/// The whole graph as JSON: `{"nodes": [{id, kind, name, properties}], "edges": [{from, to, kind, …}]}`.
pub fn to_json(g: &proto::Graph) -> Value {
    json!({
        "nodes": g.nodes.iter().map(|n| json!({"id": n.id, "kind": n.kind, "name": n.name, "properties": n.properties})).collect::<Vec<_>>(),
        "edges": g.edges.iter().map(|e| { let mut v = edge_json(e); v["kind"] = json!(e.kind); v }).collect::<Vec<_>>(),
    })
}

/// `tcp`, `udp`, or `?` for a value this build does not know.
pub fn protocol_name(p: i32) -> &'static str {
    match proto::Protocol::try_from(p) {
        Ok(proto::Protocol::Tcp) => "tcp",
        Ok(proto::Protocol::Udp) => "udp",
        _ => "?",
    }
}

/// One edge as JSON: endpoints, port, protocol, process, sockets, activity, times (RFC 3339).
pub fn edge_json(e: &proto::GraphEdge) -> serde_json::Value {
    let mut edge = json!({
        "from": e.from, "to": e.to, "port": e.port, "protocol": protocol_name(e.protocol),
        "process": e.process, "sockets": e.sockets, "active": e.active, "control_plane": e.control_plane,
        "first_seen": ns_time(e.first_seen_unix_nanos), "last_seen": ns_time(e.last_seen_unix_nanos),
    });
    // Only where the agent said why the process is unknown ("process unknown: no BPF on this host").
    if !e.process_note.is_empty() {
        edge["process_note"] = e.process_note.clone().into();
    }
    edge
}

/// Text for XML. Control characters, which XML 1.0 cannot hold even as references, are shown as
/// escapes (`crate::text`): a process name an agent sent cannot make the document unreadable.
fn xml(s: &str) -> String {
    crate::text::escape(s)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Text for a quoted Graphviz string: control characters shown as escapes, backslashes doubled
/// (Graphviz would read `\n` or a trailing `\` itself), double quotes made single.
fn dot(s: &str) -> String {
    crate::text::escape(s)
        .replace('\\', "\\\\")
        .replace('"', "'")
}

/// The whole graph in `format`.
pub fn export(g: &proto::Graph, format: Format) -> String {
    match format {
        Format::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(&to_json(g)).unwrap_or_default()
        ),
        Format::Dot => {
            let mut out = String::from("digraph tapgraph {\n  rankdir=LR;\n");
            for n in &g.nodes {
                let shape = match n.kind.as_str() {
                    "host" => "box",
                    "service" => "ellipse",
                    _ => "diamond",
                };
                out.push_str(&format!(
                    "  \"{}\" [label=\"{}\", shape={shape}];\n",
                    dot(&n.id),
                    dot(&n.name)
                ));
            }
            for e in &g.edges {
                let label = if e.kind == "CONNECTS_TO" {
                    format!("{}/{} {}", e.port, protocol_name(e.protocol), e.process)
                } else {
                    e.kind.to_lowercase()
                };
                let style = if e.kind == "CONNECTS_TO" {
                    "solid"
                } else {
                    "dotted"
                };
                out.push_str(&format!(
                    "  \"{}\" -> \"{}\" [label=\"{}\", style={style}];\n",
                    dot(&e.from),
                    dot(&e.to),
                    dot(label.trim())
                ));
            }
            out.push_str("}\n");
            out
        }
        Format::Graphml => {
            let mut out = String::from(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<graphml xmlns=\"http://graphml.graphdrawing.org/xmlns\">\n\
                 <key id=\"kind\" for=\"all\" attr.name=\"kind\" attr.type=\"string\"/>\n\
                 <key id=\"name\" for=\"node\" attr.name=\"name\" attr.type=\"string\"/>\n\
                 <key id=\"port\" for=\"edge\" attr.name=\"port\" attr.type=\"int\"/>\n\
                 <key id=\"protocol\" for=\"edge\" attr.name=\"protocol\" attr.type=\"string\"/>\n\
                 <key id=\"process\" for=\"edge\" attr.name=\"process\" attr.type=\"string\"/>\n\
                 <key id=\"sockets\" for=\"edge\" attr.name=\"sockets\" attr.type=\"int\"/>\n\
                 <key id=\"active\" for=\"edge\" attr.name=\"active\" attr.type=\"boolean\"/>\n\
                 <graph id=\"tapgraph\" edgedefault=\"directed\">\n",
            );
            for n in &g.nodes {
                out.push_str(&format!(
                    "  <node id=\"{}\"><data key=\"kind\">{}</data><data key=\"name\">{}</data></node>\n",
                    xml(&n.id), xml(&n.kind), xml(&n.name)
                ));
            }
            for e in &g.edges {
                out.push_str(&format!(
                    "  <edge source=\"{}\" target=\"{}\"><data key=\"kind\">{}</data><data key=\"port\">{}</data><data key=\"protocol\">{}</data><data key=\"process\">{}</data><data key=\"sockets\">{}</data><data key=\"active\">{}</data></edge>\n",
                    xml(&e.from), xml(&e.to), xml(&e.kind), e.port, protocol_name(e.protocol), xml(&e.process), e.sockets, e.active
                ));
            }
            out.push_str("</graph>\n</graphml>\n");
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_show_peer_control_characters_as_escapes() {
        let g = proto::Graph {
            nodes: vec![],
            edges: vec![proto::GraphEdge {
                from: "host:a".into(),
                to: "svc:b/tcp/80".into(),
                kind: "CONNECTS_TO".into(),
                port: 80,
                protocol: proto::Protocol::Tcp as i32,
                process: "p\x1b[2J\n\0\"x\\".into(),
                ..Default::default()
            }],
        };
        let graphml = export(&g, Format::Graphml);
        assert!(
            graphml.contains("<data key=\"process\">p\\x1b[2J\\n\\0&quot;x\\</data>"),
            "{graphml}"
        );
        let dot = export(&g, Format::Dot);
        assert!(
            dot.contains("[label=\"80/tcp p\\\\x1b[2J\\\\n\\\\0'x\\\\\", style=solid]"),
            "{dot}"
        );
        for text in [&graphml, &dot] {
            assert!(
                text.lines().all(|l| !l.contains(crate::text::is_unsafe)),
                "{text}"
            );
        }
    }
}
