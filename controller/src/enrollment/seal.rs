//! The CA that replicas share through the database (`pki.ca_seal_key_file`): the first replica to
//! start creates it and stores it in the `pki` table with its key sealed (ChaCha20-Poly1305, a
//! random nonce, the certificate as associated data) by a 32-byte key from a file every replica
//! holds. The database never holds the CA key in the clear; a replica with another seal key is
//! refused and overwrites nothing.

use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use redb::TableDefinition;
use serde::{Deserialize, Serialize};
use tapgraph::pki::CertAuthority;

use super::ca::CaError;
use crate::store::{Batch, Store, StoreError, StoreSettings, Table};

/// The `pki` table; the shared CA is its row [`CA_ROW`].
const PKI: Table = TableDefinition::new("pki");
const CA_ROW: &str = "ca";
/// The sealing algorithm, as the row names it.
const ALGORITHM: &str = "chacha20-poly1305";
/// The configuration key, for messages.
pub const SEAL_KEY: &str = "pki.ca_seal_key_file";
/// Why replicas on a shared database without either way of sharing a CA do not start.
pub const NO_SHARED_CA: &str = "store.backend = \"postgres\" needs one CA for every replica: set \
     pki.ca_cert and pki.ca_key (the same files on every replica, e.g. a Kubernetes Secret), or \
     pki.ca_seal_key_file (a file of 32 random bytes, the same on every replica: the first replica \
     creates the CA and stores it in the database sealed with it)";

/// A key that seals the shared CA's key: 32 bytes, never printed.
pub struct SealKey {
    key: [u8; 32],
    /// The file it came from, for messages.
    path: PathBuf,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKey({})", self.path.display())
    }
}

/// Why a seal key file cannot be used; the text names the file.
#[derive(Debug, thiserror::Error)]
pub enum SealKeyError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    NotPrivate(String),
    #[error(
        "{path}: holds {len} bytes; a seal key is 32 bytes (`head -c 32 /dev/urandom > FILE`) \
         or 64 hex digits (`openssl rand -hex 32 > FILE`)"
    )]
    Length { path: PathBuf, len: usize },
}

impl SealKey {
    /// Reads a seal key: a file of exactly 32 bytes, or of 64 hex digits (surrounding
    /// whitespace ignored). The file must not be readable by group or others.
    pub fn read(path: &Path) -> Result<Self, SealKeyError> {
        tapgraph::fsutil::check_private(path).map_err(SealKeyError::NotPrivate)?;
        let bytes = std::fs::read(path).map_err(|source| SealKeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let key = parse_key(&bytes).ok_or_else(|| SealKeyError::Length {
            path: path.to_path_buf(),
            len: bytes.len(),
        })?;
        Ok(SealKey {
            key,
            path: path.to_path_buf(),
        })
    }

    fn aead(&self) -> Result<LessSafeKey, CaError> {
        UnboundKey::new(&CHACHA20_POLY1305, &self.key)
            .map(LessSafeKey::new)
            .map_err(|_| CaError::Seal(format!("{SEAL_KEY}: not a {ALGORITHM} key")))
    }
}

/// 32 raw bytes, or 64 hex digits.
fn parse_key(bytes: &[u8]) -> Option<[u8; 32]> {
    if let Ok(raw) = <[u8; 32]>::try_from(bytes) {
        return Some(raw);
    }
    let text = std::str::from_utf8(bytes).ok()?.trim();
    if text.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// `pki.ca_seal_key_file`, checked against the rest of the configuration: refused where it would
/// do nothing (the embedded store, or the operator's CA set), and a key file that cannot be used
/// is refused here, naming the key. That replicas have one of the two ways to share a CA is
/// checked when the daemon loads its PKI ([`NO_SHARED_CA`]): other subcommands need no CA.
pub fn setting(
    c: &mut tapgraph::config::Layered,
    store: &StoreSettings,
    operator_ca: bool,
) -> Option<PathBuf> {
    let file = c.existing_file(SEAL_KEY);
    let shared = matches!(store, StoreSettings::Postgres(_));
    match file {
        Some(_) if operator_ca => {
            c.fail(
                SEAL_KEY,
                "is for a CA the controller creates; pki.ca_cert and pki.ca_key are set, and that                  CA stays out of the database",
            );
            None
        }
        Some(_) if !shared => {
            c.fail(
                SEAL_KEY,
                "is for store.backend = \"postgres\"; the embedded store keeps the CA in STATE_DIR/pki",
            );
            None
        }
        Some(path) => {
            if let Err(e) = SealKey::read(&path) {
                c.fail(SEAL_KEY, e);
            }
            Some(path)
        }
        None => None,
    }
}

/// The `pki` table's row for the shared CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedCa {
    pub cert_pem: String,
    pub fingerprint: String,
    /// How the key is sealed: "chacha20-poly1305".
    pub algorithm: String,
    /// The nonce, hex.
    pub nonce: String,
    /// The CA key's PEM sealed, with its tag, hex; the certificate is the associated data, so a
    /// key cannot be paired with another certificate.
    pub sealed_key: String,
    /// The replica that created (or brought) the CA, and when.
    pub created_by: String,
    pub created_at_ms: u64,
}

impl SealedCa {
    pub fn seal(ca: &CertAuthority, key: &SealKey, replica: &str) -> Result<Self, CaError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CaError::Seal("no random nonce from the system".into()))?;
        let mut sealed = ca.key_pem().into_bytes();
        key.aead()?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(ca.cert_pem().as_bytes()),
                &mut sealed,
            )
            .map_err(|_| CaError::Seal("sealing the CA key failed".into()))?;
        Ok(SealedCa {
            cert_pem: ca.cert_pem().to_string(),
            fingerprint: ca.fingerprint(),
            algorithm: ALGORITHM.into(),
            nonce: super::tokens::hex(&nonce),
            sealed_key: super::tokens::hex(&sealed),
            created_by: replica.to_string(),
            created_at_ms: super::now_ms(),
        })
    }

    /// The CA, its key opened with `key`; a different seal key (or an altered row) is refused,
    /// naming the file and `database`.
    pub fn open(&self, key: &SealKey, database: &str) -> Result<CertAuthority, CaError> {
        let refused = |why: &str| {
            CaError::Seal(format!(
                "the CA stored in {database} (fingerprint {}, created by {}): {why}",
                self.fingerprint, self.created_by
            ))
        };
        if self.algorithm != ALGORITHM {
            return Err(refused(&format!(
                "sealed with `{}`, which this controller does not know ({ALGORITHM})",
                self.algorithm
            )));
        }
        let nonce = unhex(&self.nonce)
            .and_then(|n| <[u8; NONCE_LEN]>::try_from(n).ok())
            .ok_or_else(|| refused("its nonce is not 12 bytes of hex"))?;
        let mut sealed = unhex(&self.sealed_key).ok_or_else(|| refused("its key is not hex"))?;
        let opened = key
            .aead()?
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.cert_pem.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| {
                refused(&format!(
                    "its key does not open with the seal key in {} ({SEAL_KEY}): every replica \
                     needs the key the first one sealed it with",
                    key.path.display()
                ))
            })?;
        let key_pem = std::str::from_utf8(opened).map_err(|_| refused("its key is not PEM"))?;
        CertAuthority::from_pem(&self.cert_pem, key_pem).map_err(|e| refused(&e.to_string()))
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The CA every replica shares: the one in the database, opened with `key`; or, on the first
/// start, `make()`'s (this replica's own CA from its state directory, or a new one), sealed and
/// stored unless another replica stores one first, whose CA is then used.
pub fn shared_ca(
    store: &Store,
    key: &SealKey,
    replica: &str,
    make: impl FnOnce() -> Result<CertAuthority, CaError>,
) -> Result<CertAuthority, CaError> {
    let database = store.describe();
    if let Some(stored) = store.get::<SealedCa>(PKI, CA_ROW)? {
        return stored.open(key, &database);
    }
    let ca = make()?;
    match store_sealed(store, &ca, key, replica) {
        Ok(()) => {
            tracing::info!(fingerprint = %ca.fingerprint(), store = %database, "stored the controller CA, sealed, for every replica");
            Ok(ca)
        }
        Err(CaError::Store(StoreError::Conflict { .. })) => {
            let stored = store.get::<SealedCa>(PKI, CA_ROW)?.ok_or_else(|| {
                CaError::Seal(format!("the CA in {database} vanished while it was stored"))
            })?;
            stored.open(key, &database)
        }
        Err(e) => Err(e),
    }
}

/// Stores `ca` sealed with `key` as the shared CA, only if there is none yet
/// ([`StoreError::Conflict`] otherwise, and nothing is written).
pub fn store_sealed(
    store: &Store,
    ca: &CertAuthority,
    key: &SealKey,
    replica: &str,
) -> Result<(), CaError> {
    let sealed = SealedCa::seal(ca, key, replica)?;
    let mut batch = Batch::default();
    batch.expect(PKI, CA_ROW, None::<&SealedCa>)?;
    batch.put(PKI, CA_ROW, &sealed)?;
    store.commit(batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::testpg;

    fn key_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        tapgraph::fsutil::write_private(&path, bytes).unwrap();
        path
    }

    fn new_ca() -> Result<CertAuthority, CaError> {
        CertAuthority::generate("test CA", Duration::from_secs(3600)).map_err(CaError::Generate)
    }

    #[test]
    fn a_seal_key_is_32_bytes_or_64_hex_digits_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let raw = key_file(dir.path(), "raw", &[7u8; 32]);
        let key = SealKey::read(&raw).unwrap();
        assert_eq!(key.key, [7u8; 32]);
        // Logged by its file, never by its bytes.
        assert_eq!(format!("{key:?}"), format!("SealKey({})", raw.display()));
        let hex = key_file(
            dir.path(),
            "hex",
            format!("{}\n", "0a".repeat(32)).as_bytes(),
        );
        assert_eq!(SealKey::read(&hex).unwrap().key, [10u8; 32]);
        for (name, bytes) in [
            ("short", vec![1u8; 16]),
            ("long", vec![1u8; 33]),
            ("badhex", "zz".repeat(32).into_bytes()),
        ] {
            let path = key_file(dir.path(), name, &bytes);
            let e = SealKey::read(&path).err().unwrap().to_string();
            assert!(e.starts_with(&path.display().to_string()), "{e}");
            assert!(e.contains("32 bytes"), "{e}");
        }
        std::fs::set_permissions(&raw, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let e = SealKey::read(&raw).err().unwrap().to_string();
        assert!(e.contains("mode 0644"), "{e}");
    }

    #[test]
    fn a_sealed_ca_opens_only_with_its_key_and_its_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let key = SealKey::read(&key_file(dir.path(), "k", &[1u8; 32])).unwrap();
        let other = SealKey::read(&key_file(dir.path(), "other", &[2u8; 32])).unwrap();
        let ca = new_ca().unwrap();
        let sealed = SealedCa::seal(&ca, &key, "a").unwrap();
        let text = serde_json::to_string(&sealed).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "{text}");
        assert!(!text.contains(ca.key_pem().lines().nth(1).unwrap()));
        let opened = sealed.open(&key, "db").unwrap();
        assert_eq!(opened.fingerprint(), ca.fingerprint());
        assert_eq!(opened.key_pem(), ca.key_pem());
        // Sealed twice, two nonces.
        assert_ne!(SealedCa::seal(&ca, &key, "a").unwrap().nonce, sealed.nonce);
        let e = sealed.open(&other, "db").err().unwrap().to_string();
        assert!(e.contains(SEAL_KEY) && e.contains("db"), "{e}");
        // The key paired with another certificate does not open.
        let mut swapped = sealed.clone();
        swapped.cert_pem = new_ca().unwrap().cert_pem().to_string();
        assert!(swapped.open(&key, "db").is_err());
        let mut unknown = sealed;
        unknown.algorithm = "rot13".into();
        let e = unknown.open(&key, "db").err().unwrap().to_string();
        assert!(e.contains("rot13"), "{e}");
    }

    fn config(pairs: &[(&str, &str)]) -> Result<PathBuf, tapgraph::config::ConfigErrors> {
        let env = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        crate::config::ControllerConfig::load(&tapgraph::config::Sources {
            env,
            ..Default::default()
        })
        .map(|c| c.pki.seal_key_file.unwrap_or_default())
    }

    #[test]
    fn the_seal_key_is_taken_only_where_it_seals_something() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_file(dir.path(), "seal", &[5u8; 32]);
        let short = key_file(dir.path(), "short", &[5u8; 31]);
        let key = key.to_str().unwrap();
        let postgres = [
            ("TAPGRAPH_STORE__BACKEND", "postgres"),
            ("TAPGRAPH_STORE__POSTGRES__URL", "postgres://u@db/tapgraph"),
        ];
        let with = |extra: &[(&'static str, &str)]| {
            let mut pairs: Vec<(&str, &str)> = postgres.to_vec();
            pairs.extend_from_slice(extra);
            config(&pairs)
        };
        assert_eq!(
            with(&[("TAPGRAPH_PKI__CA_SEAL_KEY_FILE", key)]).unwrap(),
            PathBuf::from(key)
        );
        let refused = with(&[("TAPGRAPH_PKI__CA_SEAL_KEY_FILE", short.to_str().unwrap())])
            .err()
            .unwrap();
        assert!(refused.mentions(SEAL_KEY), "{refused}");
        assert!(refused.to_string().contains("31 bytes"), "{refused}");
        let refused = config(&[("TAPGRAPH_PKI__CA_SEAL_KEY_FILE", key)])
            .err()
            .unwrap();
        assert!(
            refused.mentions(SEAL_KEY) && refused.to_string().contains("embedded"),
            "{refused}"
        );
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "").unwrap();
        let ca = ca.to_str().unwrap();
        let refused = with(&[
            ("TAPGRAPH_PKI__CA_SEAL_KEY_FILE", key),
            ("TAPGRAPH_PKI__CA_CERT", ca),
            ("TAPGRAPH_PKI__CA_KEY", ca),
        ])
        .err()
        .unwrap();
        assert!(
            refused.mentions(SEAL_KEY) && refused.to_string().contains("pki.ca_cert"),
            "{refused}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replicas_starting_at_once_share_one_ca_and_a_wrong_key_is_refused() {
        let Some(pg) = testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let key_path = key_file(dir.path(), "seal", &[3u8; 32]);
        let settings = StoreSettings::Postgres(pg.clone());
        let mut starts = Vec::new();
        for replica in ["a", "b", "c"] {
            let settings = settings.clone();
            let key_path = key_path.clone();
            let state = dir.path().join(replica);
            starts.push(tokio::spawn(async move {
                let store = Store::connect(&settings, &state, replica).await.unwrap();
                let key = SealKey::read(&key_path).unwrap();
                shared_ca(&store, &key, replica, new_ca)
                    .unwrap()
                    .fingerprint()
            }));
        }
        let mut fingerprints = Vec::new();
        for start in starts {
            fingerprints.push(start.await.unwrap());
        }
        assert!(
            fingerprints.iter().all(|f| *f == fingerprints[0]),
            "{fingerprints:?}"
        );

        let store = Store::connect(&settings, dir.path(), "d").await.unwrap();
        let row: SealedCa = store.get(PKI, CA_ROW).unwrap().unwrap();
        assert_eq!(row.fingerprint, fingerprints[0]);
        assert_eq!(row.algorithm, "chacha20-poly1305");
        // The database's own text of the row holds no key in the clear.
        let client = crate::store::testpg::client(&pg.url).await;
        let text: String = client
            .query_one("SELECT value::text FROM tapgraph.pki WHERE key = 'ca'", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            text.contains("CERTIFICATE") && !text.contains("PRIVATE KEY"),
            "{text}"
        );

        let wrong = SealKey::read(&key_file(dir.path(), "wrong", &[4u8; 32])).unwrap();
        let e = shared_ca(&store, &wrong, "d", new_ca).err().unwrap();
        assert!(e.to_string().contains(SEAL_KEY), "{e}");
        let after: SealedCa = store.get(PKI, CA_ROW).unwrap().unwrap();
        assert_eq!(after, row, "nothing was overwritten");
    }
}
