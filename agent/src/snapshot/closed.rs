//! TCP sockets that close between two snapshots, with their final counters: the sock_diag
//! multicast groups `SKNLGRP_INET_TCP_DESTROY` and `SKNLGRP_INET6_TCP_DESTROY`, whose
//! notifications carry the socket's `inet_diag_msg` and its `tcp_info` at the moment it is freed.
//! Without them, the bytes a socket moved after the last read, or a whole connection that lived
//! between two reads, would be lost.
//!
//! Joining the groups needs CAP_NET_ADMIN in the namespace's user namespace;
//! [`ClosedListener::start`] fails without it and the caller goes on with reads alone. A thread
//! receives the notifications and hands them over through a bounded queue: when it is full they
//! are dropped and counted, as are those the kernel dropped because the socket buffer was full
//! (ENOBUFS). Only the agent's own network namespace is listened to.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, setsockopt,
    socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

use super::diag::{INET_DIAG_MSG_LEN, NLMSG_HDRLEN, parse_message, tcp_info_of};
use super::proc_net::{Protocol, SocketRow};

// include/uapi/linux/sock_diag.h: enum sknetlink_groups; a group N is bit N-1 of nl_groups.
const SKNLGRP_INET_TCP_DESTROY: u32 = 1;
const SKNLGRP_INET6_TCP_DESTROY: u32 = 3;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// Room for bursts of closes between two reads of the thread.
const SOCKET_RCVBUF: usize = 4 << 20;
/// How often the thread looks whether it should stop.
const RECV_TIMEOUT_MS: i64 = 500;

/// Counts of the notifications, since the listener started; `/metrics` shows them.
#[derive(Debug, Default)]
pub struct ClosedCounters {
    /// 1 while a listener runs.
    pub listening: AtomicU64,
    /// Closed connections handed to the next snapshot.
    pub received: AtomicU64,
    /// Dropped because the queue to the next snapshot was full.
    pub dropped_queue_full: AtomicU64,
    /// Times the kernel reported lost notifications (ENOBUFS: the socket buffer was full).
    pub kernel_overruns: AtomicU64,
    /// Notifications that did not parse.
    pub malformed: AtomicU64,
}

/// Receives the destroy notifications of the agent's network namespace on a thread of its own.
#[derive(Debug)]
pub struct ClosedListener {
    rx: Receiver<SocketRow>,
    pub counters: Arc<ClosedCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ClosedListener {
    /// Joins the destroy groups (needs CAP_NET_ADMIN: EPERM otherwise) and starts the thread;
    /// at most `capacity` closed connections wait for the next snapshot.
    pub fn start(counters: Arc<ClosedCounters>, capacity: usize) -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        // Best effort: a smaller buffer only means earlier overruns, which are counted.
        let _ = setsockopt(&fd, sockopt::RcvBuf, &SOCKET_RCVBUF);
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &TimeVal::milliseconds(RECV_TIMEOUT_MS),
        )?;
        let groups = 1 << (SKNLGRP_INET_TCP_DESTROY - 1) | 1 << (SKNLGRP_INET6_TCP_DESTROY - 1);
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups))?;
        let (tx, rx) = sync_channel(capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("closed-sockets".into())
            .spawn({
                let (counters, stop) = (counters.clone(), stop.clone());
                move || run(fd, &tx, &counters, &stop)
            })?;
        counters.listening.store(1, Ordering::Relaxed);
        Ok(Self {
            rx,
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// The connections that closed since the last call, in the order they closed.
    pub fn drain(&self) -> Vec<SocketRow> {
        self.rx.try_iter().collect()
    }
}

impl Drop for ClosedListener {
    fn drop(&mut self) {
        self.counters.listening.store(0, Ordering::Relaxed);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(fd: OwnedFd, tx: &SyncSender<SocketRow>, counters: &ClosedCounters, stop: &AtomicBool) {
    // Kernel datagrams are at most 32 KiB; a notification is one message of ~400 bytes.
    let mut buf = vec![0u8; 32 * 1024];
    let mut rows = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let len = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(len) => len,
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(Errno::ENOBUFS) => {
                counters.kernel_overruns.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "closed-socket notifications stopped: counters of sockets that close between two snapshots are lost from now on");
                return;
            }
        };
        rows.clear();
        if parse_notifications(&buf[..len], &mut rows).is_err() {
            counters.malformed.fetch_add(1, Ordering::Relaxed);
        }
        for row in rows.drain(..) {
            match tx.try_send(row) {
                Ok(()) => {
                    counters.received.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(_)) => {
                    counters.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

/// The closed connections in one datagram of destroy notifications: connected TCP sockets with
/// their `tcp_info` (listeners and sockets without one are skipped). On a malformed message the
/// rows before it are kept and the rest of the datagram is skipped.
pub fn parse_notifications(data: &[u8], rows: &mut Vec<SocketRow>) -> Result<(), &'static str> {
    let mut offset = 0;
    while let Some(rest) = data.get(offset..).filter(|rest| !rest.is_empty()) {
        let Some(header) = rest.first_chunk::<NLMSG_HDRLEN>() else {
            return Err("truncated netlink header");
        };
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let Some(payload) = rest.get(NLMSG_HDRLEN..len) else {
            return Err("netlink message length out of bounds");
        };
        if kind == SOCK_DIAG_BY_FAMILY {
            let Some(msg) = payload.first_chunk::<INET_DIAG_MSG_LEN>() else {
                return Err("inet_diag_msg shorter than 72 bytes");
            };
            if msg[0] != super::diag::AF_INET && msg[0] != super::diag::AF_INET6 {
                return Err("socket of an unknown address family");
            }
            let mut row = parse_message(msg, Protocol::Tcp);
            row.tcp = tcp_info_of(msg, &payload[INET_DIAG_MSG_LEN..])?;
            if row.tcp.is_some() && !row.is_unconnected() {
                rows.push(row);
            }
        }
        offset += len.next_multiple_of(4);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    /// The captured notifications (fixtures/README.md): the client, then the accepted socket,
    /// then the listener, which is skipped.
    #[cfg(target_endian = "little")]
    #[test]
    fn captured_notifications_give_the_final_counters() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/snapshot/fixtures/destroy_tcp_info");
        let data = std::fs::read(path).unwrap();
        let mut rows = Vec::new();
        parse_notifications(&data, &mut rows).unwrap();
        let got: Vec<_> = rows
            .iter()
            .map(|r| {
                let tcp = r.tcp.unwrap();
                (
                    r.local.port(),
                    r.remote.port(),
                    tcp.cookie,
                    tcp.bytes_sent,
                    tcp.bytes_received,
                )
            })
            .collect();
        // Bytes received count the peer's FIN, which both sides had here.
        assert_eq!(
            got,
            [
                (48298, 51495, 310_553, 1000, 301),
                (51495, 48298, 310_552, 300, 1001)
            ]
        );
        // Cut anywhere: no panic, never more rows than whole messages.
        for cut in 0..data.len() {
            let mut rows = Vec::new();
            let _ = parse_notifications(&data[..cut], &mut rows);
            assert!(rows.len() <= cut / 380);
        }
    }

    /// A real connection closed while the listener runs arrives with its exact byte counts.
    #[test]
    fn a_closed_connection_is_reported_with_its_bytes() {
        let counters = Arc::new(ClosedCounters::default());
        let listener = match ClosedListener::start(counters.clone(), 1024) {
            Ok(l) => l,
            Err(e) if e.raw_os_error() == Some(Errno::EPERM as i32) => {
                eprintln!("SKIPPED: joining the sock_diag destroy groups needs CAP_NET_ADMIN: {e}");
                return;
            }
            Err(e) => panic!("starting the destroy listener: {e}"),
        };
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let client_port = client.local_addr().unwrap().port();
        let (mut accepted, _) = server.accept().unwrap();
        client.write_all(&[1; 4321]).unwrap();
        let mut got = vec![0; 4321];
        accepted.read_exact(&mut got).unwrap();
        accepted.write_all(&[2; 55]).unwrap();
        let mut back = [0; 55];
        client.read_exact(&mut back).unwrap();
        drop(client);
        drop(accepted);
        // Other tests' sockets close too; wait for ours (TIME_WAIT does not delay the
        // notification: the full socket is freed when it enters it).
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            seen.extend(
                listener
                    .drain()
                    .into_iter()
                    .filter(|r| r.local.port() == client_port || r.remote.port() == client_port),
            );
            if seen.len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Bytes sent are exact; bytes received count the peer's FIN when it came before the
        // socket was freed (the side that closes first may be freed once its own FIN is acked).
        let mut counts: Vec<_> = seen
            .iter()
            .map(|r| {
                let t = r.tcp.unwrap();
                let client = r.local.port() == client_port;
                let exact = if client { 55 } else { 4321 };
                let received = match t.bytes_received.checked_sub(exact) {
                    Some(0 | 1) => exact,
                    _ => t.bytes_received,
                };
                (client, t.bytes_sent, received)
            })
            .collect();
        counts.sort();
        assert_eq!(counts, [(false, 55, 4321), (true, 4321, 55)]);
        assert!(counters.received.load(Ordering::Relaxed) >= 2);
    }
}
