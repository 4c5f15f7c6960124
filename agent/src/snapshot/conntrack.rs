//! The kernel's address translations, read from conntrack over netlink (`NETLINK_NETFILTER`,
//! ctnetlink), so that the map sees through NAT.
//!
//! A socket only knows the address it dialled: a client of a service's virtual IP (kube-proxy's
//! ClusterIP, an iptables DNAT) shows `10.96.0.10:53`, while the connection lands on a backend.
//! Conntrack holds both views of every tracked flow: the original tuple (what the client sent)
//! and the reply tuple (what the backend answers from). Of each flow whose destination was
//! translated (`IPS_DST_NAT`), two things are kept:
//! - a [`Translations`] entry, keyed by the original 5-tuple: a client socket of this host whose
//!   tuple matches becomes a row towards the backend, with the dialled address as its `via`;
//! - a [`NatFront`] when the client is elsewhere (the flow entered this host and was translated
//!   on the way in, as for a published container port): the controller then lands the remote
//!   client's row, which still names the front, on the backend.
//!
//! One dump of both families per snapshot on a socket kept open, like [`super::diag`]; only the
//! tuples and the status are decoded. Hand-written on `nix` for the same reasons as `diag`: the
//! netlink crates that know ctnetlink (`nlink`, `netlink-bindings`) bring an async runtime or a
//! generated binding of every netfilter message, for three attributes read here.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nix::errno::Errno;
use nix::sys::socket::SockProtocol;

use super::Protocol;

use super::netlink::{
    DumpSocket, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLMSG_NOOP, Recv,
};

const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;
// include/uapi/linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
const NFGENMSG_LEN: usize = 4;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_STATUS_MASK: u16 = 26;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
// include/uapi/linux/netfilter/nf_conntrack_common.h
const IPS_DST_NAT: u32 = 1 << 5;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Translated flows kept from one dump at most: a NAT gateway can track millions of flows, and
/// a snapshot needs the few thousand that are this host's sockets or fronts. Beyond this, the
/// rest of the dump is read and dropped, and counted.
pub const MAX_FLOWS: usize = 1 << 18;

/// One translated flow: the client sent to `dialled`, the kernel delivered to `backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub protocol: Protocol,
    pub client: SocketAddr,
    pub dialled: SocketAddr,
    pub backend: SocketAddr,
}

/// An address this host translates for clients elsewhere: connections to `front` land on
/// `backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NatFront {
    pub protocol: Protocol,
    pub front: SocketAddr,
    pub backend: SocketAddr,
}

/// The translated flows of one dump, by their original tuple.
#[derive(Debug, Clone, Default)]
pub struct Translations {
    by_tuple: HashMap<(Protocol, SocketAddr, SocketAddr), SocketAddr>,
    fronts: BTreeSet<NatFront>,
}

impl Translations {
    /// Sorts `flows` into translations of this host's own sockets (their client is one of
    /// `local`) and fronts for clients elsewhere.
    pub fn new(flows: impl IntoIterator<Item = Flow>, local: &BTreeSet<IpAddr>) -> Self {
        let mut t = Self::default();
        for flow in flows {
            if local.contains(&flow.client.ip()) || flow.client.ip().is_loopback() {
                t.by_tuple
                    .insert((flow.protocol, flow.client, flow.dialled), flow.backend);
            } else {
                t.fronts.insert(NatFront {
                    protocol: flow.protocol,
                    front: flow.dialled,
                    backend: flow.backend,
                });
            }
        }
        t
    }

    /// Where a socket from `local` to `remote` really goes, when the kernel translated it.
    pub fn backend(
        &self,
        protocol: Protocol,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> Option<SocketAddr> {
        self.by_tuple.get(&(protocol, local, remote)).copied()
    }

    pub fn fronts(&self) -> &BTreeSet<NatFront> {
        &self.fronts
    }
}

/// Why a dump failed.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("conntrack netlink socket: {op} failed: {source}")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("conntrack dump refused by the kernel: {source}{hint}", hint = hint(.source))]
    Kernel {
        #[source]
        source: io::Error,
    },
    #[error("conntrack dump: malformed datagram ({what} at byte {offset} of {len})")]
    Malformed {
        what: &'static str,
        offset: usize,
        len: usize,
    },
    #[error("conntrack dump: datagram of {len} bytes exceeds the {cap}-byte buffer")]
    Truncated { len: usize, cap: usize },
}

fn hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(e) if e == Errno::EPERM as i32 => " (reading conntrack needs CAP_NET_ADMIN)",
        Some(e) if e == Errno::ENOENT as i32 || e == Errno::EOPNOTSUPP as i32 => {
            " (no connection tracking in this kernel or namespace)"
        }
        _ => "",
    }
}

/// A ctnetlink socket of the namespace it was opened in, kept across dumps.
#[derive(Debug)]
pub struct ConntrackReader {
    socket: DumpSocket,
    /// Ask the kernel for translated flows only (`CTA_STATUS_MASK`, Linux 5.19+); cleared when
    /// it refuses the filter, and every flow is then dumped and sorted here.
    filtered: bool,
}

impl ConntrackReader {
    /// A reader of the calling thread's network namespace.
    pub fn open() -> Result<Self, ConntrackError> {
        let socket = DumpSocket::open(SockProtocol::NetlinkNetFilter).map_err(|e| {
            ConntrackError::Socket {
                op: "socket",
                source: e.into(),
            }
        })?;
        Ok(Self {
            socket,
            filtered: true,
        })
    }

    /// Every translated TCP and UDP flow of the namespace, IPv4 and IPv6, at most [`MAX_FLOWS`];
    /// the count of those left out is the second value.
    pub fn dump(&mut self) -> Result<(Vec<Flow>, u64), ConntrackError> {
        match self.dump_once() {
            Err(ConntrackError::Kernel { source }) if self.filtered => {
                tracing::debug!(error = %source, "the kernel does not filter conntrack dumps by status; dumping every flow");
                self.filtered = false;
                self.dump_once()
            }
            other => other,
        }
    }

    fn dump_once(&mut self) -> Result<(Vec<Flow>, u64), ConntrackError> {
        let filtered = self.filtered;
        let seq = self
            .socket
            .start(|seq| request(seq, filtered))
            .map_err(|(op, e)| ConntrackError::Socket {
                op,
                source: e.into(),
            })?;
        let mut flows = Vec::new();
        let mut dropped = 0;
        loop {
            let datagram = match self.socket.next() {
                Ok(datagram) => datagram,
                Err(Recv::Failed(e)) => {
                    return Err(ConntrackError::Socket {
                        op: "recv",
                        source: e.into(),
                    });
                }
                Err(Recv::Truncated { len, cap }) => {
                    return Err(ConntrackError::Truncated { len, cap });
                }
            };
            let progress = parse_datagram(datagram, seq, &mut |flow| {
                if flows.len() < MAX_FLOWS {
                    flows.push(flow);
                } else {
                    dropped += 1;
                }
            });
            match progress {
                Ok(false) => {}
                Ok(true) => {
                    self.socket.finished();
                    return Ok((flows, dropped));
                }
                Err(err @ ConntrackError::Kernel { .. }) => {
                    self.socket.finished();
                    return Err(err);
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// `nlmsghdr` + `nfgenmsg` asking for the conntrack entries of both families; `filtered`: only
/// those whose destination was translated (`CTA_STATUS` under `CTA_STATUS_MASK`), so the kernel
/// copies out only what is kept here.
fn request(seq: u32, filtered: bool) -> Vec<u8> {
    let mut req = vec![0u8; NLMSG_HDRLEN + NFGENMSG_LEN];
    // nfgen_family AF_UNSPEC (both), version NFNETLINK_V0, res_id 0: all zero.
    if filtered {
        for kind in [CTA_STATUS, CTA_STATUS_MASK] {
            req.extend_from_slice(&8u16.to_ne_bytes());
            req.extend_from_slice(&kind.to_ne_bytes());
            req.extend_from_slice(&IPS_DST_NAT.to_be_bytes());
        }
    }
    let len = req.len() as u32;
    let kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&kind.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    req
}

/// Parses one datagram of dump `seq`, handing each translated TCP or UDP flow to `each`. True
/// once the dump is over. Messages of another sequence number are skipped.
fn parse_datagram(
    data: &[u8],
    seq: u32,
    each: &mut impl FnMut(Flow),
) -> Result<bool, ConntrackError> {
    let malformed = |what, offset| ConntrackError::Malformed {
        what,
        offset,
        len: data.len(),
    };
    if data.is_empty() {
        return Err(malformed("empty datagram", 0));
    }
    let mut offset = 0;
    while let Some(rest) = data.get(offset..).filter(|rest| !rest.is_empty()) {
        let Some(header) = rest.first_chunk::<NLMSG_HDRLEN>() else {
            return Err(malformed("truncated netlink header", offset));
        };
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        let msg_seq = u32::from_ne_bytes([header[8], header[9], header[10], header[11]]);
        let Some(payload) = rest.get(NLMSG_HDRLEN..len).filter(|_| len >= NLMSG_HDRLEN) else {
            return Err(malformed("netlink message length out of bounds", offset));
        };
        if msg_seq == seq {
            match kind {
                NLMSG_DONE | NLMSG_ERROR => {
                    let code = match payload.first_chunk::<4>() {
                        Some(code) => i32::from_ne_bytes(*code),
                        None if kind == NLMSG_DONE => 0,
                        None => return Err(malformed("truncated NLMSG_ERROR", offset)),
                    };
                    if code == 0 {
                        return Ok(true);
                    }
                    return Err(ConntrackError::Kernel {
                        source: io::Error::from_raw_os_error(code.saturating_abs()),
                    });
                }
                NLMSG_NOOP => {}
                k if k == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW => {
                    let attrs = payload
                        .get(NFGENMSG_LEN..)
                        .ok_or_else(|| malformed("truncated nfgenmsg", offset))?;
                    if let Some(flow) =
                        parse_entry(attrs).map_err(|what| malformed(what, offset))?
                    {
                        each(flow);
                    }
                }
                _ => return Err(malformed("unexpected message type", offset)),
            }
        }
        offset += len.next_multiple_of(4);
    }
    Ok(false)
}

/// The attributes of one nested or top-level block: `(type, payload)`, types without flags.
fn attributes(mut data: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), &'static str>> {
    std::iter::from_fn(move || {
        if data.len() < NLA_HDRLEN {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        let block = data;
        let Some(payload) = block.get(NLA_HDRLEN..len).filter(|_| len >= NLA_HDRLEN) else {
            data = &[];
            return Some(Err("attribute length out of bounds"));
        };
        data = block.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some(Ok((kind, payload)))
    })
}

/// One entry's flow, when its destination was translated and it is TCP or UDP.
fn parse_entry(attrs: &[u8]) -> Result<Option<Flow>, &'static str> {
    let (mut orig, mut reply, mut status) = (None, None, 0u32);
    for attr in attributes(attrs) {
        let (kind, payload) = attr?;
        match kind {
            CTA_TUPLE_ORIG => orig = Some(parse_tuple(payload)?),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(payload)?),
            CTA_STATUS => {
                let b = payload.first_chunk::<4>().ok_or("short CTA_STATUS")?;
                status = u32::from_be_bytes(*b);
            }
            _ => {}
        }
    }
    if status & IPS_DST_NAT == 0 {
        return Ok(None);
    }
    let (Some(orig), Some(reply)) = (orig, reply) else {
        return Err("translated entry without both tuples");
    };
    let protocol = match orig.protocol {
        IPPROTO_TCP => Protocol::Tcp,
        IPPROTO_UDP => Protocol::Udp,
        _ => return Ok(None),
    };
    Ok(Some(Flow {
        protocol,
        client: orig.src,
        dialled: orig.dst,
        // The backend answers from the address the client's packets were sent on to.
        backend: reply.src,
    }))
}

struct Tuple {
    protocol: u8,
    src: SocketAddr,
    dst: SocketAddr,
}

fn parse_tuple(data: &[u8]) -> Result<Tuple, &'static str> {
    let (mut src, mut dst) = (None, None);
    let (mut protocol, mut sport, mut dport) = (0u8, 0u16, 0u16);
    for attr in attributes(data) {
        let (kind, payload) = attr?;
        match kind {
            CTA_TUPLE_IP => {
                for ip in attributes(payload) {
                    let (kind, b) = ip?;
                    let addr = match kind {
                        CTA_IP_V4_SRC | CTA_IP_V4_DST => {
                            IpAddr::V4(Ipv4Addr::from(*b.first_chunk::<4>().ok_or("short IPv4")?))
                        }
                        CTA_IP_V6_SRC | CTA_IP_V6_DST => {
                            IpAddr::V6(Ipv6Addr::from(*b.first_chunk::<16>().ok_or("short IPv6")?))
                        }
                        _ => continue,
                    };
                    let addr = addr.to_canonical();
                    if matches!(kind, CTA_IP_V4_SRC | CTA_IP_V6_SRC) {
                        src = Some(addr);
                    } else {
                        dst = Some(addr);
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for p in attributes(payload) {
                    let (kind, b) = p?;
                    match kind {
                        CTA_PROTO_NUM => protocol = *b.first().ok_or("short protocol")?,
                        CTA_PROTO_SRC_PORT => {
                            sport = u16::from_be_bytes(*b.first_chunk::<2>().ok_or("short port")?)
                        }
                        CTA_PROTO_DST_PORT => {
                            dport = u16::from_be_bytes(*b.first_chunk::<2>().ok_or("short port")?)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let (Some(src), Some(dst)) = (src, dst) else {
        return Err("tuple without both addresses");
    };
    Ok(Tuple {
        protocol,
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((NLA_HDRLEN + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn nested(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &parts.concat())
    }

    fn tuple(kind: u16, protocol: u8, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let ip = |k4: u16, k6: u16, a: IpAddr| match a {
            IpAddr::V4(v4) => attr(k4, &v4.octets()),
            IpAddr::V6(v6) => attr(k6, &v6.octets()),
        };
        nested(
            kind,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[
                        ip(CTA_IP_V4_SRC, CTA_IP_V6_SRC, src.ip()),
                        ip(CTA_IP_V4_DST, CTA_IP_V6_DST, dst.ip()),
                    ],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[protocol]),
                        attr(CTA_PROTO_SRC_PORT, &src.port().to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dst.port().to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    /// A ctnetlink entry as the kernel sends it (family, version, res_id, then attributes).
    fn entry(protocol: u8, orig: (&str, &str), reply: (&str, &str), status: u32) -> Vec<u8> {
        let mut p = vec![2, 0, 0, 0];
        p.extend(tuple(CTA_TUPLE_ORIG, protocol, sa(orig.0), sa(orig.1)));
        p.extend(tuple(CTA_TUPLE_REPLY, protocol, sa(reply.0), sa(reply.1)));
        p.extend(attr(CTA_STATUS, &status.to_be_bytes()));
        message((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW, 7, &p)
    }

    fn parse_all(data: &[u8]) -> (Result<bool, ConntrackError>, Vec<Flow>) {
        let mut flows = Vec::new();
        let r = parse_datagram(data, 7, &mut |f| flows.push(f));
        (r, flows)
    }

    #[test]
    fn a_dnat_entry_gives_the_dialled_address_and_the_backend() {
        let mut d = entry(
            IPPROTO_TCP,
            ("10.0.0.1:40000", "10.96.0.10:53"),
            ("10.0.0.2:8053", "10.0.0.1:40000"),
            IPS_DST_NAT | 0x0e,
        );
        // Untranslated flows and other protocols are skipped.
        d.extend(entry(
            IPPROTO_TCP,
            ("10.0.0.1:40001", "10.0.0.3:80"),
            ("10.0.0.3:80", "10.0.0.1:40001"),
            0x0e,
        ));
        d.extend(entry(
            1,
            ("10.0.0.1:0", "10.96.0.10:0"),
            ("10.0.0.2:0", "10.0.0.1:0"),
            IPS_DST_NAT,
        ));
        d.extend(entry(
            IPPROTO_UDP,
            ("[fd00::1]:5000", "[fd00::53]:53"),
            ("[fd00::2]:5353", "[fd00::1]:5000"),
            IPS_DST_NAT,
        ));
        d.extend(message(NLMSG_DONE, 7, &0i32.to_ne_bytes()));
        let (r, flows) = parse_all(&d);
        assert!(r.unwrap(), "the dump ends at NLMSG_DONE");
        assert_eq!(
            flows,
            vec![
                Flow {
                    protocol: Protocol::Tcp,
                    client: sa("10.0.0.1:40000"),
                    dialled: sa("10.96.0.10:53"),
                    backend: sa("10.0.0.2:8053"),
                },
                Flow {
                    protocol: Protocol::Udp,
                    client: sa("[fd00::1]:5000"),
                    dialled: sa("[fd00::53]:53"),
                    backend: sa("[fd00::2]:5353"),
                },
            ]
        );
    }

    #[test]
    fn translations_sort_own_sockets_from_fronts() {
        let local: BTreeSet<IpAddr> = ["10.0.0.1".parse().unwrap()].into();
        let t = Translations::new(
            [
                Flow {
                    protocol: Protocol::Tcp,
                    client: sa("10.0.0.1:40000"),
                    dialled: sa("10.96.0.10:53"),
                    backend: sa("10.0.0.2:8053"),
                },
                Flow {
                    protocol: Protocol::Tcp,
                    client: sa("10.0.0.7:51000"),
                    dialled: sa("10.0.0.1:80"),
                    backend: sa("172.17.0.2:8080"),
                },
            ],
            &local,
        );
        assert_eq!(
            t.backend(Protocol::Tcp, sa("10.0.0.1:40000"), sa("10.96.0.10:53")),
            Some(sa("10.0.0.2:8053"))
        );
        assert_eq!(
            t.backend(Protocol::Udp, sa("10.0.0.1:40000"), sa("10.96.0.10:53")),
            None
        );
        assert_eq!(
            t.fronts().iter().copied().collect::<Vec<_>>(),
            vec![NatFront {
                protocol: Protocol::Tcp,
                front: sa("10.0.0.1:80"),
                backend: sa("172.17.0.2:8080"),
            }]
        );
    }

    #[test]
    fn bad_datagrams_are_refused_not_misread() {
        let good = entry(
            IPPROTO_TCP,
            ("10.0.0.1:40000", "10.96.0.10:53"),
            ("10.0.0.2:8053", "10.0.0.1:40000"),
            IPS_DST_NAT,
        );
        for cut in [3, 17, 20, 30, good.len() - 9] {
            let mut bad = good[..cut].to_vec();
            // Keep the netlink length honest so only the inner structure is broken.
            let n = (bad.len() as u32).to_ne_bytes();
            if bad.len() >= 4 {
                bad[..4].copy_from_slice(&n);
            }
            let (r, flows) = parse_all(&bad);
            assert!(
                r.is_err() || flows.is_empty(),
                "cut at {cut}: {r:?} {flows:?}"
            );
        }
        let (r, _) = parse_all(&message(NLMSG_ERROR, 7, &(-1i32).to_ne_bytes()));
        let err = r.unwrap_err().to_string();
        assert!(err.contains("CAP_NET_ADMIN"), "{err}");
        // Another dump's messages are skipped.
        let (r, flows) = parse_all(&message(NLMSG_DONE, 6, &0i32.to_ne_bytes()));
        assert!(!r.unwrap() && flows.is_empty());
    }

    /// The real kernel: a DNAT in a fresh namespace's OUTPUT chain (as kube-proxy makes for a
    /// ClusterIP), a connection to the virtual address, and the dump names the backend.
    #[test]
    fn a_real_dnat_is_read_back_from_the_kernel() {
        use std::net::{TcpListener, TcpStream};
        use std::process::Command;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root (a network namespace and iptables)");
            return;
        }
        if Command::new("iptables").arg("--version").output().is_err() {
            panic!("iptables is missing: scripts/install-deps installs it");
        }
        let seen = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            // Children inherit this thread's namespace.
            let run = |args: &[&str]| {
                let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
                assert!(
                    out.status.success(),
                    "{args:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            run(&["ip", "link", "set", "lo", "up"]);
            run(&["ip", "route", "add", "10.96.0.0/16", "dev", "lo"]);
            let backend = TcpListener::bind("127.0.0.1:0").unwrap();
            let to = backend.local_addr().unwrap().to_string();
            run(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "OUTPUT",
                "-p",
                "tcp",
                "-d",
                "10.96.0.10",
                "--dport",
                "53",
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ]);
            let client = TcpStream::connect("10.96.0.10:53").unwrap();
            let (_accepted, _) = backend.accept().unwrap();
            // An untranslated flow beside it is left out.
            let _direct = TcpStream::connect(backend.local_addr().unwrap()).unwrap();
            let mut reader = ConntrackReader::open().unwrap();
            let (flows, dropped) = reader.dump().unwrap();
            // A second dump on the same socket works too, and so does one the kernel does not
            // filter.
            let again = reader.dump().unwrap().0;
            reader.filtered = false;
            assert_eq!(reader.dump().unwrap().0, again);
            (
                client.local_addr().unwrap(),
                client.peer_addr().unwrap(),
                backend.local_addr().unwrap(),
                flows,
                dropped,
                again,
            )
        })
        .join()
        .unwrap();
        let (client, peer, backend, flows, dropped, again) = seen;
        assert_eq!(
            peer,
            sa("10.96.0.10:53"),
            "the socket names what it dialled"
        );
        let want = Flow {
            protocol: Protocol::Tcp,
            client,
            dialled: peer,
            backend,
        };
        assert_eq!(flows, vec![want]);
        assert_eq!(again, vec![want]);
        assert_eq!(dropped, 0);
    }
}
