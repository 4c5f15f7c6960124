//! rustls configurations for both ends: TLS 1.3 only, aws-lc-rs as the one crypto provider, HTTP/2
//! by ALPN, and a client certificate required by the controller.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};

use crate::fsutil;

pub use rustls::{ClientConfig, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: certificate does not parse or is not a valid CA: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("certificate and key do not form a usable identity: {0}")]
    Identity(String),
}

/// Why PEM text held in memory (a config value, an enrollment response) gave no certificate, key or
/// root store.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// A PEM section does not decode.
    #[error("bad PEM: {0}")]
    Malformed(rustls::pki_types::pem::Error),
    /// The text holds no `CERTIFICATE` section.
    #[error("no PEM certificate")]
    NoCertificate,
    /// The text holds no private key, or one that does not decode.
    #[error("no usable private key: {0}")]
    NoKey(rustls::pki_types::pem::Error),
    /// A certificate decodes but cannot be a trust anchor.
    #[error("{0}")]
    BadRoot(rustls::Error),
}

/// A text that is not a SHA-256 fingerprint; it holds the text as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a SHA-256 fingerprint (64 hex digits, as `tapgraphctl token create` prints)")]
pub struct BadFingerprint(pub String);

/// The paths of one party's certificate, its private key and the CA bundle it trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl TlsFiles {
    /// A client configuration presenting these files.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        client_config_files(&self.ca, Some((&self.cert, &self.key)))
    }
}

/// The one crypto provider of the whole workspace: aws-lc-rs, which seals AES-256-GCM in about half
/// ring's time on CPUs with vector AES, and every mirrored byte is sealed by the agent and opened by
/// the controller (BENCHMARKS.md, "TLS on aws-lc-rs"). The first call also makes it the process
/// default, so a library that builds a rustls configuration without naming a provider gets the
/// same one. Where another crate also compiles ring into rustls (neo4rs, in the controller), rustls
/// would otherwise refuse to choose, and panic.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let provider = rustls::crypto::aws_lc_rs::default_provider();
            // An error means a default is already set (by the embedding program): it stays.
            let _ = provider.clone().install_default();
            Arc::new(provider)
        })
        .clone()
}

/// Makes [`provider`] the process default now. Every binary calls it first in `main`, so that no
/// order of start-up leaves a library that builds rustls configurations without naming a provider
/// (neo4rs, in the controller) without one. Built together, the workspace's binaries all get the
/// ring feature neo4rs turns on.
pub fn install_default_provider() {
    provider();
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse_certs(&bytes).map_err(|error| match error {
        PemError::NoCertificate => TlsError::NoCertificate {
            path: path.to_path_buf(),
        },
        error => TlsError::File {
            path: path.to_path_buf(),
            reason: error.to_string(),
        },
    })
}

/// Parses every PEM certificate in `pem`; [`PemError::NoCertificate`] when there is none.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(PemError::Malformed)?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// Loads a private key, refusing one that group or others can read.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    fsutil::check_private(path).map_err(|reason| TlsError::File {
        path: path.to_path_buf(),
        reason,
    })?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: format!("no usable private key: {e}"),
    })
}

pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// SHA-256 of a DER certificate, lowercase hex: what `--ca-fingerprint` pins.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A server configuration for the controller: TLS 1.3, serving `chain` (leaf first, then the CA, so
/// an enrolling agent can pin the CA by fingerprint). A client certificate is verified against
/// `client_roots` when presented; it is optional at this layer so agents can enroll on the same
/// port, and every RPC except `Enroll` refuses a caller without one.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: RootCertStore,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(client_roots), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Identity(format!("client CA: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Identity(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration trusting `roots`, presenting `identity` (chain and key) if given.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Identity(e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration from files: trust `ca`, present `identity` (certificate, key) if given.
pub fn client_config_files(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let identity = match identity {
        Some((cert, key)) => Some((load_certs(cert)?, load_key(key)?)),
        None => None,
    };
    client_config(load_roots(ca)?, identity)
}

/// Parses a PEM private key held in memory.
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(PemError::NoKey)
}

/// Builds a root store from PEM certificates held in memory.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(pem)? {
        roots.add(cert).map_err(PemError::BadRoot)?;
    }
    Ok(roots)
}

/// A client configuration for enrollment: no client certificate, and the server is trusted only if
/// its chain carries a CA whose SHA-256 fingerprint is `fingerprint` and the leaf verifies against
/// that CA. Nothing is sent to a server that fails this.
pub fn pinned_client_config(fingerprint: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let wanted =
        normalize_fingerprint(fingerprint).map_err(|e| TlsError::Identity(e.to_string()))?;
    let verifier = Arc::new(PinnedCa {
        fingerprint: wanted,
        provider: provider(),
    });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Identity(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts `ab:cd:…` or `abcd…` (any case); returns 64 lowercase hex digits.
pub fn normalize_fingerprint(text: &str) -> Result<String, BadFingerprint> {
    let hex = text
        .trim()
        .trim_start_matches("sha256:")
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(BadFingerprint(text.to_string()));
    }
    Ok(hex)
}

#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
        else {
            let seen: Vec<String> = intermediates.iter().map(|c| fingerprint(c)).collect();
            return Err(rustls::Error::General(format!(
                "controller CA fingerprint mismatch: expected {}, the controller presented {}",
                self.fingerprint,
                if seen.is_empty() {
                    "no CA certificate".to_string()
                } else {
                    seen.join(", ")
                }
            )));
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA is unusable: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test build compiles ring into rustls too (through neo4rs), where a configuration built
    /// without naming a provider panics unless a process default is set: `provider()` sets ours.
    #[test]
    fn the_provider_is_aws_lc_rs_and_the_process_default() {
        let groups = |p: &rustls::crypto::CryptoProvider| {
            p.kx_groups
                .iter()
                .map(|g| format!("{:?}", g.name()))
                .collect::<Vec<_>>()
        };
        let aws_lc = groups(&rustls::crypto::aws_lc_rs::default_provider());
        // ring has no post-quantum hybrid: this is what tells the two apart.
        assert!(aws_lc.contains(&"X25519MLKEM768".to_string()), "{aws_lc:?}");
        assert_eq!(groups(&provider()), aws_lc);
        let default =
            rustls::crypto::CryptoProvider::get_default().expect("installed by provider()");
        assert_eq!(groups(default), aws_lc);
        let _ = ClientConfig::builder().with_root_certificates(RootCertStore::empty());
    }

    #[test]
    fn fingerprints_normalize() {
        let hex = "AB".repeat(32);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(normalize_fingerprint(&hex).unwrap(), "ab".repeat(32));
        assert_eq!(normalize_fingerprint(&colons).unwrap(), "ab".repeat(32));
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn pem_errors_say_what_is_missing() {
        assert!(matches!(parse_certs(b""), Err(PemError::NoCertificate)));
        assert_eq!(
            parse_certs(b"junk").unwrap_err().to_string(),
            "no PEM certificate"
        );
        let undecodable = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        let error = parse_certs(undecodable).unwrap_err();
        assert!(matches!(error, PemError::Malformed(_)), "{error:?}");
        assert!(error.to_string().starts_with("bad PEM: "), "{error}");
        let error = parse_key(b"junk").unwrap_err();
        assert!(
            error.to_string().starts_with("no usable private key: "),
            "{error}"
        );
        assert!(matches!(
            roots_from_pem(b"junk"),
            Err(PemError::NoCertificate)
        ));
        // Three zero bytes: valid PEM, not a certificate.
        let not_der = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(roots_from_pem(not_der), Err(PemError::BadRoot(_))));
    }

    #[test]
    fn a_bad_fingerprint_is_quoted_in_its_error() {
        assert_eq!(
            normalize_fingerprint("abc").unwrap_err(),
            BadFingerprint("abc".into())
        );
        assert_eq!(
            normalize_fingerprint(" abc").unwrap_err().to_string(),
            "` abc` is not a SHA-256 fingerprint (64 hex digits, as `tapgraphctl token create` prints)"
        );
    }
}
