//! The controller's PKI in its state directory: the CA (made on first start, or the operator's), and
//! the serving certificate, reused while its names match and most of its lifetime remains.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tapgraph::fsutil;
use tapgraph::identity::Identity;
use tapgraph::pki::{self, CertAuthority};
use tapgraph::tls::{self, ServerConfig};

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
    pub server_names: Vec<String>,
    pub server_lifetime: Duration,
}

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    fsutil::write_private(path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Creates the CA unless another process wins the race: the key is claimed with a hard link, which
/// fails if it exists, so exactly one CA is ever written; the loser uses the winner's.
fn create_ca(cert: &Path, key: &Path) -> Result<(), String> {
    let ca = CertAuthority::generate("tapgraph controller CA", CA_LIFETIME)
        .map_err(|e| e.to_string())?;
    let pid = std::process::id();
    let (key_tmp, cert_tmp) = (
        key.with_extension(format!("key.{pid}")),
        cert.with_extension(format!("pem.{pid}")),
    );
    write(&key_tmp, &ca.key_pem())?;
    write(&cert_tmp, ca.cert_pem())?;
    let won = std::fs::hard_link(&key_tmp, key).is_ok();
    if won {
        std::fs::rename(&cert_tmp, cert).map_err(|e| format!("{}: {e}", cert.display()))?;
        tracing::info!(fingerprint = %ca.fingerprint(), path = %cert.display(), "created the controller CA");
    }
    let _ = std::fs::remove_file(&key_tmp);
    let _ = std::fs::remove_file(&cert_tmp);
    Ok(())
}

impl ControllerPki {
    /// Loads the PKI from `settings.dir`, creating what is missing. Every file is written 0600.
    pub fn load_or_create(settings: &PkiSettings) -> Result<Self, String> {
        if let Some(state) = settings.dir.parent() {
            fsutil::private_dir(state).map_err(|e| format!("{}: {e}", state.display()))?;
        }
        fsutil::private_dir(&settings.dir)
            .map_err(|e| format!("{}: {e}", settings.dir.display()))?;
        let ca = match &settings.ca_files {
            Some((cert, key)) => {
                fsutil::check_private(key)?;
                CertAuthority::from_pem(&read(cert)?, &read(key)?)
                    .map_err(|e| format!("operator CA {}: {e}", cert.display()))?
            }
            None => {
                let (cert, key) = (settings.dir.join("ca.pem"), settings.dir.join("ca.key"));
                if !cert.exists() && !key.exists() {
                    create_ca(&cert, &key)?;
                }
                // Another process (a controller starting, `operator issue`) may be creating it:
                // its key is claimed first, the certificate follows within moments.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while !cert.exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                fsutil::check_private(&key)?;
                CertAuthority::from_pem(&read(&cert)?, &read(&key)?)
                    .map_err(|e| format!("{}: {e}", cert.display()))?
            }
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
                    .map_err(|e| format!("serving certificate: {e}"))?;
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
    pub fn server_config(&self) -> Result<std::sync::Arc<ServerConfig>, String> {
        let chain = tls::parse_certs(self.server_cert_pem.as_bytes())
            .map_err(|e| e.unwrap_or_else(|| "serving certificate missing".into()))?;
        let key = tls::parse_key(self.server_key_pem.as_bytes())?;
        let roots = tls::roots_from_pem(self.ca.cert_pem().as_bytes())?;
        tls::server_config(chain, key, roots).map_err(|e| e.to_string())
    }
}
