//! The controller's embedded store: one redb file in the state directory. Each table maps a string
//! key to a JSON value; every change is one transaction, durable when it returns, except the map's
//! (`commit_deferred`), which a durable commit within a second makes durable. Tasks that own state
//! load it at start and write through on change.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub type Table = TableDefinition<'static, &'static str, &'static [u8]>;

#[derive(Debug, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(String);

impl StoreError {
    /// The task that owns a store went away (shutdown).
    pub fn closed() -> Self {
        StoreError("the owning task has stopped".into())
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// The page cache unless configured (`store.cache_size`).
pub const DEFAULT_CACHE: usize = 64 << 20;

#[derive(Clone)]
pub struct Store {
    db: std::sync::Arc<redb::Database>,
}

impl Store {
    #[cfg(test)]
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE)
    }

    /// Opens (or creates) the store with a page cache of at most `cache_bytes`. redb's own
    /// default is 1 GiB, a ceiling that a large map fills and then keeps resident.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        // It holds token hashes and the agent list: owner only.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(err)?;
        Ok(Self {
            db: std::sync::Arc::new(db),
        })
    }

    /// Every value of `table`, in key order; an absent table is empty.
    pub fn load<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        let read = self.db.begin_read().map_err(err)?;
        let t = match read.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(err)? {
            let (key, value) = item.map_err(err)?;
            let v = serde_json::from_slice(value.value())
                .map_err(|e| StoreError(format!("{}/{}: {e}", table.name(), key.value())))?;
            out.push(v);
        }
        Ok(out)
    }

    /// Applies every change of `batch` in one durable transaction: all of them, or none.
    pub fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        self.commit_with(batch, redb::Durability::Immediate)
    }

    /// As [`Store::commit`], without waiting for the disk: the changes are durable after the next
    /// durable commit (any task's, or [`Store::sync`]). A crash before it loses them, and the
    /// store comes back as it was at the last durable commit, never half-written.
    pub fn commit_deferred(&self, batch: Batch) -> Result<(), StoreError> {
        self.commit_with(batch, redb::Durability::None)
    }

    /// Makes every deferred commit durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.commit(Batch::default())
    }

    fn commit_with(&self, batch: Batch, durability: redb::Durability) -> Result<(), StoreError> {
        // A commit waits for fsync: keep it off the async workers' hot loop.
        tokio::task::block_in_place(|| {
            let mut txn = self.db.begin_write().map_err(err)?;
            txn.set_durability(durability).map_err(err)?;
            for (table, key, value) in &batch.changes {
                let mut t = txn.open_table(*table).map_err(err)?;
                match value {
                    Some(bytes) => t.insert(key.as_str(), bytes.as_slice()).map(|_| ()),
                    None => t.remove(key.as_str()).map(|_| ()),
                }
                .map_err(err)?;
            }
            txn.commit().map_err(err)
        })
    }

    /// Writes one value.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        batch.put(table, key, value)?;
        self.commit(batch)
    }
}

/// Changes to commit together.
#[derive(Default)]
pub struct Batch {
    changes: Vec<(Table, String, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn put<T: Serialize>(
        &mut self,
        table: Table,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(err)?;
        self.changes.push((table, key.to_string(), Some(bytes)));
        Ok(())
    }

    #[allow(dead_code)] // exercised by tests now; the topology store removes edges with it
    pub fn delete(&mut self, table: Table, key: &str) {
        self.changes.push((table, key.to_string(), None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Table = TableDefinition::new("test");

    #[tokio::test(flavor = "multi_thread")]
    async fn values_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let s = Store::open(&path).unwrap();
            assert!(s.load::<u32>(T).unwrap().is_empty());
            let mut b = Batch::default();
            b.put(T, "a", &1u32).unwrap();
            b.put(T, "b", &2u32).unwrap();
            s.commit(b).unwrap();
            let mut b = Batch::default();
            b.delete(T, "a");
            s.commit(b).unwrap();
        }
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load::<u32>(T).unwrap(), [2]);
    }

    /// Set in a child test process: the store path, and whether to sync before crashing.
    const CRASH_CHILD: &str = "TAPGRAPH_STORE_CRASH_CHILD";
    /// The child's exit code where it "crashes" (a failed assertion there exits with 101).
    const CRASHED: i32 = 86;

    /// In a child process only: commits "a" durably and "b" deferred, syncs or not, and exits
    /// with [`CRASHED`] without any destructor running (a crash, as far as the store can tell,
    /// and no core file).
    #[tokio::test(flavor = "multi_thread")]
    async fn crash_child() {
        let Ok(spec) = std::env::var(CRASH_CHILD) else {
            return;
        };
        let (path, sync) = spec.rsplit_once(',').unwrap();
        let s = Store::open(Path::new(path)).unwrap();
        let mut b = Batch::default();
        b.put(T, "a", &1u32).unwrap();
        s.commit(b).unwrap();
        let mut b = Batch::default();
        b.put(T, "b", &2u32).unwrap();
        s.commit_deferred(b).unwrap();
        assert_eq!(s.load::<u32>(T).unwrap(), [1, 2], "visible before the sync");
        if sync == "sync" {
            s.sync().unwrap();
        }
        std::process::exit(CRASHED);
    }

    /// What a crash leaves of a store, with or without a sync after its deferred commit.
    fn after_crash(sync: &str) -> Vec<u32> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::tests::crash_child", "--test-threads=1"])
            .env(CRASH_CHILD, format!("{},{sync}", path.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(
            status.code(),
            Some(CRASHED),
            "the child stops on purpose: {status}"
        );
        Store::open(&path).unwrap().load::<u32>(T).unwrap()
    }

    #[test]
    fn a_crash_keeps_deferred_commits_only_once_synced() {
        assert_eq!(
            after_crash("no-sync"),
            [1],
            "a deferred commit is lost in a crash"
        );
        assert_eq!(after_crash("sync"), [1, 2], "a sync makes it durable");
    }
}
