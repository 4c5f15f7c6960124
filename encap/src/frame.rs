//! Captured frames as Ethernet frames, for the targets that emit Ethernet (interface, VXLAN).
//!
//! An Ethernet capture (DLT 1) passes through untouched, so it leaves byte-identical. A Linux
//! cooked capture (the agent's `any` interface: DLT 113 and 276) or a raw IP capture (DLT 12,
//! 101, 228, 229) gets a synthesized 14-byte header in front of its unchanged payload; nothing is
//! copied either way, the header lives beside the borrowed payload. Any input, however short or
//! malformed, gives a [`FrameError`], never a panic.

use std::fmt;

pub const ETHERNET: u32 = 1;
/// Linux `DLT_RAW`; libpcap writes it to files as `LINKTYPE_RAW` ([`LINKTYPE_RAW`]).
pub const RAW: u32 = 12;
pub const LINKTYPE_RAW: u32 = 101;
pub const LINUX_SLL: u32 = 113;
pub const IPV4: u32 = 228;
pub const IPV6: u32 = 229;
pub const LINUX_SLL2: u32 = 276;

/// Source MAC for frames whose capture carries none: locally administered, unicast.
pub const SYNTHETIC_SRC: [u8; 6] = [0x02, 0x74, 0x67, 0x00, 0x00, 0x01];
/// Destination MAC of every synthesized header: locally administered, unicast.
pub const SYNTHETIC_DST: [u8; 6] = [0x02, 0x74, 0x67, 0x00, 0x00, 0x02];

const ETHER_HEADER: usize = 14;
const SLL_HEADER: usize = 16;
const SLL2_HEADER: usize = 20;
/// EtherTypes below this are 802.3 length fields.
const MIN_ETHERTYPE: u16 = 0x0600;
const MAX_8023_LENGTH: usize = 1500;
/// Linux `ETH_P_802_3` and `ETH_P_802_2` in a cooked header: the payload is an 802.3 frame body.
const SLL_802_3: u16 = 0x0001;
const SLL_802_2: u16 = 0x0004;
const VLAN_TPIDS: [u16; 3] = [0x8100, 0x88a8, 0x9100];

/// An Ethernet frame: an optional synthesized header, then bytes borrowed from the capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    header: Option<[u8; ETHER_HEADER]>,
    rest: &'a [u8],
}

/// Why a captured frame cannot be sent as Ethernet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{} frame of {len} bytes is shorter than its {need}-byte header", LinkType(*.linktype))]
    Truncated {
        linktype: u32,
        len: usize,
        need: usize,
    },
    #[error(
        "{} frames cannot be sent as Ethernet: capture on an Ethernet interface, on `any`, or a \
         raw IP one",
        LinkType(*.0)
    )]
    Unsupported(u32),
    #[error("{} frame starts with IP version {version}, which it cannot carry", LinkType(*.linktype))]
    NotIp { linktype: u32, version: u8 },
    #[error(
        "Linux cooked frame carries protocol {protocol:#06x}, which has no Ethernet form \
         (not an EtherType)"
    )]
    NoEtherType { protocol: u16 },
}

impl<'a> Frame<'a> {
    /// The captured bytes of a frame of link type `linktype` (a libpcap DLT), as Ethernet.
    pub fn from_capture(linktype: u32, data: &'a [u8]) -> Result<Self, FrameError> {
        let truncated = |need| FrameError::Truncated {
            linktype,
            len: data.len(),
            need,
        };
        match linktype {
            ETHERNET if data.len() < ETHER_HEADER => Err(truncated(ETHER_HEADER)),
            ETHERNET => Ok(Self {
                header: None,
                rest: data,
            }),
            LINUX_SLL => {
                let (head, payload) = data
                    .split_at_checked(SLL_HEADER)
                    .ok_or(truncated(SLL_HEADER))?;
                // packet type, ARPHRD type, address length, 8 address bytes, protocol.
                let protocol = u16::from_be_bytes([head[14], head[15]]);
                let source = source_mac(u16::from_be_bytes([head[4], head[5]]), &head[6..14]);
                Self::synthesize(source, protocol, payload)
            }
            LINUX_SLL2 => {
                let (head, payload) = data
                    .split_at_checked(SLL2_HEADER)
                    .ok_or(truncated(SLL2_HEADER))?;
                // protocol, reserved, ifindex, ARPHRD type, packet type, address length, 8 bytes.
                let protocol = u16::from_be_bytes([head[0], head[1]]);
                let source = source_mac(u16::from(head[11]), &head[12..20]);
                Self::synthesize(source, protocol, payload)
            }
            RAW | LINKTYPE_RAW | IPV4 | IPV6 => {
                let first = *data.first().ok_or(truncated(1))?;
                let ethertype = match (linktype, first >> 4) {
                    (RAW | LINKTYPE_RAW | IPV4, 4) => 0x0800,
                    (RAW | LINKTYPE_RAW | IPV6, 6) => 0x86dd,
                    (_, version) => return Err(FrameError::NotIp { linktype, version }),
                };
                Self::synthesize(SYNTHETIC_SRC, ethertype, data)
            }
            other => Err(FrameError::Unsupported(other)),
        }
    }

    fn synthesize(source: [u8; 6], protocol: u16, payload: &'a [u8]) -> Result<Self, FrameError> {
        let ethertype = match protocol {
            p if p >= MIN_ETHERTYPE => p,
            // An 802.3 frame: the type field holds the length (which fits, as checked).
            SLL_802_3 | SLL_802_2 if payload.len() <= MAX_8023_LENGTH => payload.len() as u16,
            protocol => return Err(FrameError::NoEtherType { protocol }),
        };
        let mut header = [0; ETHER_HEADER];
        header[..6].copy_from_slice(&SYNTHETIC_DST);
        header[6..12].copy_from_slice(&source);
        header[12..].copy_from_slice(&ethertype.to_be_bytes());
        Ok(Self {
            header: Some(header),
            rest: payload,
        })
    }

    /// The synthesized header, or nothing when the capture was Ethernet already.
    pub fn header(&self) -> &[u8] {
        self.header.as_ref().map_or(&[], |h| h.as_slice())
    }

    /// What follows [`Frame::header`]: the whole captured frame when it was Ethernet.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    /// Length on the wire, in bytes (without FCS).
    pub fn len(&self) -> usize {
        self.header().len() + self.rest.len()
    }

    /// Never true for a frame [`Frame::from_capture`] made (it has at least a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes after the Ethernet header and its VLAN tags: what an interface's MTU limits.
    pub fn l3_len(&self) -> usize {
        let mut ethertype_at = 12;
        while self
            .u16_at(ethertype_at)
            .is_some_and(|t| VLAN_TPIDS.contains(&t))
        {
            ethertype_at += 4;
        }
        self.len().saturating_sub(ethertype_at + 2)
    }

    fn u16_at(&self, offset: usize) -> Option<u16> {
        Some(u16::from_be_bytes([
            self.byte(offset)?,
            self.byte(offset + 1)?,
        ]))
    }

    fn byte(&self, offset: usize) -> Option<u8> {
        let header = self.header();
        match offset.checked_sub(header.len()) {
            None => header.get(offset).copied(),
            Some(i) => self.rest.get(i).copied(),
        }
    }

    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        [self.header(), self.rest].concat()
    }
}

/// The captured link-layer address when it is a MAC (6 bytes), else [`SYNTHETIC_SRC`].
fn source_mac(address_len: u16, address: &[u8]) -> [u8; 6] {
    match address.get(..6) {
        Some(mac) if address_len == 6 => mac.try_into().unwrap_or(SYNTHETIC_SRC),
        _ => SYNTHETIC_SRC,
    }
}

/// A link type with its name, for messages.
struct LinkType(u32);

impl fmt::Display for LinkType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            ETHERNET => "Ethernet",
            RAW | LINKTYPE_RAW => "raw IP",
            LINUX_SLL => "Linux cooked (SLL)",
            LINUX_SLL2 => "Linux cooked (SLL2)",
            IPV4 => "raw IPv4",
            IPV6 => "raw IPv6",
            _ => return write!(f, "link type {}", self.0),
        };
        write!(f, "{name} (link type {})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];

    fn ipv4(len: usize) -> Vec<u8> {
        let mut ip = vec![0u8; len];
        ip[0] = 0x45;
        ip
    }

    fn ether(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        [&SYNTHETIC_DST[..], &MAC, &ethertype.to_be_bytes(), payload].concat()
    }

    fn sll(arphrd: u16, address: &[u8], protocol: u16, payload: &[u8]) -> Vec<u8> {
        let mut addr = [0u8; 8];
        addr[..address.len()].copy_from_slice(address);
        let mut head = vec![0, 0]; // packet type: to us
        head.extend(arphrd.to_be_bytes());
        head.extend((address.len() as u16).to_be_bytes());
        head.extend(addr);
        head.extend(protocol.to_be_bytes());
        [head, payload.to_vec()].concat()
    }

    fn sll2(arphrd: u16, address: &[u8], protocol: u16, payload: &[u8]) -> Vec<u8> {
        let mut addr = [0u8; 8];
        addr[..address.len()].copy_from_slice(address);
        let mut head = protocol.to_be_bytes().to_vec();
        head.extend([0, 0, 0, 0, 0, 7]); // reserved, ifindex 7
        head.extend(arphrd.to_be_bytes());
        head.extend([4, address.len() as u8]); // packet type: outgoing
        head.extend(addr);
        [head, payload.to_vec()].concat()
    }

    #[test]
    fn ethernet_passes_through_without_copy() {
        let data = ether(0x0800, &ipv4(40));
        let frame = Frame::from_capture(ETHERNET, &data).unwrap();
        assert!(frame.header().is_empty());
        assert!(std::ptr::eq(frame.rest(), data.as_slice()));
        assert_eq!(frame.len(), 54);
        assert_eq!(frame.l3_len(), 40);
    }

    #[test]
    fn linux_cooked_gets_the_captured_source_mac_and_protocol() {
        let ip = ipv4(40);
        let data = sll(1, &MAC, 0x0800, &ip);
        let frame = Frame::from_capture(LINUX_SLL, &data).unwrap();
        assert_eq!(frame.to_vec(), ether(0x0800, &ip));
        assert!(std::ptr::eq(frame.rest(), &data[16..]));

        let data = sll2(1, &MAC, 0x86dd, &ip);
        let frame = Frame::from_capture(LINUX_SLL2, &data).unwrap();
        assert_eq!(frame.to_vec(), ether(0x86dd, &ip));
    }

    /// `data` of `linktype` as the Ethernet frame it becomes.
    fn converted(linktype: u32, data: &[u8]) -> Vec<u8> {
        Frame::from_capture(linktype, data).unwrap().to_vec()
    }

    #[test]
    fn linux_cooked_without_a_mac_gets_the_synthetic_one() {
        // A tun device (ARPHRD_NONE, no address), loopback (6 zero bytes), an 8-byte address.
        let ip = ipv4(20);
        for (address, src) in [
            (&[][..], SYNTHETIC_SRC),
            (&[0; 6][..], [0; 6]),
            (&[9; 8][..], SYNTHETIC_SRC),
        ] {
            for frame in [
                converted(LINUX_SLL, &sll(65534, address, 0x0800, &ip)),
                converted(LINUX_SLL2, &sll2(65534, address, 0x0800, &ip)),
            ] {
                assert_eq!(frame[..6], SYNTHETIC_DST);
                assert_eq!(frame[6..12], src, "address {address:?}");
            }
        }
    }

    #[test]
    fn cooked_vlan_and_llc_keep_their_ethernet_form() {
        // libpcap puts a stripped VLAN tag back after the cooked header: protocol 0x8100.
        let tagged = [&[0x00, 0x64][..], &[0x08, 0x00], &ipv4(1500)].concat();
        let data = sll(1, &MAC, 0x8100, &tagged);
        let frame = Frame::from_capture(LINUX_SLL, &data).unwrap();
        assert_eq!(frame.to_vec(), ether(0x8100, &tagged));
        assert_eq!(frame.l3_len(), 1500);

        // 802.2 LLC (spanning tree): the length goes in the type field.
        let stp = [0x42, 0x42, 0x03, 0, 0, 0];
        assert_eq!(
            converted(LINUX_SLL, &sll(1, &MAC, 0x0004, &stp)),
            ether(6, &stp)
        );

        // CAN has no Ethernet form.
        let err = Frame::from_capture(LINUX_SLL, &sll(280, &[], 0x000c, &[0; 16])).unwrap_err();
        assert_eq!(err, FrameError::NoEtherType { protocol: 0x000c });
    }

    #[test]
    fn raw_ip_takes_its_ethertype_from_the_version() {
        let v6 = [&[0x60][..], &[0; 39]].concat();
        for (linktype, data, ethertype) in [
            (RAW, ipv4(20), 0x0800u16),
            (LINKTYPE_RAW, v6.clone(), 0x86dd),
            (IPV4, ipv4(20), 0x0800),
            (IPV6, v6.clone(), 0x86dd),
        ] {
            let frame = Frame::from_capture(linktype, &data).unwrap();
            assert_eq!(
                frame.to_vec(),
                [
                    &SYNTHETIC_DST[..],
                    &SYNTHETIC_SRC,
                    &ethertype.to_be_bytes(),
                    &data
                ]
                .concat()
            );
            assert_eq!(frame.l3_len(), data.len());
        }
        for linktype in [RAW, IPV4] {
            assert_eq!(
                Frame::from_capture(linktype, &[0x20, 0, 0]).unwrap_err(),
                FrameError::NotIp {
                    linktype,
                    version: 2
                }
            );
        }
        assert_eq!(
            Frame::from_capture(IPV6, &ipv4(20)).unwrap_err(),
            FrameError::NotIp {
                linktype: IPV6,
                version: 4
            }
        );
    }

    #[test]
    fn vlan_tags_do_not_count_against_the_mtu() {
        let inner = ipv4(1500);
        let qinq = [
            &[0x00, 0x0a, 0x81, 0x00, 0x00, 0x14, 0x08, 0x00][..],
            &inner,
        ]
        .concat();
        let frame = ether(0x88a8, &qinq);
        assert_eq!(
            Frame::from_capture(ETHERNET, &frame).unwrap().l3_len(),
            1500
        );
        // A tag cut short: nothing follows it.
        let cut = ether(0x8100, &[0x00]);
        assert_eq!(Frame::from_capture(ETHERNET, &cut).unwrap().l3_len(), 0);
    }

    #[test]
    fn short_or_unknown_input_is_an_error_not_a_panic() {
        let cases: [(u32, &[u8], FrameError); 6] = [
            (
                ETHERNET,
                &[1; 13],
                FrameError::Truncated {
                    linktype: 1,
                    len: 13,
                    need: 14,
                },
            ),
            (
                LINUX_SLL,
                &[0; 15],
                FrameError::Truncated {
                    linktype: 113,
                    len: 15,
                    need: 16,
                },
            ),
            (
                LINUX_SLL2,
                &[],
                FrameError::Truncated {
                    linktype: 276,
                    len: 0,
                    need: 20,
                },
            ),
            (
                RAW,
                &[],
                FrameError::Truncated {
                    linktype: 12,
                    len: 0,
                    need: 1,
                },
            ),
            (
                IPV6,
                &[],
                FrameError::Truncated {
                    linktype: 229,
                    len: 0,
                    need: 1,
                },
            ),
            (105, &[0; 64], FrameError::Unsupported(105)),
        ];
        for (linktype, data, want) in cases {
            assert_eq!(Frame::from_capture(linktype, data).unwrap_err(), want);
        }
        assert_eq!(
            FrameError::Truncated {
                linktype: 113,
                len: 15,
                need: 16
            }
            .to_string(),
            "Linux cooked (SLL) (link type 113) frame of 15 bytes is shorter than its 16-byte header"
        );
        // Every prefix of every kind, and every link type on garbage: no panic.
        let samples = [
            ether(0x8100, &[0x81, 0, 0, 1, 0x88, 0xa8]),
            sll(1, &MAC, 0x8100, &[0; 3]),
            sll2(1, &MAC, 4, &[]),
        ];
        for sample in &samples {
            for linktype in [0, 1, 12, 101, 113, 228, 229, 276, u32::MAX] {
                for end in 0..=sample.len() {
                    if let Ok(frame) = Frame::from_capture(linktype, &sample[..end]) {
                        assert!(frame.l3_len() <= frame.len());
                    }
                }
            }
        }
    }
}
