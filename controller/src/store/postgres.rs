//! The shared backend: one PostgreSQL database for every replica of the controller.
//!
//! Each logical table is an SQL table in the schema `tapgraph` (`key text`, `value json`,
//! `updated_at`), so operators can read it with `psql`. The schema is versioned
//! (`tapgraph.schema_migrations`) and brought up to date at start under an advisory lock, so
//! replicas starting at once apply each migration exactly once.
//!
//! A trigger announces every written row on the channel `tapgraph_changes`, with the writing
//! replica's name (its session's `application_name`). Each replica listens on a session of its own
//! and passes on the changes of the others. Notifications are not replayed: after every
//! (re)connection of that session it announces [`Change::Resync`], and its subscribers read their
//! tables again. The map's edges are not announced: each replica derives them from the agents'
//! tables, which are; nor is the live state (presence, leases, mirror counters), read on demand.
//!
//! The schema and its migrations are in `schema.rs`, the listener in `listen.rs`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use redb::TableHandle;
use tokio::sync::broadcast;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::jsonb::{JsonText, Jsonb};
use super::schema;
use super::{Batch, Change, StoreError, Table, same_value};

/// The notification channel.
pub(super) const CHANNEL: &str = "tapgraph_changes";
/// The channel operators' events travel on between replicas ([`Postgres::share_event`]).
pub const EVENTS: &str = "tapgraph_events";
/// The largest event payload sent: PostgreSQL refuses notifications of 8,000 bytes or more.
pub const EVENT_MAX_BYTES: usize = 7_900;
/// Sessions in the pool at most (the listener has one more of its own).
const POOL_SIZE: usize = 8;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `store.postgres.*`.
#[derive(Clone, Debug, PartialEq)]
pub struct PostgresSettings {
    /// libpq form: `postgres://USER@HOST:PORT/DB?sslmode=…` (`sslrootcert=FILE` names the CA).
    pub url: String,
    /// The password, read at start; a password in the URL is used when there is no file.
    pub password_file: Option<PathBuf>,
}

impl PostgresSettings {
    /// Checks `url` as the driver will read it, so a typo is a configuration error at start.
    pub fn check(&self) -> Result<(), String> {
        parse_url(&self.url).map(|_| ())
    }
}

/// What the URL says once the parts the driver does not read are taken out.
struct Parsed {
    config: tokio_postgres::Config,
    /// `sslrootcert`: the CA the server's certificate must chain to (else the system's roots).
    root_cert: Option<PathBuf>,
}

fn parse_url(url: &str) -> Result<Parsed, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!(
            "`{}` is not a postgres:// URL (postgres://USER@HOST:PORT/DB?sslmode=…)",
            redact(url)
        ));
    }
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let mut root_cert = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "sslrootcert" => root_cert = Some(PathBuf::from(v)),
            // The server's certificate is always verified (chain and name) when TLS is used, so
            // these read as `require`.
            "sslmode" if v == "verify-ca" || v == "verify-full" => {
                kept.push("sslmode=require".into())
            }
            "sslmode" if !matches!(v, "disable" | "prefer" | "require") => {
                return Err(format!(
                    "sslmode `{v}` is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
            _ => kept.push(pair.to_string()),
        }
    }
    let rebuilt = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let config: tokio_postgres::Config = rebuilt
        .parse()
        .map_err(|e| format!("`{}`: {e}", redact(url)))?;
    if config.get_hosts().is_empty() {
        return Err(format!("`{}` names no host", redact(url)));
    }
    if config.get_dbname().is_none() {
        return Err(format!("`{}` names no database (…/DB)", redact(url)));
    }
    Ok(Parsed { config, root_cert })
}

/// The URL without a password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// "HOST:PORT/DB", for messages.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("?"))
}

fn tls(root_cert: Option<&PathBuf>) -> Result<MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                StoreError::Failed(format!(
                    "store.postgres.url sslrootcert {}: {e}",
                    path.display()
                ))
            })?;
            for cert in rustls_pemfile_certs(&pem) {
                roots.add(cert).map_err(|e| {
                    StoreError::Failed(format!("sslrootcert {}: {e}", path.display()))
                })?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(tapgraph::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Failed(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

/// The runtime this store's sessions live on: threads of its own, apart from the caller's.
///
/// The synchronous store API waits for a database call from inside the caller's runtime
/// (`block_in_place`). If that runtime is shutting down meanwhile (a process or a test ending),
/// it may never run the call, nor drop it: tokio cannot hand the waiting worker's other tasks to
/// a new thread once its blocking pool is closing. With the calls, the pool's connections and
/// the listener on a runtime of their own, a call in flight finishes (or fails) whatever the
/// caller's runtime does, and nothing waits forever. Shut down, without waiting, when the store
/// is dropped.
struct Io(Option<tokio::runtime::Runtime>);

impl Io {
    fn new() -> Result<Self, StoreError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(IO_THREADS)
            .thread_name("tapgraph-store")
            .enable_all()
            .build()
            .map(|rt| Io(Some(rt)))
            .map_err(|e| StoreError::Failed(format!("cannot start the store's runtime: {e}")))
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(tokio::runtime::Runtime::handle)
    }

    /// Runs `f` on the store's runtime and waits for it (asynchronously).
    async fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let handle = self.handle().ok_or_else(closed)?;
        handle.spawn(f).await.map_err(|_| closed())?
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// The error of a call the store's runtime did not finish: it is shutting down.
pub(super) fn closed() -> StoreError {
    StoreError::Failed("the state store is shutting down".into())
}

/// The store's own threads: database I/O, and encoding what is sent and received.
const IO_THREADS: usize = 2;

pub struct Postgres {
    pool: Pool,
    /// Other replicas' events, as (replica, payload) ([`Postgres::share_event`]).
    events: broadcast::Sender<(String, String)>,
    /// "HOST:PORT/DB".
    database: String,
    /// Why the database cannot be used now, while it cannot; logged once per outage.
    down: Arc<Mutex<Option<String>>>,
    listener: tokio::task::JoinHandle<()>,
    /// How to open a session of its own, for [`Postgres::leadership`].
    session: (tokio_postgres::Config, MakeRustlsConnect),
    /// Last: dropped after the pool and the listener.
    io: Io,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl Postgres {
    /// Connects, brings the schema up to date and starts listening for other replicas' changes.
    pub async fn connect(
        settings: &PostgresSettings,
        replica: &str,
        changes: broadcast::Sender<Change>,
    ) -> Result<Self, StoreError> {
        let io = Io::new()?;
        let (settings, replica) = (settings.clone(), replica.to_string());
        let mut connected = io
            .run(async move { Self::open(&settings, &replica, changes).await })
            .await?;
        connected.io = io;
        Ok(connected)
    }

    /// `connect`, on the store's runtime (its `io` is set by the caller).
    async fn open(
        settings: &PostgresSettings,
        replica: &str,
        changes: broadcast::Sender<Change>,
    ) -> Result<Self, StoreError> {
        let Parsed {
            mut config,
            root_cert,
        } = parse_url(&settings.url).map_err(StoreError::Failed)?;
        if let Some(file) = &settings.password_file {
            let password = std::fs::read_to_string(file).map_err(|e| {
                StoreError::Failed(format!(
                    "store.postgres.password_file {}: {e}",
                    file.display()
                ))
            })?;
            config.password(password.trim_end_matches(['\r', '\n']));
        }
        config
            .application_name(replica)
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .tcp_user_timeout(Duration::from_secs(10));
        let database = describe(&config);
        let tls = tls(root_cert.as_ref())?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Failed(e.to_string()))?;
        let down = Arc::new(Mutex::new(None));
        {
            // A refusal by the server (a wrong password, no such database) is a failure to fix;
            // anything else (refused, timed out, a certificate not trusted) says the database
            // cannot be reached, with the cause.
            let mut client = pool.get().await.map_err(|e| match DbError::from(e) {
                DbError::Sql(m) => StoreError::Failed(format!("{database}: {m}")),
                DbError::Unreachable(reason) => StoreError::Unavailable {
                    database: database.clone(),
                    reason,
                },
            })?;
            super::schema::migrate(&mut client, &database).await?;
        }
        let session = (config.clone(), tls.clone());
        let (events, _) = broadcast::channel(1024);
        let listener = tokio::spawn(super::listen::listen(
            config,
            tls,
            replica.to_string(),
            (changes, events.clone()),
            database.clone(),
            down.clone(),
        ));
        Ok(Postgres {
            pool,
            events,
            database,
            down,
            listener,
            session,
            io: Io(None),
        })
    }

    /// Whether this replica leads `role`, from now until the receiver is dropped: a session of
    /// its own holds or tries for the role's advisory lock (see [`super::leader`]).
    pub fn leadership(&self, role: &str) -> tokio::sync::watch::Receiver<bool> {
        let (leading, rx) = tokio::sync::watch::channel(false);
        let (config, tls) = self.session.clone();
        if let Some(io) = self.io.handle() {
            io.spawn(super::leader::hold(
                config,
                tls,
                role.to_string(),
                self.database.clone(),
                leading,
            ));
        }
        rx
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Sends `payload` (an event, as JSON naming this replica) to the other replicas. At most
    /// [`EVENT_MAX_BYTES`]; best effort, as events are: not stored, not replayed.
    pub async fn share_event(&self, payload: &str) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute("SELECT pg_notify($1, $2)", &[&EVENTS, &payload])
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Other replicas' events from now on, as (replica, payload).
    pub fn remote_events(&self) -> broadcast::Receiver<(String, String)> {
        self.events.subscribe()
    }

    /// The runtime the store's calls run on; `None` once it is shut down.
    pub(super) fn io(&self) -> Option<&tokio::runtime::Handle> {
        self.io.handle()
    }

    pub fn unavailable(&self) -> Option<String> {
        self.down.lock().ok().and_then(|d| d.clone())
    }

    /// Classifies a driver error: the server's own refusal (an SQL state) is a failure; anything
    /// else (refused, reset, timed out) means the database cannot be reached now.
    fn error(&self, e: impl Into<DbError>) -> StoreError {
        match e.into() {
            DbError::Sql(msg) => StoreError::Failed(format!("{}: {msg}", self.database)),
            DbError::Unreachable(reason) => {
                if let Ok(mut down) = self.down.lock()
                    && down.is_none()
                {
                    tracing::error!(database = %self.database, %reason, "the database is unavailable: writes are refused until it is back");
                    *down = Some(reason.clone());
                }
                StoreError::Unavailable {
                    database: self.database.clone(),
                    reason,
                }
            }
        }
    }

    /// A call got through: the database is back, if it was down.
    fn reachable(&self) {
        if let Ok(mut down) = self.down.lock()
            && down.take().is_some()
        {
            tracing::info!(database = %self.database, "the database is available again");
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(|e| self.error(e))
    }

    pub async fn load(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let name = sql_table(table)?;
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT key, value FROM tapgraph.{name} ORDER BY key COLLATE \"C\""),
                &[],
            )
            .await
            .map_err(|e| self.error(e))?;
        self.reachable();
        rows.iter()
            .map(|row| {
                let key: String = row.try_get(0).map_err(super::failed)?;
                let JsonText(value) = row.try_get(1).map_err(super::failed)?;
                Ok((key, value))
            })
            .collect()
    }

    pub async fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let name = sql_table(table)?;
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT value FROM tapgraph.{name} WHERE key = $1"),
                &[&key],
            )
            .await
            .map_err(|e| self.error(e))?;
        self.reachable();
        row.map(|r| r.try_get(0).map(|JsonText(value)| value))
            .transpose()
            .map_err(super::failed)
    }

    /// Applies `batch` in one transaction; `durable: false` does not wait for the WAL flush
    /// (`synchronous_commit = off`), the next durable commit covers it.
    pub async fn commit(&self, batch: &Batch, durable: bool) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.error(e))?;
        if !durable {
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .await
                .map_err(|e| self.error(e))?;
        }
        self.check_expected(&tx, batch).await?;
        for (name, puts, deletes) in grouped(batch)? {
            if !deletes.is_empty() {
                tx.execute(
                    &format!("DELETE FROM tapgraph.{name} WHERE key = ANY($1)"),
                    &[&deletes],
                )
                .await
                .map_err(|e| self.error(e))?;
            }
            if !puts.is_empty() {
                let (keys, values): (Vec<&str>, Vec<Jsonb>) = puts.into_iter().unzip();
                tx.execute(
                    &format!(
                        "INSERT INTO tapgraph.{name} (key, value) \
                         SELECT * FROM unnest($1::text[], $2::json[]) \
                         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()"
                    ),
                    &[&keys, &values],
                )
                .await
                .map_err(|e| self.error(e))?;
            }
        }
        tx.commit().await.map_err(|e| self.error(e))?;
        self.reachable();
        Ok(())
    }

    /// Refuses the transaction ([`StoreError::Conflict`]) unless every row `batch` expects holds
    /// what it expects. The rows may not exist yet: their keys are locked, not the rows, so two
    /// replicas expecting "absent" cannot both insert. All the keys are locked in one statement,
    /// in one order for every transaction (no deadlock), and read in one per table: a presence
    /// round expecting 2,000 rows is three statements, not 4,000.
    async fn check_expected(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        batch: &Batch,
    ) -> Result<(), StoreError> {
        if batch.expected.is_empty() {
            return Ok(());
        }
        let mut expected = Vec::with_capacity(batch.expected.len());
        for (table, key, value) in &batch.expected {
            expected.push((sql_table(*table)?, key.as_str(), value.as_deref(), *table));
        }
        expected.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let locks: Vec<String> = expected
            .iter()
            .map(|(n, k, ..)| format!("{n}/{k}"))
            .collect();
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest($1::text[]) AS k",
            &[&locks],
        )
        .await
        .map_err(|e| self.error(e))?;
        for group in expected.chunk_by(|a, b| a.0 == b.0) {
            let name = group[0].0;
            let keys: Vec<&str> = group.iter().map(|(_, k, ..)| *k).collect();
            let mut current = std::collections::HashMap::with_capacity(keys.len());
            for row in tx
                .query(
                    &format!("SELECT key, value FROM tapgraph.{name} WHERE key = ANY($1)"),
                    &[&keys],
                )
                .await
                .map_err(|e| self.error(e))?
            {
                let key: String = row.try_get(0).map_err(super::failed)?;
                let JsonText(value) = row.try_get(1).map_err(super::failed)?;
                current.insert(key, value);
            }
            for (_, key, value, table) in group {
                if !same_value(current.get(*key).map(Vec::as_slice), *value) {
                    return Err(StoreError::Conflict {
                        table: table.name().to_string(),
                        key: key.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Deferred commits (`synchronous_commit = off`) are made durable by the server's WAL
    /// writer within three `wal_writer_delay`s (600 ms by default), and by any durable commit
    /// after them: nothing to do here, and the "at most the last second" promise holds.
    pub async fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The batch's changes per table, the last change of a key winning (as in sequence within one
/// transaction): puts as (key, value) and deletes as keys.
#[allow(clippy::type_complexity)]
fn grouped(
    batch: &Batch,
) -> Result<Vec<(&'static str, Vec<(&str, Jsonb<'_>)>, Vec<&str>)>, StoreError> {
    use std::collections::BTreeMap;
    let mut last: BTreeMap<(&'static str, &str), Option<&[u8]>> = BTreeMap::new();
    for (table, key, value) in &batch.changes {
        last.insert((sql_table(*table)?, key.as_str()), value.as_deref());
    }
    let mut out: Vec<(&'static str, Vec<(&str, Jsonb<'_>)>, Vec<&str>)> = Vec::new();
    for ((name, key), value) in last {
        if out.last().is_none_or(|(n, _, _)| *n != name) {
            out.push((name, Vec::new(), Vec::new()));
        }
        let Some((_, puts, deletes)) = out.last_mut() else {
            continue;
        };
        match value {
            Some(bytes) => puts.push((key, Jsonb(bytes))),
            None => deletes.push(key),
        }
    }
    Ok(out)
}

/// The SQL table for `table`, which must be one the schema has.
fn sql_table(table: Table) -> Result<&'static str, StoreError> {
    schema::tables()
        .find(|t| *t == table.name())
        .ok_or_else(|| {
            StoreError::Failed(format!(
                "table {} is not in the database schema (a migration is missing)",
                table.name()
            ))
        })
}

/// A driver error, classified.
pub(super) enum DbError {
    Sql(String),
    Unreachable(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => DbError::Sql(format!("{} ({})", db.message(), db.code().code())),
            None => DbError::Unreachable(tapgraph::error_chain(&e)),
        }
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => DbError::Unreachable(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_kept_out_of_messages() {
        assert!(parse_url("postgres://tapgraph@127.0.0.1:5432/tapgraph?sslmode=disable").is_ok());
        assert!(parse_url("postgresql://u@db.example/tg?sslmode=verify-full").is_ok());
        let p = parse_url("postgres://u@h/db?sslmode=require&sslrootcert=/etc/ca.pem").unwrap();
        assert_eq!(p.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        let e = parse_url("mysql://u@h/db").err().unwrap();
        assert!(e.contains("not a postgres:// URL"), "{e}");
        let e = parse_url("postgres://u:hunter2@h/db?sslmode=sometimes")
            .err()
            .unwrap();
        assert!(e.contains("sslmode `sometimes`"), "{e}");
        let e = parse_url("postgres://u:hunter2@h:5432").err().unwrap();
        assert!(e.contains("no database"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn a_batch_groups_by_table_and_the_last_change_of_a_key_wins() {
        const A: Table = redb::TableDefinition::new("tokens");
        const B: Table = redb::TableDefinition::new("agents");
        let mut b = Batch::default();
        b.put(A, "x", &1).unwrap();
        b.put(B, "y", &2).unwrap();
        b.delete(A, "x");
        b.put(A, "z", &3).unwrap();
        let g = grouped(&b).unwrap();
        assert_eq!(g.len(), 2);
        let (name, puts, deletes) = &g[1];
        assert_eq!(*name, "tokens");
        assert_eq!(puts.len(), 1);
        assert_eq!((puts[0].0, puts[0].1.0), ("z", &b"3"[..]));
        assert_eq!(deletes, &["x"]);
    }

    #[test]
    fn a_table_without_a_migration_is_refused_by_name() {
        const X: Table = redb::TableDefinition::new("nonsense");
        let e = sql_table(X).err().unwrap().to_string();
        assert!(e.contains("nonsense") && e.contains("migration"), "{e}");
    }
}
