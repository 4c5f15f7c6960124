//! The controller's PKI: the CA, and this controller's serving certificate in its state directory,
//! reused while its names match and most of its lifetime remains. The CA is the operator's
//! (`pki.ca_cert`, `pki.ca_key`: the same files on every replica), or one the controller made on
//! its first start: in its state directory, or, for replicas sharing a database, in the database
//! sealed with `pki.ca_seal_key_file` (`seal.rs`). Each replica issues its own serving certificate
//! (its own names) from it.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tapgraph::fsutil;
use tapgraph::identity::Identity;
use tapgraph::pki::{self, CertAuthority, PkiError};
use tapgraph::tls::{self, PemError, ServerConfig, TlsError};

use super::seal::{self, SealKey, SealKeyError};
use crate::store::{Store, StoreError};

/// The CA and the serving identity, ready for TLS.
pub struct ControllerPki {
    pub ca: CertAuthority,
    pub server_cert_pem: String,
    pub server_key_pem: String,
}

/// Where the PKI lives and what it must contain.
#[derive(Debug, Clone)]
pub struct PkiSettings {
    pub dir: PathBuf,
    /// An operator-supplied CA (certificate, key) instead of a generated one.
    pub ca_files: Option<(PathBuf, PathBuf)>,
    /// `pki.ca_seal_key_file`: the CA replicas share is kept in the database, sealed with this key
    /// (only with `store.backend = "postgres"` and no `ca_files`).
    pub seal_key_file: Option<PathBuf>,
    pub server_names: Vec<String>,
    pub server_lifetime: Duration,
}

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

/// Why the controller's PKI could not be loaded, created or served; each names the file or the
/// certificate it is about.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file or directory of the PKI cannot be read, written or created.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A key file is missing or readable by group or others (the text names the file).
    #[error("{0}")]
    NotPrivate(String),
    /// A new CA could not be generated.
    #[error("{0}")]
    Generate(PkiError),
    /// The operator's CA certificate and key (`pki.ca_cert`, `pki.ca_key`) do not form a CA.
    #[error("operator CA {path}: {error}")]
    OperatorCa { path: PathBuf, error: PkiError },
    /// The CA in the state directory does not load.
    #[error("{path}: {error}")]
    Ca { path: PathBuf, error: PkiError },
    /// The serving certificate could not be issued.
    #[error("serving certificate: {0}")]
    Issue(PkiError),
    /// The serving certificate's PEM holds no certificate.
    #[error("serving certificate missing")]
    ServingCertMissing,
    /// The shared CA cannot be sealed, or does not open with this replica's seal key (the text
    /// names the database and the key file).
    #[error("{0}")]
    Seal(String),
    /// `pki.ca_seal_key_file` cannot be used.
    #[error("pki.ca_seal_key_file {0}")]
    SealKey(#[from] SealKeyError),
    /// The database holding the shared CA refused or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The serving certificate, its key or the CA is not usable PEM.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the serving chain, its key or the CA.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError {
    let path = path.to_path_buf();
    move |source| CaError::Io { path, source }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(io(path))
}

fn write(path: &Path, text: &str) -> Result<(), CaError> {
    fsutil::write_private(path, text.as_bytes()).map_err(io(path))
}

/// Creates the CA unless another process wins the race: the key is claimed with a hard link, which
/// fails if it exists, so exactly one CA is ever written; the loser uses the winner's.
fn create_ca(cert: &Path, key: &Path) -> Result<(), CaError> {
    let ca = CertAuthority::generate("tapgraph controller CA", CA_LIFETIME)
        .map_err(CaError::Generate)?;
    let pid = std::process::id();
    let (key_tmp, cert_tmp) = (
        key.with_extension(format!("key.{pid}")),
        cert.with_extension(format!("pem.{pid}")),
    );
    write(&key_tmp, &ca.key_pem())?;
    write(&cert_tmp, ca.cert_pem())?;
    let won = std::fs::hard_link(&key_tmp, key).is_ok();
    if won {
        std::fs::rename(&cert_tmp, cert).map_err(io(cert))?;
        tracing::info!(fingerprint = %ca.fingerprint(), path = %cert.display(), "created the controller CA");
    }
    let _ = std::fs::remove_file(&key_tmp);
    let _ = std::fs::remove_file(&cert_tmp);
    Ok(())
}

/// The CA in the state directory `dir`, created on the first start.
fn local_ca(dir: &Path) -> Result<CertAuthority, CaError> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if !cert.exists() && !key.exists() {
        create_ca(&cert, &key)?;
    }
    // Another process (a controller starting, `operator issue`) may be creating it:
    // its key is claimed first, the certificate follows within moments.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !cert.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    fsutil::check_private(&key).map_err(CaError::NotPrivate)?;
    CertAuthority::from_pem(&read(&cert)?, &read(&key)?)
        .map_err(|error| CaError::Ca { path: cert, error })
}

/// The CA the first replica stores for all: the one a single controller made in the state
/// directory `dir` before it became a replica (its agents' certificates stay valid), or a new one
/// (kept only in the database, sealed).
fn first_ca(dir: &Path) -> Result<CertAuthority, CaError> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert.exists() && key.exists() {
        tracing::info!(path = %cert.display(), "no CA in the database yet: storing this controller's CA from its state directory");
        return local_ca(dir);
    }
    CertAuthority::generate("tapgraph controller CA", CA_LIFETIME).map_err(CaError::Generate)
}

/// A CA this controller made in `dir` before it joined replicas that already had another one:
/// its agents' certificates are refused now, which an operator should hear of.
fn warn_if_other_local_ca(dir: &Path, shared: &CertAuthority) {
    let Ok(local) = read(&dir.join("ca.pem")) else {
        return;
    };
    if local.trim() != shared.cert_pem().trim() {
        tracing::warn!(path = %dir.join("ca.pem").display(), shared = %shared.fingerprint(), "this state directory holds another CA than the one the replicas share: certificates it issued are not accepted (a replica brings its own CA only to an empty database; enroll those agents again)");
    }
}

impl ControllerPki {
    /// Loads the PKI from `settings.dir`, creating what is missing. Every file is written 0600.
    #[cfg(test)]
    pub fn load_or_create(settings: &PkiSettings) -> Result<Self, CaError> {
        Self::load(settings, None)
    }

    /// Loads the PKI, creating what is missing: the CA from the operator's files, from the
    /// database replicas share (`shared`: the store and this replica's name; with
    /// `pki.ca_seal_key_file`), or from `settings.dir`; the serving certificate from
    /// `settings.dir`. Every file is written 0600.
    pub fn load(settings: &PkiSettings, shared: Option<(&Store, &str)>) -> Result<Self, CaError> {
        if let Some(state) = settings.dir.parent() {
            fsutil::private_dir(state).map_err(io(state))?;
        }
        fsutil::private_dir(&settings.dir).map_err(io(&settings.dir))?;
        let ca = match (&settings.ca_files, &settings.seal_key_file) {
            (Some((cert, key)), _) => {
                fsutil::check_private(key).map_err(CaError::NotPrivate)?;
                CertAuthority::from_pem(&read(cert)?, &read(key)?).map_err(|error| {
                    CaError::OperatorCa {
                        path: cert.clone(),
                        error,
                    }
                })?
            }
            (None, Some(seal_key)) => {
                let Some((store, replica)) = shared else {
                    return Err(CaError::Seal(format!(
                        "{}: the sealed CA is kept in the database: store.backend = \"postgres\"",
                        seal::SEAL_KEY
                    )));
                };
                let key = SealKey::read(seal_key)?;
                let ca = seal::shared_ca(store, &key, replica, || first_ca(&settings.dir))?;
                warn_if_other_local_ca(&settings.dir, &ca);
                ca
            }
            (None, None) if shared.is_some() => {
                return Err(CaError::Seal(seal::NO_SHARED_CA.into()));
            }
            (None, None) => local_ca(&settings.dir)?,
        };
        let (cert_path, key_path, names_path) = (
            settings.dir.join("server.pem"),
            settings.dir.join("server.key"),
            settings.dir.join("server.names"),
        );
        let names = settings.server_names.join("\n");
        let reusable = (|| {
            let cert = read(&cert_path).ok()?;
            let key = read(&key_path).ok()?;
            (read(&names_path).ok()? == names).then_some(())?;
            let info = pki::cert_info(&cert).ok()?;
            // Same CA, and less than 70% of the lifetime used.
            (info.at_fraction(0.7) > SystemTime::now()).then_some(())?;
            cert.contains(ca.cert_pem().trim()).then_some((cert, key))
        })();
        let (server_cert_pem, server_key_pem) = match reusable {
            Some(pair) => pair,
            None => {
                let issued = ca
                    .issue(
                        &Identity::Controller,
                        &settings.server_names,
                        settings.server_lifetime,
                    )
                    .map_err(CaError::Issue)?;
                // The chain carries the CA so enrolling agents can pin it by fingerprint.
                let chain = format!("{}{}", issued.cert_pem, ca.cert_pem());
                write(&key_path, &issued.key_pem)?;
                write(&cert_path, &chain)?;
                write(&names_path, &names)?;
                tracing::info!(names = ?settings.server_names, "issued the controller serving certificate");
                (chain, issued.key_pem)
            }
        };
        Ok(Self {
            ca,
            server_cert_pem,
            server_key_pem,
        })
    }

    pub fn fingerprint(&self) -> String {
        self.ca.fingerprint()
    }

    /// The TLS configuration serving this PKI; clients are verified against the CA.
    pub fn server_config(&self) -> Result<std::sync::Arc<ServerConfig>, CaError> {
        let chain =
            tls::parse_certs(self.server_cert_pem.as_bytes()).map_err(|error| match error {
                PemError::NoCertificate => CaError::ServingCertMissing,
                error => CaError::Pem(error),
            })?;
        let key = tls::parse_key(self.server_key_pem.as_bytes())?;
        let roots = tls::roots_from_pem(self.ca.cert_pem().as_bytes())?;
        Ok(tls::server_config(chain, key, roots)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> PkiSettings {
        PkiSettings {
            dir: dir.join("pki"),
            ca_files: None,
            seal_key_file: None,
            server_names: vec!["127.0.0.1".into()],
            server_lifetime: Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_made_pki_is_reloaded_and_serves() {
        let dir = tempfile::tempdir().unwrap();
        let first = ControllerPki::load_or_create(&settings(dir.path())).unwrap();
        let again = ControllerPki::load_or_create(&settings(dir.path())).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.server_cert_pem, again.server_cert_pem, "reused");
        assert!(again.server_config().is_ok());
    }

    /// Replicas on one database: one CA, each its own serving certificate; without a way to
    /// share a CA they do not start; with the operator's CA nothing goes into the database.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_share_the_ca_and_each_serves_its_own_names() {
        let Some(pg) = crate::store::testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let settings_pg = crate::store::StoreSettings::Postgres(pg);
        let store = Store::connect(&settings_pg, dir.path(), "a").await.unwrap();
        let mut none = settings(&dir.path().join("x"));
        let e = ControllerPki::load(&none, Some((&store, "a")))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("pki.ca_cert") && e.to_string().contains(seal::SEAL_KEY),
            "{e}"
        );

        let operator = ControllerPki::load_or_create(&settings(&dir.path().join("op"))).unwrap();
        none.ca_files = Some((
            dir.path().join("op/pki/ca.pem"),
            dir.path().join("op/pki/ca.key"),
        ));
        let pki = ControllerPki::load(&none, Some((&store, "a"))).unwrap();
        assert_eq!(pki.fingerprint(), operator.fingerprint());
        let stored: Vec<serde_json::Value> = store.load(redb::TableDefinition::new("pki")).unwrap();
        assert!(
            stored.is_empty(),
            "the operator's CA stays out of the database"
        );

        let seal_key = dir.path().join("seal");
        fsutil::write_private(&seal_key, &[9u8; 32]).unwrap();
        let replica = |name: &str| {
            let mut s = settings(&dir.path().join(name));
            s.seal_key_file = Some(seal_key.clone());
            s.server_names = vec![format!("{name}.example")];
            s
        };
        let a = ControllerPki::load(&replica("a"), Some((&store, "a"))).unwrap();
        let b = ControllerPki::load(&replica("b"), Some((&store, "b"))).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), operator.fingerprint());
        assert!(a.server_cert_pem.contains(b.ca.cert_pem().trim()));
        assert!(b.server_config().is_ok());
        assert!(
            !dir.path().join("a/pki/ca.key").exists(),
            "the CA key is kept in memory only"
        );
        assert_ne!(
            a.server_cert_pem, b.server_cert_pem,
            "each its own serving certificate"
        );
        let names = std::fs::read_to_string(dir.path().join("b/pki/server.names")).unwrap();
        assert_eq!(names, "b.example");
    }

    /// A single controller becoming the first replica brings its CA: its agents stay enrolled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_replica_brings_the_ca_of_its_state_directory() {
        let Some(pg) = crate::store::testpg::database().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let single = ControllerPki::load_or_create(&settings(dir.path())).unwrap();
        let store = Store::connect(&crate::store::StoreSettings::Postgres(pg), dir.path(), "a")
            .await
            .unwrap();
        let seal_key = dir.path().join("seal");
        fsutil::write_private(&seal_key, &[8u8; 32]).unwrap();
        let mut first = settings(dir.path());
        first.seal_key_file = Some(seal_key.clone());
        let a = ControllerPki::load(&first, Some((&store, "a"))).unwrap();
        assert_eq!(a.fingerprint(), single.fingerprint());
        let mut other = settings(&dir.path().join("b"));
        other.seal_key_file = Some(seal_key);
        let b = ControllerPki::load(&other, Some((&store, "b"))).unwrap();
        assert_eq!(b.fingerprint(), single.fingerprint());
    }

    #[test]
    fn errors_name_the_file_they_are_about() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        std::fs::write(&cert, "not a certificate").unwrap();
        fsutil::write_private(&key, b"not a key").unwrap();
        let mut operator = settings(dir.path());
        operator.ca_files = Some((cert.clone(), key.clone()));
        let error = ControllerPki::load_or_create(&operator).err().unwrap();
        assert!(matches!(error, CaError::OperatorCa { .. }), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("operator CA {}: ", cert.display())),
            "{error}"
        );

        std::fs::write(&key, "not a key").unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let error = ControllerPki::load_or_create(&operator).err().unwrap();
        assert!(matches!(error, CaError::NotPrivate(_)), "{error:?}");
        assert!(error.to_string().starts_with(&key.display().to_string()));

        let mut pki = ControllerPki::load_or_create(&settings(dir.path())).unwrap();
        pki.server_cert_pem = "nothing".into();
        let error = pki.server_config().err().unwrap();
        assert_eq!(error.to_string(), "serving certificate missing");
    }
}
