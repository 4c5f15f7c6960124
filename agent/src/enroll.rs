//! Enrollment and renewal. The private key is made here and never leaves the host; the controller
//! is trusted only if it presents the CA pinned by fingerprint.
//!
//! Enrolling again (an expired certificate, `tapgraph-agent enroll` run twice) reuses the key the
//! agent already holds: the controller gives a host its previous id only if the CSR is signed by
//! that id's key, so a new key would get a new id (`vm-2`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tapgraph::backoff::BackoffPolicy;
use tapgraph::fsutil;
use tapgraph::identity::Identity;
use tapgraph::pki;
use tapgraph::proto::{self, enrollment_service_client::EnrollmentServiceClient};
use tapgraph::tls::TlsFiles;
use tapgraph::transport::ChannelOptions;
use tokio_util::sync::CancellationToken;

use crate::config::Controllers;
use crate::dial::{self, DialError};

/// Why enrollment failed, and whether trying again could help.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EnrollError {
    pub message: String,
    /// True for a refusal (bad token, wrong fingerprint, bad request): retrying cannot succeed.
    pub permanent: bool,
}

impl EnrollError {
    fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: true,
        }
    }

    fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EnrollParams {
    /// Tried in random order, every address of every entry, as the session does.
    pub controller: Controllers,
    pub token: String,
    pub fingerprint: String,
    /// The agent id to ask for; empty lets the controller use the hostname.
    pub name: String,
    pub connect_timeout: Duration,
}

/// The result of a successful enrollment.
#[derive(Debug)]
pub struct Enrolled {
    pub agent_id: String,
    pub labels: Vec<(String, String)>,
    pub not_after: SystemTime,
}

fn new_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Installs a key and certificate (and CA bundle) so that a crash at any point leaves either the
/// old pair or the new pair: both are written beside their targets, then renamed key first. If the
/// process dies between the renames, [`finish_pending_install`] completes the second at start.
pub fn install(
    files: &TlsFiles,
    key_pem: &str,
    cert_pem: &str,
    ca_pem: &str,
) -> std::io::Result<()> {
    if let Some(dir) = files.cert.parent().filter(|d| !d.as_os_str().is_empty()) {
        fsutil::private_dir(dir)?;
    }
    fsutil::write_private(&files.ca, ca_pem.as_bytes())?;
    fsutil::write_private(&new_path(&files.key), key_pem.as_bytes())?;
    fsutil::write_private(&new_path(&files.cert), cert_pem.as_bytes())?;
    std::fs::rename(new_path(&files.key), &files.key)?;
    std::fs::rename(new_path(&files.cert), &files.cert)
}

/// Completes or discards an install interrupted by a crash (see [`install`]).
pub fn finish_pending_install(files: &TlsFiles) -> std::io::Result<()> {
    let (key_new, cert_new) = (new_path(&files.key), new_path(&files.cert));
    match (key_new.exists(), cert_new.exists()) {
        // The key was renamed, the certificate not yet: finish.
        (false, true) => std::fs::rename(cert_new, &files.cert),
        // Nothing was renamed: the old pair is intact; drop the new one.
        (true, _) => {
            let _ = std::fs::remove_file(&cert_new);
            std::fs::remove_file(key_new)
        }
        (false, false) => Ok(()),
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

/// The key at `key_path` and a CSR signed by it, or, when there is none (a first enrollment) or
/// it is unusable, a new key.
fn key_and_csr(key_path: &Path, host: &str) -> Result<(String, String), EnrollError> {
    match std::fs::read_to_string(key_path) {
        Ok(key_pem) => match pki::csr_for_key(&key_pem, host) {
            Ok(csr_pem) => {
                tracing::info!(path = %key_path.display(), "enrolling with the key this agent already holds, to keep its id");
                return Ok((key_pem, csr_pem));
            }
            Err(error) => {
                tracing::warn!(path = %key_path.display(), %error, "the agent key is unusable; enrolling with a new key (the controller will give a new id)");
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::warn!(path = %key_path.display(), %error, "cannot read the agent key; enrolling with a new key (the controller will give a new id)");
        }
    }
    pki::new_key_and_csr(host).map_err(|e| EnrollError::permanent(e.to_string()))
}

/// Why no controller could be reached: permanent when every address answered with a CA other
/// than the pinned one (the fingerprint is wrong, or none of them is our controller); transient
/// when any did not answer at all, since that one may be ours.
fn unreachable(controllers: &Controllers, e: &DialError) -> EnrollError {
    let text = e.to_string();
    if e.failures
        .iter()
        .all(|f| f.error.contains("fingerprint mismatch"))
    {
        EnrollError::permanent(format!("refusing to enroll: {text}"))
    } else {
        EnrollError::transient(format!("cannot reach {controllers}: {text}"))
    }
}

/// Enrolls with `params` and installs the identity at `files`.
pub async fn enroll(params: &EnrollParams, files: &TlsFiles) -> Result<Enrolled, EnrollError> {
    let fingerprint = tapgraph::tls::normalize_fingerprint(&params.fingerprint)
        .map_err(|e| EnrollError::permanent(e.to_string()))?;
    let tls = tapgraph::tls::pinned_client_config(&fingerprint)
        .map_err(|e| EnrollError::permanent(e.to_string()))?;
    let options = ChannelOptions {
        connect_timeout: params.connect_timeout,
        ..ChannelOptions::default()
    };
    let channel = dial::dial(&params.controller, tls, &options)
        .await
        .map_err(|e| unreachable(&params.controller, &e))?
        .channel;
    let host = hostname();
    let (key_pem, csr_pem) = key_and_csr(&files.key, &host)?;
    let request = proto::EnrollRequest {
        token: params.token.trim().to_string(),
        csr_pem,
        hostname: host,
        machine_id: crate::host::machine_id(),
        requested_id: params.name.clone(),
    };
    let response = EnrollmentServiceClient::new(channel)
        .enroll(request)
        .await
        .map_err(|status| {
            let message = format!("enrollment refused: {}", status.message());
            match status.code() {
                // ResourceExhausted: the controller's enrollment rate limit; it says when to retry.
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::ResourceExhausted => EnrollError::transient(message),
                _ => EnrollError::permanent(message),
            }
        })?
        .into_inner();
    let info = pki::cert_info(&response.certificate_pem)
        .map_err(|e| EnrollError::permanent(format!("controller sent a bad certificate: {e}")))?;
    if info.identity != Some(Identity::Agent(response.agent_id.clone())) {
        return Err(EnrollError::permanent(format!(
            "controller sent a certificate for {:?}, not agent {}",
            info.identity, response.agent_id
        )));
    }
    install(
        files,
        &key_pem,
        &response.certificate_pem,
        &response.ca_bundle_pem,
    )
    .map_err(|e| EnrollError::permanent(format!("cannot write {}: {e}", files.cert.display())))?;
    let mut labels: Vec<(String, String)> = response.labels.into_iter().collect();
    labels.sort();
    Ok(Enrolled {
        agent_id: response.agent_id,
        labels,
        not_after: info.not_after,
    })
}

/// How a failed renewal is retried: 1 s doubling to 60 s, no jitter (each agent renews at its own
/// time, so there is no crowd to spread), from 1 s again after a renewal.
fn renew_retry() -> BackoffPolicy {
    BackoffPolicy::new(Duration::from_secs(1), Duration::from_secs(60), 0.0).unwrap_or_default()
}

/// Renews the certificate at 70% of its lifetime over `channel`, the agent's live mTLS connection,
/// so no stream is dropped. Failures are retried until `stop` or expiry.
pub async fn renew_loop(
    channel: tonic::transport::Channel,
    files: TlsFiles,
    stop: CancellationToken,
) {
    let mut client = EnrollmentServiceClient::new(channel);
    let mut retry = renew_retry().start();
    loop {
        let info = match std::fs::read_to_string(&files.cert)
            .map_err(|e| e.to_string())
            .and_then(|pem| pki::cert_info(&pem).map_err(|e| e.to_string()))
        {
            Ok(info) => info,
            Err(error) => {
                tracing::error!(%error, path = %files.cert.display(), "cannot read the agent certificate; renewal stopped");
                return;
            }
        };
        let due = info.at_fraction(0.7);
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return,
        }
        let (key_pem, csr_pem) = match pki::new_key_and_csr(&hostname()) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::error!(%error, "cannot make a key for renewal");
                return;
            }
        };
        let renewed = tokio::select! {
            r = client.renew(proto::RenewRequest { csr_pem }) => r,
            () = stop.cancelled() => return,
        };
        match renewed {
            Ok(response) => {
                let r = response.into_inner();
                match install(&files, &key_pem, &r.certificate_pem, &r.ca_bundle_pem) {
                    Ok(()) => {
                        retry.reset();
                        let not_after = tapgraph::time::from_unix_nanos(r.not_after_unix_nanos);
                        tracing::info!(not_after = ?not_after, "certificate renewed");
                    }
                    Err(error) => {
                        tracing::error!(%error, path = %files.cert.display(), "cannot write the renewed certificate")
                    }
                }
            }
            Err(status) => {
                let left = info
                    .not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let retry_in = retry.next_delay();
                tracing::warn!(error = %status.message(), code = ?status.code(), expires_in = ?left, ?retry_in, "certificate renewal failed");
                tokio::select! {
                    () = tokio::time::sleep(retry_in.min(left.max(Duration::from_secs(1)))) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles {
            cert: dir.join("agent.pem"),
            key: dir.join("agent.key"),
            ca: dir.join("ca.pem"),
        }
    }

    #[test]
    fn only_a_wrong_ca_at_every_address_is_a_refusal() {
        let controllers = crate::config::parse_controllers("a:7443,b:7443", None).unwrap();
        let failure = |target: &str, error: &str| crate::dial::Failure {
            target: target.into(),
            error: error.into(),
        };
        let mismatch = "transport error: CA fingerprint mismatch: got 12, pinned ab";
        let all_wrong = DialError {
            failures: vec![
                failure("10.0.0.1:7443", mismatch),
                failure("10.0.0.2:7443", mismatch),
            ],
        };
        let e = unreachable(&controllers, &all_wrong);
        assert!(e.permanent, "{e}");
        assert!(e.message.starts_with("refusing to enroll: "), "{e}");
        // One that did not answer may be ours: try again later.
        let one_down = DialError {
            failures: vec![
                failure("10.0.0.1:7443", mismatch),
                failure("10.0.0.2:7443", "connection refused"),
            ],
        };
        let e = unreachable(&controllers, &one_down);
        assert!(!e.permanent, "{e}");
        assert!(e.message.starts_with("cannot reach a:7443,b:7443: "), "{e}");
    }

    #[test]
    fn renewal_retries_double_from_one_second_to_a_minute() {
        let mut retry = renew_retry().start();
        let delays: Vec<Duration> = (0..8).map(|_| retry.next_delay()).collect();
        let secs = |s: &[u64]| {
            s.iter()
                .map(|&n| Duration::from_secs(n))
                .collect::<Vec<_>>()
        };
        assert_eq!(delays, secs(&[1, 2, 4, 8, 16, 32, 60, 60]));
        retry.reset();
        assert_eq!(retry.next_delay(), Duration::from_secs(1));
    }

    #[test]
    fn install_writes_private_files_and_recovers_a_torn_swap() {
        let dir = tempfile::tempdir().unwrap();
        let f = files(dir.path());
        install(&f, "key1", "cert1", "ca").unwrap();
        assert!(fsutil::check_private(&f.key).is_ok());
        assert!(fsutil::check_private(&f.cert).is_ok());

        // Crash after the key rename: the new certificate is completed at start.
        fsutil::write_private(&f.key, b"key2").unwrap();
        fsutil::write_private(&new_path(&f.cert), b"cert2").unwrap();
        finish_pending_install(&f).unwrap();
        assert_eq!(std::fs::read_to_string(&f.cert).unwrap(), "cert2");

        // Crash before any rename: the old pair stays, the new one is dropped.
        fsutil::write_private(&new_path(&f.key), b"key3").unwrap();
        fsutil::write_private(&new_path(&f.cert), b"cert3").unwrap();
        finish_pending_install(&f).unwrap();
        assert_eq!(std::fs::read_to_string(&f.key).unwrap(), "key2");
        assert_eq!(std::fs::read_to_string(&f.cert).unwrap(), "cert2");
        assert!(!new_path(&f.key).exists() && !new_path(&f.cert).exists());
    }
}
