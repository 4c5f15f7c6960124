//! Targets `gre:HOST` and `erspan:HOST`: each frame, as Ethernet, sent to HOST in GRE over raw IP
//! (protocol 47; the kernel writes the IP header), as a switch's L2GRE or ERSPAN remote SPAN does.
//!
//! - `gre`: RFC 2784 with protocol type 0x6558 (transparent Ethernet bridging), and the RFC 2890
//!   key when the policy gives one.
//! - `erspan` type II: GRE with a sequence number (RFC 2890) and protocol 0x88BE, then the 8-byte
//!   ERSPAN header (version 1, the session id, index 0).
//! - `erspan` type III: GRE with a sequence number and protocol 0x22EB, then the 12-byte ERSPAN
//!   header (version 2, the session id, the capture time in 100 µs units: granularity 00, the one
//!   Linux sends too; frame type Ethernet; no platform sub-header).
//!
//! The layouts follow draft-foschiano-erspan-03 and Wireshark's dissectors. HOST is resolved once,
//! at open, IPv4 or IPv6. The socket is not connected: a connected raw socket takes the ICMP
//! "protocol unreachable" of a host that only captures (no GRE in its kernel) as an error, and the
//! next frame would be refused with it. `sendmmsg` sends up to 64 frames per system call, header
//! and frame gathered without copying. A frame the kernel refuses as too long (over 64 KiB with its
//! headers) is oversize; within that it is fragmented, as GRE receivers reassemble.

use std::io::IoSlice;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{SockaddrStorage, setsockopt, sockopt};
use tapgraph::policy::ErspanType;
use tapgraph::proto::Packet;

use crate::frame::Frame;
use crate::{OpenError, Origin, Writer, Written, offload_fix, send_each_to};

/// GRE protocol types.
const TRANSPARENT_ETHERNET: u16 = 0x6558;
const ERSPAN_II: u16 = 0x88be;
const ERSPAN_III: u16 = 0x22eb;
/// GRE flags: K (a key follows) and S (a sequence number follows), RFC 2890.
const FLAG_KEY: u16 = 0x2000;
const FLAG_SEQUENCE: u16 = 0x1000;
/// The ERSPAN header's version field: 1 in type II, 2 in type III.
const ERSPAN_VERSION_II: u32 = 1;
const ERSPAN_VERSION_III: u32 = 2;
const SESSION_MASK: u32 = 0x3ff;
/// The longest header: GRE with a sequence number (8) and ERSPAN type III (12).
const MAX_HEADER: usize = 20;

/// What goes before each frame: the encapsulation of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encapsulation {
    Gre { key: Option<u32> },
    Erspan { kind: ErspanType, session: u16 },
}

/// One frame's encapsulation header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    bytes: [u8; MAX_HEADER],
    len: usize,
}

impl Header {
    fn new(parts: &[&[u8]]) -> Self {
        let mut header = Header {
            bytes: [0; MAX_HEADER],
            len: 0,
        };
        for part in parts {
            // Within MAX_HEADER by construction: the parts below are at most 20 bytes together.
            header.bytes[header.len..header.len + part.len()].copy_from_slice(part);
            header.len += part.len();
        }
        header
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Encapsulation {
    /// The header of the frame numbered `sequence` (ERSPAN counts from 0 per target, wrapping),
    /// captured at `timestamp_unix_nanos`.
    pub fn header(&self, sequence: u32, timestamp_unix_nanos: u64) -> Header {
        match *self {
            Self::Gre { key: None } => {
                Header::new(&[&0u16.to_be_bytes(), &TRANSPARENT_ETHERNET.to_be_bytes()])
            }
            Self::Gre { key: Some(key) } => Header::new(&[
                &FLAG_KEY.to_be_bytes(),
                &TRANSPARENT_ETHERNET.to_be_bytes(),
                &key.to_be_bytes(),
            ]),
            // Ver, VLAN 0, COS 0, En 0 (no VLAN trunking), T 0 (not truncated), session; then
            // 12 reserved bits and the 20-bit index, 0.
            Self::Erspan {
                kind: ErspanType::TypeII,
                session,
            } => Header::new(&[
                &FLAG_SEQUENCE.to_be_bytes(),
                &ERSPAN_II.to_be_bytes(),
                &sequence.to_be_bytes(),
                &(ERSPAN_VERSION_II << 28 | u32::from(session) & SESSION_MASK).to_be_bytes(),
                &0u32.to_be_bytes(),
            ]),
            // Ver, VLAN 0, COS 0, BSO 0 (good frame), T 0, session; the timestamp in 100 µs units
            // (wrapping after 4.97 days, as the 32 bits do); then SGT 0, P 0, FT 0 (Ethernet),
            // hardware id 0, D 0 (ingress), Gra 00 (100 µs), O 0 (no platform sub-header).
            Self::Erspan {
                kind: ErspanType::TypeIII,
                session,
            } => Header::new(&[
                &FLAG_SEQUENCE.to_be_bytes(),
                &ERSPAN_III.to_be_bytes(),
                &sequence.to_be_bytes(),
                &(ERSPAN_VERSION_III << 28 | u32::from(session) & SESSION_MASK).to_be_bytes(),
                // Truncation intended: the field holds the low 32 bits.
                &((timestamp_unix_nanos / 100_000) as u32).to_be_bytes(),
                &0u32.to_be_bytes(),
            ]),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Gre { .. } => "GRE",
            Self::Erspan { .. } => "ERSPAN",
        }
    }
}

pub struct GreWriter {
    socket: OwnedFd,
    to: SockaddrStorage,
    /// The target as configured (`gre:HOST`), for messages.
    target: String,
    encapsulation: Encapsulation,
    /// The next frame's sequence number (ERSPAN).
    sequence: u32,
}

impl GreWriter {
    pub fn open(scheme: &str, host: &str, encapsulation: Encapsulation) -> Result<Self, OpenError> {
        let target = format!("{scheme}:{host}");
        let addr = (host, 0)
            .to_socket_addrs()
            .map_err(|source| OpenError::ResolveTunnel {
                target: target.clone(),
                host: host.to_string(),
                source,
            })?
            .next()
            .ok_or_else(|| OpenError::NoTunnelAddress {
                target: target.clone(),
                host: host.to_string(),
            })?;
        let family = match addr {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        let failed = |source: std::io::Error| OpenError::RawSocket {
            target: target.clone(),
            addr: addr.ip(),
            source,
        };
        // SAFETY: socket(2) takes no pointers; its result is checked before use.
        let fd = unsafe {
            libc::socket(
                family,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_GRE,
            )
        };
        if fd < 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by socket(2), is open, and nothing else owns it.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // The socket would also queue every GRE packet this host receives: the smallest buffer
        // the kernel allows keeps that to a packet or two, never read.
        setsockopt(&socket, sockopt::RcvBuf, &0).map_err(|e| failed(e.into()))?;
        Ok(Self {
            socket,
            to: SockaddrStorage::from(addr),
            target,
            encapsulation,
            sequence: 0,
        })
    }
}

impl Writer for GreWriter {
    fn write(&mut self, origin: &Origin<'_>, packets: &[Packet]) -> Written {
        let mut written = Written::default();
        let mut frames = Vec::with_capacity(packets.len());
        let mut headers = Vec::with_capacity(packets.len());
        for p in packets {
            match Frame::from_capture(origin.linktype, &p.data) {
                Err(e) => written.fail(e),
                Ok(f) => {
                    headers.push(
                        self.encapsulation
                            .header(self.sequence, p.timestamp_unix_nanos),
                    );
                    self.sequence = self.sequence.wrapping_add(1);
                    frames.push(f);
                }
            }
        }
        let messages: Vec<_> = frames
            .iter()
            .zip(&headers)
            .map(|(f, h)| {
                [
                    IoSlice::new(h.as_bytes()),
                    IoSlice::new(f.header()),
                    IoSlice::new(f.rest()),
                ]
            })
            .collect();
        let (target, kind) = (&self.target, self.encapsulation.name());
        send_each_to(
            self.socket.as_fd(),
            &self.to,
            &messages,
            |i, result| match result {
                Ok(()) => written.sent(frames[i].len()),
                Err(Errno::EMSGSIZE) => written.too_big(format!(
                    "frame of {} bytes does not fit in an IP packet to {target}: {}",
                    frames[i].len(),
                    offload_fix(origin),
                )),
                Err(e @ (Errno::ENETUNREACH | Errno::EHOSTUNREACH)) => written.fail(format_args!(
                    "sending {kind} to {target}: {}: check this host's routes to it",
                    e.desc()
                )),
                Err(e) => written.fail(format_args!("sending {kind} to {target}: {}", e.desc())),
            },
        );
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn quick(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{SYNTHETIC_DST, SYNTHETIC_SRC};
    use crate::packet;

    fn hex(h: Header) -> String {
        h.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn gre_headers_with_and_without_a_key() {
        let plain = Encapsulation::Gre { key: None };
        assert_eq!(hex(plain.header(7, 1)), "00006558");
        let keyed = Encapsulation::Gre {
            key: Some(0xdead_beef),
        };
        // K bit (0x2000), transparent Ethernet bridging, the key.
        assert_eq!(hex(keyed.header(7, 1)), "20006558deadbeef");
        assert_eq!(
            hex(Encapsulation::Gre { key: Some(0) }.header(0, 0)),
            "2000655800000000"
        );
    }

    #[test]
    fn erspan_type_ii_header() {
        let e = Encapsulation::Erspan {
            kind: ErspanType::TypeII,
            session: 0x2a5,
        };
        // S bit, 0x88BE, sequence 0x01020304; version 1 in the top nibble, session 0x2a5 in the
        // low 10 bits; reserved and index 0.
        assert_eq!(
            hex(e.header(0x0102_0304, 123)),
            "100088be01020304100002a500000000"
        );
        // The session keeps to its 10 bits whatever it is given.
        let wide = Encapsulation::Erspan {
            kind: ErspanType::TypeII,
            session: 0xffff,
        };
        assert_eq!(
            hex(wide.header(u32::MAX, 0)),
            "100088beffffffff100003ff00000000"
        );
    }

    #[test]
    fn erspan_type_iii_header() {
        let e = Encapsulation::Erspan {
            kind: ErspanType::TypeIII,
            session: 1023,
        };
        // 2026-01-01T00:00:00.123456789Z: 17_672_256_001_234 units of 100 µs, whose low 32 bits
        // are 0xa48a_94d2.
        let ns = 1_767_225_600_123_456_789u64;
        assert_eq!(
            hex(e.header(5, ns)),
            "100022eb00000005200003ffa48a94d200000000"
        );
    }

    fn origin(linktype: u32) -> Origin<'static> {
        Origin {
            agent_id: "a1",
            hostname: "web-1",
            interface: "any",
            linktype,
            snaplen: 0,
        }
    }

    /// A raw GRE socket that receives what the writer sends on loopback (IP header included).
    fn receiver() -> OwnedFd {
        // SAFETY: socket(2) takes no pointers; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_GRE) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(2, 0),
        )
        .unwrap();
        socket
    }

    /// The GRE payloads (IP header stripped) of the next `count` packets that are `mine`: tests
    /// run side by side, and every raw GRE socket receives every test's packets.
    fn received(socket: &OwnedFd, count: usize, mine: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        let mut got = Vec::new();
        while got.len() < count {
            let n = nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(socket),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            )
            .expect("a GRE packet");
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            if mine(&buf[ihl..n]) {
                got.push(buf[ihl..n].to_vec());
            }
        }
        got
    }

    /// Needs CAP_NET_RAW; sends on loopback, where another test's packets may also arrive, so
    /// each test uses its own key or session.
    #[test]
    fn frames_arrive_encapsulated_and_every_packet_is_accounted_for() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs CAP_NET_RAW");
            return;
        }
        let rx = receiver();
        let mut gre = GreWriter::open(
            "gre",
            "127.0.0.1",
            Encapsulation::Gre {
                key: Some(0x5eed_0001),
            },
        )
        .unwrap();
        let ether: Vec<u8> = (0..98u8).collect();
        let ip = [&[0x45u8][..], &[7; 39]].concat();
        let got = gre.write(&origin(1), &[packet(1, 98, ether.clone())]);
        assert_eq!((got.packets, got.bytes), (1, 98), "{got:?}");
        let got = gre.write(
            &origin(228),
            &[
                packet(2, 40, ip.clone()),
                packet(3, 0, vec![]),
                packet(4, 70_000, vec![0x45; 70_000]),
            ],
        );
        assert_eq!(
            (got.packets, got.bytes, got.failed, got.oversize),
            (1, 54, 1, 1),
            "{got:?}"
        );
        assert!(
            got.error
                .unwrap()
                .contains("does not fit in an IP packet to gre:127.0.0.1")
        );
        let synthesized = [&SYNTHETIC_DST[..], &SYNTHETIC_SRC, &[0x08, 0x00], &ip].concat();
        let key = "20006558 5eed0001".replace(' ', "");
        let mine: Vec<_> = received(&rx, 2, |p| p.len() >= 8 && hex_of(&p[..8]) == key)
            .into_iter()
            .map(|p| p[8..].to_vec())
            .collect();
        assert_eq!(mine, vec![ether, synthesized]);
    }

    fn hex_of(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn erspan_numbers_its_frames_across_writes() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs CAP_NET_RAW");
            return;
        }
        let rx = receiver();
        let mut w = GreWriter::open(
            "erspan",
            "localhost",
            Encapsulation::Erspan {
                kind: ErspanType::TypeII,
                session: 0x3a1,
            },
        )
        .unwrap();
        let frame = vec![0xab; 60];
        for _ in 0..2 {
            let got = w.write(
                &origin(1),
                &[packet(1, 60, frame.clone()), packet(1, 3, vec![1, 2, 3])],
            );
            assert_eq!(got.packets + got.failed, 2, "{got:?}");
            assert_eq!(got.packets, 1, "{got:?}");
        }
        let mine = |p: &[u8]| p.len() > 16 && p[8..12] == [0x10, 0, 0x03, 0xa1];
        let sequences: Vec<u32> = received(&rx, 2, mine)
            .iter()
            .map(|p| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
            .collect();
        // A frame that cannot be sent as Ethernet takes no number.
        assert_eq!(sequences, [0, 1]);
    }

    #[test]
    fn an_unresolvable_host_is_refused_with_the_target() {
        let err = GreWriter::open("gre", "nosuch.invalid", Encapsulation::Gre { key: None })
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .starts_with("mirror target gre:nosuch.invalid: cannot resolve `nosuch.invalid`"),
            "{err}"
        );
    }
}
