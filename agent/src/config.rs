//! The agent's configuration, read through the shared layered loader.

use std::time::Duration;

use tapgraph::backoff::BackoffPolicy;
use tapgraph::config::{ConfigErrors, Layered, Sources};
use tapgraph::logging::{self, LogFormat};
use tapgraph::tls::TlsFiles;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the controller's gRPC listener.
    pub controller: String,
    /// Name the controller's certificate must carry (DNS name or IP).
    pub server_name: String,
    pub tls: TlsFiles,
    pub backoff: BackoffPolicy,
    pub connect_timeout: Duration,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub shutdown_timeout: Duration,
}

const KNOWN: &[&str] = &[
    "controller",
    "server_name",
    "tls.cert",
    "tls.key",
    "tls.ca",
    "backoff.min",
    "backoff.max",
    "backoff.jitter",
    "connect_timeout",
    "log.format",
    "log.level",
    "shutdown_timeout",
];

const SECOND: Duration = Duration::from_secs(1);

/// The host part of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> Option<&str> {
    let (host, port) = addr.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some(host)
}

impl AgentConfig {
    pub fn load(sources: &Sources) -> Result<Self, ConfigErrors> {
        let mut c = Layered::load(sources, KNOWN)?;
        let controller = c.string("controller", "127.0.0.1:7443");
        let default_name = match host_of(&controller) {
            Some(host) => host.to_string(),
            None => {
                c.fail("controller", format!("`{controller}` is not HOST:PORT"));
                String::new()
            }
        };
        let server_name = c.string("server_name", &default_name);
        let hint = "make certificates with `tapgraphctl dev-certs DIR`";
        let tls = TlsFiles {
            cert: c.required_file("tls.cert", hint),
            key: c.required_file("tls.key", hint),
            ca: c.required_file("tls.ca", hint),
        };
        let min = c.duration(
            "backoff.min",
            SECOND / 5,
            Duration::from_millis(10),
            60 * SECOND,
        );
        let max = c.duration(
            "backoff.max",
            5 * SECOND,
            Duration::from_millis(10),
            3600 * SECOND,
        );
        let jitter = c.value("backoff.jitter", 0.2f64);
        let backoff = match BackoffPolicy::new(min, max, jitter) {
            Ok(b) => b,
            Err(e) => {
                c.fail("backoff", e);
                BackoffPolicy::default()
            }
        };
        let connect_timeout = c.duration("connect_timeout", 5 * SECOND, SECOND / 10, 300 * SECOND);
        let log_format = c.value("log.format", LogFormat::Text);
        let log_filter = c.parse("log.level", "info".to_string(), logging::parse_filter);
        let shutdown_timeout =
            c.duration("shutdown_timeout", 5 * SECOND, SECOND / 10, 600 * SECOND);
        // Load the TLS material once now, so a bad file is a configuration error naming its key.
        if !tls.cert.as_os_str().is_empty()
            && !tls.key.as_os_str().is_empty()
            && !tls.ca.as_os_str().is_empty()
            && let Err(e) = tapgraph::tls::client_config(&tls.ca, Some((&tls.cert, &tls.key)))
        {
            c.fail("tls", e);
        }
        c.finish(Self {
            controller,
            server_name,
            tls,
            backoff,
            connect_timeout,
            log_format,
            log_filter,
            shutdown_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_split_from_ports() {
        assert_eq!(host_of("127.0.0.1:7443"), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:7443"), Some("::1"));
        assert_eq!(
            host_of("controller.example:7443"),
            Some("controller.example")
        );
        assert_eq!(host_of("controller"), None);
        assert_eq!(host_of(":7443"), None);
    }

    #[test]
    fn missing_certificates_and_bad_values_are_all_reported() {
        let sources = Sources {
            env: [
                ("TAPGRAPH_BACKOFF__MIN", "10s"),
                ("TAPGRAPH_BACKOFF__MAX", "1s"),
                ("TAPGRAPH_LOG__FORMAT", "xml"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            ..Sources::default()
        };
        let e = AgentConfig::load(&sources).unwrap_err();
        for key in ["tls.cert", "tls.key", "tls.ca", "backoff", "log.format"] {
            assert!(e.mentions(key), "{key} missing from {e}");
        }
    }
}
