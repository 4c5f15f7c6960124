//! The controller's configuration, read through the shared layered loader.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tapgraph::config::{ConfigErrors, Layered, Sources};
use tapgraph::logging::{self, LogFormat};
use tapgraph::policy::PolicySpec;

use crate::enrollment::ca::PkiSettings;

#[derive(Clone)]
pub struct ControllerConfig {
    /// This replica's name (`replica`, default the hostname), shown wherever an agent's
    /// controller is shown.
    pub replica: String,
    /// gRPC (agents, operators) over mTLS.
    pub listen: SocketAddr,
    /// HTTP (or HTTPS): /healthz, /readyz, /metrics, the console, /api/v1/*.
    pub http_listen: SocketAddr,
    /// `http.*`: timeouts, connection caps, tokens, TLS.
    pub http: crate::http::HttpSettings,
    /// Holds the CA, the serving certificate, tokens, agents and (later) policies and topology.
    pub state_dir: PathBuf,
    pub pki: PkiSettings,
    /// Lifetime of agent certificates; agents renew at 70% of it.
    pub agent_cert_lifetime: Duration,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub shutdown_timeout: Duration,
    pub handshake_timeout: Duration,
    pub hello_timeout: Duration,
    /// A session that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Largest gRPC message accepted.
    pub max_message_bytes: usize,
    /// Live agent sessions at most; more are refused with RESOURCE_EXHAUSTED.
    pub max_agents: usize,
    /// `store.*`: the embedded store (with its page cache) or the database replicas share.
    pub store: crate::store::StoreSettings,
    /// Mirror streams one agent may hold open (it uses one); HTTP/2 allows
    /// `session::STREAM_HEADROOM` more per connection, so the ones over are refused, not queued.
    pub max_streams: u32,
    /// Enrollments per second (token bucket), and the burst above it.
    pub enroll_rate: f64,
    pub enroll_burst: u32,
    pub topology: crate::topology::TopologySettings,
    pub label_rules: crate::topology::labels::LabelRules,
    /// Name external addresses by reverse DNS.
    pub reverse_dns: bool,
    /// `/metrics` shows each edge's traffic, per (from, to) node pair: high-cardinality, so off
    /// unless asked for (`topology.traffic_metrics`).
    pub traffic_metrics: bool,
    /// The policy every agent gets until operators set others.
    pub default_policy: PolicySpec,
    /// Mirror the map into Neo4j (or another Bolt server), when configured.
    pub neo4j: Option<crate::sinks::neo4j::Neo4jSettings>,
    /// Webhook alerts on the map's changes (`[alerts]`); no URL: none.
    pub alerts: crate::alerts::AlertSettings,
    /// The web console and the HTTP API ask for an access token even on loopback
    /// (`console.auth = "token"`); beyond loopback they always do.
    pub console_token_always: bool,
    /// Mirror writer threads ask for real-time scheduling (`tapgraph::runtime::realtime_thread`).
    pub mirror_realtime: bool,
}

const SECOND: Duration = Duration::from_secs(1);

fn known_keys() -> Vec<String> {
    let mut keys: Vec<String> = [
        "replica",
        "listen",
        "http.listen",
        "http.header_read_timeout",
        "http.idle_timeout",
        "http.max_connections",
        "http.max_connections_per_source",
        "http.auth_failures_per_minute",
        "http.metrics_token_file",
        "http.tls_cert",
        "http.tls_key",
        "state_dir",
        "pki.ca_cert",
        "pki.ca_key",
        "pki.server_names",
        "pki.server_cert_lifetime",
        "pki.agent_cert_lifetime",
        "pki.ca_seal_key_file",
        "log.format",
        "log.level",
        "shutdown_timeout",
        "session.handshake_timeout",
        "session.hello_timeout",
        "session.idle_timeout",
        "session.max_message_bytes",
        "session.max_agents",
        "session.max_streams",
        "store.cache_size",
        "store.backend",
        "store.postgres.url",
        "store.postgres.password_file",
        "enrollment.rate",
        "enrollment.burst",
        "topology.queue",
        "topology.ttl",
        "topology.retention",
        "topology.history_retention",
        "topology.history_interval",
        "topology.max_entries",
        "topology.max_rows",
        "topology.cidr_labels",
        "topology.hostname_labels",
        "topology.reverse_dns",
        "topology.traffic_metrics",
        "graph.neo4j.uri",
        "graph.neo4j.user",
        "graph.neo4j.password",
        "graph.neo4j.password_file",
        "graph.neo4j.database",
        "graph.neo4j.batch_size",
        "graph.neo4j.interval",
        "graph.neo4j.last_seen_step",
        "console.auth",
        "mirror.realtime",
        "alerts.webhook_url",
        "alerts.selector",
        "alerts.per_minute",
        "alerts.retries",
        "alerts.timeout",
        "alerts.secret_file",
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
        let replica = c.parse("replica", default_replica(&hostname()), replica_name);
        let listen = c.value("listen", SocketAddr::from(([127, 0, 0, 1], 7443)));
        let http_listen = c.value("http.listen", SocketAddr::from(([127, 0, 0, 1], 7080)));
        let http = http_settings(&mut c);
        let state_dir = PathBuf::from(c.string("state_dir", "/var/lib/tapgraph"));
        let ca_files = match (
            c.existing_file("pki.ca_cert"),
            c.existing_file("pki.ca_key"),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                c.fail(
                    "pki.ca_cert",
                    "pki.ca_cert and pki.ca_key go together: set both or neither",
                );
                None
            }
        };
        let default_names = format!("localhost,127.0.0.1,::1,{}", hostname());
        let server_names: Vec<String> = c
            .string("pki.server_names", &default_names)
            .split(',')
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        for name in &server_names {
            if let Err(e) = tapgraph::pki::san(name) {
                c.fail("pki.server_names", e);
            }
        }
        let day = 86_400 * SECOND;
        let server_lifetime = c.duration(
            "pki.server_cert_lifetime",
            365 * day,
            60 * SECOND,
            3650 * day,
        );
        let agent_cert_lifetime = c.duration("pki.agent_cert_lifetime", day, 5 * SECOND, 365 * day);
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
        let max_message_bytes = c.ranged(
            "session.max_message_bytes",
            16usize << 20,
            64 << 10..=256 << 20,
        );
        let store = store_settings(&mut c);
        let seal_key_file = crate::enrollment::seal::setting(&mut c, &store, ca_files.is_some());
        let max_agents = c.value("session.max_agents", 20_000usize);
        if max_agents == 0 {
            c.fail("session.max_agents", "must be at least 1");
        }
        let max_streams = c.ranged("session.max_streams", 16u32, 2..=1024);
        let enroll_rate = c.value("enrollment.rate", 100f64);
        if !(enroll_rate > 0.0 && enroll_rate <= 100_000.0) {
            c.fail(
                "enrollment.rate",
                format!("{enroll_rate} is out of range (0, 100000] per second"),
            );
        }
        let enroll_burst = c.value("enrollment.burst", 200u32);
        if enroll_burst == 0 {
            c.fail("enrollment.burst", "must be at least 1");
        }
        let topology_queue = c.ranged("topology.queue", 4096usize, 1..=1_000_000);
        let default_policy = PolicySpec::from_config(&mut c, "policy");
        let topology = crate::topology::TopologySettings {
            ttl: c.duration("topology.ttl", 120 * SECOND, SECOND, 86_400 * SECOND),
            retention: c.duration(
                "topology.retention",
                7 * 86_400 * SECOND,
                60 * SECOND,
                3650 * 86_400 * SECOND,
            ),
            history_retention: c.duration(
                "topology.history_retention",
                14 * 86_400 * SECOND,
                60 * SECOND,
                3650 * 86_400 * SECOND,
            ),
            history_interval: c.duration(
                "topology.history_interval",
                3600 * SECOND,
                SECOND,
                86_400 * SECOND,
            ),
            max_entries: c.value("topology.max_entries", 100_000usize),
            max_rows: c.ranged("topology.max_rows", 2_000_000usize, 1..=100_000_000),
            queue: topology_queue,
        };
        let cidr = c.string("topology.cidr_labels", "");
        let hostname = c.string("topology.hostname_labels", "");
        let label_rules = match crate::topology::labels::LabelRules::parse(&cidr, &hostname) {
            Ok(rules) => rules,
            Err((key, e)) => {
                c.fail(key, e);
                Default::default()
            }
        };
        let reverse_dns = c.bool("topology.reverse_dns", false);
        let traffic_metrics = c.bool("topology.traffic_metrics", false);
        let neo4j = neo4j_settings(&mut c);
        let alerts = alert_settings(&mut c);
        let mirror_realtime = c.bool("mirror.realtime", true);
        let console_token_always = c.parse("console.auth", false, |s: &str| match s {
            "auto" => Ok(false),
            "token" => Ok(true),
            other => Err(format!(
                "`{other}`: auto (a token beyond loopback) or token (always)"
            )),
        });
        if topology.retention < topology.ttl {
            c.fail("topology.retention", "must be at least topology.ttl");
        }
        if idle_timeout <= default_policy.heartbeat_interval * 2 {
            c.fail(
                "session.idle_timeout",
                "must exceed twice policy.heartbeat_interval, or healthy agents would be cut off",
            );
        }
        c.finish(Self {
            replica,
            listen,
            http_listen,
            http,
            pki: PkiSettings {
                dir: state_dir.join("pki"),
                ca_files,
                seal_key_file,
                server_names,
                server_lifetime,
            },
            state_dir,
            agent_cert_lifetime,
            log_format,
            log_filter,
            shutdown_timeout,
            handshake_timeout,
            hello_timeout,
            idle_timeout,
            max_message_bytes,
            max_agents,
            store,
            max_streams,
            enroll_rate,
            enroll_burst,
            topology,
            label_rules,
            reverse_dns,
            traffic_metrics,
            default_policy,
            neo4j,
            alerts,
            console_token_always,
            mirror_realtime,
        })
    }
}

/// `http.*`.
fn http_settings(c: &mut Layered) -> crate::http::HttpSettings {
    let defaults = crate::http::HttpSettings::default();
    let header_read_timeout = c.duration(
        "http.header_read_timeout",
        defaults.header_read_timeout,
        SECOND / 10,
        300 * SECOND,
    );
    let idle_timeout = c.duration(
        "http.idle_timeout",
        defaults.idle_timeout,
        // The console's event stream sends a keep-alive every 15 s: shorter would cut it.
        20 * SECOND,
        3600 * SECOND,
    );
    let max_connections = c.parse("http.max_connections", None, |s: &str| match s {
        "auto" => Ok(None),
        n => match n.parse::<usize>() {
            Ok(n) if (1..=1_000_000).contains(&n) => Ok(Some(n)),
            _ => Err(format!(
                "`{n}`: auto, or a number of connections in 1..=1000000"
            )),
        },
    });
    let max_connections_per_source = c.ranged(
        "http.max_connections_per_source",
        defaults.max_connections_per_source,
        1..=1_000_000,
    );
    let auth_failures_per_minute = c.ranged(
        "http.auth_failures_per_minute",
        defaults.auth_failures_per_minute,
        1..=100_000,
    );
    let metrics_token =
        c.path("http.metrics_token_file")
            .and_then(|path| match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let token = text.trim().to_string();
                    if token.len() < 16
                        || token
                            .chars()
                            .any(|ch| ch.is_whitespace() || ch.is_control())
                    {
                        c.fail(
                            "http.metrics_token_file",
                            format!(
                                "{}: the token must be at least 16 characters, without spaces",
                                path.display()
                            ),
                        );
                        return None;
                    }
                    Some(crate::sinks::Secret(token))
                }
                Err(e) => {
                    c.fail(
                        "http.metrics_token_file",
                        format!("{}: {e}", path.display()),
                    );
                    None
                }
            });
    let tls = match (
        c.existing_file("http.tls_cert"),
        c.existing_file("http.tls_key"),
    ) {
        (Some(cert), Some(key)) => match crate::http::tls_config(&cert, &key) {
            Ok(tls) => Some(tls),
            Err(e) => {
                c.fail("http.tls_cert", e);
                None
            }
        },
        (None, None) => None,
        _ => {
            c.fail(
                "http.tls_cert",
                "http.tls_cert and http.tls_key go together: set both or neither",
            );
            None
        }
    };
    if header_read_timeout > idle_timeout {
        c.fail(
            "http.header_read_timeout",
            "must not exceed http.idle_timeout",
        );
    }
    crate::http::HttpSettings {
        header_read_timeout,
        idle_timeout,
        max_connections,
        max_connections_per_source,
        auth_failures_per_minute,
        metrics_token,
        tls,
    }
}

/// `graph.neo4j.*`: `None` unless a URI is set.
fn alert_settings(c: &mut Layered) -> crate::alerts::AlertSettings {
    let url = c.opt_string("alerts.webhook_url").filter(|u| !u.is_empty());
    let url = url.and_then(|u| match u.parse() {
        Ok(url) => Some(url),
        Err(e) => {
            c.fail("alerts.webhook_url", e);
            None
        }
    });
    let selector = c.parse(
        "alerts.selector",
        crate::alerts::Selector::default(),
        |s: &str| s.parse::<crate::alerts::Selector>(),
    );
    let per_minute = c.ranged("alerts.per_minute", 10u32, 1..=10_000);
    let retries = c.ranged("alerts.retries", 3u32, 0..=20);
    let timeout = c.duration("alerts.timeout", 5 * SECOND, SECOND / 10, 300 * SECOND);
    let secret = c
        .path("alerts.secret_file")
        .and_then(|path| match std::fs::read(&path) {
            Ok(key) if !key.trim_ascii().is_empty() => Some(key.trim_ascii().to_vec()),
            Ok(_) => {
                c.fail("alerts.secret_file", format!("{}: empty", path.display()));
                None
            }
            Err(e) => {
                c.fail("alerts.secret_file", format!("{}: {e}", path.display()));
                None
            }
        });
    crate::alerts::AlertSettings {
        url,
        selector,
        per_minute,
        retries,
        timeout,
        secret,
    }
}

fn neo4j_settings(c: &mut Layered) -> Option<crate::sinks::neo4j::Neo4jSettings> {
    let uri = c.opt_string("graph.neo4j.uri")?;
    let address = match crate::sinks::neo4j::bolt_address(&uri) {
        Ok(address) => address,
        Err(e) => {
            c.fail("graph.neo4j.uri", e);
            String::new()
        }
    };
    let user = c.string("graph.neo4j.user", "neo4j");
    // The password from a file is how Kubernetes secrets arrive; from the environment
    // (TAPGRAPH_GRAPH__NEO4J__PASSWORD) or the file, never a flag.
    let password = match (
        c.opt_string("graph.neo4j.password"),
        c.path("graph.neo4j.password_file"),
    ) {
        (Some(_), Some(_)) => {
            c.fail(
                "graph.neo4j.password",
                "set graph.neo4j.password or graph.neo4j.password_file, not both",
            );
            String::new()
        }
        (Some(p), None) => p,
        (None, Some(path)) => match std::fs::read_to_string(&path) {
            Ok(p) => p.trim_end_matches(['\n', '\r']).to_string(),
            Err(e) => {
                c.fail(
                    "graph.neo4j.password_file",
                    format!("{}: {e}", path.display()),
                );
                String::new()
            }
        },
        (None, None) => String::new(),
    };
    let database = c.string("graph.neo4j.database", "");
    let batch_size = c.ranged("graph.neo4j.batch_size", 5000usize, 1..=50_000);
    let interval = c.duration(
        "graph.neo4j.interval",
        2 * SECOND,
        SECOND / 10,
        600 * SECOND,
    );
    let last_seen_step = c.duration(
        "graph.neo4j.last_seen_step",
        600 * SECOND,
        SECOND,
        86_400 * SECOND,
    );
    Some(crate::sinks::neo4j::Neo4jSettings {
        address,
        user,
        password: crate::sinks::Secret(password),
        database,
        batch_size,
        interval,
        last_seen_step,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| tapgraph::pki::san(h).is_ok())
        .unwrap_or_else(|| "localhost".into())
}

/// `store.backend` and what it needs: the page cache of the embedded store, the URL and password
/// file of the shared database. A key of the other backend is refused, not ignored.
fn store_settings(c: &mut Layered) -> crate::store::StoreSettings {
    use crate::store::{StoreSettings, postgres::PostgresSettings};
    let cache_bytes = c.parse(
        "store.cache_size",
        crate::store::DEFAULT_CACHE,
        |s: &str| match tapgraph::units::parse_size(s) {
            Ok(n) if (1 << 20..=64 << 30).contains(&n) => Ok(n as usize),
            Ok(n) => Err(format!("{n} bytes is out of range 1MiB..=64GiB")),
            Err(e) => Err(e.to_string()),
        },
    );
    let backend = c.string("store.backend", "embedded");
    let url = c.opt_string("store.postgres.url");
    let password_file = c.existing_file("store.postgres.password_file");
    match backend.as_str() {
        "embedded" => {
            for key in ["store.postgres.url", "store.postgres.password_file"] {
                if c.raw(key).is_some() {
                    c.fail(
                        key,
                        "is for store.backend = \"postgres\"; the backend is \"embedded\"",
                    );
                }
            }
            StoreSettings::Embedded { cache_bytes }
        }
        "postgres" => {
            let Some(url) = url else {
                c.fail(
                    "store.postgres.url",
                    "required with store.backend = \"postgres\" (postgres://USER@HOST:PORT/DB?sslmode=require)",
                );
                return StoreSettings::default();
            };
            let settings = PostgresSettings { url, password_file };
            if let Err(e) = settings.check() {
                c.fail("store.postgres.url", e);
            }
            StoreSettings::Postgres(settings)
        }
        other => {
            c.fail(
                "store.backend",
                format!("`{other}` is not a store backend: embedded or postgres"),
            );
            StoreSettings::default()
        }
    }
}

/// The longest replica name: a DNS label's length, so it fits a label value or a file name part.
const REPLICA_MAX: usize = 63;

fn replica_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// `replica`: 1 to 63 bytes of A-Z, a-z, 0-9, `.`, `_`, `-`.
fn replica_name(name: &str) -> Result<String, String> {
    if (1..=REPLICA_MAX).contains(&name.len()) && name.chars().all(replica_char) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "`{}`: a replica name is 1 to {REPLICA_MAX} of A-Z, a-z, 0-9, '.', '_', '-'",
            name.escape_debug()
        ))
    }
}

/// The hostname as the default replica name; one longer than a name may be gives its first label,
/// cut to [`REPLICA_MAX`] bytes.
fn default_replica(hostname: &str) -> String {
    let first_label = hostname.split('.').next().unwrap_or_default();
    let cut: String = first_label.chars().take(REPLICA_MAX).collect();
    [hostname, &cut]
        .into_iter()
        .find_map(|name| replica_name(name).ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_env(pairs: &[(&str, &str)]) -> Result<ControllerConfig, ConfigErrors> {
        let env = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ControllerConfig::load(&Sources {
            env,
            ..Sources::default()
        })
    }

    #[test]
    fn the_replica_is_named_after_the_host_unless_configured() {
        let config = with_env(&[]).unwrap();
        assert_eq!(config.replica, hostname());
        let config = with_env(&[("TAPGRAPH_REPLICA", "ctl-b.eu_1")]).unwrap();
        assert_eq!(config.replica, "ctl-b.eu_1");
    }

    #[test]
    fn a_bad_replica_name_is_refused_naming_the_key_and_the_value() {
        let long = "r".repeat(64);
        assert!(with_env(&[("TAPGRAPH_REPLICA", &"r".repeat(63))]).is_ok());
        for bad in ["ctl b", "ctl/b", "ctl\u{e9}", &long] {
            let errors = with_env(&[("TAPGRAPH_REPLICA", bad)])
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(errors.mentions("replica"), "{errors}");
            let said = errors.to_string();
            assert!(said.contains(&bad.escape_debug().to_string()), "{said}");
        }
        let errors = with_env(&[("TAPGRAPH_REPLICA", "")]).err();
        assert!(errors.is_some_and(|e| e.mentions("replica")), "empty");
    }

    #[test]
    fn a_hostname_too_long_for_a_replica_name_gives_its_first_label() {
        assert_eq!(default_replica("ctl-1"), "ctl-1");
        let fqdn = format!("ctl-1.{}.example", "zone".repeat(20));
        assert_eq!(default_replica(&fqdn), "ctl-1");
        assert_eq!(default_replica(&"a".repeat(64)), "a".repeat(63));
        assert_eq!(default_replica("::1"), "localhost");
    }

    #[test]
    fn the_store_is_embedded_unless_postgres_is_asked_for_with_a_url() {
        use crate::store::StoreSettings;
        let config = with_env(&[]).unwrap();
        assert!(matches!(config.store, StoreSettings::Embedded { .. }));
        let url = "postgres://tapgraph@db.example:5432/tapgraph?sslmode=require";
        let config = with_env(&[
            ("TAPGRAPH_STORE__BACKEND", "postgres"),
            ("TAPGRAPH_STORE__POSTGRES__URL", url),
        ])
        .unwrap();
        let StoreSettings::Postgres(pg) = &config.store else {
            panic!("not postgres")
        };
        assert_eq!(pg.url, url);
        assert_eq!(pg.password_file, None);
    }

    #[test]
    fn store_settings_that_do_not_fit_are_refused_naming_the_key() {
        for (env, key, says) in [
            (
                vec![("TAPGRAPH_STORE__BACKEND", "postgres")],
                "store.postgres.url",
                "required",
            ),
            (
                vec![("TAPGRAPH_STORE__BACKEND", "mysql")],
                "store.backend",
                "embedded or postgres",
            ),
            (
                vec![("TAPGRAPH_STORE__POSTGRES__URL", "postgres://u@h/db")],
                "store.postgres.url",
                "the backend is \"embedded\"",
            ),
            (
                vec![
                    ("TAPGRAPH_STORE__BACKEND", "postgres"),
                    (
                        "TAPGRAPH_STORE__POSTGRES__URL",
                        "postgres://u@h/db?sslmode=maybe",
                    ),
                ],
                "store.postgres.url",
                "sslmode",
            ),
            (
                vec![
                    ("TAPGRAPH_STORE__BACKEND", "postgres"),
                    ("TAPGRAPH_STORE__POSTGRES__URL", "postgres://u@h/db"),
                    ("TAPGRAPH_STORE__POSTGRES__PASSWORD_FILE", "/nonexistent/pw"),
                ],
                "store.postgres.password_file",
                "",
            ),
        ] {
            let errors = with_env(&env)
                .err()
                .unwrap_or_else(|| panic!("{env:?} accepted"));
            assert!(errors.mentions(key), "{env:?}: {errors}");
            assert!(errors.to_string().contains(says), "{env:?}: {errors}");
        }
    }
}
