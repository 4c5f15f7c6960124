//! Webhook alerts (`[alerts]`): when the map's history records an edge change that the
//! operator's selector matches ("a new edge into `env=prod` from outside it"), one JSON POST to
//! a URL, signed, rate-limited and retried.
//!
//! The task follows the `edge` events the history recorder emits, so it sees each change once
//! (only the replica recording history emits them). Labels are read from the decorated map at
//! the time of the change: a host's labels (enrollment, operators, hostname rules), an
//! address's (CIDR rules), and a service's host's.
//!
//! Delivery: `Content-Type: application/json`, `X-Tapgraph-Delivery` (an id), and with
//! `alerts.secret_file` `X-Tapgraph-Signature: sha256=HEX`, the HMAC-SHA256 of the body (as
//! GitHub signs its webhooks). A connection failure, a timeout, 429 or 5xx is retried after 1 s,
//! 2 s, 4 s… up to `alerts.retries` times; any other answer ends it. Deliveries run on a task of
//! their own behind a bounded queue, so a slow receiver never holds up the reading of events.
//! Past `alerts.per_minute`, or with the queue full, matches are dropped and counted, and the next
//! delivery says how many (`suppressed`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tapgraph::proto;
use tokio::net::TcpStream;
use tokio::sync::broadcast;

use crate::enrollment::Enrollment;
use crate::events::Events;
use crate::topology::{GraphQuery, Naming, Topology};

/// What `[alerts]` configures. No URL: no alerts.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    pub url: Option<WebhookUrl>,
    pub selector: Selector,
    pub per_minute: u32,
    pub retries: u32,
    pub timeout: Duration,
    /// The HMAC key, from `alerts.secret_file`.
    pub secret: Option<Vec<u8>>,
}

/// An `http://` or `https://` URL, checked when configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path and query, `/` at least.
    pub path: String,
}

impl FromStr for WebhookUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{s}`: an http:// or https:// URL"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("`{s}`: no host (user info is not supported)"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("`{s}`: port `{p}` is not 1-65535"))?;
                (h, port)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(format!("`{s}`: no host"));
        }
        Ok(WebhookUrl {
            tls,
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(f, "{scheme}://{host}:{}{}", self.port, self.path)
    }
}

/// Which edge changes alert: every term must hold.
///
/// Terms, separated by spaces: `change=new|back|gone|appeared` (`appeared` is new or back),
/// `port=N`, `protocol=tcp|udp`, and labels of either end, `from.KEY=VALUE`, `to.KEY=VALUE`,
/// or with `!=` for "not" (a node without the label is not `KEY=VALUE`). Example, a new edge
/// into prod from outside it: `change=new to.env=prod from.env!=prod`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    terms: Vec<Term>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Change(&'static str),
    Port(u16),
    Protocol(String),
    Label {
        to: bool,
        key: String,
        value: String,
        negated: bool,
    },
}

impl Default for Selector {
    fn default() -> Self {
        "change=new".parse().unwrap_or(Selector {
            terms: Vec::new(),
            text: String::new(),
        })
    }
}

impl FromStr for Selector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for word in s.split_whitespace() {
            let (lhs, value, negated) = match word.split_once("!=") {
                Some((l, v)) => (l, v, true),
                None => match word.split_once('=') {
                    Some((l, v)) => (l, v, false),
                    None => return Err(format!("`{word}`: a term is KEY=VALUE or KEY!=VALUE")),
                },
            };
            if value.is_empty() {
                return Err(format!("`{word}`: no value"));
            }
            let term = match (lhs, negated) {
                ("change", false) => Term::Change(match value {
                    "new" => "new",
                    "back" => "back",
                    "gone" => "gone",
                    "appeared" => "appeared",
                    other => {
                        return Err(format!("`{other}`: change is new, back, gone or appeared"));
                    }
                }),
                ("port", false) => Term::Port(
                    value
                        .parse()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("`{word}`: port is 1-65535"))?,
                ),
                ("protocol", false) if value == "tcp" || value == "udp" => {
                    Term::Protocol(value.to_string())
                }
                ("protocol", false) => return Err(format!("`{word}`: protocol is tcp or udp")),
                (lhs, negated) => {
                    let (side, key) = lhs.split_once('.').ok_or_else(|| {
                        format!("`{word}`: change=, port=, protocol=, from.LABEL= or to.LABEL=")
                    })?;
                    let to = match side {
                        "from" => false,
                        "to" => true,
                        _ => return Err(format!("`{word}`: a label is from.KEY or to.KEY")),
                    };
                    if key.is_empty() {
                        return Err(format!("`{word}`: no label key"));
                    }
                    Term::Label {
                        to,
                        key: key.to_string(),
                        value: value.to_string(),
                        negated,
                    }
                }
            };
            terms.push(term);
        }
        if terms.is_empty() {
            return Err("an empty selector: say which changes alert, e.g. change=new".into());
        }
        Ok(Selector {
            terms,
            text: s.split_whitespace().collect::<Vec<_>>().join(" "),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// An edge change as the selector reads it.
#[derive(Debug, Clone, Default)]
pub struct EdgeChange {
    /// `new`, `back` or `gone`.
    pub change: String,
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: String,
    pub process: String,
    pub via: String,
    pub at_unix_ms: u64,
    pub message: String,
    pub from_labels: BTreeMap<String, String>,
    pub to_labels: BTreeMap<String, String>,
}

impl EdgeChange {
    /// The change an `edge` event tells; `None` for any other event.
    pub fn of(e: &proto::Event) -> Option<Self> {
        if e.kind != "edge" {
            return None;
        }
        let f = |k: &str| e.fields.get(k).cloned().unwrap_or_default();
        let change = match (f("change").as_str(), f("first").as_str()) {
            ("appeared", "true") => "new",
            ("appeared", _) => "back",
            ("gone", _) => "gone",
            _ => return None,
        };
        Some(EdgeChange {
            change: change.into(),
            from: f("from"),
            to: f("to"),
            port: f("port").parse().unwrap_or(0),
            protocol: f("protocol"),
            process: f("process"),
            via: f("via"),
            at_unix_ms: f("at_unix_ms").parse().unwrap_or(0),
            message: e.message.clone(),
            ..Default::default()
        })
    }
}

impl Selector {
    pub fn matches(&self, c: &EdgeChange) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Change("appeared") => c.change == "new" || c.change == "back",
            Term::Change(want) => c.change == *want,
            Term::Port(p) => c.port == *p,
            Term::Protocol(p) => c.protocol == *p,
            Term::Label {
                to,
                key,
                value,
                negated,
            } => {
                let labels = if *to { &c.to_labels } else { &c.from_labels };
                (labels.get(key) == Some(value)) != *negated
            }
        })
    }

    /// Whether any term reads labels (the map is then read for each change).
    fn reads_labels(&self) -> bool {
        self.terms.iter().any(|t| matches!(t, Term::Label { .. }))
    }
}

/// What the alerts did since the controller started (`/metrics`).
#[derive(Debug, Default)]
pub struct AlertStats {
    pub delivered: AtomicU64,
    /// Given up after the retries, or refused by the receiver.
    pub failed: AtomicU64,
    /// Matches past `alerts.per_minute`.
    pub suppressed: AtomicU64,
    /// Events the task fell behind on (the event channel overflowed).
    pub missed: AtomicU64,
}

/// Labels by node id.
type NodeLabels = BTreeMap<String, BTreeMap<String, String>>;

/// How long labels read from the map serve the changes that follow.
const LABELS_FRESH: Duration = Duration::from_secs(2);

/// Where labels come from: the decorated map.
#[derive(Clone)]
pub struct Labels {
    pub topology: Topology,
    pub enrollment: Enrollment,
    pub naming: Naming,
}

impl AlertStats {
    /// Delivered, failed, suppressed, missed.
    pub fn read(&self) -> [u64; 4] {
        [
            &self.delivered,
            &self.failed,
            &self.suppressed,
            &self.missed,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }
}

impl Labels {
    /// Labels by node id; a service's are its host's.
    async fn of(&self) -> NodeLabels {
        let map = crate::topology::view::map(
            &self.topology,
            &self.enrollment,
            &self.naming,
            GraphQuery {
                include_control: true,
                include_inactive: true,
            },
        )
        .await;
        map.nodes.into_iter().map(|n| (n.id, n.labels)).collect()
    }
}

fn labels_of(
    all: &BTreeMap<String, BTreeMap<String, String>>,
    id: &str,
) -> BTreeMap<String, String> {
    let holder = match id.strip_prefix("svc:").and_then(|s| s.split('/').next()) {
        Some(host) => format!("host:{host}"),
        None => id.to_string(),
    };
    all.get(id)
        .filter(|l| !l.is_empty())
        .or_else(|| all.get(&holder))
        .cloned()
        .unwrap_or_default()
}

/// Runs the alerts until the event channel closes. Spawn it only with a URL configured.
pub async fn run(
    settings: AlertSettings,
    url: WebhookUrl,
    events: Events,
    labels: Labels,
    stats: Arc<AlertStats>,
    replica: String,
) {
    let mut rx = events.subscribe();
    let mut bucket = Bucket::new(settings.per_minute);
    // Labels read at most every LABELS_FRESH: a burst of changes (a fleet's first start makes
    // every edge new) reads the map once, not once per change.
    let mut known: Option<(Instant, NodeLabels)> = None;
    let mut suppressed = 0u64;
    let mut sequence = 0u64;
    tracing::info!(%url, selector = %settings.selector, "webhook alerts on");
    let (queue, waiting) = tokio::sync::mpsc::channel(QUEUE);
    let deliveries = tokio::spawn(deliverer(settings.clone(), url, stats.clone(), waiting));
    // The deliverer ends with this task: the queue's sender drops, or it is aborted here.
    let _deliveries = AbortOnDrop(deliveries);
    loop {
        let event = match rx.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                stats.missed.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(
                    missed = n,
                    "alerts fell behind the events; those changes were not looked at"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(mut change) = EdgeChange::of(&event) else {
            continue;
        };
        if settings.selector.reads_labels() {
            let fresh = known
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() < LABELS_FRESH);
            if !fresh {
                known = Some((Instant::now(), labels.of().await));
            }
            if let Some((_, all)) = &known {
                change.from_labels = labels_of(all, &change.from);
                change.to_labels = labels_of(all, &change.to);
            }
        }
        if !settings.selector.matches(&change) {
            continue;
        }
        if !bucket.take(Instant::now()) {
            suppressed += 1;
            stats.suppressed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        sequence += 1;
        let delivery = format!("{replica}-{}-{sequence}", event.at_unix_nanos);
        let body = payload(&change, &settings.selector, suppressed, &replica);
        match queue.try_send((delivery, change.message, body)) {
            Ok(()) => suppressed = 0,
            // Deliveries are behind (a slow receiver, retries): this one is dropped, counted,
            // and the next one says so.
            Err(_) => {
                suppressed += 1;
                stats.suppressed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Alerts waiting for the deliverer at most; beyond, they are suppressed (counted).
const QUEUE: usize = 64;

/// Posts the queued alerts one after the other, retrying each as [`deliver`] does; a slow
/// receiver holds up only this, never the reading of events.
async fn deliverer(
    settings: AlertSettings,
    url: WebhookUrl,
    stats: Arc<AlertStats>,
    mut queue: tokio::sync::mpsc::Receiver<(String, String, Vec<u8>)>,
) {
    while let Some((delivery, message, body)) = queue.recv().await {
        match deliver(&settings, &url, &delivery, body).await {
            Ok(status) => {
                stats.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%delivery, status, change = %message, "alert delivered");
            }
            Err(error) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%delivery, %url, %error, change = %message, "alert not delivered");
            }
        }
    }
}

fn payload(c: &EdgeChange, selector: &Selector, suppressed: u64, replica: &str) -> Vec<u8> {
    let at = tapgraph::time::rfc3339(tapgraph::time::from_unix_nanos(
        c.at_unix_ms.saturating_mul(1_000_000),
    ));
    let body = json!({
        "kind": "edge",
        "change": c.change,
        "at": at,
        "from": c.from,
        "to": c.to,
        "port": c.port,
        "protocol": c.protocol,
        "process": c.process,
        "via": c.via,
        "from_labels": c.from_labels,
        "to_labels": c.to_labels,
        "message": c.message,
        "selector": selector.to_string(),
        "suppressed": suppressed,
        "replica": replica,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Aborts the task it holds when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `sha256=HEX` of the body under `key`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key);
    let tag = aws_lc_rs::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Posts `body`, retrying what may pass later; the receiver's status when it took it.
async fn deliver(
    settings: &AlertSettings,
    url: &WebhookUrl,
    delivery: &str,
    body: Vec<u8>,
) -> Result<u16, String> {
    let body = Bytes::from(body);
    let mut wait = Duration::from_secs(1);
    let mut attempt = 0;
    loop {
        let outcome = tokio::time::timeout(
            settings.timeout,
            post(settings, url, delivery, body.clone()),
        )
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", settings.timeout)));
        let retry = match &outcome {
            Ok(status) if (200..300).contains(status) => return Ok(*status),
            Ok(status) if *status == 429 || *status >= 500 => format!("status {status}"),
            Ok(status) => return Err(format!("refused with status {status}")),
            Err(e) => e.clone(),
        };
        if attempt >= settings.retries {
            return Err(format!("{retry}, after {} attempts", attempt + 1));
        }
        attempt += 1;
        tracing::debug!(%delivery, %retry, attempt, "alert retried");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(60));
    }
}

async fn post(
    settings: &AlertSettings,
    url: &WebhookUrl,
    delivery: &str,
    body: Bytes,
) -> Result<u16, String> {
    let stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut request = hyper::Request::post(url.path.as_str())
        .header(hyper::header::HOST, format!("{}:{}", url.host, url.port))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            format!("tapgraph-controller/{}", tapgraph::VERSION),
        )
        .header("x-tapgraph-delivery", delivery);
    if let Some(key) = &settings.secret {
        request = request.header("x-tapgraph-signature", signature(key, &body));
    }
    let request = request
        .body(Full::new(body))
        .map_err(|e| format!("request: {e}"))?;
    if url.tls {
        let connector = tokio_rustls::TlsConnector::from(client_tls()?);
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| format!("server name `{}`: {e}", url.host))?;
        let tls = connector
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(tls), request).await
    } else {
        send(TokioIo::new(stream), request).await
    }
}

async fn send<T>(io: T, request: hyper::Request<Full<Bytes>>) -> Result<u16, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"));
    let status = match response {
        Ok(r) => {
            let status = r.status().as_u16();
            // Read the answer to its end: the receiver may close once it is sent.
            let _ = r.into_body().collect().await;
            Ok(status)
        }
        Err(e) => Err(e),
    };
    driver.abort();
    status
}

/// The system's trust store, read once.
fn client_tls() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no trusted CA certificates on this system".into());
            }
            rustls::ClientConfig::builder_with_provider(tapgraph::tls::provider())
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| format!("TLS: {e}"))
        })
        .clone()
}

/// `per_minute` alerts a minute at most, a minute's worth at once.
struct Bucket {
    per_minute: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        Bucket {
            per_minute: f64::from(per_minute),
            tokens: f64::from(per_minute),
            at: None,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            let refill = now.duration_since(at).as_secs_f64() * self.per_minute / 60.0;
            self.tokens = (self.tokens + refill).min(self.per_minute);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: &str, from: &[(&str, &str)], to: &[(&str, &str)]) -> EdgeChange {
        let labels = |l: &[(&str, &str)]| {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        EdgeChange {
            change: kind.into(),
            port: 5432,
            protocol: "tcp".into(),
            from_labels: labels(from),
            to_labels: labels(to),
            ..Default::default()
        }
    }

    #[test]
    fn a_new_edge_into_prod_from_outside_it() {
        let s: Selector = "change=new  to.env=prod from.env!=prod".parse().unwrap();
        assert_eq!(s.to_string(), "change=new to.env=prod from.env!=prod");
        assert!(s.matches(&change("new", &[("env", "dev")], &[("env", "prod")])));
        assert!(
            s.matches(&change("new", &[], &[("env", "prod")])),
            "unlabelled is outside"
        );
        assert!(!s.matches(&change("new", &[("env", "prod")], &[("env", "prod")])));
        assert!(!s.matches(&change("back", &[], &[("env", "prod")])));
        assert!(!s.matches(&change("new", &[], &[("env", "dev")])));
        let s: Selector = "change=appeared port=5432 protocol=tcp".parse().unwrap();
        assert!(s.matches(&change("back", &[], &[])));
        assert!(!s.matches(&change("gone", &[], &[])));
    }

    #[test]
    fn bad_selectors_and_urls_are_refused_naming_the_part() {
        for (bad, names) in [
            ("", "empty"),
            ("change=old", "`old`"),
            ("port=0", "`port=0`"),
            ("protocol=icmp", "`protocol=icmp`"),
            ("env=prod", "`env=prod`"),
            ("side.env=prod", "`side.env=prod`"),
            ("to.=x", "no label key"),
            ("to.env=", "no value"),
            ("change", "`change`"),
        ] {
            let e = bad.parse::<Selector>().unwrap_err();
            assert!(e.contains(names), "{bad}: {e}");
        }
        let u: WebhookUrl = "http://127.0.0.1:9099/hook?x=1".parse().unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.path.as_str()),
            (false, "127.0.0.1", 9099, "/hook?x=1")
        );
        let u: WebhookUrl = "https://hooks.example.com".parse().unwrap();
        assert_eq!((u.port, u.path.as_str()), (443, "/"));
        let u: WebhookUrl = "http://[::1]:8080/x".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 8080));
        for bad in [
            "ftp://x/",
            "http://",
            "http://h:0/",
            "http://h:99999/",
            "http://u@h/",
        ] {
            assert!(bad.parse::<WebhookUrl>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_signature_is_the_body_s_hmac_sha256() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn the_rate_is_a_minute_s_worth_then_its_pace() {
        let mut b = Bucket::new(2);
        let t = Instant::now();
        assert!(b.take(t) && b.take(t));
        assert!(!b.take(t));
        assert!(!b.take(t + Duration::from_secs(29)));
        assert!(b.take(t + Duration::from_secs(31)));
    }
}
