//! The HTTP listener, built for a network it cannot trust (slow or hostile clients):
//! - at most `max_connections` connections at once, by default derived from the descriptor limit
//!   so that gRPC always has descriptors left to accept agents with, and at most
//!   `max_connections_per_source` from one source (an IPv4 address, an IPv6 /64). A connection past
//!   either cap is closed at once, counted by reason, and logged at most once per [`LOG_EVERY`];
//! - a request's head must arrive whole within `header_read_timeout` (a connection kept alive
//!   waits for its next request no longer), and a connection on which no byte moves for
//!   `idle_timeout` (a stalled upload, a client that stopped reading) is closed;
//! - HTTPS when a certificate is configured, its handshake within `header_read_timeout` too.
//!
//! Every request carries its peer's address as [`ConnectInfo`], for the access guard.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::metrics::HttpCounts;

/// Refusals and failures are logged at most this often (each with how many it stands for).
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Descriptors kept out of the HTTP budget for everything that is not a connection: the store,
/// certificates, the log, mirror files, the Neo4j connection.
pub const RESERVED_FDS: u64 = 256;
/// The connection cap when none is configured, if the descriptor limit allows it.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// The `http.*` settings.
#[derive(Clone)]
pub struct HttpSettings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: derived from the descriptor limit ([`connection_limit`]).
    pub max_connections: Option<usize>,
    pub max_connections_per_source: usize,
    /// Bad access tokens one source may present per minute before it is answered 429.
    pub auth_failures_per_minute: u32,
    /// A bearer token `/metrics` requires, when set.
    pub metrics_token: Option<crate::sinks::Secret>,
    /// Serve HTTPS with this certificate, when set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: None,
            max_connections_per_source: 64,
            auth_failures_per_minute: 10,
            metrics_token: None,
            tls: None,
        }
    }
}

/// What the listener and the access guard counted, for `/metrics`.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub open: AtomicU64,
    pub limit: AtomicU64,
    /// Closed at once: the connection cap was reached.
    pub refused_capacity: AtomicU64,
    /// Closed at once: the source's cap was reached.
    pub refused_per_source: AtomicU64,
    pub accept_errors: AtomicU64,
    /// Closed: a request head (or a TLS handshake) did not arrive in time.
    pub header_timeouts: AtomicU64,
    /// Closed: nothing moved for the idle timeout.
    pub idle_timeouts: AtomicU64,
    /// Closed at capacity, before sending a whole request head, to make room for a newer one.
    pub evicted: AtomicU64,
    pub tls_failures: AtomicU64,
    /// Requests that presented a wrong, expired or malformed token.
    pub auth_failures: AtomicU64,
    /// Requests answered 429: their source presented too many bad tokens.
    pub auth_limited: AtomicU64,
}

impl HttpStats {
    /// Every counter, read at one moment, for `/metrics`.
    pub fn read(&self) -> HttpCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        HttpCounts {
            open: get(&self.open),
            limit: get(&self.limit),
            refused_capacity: get(&self.refused_capacity),
            refused_per_source: get(&self.refused_per_source),
            accept_errors: get(&self.accept_errors),
            header_timeouts: get(&self.header_timeouts),
            idle_timeouts: get(&self.idle_timeouts),
            evicted: get(&self.evicted),
            tls_failures: get(&self.tls_failures),
            auth_failures: get(&self.auth_failures),
            auth_limited: get(&self.auth_limited),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The connection cap: the configured one, or [`DEFAULT_MAX_CONNECTIONS`], but never more than
/// half of the descriptors left after [`RESERVED_FDS`]: the other half is gRPC's. At least 8.
/// The second value is true when the configured cap was lowered to fit.
pub fn connection_limit(configured: Option<usize>, nofile: u64) -> (usize, bool) {
    let budget = (nofile.saturating_sub(RESERVED_FDS) / 2).max(8);
    let budget = usize::try_from(budget).unwrap_or(usize::MAX);
    let wanted = configured.unwrap_or(DEFAULT_MAX_CONNECTIONS);
    (wanted.min(budget), configured.is_some_and(|c| c > budget))
}

/// This process's descriptor limit (the soft one, which is what `accept` runs into).
fn nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(1024)
}

/// What one source is: an IPv4 address, or an IPv6 /64, which one host usually holds whole.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Logs something at most once per interval, saying how many times it happened since.
pub struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one occurrence; `Some(n)` when a line is due, `n` occurrences since the last one.
    pub fn due(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 += 1;
        let now = Instant::now();
        if state
            .0
            .is_some_and(|last| now.duration_since(last) < self.every)
        {
            return None;
        }
        let n = state.1;
        *state = (Some(now), 0);
        Some(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Capacity,
    PerSource,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Capacity => "capacity",
            Refusal::PerSource => "per_source",
        }
    }
}

#[derive(Default)]
struct Table {
    open: usize,
    by_source: HashMap<IpAddr, usize>,
    /// Connections that have not yet sent a whole request head, oldest first, with what closes
    /// them: at capacity the oldest is closed to make room (see [`Slots::take`]).
    fresh: BTreeMap<u64, CancellationToken>,
    next: u64,
    /// Closed to make room, not yet gone.
    evicting: usize,
}

/// The open connections, in all and by source.
pub struct Slots {
    table: tokio::sync::watch::Sender<Table>,
    limit: usize,
    per_source: usize,
    stats: Arc<HttpStats>,
}

/// One open connection's place; given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
    seq: u64,
    /// Cancelled when the connection is closed to make room for a newer one.
    evict: CancellationToken,
}

impl Slot {
    /// The connection sent a whole request head: it is no longer the first to be closed at
    /// capacity.
    fn proven(&self) {
        self.slots.table.send_modify(|t| {
            t.fresh.remove(&self.seq);
        });
    }
}

impl Slots {
    pub fn new(limit: usize, per_source: usize, stats: Arc<HttpStats>) -> Arc<Self> {
        stats.limit.store(limit as u64, Ordering::Relaxed);
        Arc::new(Self {
            table: tokio::sync::watch::Sender::new(Table::default()),
            limit,
            per_source,
            stats,
        })
    }

    /// A place for a connection from `ip`, or why there is none (counted). At capacity the
    /// oldest connection that has not yet sent a whole request head (a slow or silent client,
    /// most likely) is closed to make room, so many slow sources cannot keep a prompt client out;
    /// with none such, or with twice the limit still open, the newcomer is refused.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let source = source_of(ip);
        let mut outcome = Err(Refusal::Capacity);
        let mut evicted = false;
        self.table.send_if_modified(|t| {
            let from_source = t.by_source.get(&source).copied().unwrap_or(0);
            if from_source >= self.per_source {
                outcome = Err(Refusal::PerSource);
                return false;
            }
            if t.open - t.evicting >= self.limit {
                if t.open >= self.limit.saturating_mul(2) {
                    return false;
                }
                let Some((_, oldest)) = t.fresh.pop_first() else {
                    return false;
                };
                oldest.cancel();
                t.evicting += 1;
                evicted = true;
            }
            let seq = t.next;
            t.next += 1;
            let evict = CancellationToken::new();
            t.fresh.insert(seq, evict.clone());
            t.open += 1;
            t.by_source.insert(source, from_source + 1);
            outcome = Ok((seq, evict));
            true
        });
        if evicted {
            bump(&self.stats.evicted);
        }
        match outcome {
            Ok((seq, evict)) => {
                self.stats.open.fetch_add(1, Ordering::Relaxed);
                Ok(Slot {
                    slots: self.clone(),
                    source,
                    seq,
                    evict,
                })
            }
            Err(refusal) => {
                bump(match refusal {
                    Refusal::Capacity => &self.stats.refused_capacity,
                    Refusal::PerSource => &self.stats.refused_per_source,
                });
                Err(refusal)
            }
        }
    }

    /// Waits until every connection has ended.
    async fn drained(&self) {
        let mut rx = self.table.subscribe();
        let _ = rx.wait_for(|t| t.open == 0).await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let evicted = self.evict.is_cancelled();
        self.slots.table.send_modify(|t| {
            t.open = t.open.saturating_sub(1);
            t.fresh.remove(&self.seq);
            if evicted {
                t.evicting = t.evicting.saturating_sub(1);
            }
            if let Some(n) = t.by_source.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    t.by_source.remove(&self.source);
                }
            }
        });
        self.slots.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `router` on `listener` until `stop`, then lets open connections finish (graceful
/// shutdown; event streams end on `stop` too) and returns once they have.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    settings: &HttpSettings,
    stats: Arc<HttpStats>,
    stop: CancellationToken,
) {
    let nofile = nofile();
    let (limit, lowered) = connection_limit(settings.max_connections, nofile);
    if lowered {
        tracing::warn!(
            configured = settings.max_connections.unwrap_or_default(),
            limit,
            nofile,
            "http.max_connections lowered to fit the descriptor limit, keeping the rest for gRPC"
        );
    }
    tracing::debug!(
        limit,
        per_source = settings.max_connections_per_source,
        nofile,
        "HTTP connection limits"
    );
    let slots = Slots::new(limit, settings.max_connections_per_source, stats.clone());
    let limits = Limits {
        header_read_timeout: settings.header_read_timeout,
        idle_timeout: settings.idle_timeout,
    };
    let tls = settings.tls.clone().map(TlsAcceptor::from);
    let refused = Throttle::new(LOG_EVERY);
    let failed = Throttle::new(LOG_EVERY);
    let evictions = Throttle::new(LOG_EVERY);
    let policy = tapgraph::backoff::BackoffPolicy::new(
        Duration::from_millis(10),
        Duration::from_secs(1),
        0.2,
    )
    .unwrap_or_default();
    let mut backoff = policy.start();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff.reset();
                pair
            }
            Err(error) => {
                // EMFILE and friends: back off instead of spinning; connections ending free
                // descriptors.
                bump(&stats.accept_errors);
                let delay = backoff.next_delay();
                if let Some(n) = failed.due() {
                    tracing::warn!(%error, failures = n, retry_in = ?delay, "HTTP accept failed");
                }
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        let evicted_before = stats.evicted.load(Ordering::Relaxed);
        let slot = match slots.take(peer.ip()) {
            Ok(slot) => {
                let made_room = stats.evicted.load(Ordering::Relaxed) > evicted_before;
                if let Some(n) = made_room.then(|| evictions.due()).flatten() {
                    tracing::warn!(
                        %peer,
                        limit,
                        evicted = n,
                        "HTTP connections without a request closed to make room at capacity"
                    );
                }
                slot
            }
            Err(refusal) => {
                drop(tcp);
                if let Some(n) = refused.due() {
                    tracing::warn!(
                        %peer,
                        reason = refusal.reason(),
                        limit,
                        per_source = settings.max_connections_per_source,
                        refused = n,
                        "HTTP connections refused past a cap"
                    );
                }
                continue;
            }
        };
        let connection = Connection {
            peer,
            slot: Arc::new(slot),
            router: router.clone(),
            limits,
            stats: stats.clone(),
            stop: stop.clone(),
        };
        let tls = tls.clone();
        tokio::spawn(connection.run(tcp, tls));
    }
    drop(listener);
    slots.drained().await;
}

#[derive(Clone, Copy)]
struct Limits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

struct Connection {
    peer: SocketAddr,
    slot: Arc<Slot>,
    router: Router,
    limits: Limits,
    stats: Arc<HttpStats>,
    stop: CancellationToken,
}

impl Connection {
    async fn run(self, tcp: TcpStream, tls: Option<TlsAcceptor>) {
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = tls else {
            return self.serve(tcp).await;
        };
        let handshake = tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(tcp));
        let evict = self.slot.evict.clone();
        let handshaken = tokio::select! {
            handshaken = handshake => handshaken,
            () = evict.cancelled() => return,
        };
        match handshaken {
            Ok(Ok(stream)) => self.serve(stream).await,
            Ok(Err(error)) => {
                bump(&self.stats.tls_failures);
                tracing::debug!(peer = %self.peer, %error, "HTTPS handshake failed");
            }
            Err(_) => bump(&self.stats.header_timeouts),
        }
    }

    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let io = Watched {
            inner: io,
            activity: activity.clone(),
        };
        let peer = self.peer;
        let router = self.router;
        let slot = self.slot.clone();
        let proven = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            if !proven.swap(true, Ordering::Relaxed) {
                slot.proven();
            }
            request.extensions_mut().insert(ConnectInfo(peer));
            tower::ServiceExt::oneshot(router.clone(), request)
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .keep_alive(true);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let idle = self.limits.idle_timeout;
        let mut draining = false;
        loop {
            let quiet_until = tokio::time::Instant::from_std(activity.last() + idle);
            tokio::select! {
                served = conn.as_mut() => {
                    if let Err(error) = served {
                        if error.is_timeout() {
                            bump(&self.stats.header_timeouts);
                        } else {
                            tracing::debug!(%peer, %error, "HTTP connection failed");
                        }
                    }
                    return;
                }
                () = self.slot.evict.cancelled() => return,
                () = self.stop.cancelled(), if !draining => {
                    conn.as_mut().graceful_shutdown();
                    draining = true;
                }
                () = tokio::time::sleep_until(quiet_until) => {
                    if activity.last().elapsed() >= idle {
                        bump(&self.stats.idle_timeouts);
                        return;
                    }
                }
            }
        }
    }
}

/// When a connection last moved a byte either way.
#[derive(Clone)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A connection's stream that notes each byte moved in [`Activity`].
struct Watched<I> {
    inner: I,
    activity: Activity,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The certificate and key of `http.tls_cert` and `http.tls_key` as a server configuration
/// (HTTP/1.1, no client certificates: the console's token is the credential).
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let chain = tapgraph::tls::load_certs(cert).map_err(|e| e.to_string())?;
    let key = tapgraph::tls::load_key(key).map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(tapgraph::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_for_grpc() {
        assert_eq!(
            connection_limit(None, 1 << 20),
            (DEFAULT_MAX_CONNECTIONS, false)
        );
        assert_eq!(connection_limit(None, 1024), (384, false));
        assert_eq!(connection_limit(Some(100), 1024), (100, false));
        assert_eq!(connection_limit(Some(5000), 1024), (384, true));
        assert_eq!(connection_limit(None, 100), (8, false), "a floor");
    }

    #[test]
    fn an_ipv6_source_is_its_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_of(a), source_of(b));
        assert_ne!(source_of(a), source_of(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_of(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn slots_are_capped_in_all_and_per_source_and_given_back() {
        let stats = Arc::new(HttpStats::default());
        let slots = Slots::new(3, 2, stats.clone());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).err(), Some(Refusal::PerSource));
        let b1 = slots.take(b).unwrap();
        for slot in [&a1, &_a2, &b1] {
            slot.proven();
        }
        assert_eq!(slots.take(b).err(), Some(Refusal::Capacity));
        drop(a1);
        assert!(slots.take(b).is_ok(), "a place given back is taken again");
        assert_eq!(stats.refused_per_source.load(Ordering::Relaxed), 1);
        assert_eq!(stats.refused_capacity.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn at_capacity_the_oldest_connection_without_a_request_makes_room() {
        let stats = Arc::new(HttpStats::default());
        let slots = Slots::new(2, 10, stats.clone());
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let first = slots.take(ip(1)).unwrap();
        let second = slots.take(ip(2)).unwrap();
        second.proven();
        let third = slots.take(ip(3)).unwrap();
        assert!(first.evict.is_cancelled(), "the oldest silent one goes");
        assert!(!second.evict.is_cancelled() && !third.evict.is_cancelled());
        third.proven();
        // Nothing left to evict: both open ones have sent a request.
        drop(first);
        assert_eq!(slots.take(ip(4)).err(), Some(Refusal::Capacity));
        assert_eq!(stats.evicted.load(Ordering::Relaxed), 1);
        drop((second, third));
        assert!(slots.take(ip(4)).is_ok());
    }

    #[test]
    fn a_throttled_log_says_how_many_it_stands_for() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.due(), Some(1));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        let t = Throttle::new(Duration::ZERO);
        assert_eq!(t.due(), Some(1));
        assert_eq!(t.due(), Some(1));
    }
}
