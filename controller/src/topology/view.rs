//! The map as operators see it: the topology task's graph, with the labels of enrollment tokens,
//! operators and rules, and reverse-DNS names, put on its nodes. The admin API and the Neo4j sink
//! both show this one view.

use std::collections::BTreeMap;
use std::time::Duration;

use tapgraph::proto;

use super::{GraphQuery, Naming, Topology};
use crate::enrollment::{EnrolledAgent, Enrollment};

/// The decorated graph for `query`.
pub async fn graph(
    topology: &Topology,
    enrollment: &Enrollment,
    naming: &Naming,
    query: GraphQuery,
) -> proto::Graph {
    let mut graph = topology.graph(query).await;
    // Labels sit on nodes, as `label.KEY` properties: a host's come from its enrollment token
    // and operators, then hostname rules; an address's from CIDR rules.
    let enrolled: BTreeMap<String, EnrolledAgent> = enrollment
        .list_agents()
        .await
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    let rules = naming.config_rules.then(&naming.operator_rules.get().1);
    for node in graph.nodes.iter_mut() {
        let labels = match node.kind.as_str() {
            "host" => {
                let record = enrolled.get(&node.name);
                // Enrolled under, else as its Hello said, else the agent id.
                let hostname = record
                    .map(|a| a.hostname.clone())
                    .filter(|h| !h.is_empty())
                    .or_else(|| node.properties.get("hostname").cloned())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| node.name.clone());
                node.properties.insert("hostname".into(), hostname.clone());
                // connected, degraded or lost: a lost agent is flagged on its Host node, and the
                // flag clears by itself when it comes back.
                if let Some(state) = naming.agents.state(&node.name) {
                    node.properties.insert("agent_state".into(), state.into());
                }
                let mut labels = rules.for_hostname(&hostname);
                labels.extend(record.map(|a| a.labels.clone()).unwrap_or_default());
                labels
            }
            "address" => match node.name.parse() {
                Ok(ip) => rules.for_address(&ip),
                Err(_) => BTreeMap::new(),
            },
            _ => BTreeMap::new(),
        };
        for (k, v) in labels {
            node.properties.insert(format!("label.{k}"), v);
        }
    }
    // External and agentless endpoints by name, when reverse DNS is on.
    let external: Vec<std::net::IpAddr> = graph
        .nodes
        .iter()
        .filter(|n| n.kind == "address")
        .filter_map(|n| n.name.parse().ok())
        .collect();
    let names = naming.names.lookup(&external, Duration::from_secs(2)).await;
    for node in graph.nodes.iter_mut().filter(|n| n.kind == "address") {
        if let Some(name) = node.name.parse().ok().and_then(|ip| names.get(&ip)) {
            node.properties.insert("dns".into(), name.clone());
        }
    }
    graph
}
