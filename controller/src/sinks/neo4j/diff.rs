//! The difference between what the database should hold and what it holds, as the sink knows it.

use std::collections::HashMap;

use super::rows::{Desired, Kind, Label, NodeRow, RelRow, rel_row};

/// What the sink knows the database holds: for each id, its label or type and the hash of what
/// the sink last wrote there (0 for what it read back, contents unknown).
#[derive(Debug, Default)]
pub(super) struct Held {
    pub(super) nodes: HashMap<String, (Label, u64)>,
    pub(super) rels: HashMap<String, (Kind, u64)>,
}

/// What one pass writes, in the order it writes it.
#[derive(Debug)]
pub(super) struct Changes<'w> {
    /// Nodes missing or different, with the hash of what they will hold.
    pub(super) node_upserts: Vec<(u64, &'w NodeRow)>,
    /// Relationships missing or different, in id order, which groups a start node's
    /// relationships together for the database.
    pub(super) rel_upserts: Vec<RelRow>,
    /// Relationships the map no longer has.
    pub(super) rel_deletes: Vec<(String, Kind)>,
    /// Nodes the map no longer has.
    pub(super) node_deletes: Vec<(String, Label)>,
}

impl<'w> Changes<'w> {
    pub(super) fn between(want: &'w Desired<'_>, held: &Held) -> Changes<'w> {
        let node_upserts: Vec<(u64, &NodeRow)> = want
            .nodes
            .values()
            .filter(|(h, n)| held.nodes.get(&n.id).map(|&(_, have)| have) != Some(*h))
            .map(|(h, n)| (*h, n))
            .collect();
        let mut rel_upserts: Vec<RelRow> = want
            .rels
            .iter()
            .filter(|(id, (h, ..))| held.rels.get(*id).map(|&(_, have)| have) != Some(*h))
            .map(|(id, &(h, kind, e))| rel_row(want, id, h, kind, e))
            .collect();
        rel_upserts.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        let rel_deletes: Vec<(String, Kind)> = held
            .rels
            .iter()
            .filter(|(id, _)| !want.rels.contains_key(*id))
            .map(|(id, &(kind, _))| (id.clone(), kind))
            .collect();
        let node_deletes: Vec<(String, Label)> = held
            .nodes
            .iter()
            .filter(|(id, _)| !want.nodes.contains_key(id.as_str()))
            .map(|(id, &(label, _))| (id.clone(), label))
            .collect();
        Changes {
            node_upserts,
            rel_upserts,
            rel_deletes,
            node_deletes,
        }
    }

    /// How many rows, written or deleted, in all.
    pub(super) fn rows(&self) -> usize {
        self.node_upserts.len()
            + self.rel_upserts.len()
            + self.rel_deletes.len()
            + self.node_deletes.len()
    }
}
