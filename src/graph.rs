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

/// One edge as JSON: endpoints, port, protocol, process, sockets, activity, times (RFC 3339),
/// `via`: the address its client dialled when NAT took it there ("" otherwise), and `traffic`
/// when an agent measured it (else absent).
pub fn edge_json(e: &proto::GraphEdge) -> serde_json::Value {
    let mut v = json!({
        "from": e.from, "to": e.to, "port": e.port, "protocol": protocol_name(e.protocol),
        "process": e.process, "sockets": e.sockets, "active": e.active, "control_plane": e.control_plane,
        "first_seen": ns_time(e.first_seen_unix_nanos), "last_seen": ns_time(e.last_seen_unix_nanos),
    });
    v["via"] = json!(e.via);
    if let Some(t) = &e.traffic {
        v["traffic"] = json!({
            "bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received,
            "segments_sent": t.segments_sent, "segments_received": t.segments_received,
            "retransmits": t.retransmits, "srtt_us": t.srtt_us, "min_rtt_us": t.min_rtt_us,
            "sent_per_second": t.sent_per_second, "received_per_second": t.received_per_second,
            "closed_connections": t.closed_connections, "measured_by": t.measured_by,
        });
    }
    // Only where the agent said why the process is unknown ("process unknown: no BPF on this host").
    if !e.process_note.is_empty() {
        v["process_note"] = e.process_note.clone().into();
    }
    v
}

/// A byte count for people: `512 B`, `1.5 kB`, `3.2 MB` (powers of 1000).
pub fn bytes_text(n: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Microseconds for people: `850 µs`, `10.2 ms`, `1.3 s`.
pub fn rtt_text(us: u32) -> String {
    match us {
        0 => "-".into(),
        1..1000 => format!("{us} µs"),
        1000..1_000_000 => format!("{:.1} ms", f64::from(us) / 1000.0),
        _ => format!("{:.1} s", f64::from(us) / 1e6),
    }
}

/// A Graphviz pen width for an edge that carried `bytes`: 1 for none, one more per factor of
/// 10 past 1 kB, at most 8.
fn pen_width(bytes: u64) -> u32 {
    let mut width = 1;
    let mut level = 1000u64;
    while bytes >= level && width < 8 {
        width += 1;
        level = level.saturating_mul(10);
    }
    width
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
                let mut label = if e.kind == "CONNECTS_TO" {
                    let via = if e.via.is_empty() {
                        String::new()
                    } else {
                        format!(" via {}", e.via)
                    };
                    format!(
                        "{}/{} {}{via}",
                        e.port,
                        protocol_name(e.protocol),
                        e.process
                    )
                } else {
                    e.kind.to_lowercase()
                };
                let mut width = 1;
                if let Some(t) = &e.traffic {
                    label = format!(
                        "{} ({} / {}, rtt {})",
                        label.trim(),
                        bytes_text(t.bytes_sent),
                        bytes_text(t.bytes_received),
                        rtt_text(t.srtt_us)
                    );
                    width = pen_width(t.bytes_sent.saturating_add(t.bytes_received));
                }
                let style = if e.kind == "CONNECTS_TO" {
                    "solid"
                } else {
                    "dotted"
                };
                out.push_str(&format!(
                    "  \"{}\" -> \"{}\" [label=\"{}\", style={style}, penwidth={width}];\n",
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
                 <key id=\"via\" for=\"edge\" attr.name=\"via\" attr.type=\"string\"/>\n\
                 <key id=\"bytes_sent\" for=\"edge\" attr.name=\"bytes_sent\" attr.type=\"long\"/>\n\
                 <key id=\"bytes_received\" for=\"edge\" attr.name=\"bytes_received\" attr.type=\"long\"/>\n\
                 <key id=\"retransmits\" for=\"edge\" attr.name=\"retransmits\" attr.type=\"long\"/>\n\
                 <key id=\"rtt_us\" for=\"edge\" attr.name=\"rtt_us\" attr.type=\"long\"/>\n\
                 <key id=\"min_rtt_us\" for=\"edge\" attr.name=\"min_rtt_us\" attr.type=\"long\"/>\n\
                 <graph id=\"tapgraph\" edgedefault=\"directed\">\n",
            );
            for n in &g.nodes {
                out.push_str(&format!(
                    "  <node id=\"{}\"><data key=\"kind\">{}</data><data key=\"name\">{}</data></node>\n",
                    xml(&n.id), xml(&n.kind), xml(&n.name)
                ));
            }
            for e in &g.edges {
                let traffic = e.traffic.as_ref().map_or(String::new(), |t| {
                    format!(
                        "<data key=\"bytes_sent\">{}</data><data key=\"bytes_received\">{}</data><data key=\"retransmits\">{}</data><data key=\"rtt_us\">{}</data><data key=\"min_rtt_us\">{}</data>",
                        t.bytes_sent, t.bytes_received, t.retransmits, t.srtt_us, t.min_rtt_us
                    )
                });
                out.push_str(&format!(
                    "  <edge source=\"{}\" target=\"{}\"><data key=\"kind\">{}</data><data key=\"port\">{}</data><data key=\"protocol\">{}</data><data key=\"process\">{}</data><data key=\"sockets\">{}</data><data key=\"active\">{}</data><data key=\"via\">{}</data>{traffic}</edge>\n",
                    xml(&e.from), xml(&e.to), xml(&e.kind), e.port, protocol_name(e.protocol), xml(&e.process), e.sockets, e.active, xml(&e.via)
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

    /// Every format carries an edge's traffic: JSON in full, GraphML as attributes, dot in the
    /// label and the pen width.
    #[test]
    fn exports_carry_traffic() {
        let g = proto::Graph {
            nodes: vec![],
            edges: vec![proto::GraphEdge {
                from: "host:a".into(),
                to: "svc:b/tcp/80".into(),
                kind: "CONNECTS_TO".into(),
                port: 80,
                protocol: proto::Protocol::Tcp as i32,
                process: "curl".into(),
                traffic: Some(proto::EdgeTraffic {
                    bytes_sent: 1_500_000,
                    bytes_received: 300,
                    retransmits: 2,
                    srtt_us: 10_400,
                    min_rtt_us: 10_050,
                    measured_by: "client".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
        };
        let json = to_json(&g);
        let t = &json["edges"][0]["traffic"];
        assert_eq!(
            (
                &t["bytes_sent"],
                &t["bytes_received"],
                &t["srtt_us"],
                &t["measured_by"]
            ),
            (
                &json!(1_500_000),
                &json!(300),
                &json!(10_400),
                &json!("client")
            )
        );
        let graphml = export(&g, Format::Graphml);
        assert!(
            graphml.contains("<data key=\"bytes_sent\">1500000</data><data key=\"bytes_received\">300</data><data key=\"retransmits\">2</data><data key=\"rtt_us\">10400</data><data key=\"min_rtt_us\">10050</data>"),
            "{graphml}"
        );
        let dot = export(&g, Format::Dot);
        assert!(
            dot.contains(
                "[label=\"80/tcp curl (1.5 MB / 300 B, rtt 10.4 ms)\", style=solid, penwidth=5]"
            ),
            "{dot}"
        );
        // No traffic: no key in JSON.
        let mut quiet = g.clone();
        quiet.edges[0].traffic = None;
        assert!(to_json(&quiet)["edges"][0].get("traffic").is_none());
        assert_eq!(
            [0, 999, 1000, 999_949, 999_950, 12_345_678_901].map(bytes_text),
            ["0 B", "999 B", "1.0 kB", "999.9 kB", "1.0 MB", "12.3 GB"]
        );
        assert_eq!(
            [0, 850, 10_400, 1_300_000].map(rtt_text),
            ["-", "850 µs", "10.4 ms", "1.3 s"]
        );
    }

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
            dot.contains("[label=\"80/tcp p\\\\x1b[2J\\\\n\\\\0'x\\\\\", style=solid, penwidth=1]"),
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
