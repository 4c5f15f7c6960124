//! Target `vxlan:HOST:PORT`: each frame, as Ethernet, sent to HOST:PORT in a VXLAN datagram
//! (RFC 7348: an 8-byte header, flags 0x08, the 24-bit VNI), as a virtual TAP for an analyzer or
//! a VXLAN endpoint.
//!
//! HOST is resolved once, at open (IPv4 or IPv6). The socket is connected, so an ICMP "port
//! unreachable" from HOST is reported on a later send, and `sendmmsg` sends up to 64 datagrams per
//! system call, gathering header and frame without copying. A datagram the kernel refuses as too
//! long is counted as oversize. Larger than the path MTU but within 64 KiB, it is fragmented, as
//! VXLAN endpoints reassemble.

use std::io::IoSlice;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::os::fd::AsFd;

use nix::errno::Errno;
use tapgraph::proto::Packet;

use crate::frame::Frame;
use crate::{OpenError, Origin, Writer, Written, offload_fix, send_each};

/// RFC 7348 §5: the I flag, set when the VNI is valid.
const FLAG_VNI: u8 = 0x08;

pub struct VxlanWriter {
    socket: UdpSocket,
    /// `HOST:PORT` as configured, for messages.
    peer: String,
    header: [u8; 8],
}

impl VxlanWriter {
    pub fn open(host: &str, port: u16, vni: u32) -> Result<Self, OpenError> {
        let [_, v2, v1, v0] = vni.to_be_bytes();
        if vni >= 1 << 24 {
            return Err(OpenError::Vni {
                host: host.to_string(),
                port,
                vni,
            });
        }
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|source| OpenError::Resolve {
                host: host.to_string(),
                port,
                source,
            })?
            .next()
            .ok_or_else(|| OpenError::NoAddress {
                host: host.to_string(),
                port,
            })?;
        let local: SocketAddr = match addr {
            SocketAddr::V4(_) => ([0u8; 4], 0).into(),
            SocketAddr::V6(_) => ([0u16; 8], 0).into(),
        };
        let socket = UdpSocket::bind(local)
            .and_then(|s| s.connect(addr).map(|()| s))
            .map_err(|source| OpenError::Udp {
                host: host.to_string(),
                port,
                addr,
                source,
            })?;
        let peer = match addr {
            SocketAddr::V6(_) if host.contains(':') => format!("[{host}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        Ok(Self {
            socket,
            peer,
            header: [FLAG_VNI, 0, 0, 0, v2, v1, v0, 0],
        })
    }
}

impl Writer for VxlanWriter {
    fn write(&mut self, origin: &Origin<'_>, packets: &[Packet]) -> Written {
        let mut written = Written::default();
        let frames: Vec<_> = packets
            .iter()
            .filter_map(|p| {
                Frame::from_capture(origin.linktype, &p.data)
                    .map_err(|e| written.fail(e))
                    .ok()
            })
            .collect();
        let messages: Vec<_> = frames
            .iter()
            .map(|f| {
                [
                    IoSlice::new(&self.header),
                    IoSlice::new(f.header()),
                    IoSlice::new(f.rest()),
                ]
            })
            .collect();
        let peer = &self.peer;
        send_each(self.socket.as_fd(), &messages, |i, result| match result {
            Ok(()) => written.sent(frames[i].len()),
            Err(Errno::EMSGSIZE) => written.too_big(format!(
                "frame of {} bytes does not fit in a UDP datagram to {peer}: {}",
                frames[i].len(),
                offload_fix(origin),
            )),
            Err(Errno::ECONNREFUSED) => written.fail(format_args!(
                "{peer} refused VXLAN datagrams (ICMP port unreachable): is the receiver \
                 listening on that port?"
            )),
            Err(e) => written.fail(format_args!("sending VXLAN to {peer}: {}", e.desc())),
        });
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
    use std::time::Duration;

    use super::*;
    use crate::frame::{SYNTHETIC_DST, SYNTHETIC_SRC};
    use crate::packet;

    fn origin(linktype: u32) -> Origin<'static> {
        Origin {
            agent_id: "a1",
            hostname: "web-1",
            interface: "any",
            linktype,
            snaplen: 0,
        }
    }

    fn receiver(addr: &str) -> Option<UdpSocket> {
        let socket = UdpSocket::bind(addr).ok()?;
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        Some(socket)
    }

    fn received(socket: &UdpSocket, count: usize) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        (0..count)
            .map(|_| {
                let n = socket.recv(&mut buf).expect("a VXLAN datagram");
                buf[..n].to_vec()
            })
            .collect()
    }

    #[test]
    fn frames_arrive_encapsulated_with_the_vni() {
        let rx = receiver("127.0.0.1:0").unwrap();
        let port = rx.local_addr().unwrap().port();
        let mut writer = VxlanWriter::open("127.0.0.1", port, 0x12_3456).unwrap();

        let ether: Vec<u8> = (0..98u8).collect();
        let ip = [&[0x45u8][..], &[7; 39]].concat();
        let packets = [
            packet(1, 98, ether.clone()),
            packet(2, 40, ip.clone()),
            packet(3, 0, vec![]), // a runt: counted, not sent
        ];
        let got = writer.write(&origin(1), &packets[..1]);
        assert_eq!(
            got,
            Written {
                packets: 1,
                bytes: 98,
                ..Written::default()
            }
        );
        let got = writer.write(&origin(228), &packets[1..]);
        assert_eq!((got.packets, got.bytes, got.failed), (1, 54, 1), "{got:?}");
        assert!(
            got.error
                .unwrap()
                .contains("shorter than its 1-byte header")
        );

        let header = [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0];
        let synthesized = [&SYNTHETIC_DST[..], &SYNTHETIC_SRC, &[0x08, 0x00], &ip].concat();
        assert_eq!(
            received(&rx, 2),
            vec![
                [&header[..], &ether].concat(),
                [&header[..], &synthesized].concat()
            ]
        );
    }

    #[test]
    fn ipv6_and_names_resolve() {
        let Some(rx) = receiver("[::1]:0") else {
            eprintln!("SKIPPED: no IPv6 loopback");
            return;
        };
        let port = rx.local_addr().unwrap().port();
        let mut writer = VxlanWriter::open("::1", port, 1).unwrap();
        assert_eq!(writer.peer, format!("[::1]:{port}"));
        let frame: Vec<u8> = vec![0xab; 60];
        assert_eq!(
            writer
                .write(&origin(1), &[packet(1, 60, frame.clone())])
                .packets,
            1
        );
        assert_eq!(
            received(&rx, 1),
            vec![[&[8, 0, 0, 0, 0, 0, 1, 0][..], &frame].concat()]
        );

        let rx = receiver("127.0.0.1:0").unwrap();
        let port = rx.local_addr().unwrap().port();
        let ok = VxlanWriter::open("localhost", port, 1);
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn a_datagram_too_long_is_oversize_and_the_rest_goes() {
        let rx = receiver("127.0.0.1:0").unwrap();
        let port = rx.local_addr().unwrap().port();
        let mut writer = VxlanWriter::open("127.0.0.1", port, 5).unwrap();
        let small = vec![1u8; 64];
        let packets = [
            packet(1, 64, small.clone()),
            packet(1, 70_000, vec![2; 70_000]),
            packet(1, 64, small),
        ];
        let got = writer.write(&origin(1), &packets);
        assert_eq!(
            (got.packets, got.oversize, got.failed),
            (2, 1, 0),
            "{got:?}"
        );
        assert_eq!(
            got.error.as_deref(),
            Some(&*format!(
                "frame of 70000 bytes does not fit in a UDP datagram to 127.0.0.1:{port}: disable \
                 GRO/GSO/TSO on the capturing host web-1 (ethtool -K IFACE gro off gso off tso \
                 off)"
            ))
        );
        assert_eq!(received(&rx, 2).len(), 2);
    }

    #[test]
    fn a_refusing_receiver_is_reported_and_nothing_panics() {
        // A port nobody listens on: the ICMP error fails a later datagram.
        let port = receiver("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut writer = VxlanWriter::open("127.0.0.1", port, 5).unwrap();
        let mut total = Written::default();
        for _ in 0..3 {
            let got = writer.write(&origin(1), &[packet(1, 64, vec![1; 64])]);
            total.packets += got.packets;
            total.failed += got.failed;
            total.error = got.error.or(total.error);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(total.failed >= 1, "{total:?}");
        assert_eq!(total.packets + total.failed, 3);
        assert!(total.error.unwrap().contains("refused VXLAN datagrams"));
    }

    #[test]
    fn a_vni_wider_than_24_bits_is_refused() {
        let err = VxlanWriter::open("127.0.0.1", 4789, 1 << 24).err().unwrap();
        assert_eq!(
            err.to_string(),
            "mirror target vxlan:127.0.0.1:4789: VNI 16777216 does not fit in 24 bits"
        );
    }
}
