//! The database schema: its tables, the trigger that announces their changes, and the versioned
//! migrations every replica applies at start, one at a time under an advisory lock.

use super::StoreError;
use super::postgres::DbError;

/// The tables migration 1 made and migration 2 changed: released, so never edited.
const TABLES_V1: &[&str] = &[
    "tokens",
    "agents",
    "console_tokens",
    "policies",
    "policy_meta",
    "label_rules",
    "topology_agents",
    "topology_edges",
    "presence",
    "replicas",
    "mirrors",
    "pki",
];

/// The tables migration 3 added.
const TABLES_V3: &[&str] = &["topology_history"];

/// The tables the schema has. A table the code names that is not here is a missing migration.
pub fn tables() -> impl Iterator<Item = &'static str> {
    TABLES_V1.iter().chain(TABLES_V3).copied()
}

/// Versioned migrations, applied in order, each once, each in its own transaction. A migration
/// that was released is never edited: a database made by it is brought forward by the next.
const MIGRATIONS: &[(i32, Migration)] = &[(1, migration_1), (2, migration_2), (3, migration_3)];

/// A migration's SQL, run in one transaction.
type Migration = fn() -> String;

/// The tables, as `jsonb`, and the trigger that announces their changes.
pub(super) fn migration_1() -> String {
    let mut sql = NOTIFY_CHANGE.to_string();
    for name in TABLES_V1 {
        sql.push_str(&table_sql(name));
    }
    sql
}

/// Values become `json`: the text as written, checked but not converted. `jsonb` cannot hold a
/// NUL character (`\u0000`), which an agent may well report (a process name, a hostname), and
/// its conversion both ways is work nothing here needs: no query looks inside a value.
fn migration_2() -> String {
    TABLES_V1
        .iter()
        .map(|name| {
            format!("ALTER TABLE tapgraph.{name} ALTER COLUMN value TYPE json USING value::json;")
        })
        .collect()
}

/// The map's history (`topology::history`). Not announced: it is read when an operator asks,
/// and written by one replica.
fn migration_3() -> String {
    TABLES_V3
        .iter()
        .map(|name| {
            format!(
                "CREATE TABLE tapgraph.{name} (key text PRIMARY KEY, value json NOT NULL, \
                 updated_at timestamptz NOT NULL DEFAULT now());"
            )
        })
        .collect()
}

const NOTIFY_CHANGE: &str = r#"
CREATE FUNCTION tapgraph.notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('tapgraph_changes', json_build_object(
    'r', current_setting('application_name'),
    't', TG_TABLE_NAME,
    'k', CASE TG_OP WHEN 'DELETE' THEN OLD.key ELSE NEW.key END)::text);
  RETURN NULL;
END $$;
"#;

/// The advisory lock that serialises migrations ("tapgraph" in ASCII).
const MIGRATION_LOCK: i64 = 0x7461_7067_7261_7068;

/// Brings the schema to the newest version this controller knows, under an advisory lock held
/// by this session: replicas starting at once wait for each other, and each migration applies
/// once. A database newer than this controller is refused.
pub(super) async fn migrate(
    client: &mut deadpool_postgres::Object,
    database: &str,
) -> Result<(), StoreError> {
    let sql = |e: tokio_postgres::Error| match DbError::from(e) {
        DbError::Sql(m) => StoreError::Failed(format!("{database}: schema migration: {m}")),
        DbError::Unreachable(reason) => StoreError::Unavailable {
            database: database.to_string(),
            reason,
        },
    };
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(sql)?;
    let result = async {
        client
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS tapgraph; \
                 CREATE TABLE IF NOT EXISTS tapgraph.schema_migrations ( \
                   version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .map_err(sql)?;
        let have: i32 = client
            .query_one(
                "SELECT coalesce(max(version), 0) FROM tapgraph.schema_migrations",
                &[],
            )
            .await
            .map_err(sql)?
            .get(0);
        let newest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if have > newest {
            return Err(StoreError::Failed(format!(
                "{database}: the schema is at version {have}, newer than this controller knows \
                 ({newest}): upgrade this controller"
            )));
        }
        for (version, body) in MIGRATIONS.iter().filter(|(v, _)| *v > have) {
            let tx = client.transaction().await.map_err(sql)?;
            tx.batch_execute(&body()).await.map_err(sql)?;
            tx.execute(
                "INSERT INTO tapgraph.schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(sql)?;
            tx.commit().await.map_err(sql)?;
            tracing::info!(%database, version, "schema migration applied");
        }
        Ok(())
    }
    .await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlocked.map_err(sql)?;
    Ok(())
}

/// Tables whose writes are not announced: the map's edges (each replica derives them from the
/// agents' tables, which are announced), and the live state every replica rewrites all the time
/// and reads only when asked (presence, leases, mirror counters). Announcing those would flood
/// every replica's change feed (a failover rewrites a row per agent) and push them into full
/// reloads for nothing.
const QUIET: &[&str] = &["topology_edges", "presence", "replicas", "mirrors"];

/// One logical table: its rows, and (but for the [`QUIET`] ones) the trigger that announces them.
fn table_sql(name: &str) -> String {
    let mut sql = format!(
        "CREATE TABLE tapgraph.{name} (key text PRIMARY KEY, value jsonb NOT NULL, \
         updated_at timestamptz NOT NULL DEFAULT now());"
    );
    if !QUIET.contains(&name) {
        sql.push_str(&format!(
            " CREATE TRIGGER {name}_changed AFTER INSERT OR UPDATE OR DELETE ON tapgraph.{name} \
             FOR EACH ROW EXECUTE FUNCTION tapgraph.notify_change();"
        ));
    }
    sql
}
