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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::sinks::neo4j::rows::desired;
    use crate::topology::graph::{Edge, EdgeKind, Graph, Node, NodeKind};

    fn host(id: &str) -> Node {
        Node {
            id: id.into(),
            name: id.into(),
            kind: NodeKind::Host {
                hostname: None,
                agent_state: None,
            },
            labels: BTreeMap::new(),
        }
    }

    fn connects(from: &str, to: &str, sockets: u32) -> Edge {
        Edge {
            from: from.into(),
            to: to.into(),
            kind: EdgeKind::ConnectsTo,
            port: 80,
            protocol: None,
            process: String::new(),
            sockets,
            first_seen_ms: 0,
            last_seen_ms: 0,
            active: true,
            control_plane: false,
            via: String::new(),
            traffic: None,
            process_note: String::new(),
        }
    }

    #[test]
    fn only_what_differs_is_written_and_only_what_is_gone_deleted() {
        let graph = Graph {
            nodes: vec![host("host:a"), host("host:b"), host("host:c")],
            edges: vec![
                connects("host:a", "host:b", 1),
                connects("host:b", "host:c", 1),
                connects("host:c", "host:a", 1),
                connects("host:a", "host:c", 1),
            ],
        };
        let want = desired(&graph, Duration::from_secs(60));
        let node_hash = |id: &str| want.nodes[id].0;
        let rel_hash = |id: &str| want.rels[id].0;
        let (ab, bc, ca) = (
            "CONNECTS_TO|host:a|host:b|80/",
            "CONNECTS_TO|host:b|host:c|80/",
            "CONNECTS_TO|host:c|host:a|80/",
        );
        let mut held = Held::default();
        // a as written; b read back (contents unknown); c missing; z gone from the map.
        held.nodes
            .insert("host:a".into(), (Label::Host, node_hash("host:a")));
        held.nodes.insert("host:b".into(), (Label::Host, 0));
        held.nodes.insert("host:z".into(), (Label::Address, 7));
        // ab as written; bc written differently; ca and ac missing; one gone.
        held.rels
            .insert(ab.into(), (Kind::ConnectsTo, rel_hash(ab)));
        held.rels
            .insert(bc.into(), (Kind::ConnectsTo, rel_hash(bc) ^ 2));
        held.rels.insert("gone".into(), (Kind::Listens, 5));

        let changes = Changes::between(&want, &held);
        let mut nodes: Vec<&str> = changes
            .node_upserts
            .iter()
            .map(|(_, n)| n.id.as_str())
            .collect();
        nodes.sort_unstable();
        assert_eq!(nodes, ["host:b", "host:c"]);
        for (hash, n) in &changes.node_upserts {
            assert_eq!(
                *hash,
                node_hash(&n.id),
                "written with the hash it will hold"
            );
        }
        let rels: Vec<&str> = changes.rel_upserts.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            rels,
            ["CONNECTS_TO|host:a|host:c|80/", bc, ca],
            "in id order"
        );
        assert_eq!(changes.rel_deletes, [("gone".to_string(), Kind::Listens)]);
        assert_eq!(
            changes.node_deletes,
            [("host:z".to_string(), Label::Address)]
        );
        assert_eq!(changes.rows(), 2 + 3 + 1 + 1);
    }

    #[test]
    fn a_database_equal_to_the_map_needs_nothing() {
        let graph = Graph {
            nodes: vec![host("host:a"), host("host:b")],
            edges: vec![connects("host:a", "host:b", 3)],
        };
        let want = desired(&graph, Duration::from_secs(60));
        let mut held = Held::default();
        for (id, (hash, row)) in &want.nodes {
            held.nodes.insert(id.to_string(), (row.label, *hash));
        }
        for (id, (hash, kind, _)) in &want.rels {
            held.rels.insert(id.clone(), (*kind, *hash));
        }
        let changes = Changes::between(&want, &held);
        assert_eq!(changes.rows(), 0, "{changes:?}");
    }
}
