//! `tapgraph-controller store migrate --from STATE_DIR`: a single controller's state, copied into
//! the PostgreSQL database replicas share, so that its agents move to the replicas with the
//! certificates they hold.
//!
//! Every table of `STATE_DIR/controller.redb` (join tokens, agents and their revocations, policies
//! and their version counter, label rules, console tokens, the map) is copied row by row, values
//! unchanged. The old controller must be stopped: its file is locked while it runs. A database
//! that already holds agents is refused unless forced; forced, each table copied becomes what the
//! state directory holds (rows only the database had are removed), so running it again gives the
//! same result. The CA goes where the configuration says replicas find it: nothing to copy when
//! `pki.ca_cert`/`pki.ca_key` name it, sealed into the database with `pki.ca_seal_key_file`, and
//! otherwise the steps are printed.

use std::io::Write;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableHandle};
use tapgraph::pki::CertAuthority;

use super::{Batch, Store, StoreError, StoreSettings, Table, embedded_path};
use crate::config::ControllerConfig;
use crate::enrollment::ca::{CaError, PkiSettings};
use crate::enrollment::seal::{self, SealKey};

/// The tables of a controller's state, in the order they are copied.
const STATE: &[&str] = &[
    "tokens",
    "agents",
    "policies",
    "policy_meta",
    "label_rules",
    "console_tokens",
    "topology_agents",
    "topology_edges",
    "topology_history",
];
/// Tables of one replica's live state: never copied, the replicas write their own.
const LIVE: &[&str] = &["presence", "replicas", "mirrors"];
/// Enrolled (and revoked) agents: a database holding any is not migrated into unless forced.
const AGENTS: Table = redb::TableDefinition::new("agents");
/// Rows written per transaction.
const CHUNK: usize = 1000;
/// The name this command's database sessions carry (replicas running meanwhile hear its writes).
const SESSION: &str = "store-migrate";

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "store migrate copies into PostgreSQL, and the configuration names the embedded store: \
         set store.backend = \"postgres\" and store.postgres.url (the replicas' configuration)"
    )]
    NotPostgres,
    #[error(
        "{0}: no controller state here (no controller.redb): --from names the old controller's state_dir"
    )]
    NoState(PathBuf),
    #[error(
        "{0} is in use by a running controller: stop it first (its agents reconnect to the replicas)"
    )]
    InUse(PathBuf),
    #[error("{path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error(
        "{path} holds table(s) {} that this controller does not know: is it a newer controller's state?",
        .tables.join(", ")
    )]
    UnknownTables { path: PathBuf, tables: Vec<String> },
    #[error("{table}/{key} in {path} is not JSON: {reason}")]
    NotJson {
        path: PathBuf,
        table: String,
        key: String,
        reason: String,
    },
    #[error(
        "the database {database} already holds {count} agent(s): nothing was copied. Migrating \
         replaces each table with the state directory's; run again with --force to do so"
    )]
    HoldsAgents { database: String, count: usize },
    #[error(
        "the database {database} already holds another CA (fingerprint {stored}) than {path} \
         ({ours}): the migrated agents' certificates would be refused. Nothing was copied. If no \
         agent depends on the database's CA, delete it (psql: DELETE FROM tapgraph.pki WHERE \
         key = 'ca';) and run this again"
    )]
    OtherCa {
        database: String,
        path: PathBuf,
        stored: String,
        ours: String,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The subcommand: connects to the configured database on a runtime of its own, copies the CA
/// (or says what to do with it) and every table, printing a line per step on stdout.
pub fn run(config: &ControllerConfig, from: &Path, force: bool) -> anyhow::Result<()> {
    migrate(config, from, force, &mut std::io::stdout())
}

/// [`run`], saying what it does on `out`.
fn migrate(
    config: &ControllerConfig,
    from: &Path,
    force: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if !matches!(config.store, StoreSettings::Postgres(_)) {
        return Err(MigrateError::NotPostgres.into());
    }
    // Opened (and its lock checked) before the database is touched.
    let source = Source::open(from)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let target = Store::connect(&config.store, &config.state_dir, SESSION).await?;
        writeln!(
            out,
            "migrating {} into {}",
            source.path.display(),
            target.describe()
        )?;
        source.refuse_unless_forced(&target, force)?;
        copy_ca(&config.pki, from, &target, out)?;
        let copied = source.copy(&target, out)?;
        let rows: usize = copied.iter().map(|(_, n)| n).sum();
        writeln!(
            out,
            "done: {rows} rows in {} tables; start the replicas, and the agents of {} connect to \
             them with the certificates they hold",
            copied.len(),
            from.display()
        )?;
        Ok(())
    })
}

/// A stopped controller's `controller.redb`, opened for reading.
pub struct Source {
    db: redb::Database,
    path: PathBuf,
}

impl Source {
    /// Opens `state_dir/controller.redb`; refused while a controller holds it.
    pub fn open(state_dir: &Path) -> Result<Self, MigrateError> {
        let path = embedded_path(state_dir);
        if !path.is_file() {
            return Err(MigrateError::NoState(state_dir.to_path_buf()));
        }
        // `open`, not `create`: nothing is made where nothing was; a file a crash left behind is
        // repaired as the controller would at its start.
        let db = redb::Builder::new().open(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => MigrateError::InUse(path.clone()),
            other => MigrateError::Read {
                path: path.clone(),
                reason: other.to_string(),
            },
        })?;
        Ok(Self { db, path })
    }

    fn read_error(&self, e: impl std::fmt::Display) -> MigrateError {
        MigrateError::Read {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Refuses a database that already holds agents, naming how many, unless `force`.
    pub fn refuse_unless_forced(&self, target: &Store, force: bool) -> Result<(), MigrateError> {
        let count = target.load_raw(AGENTS)?.len();
        if count > 0 && !force {
            return Err(MigrateError::HoldsAgents {
                database: target.describe(),
                count,
            });
        }
        Ok(())
    }

    /// Copies every table into `target`, each becoming what this state holds; a line per table
    /// on `out`. The tables copied with their row counts.
    pub fn copy(
        &self,
        target: &Store,
        out: &mut dyn Write,
    ) -> Result<Vec<(&'static str, usize)>, MigrateError> {
        let read = self.db.begin_read().map_err(|e| self.read_error(e))?;
        let present: Vec<String> = read
            .list_tables()
            .map_err(|e| self.read_error(e))?
            .map(|t| t.name().to_string())
            .collect();
        let unknown: Vec<String> = present
            .iter()
            .filter(|t| !STATE.contains(&t.as_str()) && !LIVE.contains(&t.as_str()))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(MigrateError::UnknownTables {
                path: self.path.clone(),
                tables: unknown,
            });
        }
        let mut copied = Vec::new();
        for name in STATE {
            let (rows, removed) = self.copy_table(&read, name, target)?;
            let removed = match removed {
                0 => String::new(),
                n => format!(" ({n} the database alone held removed)"),
            };
            let _ = writeln!(out, "  {name}: {rows} rows{removed}");
            copied.push((*name, rows));
        }
        for name in LIVE.iter().filter(|t| present.iter().any(|p| p == *t)) {
            let _ = writeln!(
                out,
                "  {name}: skipped (live state: the replicas write their own)"
            );
        }
        Ok(copied)
    }

    /// Copies table `name` in transactions of [`CHUNK`] rows, then removes the rows only the
    /// database has. (rows copied, rows removed).
    fn copy_table(
        &self,
        read: &redb::ReadTransaction,
        name: &'static str,
        target: &Store,
    ) -> Result<(usize, usize), MigrateError> {
        let table: Table = redb::TableDefinition::new(name);
        let source = match read.open_table(table) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(self.read_error(e)),
        };
        let mut rows = 0;
        if let Some(source) = &source {
            let mut batch = Batch::default();
            for item in source.iter().map_err(|e| self.read_error(e))? {
                let (key, value) = item.map_err(|e| self.read_error(e))?;
                let (key, value) = (key.value(), value.value());
                // Checked here, so that the error names the row.
                if let Err(e) = serde_json::from_slice::<serde_json::Value>(value) {
                    return Err(MigrateError::NotJson {
                        path: self.path.clone(),
                        table: name.to_string(),
                        key: key.to_string(),
                        reason: e.to_string(),
                    });
                }
                batch
                    .changes
                    .push((table, key.to_string(), Some(value.to_vec())));
                rows += 1;
                if batch.changes.len() >= CHUNK {
                    target.commit(std::mem::take(&mut batch))?;
                }
            }
            target.commit(batch)?;
        }
        let mut stale = Batch::default();
        for (key, _) in target.load_raw(table)? {
            let held = match &source {
                Some(s) => s
                    .get(key.as_str())
                    .map_err(|e| self.read_error(e))?
                    .is_some(),
                None => false,
            };
            if !held {
                stale.delete(table, &key);
            }
        }
        let removed = stale.changes.len();
        for chunk in stale.changes.chunks(CHUNK) {
            target.commit(Batch {
                changes: chunk.to_vec(),
                expected: Vec::new(),
            })?;
        }
        Ok((rows, removed))
    }
}

/// The CA where the configuration says the replicas find it, with a line on `out`: nothing to do
/// when `pki.ca_cert`/`pki.ca_key` name it (but a warning if the old controller used another);
/// sealed into the database with `pki.ca_seal_key_file`; otherwise the steps to take.
pub fn copy_ca(
    pki: &PkiSettings,
    from: &Path,
    target: &Store,
    out: &mut dyn Write,
) -> Result<(), MigrateError> {
    let dir = from.join("pki");
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let old = || -> Result<Option<CertAuthority>, MigrateError> {
        if !cert.exists() {
            return Ok(None);
        }
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| MigrateError::Read {
                path: p.to_path_buf(),
                reason: e.to_string(),
            })
        };
        CertAuthority::from_pem(&read(&cert)?, &read(&key)?)
            .map(Some)
            .map_err(|error| {
                CaError::Ca {
                    path: cert.clone(),
                    error,
                }
                .into()
            })
    };
    match (&pki.ca_files, &pki.seal_key_file) {
        (Some((ca_cert, _)), _) => {
            let same = old()?.map(|old| {
                let configured = std::fs::read_to_string(ca_cert).unwrap_or_default();
                (
                    configured.trim() == old.cert_pem().trim(),
                    old.fingerprint(),
                )
            });
            let line = match same {
                Some((false, fingerprint)) => format!(
                    "  CA: WARNING: {} (fingerprint {fingerprint}) is not the CA pki.ca_cert names \
                     ({}): the replicas will refuse the migrated agents' certificates. Mount {} and \
                     {} as pki.ca_cert and pki.ca_key on every replica instead",
                    cert.display(),
                    ca_cert.display(),
                    cert.display(),
                    key.display()
                ),
                _ => format!(
                    "  CA: pki.ca_cert and pki.ca_key name it ({}): nothing to copy; every replica \
                     mounts the same files",
                    ca_cert.display()
                ),
            };
            let _ = writeln!(out, "{line}");
        }
        (None, Some(seal_key)) => {
            let Some(ours) = old()? else {
                let _ = writeln!(
                    out,
                    "  CA: none in {}: the old controller used pki.ca_cert and pki.ca_key; set the \
                     same two files on every replica",
                    dir.display()
                );
                return Ok(());
            };
            let key = SealKey::read(seal_key).map_err(CaError::from)?;
            let fingerprint = ours.fingerprint();
            // Stored unless the database has a CA already, which is then opened with the key.
            let shared = seal::shared_ca(target, &key, SESSION, || Ok(ours))?;
            if shared.fingerprint() != fingerprint {
                return Err(MigrateError::OtherCa {
                    database: target.describe(),
                    path: cert,
                    stored: shared.fingerprint(),
                    ours: fingerprint,
                });
            }
            let _ = writeln!(
                out,
                "  CA: {} (fingerprint {fingerprint}) is in the database, sealed with {}",
                cert.display(),
                seal_key.display()
            );
        }
        (None, None) => {
            let _ = writeln!(
                out,
                "  CA: the configuration names no CA for the replicas to share, and they will not \
                 start without one. Either\n    \
                 - copy {cert} and {key} to every replica (a Kubernetes Secret), mode 0600, and \
                 set pki.ca_cert and pki.ca_key to them; or\n    \
                 - set pki.ca_seal_key_file to a file of 32 random bytes (head -c 32 /dev/urandom \
                 > seal.key; chmod 600 seal.key), the same on every replica, and run this command \
                 again with --force: the CA is then stored in the database, sealed with it",
                cert = cert.display(),
                key = key.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde_json::{Value, json};
    use tapgraph::config::Sources;

    use super::*;
    use crate::http::console::ConsoleTokens;
    use crate::store::testpg;
    use crate::topology::labels::{OperatorRules, RuleText};

    type Contents = BTreeMap<&'static str, Vec<(String, Value)>>;

    /// Every state table as `store` holds it.
    fn contents(store: &Store) -> Contents {
        STATE
            .iter()
            .map(|name| {
                let rows = store
                    .load_keyed::<Value>(redb::TableDefinition::new(name))
                    .unwrap();
                (*name, rows)
            })
            .collect()
    }

    /// A stopped single controller's state in `dir`: rows in every table (a console token and
    /// label rules through their owners, which read their tables back), a live table, and its CA
    /// in `dir/pki`. What it holds.
    fn single_controller(dir: &Path) -> Contents {
        let store = Store::open(&embedded_path(dir)).unwrap();
        for (n, name) in STATE.iter().enumerate() {
            if matches!(*name, "console_tokens" | "label_rules") {
                continue;
            }
            let mut batch = Batch::default();
            for i in 0..=n {
                let value =
                    json!({"table": name, "i": i, "nested": {"list": [1, 2.5, "x"], "none": null}});
                batch
                    .put(
                        redb::TableDefinition::new(name),
                        &format!("{name}-{i}"),
                        &value,
                    )
                    .unwrap();
            }
            store.commit(batch).unwrap();
        }
        ConsoleTokens::load(store.clone())
            .unwrap()
            .create(Duration::from_secs(3600), "laptop".into(), "alice".into())
            .unwrap();
        OperatorRules::load(store.clone())
            .unwrap()
            .set(RuleText {
                cidr: "10.0.0.0/8 zone=dc1".into(),
                hostname: "web-* role=web".into(),
            })
            .unwrap();
        store
            .put(
                redb::TableDefinition::new("presence"),
                "a1",
                &json!({"replica": "old"}),
            )
            .unwrap();
        let held = contents(&store);
        let ca = CertAuthority::generate("old CA", Duration::from_secs(3600)).unwrap();
        std::fs::create_dir_all(dir.join("pki")).unwrap();
        tapgraph::fsutil::write_private(&dir.join("pki/ca.pem"), ca.cert_pem().as_bytes()).unwrap();
        tapgraph::fsutil::write_private(&dir.join("pki/ca.key"), ca.key_pem().as_bytes()).unwrap();
        held
    }

    fn config(pairs: &[(&str, String)]) -> ControllerConfig {
        let env = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        ControllerConfig::load(&Sources {
            env,
            ..Sources::default()
        })
        .unwrap()
    }

    #[test]
    fn postgres_every_table_and_the_ca_are_copied_and_a_second_run_needs_force() {
        // `run` makes a runtime of its own: the test's is used only around it.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let Some(pg) = rt.block_on(testpg::database()) else {
            return;
        };
        let old = tempfile::tempdir().unwrap();
        let held = rt.block_on(async { single_controller(old.path()) });
        let new = tempfile::tempdir().unwrap();
        let seal_key = new.path().join("seal.key");
        tapgraph::fsutil::write_private(&seal_key, &[5u8; 32]).unwrap();
        let config = config(&[
            (
                "TAPGRAPH_STATE_DIR",
                new.path().join("state").display().to_string(),
            ),
            ("TAPGRAPH_STORE__BACKEND", "postgres".into()),
            ("TAPGRAPH_STORE__POSTGRES__URL", pg.url.clone()),
            (
                "TAPGRAPH_PKI__CA_SEAL_KEY_FILE",
                seal_key.display().to_string(),
            ),
        ]);
        let mut out = Vec::new();
        migrate(&config, old.path(), false, &mut out).unwrap();
        let said = String::from_utf8(out).unwrap();
        for line in [
            "  tokens: 1 rows",
            "  agents: 2 rows",
            "  policies: 3 rows",
            "  policy_meta: 4 rows",
            "  label_rules: 1 rows",
            "  console_tokens: 1 rows",
            "  topology_agents: 7 rows",
            "  topology_edges: 8 rows",
            "  topology_history: 9 rows",
            "  presence: skipped",
            "is in the database, sealed with",
            "done: 36 rows in 9 tables",
        ] {
            assert!(said.contains(line), "{line}: {said}");
        }

        let target = rt
            .block_on(Store::connect(&config.store, new.path(), "b"))
            .unwrap();
        let check = |target: &Store| {
            rt.block_on(async {
                assert_eq!(
                    contents(target),
                    held,
                    "every table, every row, values unchanged"
                );
                let presence = target
                    .load::<Value>(redb::TableDefinition::new("presence"))
                    .unwrap();
                assert!(presence.is_empty(), "live state is not copied");
                let tokens = ConsoleTokens::load(target.clone()).unwrap().list();
                assert_eq!(tokens.len(), 1);
                assert_eq!(tokens[0].created_by, "alice");
                let rules = OperatorRules::load(target.clone()).unwrap().get();
                assert_eq!(rules.1.for_hostname("web-1")["role"], "web");
                // The CA, sealed: a replica with the seal key gets the old controller's.
                let key = SealKey::read(&seal_key).unwrap();
                let shared = seal::shared_ca(target, &key, "b", || panic!("no CA stored")).unwrap();
                let old_ca = std::fs::read_to_string(old.path().join("pki/ca.pem")).unwrap();
                assert_eq!(shared.cert_pem().trim(), old_ca.trim());
            })
        };
        check(&target);

        // Again, without --force: refused, naming the count, and nothing written.
        let e = format!(
            "{:#}",
            migrate(&config, old.path(), false, &mut Vec::new()).unwrap_err()
        );
        assert!(
            e.contains("already holds 2 agent(s)") && e.contains("--force"),
            "{e}"
        );
        // With it: the same result, and a row only the database had is gone; and once more.
        let only_here = redb::TableDefinition::new("tokens");
        rt.block_on(async { target.put(only_here, "only-here", &json!(1)).unwrap() });
        let mut out = Vec::new();
        migrate(&config, old.path(), true, &mut out).unwrap();
        let said = String::from_utf8(out).unwrap();
        assert!(
            said.contains("  tokens: 1 rows (1 the database alone held removed)"),
            "{said}"
        );
        check(&target);
        migrate(&config, old.path(), true, &mut Vec::new()).unwrap();
        check(&target);
    }

    #[test]
    fn the_source_must_exist_and_be_stopped_and_the_target_postgres() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = Source::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("no controller.redb"), "{e}");
        assert!(!embedded_path(dir.path()).exists(), "nothing is created");
        // A controller still running holds the file.
        let running = rt.block_on(async { Store::open(&embedded_path(dir.path())).unwrap() });
        let e = Source::open(dir.path()).err().unwrap();
        assert!(matches!(e, MigrateError::InUse(_)), "{e}");
        assert!(e.to_string().contains("stop it first"), "{e}");
        drop(running);
        assert!(Source::open(dir.path()).is_ok(), "stopped, it opens");
        let embedded = config(&[(
            "TAPGRAPH_STATE_DIR",
            dir.path().join("new").display().to_string(),
        )]);
        let e = run(&embedded, dir.path(), false).unwrap_err().to_string();
        assert!(e.contains("store.backend = \"postgres\""), "{e}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn postgres_the_ca_goes_where_the_configuration_says() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let target = Store::connect(&StoreSettings::Postgres(pg), dir.path(), "a")
            .await
            .unwrap();
        let (old, other) = (dir.path().join("old"), dir.path().join("other"));
        for d in [&old, &other] {
            let ca = CertAuthority::generate("a CA", Duration::from_secs(3600)).unwrap();
            std::fs::create_dir_all(d.join("pki")).unwrap();
            tapgraph::fsutil::write_private(&d.join("pki/ca.pem"), ca.cert_pem().as_bytes())
                .unwrap();
            tapgraph::fsutil::write_private(&d.join("pki/ca.key"), ca.key_pem().as_bytes())
                .unwrap();
        }
        let pki = |ca_files: Option<&Path>, seal_key_file: Option<PathBuf>| PkiSettings {
            dir: dir.path().join("new/pki"),
            ca_files: ca_files.map(|d| (d.join("pki/ca.pem"), d.join("pki/ca.key"))),
            seal_key_file,
            server_names: vec!["localhost".into()],
            server_lifetime: Duration::from_secs(3600),
        };
        let said = |pki: &PkiSettings, from: &Path| {
            let mut out = Vec::new();
            copy_ca(pki, from, &target, &mut out).map(|()| String::from_utf8(out).unwrap())
        };
        // The operator's files, the old controller's own: nothing to copy. Others: a warning.
        let same = said(&pki(Some(&old), None), &old).unwrap();
        assert!(same.contains("nothing to copy"), "{same}");
        let warned = said(&pki(Some(&other), None), &old).unwrap();
        assert!(
            warned.contains("WARNING") && warned.contains("refuse"),
            "{warned}"
        );
        // Neither way to share one: the steps, naming the files.
        let steps = said(&pki(None, None), &old).unwrap();
        for part in ["pki.ca_cert", "pki.ca_seal_key_file", "old/pki/ca.key"] {
            assert!(steps.contains(part), "{part}: {steps}");
        }
        // Sealed into the database, once; again is the same; another CA is refused.
        let seal_key = dir.path().join("seal.key");
        tapgraph::fsutil::write_private(&seal_key, &[3u8; 32]).unwrap();
        let sealed = pki(None, Some(seal_key.clone()));
        assert!(said(&sealed, &old).unwrap().contains("sealed with"));
        assert!(said(&sealed, &old).unwrap().contains("sealed with"));
        let e = said(&sealed, &other).err().unwrap().to_string();
        let fingerprint = |d: &Path| {
            let pem = |f| std::fs::read_to_string(d.join(f)).unwrap();
            CertAuthority::from_pem(&pem("pki/ca.pem"), &pem("pki/ca.key"))
                .unwrap()
                .fingerprint()
        };
        assert!(
            e.contains(&fingerprint(&old)) && e.contains(&fingerprint(&other)),
            "{e}"
        );
    }
}
