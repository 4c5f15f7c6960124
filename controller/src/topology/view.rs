//! The map as operators see it: the topology task's graph, with the labels of enrollment tokens,
//! operators and rules, and reverse-DNS names, put on its nodes. The admin API, the HTTP API and
//! the Neo4j sink all show this one view.

use std::collections::BTreeMap;
use std::time::Duration;

use super::graph::{Graph, NodeKind};
use super::{GraphQuery, Naming, Topology};
use crate::enrollment::{EnrolledAgent, Enrollment};

/// The decorated map for `query`: every host named (as enrolled, else as its Hello said, else
/// its agent id) and flagged with its agent's state, hosts and addresses labelled, external
/// addresses named by reverse DNS when it is on.
pub async fn map(
    topology: &Topology,
    enrollment: &Enrollment,
    naming: &Naming,
    query: GraphQuery,
) -> Graph {
    let mut graph = topology.map(query).await;
    // Labels sit on nodes (on the wire, as `label.KEY` properties): a host's come from its
    // enrollment token and operators, then hostname rules; an address's from CIDR rules.
    let enrolled: BTreeMap<String, EnrolledAgent> = enrollment
        .list_agents()
        .await
        .into_iter()
        .map(|a| (a.id.clone(), a))
        .collect();
    let rules = naming.config_rules.then(&naming.operator_rules.get().1);
    for node in graph.nodes.iter_mut() {
        let labels = match &mut node.kind {
            NodeKind::Host {
                hostname,
                agent_state,
            } => {
                let record = enrolled.get(&node.name);
                // Enrolled under, else as its Hello said, else the agent id.
                let name = record
                    .map(|a| a.hostname.clone())
                    .filter(|h| !h.is_empty())
                    .or_else(|| hostname.take())
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| node.name.clone());
                // connected, degraded or lost: a lost agent is flagged on its Host node, and the
                // flag clears by itself when it comes back.
                if let Some(state) = naming.agents.state(&node.name) {
                    *agent_state = Some(state);
                }
                let mut labels = rules.for_hostname(&name);
                labels.extend(record.map(|a| a.labels.clone()).unwrap_or_default());
                *hostname = Some(name);
                labels
            }
            NodeKind::Address { ip, .. } => rules.for_address(ip),
            NodeKind::Service { .. } => BTreeMap::new(),
        };
        node.labels.extend(labels);
    }
    // External and agentless endpoints by name, when reverse DNS is on.
    let external: Vec<std::net::IpAddr> = graph
        .nodes
        .iter()
        .filter_map(|n| match n.kind {
            NodeKind::Address { ip, .. } => Some(ip),
            _ => None,
        })
        .collect();
    let names = naming.names.lookup(&external, Duration::from_secs(2)).await;
    for node in graph.nodes.iter_mut() {
        if let NodeKind::Address { ip, dns, .. } = &mut node.kind
            && let Some(name) = names.get(ip)
        {
            *dns = Some(name.clone());
        }
    }
    graph
}
