//! The embedded backend: one redb file in the state directory, for a single controller. Each table
//! maps a string key to a JSON value; every batch is one transaction.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableHandle};

use super::{Batch, StoreError, Table, failed, same_value};

/// The page cache unless configured (`store.cache_size`).
pub const DEFAULT_CACHE: usize = 64 << 20;

#[derive(Clone)]
pub struct Embedded {
    db: std::sync::Arc<redb::Database>,
    path: PathBuf,
}

impl Embedded {
    /// Opens (or creates) the store with a page cache of at most `cache_bytes`. redb's own
    /// default is 1 GiB, a ceiling that a large map fills and then keeps resident.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| StoreError::Failed(format!("{}: {e}", path.display())))?;
        // It holds token hashes and the agent list: owner only.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(failed)?;
        Ok(Self {
            db: std::sync::Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every key and value of `table`, in key order; an absent table is empty.
    pub fn load(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let read = self.db.begin_read().map_err(failed)?;
        let t = match read.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(failed(e)),
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(failed)? {
            let (key, value) = item.map_err(failed)?;
            out.push((key.value().to_string(), value.value().to_vec()));
        }
        Ok(out)
    }

    pub fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = self.db.begin_read().map_err(failed)?;
        let t = match read.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(failed(e)),
        };
        Ok(t.get(key).map_err(failed)?.map(|v| v.value().to_vec()))
    }

    /// Applies `batch` in one transaction if its preconditions hold; `durable`: wait for the disk.
    pub fn commit(&self, batch: &Batch, durable: bool) -> Result<(), StoreError> {
        let durability = if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        };
        // A commit waits for fsync: keep it off the async workers' hot loop.
        tokio::task::block_in_place(|| {
            let mut txn = self.db.begin_write().map_err(failed)?;
            txn.set_durability(durability).map_err(failed)?;
            for (table, key, expected) in &batch.expected {
                let t = txn.open_table(*table).map_err(failed)?;
                let current = t
                    .get(key.as_str())
                    .map_err(failed)?
                    .map(|v| v.value().to_vec());
                if !same_value(current.as_deref(), expected.as_deref()) {
                    // Dropping the transaction aborts it: nothing of the batch is written.
                    return Err(StoreError::Conflict {
                        table: table.name().to_string(),
                        key: key.clone(),
                    });
                }
            }
            for (table, key, value) in &batch.changes {
                let mut t = txn.open_table(*table).map_err(failed)?;
                match value {
                    Some(bytes) => t.insert(key.as_str(), bytes.as_slice()).map(|_| ()),
                    None => t.remove(key.as_str()).map(|_| ()),
                }
                .map_err(failed)?;
            }
            txn.commit().map_err(failed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Batch, Store, Table};
    use redb::TableDefinition;
    use std::path::Path;

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
            .args([
                "--exact",
                "store::embedded::tests::crash_child",
                "--test-threads=1",
            ])
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
