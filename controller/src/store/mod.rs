//! The controller's state store: tables of JSON values under string keys, written by batches that
//! apply whole or not at all. Two backends behind one handle:
//! - **embedded** (the default): one redb file in the state directory, for a single controller;
//! - **postgres**: one PostgreSQL database shared by every replica of the controller
//!   (`store.backend = "postgres"`), with each change announced to the other replicas.
//!
//! Tasks that own state load it at start and write through on change. Every change is durable when
//! `commit` returns, except the map's (`commit_deferred`), which the next durable commit (within a
//! second) makes durable. A batch can carry preconditions ([`Batch::expect`]): the values it was
//! computed from. If another replica changed one of them meanwhile the commit is refused with
//! [`StoreError::Conflict`] and changes nothing, so that, say, two replicas racing for the last use
//! of a join token give exactly one winner.
//!
//! The handle's calls are synchronous, as redb's are: they run with `block_in_place` and need the
//! multi-threaded runtime.

pub mod embedded;
mod jsonb;
pub mod leader;
mod listen;
pub mod migrate;
pub mod postgres;
mod schema;
#[cfg(test)]
pub(crate) mod suite;
#[cfg(test)]
pub(crate) mod testpg;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::TableHandle;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;

/// A table: its name is the only part the PostgreSQL backend reads.
pub type Table = redb::TableDefinition<'static, &'static str, &'static [u8]>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store refused or failed the operation.
    #[error("state store: {0}")]
    Failed(String),
    /// The shared database cannot be reached: nothing was written. Callers answer UNAVAILABLE.
    #[error("the database {database} is unavailable: {reason}")]
    Unavailable { database: String, reason: String },
    /// A precondition of the batch ([`Batch::expect`]) no longer holds: another replica changed
    /// the value first. Nothing was written; read it again and decide again.
    #[error("state store: {table}/{key} was changed by another replica meanwhile")]
    Conflict { table: String, key: String },
}

impl StoreError {
    /// The task that owns a store went away (shutdown).
    pub fn closed() -> Self {
        StoreError::Failed("the owning task has stopped".into())
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

pub(crate) fn failed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(e.to_string())
}

/// The page cache unless configured (`store.cache_size`).
pub const DEFAULT_CACHE: usize = embedded::DEFAULT_CACHE;

/// `store.*`: which backend, and how to reach it.
#[derive(Clone, Debug, PartialEq)]
pub enum StoreSettings {
    /// `controller.redb` in the state directory, with this page cache.
    Embedded {
        cache_bytes: usize,
    },
    Postgres(postgres::PostgresSettings),
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings::Embedded {
            cache_bytes: DEFAULT_CACHE,
        }
    }
}

/// A change another replica committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// One row of a table was written or deleted: read it again.
    Row { table: String, key: String },
    /// Changes may have been missed (the notification channel was (re)connected): read every
    /// table again.
    Resync,
}

/// What a follower of some tables must read again after another replica's change.
#[derive(Debug, PartialEq, Eq)]
pub enum Reread {
    /// One row of one of its tables.
    Row { table: String, key: String },
    /// Everything: changes may have been missed (a resync, or the follower fell behind).
    All,
}

/// Other replicas' changes to some tables, as [`Reread`]s: rows of other tables are skipped, and
/// a resync or a lag (the feed overflowed) means reading everything again.
pub struct Follower {
    changes: broadcast::Receiver<Change>,
    tables: Vec<String>,
}

impl Follower {
    /// The next thing to read again; `None` once the store is gone.
    pub async fn next(&mut self) -> Option<Reread> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match self.changes.recv().await {
                Ok(Change::Row { table, key }) if self.tables.contains(&table) => {
                    return Some(Reread::Row { table, key });
                }
                Ok(Change::Row { .. }) => {}
                Ok(Change::Resync) | Err(RecvError::Lagged(_)) => return Some(Reread::All),
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

#[derive(Clone)]
pub struct Store {
    backend: Backend,
    changes: broadcast::Sender<Change>,
}

#[derive(Clone)]
enum Backend {
    Embedded(embedded::Embedded),
    Postgres(Arc<postgres::Postgres>),
}

/// Changes waiting for a slow subscriber at most; one that falls further behind reads everything
/// again (its receiver reports the lag, which subscribers treat as [`Change::Resync`]).
const CHANGE_BACKLOG: usize = 4096;

impl Store {
    #[cfg(test)]
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE)
    }

    /// Opens (or creates) the embedded store with a page cache of at most `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let (changes, _) = broadcast::channel(CHANGE_BACKLOG);
        Ok(Store {
            backend: Backend::Embedded(embedded::Embedded::open(path, cache_bytes)?),
            changes,
        })
    }

    /// Opens the store `settings` name: the embedded one in `state_dir`, or the shared database,
    /// whose schema is brought up to date first (safely when several replicas start at once).
    /// `replica` names this controller to the database (its changes are not announced back to it).
    pub async fn connect(
        settings: &StoreSettings,
        state_dir: &Path,
        replica: &str,
    ) -> Result<Self, StoreError> {
        match settings {
            StoreSettings::Embedded { cache_bytes } => {
                Self::open_with_cache(&embedded_path(state_dir), *cache_bytes)
            }
            StoreSettings::Postgres(pg) => {
                let (changes, _) = broadcast::channel(CHANGE_BACKLOG);
                let backend = postgres::Postgres::connect(pg, replica, changes.clone()).await?;
                Ok(Store {
                    backend: Backend::Postgres(Arc::new(backend)),
                    changes,
                })
            }
        }
    }

    /// What the store is, for logs and `/readyz`: "embedded /var/lib/tapgraph/controller.redb" or
    /// "postgres 10.0.0.5:5432/tapgraph".
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Embedded(e) => format!("embedded {}", e.path().display()),
            Backend::Postgres(p) => format!("postgres {}", p.database()),
        }
    }

    /// The shared database as "HOST:PORT/DB", the way errors name it; `None` for the embedded
    /// store.
    pub fn database(&self) -> Option<&str> {
        match &self.backend {
            Backend::Embedded(_) => None,
            Backend::Postgres(p) => Some(p.database()),
        }
    }

    /// Whether other replicas share this store (PostgreSQL): only then is live state (which
    /// replica holds which agent) written to it.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// `None` while the store can be used; the reason when it cannot (the database is down).
    pub fn unavailable(&self) -> Option<String> {
        match &self.backend {
            Backend::Embedded(_) => None,
            Backend::Postgres(p) => p.unavailable(),
        }
    }

    /// Whether this replica leads `role` (a task that must run on one replica at a time), from
    /// now until the receiver is dropped; one caller per role. The embedded store has one
    /// controller, which always leads: its channel says `true` and never changes (it is closed).
    pub fn leadership(&self, role: &str) -> tokio::sync::watch::Receiver<bool> {
        match &self.backend {
            Backend::Embedded(_) => tokio::sync::watch::channel(true).1,
            Backend::Postgres(p) => p.leadership(role),
        }
    }

    /// Sends an event (JSON naming this replica) to the other replicas; nothing to do for the
    /// embedded store. Best effort: events are not stored.
    pub async fn share_event(&self, payload: String) -> Result<(), StoreError> {
        let Backend::Postgres(p) = &self.backend else {
            return Ok(());
        };
        let Some(io) = p.io() else {
            return Err(postgres::closed());
        };
        let p = p.clone();
        io.spawn(async move { p.share_event(&payload).await })
            .await
            .map_err(|_| postgres::closed())?
    }

    /// Other replicas' events from now on, as (replica, payload); `None` for the embedded store.
    pub fn remote_events(&self) -> Option<broadcast::Receiver<(String, String)>> {
        match &self.backend {
            Backend::Embedded(_) => None,
            Backend::Postgres(p) => Some(p.remote_events()),
        }
    }

    /// Changes other replicas commit from now on. Never fires for the embedded store.
    pub fn changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Other replicas' changes to `tables` from now on, as [`Reread`]s. Subscribe before the
    /// first read, so that nothing falls between them.
    pub fn follow(&self, tables: &[Table]) -> Follower {
        Follower {
            changes: self.changes.subscribe(),
            tables: tables.iter().map(|t| t.name().to_string()).collect(),
        }
    }

    /// Every value of `table`, in key order; an absent table is empty.
    pub fn load<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        self.load_raw(table)?
            .into_iter()
            .map(|(key, bytes)| decode(table, &key, &bytes))
            .collect()
    }

    /// Every key of `table` with its value, in key order (tests compare whole tables with it).
    #[cfg(test)]
    pub fn load_keyed<T: DeserializeOwned>(
        &self,
        table: Table,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.load_raw(table)?
            .into_iter()
            .map(|(key, bytes)| decode(table, &key, &bytes).map(|v| (key, v)))
            .collect()
    }

    /// The value of `key` in `table`, if there is one.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let bytes = match &self.backend {
            Backend::Embedded(e) => e.get(table, key)?,
            Backend::Postgres(p) => {
                let key = key.to_string();
                blocking(p, move |p| async move { p.get(table, &key).await })?
            }
        };
        bytes.map(|b| decode(table, key, &b)).transpose()
    }

    fn load_raw(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match &self.backend {
            Backend::Embedded(e) => e.load(table),
            Backend::Postgres(p) => blocking(p, move |p| async move { p.load(table).await }),
        }
    }

    /// Applies every change of `batch` in one durable transaction: all of them, or none.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.commit_with(batch, true)
    }

    /// As [`Store::commit`], without waiting for the disk: the changes are durable after the next
    /// durable commit (any task's, or [`Store::sync`]). A crash before it loses them, and the
    /// store comes back as it was at the last durable commit, never half-written.
    pub fn commit_deferred(&self, batch: Batch) -> Result<(), StoreError> {
        self.commit_with(batch, false)
    }

    /// Makes every deferred commit durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(_) => self.commit(Batch::default()),
            Backend::Postgres(p) => blocking(p, |p| async move { p.sync().await }),
        }
    }

    fn commit_with(&self, batch: Batch, durable: bool) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Embedded(e) => e.commit(&batch, durable),
            Backend::Postgres(p) => {
                blocking(p, move |p| async move { p.commit(&batch, durable).await })
            }
        }
    }

    /// Writes one value.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.put(table, key, value)?;
        self.commit(batch)
    }
}

/// `controller.redb` in the state directory.
pub fn embedded_path(state_dir: &Path) -> PathBuf {
    state_dir.join("controller.redb")
}

fn decode<T: DeserializeOwned>(table: Table, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Failed(format!("{}/{key}: {e}", table.name())))
}

/// Runs a database call from the synchronous store API on the store's own runtime (`io`), and
/// waits for it; the caller's worker thread hands its other tasks over meanwhile (redb's calls
/// block the same way). The call does not need the caller's runtime: if that one shuts down
/// meanwhile, the call still ends. If the store's runtime is gone, the call fails.
fn blocking<T, F>(
    p: &Arc<postgres::Postgres>,
    f: impl FnOnce(Arc<postgres::Postgres>) -> F,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
{
    let Some(io) = p.io() else {
        return Err(postgres::closed());
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let call = f(p.clone());
    io.spawn(async move {
        let _ = tx.send(call.await);
    });
    let wait = || rx.recv().unwrap_or_else(|_| Err(postgres::closed()));
    // Outside a multi-threaded runtime's worker (a thread of its own, a current-thread runtime)
    // there are no other tasks to hand over: wait right here.
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        _ => wait(),
    }
}

/// Changes to commit together.
#[derive(Default)]
pub struct Batch {
    pub(crate) changes: Vec<(Table, String, Option<Vec<u8>>)>,
    /// Preconditions: the value each key must still hold (`None`: absent) for the batch to apply.
    pub(crate) expected: Vec<(Table, String, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put<T: Serialize>(
        &mut self,
        table: Table,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(failed)?;
        self.changes.push((table, key.to_string(), Some(bytes)));
        Ok(())
    }

    pub fn delete(&mut self, table: Table, key: &str) {
        self.changes.push((table, key.to_string(), None));
    }

    /// The batch applies only if `key` in `table` still holds `value` (`None`: no value), as
    /// JSON values compare; otherwise the commit fails with [`StoreError::Conflict`].
    pub fn expect<T: Serialize>(
        &mut self,
        table: Table,
        key: &str,
        value: Option<&T>,
    ) -> Result<(), StoreError> {
        let bytes = value.map(serde_json::to_vec).transpose().map_err(failed)?;
        self.expected.push((table, key.to_string(), bytes));
        Ok(())
    }

    /// [`Batch::put`] of a value serialised already (by `serde_json`).
    pub fn put_raw(&mut self, table: Table, key: &str, bytes: Vec<u8>) {
        self.changes.push((table, key.to_string(), Some(bytes)));
    }

    /// [`Batch::expect`] of a value serialised already, as it was written.
    pub fn expect_raw(&mut self, table: Table, key: &str, bytes: Option<Vec<u8>>) {
        self.expected.push((table, key.to_string(), bytes));
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.expected.is_empty()
    }
}

/// Whether `current` (as stored) equals `expected` (as the batch was computed from), comparing
/// JSON values, not bytes: PostgreSQL normalises what it stores.
pub(crate) fn same_value(current: Option<&[u8]>, expected: Option<&[u8]>) -> bool {
    match (current, expected) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a == b
                || matches!(
                    (
                        serde_json::from_slice::<serde_json::Value>(a),
                        serde_json::from_slice::<serde_json::Value>(b),
                    ),
                    (Ok(x), Ok(y)) if x == y
                )
        }
        _ => false,
    }
}
