//! `tapgraphctl graph …` and `host show`: the dependency map as tables, exports, orphans and
//! clusters. The controller sends the graph; everything here is presentation and graph algebra.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::anyhow;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use tapgraph::graph::{edge_json, protocol_name};
use tapgraph::proto::{self, admin_service_client::AdminServiceClient};
use tapgraph::text::Escaped;
use tonic::transport::Channel;

use crate::{Failure, ns_time, print_json, table};

#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  tapgraphctl graph                             # who connects to whom, now
  tapgraphctl graph --host web-1 --port 5432
  tapgraphctl graph orphans                     # hosts nobody talks to: still needed?
  tapgraphctl graph clusters --hub-degree 20    # groups once the hubs are hidden
  tapgraphctl graph export --format dot | dot -Tsvg > map.svg")]
pub struct GraphArgs {
    #[command(subcommand)]
    command: Option<GraphCommand>,
    #[command(flatten)]
    filter: Filter,
}

#[derive(Args, Debug, Clone, Default)]
pub struct Filter {
    /// Only edges touching this host (agent id).
    #[arg(long, value_name = "HOST", global = true)]
    host: Option<String>,
    /// Only edges touching a node with this label (hosts: token, operator and hostname rules;
    /// addresses: CIDR rules).
    #[arg(long, value_name = "K=V", value_parser = tapgraph::labels::parse_pair, global = true)]
    label: Option<(String, String)>,
    /// Only this server port.
    #[arg(long, global = true)]
    port: Option<u16>,
    /// Only this protocol.
    #[arg(long, value_enum, global = true)]
    protocol: Option<Proto>,
    /// Include the agents' own connections to the controller (hidden: the controller would be a
    /// hub that hides every cluster).
    #[arg(long, global = true)]
    include_control: bool,
    /// Include edges not seen within the TTL (kept until the retention passes).
    #[arg(long, global = true)]
    include_inactive: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Subcommand, Debug)]
enum GraphCommand {
    /// Hosts with no connection in or out (besides the controller) within the retention window.
    Orphans,
    /// Connected groups of hosts after hiding the controller, --hide hosts and hubs.
    Clusters {
        /// Hide this host; repeatable.
        #[arg(long, value_name = "HOST")]
        hide: Vec<String>,
        /// Hide every host with at least this many neighbours.
        #[arg(long, value_name = "N")]
        hub_degree: Option<usize>,
    },
    /// Label rules set by operators (applied after those in the controller's configuration).
    #[command(after_help = "\
Examples:
  tapgraphctl graph rules
  tapgraphctl graph rules set --cidr '203.0.113.0/24 owner=saas,name=payments; 10.20.0.0/16 zone=old-dc'
  tapgraphctl graph rules set --hostname 'web-* role=web; db? role=db'

A CIDR rule labels the addresses in it (the longest prefix wins a conflict); a hostname pattern
(* and ?) labels the hosts it matches. An operator's rule wins over a configured one of equal weight.")]
    Rules {
        #[command(subcommand)]
        action: Option<RulesCommand>,
    },
    /// The whole graph for Graphviz (dot), Gephi (graphml) or scripts (json).
    Export {
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
}

#[derive(Subcommand, Debug)]
enum RulesCommand {
    /// Replace the rules; a flag not given keeps its current rules, '' clears them.
    Set {
        /// CIDR rules: 'CIDR k=v,k=v; CIDR k=v'.
        #[arg(long, value_name = "RULES")]
        cidr: Option<String>,
        /// Hostname rules: 'PATTERN k=v; PATTERN k=v'.
        #[arg(long, value_name = "RULES")]
        hostname: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Json,
    Dot,
    Graphml,
}

impl From<Format> for tapgraph::graph::Format {
    fn from(f: Format) -> Self {
        match f {
            Format::Json => Self::Json,
            Format::Dot => Self::Dot,
            Format::Graphml => Self::Graphml,
        }
    }
}

fn export(g: &proto::Graph, format: Format) -> String {
    tapgraph::graph::export(g, format.into())
}

/// The whole map, streamed in parts so that no size of map outgrows a message limit; from a
/// controller without StreamGraph, in one GetGraph answer.
async fn fetch(
    admin: &mut AdminServiceClient<Channel>,
    f: &Filter,
    all_history: bool,
) -> Result<proto::Graph, Failure> {
    let request = proto::GetGraphRequest {
        include_control: f.include_control,
        include_inactive: f.include_inactive || all_history,
        ..Default::default()
    };
    let mut parts = match admin.stream_graph(request.clone()).await {
        Ok(parts) => parts.into_inner(),
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            return Ok(admin.get_graph(request).await?.into_inner());
        }
        Err(status) => return Err(status.into()),
    };
    // Every field but the nodes and edges comes in the first part.
    let Some(mut graph) = parts.message().await? else {
        return Ok(proto::Graph::default());
    };
    while let Some(part) = parts.message().await? {
        graph.nodes.extend(part.nodes);
        graph.edges.extend(part.edges);
    }
    Ok(graph)
}

/// The host a node belongs to: itself, or a service's host; addresses belong to none.
fn host_of(node_id: &str) -> Option<&str> {
    if let Some(h) = node_id.strip_prefix("host:") {
        return Some(h);
    }
    node_id
        .strip_prefix("svc:")
        .and_then(|s| s.split('/').next())
}

/// How a node reads in a table: `web-1`, `db-1:5432/tcp`, `203.0.113.7`.
fn display(node_id: &str, nodes: &BTreeMap<&str, &proto::GraphNode>) -> String {
    match nodes.get(node_id) {
        Some(n) if n.kind == "service" => {
            let process = n.properties.get("process").filter(|p| !p.is_empty());
            match process {
                Some(p) => format!("{} ({p})", n.name),
                None => n.name.clone(),
            }
        }
        Some(n) => match n.properties.get("dns") {
            Some(dns) => format!("{dns} ({})", n.name),
            None => n.name.clone(),
        },
        None => node_id.to_string(),
    }
}

fn connects(g: &proto::Graph) -> impl Iterator<Item = &proto::GraphEdge> {
    g.edges.iter().filter(|e| e.kind == "CONNECTS_TO")
}

/// The node ids whose labels speak for an edge endpoint: the node, and a service's host.
fn label_holders(node_id: &str) -> Vec<String> {
    let mut ids = vec![node_id.to_string()];
    if node_id.starts_with("svc:")
        && let Some(h) = host_of(node_id)
    {
        ids.push(format!("host:{h}"));
    }
    ids
}

fn keep(
    e: &proto::GraphEdge,
    f: &Filter,
    labels: &BTreeMap<&str, BTreeMap<String, String>>,
) -> bool {
    let hosts = [host_of(&e.from), host_of(&e.to)];
    f.host
        .as_ref()
        .is_none_or(|h| hosts.contains(&Some(h.as_str())))
        && f.label.as_ref().is_none_or(|(k, v)| {
            [&e.from, &e.to]
                .iter()
                .flat_map(|n| label_holders(n))
                .any(|id| labels.get(id.as_str()).and_then(|l| l.get(k)) == Some(v))
        })
        && f.port.is_none_or(|p| e.port == u32::from(p))
        && f.protocol
            .is_none_or(|p| protocol_name(e.protocol) == format!("{p:?}").to_lowercase())
}

/// Labels by node id, for hosts and addresses alike.
fn node_labels(g: &proto::Graph) -> BTreeMap<&str, BTreeMap<String, String>> {
    g.nodes
        .iter()
        .map(|n| {
            let l = n
                .properties
                .iter()
                .filter_map(|(k, v)| k.strip_prefix("label.").map(|k| (k.to_string(), v.clone())))
                .collect();
            (n.id.as_str(), l)
        })
        .collect()
}

/// Addresses that more than one agent claims, one warning each on stderr (the table or JSON on
/// stdout stays as it is): the map shows such an address on its first claimant only.
fn warn_conflicts(g: &proto::Graph) {
    for n in g.nodes.iter().filter(|n| n.kind == "address") {
        if let Some(conflict) = n.properties.get("conflict") {
            eprintln!("warning: address {}: {conflict}", n.name);
        }
    }
}

fn print_edges(edges: &[&proto::GraphEdge], g: &proto::Graph, json_out: bool) {
    if json_out {
        print_json(&json!(
            edges.iter().map(|e| edge_json(e)).collect::<Vec<_>>()
        ));
        return;
    }
    let nodes: BTreeMap<&str, &proto::GraphNode> =
        g.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    let rows: Vec<Vec<String>> = edges
        .iter()
        .map(|e| {
            vec![
                display(&e.from, &nodes),
                display(&e.to, &nodes),
                format!("{}/{}", e.port, protocol_name(e.protocol)),
                match (e.process.is_empty(), e.process_note.is_empty()) {
                    (false, _) => e.process.clone(),
                    (true, true) => "-".into(),
                    // "- (process unknown: no BPF on this host)"
                    (true, false) => format!("- ({})", e.process_note),
                },
                e.sockets.to_string(),
                if e.active { "active" } else { "inactive" }.into(),
                ns_time(e.last_seen_unix_nanos),
            ]
        })
        .collect();
    table::print(
        &[
            "FROM",
            "TO",
            "PORT",
            "PROCESS",
            "SOCKETS",
            "STATE",
            "LAST SEEN",
        ],
        &rows,
    );
}

pub async fn run(
    admin: &mut AdminServiceClient<Channel>,
    args: GraphArgs,
    json_out: bool,
) -> Result<(), Failure> {
    match args.command {
        None => {
            let g = fetch(admin, &args.filter, false).await?;
            warn_conflicts(&g);
            let labels = node_labels(&g);
            let edges: Vec<&proto::GraphEdge> = connects(&g)
                .filter(|e| keep(e, &args.filter, &labels))
                .collect();
            print_edges(&edges, &g, json_out);
        }
        Some(GraphCommand::Orphans) => {
            let g = fetch(admin, &Filter::default(), true).await?;
            let mut talking = BTreeSet::new();
            for e in connects(&g).filter(|e| !e.control_plane) {
                talking.extend(host_of(&e.from));
                talking.extend(host_of(&e.to));
            }
            let orphans: Vec<&str> = g
                .nodes
                .iter()
                .filter(|n| n.kind == "host" && !talking.contains(n.name.as_str()))
                .map(|n| n.name.as_str())
                .collect();
            if json_out {
                print_json(&json!(orphans));
            } else if orphans.is_empty() {
                println!(
                    "no orphan hosts: every host has a connection in or out within the retention window"
                );
            } else {
                for o in orphans {
                    println!("{}", Escaped(o));
                }
            }
        }
        Some(GraphCommand::Clusters { hide, hub_degree }) => {
            let g = fetch(admin, &args.filter, false).await?;
            let clusters = clusters(&g, &hide, hub_degree);
            if json_out {
                print_json(&json!(clusters));
            } else {
                for (i, c) in clusters.iter().enumerate() {
                    println!(
                        "cluster {} ({} hosts): {}",
                        i + 1,
                        c.len(),
                        Escaped(&c.join(", "))
                    );
                }
            }
        }
        Some(GraphCommand::Rules { action }) => {
            let mut rules = admin
                .get_label_rules(proto::GetLabelRulesRequest {})
                .await?
                .into_inner();
            if let Some(RulesCommand::Set { cidr, hostname }) = action {
                if let Some(c) = cidr {
                    rules.cidr = c;
                }
                if let Some(h) = hostname {
                    rules.hostname = h;
                }
                rules = admin.set_label_rules(rules).await?.into_inner();
            }
            if json_out {
                print_json(&json!({"cidr": rules.cidr, "hostname": rules.hostname}));
            } else {
                let show = |r: &str| {
                    if r.is_empty() {
                        "-".to_string()
                    } else {
                        tapgraph::text::escape(r).into_owned()
                    }
                };
                println!("cidr      {}", show(&rules.cidr));
                println!("hostname  {}", show(&rules.hostname));
            }
        }
        Some(GraphCommand::Export { format }) => {
            let g = fetch(admin, &args.filter, false).await?;
            print!("{}", export(&g, format));
        }
    }
    Ok(())
}

/// Groups of hosts joined by connections (services count as their host, external addresses join
/// nothing), after hiding `hide` and hosts with `hub_degree` or more neighbours. Largest first.
fn clusters(g: &proto::Graph, hide: &[String], hub_degree: Option<usize>) -> Vec<Vec<String>> {
    let mut neighbours: BTreeMap<String, BTreeSet<String>> = g
        .nodes
        .iter()
        .filter(|n| n.kind == "host")
        .map(|n| (n.name.clone(), BTreeSet::new()))
        .collect();
    for e in connects(g).filter(|e| !e.control_plane) {
        if let (Some(a), Some(b)) = (host_of(&e.from), host_of(&e.to))
            && a != b
        {
            neighbours.entry(a.into()).or_default().insert(b.into());
            neighbours.entry(b.into()).or_default().insert(a.into());
        }
    }
    let hidden: BTreeSet<String> = neighbours
        .iter()
        .filter(|(h, n)| hide.contains(h) || hub_degree.is_some_and(|d| n.len() >= d))
        .map(|(h, _)| h.clone())
        .collect();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for start in neighbours.keys().filter(|h| !hidden.contains(*h)) {
        if !seen.insert(start.clone()) {
            continue;
        }
        let mut group = vec![start.clone()];
        let mut stack = vec![start.clone()];
        while let Some(h) = stack.pop() {
            for n in &neighbours[&h] {
                if !hidden.contains(n) && seen.insert(n.clone()) {
                    group.push(n.clone());
                    stack.push(n.clone());
                }
            }
        }
        group.sort();
        out.push(group);
    }
    out.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    out
}

/// `tapgraphctl host show NAME`: what a host depends on, and what depends on it.
pub async fn show_host(
    admin: &mut AdminServiceClient<Channel>,
    name: &str,
    json_out: bool,
) -> Result<(), Failure> {
    let g = fetch(admin, &Filter::default(), false).await?;
    if !g.nodes.iter().any(|n| n.kind == "host" && n.name == name) {
        return Err(Failure(
            1,
            anyhow!("no host {name} in the map (agents report once connected)"),
        ));
    }
    let outbound: Vec<&proto::GraphEdge> = connects(&g)
        .filter(|e| host_of(&e.from) == Some(name) && !e.control_plane)
        .collect();
    let inbound: Vec<&proto::GraphEdge> = connects(&g)
        .filter(|e| host_of(&e.to) == Some(name) && host_of(&e.from) != Some(name))
        .collect();
    if json_out {
        print_json(&json!({
            "host": name,
            "outbound": outbound.iter().map(|e| edge_json(e)).collect::<Vec<_>>(),
            "inbound": inbound.iter().map(|e| edge_json(e)).collect::<Vec<_>>(),
        }));
        return Ok(());
    }
    let name = Escaped(name);
    println!("{name} depends on ({}):", outbound.len());
    print_edges(&outbound, &g, false);
    println!("\ndepends on {name} ({}):", inbound.len());
    print_edges(&inbound, &g, false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(from: &str, to: &str) -> proto::GraphEdge {
        proto::GraphEdge {
            from: from.into(),
            to: to.into(),
            kind: "CONNECTS_TO".into(),
            ..Default::default()
        }
    }

    fn host(name: &str) -> proto::GraphNode {
        proto::GraphNode {
            id: format!("host:{name}"),
            kind: "host".into(),
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn hiding_the_hub_reveals_the_clusters() {
        let g = proto::Graph {
            nodes: ["a", "b", "c", "d", "hub", "lonely"].map(host).to_vec(),
            edges: vec![
                edge("host:a", "svc:b/tcp/80"),
                edge("host:c", "svc:d/tcp/80"),
                edge("host:a", "svc:hub/tcp/53"),
                edge("host:b", "svc:hub/tcp/53"),
                edge("host:c", "svc:hub/tcp/53"),
                edge("host:d", "svc:hub/tcp/53"),
                edge("host:b", "addr:203.0.113.7"),
            ],
        };
        assert_eq!(
            clusters(&g, &[], None),
            vec![vec!["a", "b", "c", "d", "hub"], vec!["lonely"]]
        );
        let split = vec![vec!["a", "b"], vec!["c", "d"], vec!["lonely"]];
        assert_eq!(clusters(&g, &["hub".into()], None), split);
        assert_eq!(
            clusters(&g, &[], Some(3)),
            split,
            "only the hub has 3 or more neighbours"
        );
    }

    #[test]
    fn label_filters_see_hosts_services_and_addresses() {
        let mut addr = proto::GraphNode {
            id: "addr:203.0.113.7".into(),
            kind: "address".into(),
            name: "203.0.113.7".into(),
            ..Default::default()
        };
        addr.properties.insert("label.owner".into(), "saas".into());
        let mut db = host("db");
        db.properties.insert("label.role".into(), "db".into());
        let g = proto::Graph {
            nodes: vec![host("a"), db, addr],
            edges: vec![
                edge("host:a", "svc:db/tcp/5432"),
                edge("host:a", "addr:203.0.113.7"),
            ],
        };
        let labels = node_labels(&g);
        let only = |k: &str, v: &str| {
            let f = Filter {
                label: Some((k.into(), v.into())),
                ..Default::default()
            };
            g.edges
                .iter()
                .filter(|e| keep(e, &f, &labels))
                .map(|e| e.to.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            only("role", "db"),
            ["svc:db/tcp/5432"],
            "a service carries its host's labels"
        );
        assert_eq!(only("owner", "saas"), ["addr:203.0.113.7"]);
        assert!(only("owner", "nobody").is_empty());
    }

    #[test]
    fn exports_escape_their_text() {
        let g = proto::Graph {
            nodes: vec![host("x\"<&>")],
            edges: vec![],
        };
        assert!(export(&g, Format::Graphml).contains("x&quot;&lt;&amp;&gt;"));
        assert!(export(&g, Format::Dot).contains("label=\"x'<&>\""));
    }
}
