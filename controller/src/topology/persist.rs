//! The map in the state store: each agent's table with the last sequence applied, and each edge
//! with its history. Written through after every group of snapshots, so a restart loses nothing
//! and a crash at most the last second (`task::SYNC_EVERY`); read back once at start. With
//! replicas, an agent's record is also read by the other replicas when it changes, and the edges
//! are written by every replica that applies a table ([`super::follow`]).

use std::collections::BTreeMap;

use redb::{TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use super::model::{AgentTable, Conflict, Edge, EdgeKey, Model};
use crate::store::{Batch, Store, StoreError, Table};

pub(super) const AGENTS: Table = TableDefinition::new("topology_agents");
const EDGES: Table = TableDefinition::new("topology_edges");

/// Persisted per agent: its table and the last sequence applied. Written only by the replica
/// the agent sent that snapshot to; the other replicas read it when told it changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct AgentRecord {
    pub(super) id: String,
    pub(super) sequence: u64,
    pub(super) table: AgentTable,
}

/// An [`AgentRecord`] as written: the table is serialized where the model holds it, not copied.
#[derive(Serialize)]
struct AgentRecordRef<'a> {
    id: &'a str,
    sequence: u64,
    table: &'a AgentTable,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct EdgeRecord {
    id: String,
    pub(super) edge: Edge,
}

/// Whether `table`/`key` of a change another replica made is an agent's table of the map: its
/// id when it is.
pub(super) fn agent_changed<'a>(table: &str, key: &'a str) -> Option<&'a str> {
    (table == AGENTS.name()).then_some(key)
}

/// `agent`'s table and sequence as the store holds them now.
pub(super) fn read_agent(store: &Store, agent: &str) -> Result<Option<AgentRecord>, StoreError> {
    store.get(AGENTS, agent)
}

/// Every agent's table and sequence as the store holds them now.
pub(super) fn read_agents(store: &Store) -> Result<Vec<AgentRecord>, StoreError> {
    store.load(AGENTS)
}

/// Every edge's history as the store holds it now.
pub(super) fn read_edges(store: &Store) -> Result<Vec<EdgeRecord>, StoreError> {
    store.load(EDGES)
}

/// The map as the store held it.
pub(super) struct Restored {
    pub(super) model: Model,
    /// The last sequence applied, per agent.
    pub(super) sequences: BTreeMap<String, u64>,
    /// Addresses two restored tables claim: to announce once the task runs.
    pub(super) conflicts: Vec<Conflict>,
}

/// Reads the map back; a table's last snapshot is never later than `now_ms`.
pub(super) fn load(store: &Store, now_ms: u64) -> Result<Restored, StoreError> {
    let mut model = Model::default();
    for record in store.load::<EdgeRecord>(EDGES)? {
        model.restore_edge(record.edge);
    }
    let mut sequences = BTreeMap::new();
    // Claim order is not stored: the tables come back in agent-id order, so of two hosts
    // claiming an address the first by id owns it now. The conflicts found are announced
    // once the task runs, so a restart does not move an address silently.
    let mut tables = Vec::new();
    for mut record in store.load::<AgentRecord>(AGENTS)? {
        record.table.last_snapshot_ms = record.table.last_snapshot_ms.min(now_ms);
        sequences.insert(record.id.clone(), record.sequence);
        tables.push((record.id, record.table));
    }
    let conflicts = model.restore_tables(tables);
    Ok(Restored {
        model,
        sequences,
        conflicts,
    })
}

/// The writes that bring the store to what `model` holds for `agents` and `edges`: an edge the
/// model no longer has is deleted.
pub(super) fn batch<'a>(
    model: &Model,
    sequences: &BTreeMap<String, u64>,
    agents: impl IntoIterator<Item = &'a String>,
    edges: impl IntoIterator<Item = &'a EdgeKey>,
) -> Result<Batch, StoreError> {
    let mut batch = Batch::default();
    for agent in agents {
        if let Some(table) = model.agents.get(agent) {
            let record = AgentRecordRef {
                id: agent,
                sequence: sequences.get(agent).copied().unwrap_or(0),
                table,
            };
            batch.put(AGENTS, agent, &record)?;
        }
    }
    for key in edges {
        let id = key.id();
        match model.edges.get(key) {
            Some(edge) => batch.put(
                EDGES,
                &id,
                &EdgeRecord {
                    id: id.clone(),
                    edge: edge.clone(),
                },
            )?,
            None => batch.delete(EDGES, &id),
        }
    }
    Ok(batch)
}

/// Maps with structured keys, stored as lists of pairs (JSON object keys must be strings).
pub(super) mod pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        map: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}
