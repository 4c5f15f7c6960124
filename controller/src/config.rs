//! The controller's configuration, read through the shared layered loader.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tapgraph::config::{ConfigErrors, Layered, Sources};
use tapgraph::logging::{self, LogFormat};
use tapgraph::policy::PolicySpec;
use tapgraph::tls::{self, TlsFiles};

#[derive(Clone)]
pub struct ControllerConfig {
    /// gRPC (agents, operators) over mTLS.
    pub listen: SocketAddr,
    /// Plain HTTP: /healthz, /readyz, /api/v1/*.
    pub http_listen: SocketAddr,
    pub tls: Arc<tls::ServerConfig>,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub shutdown_timeout: Duration,
    pub handshake_timeout: Duration,
    pub hello_timeout: Duration,
    /// A session that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Largest gRPC message accepted.
    pub max_message_bytes: usize,
    /// The policy every agent gets until operators set others.
    pub default_policy: PolicySpec,
}

const SECOND: Duration = Duration::from_secs(1);

fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "listen",
        "http.listen",
        "tls.cert",
        "tls.key",
        "tls.ca",
        "log.format",
        "log.level",
        "shutdown_timeout",
        "session.handshake_timeout",
        "session.hello_timeout",
        "session.idle_timeout",
        "session.max_message_bytes",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    keys.extend(PolicySpec::config_keys("policy"));
    keys
}

impl ControllerConfig {
    pub fn load(sources: &Sources) -> Result<Self, ConfigErrors> {
        let known = known_keys();
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        let mut c = Layered::load(sources, &known)?;
        let listen = c.value("listen", SocketAddr::from(([127, 0, 0, 1], 7443)));
        let http_listen = c.value("http.listen", SocketAddr::from(([127, 0, 0, 1], 7080)));
        let hint = "make certificates with `tapgraphctl dev-certs DIR`";
        let tls_files = TlsFiles {
            cert: c.required_file("tls.cert", hint),
            key: c.required_file("tls.key", hint),
            ca: c.required_file("tls.ca", hint),
        };
        let log_format = c.value("log.format", LogFormat::Text);
        let log_filter = c.parse("log.level", "info".to_string(), logging::parse_filter);
        let shutdown_timeout =
            c.duration("shutdown_timeout", 10 * SECOND, SECOND / 10, 600 * SECOND);
        let handshake_timeout = c.duration(
            "session.handshake_timeout",
            10 * SECOND,
            SECOND / 10,
            300 * SECOND,
        );
        let hello_timeout = c.duration(
            "session.hello_timeout",
            10 * SECOND,
            SECOND / 10,
            300 * SECOND,
        );
        let idle_timeout = c.duration("session.idle_timeout", 60 * SECOND, SECOND, 3600 * SECOND);
        let max_message_bytes = c.value("session.max_message_bytes", 16usize << 20);
        if !(64 << 10..=256 << 20).contains(&max_message_bytes) {
            c.fail(
                "session.max_message_bytes",
                format!("{max_message_bytes} is out of range 65536..=268435456"),
            );
        }
        let default_policy = PolicySpec::from_config(&mut c, "policy");
        if idle_timeout <= default_policy.heartbeat_interval * 2 {
            c.fail(
                "session.idle_timeout",
                "must exceed twice policy.heartbeat_interval, or healthy agents would be cut off",
            );
        }
        // TLS material is loaded now, so a bad certificate is a configuration error naming its key.
        let tls = if tls_files.cert.as_os_str().is_empty()
            || tls_files.key.as_os_str().is_empty()
            || tls_files.ca.as_os_str().is_empty()
        {
            None
        } else {
            match tls::server_config(&tls_files) {
                Ok(cfg) => Some(cfg),
                Err(e) => {
                    let key = match &e {
                        tls::TlsError::File { path, .. }
                        | tls::TlsError::NoCertificate { path }
                            if *path == tls_files.key =>
                        {
                            "tls.key"
                        }
                        tls::TlsError::BadCa { .. } => "tls.ca",
                        tls::TlsError::File { path, .. }
                        | tls::TlsError::NoCertificate { path }
                            if *path == tls_files.ca =>
                        {
                            "tls.ca"
                        }
                        _ => "tls.cert",
                    };
                    c.fail(key, e);
                    None
                }
            }
        };
        let Some(tls) = tls else {
            // A missing or unusable TLS file has been recorded above with the rest.
            return Err(c.finish(()).err().unwrap_or_else(|| {
                ConfigErrors(vec![tapgraph::config::ConfigIssue {
                    key: "tls".into(),
                    reason: "not configured".into(),
                }])
            }));
        };
        c.finish(Self {
            listen,
            http_listen,
            tls,
            log_format,
            log_filter,
            shutdown_timeout,
            handshake_timeout,
            hello_timeout,
            idle_timeout,
            max_message_bytes,
            default_policy,
        })
    }
}
