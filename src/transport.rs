//! TLS over TCP for gRPC, on both ends, with the peer's verified identity attached to every request.
//!
//! The server side accepts, handshakes each connection on its own task (a slow or hostile client
//! cannot stall the accept loop), and hands tonic a [`TlsIo`] whose connect info carries the
//! [`PeerInfo`]. Handlers read it with `request.extensions().get::<PeerInfo>()`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::identity::{Identity, IdentityError};

/// What the server knows about the peer of a connection, from its verified certificate.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// `Err` when no certificate was presented (allowed only for enrollment), or when it verified
    /// against the CA but carries no usable tapgraph identity.
    pub identity: Result<Identity, IdentityError>,
    /// SHA-256 (hex) of the presented certificate's public key, when one was presented: which key
    /// of an identity's history this connection holds ([`crate::pki::cert_key_sha256`]).
    pub key_sha256: Option<String>,
}

/// Bytes read from a busy connection's socket at a time. rustls reads at most 4 KiB per call: 16
/// `recv` calls per 64 KiB of mirrored packets, 1 with this buffer (a mirror batch of 50 packets
/// of 1,400 bytes, a millisecond at 50k packets/s, is 73 KB: it took 3-4 reads of 32 KiB).
const READ_AHEAD: usize = 128 << 10;

/// Encrypted bytes a client connection holds for the socket before it stops taking more. rustls
/// holds 64 KiB by default, so a mirror batch larger than that went out in two `writev`s, each a
/// system call and a TCP push of its own; a batch is at most 1 MiB, and this is transient: the
/// batch's own buffer is held until written either way.
const TLS_SEND_BUFFER: usize = 1 << 20;

/// Reads its socket up to [`READ_AHEAD`] bytes at a time while data streams in (a mirror stream),
/// and holds no buffer while the connection is quiet, which is what most of thousands of agent
/// connections are most of the time: a fixed buffer would cost 128 KiB per agent. The buffer is
/// not zeroed (a batch of small packets, a few KiB, takes a buffer and gives it back each time).
pub struct ReadAhead<S> {
    inner: S,
    /// Without capacity while the connection is quiet.
    buf: BytesMut,
    /// The last fill was at least half the buffer: keep it for the next one.
    busy: bool,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            busy: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes held for reading: 0 while quiet.
    pub fn buffered_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buf.is_empty() {
            if this.buf.capacity() == 0 || dst.remaining() >= READ_AHEAD {
                // Quiet, or a large read anyway: straight into the caller's buffer. A read that
                // fills it says data is streaming in: read ahead from now on.
                let (before, wanted) = (dst.filled().len(), dst.remaining());
                std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, dst))?;
                if wanted > 0 && dst.filled().len() - before == wanted && this.buf.capacity() == 0 {
                    this.buf = BytesMut::with_capacity(READ_AHEAD);
                }
                return Poll::Ready(Ok(()));
            }
            // Drained: the whole allocation is ours again.
            this.buf.reserve(READ_AHEAD);
            let n = std::task::ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut this.buf
            ))?;
            this.busy = n >= READ_AHEAD / 2;
        }
        let n = this.buf.len().min(dst.remaining());
        dst.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() && !this.busy {
            // Drained and slowing down: give the buffer back until data streams again.
            this.buf = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A server-side TLS connection, as tonic serves it.
pub struct TlsIo {
    stream: server::TlsStream<ReadAhead<TcpStream>>,
    info: PeerInfo,
}

impl Connected for TlsIo {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// How the accept loop waits after a failed `accept` (no descriptor left, most often): 10 ms
/// doubling to 1 s, so it neither spins nor stays away long once descriptors are free.
fn accept_backoff() -> crate::backoff::BackoffPolicy {
    crate::backoff::BackoffPolicy::new(Duration::from_millis(10), Duration::from_secs(1), 0.2)
        .unwrap_or_default()
}

/// Failed accepts are logged at most this often, with how many there were.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
struct AcceptFailures {
    logged_at: Option<std::time::Instant>,
    since: u64,
}

impl AcceptFailures {
    fn note(&mut self, error: &io::Error, retry_in: Duration) {
        self.since += 1;
        if self
            .logged_at
            .is_some_and(|at| at.elapsed() < ACCEPT_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(%error, failures = self.since, ?retry_in, "gRPC accept failed; backing off");
        self.logged_at = Some(std::time::Instant::now());
        self.since = 0;
    }
}

/// At most this many TLS handshakes are in progress at once; a connection past it is closed at
/// once. A slow-handshake flood on the gRPC port then holds a bounded number of descriptors (each
/// for at most the handshake timeout), and a healthy fleet's handshakes take milliseconds, so even
/// thousands of agents reconnecting together stay far below it.
pub const MAX_HANDSHAKES: usize = 1024;

/// Refused, timed-out and over-the-cap handshakes, logged at most once per [`ACCEPT_LOG_EVERY`]
/// per kind with how many the line stands for: a handshake flood must not become a log flood.
#[derive(Default)]
struct HandshakeFailures {
    kinds: std::sync::Mutex<[(Option<std::time::Instant>, u64); 3]>,
}

#[derive(Clone, Copy)]
enum HandshakeFailure {
    Refused = 0,
    TimedOut = 1,
    OverCap = 2,
}

impl HandshakeFailures {
    /// `Some(n)`: log this one, standing for `n` failures of its kind (itself included).
    fn admit(&self, kind: HandshakeFailure) -> Option<u64> {
        // A poisoned lock only means a panic elsewhere mid-update of two counters: still usable.
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let (logged_at, since) = &mut kinds[kind as usize];
        *since += 1;
        if logged_at.is_some_and(|at| at.elapsed() < ACCEPT_LOG_EVERY) {
            return None;
        }
        *logged_at = Some(std::time::Instant::now());
        Some(std::mem::take(since))
    }
}

/// Accepts TCP connections on `listener` and yields those whose TLS handshake (including client
/// certificate verification) succeeds within `handshake_timeout`. Refused handshakes are logged with
/// the peer address and the reason (at most once per 10 s per kind, with how many there were).
/// Accepting stops when the returned stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
) -> ReceiverStream<Result<TlsIo, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        let mut backoff = accept_backoff().start();
        let mut failures = AcceptFailures::default();
        let handshake_failures = Arc::new(HandshakeFailures::default());
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, remote_addr) = match accepted {
                Ok(pair) => {
                    backoff.reset();
                    pair
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning, and keep accepting once
                    // descriptors are free again; the log says so once per interval, not per try.
                    let delay = backoff.next_delay();
                    failures.note(&error, delay);
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                if let Some(count) = handshake_failures.admit(HandshakeFailure::OverCap) {
                    tracing::warn!(peer = %remote_addr, count, limit = MAX_HANDSHAKES, "TLS handshakes at the cap; connection closed");
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let log = handshake_failures.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(handshake_timeout, acceptor.accept(ReadAhead::new(tcp)))
                    .await
                {
                    Ok(Ok(stream)) => {
                        let leaf = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first());
                        let identity = leaf
                            .ok_or(IdentityError::NoCertificate)
                            .and_then(|leaf| Identity::from_cert_der(leaf));
                        let key_sha256 =
                            leaf.and_then(|leaf| crate::pki::cert_key_sha256(leaf).ok());
                        let info = PeerInfo {
                            remote_addr,
                            identity,
                            key_sha256,
                        };
                        let _ = tx.send(Ok(TlsIo { stream, info })).await;
                    }
                    Ok(Err(error)) => {
                        if let Some(count) = log.admit(HandshakeFailure::Refused) {
                            tracing::warn!(peer = %remote_addr, %error, count, "TLS handshake refused");
                        }
                    }
                    Err(_) => {
                        if let Some(count) = log.admit(HandshakeFailure::TimedOut) {
                            tracing::warn!(peer = %remote_addr, timeout = ?handshake_timeout, count, "TLS handshake timed out");
                        }
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Options of a client channel to the controller.
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval; a peer that does not answer within `keepalive_timeout` is dead.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }
}

/// Opens one HTTP/2 connection over TLS to `addr` (`host:port`), verifying the server as
/// `server_name`. Every RPC made on the returned channel shares that connection.
pub async fn connect(
    addr: &str,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    options: &ChannelOptions,
) -> Result<Channel, ConnectError> {
    open(
        addr,
        Target::Name(addr.to_string()),
        server_name,
        tls,
        options,
    )
    .await
}

/// Like [`connect`], to an address already resolved: the caller decides which of a name's
/// addresses to try and in which order. The connect timeout applies to this address alone.
pub async fn connect_addr(
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    options: &ChannelOptions,
) -> Result<Channel, ConnectError> {
    open(
        &addr.to_string(),
        Target::Addr(addr),
        server_name,
        tls,
        options,
    )
    .await
}

/// Where the TCP connection goes: a `host:port` resolved at connect time, or one address.
#[derive(Clone)]
enum Target {
    Name(String),
    Addr(SocketAddr),
}

async fn open(
    addr: &str,
    target: Target,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    options: &ChannelOptions,
) -> Result<Channel, ConnectError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| ConnectError::ServerName(server_name.to_string()))?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ConnectError::Address(addr.to_string(), e.to_string()))?
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .keep_alive_while_idle(true);
    let connector = TlsConnector::from(tls);
    let service = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        let name = name.clone();
        let target = target.clone();
        async move {
            let tcp = match target {
                Target::Name(host_port) => TcpStream::connect(host_port.as_str()).await?,
                Target::Addr(addr) => TcpStream::connect(addr).await?,
            };
            tcp.set_nodelay(true)?;
            let tls: client::TlsStream<TcpStream> = connector
                .connect_with(name, tcp, |c| c.set_buffer_limit(Some(TLS_SEND_BUFFER)))
                .await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(service)
        .await
        .map_err(|e| ConnectError::Transport(crate::error_chain(&e)))
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("`{0}` is not a valid TLS server name")]
    ServerName(String),
    #[error("`{0}` is not a valid address: {1}")]
    Address(String, String),
    #[error("{0}")]
    Transport(String),
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn a_handshake_flood_is_one_log_line_per_kind_and_interval() {
        let log = HandshakeFailures::default();
        assert_eq!(
            log.admit(HandshakeFailure::TimedOut),
            Some(1),
            "the first is logged"
        );
        for _ in 0..500 {
            assert_eq!(log.admit(HandshakeFailure::TimedOut), None);
        }
        // Another kind has its own interval.
        assert_eq!(log.admit(HandshakeFailure::Refused), Some(1));
        // Once the interval has passed, the next line stands for everything since the last one.
        log.kinds.lock().unwrap()[HandshakeFailure::TimedOut as usize].0 =
            std::time::Instant::now().checked_sub(ACCEPT_LOG_EVERY);
        assert_eq!(log.admit(HandshakeFailure::TimedOut), Some(501));
        assert_eq!(log.admit(HandshakeFailure::TimedOut), None);
    }

    #[tokio::test]
    async fn handshakes_past_the_cap_are_closed_and_the_rest_go_on() {
        // Both ends of MAX_HANDSHAKES + 1 connections live in this process.
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let need = 3 * MAX_HANDSHAKES as u64;
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        if soft < need && setrlimit(Resource::RLIMIT_NOFILE, need.min(hard), hard).is_err()
            || need > hard
        {
            eprintln!(
                "SKIPPED handshakes_past_the_cap_are_closed_and_the_rest_go_on: needs {need} file \
                 descriptors, the hard limit is {hard}"
            );
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ca = crate::pki::CertAuthority::generate("test CA", Duration::from_secs(3600)).unwrap();
        let leaf = ca
            .issue(
                &Identity::operator("test").unwrap(),
                &["127.0.0.1".into()],
                Duration::from_secs(3600),
            )
            .unwrap();
        let chain = crate::tls::parse_certs(leaf.cert_pem.as_bytes()).unwrap();
        let key = crate::tls::parse_key(leaf.key_pem.as_bytes()).unwrap();
        let roots = crate::tls::roots_from_pem(ca.cert_pem().as_bytes()).unwrap();
        let config = crate::tls::server_config(chain, key, roots).unwrap();
        let _incoming = tls_incoming(listener, config, Duration::from_secs(30));
        // MAX_HANDSHAKES silent clients hold every handshake slot...
        let mut silent = Vec::new();
        for _ in 0..MAX_HANDSHAKES {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // ... so the next connection is closed at once, without waiting for the timeout.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(20), extra.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a connection past the cap must be closed: {read:?}"
        );
        // Freeing slots lets new connections wait for their handshake again.
        silent.clear();
        let mut later = None;
        for _ in 0..100 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let r = tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await;
            if r.is_err() {
                later = Some(c);
                break;
            }
        }
        assert!(
            later.is_some(),
            "after the flood, a connection waits for its handshake"
        );
    }

    #[tokio::test]
    async fn a_resolved_address_is_dialled_as_such_v4_and_v6() {
        let tls = crate::tls::pinned_client_config(&"ab".repeat(32)).unwrap();
        let options = ChannelOptions::default();
        for local in ["127.0.0.1:0", "[::1]:0"] {
            // A port with nothing listening: the error is the connection's, not the address's.
            let Ok(listener) = std::net::TcpListener::bind(local) else {
                continue; // no IPv6 loopback here
            };
            let addr = listener.local_addr().unwrap();
            drop(listener);
            let e = connect_addr(addr, "localhost", tls.clone(), &options)
                .await
                .unwrap_err();
            assert!(matches!(e, ConnectError::Transport(_)), "{addr}: {e:?}");
        }
        let e = connect_addr(([127, 0, 0, 1], 1).into(), "bad name!", tls, &options)
            .await
            .unwrap_err();
        assert!(matches!(e, ConnectError::ServerName(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_stream_is_read_whole_and_in_order_in_small_reads() {
        let (mut tx, rx) = tokio::io::duplex(256 << 10);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            tx.write_all(&sent).await.unwrap();
        });
        let mut reader = ReadAhead::new(rx);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut buffered = false;
        while got.len() < data.len() {
            let n = reader.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
            buffered |= reader.buffered_capacity() > 0;
        }
        writer.await.unwrap();
        assert_eq!(got, data);
        assert!(buffered, "a streaming connection reads ahead");
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(64 << 10);
        let mut reader = ReadAhead::new(rx);
        let mut chunk = [0u8; 4096];
        for _ in 0..5 {
            tx.write_all(b"heartbeat").await.unwrap();
            let n = reader.read(&mut chunk).await.unwrap();
            assert_eq!(&chunk[..n], b"heartbeat");
            assert_eq!(reader.buffered_capacity(), 0);
        }
        // A burst fills reads: the buffer comes; once it is drained and data trickles, it goes.
        tx.write_all(&[7u8; 40_000]).await.unwrap();
        let mut total = 0;
        while total < 40_000 {
            total += reader.read(&mut chunk).await.unwrap();
        }
        tx.write_all(b"quiet again").await.unwrap();
        let n = reader.read(&mut chunk).await.unwrap();
        assert_eq!(&chunk[..n], b"quiet again");
        assert_eq!(reader.buffered_capacity(), 0, "released after the burst");
    }
}
