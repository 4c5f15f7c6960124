//! Deduplication of a target's packets: when both ends of a connection are monitored, a target
//! fed by several agents gets each packet once, the copy that arrived first.
//!
//! Two copies are the same packet when their IP packets hash alike with the fields that change on
//! the way, or between a sender's capture and the wire, zeroed: the IPv4 TTL and header checksum,
//! the IPv6 hop limit, and the TCP or UDP checksum (checksum offload leaves the sender's copy with
//! a partial one). The link layer is skipped (MACs change at each router, VLAN tags at each trunk)
//! and so is Ethernet padding (the receiver's copy of a short frame has it, the sender's has not).
//! A copy is a duplicate only when it comes from another agent and was captured within [`WINDOW`]
//! of the first copy, both times on the controller's clock: an agent's own repeats are real
//! (retransmissions, loops) and are delivered. Packets that are not IP are never deduplicated.
//!
//! A target's table holds each packet for [`HOLD`] after it arrived (the second copy's batch may
//! come later than the first's), and at most [`CAPACITY`] packets: beyond that the oldest are
//! evicted early, and counted, since a late copy of one is then delivered again.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::time::Duration;

use super::targets::frame::{ETHERNET, IPV4, IPV6, LINKTYPE_RAW, LINUX_SLL, LINUX_SLL2, RAW};

/// Two copies captured further apart than this are two packets. The copies of one packet are
/// apart by the path between the two hosts (µs in a data centre, a few ms across a WAN) plus the
/// error of the agents' clock offsets (half the round trip of the best time probe: well under a
/// ms on a LAN). 50 ms covers both with room, and stays far below Linux's shortest
/// retransmission timeout (200 ms), the usual source of truly repeated segments.
pub const WINDOW: Duration = Duration::from_millis(50);
/// How long a packet stays in the table after it arrived, waiting for its copies: batches are
/// sent every ms or so, but a backlog on an agent's stream can hold one back far longer.
pub const HOLD: Duration = Duration::from_secs(1);
/// Packets held per target at most (about 75 bytes each, queue and table: 9 MiB): a target fed
/// more than this many packets a second evicts before [`HOLD`].
pub const CAPACITY: usize = 1 << 17;

/// IP header and L4 header bytes copied to be normalized; fields beyond are hashed as they are.
const HEAD: usize = 128;
const VLAN_TPIDS: [u16; 3] = [0x8100, 0x88a8, 0x9100];
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// Hashes packets for one target: randomly seeded, so that no one can craft packets that pass
/// for another's copies.
#[derive(Clone, Default)]
pub struct Fingerprints(foldhash::quality::RandomState);

impl Fingerprints {
    /// The packet's key, or `None` when it is not IP (never deduplicated). `data` is what was
    /// captured, of link type `linktype`.
    pub fn key(&self, linktype: u32, data: &[u8]) -> Option<u64> {
        let ip = ip_packet(linktype, data)?;
        let mut head = [0u8; HEAD];
        let n = ip.len().min(HEAD);
        head[..n].copy_from_slice(&ip[..n]);
        let declared = normalize(&mut head[..n])?;
        // Ethernet pads short frames to 60 bytes on the wire: hash only what the IP header
        // declares (a length of 0, as a TSO capture may show, leaves what was captured).
        let len = match declared {
            0 => ip.len(),
            d => d.min(ip.len()),
        };
        let mut h = self.0.build_hasher();
        h.write_usize(declared);
        h.write(&head[..n.min(len)]);
        if len > n {
            h.write(&ip[n..len]);
        }
        Some(h.finish())
    }
}

/// The IP packet in a capture: after the link header and any VLAN tags.
fn ip_packet(linktype: u32, data: &[u8]) -> Option<&[u8]> {
    let (mut ethertype_at, payload_at) = match linktype {
        ETHERNET => (12, 14),
        LINUX_SLL => (14, 16),
        LINUX_SLL2 => (0, 20),
        RAW | LINKTYPE_RAW | IPV4 | IPV6 => {
            return data
                .first()
                .filter(|b| matches!(**b >> 4, 4 | 6))
                .map(|_| data);
        }
        _ => return None,
    };
    let mut at = payload_at;
    let u16_at = |i: usize| Some(u16::from_be_bytes([*data.get(i)?, *data.get(i + 1)?]));
    let mut ethertype = u16_at(ethertype_at)?;
    while VLAN_TPIDS.contains(&ethertype) {
        // A tag: TPID and TCI where the EtherType was, the real EtherType after them.
        ethertype_at = at + 2;
        at += 4;
        ethertype = u16_at(ethertype_at)?;
    }
    let ip = data.get(at..)?;
    let version = ip.first()? >> 4;
    match (ethertype, version) {
        (ETHERTYPE_IPV4, 4) | (ETHERTYPE_IPV6, 6) => Some(ip),
        _ => None,
    }
}

/// Zeroes what changes between copies in the first bytes of an IP packet; returns the length its
/// header declares. `None` when it is no IP header.
fn normalize(head: &mut [u8]) -> Option<usize> {
    let zero = |head: &mut [u8], at: usize, len: usize| {
        if let Some(b) = head.get_mut(at..at + len) {
            b.fill(0);
        }
    };
    match head.first()? >> 4 {
        4 => {
            let ihl = usize::from(head.first()? & 0x0f) * 4;
            if ihl < 20 || head.len() < 20 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let first_fragment = u16::from_be_bytes([head[6], head[7]]) & 0x1fff == 0;
            let protocol = head[9];
            zero(head, 8, 1); // TTL
            zero(head, 10, 2); // header checksum
            if first_fragment {
                zero_l4_checksum(head, protocol, ihl);
            }
            Some(total)
        }
        6 => {
            if head.len() < 40 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([head[4], head[5]]));
            let mut next = head[6];
            zero(head, 7, 1); // hop limit
            // Hop-by-hop, routing and destination options may sit before the L4 header.
            let mut at = 40;
            while matches!(next, 0 | 43 | 60) {
                let (Some(&n), Some(&len)) = (head.get(at), head.get(at + 1)) else {
                    break;
                };
                next = n;
                at += (usize::from(len) + 1) * 8;
            }
            zero_l4_checksum(head, next, at);
            // A payload length of 0 is a jumbogram (or a TSO capture): the captured length.
            Some(if payload == 0 { 0 } else { 40 + payload })
        }
        _ => None,
    }
}

fn zero_l4_checksum(head: &mut [u8], protocol: u8, l4: usize) {
    let at = match protocol {
        TCP => l4 + 16,
        UDP => l4 + 6,
        _ => return,
    };
    if let Some(b) = head.get_mut(at..at + 2) {
        b.fill(0);
    }
}

/// Which agent a copy came from: any number the same for every stream of one agent.
pub type Source = u64;

/// One target's recent packets: which copies to deliver.
///
/// While every packet held came from one agent, nothing that agent sends can be a copy of another
/// agent's: its packets are only queued by arrival, with their keys, and the table stays empty
/// (most targets are fed by one agent, and the table's insert and remove cost about 0.25 µs a
/// packet, mostly cache misses). The first packet from another agent fills the table from the
/// queue, which holds exactly what the table would hold, and judging goes on as before; once the
/// queue again holds one agent's packets only (the others' expired), the table is emptied.
pub struct Dedup {
    seen: HashMap<u64, Seen, BuildHasherDefault<KeyHasher>>,
    /// Keys by arrival, oldest first, to expire them; an entry whose `serial` no longer matches
    /// the table's was replaced since and is skipped.
    arrivals: VecDeque<Arrival>,
    /// The one agent all of `arrivals` came from, while `seen` is left empty.
    lone: Option<Source>,
    /// The agent of the latest arrivals, and the serial of the first of them: when the oldest
    /// arrival is no older, all of them came from that agent.
    run: (Source, u64),
    serial: u64,
    window_ns: i64,
    hold_ns: u64,
    capacity: usize,
}

struct Seen {
    source: Source,
    captured_ns: i64,
    serial: u64,
}

struct Arrival {
    at_ns: u64,
    key: u64,
    serial: u64,
    source: Source,
    captured_ns: i64,
}

/// What became of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Deliver it: not a copy another agent already sent.
    pub deliver: bool,
    /// Packets evicted from the table before their hold expired, to make room for this one.
    /// While one agent alone feeds the target, an eviction counts every packet pushed out, that
    /// agent's own earlier repeats included.
    pub evicted: u64,
}

impl Default for Dedup {
    fn default() -> Self {
        Self::new(WINDOW, HOLD, CAPACITY)
    }
}

impl Dedup {
    pub fn new(window: Duration, hold: Duration, capacity: usize) -> Self {
        Self {
            seen: HashMap::default(),
            arrivals: VecDeque::new(),
            lone: None,
            run: (0, 0),
            serial: 0,
            window_ns: i64::try_from(window.as_nanos()).unwrap_or(i64::MAX),
            hold_ns: u64::try_from(hold.as_nanos()).unwrap_or(u64::MAX),
            capacity: capacity.max(1),
        }
    }

    /// Packets held now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        match self.lone {
            Some(_) => self.arrivals.len(),
            None => self.seen.len(),
        }
    }

    /// Whether the table is in use (more than one agent's packets held).
    #[cfg(test)]
    fn judging(&self) -> bool {
        self.lone.is_none()
    }

    /// Judges a copy with `key` from `source`, captured at `captured_ns` (on the controller's
    /// clock), arriving at `now_ns` (monotonic, never going back): delivered unless another agent
    /// sent a copy captured within the window. Copies must come in the order they arrived.
    pub fn admit(&mut self, key: u64, source: Source, captured_ns: i64, now_ns: u64) -> Admitted {
        self.expire(now_ns);
        let lone = match self.lone {
            Some(lone) if lone == source => true,
            Some(_) => {
                self.fill_table();
                false
            }
            // Empty, or the others' packets expired and this one is the remaining agent's.
            None if self
                .arrivals
                .front()
                .is_none_or(|a| a.serial >= self.run.1 && self.run.0 == source) =>
            {
                self.seen.clear();
                self.lone = Some(source);
                true
            }
            None => false,
        };
        if !lone
            && let Some(first) = self.seen.get(&key)
            && first.source != source
            && first.captured_ns.abs_diff(captured_ns) <= self.window_ns.unsigned_abs()
        {
            return Admitted {
                deliver: false,
                evicted: 0,
            };
        }
        // New, the agent's own repeat, or outside the window: later copies are judged by this one.
        self.serial += 1;
        let serial = self.serial;
        if !lone {
            self.seen.insert(
                key,
                Seen {
                    source,
                    captured_ns,
                    serial,
                },
            );
        }
        if self.arrivals.is_empty() || self.run.0 != source {
            self.run = (source, serial);
        }
        self.arrivals.push_back(Arrival {
            at_ns: now_ns,
            key,
            serial,
            source,
            captured_ns,
        });
        let mut evicted = 0;
        while self.arrivals.len() > self.capacity {
            if self.pop_oldest() {
                evicted += 1;
            }
        }
        Admitted {
            deliver: true,
            evicted,
        }
    }

    /// Another agent's packet came: the table gets every packet held, as judging each would have
    /// left it (a later arrival of a key replaces an earlier one).
    fn fill_table(&mut self) {
        self.lone = None;
        self.seen.reserve(self.arrivals.len());
        for a in &self.arrivals {
            self.seen.insert(
                a.key,
                Seen {
                    source: a.source,
                    captured_ns: a.captured_ns,
                    serial: a.serial,
                },
            );
        }
    }

    fn expire(&mut self, now_ns: u64) {
        while self
            .arrivals
            .front()
            .is_some_and(|a| now_ns.saturating_sub(a.at_ns) >= self.hold_ns)
        {
            self.pop_oldest();
        }
    }

    /// Drops the oldest arrival; true when it still held a packet.
    fn pop_oldest(&mut self) -> bool {
        let Some(a) = self.arrivals.pop_front() else {
            return false;
        };
        if self.lone.is_some() {
            return true;
        }
        if self.seen.get(&a.key).is_some_and(|s| s.serial == a.serial) {
            self.seen.remove(&a.key);
            return true;
        }
        false
    }
}

/// The table's keys are hashes already: used as they are.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: i64 = 1_000_000;

    /// An Ethernet frame with one IPv4 UDP packet: 10.0.0.1:5000 → 10.0.0.2:6000.
    fn udp4(ttl: u8, ip_checksum: u16, udp_checksum: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        let total = 20 + 8 + payload.len() as u16;
        f.extend([0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, UDP]);
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f.extend(ip_checksum.to_be_bytes());
        f.extend([10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend(5000u16.to_be_bytes());
        f.extend(6000u16.to_be_bytes());
        f.extend((8 + payload.len() as u16).to_be_bytes());
        f.extend(udp_checksum.to_be_bytes());
        f.extend(payload);
        f
    }

    /// An Ethernet frame with one IPv6 TCP segment.
    fn tcp6(hop_limit: u8, checksum: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend([0x60, 0, 0, 0]);
        f.extend((20 + payload.len() as u16).to_be_bytes());
        f.extend([TCP, hop_limit]);
        f.extend([0xfd; 16]);
        f.extend([0xfe; 16]);
        f.extend([
            0x13, 0x88, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff,
        ]);
        f.extend(checksum.to_be_bytes());
        f.extend([0, 0]);
        f.extend(payload);
        f
    }

    fn vlan_tagged(frame: &[u8], tags: &[u16]) -> Vec<u8> {
        let mut f = frame[..12].to_vec();
        for (i, vid) in tags.iter().enumerate() {
            f.extend(if i == 0 { 0x88a8u16 } else { 0x8100 }.to_be_bytes());
            f.extend(vid.to_be_bytes());
        }
        f.extend(&frame[12..]);
        f
    }

    /// Linux cooked (SLL) form of an Ethernet frame.
    fn cooked(frame: &[u8]) -> Vec<u8> {
        let mut f = vec![0, 4, 0, 1, 0, 6, 2, 0, 0, 0, 0, 9, 0, 0];
        f.extend(&frame[12..]);
        f
    }

    #[test]
    fn ttl_and_checksums_do_not_tell_copies_apart() {
        let fp = Fingerprints::default();
        let sent = udp4(64, 0x1111, 0xabcd, b"hello");
        let routed = udp4(63, 0x2222, 0x1234, b"hello");
        let sent = fp.key(ETHERNET, &sent).unwrap();
        assert_eq!(fp.key(ETHERNET, &routed), Some(sent));
        // Padded to Ethernet's 60 bytes on the receiving side.
        let mut padded = udp4(62, 0, 0, b"hello");
        padded.resize(60, 0);
        assert_eq!(fp.key(ETHERNET, &padded), Some(sent));
        let a = fp.key(ETHERNET, &tcp6(64, 0x0101, b"GET /")).unwrap();
        assert_eq!(fp.key(ETHERNET, &tcp6(1, 0xfefe, b"GET /")), Some(a));
    }

    #[test]
    fn a_different_payload_or_length_is_another_packet() {
        let fp = Fingerprints::default();
        let key = |f: Vec<u8>| fp.key(ETHERNET, &f).unwrap();
        assert_ne!(key(udp4(64, 0, 0, b"hello")), key(udp4(64, 0, 0, b"hellp")));
        assert_ne!(
            key(udp4(64, 0, 0, b"hello")),
            key(udp4(64, 0, 0, b"hello!"))
        );
        assert_ne!(key(tcp6(64, 0, b"GET /")), key(tcp6(64, 0, b"GET /x")));
    }

    #[test]
    fn the_link_layer_is_skipped_vlan_tags_and_cooked_headers_included() {
        let fp = Fingerprints::default();
        let plain = udp4(64, 0, 0, b"tagged or not");
        let key = fp.key(ETHERNET, &plain).unwrap();
        assert_eq!(fp.key(ETHERNET, &vlan_tagged(&plain, &[10])), Some(key));
        assert_eq!(
            fp.key(ETHERNET, &vlan_tagged(&plain, &[100, 10])),
            Some(key)
        );
        assert_eq!(fp.key(LINUX_SLL, &cooked(&plain)), Some(key));
        let mut sll2 = vec![0x08, 0x00, 0, 0, 0, 0, 0, 3, 0, 1, 0, 6];
        sll2.extend([2, 0, 0, 0, 0, 9, 0, 0]);
        sll2.extend(&plain[14..]);
        assert_eq!(fp.key(LINUX_SLL2, &sll2), Some(key));
        assert_eq!(fp.key(RAW, &plain[14..]), Some(key));
        // Other MACs: the same packet after a router.
        let mut routed = plain.clone();
        routed[..12].fill(0x0e);
        assert_eq!(fp.key(ETHERNET, &routed), Some(key));
    }

    #[test]
    fn what_is_not_ip_has_no_key() {
        let fp = Fingerprints::default();
        let mut arp = vec![0xff; 12];
        arp.extend([0x08, 0x06]);
        arp.extend([0; 28]);
        assert_eq!(fp.key(ETHERNET, &arp), None);
        assert_eq!(fp.key(ETHERNET, &arp[..13]), None);
        assert_eq!(fp.key(ETHERNET, &[]), None);
        assert_eq!(fp.key(RAW, &[0x10, 0, 0]), None);
        assert_eq!(fp.key(147, &udp4(64, 0, 0, b"x")), None);
        // An IPv4 EtherType over something else, and a header cut short.
        let mut bad = udp4(64, 0, 0, b"x");
        bad[14] = 0x65;
        assert_eq!(fp.key(ETHERNET, &bad), None);
        assert_eq!(fp.key(ETHERNET, &udp4(64, 0, 0, b"x")[..30]), None);
    }

    #[test]
    fn truncated_captures_hash_what_is_there_and_the_declared_length() {
        let fp = Fingerprints::default();
        let long = udp4(64, 0, 0, &[7; 200]);
        let longer = udp4(64, 0, 0, &[7; 300]);
        let key = fp.key(ETHERNET, &long[..96]).unwrap();
        assert_eq!(
            fp.key(ETHERNET, &udp4(60, 1, 1, &[7; 200])[..96]),
            Some(key)
        );
        assert_ne!(fp.key(ETHERNET, &longer[..96]), Some(key));
    }

    #[test]
    fn a_copy_from_another_agent_within_the_window_is_dropped_once_per_agent() {
        let mut d = Dedup::default();
        assert!(d.admit(1, 10, 100 * MS, 0).deliver);
        // The other end, 3 ms later (or earlier: clocks and paths differ).
        assert!(!d.admit(1, 20, 103 * MS, 1).deliver);
        assert!(!d.admit(1, 30, 97 * MS, 2).deliver);
        assert!(d.admit(2, 20, 103 * MS, 3).deliver);
    }

    #[test]
    fn the_same_agent_twice_is_delivered_twice() {
        let mut d = Dedup::default();
        assert!(d.admit(1, 10, 100 * MS, 0).deliver);
        assert!(d.admit(1, 10, 100 * MS, 1).deliver);
        assert!(d.admit(1, 10, 101 * MS, 2).deliver);
    }

    #[test]
    fn copies_outside_the_window_are_delivered() {
        let mut d = Dedup::default();
        let window = WINDOW.as_nanos() as i64;
        assert!(d.admit(1, 10, 100 * MS, 0).deliver);
        assert!(d.admit(1, 20, 100 * MS + window + 1, 1).deliver);
        // Judged by the latest copy delivered now: one from the first agent near it is dropped.
        assert!(!d.admit(1, 10, 100 * MS + window + 2, 2).deliver);
        assert!(d.admit(1, 30, 100 * MS - window - 1, 3).deliver);
    }

    #[test]
    fn packets_expire_after_the_hold_by_arrival() {
        let hold = HOLD.as_nanos() as u64;
        let mut d = Dedup::default();
        assert!(d.admit(1, 10, 100 * MS, 0).deliver);
        assert!(!d.admit(1, 20, 100 * MS, hold - 1).deliver);
        assert!(d.admit(2, 10, 100 * MS, hold - 1).deliver);
        // Past the first one's hold: forgotten, so a copy arriving this late is delivered.
        assert!(d.admit(1, 20, 100 * MS, hold).deliver);
        assert_eq!(d.len(), 2);
        d.admit(3, 10, 0, 3 * hold);
        assert_eq!(d.len(), 1);
    }

    #[test]
    fn the_table_is_bounded_and_counts_what_it_evicts_early() {
        let mut d = Dedup::new(WINDOW, HOLD, 4);
        let evicted: u64 = (0..10).map(|k| d.admit(k, 10, 0, k).evicted).sum();
        assert_eq!(d.len(), 4);
        assert_eq!(evicted, 6);
        // The oldest are gone: their late copies are delivered; the newest still match.
        assert!(d.admit(0, 20, 0, 11).deliver);
        assert!(!d.admit(9, 20, 0, 12).deliver);
        // A replaced entry's old arrival is no eviction (judged by the table: two agents).
        let mut d = Dedup::new(WINDOW, HOLD, 3);
        assert_eq!(d.admit(1, 10, 0, 0).evicted, 0);
        assert_eq!(d.admit(1, 10, 0, 1).evicted, 0);
        assert_eq!(d.admit(2, 20, 0, 2).evicted, 0);
        assert_eq!(
            d.admit(3, 20, 0, 3).evicted,
            0,
            "the first key 1 was replaced"
        );
        assert_eq!(d.len(), 3);
        // With one agent alone there is no table: every packet pushed out counts.
        let mut d = Dedup::new(WINDOW, HOLD, 2);
        assert_eq!(d.admit(1, 10, 0, 0).evicted, 0);
        assert_eq!(d.admit(1, 10, 0, 1).evicted, 0);
        assert_eq!(d.admit(2, 10, 0, 2).evicted, 1);
    }

    /// One agent alone leaves the table empty; another agent's first packet is judged against
    /// everything the first sent within the hold, exactly as if the table had been kept all along.
    #[test]
    fn a_second_agent_is_judged_against_all_the_first_one_sent_before_it_came() {
        let mut d = Dedup::default();
        for k in 0..100 {
            assert!(d.admit(k, 10, k as i64 * MS, k).deliver);
        }
        assert!(!d.judging(), "one agent: no table");
        assert_eq!(d.seen.len(), 0);
        // The other end's copies of the first and the last, and a packet of its own.
        assert!(!d.admit(0, 20, 2 * MS, 100).deliver);
        assert!(d.judging());
        assert!(!d.admit(99, 20, 99 * MS, 101).deliver);
        assert!(d.admit(1000, 20, 100 * MS, 102).deliver);
        // The first agent's copy of the second's packet is dropped too, and its own repeat is not.
        assert!(!d.admit(1000, 10, 100 * MS, 103).deliver);
        assert!(d.admit(5, 10, 5 * MS, 104).deliver);
        assert_eq!(d.len(), 101, "key 5 replaced");
    }

    /// Once the other agent's packets expire, the table is let go; a packet of the other agent
    /// that arrives while the first's are held brings it back.
    #[test]
    fn the_table_is_let_go_when_one_agent_is_left_and_rebuilt_when_another_comes() {
        let hold = HOLD.as_nanos() as u64;
        let mut d = Dedup::default();
        assert!(d.admit(1, 20, 0, 0).deliver);
        assert!(d.admit(2, 10, 0, 1).deliver);
        assert!(d.judging());
        // Past the hold of agent 20's packet, agent 10's remains: no table.
        assert!(d.admit(3, 10, 0, hold).deliver);
        assert!(!d.judging());
        assert_eq!(d.seen.len(), 0);
        // Agent 20 again, with a copy of agent 10's packet 3: dropped.
        assert!(!d.admit(3, 20, 0, hold + 1).deliver);
        assert!(d.judging());
        // All of it expired: the next packet, from either, starts alone.
        assert!(d.admit(4, 20, 0, 3 * hold).deliver);
        assert!(!d.judging());
        assert!(d.admit(4, 20, 0, 3 * hold + 1).deliver);
    }

    /// Lean and judging agree: random streams from three agents give the same verdicts as a table
    /// kept all along (a model: every arrival judged against every packet held, newest first).
    /// Nothing is evicted here; evictions are the test above's.
    #[test]
    fn verdicts_match_a_model_that_keeps_everything() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let window = WINDOW.as_nanos() as i64;
        let hold = HOLD.as_nanos() as u64;
        for _ in 0..50 {
            let mut d = Dedup::new(WINDOW, HOLD, 1 << 20);
            let mut held: Vec<(u64, u64, Source, i64)> = Vec::new(); // at, key, source, captured
            let mut now = 0u64;
            for _ in 0..2_000 {
                now += rng.random_range(0..hold / 50);
                // Mostly one agent, with the others in spells.
                let source = if rng.random_bool(0.9) {
                    1
                } else {
                    rng.random_range(2..4)
                };
                let key = rng.random_range(0..200);
                let captured = (now as i64) - rng.random_range(0..2 * window);
                held.retain(|h| now - h.0 < hold);
                let latest = held.iter().rev().find(|h| h.1 == key);
                let expect = !latest
                    .is_some_and(|h| h.2 != source && h.3.abs_diff(captured) <= window as u64);
                assert_eq!(d.admit(key, source, captured, now).deliver, expect);
                if expect {
                    held.push((now, key, source, captured));
                }
            }
        }
    }

    /// The per-packet cost of deduplication: `cargo test -p tapgraph-controller --release --
    /// --ignored dedup_cost --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn dedup_cost() {
        let fp = Fingerprints::default();
        for size in [64usize, 512, 1458] {
            let frames: Vec<Vec<u8>> = (0..4096u32)
                .map(|i| {
                    udp4(
                        64,
                        0,
                        0,
                        &[&i.to_be_bytes()[..], &vec![7; size - 46]].concat(),
                    )
                })
                .collect();
            for agents in [1, 2] {
                let mut d = Dedup::default();
                let rounds = 100;
                let start = std::time::Instant::now();
                let mut dropped = 0u64;
                for r in 0..rounds {
                    for (i, f) in frames.iter().enumerate() {
                        let key = fp.key(ETHERNET, f).unwrap_or_default();
                        let now = (r * frames.len() + i) as u64 * 1_000;
                        let a = d.admit(key ^ r as u64, (i % agents) as u64, now as i64, now);
                        dropped += u64::from(!a.deliver);
                    }
                }
                let n = (rounds * frames.len()) as f64;
                let ns = start.elapsed().as_nanos() as f64 / n;
                println!(
                    "dedup of {size}-byte frames, {agents} agent(s): {ns:.0} ns/packet ({dropped} dropped)"
                );
            }
        }
    }
}
