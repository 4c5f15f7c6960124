//! Short-lived connections: periodic table reads miss a connection that opens and closes between
//! two snapshots (Weave Scope's most-cited gap). A small libpcap capture of TCP SYN-ACKs catches
//! every accepted connection as it happens, and tells the server side for free: the SYN-ACK comes
//! from the server. Catches are merged into the next snapshot, marked short-lived.
//!
//! The capture runs on its own thread with a BPF filter that passes only SYN-ACKs, in immediate
//! mode, and hands catches over through a bounded channel: when it is full, catches are dropped and
//! counted, never queued without bound.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

/// One accepted TCP connection, as its SYN-ACK showed it: `server` answered `client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Catch {
    pub server_ip: IpAddr,
    pub server_port: u16,
    pub client_ip: IpAddr,
}

/// The BPF filter: TCP segments with both SYN and ACK set, IPv4 or IPv6 (no extension headers).
pub const FILTER: &str = "(tcp[tcpflags] & (tcp-syn|tcp-ack)) == (tcp-syn|tcp-ack) \
     or (ip6 and ip6[6] == 6 and (ip6[53] & 0x12) == 0x12)";

/// Link types this parser understands.
const DLT_EN10MB: i32 = 1;
const DLT_RAW: i32 = 12;
const DLT_LINUX_SLL: i32 = 113;
const DLT_IPV4: i32 = 228;
const DLT_IPV6: i32 = 229;
const DLT_LINUX_SLL2: i32 = 276;

/// Reads the SYN-ACK in a captured frame of link type `linktype`; `None` for anything else or
/// anything truncated. Pure: no allocation, no panics on any input.
pub fn parse(linktype: i32, frame: &[u8]) -> Option<Catch> {
    let (ethertype, l3) = match linktype {
        DLT_EN10MB => {
            let mut off = 12;
            let mut et = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
            // 802.1Q / 802.1ad tags.
            while et == 0x8100 || et == 0x88a8 {
                off += 4;
                et = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
            }
            (et, frame.get(off + 2..)?)
        }
        DLT_LINUX_SLL => (
            u16::from_be_bytes([*frame.get(14)?, *frame.get(15)?]),
            frame.get(16..)?,
        ),
        DLT_LINUX_SLL2 => (
            u16::from_be_bytes([*frame.first()?, *frame.get(1)?]),
            frame.get(20..)?,
        ),
        DLT_RAW | DLT_IPV4 | DLT_IPV6 => match frame.first()? >> 4 {
            4 => (0x0800, frame),
            6 => (0x86dd, frame),
            _ => return None,
        },
        _ => return None,
    };
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(l3.first()? & 0x0f) * 4;
            if l3.first()? >> 4 != 4 || ihl < 20 || *l3.get(9)? != 6 {
                return None;
            }
            let a: [u8; 4] = l3.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = l3.get(16..20)?.try_into().ok()?;
            (IpAddr::from(a), IpAddr::from(b), l3.get(ihl..)?)
        }
        0x86dd => {
            if l3.first()? >> 4 != 6 || *l3.get(6)? != 6 {
                return None;
            }
            let a: [u8; 16] = l3.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = l3.get(24..40)?.try_into().ok()?;
            (IpAddr::from(a), IpAddr::from(b), l3.get(40..)?)
        }
        _ => return None,
    };
    let flags = *tcp.get(13)?;
    if flags & 0x12 != 0x12 {
        return None;
    }
    let src_port = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    Some(Catch {
        server_ip: src,
        server_port: src_port,
        client_ip: dst,
    })
}

/// Counters of the catcher.
#[derive(Debug, Default)]
pub struct Counters {
    pub caught: AtomicU64,
    /// Catches dropped because the queue to the next snapshot was full (`reason="queue_full"`).
    pub dropped: AtomicU64,
}

/// A running SYN-ACK capture.
pub struct Catcher {
    rx: Receiver<Catch>,
    pub counters: Arc<Counters>,
}

impl Catcher {
    /// Starts capturing on every interface ("any"). Fails without CAP_NET_RAW, or where libpcap
    /// cannot open "any"; the agent then reports periodic tables only.
    /// Counts into `counters`.
    pub fn start(counters: Arc<Counters>) -> Result<Self, pcap::Error> {
        let mut cap = pcap::Capture::from_device("any")?
            .immediate_mode(true)
            .snaplen(128)
            .timeout(500)
            .open()?;
        cap.filter(FILTER, true)?;
        let linktype = cap.get_datalink().0;
        let (tx, rx) = sync_channel(QUEUE);
        let c = counters.clone();
        std::thread::Builder::new()
            .name("syn-ack".into())
            .spawn(move || run(cap, linktype, tx, &c))
            .map_err(|e| pcap::Error::PcapError(e.to_string()))?;
        Ok(Self { rx, counters })
    }

    /// Every catch since the last call.
    pub fn drain(&self) -> BTreeSet<Catch> {
        self.rx.try_iter().collect()
    }
}

/// Catches queued between two snapshots at most.
const QUEUE: usize = 4096;

/// Counts `catch` and queues it for the next snapshot, or drops and counts it when the queue is
/// full: the capture thread never waits. False once the reporter is gone.
fn hand_over(catch: Catch, tx: &SyncSender<Catch>, counters: &Counters) -> bool {
    counters.caught.fetch_add(1, Ordering::Relaxed);
    match tx.try_send(catch) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(TrySendError::Disconnected(_)) => false,
    }
}

fn run(
    mut cap: pcap::Capture<pcap::Active>,
    linktype: i32,
    tx: SyncSender<Catch>,
    counters: &Counters,
) {
    loop {
        match cap.next_packet() {
            Ok(packet) => {
                if let Some(catch) = parse(linktype, packet.data)
                    && !hand_over(catch, &tx, counters)
                {
                    return;
                }
            }
            Err(pcap::Error::TimeoutExpired) => {}
            Err(error) => {
                tracing::warn!(%error, "short-lived connection capture stopped");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet/IPv4/TCP SYN-ACK from 10.0.0.2:6379 to 10.0.0.1:40000.
    fn syn_ack_v4() -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12] = 0x08;
        f[13] = 0x00;
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 2]);
        f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 1]);
        let tcp = 34;
        f[tcp..tcp + 2].copy_from_slice(&6379u16.to_be_bytes());
        f[tcp + 2..tcp + 4].copy_from_slice(&40000u16.to_be_bytes());
        f[tcp + 13] = 0x12;
        f
    }

    #[test]
    fn a_syn_ack_names_the_server_and_the_client() {
        let c = parse(DLT_EN10MB, &syn_ack_v4()).unwrap();
        assert_eq!(c.server_ip, "10.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(c.server_port, 6379);
        assert_eq!(c.client_ip, "10.0.0.1".parse::<IpAddr>().unwrap());
        // The same packet behind a Linux cooked (SLL) header, as on "any".
        let mut sll = vec![0u8; 16];
        sll[14] = 0x08;
        sll.extend_from_slice(&syn_ack_v4()[14..]);
        assert_eq!(parse(DLT_LINUX_SLL, &sll), Some(c));
        let mut sll2 = vec![0u8; 20];
        sll2[0] = 0x08;
        sll2.extend_from_slice(&syn_ack_v4()[14..]);
        assert_eq!(parse(DLT_LINUX_SLL2, &sll2), Some(c));
    }

    #[test]
    fn ipv6_and_vlan_frames_parse() {
        let mut f = vec![0u8; 14 + 40 + 20];
        f[12] = 0x86;
        f[13] = 0xdd;
        f[14] = 0x60;
        f[14 + 6] = 6;
        f[14 + 8 + 15] = 2; // src ::2
        f[14 + 24 + 15] = 1; // dst ::1
        f[54..56].copy_from_slice(&443u16.to_be_bytes());
        f[54 + 13] = 0x12;
        let c = parse(DLT_EN10MB, &f).unwrap();
        assert_eq!(c.server_ip, "::2".parse::<IpAddr>().unwrap());
        assert_eq!(c.server_port, 443);
        let mut tagged = f[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        tagged.extend_from_slice(&f[12..]);
        assert_eq!(parse(DLT_EN10MB, &tagged), Some(c));
    }

    #[test]
    fn anything_else_is_ignored_without_panicking() {
        let mut syn = syn_ack_v4();
        syn[34 + 13] = 0x02; // SYN only
        assert_eq!(parse(DLT_EN10MB, &syn), None);
        let mut udp = syn_ack_v4();
        udp[14 + 9] = 17;
        assert_eq!(parse(DLT_EN10MB, &udp), None);
        let frame = syn_ack_v4();
        for cut in 0..frame.len() {
            for lt in [DLT_EN10MB, DLT_LINUX_SLL, DLT_LINUX_SLL2, DLT_RAW, 999] {
                let _ = parse(lt, &frame[..cut]);
            }
        }
        for seed in 0u8..=255 {
            let garbage: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let _ = parse(DLT_EN10MB, &garbage);
            let _ = parse(DLT_LINUX_SLL2, &garbage);
        }
    }

    #[test]
    fn catches_past_a_full_queue_are_dropped_and_counted() {
        let (tx, rx) = sync_channel(2);
        let counters = Counters::default();
        let catch = parse(DLT_EN10MB, &syn_ack_v4()).unwrap();
        for _ in 0..5 {
            assert!(hand_over(catch, &tx, &counters));
        }
        assert_eq!(counters.caught.load(Ordering::Relaxed), 5);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(rx.try_iter().count(), 2);
        drop(rx);
        assert!(!hand_over(catch, &tx, &counters), "the reporter is gone");
    }

    #[test]
    fn the_filter_compiles_with_libpcap() {
        tapgraph::bpf::check_filter(FILTER).unwrap();
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::net::SocketAddr;

        const LINKTYPES: [i32; 6] = [
            DLT_EN10MB,
            DLT_RAW,
            DLT_LINUX_SLL,
            DLT_IPV4,
            DLT_IPV6,
            DLT_LINUX_SLL2,
        ];

        /// A TCP segment from `server` to `client` with `flags`, in IPv4 (with `options` words
        /// of IP options) or IPv6, behind the link header of `linktype` (Ethernet with `tags`
        /// VLAN tags).
        fn frame(
            linktype: i32,
            server: SocketAddr,
            client: SocketAddr,
            flags: u8,
            options: u8,
            tags: &[u16],
        ) -> Vec<u8> {
            let (ethertype, mut l3) = match (server.ip(), client.ip()) {
                (IpAddr::V4(s), IpAddr::V4(c)) => {
                    let mut h = vec![0u8; 20 + 4 * usize::from(options)];
                    h[0] = 0x40 | (5 + options);
                    h[9] = 6;
                    h[12..16].copy_from_slice(&s.octets());
                    h[16..20].copy_from_slice(&c.octets());
                    (0x0800u16, h)
                }
                (IpAddr::V6(s), IpAddr::V6(c)) => {
                    let mut h = vec![0u8; 40];
                    h[0] = 0x60;
                    h[6] = 6;
                    h[8..24].copy_from_slice(&s.octets());
                    h[24..40].copy_from_slice(&c.octets());
                    (0x86dd, h)
                }
                _ => unreachable!("one family per frame"),
            };
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&server.port().to_be_bytes());
            tcp[2..4].copy_from_slice(&client.port().to_be_bytes());
            tcp[12] = 0x50;
            tcp[13] = flags;
            l3.extend_from_slice(&tcp);
            let mut f = match linktype {
                DLT_EN10MB => {
                    let mut f = vec![0u8; 12];
                    for &tpid in tags {
                        f.extend_from_slice(&tpid.to_be_bytes());
                        f.extend_from_slice(&[0x00, 0x05]);
                    }
                    f.extend_from_slice(&ethertype.to_be_bytes());
                    f
                }
                DLT_LINUX_SLL => {
                    let mut f = vec![0u8; 16];
                    f[14..16].copy_from_slice(&ethertype.to_be_bytes());
                    f
                }
                DLT_LINUX_SLL2 => {
                    let mut f = vec![0u8; 20];
                    f[0..2].copy_from_slice(&ethertype.to_be_bytes());
                    f
                }
                _ => Vec::new(),
            };
            f.extend_from_slice(&l3);
            f
        }

        fn endpoints() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
            let v4 = (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port));
            let v6 = (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::from(ip), port));
            prop_oneof![(v4.clone(), v4), (v6.clone(), v6)]
        }

        proptest! {
            #[test]
            fn any_frame_parses_without_panicking(
                linktype in prop_oneof![prop::sample::select(LINKTYPES.to_vec()), any::<i32>()],
                frame in prop::collection::vec(any::<u8>(), 0..160),
            ) {
                let _ = parse(linktype, &frame);
            }

            #[test]
            fn a_syn_ack_names_its_server_and_client_on_every_link(
                (server, client) in endpoints(),
                linktype in prop::sample::select(LINKTYPES.to_vec()),
                other_flags: u8,
                options in 0u8..=10,
                tags in prop::collection::vec(prop::sample::select(vec![0x8100u16, 0x88a8]), 0..3),
            ) {
                // DLT_IPV4 and DLT_IPV6 carry their own family only.
                prop_assume!(match linktype {
                    DLT_IPV4 => server.is_ipv4(),
                    DLT_IPV6 => server.is_ipv6(),
                    _ => true,
                });
                let syn_ack = frame(linktype, server, client, other_flags | 0x12, options, &tags);
                prop_assert_eq!(
                    parse(linktype, &syn_ack),
                    Some(Catch {
                        server_ip: server.ip(),
                        server_port: server.port(),
                        client_ip: client.ip(),
                    })
                );
                // Without SYN or without ACK it is no catch; cut before the flags, nothing at
                // all (the parser reads the TCP header up to its flags only).
                for flags in [other_flags & !0x02, other_flags & !0x10] {
                    let segment = frame(linktype, server, client, flags, options, &tags);
                    prop_assert_eq!(parse(linktype, &segment), None);
                }
                prop_assert_eq!(parse(linktype, &syn_ack[..syn_ack.len() - 7]), None);
            }
        }
    }
}
