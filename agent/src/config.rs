//! The agent's configuration, read through the shared layered loader.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use tapgraph::backoff::BackoffPolicy;
use tapgraph::config::{ConfigErrors, Layered, Sources};
use tapgraph::logging::{self, LogFormat};
use tapgraph::tls::TlsFiles;

use crate::snapshot::Scope;

/// How to enroll when the agent has no (valid) certificate.
#[derive(Debug, Clone)]
pub struct EnrollSettings {
    pub token: String,
    pub fingerprint: String,
    /// The agent id to ask for; empty: the controller derives one from the hostname.
    pub name: String,
}

/// Whether the agent can connect with what is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Ready,
    /// No usable certificate, but a join token is configured: enroll first. Says why.
    Enroll(String),
}

/// One entry of `controller`: where a controller (or a set of replicas behind one DNS name)
/// listens, and the name its certificate must carry there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerAddr {
    /// A DNS name or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// Name the controller's certificate must carry (DNS name or IP): `server_name` if set, else
    /// this entry's host.
    pub server_name: String,
}

impl std::fmt::Display for ControllerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The controllers the agent may connect to, as configured; never empty. Shown as written:
/// `a:7443,b:7443`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controllers(Vec<ControllerAddr>);

impl Controllers {
    pub fn entries(&self) -> &[ControllerAddr] {
        &self.0
    }
}

impl std::fmt::Display for Controllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, entry) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{entry}")?;
        }
        Ok(())
    }
}

/// `controller`: one `HOST:PORT` or several, comma-separated (spaces around commas ignored; IPv6
/// as `[::1]:7443`). Each entry's certificate must carry `server_name`, or, when it is `None`, the
/// entry's own host. An empty entry or one listed twice is refused; every bad entry is named.
pub fn parse_controllers(text: &str, server_name: Option<&str>) -> Result<Controllers, String> {
    let mut entries: Vec<ControllerAddr> = Vec::new();
    let mut errors = Vec::new();
    let several = text.contains(',');
    for entry in text.split(',').map(str::trim) {
        if entry.is_empty() && several {
            errors.push(format!(
                "`{text}` has an empty entry: give HOST:PORT, comma-separated"
            ));
            continue;
        }
        // No name or address holds a space: `a b:7443` is a typo, not a host.
        let Some((host, port)) =
            split_host_port(entry).filter(|(host, _)| !host.contains(char::is_whitespace))
        else {
            errors.push(format!("`{entry}` is not HOST:PORT"));
            continue;
        };
        let addr = ControllerAddr {
            host: host.to_string(),
            port,
            server_name: server_name.unwrap_or(host).to_string(),
        };
        if entries
            .iter()
            .any(|e| e.host.eq_ignore_ascii_case(&addr.host) && e.port == addr.port)
        {
            errors.push(format!("`{entry}` is listed twice"));
            continue;
        }
        entries.push(addr);
    }
    if errors.is_empty() {
        Ok(Controllers(entries))
    } else {
        Err(errors.join("; "))
    }
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The controllers' gRPC listeners (one, or a set of replicas), each with its server name.
    pub controller: Controllers,
    pub tls: TlsFiles,
    pub enroll: Option<EnrollSettings>,
    pub credentials: Credentials,
    pub backoff: BackoffPolicy,
    pub connect_timeout: Duration,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub shutdown_timeout: Duration,
    /// Which network namespaces connection snapshots cover.
    pub scope: Scope,
    /// Where `/metrics` is served; `None`: not at all.
    pub metrics_listen: Option<SocketAddr>,
    /// The capture thread asks for real-time scheduling (`tapgraph::runtime::realtime_thread`).
    pub capture_realtime: bool,
    /// `snapshot.bpf`: load the BPF program that names the process of every TCP connect
    /// (`crate::bpf`); off, the SYN-ACK capture alone catches short-lived connections.
    pub bpf: bool,
}

/// What the configuration is loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The daemon: credentials must exist, or a token must be configured.
    Run,
    /// `tapgraph-agent enroll`: a token and fingerprint must be configured.
    Enroll,
}

const KNOWN: &[&str] = &[
    "capture.realtime",
    "controller",
    "server_name",
    "state_dir",
    "tls.cert",
    "tls.key",
    "tls.ca",
    "enroll.token",
    "enroll.token_file",
    "enroll.ca_fingerprint",
    "enroll.name",
    "backoff.min",
    "backoff.max",
    "backoff.jitter",
    "connect_timeout",
    "log.format",
    "log.level",
    "shutdown_timeout",
    "snapshot.scope",
    "snapshot.bpf",
    "metrics.listen",
];

/// Prometheus' port for exporters that have none of their own, on loopback.
const METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// `metrics.listen`: `IP:PORT`, or empty or `off` for no endpoint.
fn parse_metrics_listen(text: &str) -> Result<Option<SocketAddr>, String> {
    match text {
        "" | "off" => Ok(None),
        addr => addr.parse().map(Some).map_err(|_| {
            format!("`{addr}` is not IP:PORT (e.g. 127.0.0.1:9464, [::]:9464), nor off")
        }),
    }
}

const SECOND: Duration = Duration::from_secs(1);

/// The host and port of `host:port` or `[v6]:port`.
fn split_host_port(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let port = port.parse::<u16>().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then_some((host, port))
}

/// Checks the certificate and key on disk: present, private, parseable, matching, unexpired.
fn check_credentials(tls: &TlsFiles) -> Result<(), (&'static str, String)> {
    if !tls.cert.exists() {
        return Err((
            "tls.cert",
            format!("{}: no certificate yet", tls.cert.display()),
        ));
    }
    if !tls.key.exists() {
        return Err(("tls.key", format!("{}: no private key", tls.key.display())));
    }
    tls.client_config().map_err(|e| {
        let key = if e.to_string().contains(&*tls.key.to_string_lossy()) {
            "tls.key"
        } else if e.to_string().contains(&*tls.ca.to_string_lossy()) {
            "tls.ca"
        } else {
            "tls.cert"
        };
        (key, e.to_string())
    })?;
    let pem = std::fs::read_to_string(&tls.cert).map_err(|e| ("tls.cert", e.to_string()))?;
    let info = tapgraph::pki::cert_info(&pem)
        .map_err(|e| ("tls.cert", format!("{}: {e}", tls.cert.display())))?;
    if info.not_after <= SystemTime::now() {
        return Err((
            "tls.cert",
            format!(
                "{}: certificate expired at {}",
                tls.cert.display(),
                tapgraph::time::rfc3339(info.not_after)
            ),
        ));
    }
    Ok(())
}

impl AgentConfig {
    pub fn load(sources: &Sources, purpose: Purpose) -> Result<Self, ConfigErrors> {
        let mut c = Layered::load(sources, KNOWN)?;
        let server_name = c.opt_string("server_name");
        let text = c.string("controller", "127.0.0.1:7443");
        let controller = match parse_controllers(&text, server_name.as_deref()) {
            Ok(list) => list,
            Err(e) => {
                // The value is never used: `finish` reports the error.
                c.fail("controller", e);
                Controllers(Vec::new())
            }
        };
        let state_dir = PathBuf::from(c.string("state_dir", "/var/lib/tapgraph-agent"));
        let tls = TlsFiles {
            cert: c
                .path("tls.cert")
                .unwrap_or_else(|| state_dir.join("agent.pem")),
            key: c
                .path("tls.key")
                .unwrap_or_else(|| state_dir.join("agent.key")),
            ca: c.path("tls.ca").unwrap_or_else(|| state_dir.join("ca.pem")),
        };
        let token = match (c.opt_string("enroll.token"), c.path("enroll.token_file")) {
            (Some(_), Some(_)) => {
                c.fail(
                    "enroll.token",
                    "set enroll.token or enroll.token_file, not both",
                );
                None
            }
            (Some(t), None) => Some(t),
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) => {
                    c.fail("enroll.token_file", format!("{}: {e}", path.display()));
                    None
                }
            },
            (None, None) => None,
        };
        let fingerprint = c.opt_string("enroll.ca_fingerprint");
        if let Some(fp) = &fingerprint
            && let Err(e) = tapgraph::tls::normalize_fingerprint(fp)
        {
            c.fail("enroll.ca_fingerprint", e);
        }
        let name = c.string("enroll.name", "");
        if !name.is_empty()
            && let Err(e) = tapgraph::identity::validate_name("agent", &name)
        {
            c.fail("enroll.name", e);
        }
        let enroll = match (token, fingerprint) {
            (Some(token), Some(fingerprint)) => Some(EnrollSettings {
                token,
                fingerprint,
                name,
            }),
            (Some(_), None) => {
                c.fail(
                    "enroll.ca_fingerprint",
                    "required with a join token: the controller CA is pinned by it (tapgraphctl token create prints it)",
                );
                None
            }
            (None, Some(_)) if purpose == Purpose::Enroll => {
                c.fail(
                    "enroll.token",
                    "required: a join token from `tapgraphctl token create`",
                );
                None
            }
            (None, None) if purpose == Purpose::Enroll => {
                c.fail(
                    "enroll.token",
                    "required: a join token from `tapgraphctl token create`",
                );
                c.fail(
                    "enroll.ca_fingerprint",
                    "required: the CA fingerprint printed with the token",
                );
                None
            }
            _ => None,
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
        let scope = c.value("snapshot.scope", Scope::Own);
        let metrics_listen = c.parse("metrics.listen", Some(METRICS_LISTEN), parse_metrics_listen);
        let capture_realtime = c.bool("capture.realtime", true);
        let bpf = c.bool("snapshot.bpf", true);

        // A renewal interrupted by a crash is completed before the files are judged.
        if let Err(e) = crate::enroll::finish_pending_install(&tls) {
            c.fail(
                "tls.cert",
                format!("cannot complete an interrupted renewal: {e}"),
            );
        }
        let credentials = match (purpose, check_credentials(&tls)) {
            (Purpose::Enroll, _) => Credentials::Enroll("requested".into()),
            (Purpose::Run, Ok(())) => Credentials::Ready,
            (Purpose::Run, Err((_, why))) if enroll.is_some() => Credentials::Enroll(why),
            (Purpose::Run, Err((key, why))) => {
                c.fail(
                    key,
                    format!("{why}; enroll with `tapgraph-agent enroll --controller HOST:PORT --token T --ca-fingerprint F`, or set enroll.token and enroll.ca_fingerprint"),
                );
                Credentials::Ready
            }
        };
        c.finish(Self {
            controller,
            tls,
            enroll,
            credentials,
            backoff,
            connect_timeout,
            log_format,
            log_filter,
            shutdown_timeout,
            scope,
            metrics_listen,
            capture_realtime,
            bpf,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Sources::default()
        }
    }

    #[test]
    fn hosts_are_split_from_ports() {
        let host_of = |addr| split_host_port(addr).map(|(host, _)| host);
        assert_eq!(host_of("127.0.0.1:7443"), Some("127.0.0.1"));
        assert_eq!(host_of("[::1]:7443"), Some("::1"));
        assert_eq!(
            host_of("controller.example:7443"),
            Some("controller.example")
        );
        assert_eq!(host_of("controller"), None);
        assert_eq!(host_of(":7443"), None);
        assert_eq!(split_host_port("[::1]:7443"), Some(("::1", 7443)));
        assert_eq!(split_host_port("a:70000"), None);
    }

    fn entry(host: &str, port: u16, server_name: &str) -> ControllerAddr {
        ControllerAddr {
            host: host.into(),
            port,
            server_name: server_name.into(),
        }
    }

    #[test]
    fn one_controller_is_read_as_before() {
        let one = parse_controllers("ctl.example:7443", None).unwrap();
        assert_eq!(one.entries(), [entry("ctl.example", 7443, "ctl.example")]);
        assert_eq!(one.to_string(), "ctl.example:7443");
        let v6 = parse_controllers("[::1]:7443", None).unwrap();
        assert_eq!(v6.entries(), [entry("::1", 7443, "::1")]);
        assert_eq!(v6.to_string(), "[::1]:7443");
        let named = parse_controllers("10.0.0.1:7443", Some("ctl.example")).unwrap();
        assert_eq!(named.entries(), [entry("10.0.0.1", 7443, "ctl.example")]);
        assert_eq!(
            parse_controllers("controller", None),
            Err("`controller` is not HOST:PORT".into())
        );
        assert_eq!(
            parse_controllers("", None),
            Err("`` is not HOST:PORT".into())
        );
    }

    #[test]
    fn several_controllers_each_carry_their_own_server_name() {
        let list =
            parse_controllers("a.example:7443, 10.0.0.2:7444 ,[fd00::3]:7443", None).unwrap();
        assert_eq!(
            list.entries(),
            [
                entry("a.example", 7443, "a.example"),
                entry("10.0.0.2", 7444, "10.0.0.2"),
                entry("fd00::3", 7443, "fd00::3"),
            ]
        );
        assert_eq!(
            list.to_string(),
            "a.example:7443,10.0.0.2:7444,[fd00::3]:7443"
        );
        // An explicit server_name is what every replica's certificate carries.
        let named = parse_controllers("10.0.0.1:7443,10.0.0.2:7443", Some("ctl.example")).unwrap();
        assert!(
            named
                .entries()
                .iter()
                .all(|e| e.server_name == "ctl.example"),
            "{named:?}"
        );
        // The same host on two ports is two controllers.
        assert_eq!(
            parse_controllers("a:7443,a:7444", None)
                .unwrap()
                .entries()
                .len(),
            2
        );
    }

    #[test]
    fn bad_entries_are_each_named() {
        let cases = [
            ("a:7443,b", "`b` is not HOST:PORT"),
            ("a:7443,b:99999", "`b:99999` is not HOST:PORT"),
            (
                "a:7443,,b:7443",
                "`a:7443,,b:7443` has an empty entry: give HOST:PORT, comma-separated",
            ),
            (
                "a:7443,",
                "`a:7443,` has an empty entry: give HOST:PORT, comma-separated",
            ),
            ("a:7443, A:7443", "`A:7443` is listed twice"),
            ("[::1]:7443,[::1]:7443", "`[::1]:7443` is listed twice"),
            (
                "x,a:7443,:7443",
                "`x` is not HOST:PORT; `:7443` is not HOST:PORT",
            ),
            ("ctl a:7443", "`ctl a:7443` is not HOST:PORT"),
            ("[ ::1]:7443", "`[ ::1]:7443` is not HOST:PORT"),
        ];
        for (text, error) in cases {
            assert_eq!(parse_controllers(text, None), Err(error.into()), "{text}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::parse_controllers;

        /// Text that looks like a controller list: hosts, ports, brackets, commas, spaces.
        fn list_like() -> impl Strategy<Value = String> {
            prop::collection::vec(
                prop::sample::select(vec![
                    "a", "B", "ctl.lan", "10.0.0.1", "::1", "fd00::3", "[", "]", ":", ":7443",
                    ":0", ":65535", ":65536", ",", " ", ", ", "\t", "é",
                ]),
                0..12,
            )
            .prop_map(|parts| parts.concat())
        }

        proptest! {
            #[test]
            fn a_controller_list_never_panics_and_what_it_accepts_reads_back_the_same(
                text in prop_oneof![list_like(), ".{0,48}"],
                server_name in prop::option::of("[a-z.]{1,12}"),
            ) {
                if let Ok(list) = parse_controllers(&text, server_name.as_deref()) {
                    prop_assert!(!list.entries().is_empty());
                    let again = parse_controllers(&list.to_string(), server_name.as_deref());
                    prop_assert_eq!(again, Ok(list));
                }
            }
        }
    }

    #[test]
    fn the_controller_list_comes_from_any_layer_and_is_checked_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let fp = "ab".repeat(32);
        let base = [
            ("TAPGRAPH_STATE_DIR", dir.path().to_str().unwrap()),
            ("TAPGRAPH_ENROLL__TOKEN", "tgj.x.y"),
            ("TAPGRAPH_ENROLL__CA_FINGERPRINT", fp.as_str()),
        ];
        let c = AgentConfig::load(&env(&base), Purpose::Run).unwrap();
        assert_eq!(
            c.controller.entries(),
            [entry("127.0.0.1", 7443, "127.0.0.1")],
            "the default"
        );
        let list = [
            base.as_slice(),
            &[("TAPGRAPH_CONTROLLER", "ctl-a.lan:7443,ctl-b.lan:7443")],
        ]
        .concat();
        let c = AgentConfig::load(&env(&list), Purpose::Run).unwrap();
        assert_eq!(
            c.controller.entries(),
            [
                entry("ctl-a.lan", 7443, "ctl-a.lan"),
                entry("ctl-b.lan", 7443, "ctl-b.lan")
            ]
        );
        // The flag wins over the environment, and server_name applies to every entry.
        let sources = Sources {
            overrides: vec![
                ("controller".into(), "10.0.0.1:7443,10.0.0.2:7443".into()),
                ("server_name".into(), "ctl.lan".into()),
            ],
            ..env(&list)
        };
        let c = AgentConfig::load(&sources, Purpose::Run).unwrap();
        assert_eq!(
            c.controller.entries(),
            [
                entry("10.0.0.1", 7443, "ctl.lan"),
                entry("10.0.0.2", 7443, "ctl.lan")
            ]
        );
        let bad = [base.as_slice(), &[("TAPGRAPH_CONTROLLER", "a:7443,b")]].concat();
        let e = AgentConfig::load(&env(&bad), Purpose::Run).unwrap_err();
        assert!(e.mentions("controller"), "{e}");
        assert!(e.to_string().contains("`b` is not HOST:PORT"), "{e}");
    }

    #[test]
    fn missing_credentials_and_bad_values_are_all_reported() {
        let dir = tempfile::tempdir().unwrap();
        let e = AgentConfig::load(
            &env(&[
                ("TAPGRAPH_STATE_DIR", dir.path().to_str().unwrap()),
                ("TAPGRAPH_BACKOFF__MIN", "10s"),
                ("TAPGRAPH_BACKOFF__MAX", "1s"),
                ("TAPGRAPH_LOG__FORMAT", "xml"),
            ]),
            Purpose::Run,
        )
        .unwrap_err();
        for key in ["tls.cert", "backoff", "log.format"] {
            assert!(e.mentions(key), "{key} missing from {e}");
        }
        assert!(e.to_string().contains("tapgraph-agent enroll"), "{e}");
    }

    #[test]
    fn metrics_listen_is_an_address_or_off() {
        assert_eq!(parse_metrics_listen("off"), Ok(None));
        assert_eq!(parse_metrics_listen(""), Ok(None));
        assert_eq!(
            parse_metrics_listen("[::1]:9100"),
            Ok(Some("[::1]:9100".parse().unwrap()))
        );
        assert!(parse_metrics_listen("localhost:9464").is_err());
        let dir = tempfile::tempdir().unwrap();
        let fp = "ab".repeat(32);
        let base = [
            ("TAPGRAPH_STATE_DIR", dir.path().to_str().unwrap()),
            ("TAPGRAPH_ENROLL__TOKEN", "tgj.x.y"),
            ("TAPGRAPH_ENROLL__CA_FINGERPRINT", fp.as_str()),
        ];
        let c = AgentConfig::load(&env(&base), Purpose::Run).unwrap();
        assert_eq!(c.metrics_listen, Some(METRICS_LISTEN));
        let off = [base.as_slice(), &[("TAPGRAPH_METRICS__LISTEN", "off")]].concat();
        let c = AgentConfig::load(&env(&off), Purpose::Run).unwrap();
        assert_eq!(c.metrics_listen, None);
        let bad = [base.as_slice(), &[("TAPGRAPH_METRICS__LISTEN", "9464")]].concat();
        let e = AgentConfig::load(&env(&bad), Purpose::Run).unwrap_err();
        assert!(e.mentions("metrics.listen"), "{e}");
    }

    #[test]
    fn bpf_is_on_by_default_and_snapshot_bpf_turns_it_off() {
        let dir = tempfile::tempdir().unwrap();
        let fp = "ab".repeat(32);
        let base = [
            ("TAPGRAPH_STATE_DIR", dir.path().to_str().unwrap()),
            ("TAPGRAPH_ENROLL__TOKEN", "tgj.x.y"),
            ("TAPGRAPH_ENROLL__CA_FINGERPRINT", fp.as_str()),
        ];
        assert!(AgentConfig::load(&env(&base), Purpose::Run).unwrap().bpf);
        let off = [base.as_slice(), &[("TAPGRAPH_SNAPSHOT__BPF", "false")]].concat();
        assert!(!AgentConfig::load(&env(&off), Purpose::Run).unwrap().bpf);
        let bad = [base.as_slice(), &[("TAPGRAPH_SNAPSHOT__BPF", "maybe")]].concat();
        let e = AgentConfig::load(&env(&bad), Purpose::Run).unwrap_err();
        assert!(e.mentions("snapshot.bpf"), "{e}");
    }

    #[test]
    fn a_token_without_certificates_means_enroll_first() {
        let dir = tempfile::tempdir().unwrap();
        let fp = "ab".repeat(32);
        let c = AgentConfig::load(
            &env(&[
                ("TAPGRAPH_STATE_DIR", dir.path().to_str().unwrap()),
                ("TAPGRAPH_ENROLL__TOKEN", "tgj.x.y"),
                ("TAPGRAPH_ENROLL__CA_FINGERPRINT", &fp),
            ]),
            Purpose::Run,
        )
        .unwrap();
        assert!(matches!(c.credentials, Credentials::Enroll(_)));
        // A token without the fingerprint is refused: the CA must be pinned.
        let e = AgentConfig::load(
            &env(&[
                ("TAPGRAPH_STATE_DIR", dir.path().to_str().unwrap()),
                ("TAPGRAPH_ENROLL__TOKEN", "tgj.x.y"),
            ]),
            Purpose::Run,
        )
        .unwrap_err();
        assert!(e.mentions("enroll.ca_fingerprint"), "{e}");
    }
}
