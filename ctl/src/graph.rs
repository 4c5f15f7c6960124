//! `tapgraphctl graph …` and `host show`: the dependency map as tables, exports, orphans and
//! clusters. The controller sends the graph; everything here is presentation and graph algebra.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::anyhow;
use clap::{Args, Subcommand, ValueEnum};
use serde_json::json;
use tapgraph::graph::{bytes_text, edge_json, protocol_name, rtt_text};
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
  tapgraphctl graph export --format dot | dot -Tsvg > map.svg
  tapgraphctl graph --at 2026-12-06T09:00:00Z   # the map as it was then (or --at 24h: a day ago)
  tapgraphctl graph diff --since 24h            # new and gone edges, listeners and hosts")]
pub struct GraphArgs {
    #[command(subcommand)]
    command: Option<GraphCommand>,
    #[command(flatten)]
    filter: Filter,
    /// The map as it was at TIME, from the controller's history: RFC 3339
    /// (2026-12-06T09:00:00Z) or a duration ago (90m, 24h, 7d). Within
    /// topology.history_retention.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
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
    /// What changed on the map: new and gone edges, listeners and hosts, and edges that came
    /// and went in between (a nightly job's connection), from the controller's history.
    #[command(after_help = "\
Examples:
  tapgraphctl graph diff --since 24h
  tapgraphctl graph diff --from 2026-12-06T00:00:00Z --to 2026-12-07T00:00:00Z
  tapgraphctl graph diff --since 7d --host web-1 --port 5432

TIME is RFC 3339 or a duration ago (90m, 24h, 7d). An edge is there while it is active (seen
within topology.ttl): it appears at its first sighting and goes at its last.")]
    Diff {
        /// From this long ago (or this time) until now, or until --to.
        #[arg(long, value_name = "TIME", conflicts_with = "from")]
        since: Option<String>,
        /// From TIME.
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// Until TIME (default: now).
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
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
    // The VIA column only when NAT took some edge to its service.
    let via = edges.iter().any(|e| !e.via.is_empty());
    let rows: Vec<Vec<String>> = edges
        .iter()
        .map(|e| {
            let mut row = vec![
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
            ];
            row.extend(traffic_columns(e.traffic.as_ref()));
            if via {
                row.push(if e.via.is_empty() {
                    "-".into()
                } else {
                    e.via.clone()
                });
            }
            row
        })
        .collect();
    let mut headers = vec![
        "FROM",
        "TO",
        "PORT",
        "PROCESS",
        "SOCKETS",
        "STATE",
        "LAST SEEN",
        "SENT",
        "RECEIVED",
        "RTT",
        "RETRANS",
    ];
    if via {
        headers.push("VIA");
    }
    table::print(&headers, &rows);
}

/// A time argument in Unix ns (see [`tapgraph::history::parse_time`]).
fn time_arg(flag: &str, text: &str) -> Result<u64, Failure> {
    tapgraph::history::parse_time(text, std::time::SystemTime::now())
        .map(tapgraph::time::to_unix_nanos)
        .map_err(|e| Failure(2, anyhow!("{flag}: {e}")))
}

/// History up to `to` (Unix ns).
async fn history(
    admin: &mut AdminServiceClient<Channel>,
    to: u64,
) -> Result<proto::History, Failure> {
    let history = admin
        .get_history(proto::GetHistoryRequest { to_unix_nanos: to })
        .await?
        .into_inner();
    Ok(history)
}

/// One change as a table row's text: `web-1 → db-1:5432/tcp (psql) via 10.96.0.10:5432`,
/// `db-1 listens 0.0.0.0:5432/tcp (postgres)`, `host db-1 (db-1.example)`.
fn change_text(c: &proto::HistoryChange, nodes: &BTreeMap<&str, &proto::GraphNode>) -> String {
    let process = |p: &str| {
        if p.is_empty() {
            String::new()
        } else {
            format!(" ({p})")
        }
    };
    match (c.kind.as_str(), &c.edge) {
        ("edge", Some(e)) => {
            let via = if e.via.is_empty() {
                String::new()
            } else {
                format!(" via {}", e.via)
            };
            format!(
                "{} → {} {}/{}{}{via}",
                display(&e.from, nodes),
                display(&e.to, nodes),
                e.port,
                protocol_name(e.protocol),
                process(&e.process)
            )
        }
        ("listener", Some(e)) => format!(
            "{} listens {}:{}/{}{}",
            c.agent_id,
            c.ip,
            e.port,
            protocol_name(e.protocol),
            process(&e.process)
        ),
        _ if c.hostname.is_empty() || c.hostname == c.agent_id => format!("host {}", c.agent_id),
        _ => format!("host {} ({})", c.agent_id, c.hostname),
    }
}

/// The diff's lists, and what each edge carried in the window (`traffic`: edge, bytes sent,
/// received; the most first), `window` = (from, to, history's horizon).
fn print_diff(
    lists: &[(&str, &Vec<proto::HistoryChange>)],
    traffic: &[(proto::GraphEdge, u64, u64)],
    window: (u64, u64, u64),
    g: &proto::Graph,
    json_out: bool,
) {
    let (from, to, horizon) = window;
    if from < horizon {
        eprintln!(
            "warning: history is kept from {} (topology.history_retention); what changed before is not known",
            ns_time(horizon)
        );
    }
    let nodes: BTreeMap<&str, &proto::GraphNode> =
        g.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
    if json_out {
        let item = |c: &proto::HistoryChange| {
            let mut v = c.edge.as_ref().map_or_else(|| json!({}), edge_json);
            v["kind"] = json!(c.kind);
            v["id"] = json!(c.id);
            v["at"] = json!(ns_time(c.at_unix_nanos));
            v["first"] = json!(c.first);
            if !c.agent_id.is_empty() {
                v["agent"] = json!(c.agent_id);
            }
            v
        };
        let mut out = json!({"from": ns_time(from), "to": ns_time(to)});
        for (name, list) in lists {
            out[*name] = json!(list.iter().map(item).collect::<Vec<_>>());
        }
        out["traffic"] = json!(
            traffic
                .iter()
                .map(|(e, sent, received)| {
                    let mut v = edge_json(e);
                    v["bytes_sent"] = json!(sent);
                    v["bytes_received"] = json!(received);
                    v
                })
                .collect::<Vec<_>>()
        );
        print_json(&out);
        return;
    }
    let rows: Vec<Vec<String>> = lists
        .iter()
        .flat_map(|(name, list)| {
            let nodes = &nodes;
            list.iter().map(move |c| {
                vec![
                    name.to_string(),
                    c.kind.clone(),
                    change_text(c, nodes),
                    ns_time(c.at_unix_nanos),
                ]
            })
        })
        .collect();
    if rows.is_empty() {
        println!("nothing changed from {} to {}", ns_time(from), ns_time(to));
    } else {
        table::print(&["CHANGE", "KIND", "WHAT", "AT"], &rows);
    }
    if !traffic.is_empty() {
        println!("\nwhat the edges carried in the window (history intervals that end in it):");
        let rows: Vec<Vec<String>> = traffic
            .iter()
            .take(20)
            .map(|(e, sent, received)| {
                vec![
                    display(&e.from, &nodes),
                    display(&e.to, &nodes),
                    format!("{}/{}", e.port, protocol_name(e.protocol)),
                    tapgraph::graph::bytes_text(*sent),
                    tapgraph::graph::bytes_text(*received),
                ]
            })
            .collect();
        table::print(&["FROM", "TO", "PORT", "SENT", "RECEIVED"], &rows);
        if traffic.len() > 20 {
            println!(
                "… and {} more edges (-o json lists them all)",
                traffic.len() - 20
            );
        }
    }
}

/// SENT (client to server), RECEIVED, RTT (smoothed), RETRANS; `-` where nothing was measured.
fn traffic_columns(t: Option<&proto::EdgeTraffic>) -> [String; 4] {
    match t {
        Some(t) => [
            bytes_text(t.bytes_sent),
            bytes_text(t.bytes_received),
            rtt_text(t.srtt_us),
            t.retransmits.to_string(),
        ],
        None => ["-".into(), "-".into(), "-".into(), "-".into()],
    }
}

pub async fn run(
    admin: &mut AdminServiceClient<Channel>,
    args: GraphArgs,
    json_out: bool,
) -> Result<(), Failure> {
    match args.command {
        None if args.at.is_some() => {
            let at = time_arg("--at", args.at.as_deref().unwrap_or_default())?;
            let history = history(admin, at).await?;
            if at < history.horizon_unix_nanos {
                return Err(Failure(
                    2,
                    anyhow!(
                        "--at: history is kept from {} (topology.history_retention); the map before that is not known",
                        ns_time(history.horizon_unix_nanos)
                    ),
                ));
            }
            let names = fetch(admin, &Filter::default(), true).await?;
            let labels = node_labels(&names);
            let present = tapgraph::history::present_at(&history.changes, at);
            let edges: Vec<proto::GraphEdge> = present
                .values()
                .filter(|c| c.kind == "edge")
                .filter_map(|c| {
                    let mut e = c.edge.clone()?;
                    e.active = true;
                    e.first_seen_unix_nanos = c.at_unix_nanos;
                    // What it carried over the history interval that holds the time asked.
                    e.traffic =
                        tapgraph::history::traffic_at(&history.changes, &c.id, at).map(|t| {
                            proto::EdgeTraffic {
                                bytes_sent: t.bytes_sent,
                                bytes_received: t.bytes_received,
                                measured_by: "interval".into(),
                                ..Default::default()
                            }
                        });
                    Some(e)
                })
                .filter(|e| keep(e, &args.filter, &labels))
                .collect();
            print_edges(&edges.iter().collect::<Vec<_>>(), &names, json_out);
        }
        None => {
            let g = fetch(admin, &args.filter, false).await?;
            warn_conflicts(&g);
            let labels = node_labels(&g);
            let edges: Vec<&proto::GraphEdge> = connects(&g)
                .filter(|e| keep(e, &args.filter, &labels))
                .collect();
            print_edges(&edges, &g, json_out);
        }
        Some(GraphCommand::Diff { since, from, to }) => {
            let to = match to {
                Some(t) => time_arg("--to", &t)?,
                None => tapgraph::time::unix_nanos(),
            };
            let from = match (since, from) {
                (Some(t), None) => time_arg("--since", &t)?,
                (None, Some(t)) => time_arg("--from", &t)?,
                _ => {
                    return Err(Failure(
                        2,
                        anyhow!("graph diff needs --since TIME or --from TIME (e.g. --since 24h)"),
                    ));
                }
            };
            if from > to {
                return Err(Failure(2, anyhow!("--from is after --to")));
            }
            let history = history(admin, to).await?;
            let names = fetch(admin, &Filter::default(), true).await?;
            let labels = node_labels(&names);
            let d = tapgraph::history::diff(&history.changes, from, to);
            let kept = |list: Vec<&proto::HistoryChange>| -> Vec<proto::HistoryChange> {
                list.into_iter()
                    .filter(|c| {
                        c.edge
                            .as_ref()
                            .is_none_or(|e| keep(e, &args.filter, &labels))
                    })
                    .filter(|c| {
                        args.filter
                            .host
                            .as_ref()
                            .is_none_or(|h| c.edge.is_some() || c.agent_id == *h)
                    })
                    .cloned()
                    .collect()
            };
            let (new, gone, between) = (kept(d.new), kept(d.gone), kept(d.between));
            let traffic: Vec<(proto::GraphEdge, u64, u64)> =
                tapgraph::history::traffic_between(&history.changes, from, to)
                    .into_iter()
                    .filter_map(|(_, c, sent, received)| Some((c.edge.clone()?, sent, received)))
                    .filter(|(e, _, _)| keep(e, &args.filter, &labels))
                    .collect();
            print_diff(
                &[("new", &new), ("gone", &gone), ("between", &between)],
                &traffic,
                (from, to, history.horizon_unix_nanos),
                &names,
                json_out,
            );
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
    fn traffic_columns_show_what_was_measured() {
        let t = proto::EdgeTraffic {
            bytes_sent: 4_096,
            bytes_received: 12,
            srtt_us: 10_250,
            retransmits: 3,
            ..Default::default()
        };
        assert_eq!(
            traffic_columns(Some(&t)),
            ["4.1 kB", "12 B", "10.2 ms", "3"].map(String::from)
        );
        assert_eq!(
            traffic_columns(None),
            ["-", "-", "-", "-"].map(String::from)
        );
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
