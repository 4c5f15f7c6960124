//! Certificates: a CA, and leaf certificates that carry a tapgraph identity in their URI SAN.
//! Used by the controller's enrollment CA and by agents making their key and CSR.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::fsutil;
use crate::identity::Identity;
use crate::tls;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("`{0}` is neither an IP address nor a DNS name")]
    BadSan(String),
    #[error("malformed CSR: {0}")]
    BadCsr(String),
    #[error("unsupported key type in CSR: {0}; use ECDSA P-256, ECDSA P-384 or Ed25519")]
    UnsupportedKey(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The PEM text of a certificate holds none, or does not decode.
    #[error(transparent)]
    Pem(#[from] tls::PemError),
    /// The first certificate of a PEM text is not X.509.
    #[error("certificate does not parse: {0}")]
    BadCertificate(x509_parser::nom::Err<x509_parser::error::X509Error>),
}

/// Clock skew tolerated between hosts: certificates are valid from this long before issuance.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

/// A certificate authority able to sign leaf certificates.
pub struct CertAuthority {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

fn validity(params: &mut CertificateParams, lifetime: Duration) -> SystemTime {
    let now = SystemTime::now();
    let not_after = now + lifetime;
    params.not_before = (now - BACKDATE).into();
    params.not_after = not_after.into();
    not_after
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tapgraph");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Parses `127.0.0.1` or `controller.example` into a SAN entry.
pub fn san(entry: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !entry.is_empty()
        && entry.len() <= 253
        && entry
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !valid {
        return Err(PkiError::BadSan(entry.to_string()));
    }
    Ok(SanType::DnsName(
        entry
            .try_into()
            .map_err(|_| PkiError::BadSan(entry.to_string()))?,
    ))
}

impl CertAuthority {
    /// A new self-signed CA with an ECDSA P-256 key.
    pub fn generate(common_name: &str, lifetime: Duration) -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(random_serial());
        validity(&mut params, lifetime);
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// An existing CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        let der = tls::parse_certs(cert_pem.as_bytes())
            .ok()
            .and_then(|c| c.into_iter().next())
            .ok_or(PkiError::Rcgen(rcgen::Error::CouldNotParseCertificate))?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            cert_der: der.to_vec(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// SHA-256 of the CA certificate, as agents pin it.
    pub fn fingerprint(&self) -> String {
        tls::fingerprint(&self.cert_der)
    }

    /// Issues a certificate for `identity` with a fresh key. `names` are extra DNS or IP SANs that a
    /// server certificate is reached by.
    pub fn issue(
        &self,
        identity: &Identity,
        names: &[String],
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = leaf_params(identity, names)?;
        let not_after = validity(&mut params, lifetime);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

/// Largest CSR accepted, PEM: an ECDSA CSR is under 1 KiB.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

impl CertAuthority {
    /// Signs the public key of a PKCS#10 request for `identity`. Only the key is taken from the
    /// request: names, extensions and lifetime are the CA's choice, so a client cannot ask for
    /// another identity.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let csr = parse_csr(csr_pem)?;
        let alg = csr.public_key.algorithm();
        let supported = [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ];
        if !supported.contains(&alg) {
            return Err(PkiError::UnsupportedKey(format!("{alg:?}")));
        }
        let mut params = leaf_params(identity, &[])?;
        let not_after = validity(&mut params, lifetime);
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: String::new(),
            not_after,
        })
    }
}

/// A fresh ECDSA P-256 key and a CSR for it, both PEM: the key never leaves the caller.
pub fn new_key_and_csr(common_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// A CSR for a key the caller already holds (PEM): re-enrolling with it proves the caller is the
/// holder of the certificates issued for that key.
pub fn csr_for_key(key_pem: &str, common_name: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    Ok(params.serialize_request(&key)?.pem()?)
}

/// A PEM CSR of at most [`MAX_CSR_BYTES`] whose signature verifies (`from_pem` checks it with the
/// CSR's own public key): its sender holds that key's private key.
fn parse_csr(csr_pem: &str) -> Result<rcgen::CertificateSigningRequestParams, PkiError> {
    if csr_pem.len() > MAX_CSR_BYTES {
        return Err(PkiError::BadCsr(format!(
            "{} bytes; at most {MAX_CSR_BYTES} are accepted",
            csr_pem.len()
        )));
    }
    rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::BadCsr(e.to_string()))
}

/// SHA-256 (hex) of the public key (SubjectPublicKeyInfo, DER) of a CSR whose signature verifies:
/// the sender of the CSR holds the private key of that public key.
pub fn csr_key_sha256(csr_pem: &str) -> Result<String, PkiError> {
    let csr = parse_csr(csr_pem)?;
    Ok(tls::fingerprint(
        &rcgen::PublicKeyData::subject_public_key_info(&csr.public_key),
    ))
}

/// SHA-256 (hex) of the public key (SubjectPublicKeyInfo, DER) of a DER certificate: the same
/// value [`csr_key_sha256`] gives for the CSR the certificate was signed from.
pub fn cert_key_sha256(der: &[u8]) -> Result<String, PkiError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| PkiError::BadCsr(format!("certificate: {e}")))?;
    Ok(tls::fingerprint(cert.tbs_certificate.subject_pki.raw))
}

/// What a certificate says about itself.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    pub identity: Option<Identity>,
}

impl CertInfo {
    /// When the certificate was issued: `not_before` is backdated by [`BACKDATE`] for clock skew
    /// (a certificate from another CA may not be; then it is `not_before` itself).
    pub fn issued_at(&self) -> SystemTime {
        let backdated = self.not_before + BACKDATE;
        if backdated < self.not_after {
            backdated
        } else {
            self.not_before
        }
    }

    /// The moment `fraction` of the lifetime since issuance has passed (renewal at 0.7).
    pub fn at_fraction(&self, fraction: f64) -> SystemTime {
        let issued = self.issued_at();
        let life = self.not_after.duration_since(issued).unwrap_or_default();
        issued + life.mul_f64(fraction)
    }
}

/// Reads validity, serial and identity from the first certificate of a PEM text.
pub fn cert_info(pem: &str) -> Result<CertInfo, PkiError> {
    use x509_parser::prelude::FromDer;
    let der = tls::parse_certs(pem.as_bytes())?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der[0])
        .map_err(PkiError::BadCertificate)?;
    let to_time = |t: x509_parser::time::ASN1Time| {
        std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    Ok(CertInfo {
        not_before: to_time(cert.validity().not_before),
        not_after: to_time(cert.validity().not_after),
        serial: cert.raw_serial_as_string(),
        identity: Identity::from_cert_der(&der[0]).ok(),
    })
}

fn leaf_params(identity: &Identity, names: &[String]) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&identity.to_string());
    params.serial_number = Some(random_serial());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match identity {
        Identity::Controller => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Identity::Agent(_) | Identity::Operator(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.subject_alt_names = vec![SanType::URI(
        identity
            .uri()
            .try_into()
            .map_err(|_| PkiError::BadSan(identity.uri()))?,
    )];
    for entry in names {
        params.subject_alt_names.push(san(entry)?);
    }
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Writes a certificate (0644) and its key (0600) as `<stem>.pem` and `<stem>.key` in `dir`.
pub fn write_pair(dir: &Path, stem: &str, cert: &IssuedCert) -> Result<(), PkiError> {
    let io = |path: PathBuf| move |source| PkiError::Io { path, source };
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    fsutil::write_atomic(&cert_path, cert.cert_pem.as_bytes(), 0o644).map_err(io(cert_path))?;
    fsutil::write_private(&key_path, cert.key_pem.as_bytes()).map_err(io(key_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = CertAuthority::generate("test", Duration::from_secs(3600)).unwrap();
        let id = Identity::agent("web-1").unwrap();
        let cert = ca
            .issue(&id, &["127.0.0.1".into()], Duration::from_secs(60))
            .unwrap();
        let der = tls::parse_certs(cert.cert_pem.as_bytes()).unwrap();
        assert_eq!(Identity::from_cert_der(&der[0]).unwrap(), id);
        // A reloaded CA signs certificates that chain to the same root.
        let again = CertAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
    }

    #[test]
    fn a_csr_names_its_key_and_a_kept_key_makes_the_same_name() {
        let (key, csr) = new_key_and_csr("host").unwrap();
        let again = csr_for_key(&key, "host").unwrap();
        assert_ne!(csr, again, "a new signature");
        assert_eq!(
            csr_key_sha256(&csr).unwrap(),
            csr_key_sha256(&again).unwrap()
        );
        let (_, other) = new_key_and_csr("host").unwrap();
        assert_ne!(
            csr_key_sha256(&csr).unwrap(),
            csr_key_sha256(&other).unwrap()
        );
        assert!(matches!(
            csr_key_sha256("garbage"),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn a_certificate_s_key_hash_is_its_csr_s() {
        let ca = CertAuthority::generate("test CA", Duration::from_secs(3600)).unwrap();
        let (_key, csr) = new_key_and_csr("host").unwrap();
        let cert = ca
            .sign_csr(
                &csr,
                &Identity::agent("a1").unwrap(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let der = tls::parse_certs(cert.cert_pem.as_bytes()).unwrap();
        assert_eq!(
            cert_key_sha256(&der[0]).unwrap(),
            csr_key_sha256(&csr).unwrap()
        );
        let other = ca
            .issue(
                &Identity::agent("a2").unwrap(),
                &[],
                Duration::from_secs(3600),
            )
            .unwrap();
        let der = tls::parse_certs(other.cert_pem.as_bytes()).unwrap();
        assert_ne!(
            cert_key_sha256(&der[0]).unwrap(),
            csr_key_sha256(&csr).unwrap()
        );
    }

    #[test]
    fn csrs_are_signed_for_the_ca_chosen_identity_only() {
        let ca = CertAuthority::generate("test", Duration::from_secs(3600)).unwrap();
        let (_key, csr) = new_key_and_csr("whatever the client asks").unwrap();
        let id = Identity::agent("db-1").unwrap();
        let cert = ca.sign_csr(&csr, &id, Duration::from_secs(600)).unwrap();
        let info = cert_info(&cert.cert_pem).unwrap();
        assert_eq!(info.identity, Some(id));
        let life = info.not_after.duration_since(info.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(600) + BACKDATE);
        // Renewal is due at 70% of the 600 s since issuance, not of the backdated span.
        let due = info
            .at_fraction(0.7)
            .duration_since(info.issued_at())
            .unwrap();
        assert_eq!(due, Duration::from_secs(420));
    }

    #[test]
    fn bad_and_unsupported_csrs_are_refused() {
        let ca = CertAuthority::generate("test", Duration::from_secs(3600)).unwrap();
        let id = Identity::agent("x").unwrap();
        let garbage =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(
            ca.sign_csr(garbage, &id, Duration::from_secs(60)),
            Err(PkiError::BadCsr(_))
        ));
        assert!(matches!(
            ca.sign_csr("not pem at all", &id, Duration::from_secs(60)),
            Err(PkiError::BadCsr(_))
        ));
        let huge = "A".repeat(MAX_CSR_BYTES + 1);
        assert!(matches!(
            ca.sign_csr(&huge, &id, Duration::from_secs(60)),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn cert_info_says_why_a_text_is_no_certificate() {
        let error = cert_info("junk").unwrap_err();
        assert!(
            matches!(error, PkiError::Pem(tls::PemError::NoCertificate)),
            "{error:?}"
        );
        assert_eq!(error.to_string(), "no PEM certificate");
        // Three zero bytes: valid PEM, not X.509.
        let not_der = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let error = cert_info(not_der).unwrap_err();
        assert!(matches!(error, PkiError::BadCertificate(_)), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with("certificate does not parse: "),
            "{error}"
        );
    }

    #[test]
    fn refuses_bad_names() {
        assert!(san("bad name").is_err());
        assert!(san("").is_err());
        assert!(san("a..b").is_err());
        assert!(san("::1").is_ok());
        assert!(san("controller.example").is_ok());
    }
}
