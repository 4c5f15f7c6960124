//! Every statement the sink sends, and the parameters they take. Values travel as parameters
//! only; labels and relationship types come from [`Label::name`] and [`Kind::name`], never from
//! data. Each write statement `UNWIND`s a batch of rows passed as `$rows`.

use std::collections::HashMap;

use neo4rs::BoltType;

use super::rows::{Kind, Label, NodeRow, Props, RelRow, Value};

/// Nodes are `MERGE`d on this id, so it must be unique per label.
pub(super) fn create_constraint(label: Label) -> String {
    let name = label.name();
    format!(
        "CREATE CONSTRAINT tapgraph_{}_id IF NOT EXISTS FOR (n:{name}) REQUIRE n.id IS UNIQUE",
        name.to_lowercase()
    )
}

/// Cypher cannot constrain a relationship property portably: an index finds one by its id.
pub(super) fn create_index(kind: Kind) -> String {
    let name = kind.name();
    format!(
        "CREATE INDEX tapgraph_{}_id IF NOT EXISTS FOR ()-[r:{name}]-() ON (r.id)",
        name.to_lowercase()
    )
}

/// Every id of a label, as `id`.
pub(super) fn read_node_ids(label: Label) -> String {
    format!("MATCH (n:{}) RETURN n.id AS id", label.name())
}

/// Every id of a relationship type, as `id`, copies included.
pub(super) fn read_rel_ids(kind: Kind) -> String {
    format!("MATCH ()-[r:{}]->() RETURN r.id AS id", kind.name())
}

/// Of each id in `$rows`, all relationships but one go.
pub(super) fn delete_copies(kind: Kind) -> String {
    format!(
        "UNWIND $rows AS id MATCH ()-[r:{} {{id: id}}]->() WITH id, collect(r) AS copies \
         UNWIND copies[1..] AS extra DELETE extra",
        kind.name()
    )
}

/// Rows of [`node_rows`]: a node created or overwritten.
pub(super) fn upsert_nodes(label: Label) -> String {
    format!(
        "UNWIND $rows AS row MERGE (n:{} {{id: row.id}}) SET n = row.props",
        label.name()
    )
}

/// Rows of [`known_rel_rows`]: a relationship the database holds, found through the index on
/// its id and overwritten.
pub(super) fn update_rels(kind: Kind) -> String {
    format!(
        "UNWIND $rows AS row MATCH ()-[r:{} {{id: row.id}}]->() SET r = row.props",
        kind.name()
    )
}

/// Rows of [`new_rel_rows`]: relationships the database lacks, `CREATE`d rather than `MERGE`d,
/// which would compare each with every relationship of its start node (a hub's thousands). By
/// start node: a hub's node is looked up once per batch, not once per edge.
pub(super) fn create_rels(kind: Kind, from: Label, to: Label) -> String {
    format!(
        "UNWIND $rows AS g MATCH (a:{} {{id: g.from}}) UNWIND g.rows AS row \
         MATCH (b:{} {{id: row.to}}) CREATE (a)-[r:{}]->(b) SET r = row.props",
        from.name(),
        to.name(),
        kind.name()
    )
}

/// Rows of [`id_rows`].
pub(super) fn delete_rels(kind: Kind) -> String {
    format!(
        "UNWIND $rows AS id MATCH ()-[r:{} {{id: id}}]->() DELETE r",
        kind.name()
    )
}

/// Rows of [`id_rows`]; a node's relationships go with it.
pub(super) fn delete_nodes(label: Label) -> String {
    format!(
        "UNWIND $rows AS id MATCH (n:{} {{id: id}}) DETACH DELETE n",
        label.name()
    )
}

impl From<&Value> for BoltType {
    fn from(v: &Value) -> BoltType {
        match v {
            Value::Str(s) => s.as_str().into(),
            Value::Int(i) => (*i).into(),
            Value::Bool(b) => (*b).into(),
        }
    }
}

fn props_bolt(props: &Props) -> BoltType {
    let map: HashMap<String, BoltType> = props
        .iter()
        .map(|(k, v)| (k.clone(), BoltType::from(v)))
        .collect();
    map.into()
}

/// `{id, props}` per node.
pub(super) fn node_rows(chunk: &[(u64, &NodeRow)]) -> Vec<BoltType> {
    chunk
        .iter()
        .map(|(_, n)| {
            let mut m: HashMap<String, BoltType> = HashMap::new();
            m.insert("id".into(), n.id.as_str().into());
            m.insert("props".into(), props_bolt(&n.props));
            m.into()
        })
        .collect()
}

/// `{id, props}` per relationship.
pub(super) fn known_rel_rows(chunk: &[&RelRow]) -> Vec<BoltType> {
    chunk
        .iter()
        .map(|r| {
            let mut m: HashMap<String, BoltType> = HashMap::new();
            m.insert("id".into(), r.id.as_str().into());
            m.insert("props".into(), props_bolt(&r.props));
            m.into()
        })
        .collect()
}

/// `{from, rows: [{to, props}]}` per run of relationships with the same start node.
pub(super) fn new_rel_rows(chunk: &[&RelRow]) -> Vec<BoltType> {
    chunk
        .chunk_by(|a, b| a.from.1 == b.from.1)
        .map(|group| {
            let rows: Vec<BoltType> = group
                .iter()
                .map(|r| {
                    let mut m: HashMap<String, BoltType> = HashMap::new();
                    m.insert("to".into(), r.to.1.as_str().into());
                    m.insert("props".into(), props_bolt(&r.props));
                    m.into()
                })
                .collect();
            let mut g: HashMap<String, BoltType> = HashMap::new();
            g.insert("from".into(), group[0].from.1.as_str().into());
            g.insert("rows".into(), rows.into());
            g.into()
        })
        .collect()
}

/// One id per row.
pub(super) fn id_rows(chunk: &[impl AsRef<str>]) -> Vec<BoltType> {
    chunk.iter().map(|id| id.as_ref().into()).collect()
}
