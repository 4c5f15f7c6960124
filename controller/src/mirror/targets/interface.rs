//! Target `interface:NAME`: frames reinjected into a local interface, as if from a SPAN port.
//!
//! One AF_PACKET socket of protocol 0, bound to the interface: it sends, but the kernel never
//! hands it a copy of the interface's traffic (a libpcap handle opens a receive ring, and every
//! frame crossing the interface would pass through its filter). `sendmmsg` sends up to 64 frames
//! per system call. Frames still go through the interface's qdisc (no `PACKET_QDISC_BYPASS`), so
//! a capture on the interface itself (an analyzer on a dummy interface) sees them too. An
//! Ethernet capture goes out byte-identical.
//!
//! A frame whose L3 part exceeds the interface's MTU is counted as oversize and not sent. The MTU
//! is read from sysfs at open, every 5 s, and when the kernel refuses a frame as too long. If the
//! interface disappears, the interface of that name is bound again once it is back (looked for
//! every 5 s).

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, LinkAddr, SockFlag, SockType, bind, socket};
use tapgraph::proto::Packet;

use super::frame::Frame;
use super::{OpenError, Origin, Writer, Written};
use tapgraph_encap::{offload_fix, send_each};

/// How often the MTU is re-read, and a vanished interface looked for.
const REFRESH: Duration = Duration::from_secs(5);
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

pub struct InterfaceWriter {
    name: String,
    /// sysfs mount point (`/sys`), where the MTU is read.
    sys: PathBuf,
    /// `Err` holds why there is none: the interface is gone and not back yet.
    socket: Result<OwnedFd, String>,
    /// `None` when sysfs does not show the interface; the kernel's refusals still count.
    mtu: Option<u32>,
    refreshed: Instant,
}

impl InterfaceWriter {
    pub fn open(name: &str, sys: &Path) -> Result<Self, OpenError> {
        Ok(Self {
            name: name.to_string(),
            sys: sys.to_path_buf(),
            socket: Ok(bind_to(name)?),
            mtu: read_mtu(sys, name),
            refreshed: Instant::now(),
        })
    }

    fn refresh(&mut self) {
        self.refreshed = Instant::now();
        self.mtu = read_mtu(&self.sys, &self.name);
        if self.socket.is_err() {
            self.socket = bind_to(&self.name).map_err(|e| self.gone(&e.to_string()));
        }
    }

    fn gone(&self, why: &str) -> String {
        format!(
            "interface {} is gone ({why}): mirroring resumes when it is back",
            self.name
        )
    }

    fn oversize(&self, origin: &Origin<'_>, len: usize) -> String {
        let mtu = self.mtu.map(|m| format!(" {m}")).unwrap_or_default();
        format!(
            "frame of {len} bytes exceeds the MTU{mtu} of {name}: {fix} or raise the MTU of {name}",
            name = self.name,
            fix = offload_fix(origin),
        )
    }
}

impl Writer for InterfaceWriter {
    fn write(&mut self, origin: &Origin<'_>, packets: &[Packet]) -> Written {
        if self.refreshed.elapsed() >= REFRESH {
            self.refresh();
        }
        let mut written = Written::default();
        let socket = match &self.socket {
            Ok(socket) => socket,
            Err(why) => {
                written.failed = packets.len() as u64;
                written.error = (!packets.is_empty()).then(|| why.clone());
                return written;
            }
        };
        let mut frames = Vec::with_capacity(packets.len());
        for p in packets {
            match Frame::from_capture(origin.linktype, &p.data) {
                Err(e) => written.fail(e),
                Ok(f) if self.mtu.is_some_and(|mtu| f.l3_len() > mtu as usize) => {
                    written.too_big(self.oversize(origin, f.len()));
                }
                Ok(f) => frames.push(f),
            }
        }
        let messages: Vec<_> = frames
            .iter()
            .map(|f| [IoSlice::new(f.header()), IoSlice::new(f.rest())])
            .collect();
        let (mut refused_as_too_big, mut vanished) = (false, None);
        send_each(socket.as_fd(), &messages, |i, result| match result {
            Ok(()) => written.sent(frames[i].len()),
            Err(Errno::EMSGSIZE) => {
                refused_as_too_big = true;
                written.too_big(self.oversize(origin, frames[i].len()));
            }
            Err(e @ (Errno::ENXIO | Errno::ENODEV)) => {
                let why = self.gone(e.desc());
                written.fail(&why);
                vanished = Some(why);
            }
            Err(Errno::ENETDOWN) => written.fail(format_args!(
                "interface {0} is down: bring it up (ip link set {0} up)",
                self.name
            )),
            Err(Errno::ENOBUFS) => written.fail(format_args!(
                "the transmit queue of {} is full: it carries less than the mirrored traffic; \
                 narrow the policy's filter or lower its rate",
                self.name
            )),
            Err(e) => written.fail(format_args!("sending on {}: {}", self.name, e.desc())),
        });
        if refused_as_too_big {
            self.mtu = read_mtu(&self.sys, &self.name);
        }
        if let Some(why) = vanished {
            self.socket = Err(why);
        }
        written
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    fn quick(&self) -> bool {
        true
    }
}

/// A packet socket that sends on interface `name` and receives nothing.
fn bind_to(name: &str) -> Result<OwnedFd, OpenError> {
    let link = link_addr(name)?;
    if !matches!(link.hatype(), ARPHRD_ETHER | ARPHRD_LOOPBACK) {
        return Err(OpenError::NotEthernet {
            name: name.to_string(),
            hatype: link.hatype(),
        });
    }
    let failed = |e: Errno| OpenError::PacketSocket {
        name: name.to_string(),
        source: e.into(),
    };
    // Protocol 0: the kernel delivers no received frame to this socket.
    let socket = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(failed)?;
    bind(socket.as_raw_fd(), &link).map_err(failed)?;
    Ok(socket)
}

/// The link-layer address of interface `name` (its index and type), from the kernel's list.
fn link_addr(name: &str) -> Result<LinkAddr, OpenError> {
    nix::ifaddrs::getifaddrs()
        .map_err(|e| OpenError::ListInterfaces {
            name: name.to_string(),
            source: e.into(),
        })?
        .filter(|ifa| ifa.interface_name == name)
        .find_map(|ifa| ifa.address.as_ref().and_then(|a| a.as_link_addr()).copied())
        .ok_or_else(|| OpenError::NoInterface {
            name: name.to_string(),
        })
}

fn read_mtu(sys: &Path, name: &str) -> Option<u32> {
    let path = sys.join("class/net").join(name).join("mtu");
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use nix::sched::CloneFlags;
    use nix::sys::socket::{SockProtocol, recv};

    use super::super::tests::{origin, packet};
    use super::*;

    const SRC: [u8; 6] = [0x02, 0x74, 0x67, 0xaa, 0xbb, 0xcc];

    fn ether(len: usize, mark: u8) -> Vec<u8> {
        super::super::tests::ether(SRC, len, mark)
    }

    /// Runs `test` on a thread in a new network namespace holding the veth pair tgt0 - tgt1
    /// (gone with the thread); `None` without the privilege to make one.
    fn in_netns<T: Send + 'static>(test: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWNET) {
                eprintln!("SKIPPED: needs root (unshare(CLONE_NEWNET): {e})");
                return None;
            }
            // A child forked from this thread runs in its namespace.
            for args in [
                &[
                    "link", "add", "tgt0", "type", "veth", "peer", "name", "tgt1",
                ][..],
                &["link", "set", "tgt0", "up"],
                &["link", "set", "tgt1", "up"],
            ] {
                let status = Command::new("ip").args(args).status().expect("running ip");
                assert!(status.success(), "ip {args:?}: {status}");
            }
            Some(test())
        })
        .join()
        .unwrap()
    }

    /// A sysfs stand-in saying tgt0 has MTU `mtu`: the real one shows the namespace it was
    /// mounted in, not this thread's.
    fn fake_sys(mtu: u32) -> tempfile::TempDir {
        let sys = tempfile::tempdir().unwrap();
        let dir = sys.path().join("class/net/tgt0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mtu"), format!("{mtu}\n")).unwrap();
        sys
    }

    /// What arrives on tgt1 from the writer (frames from [`SRC`] or the synthetic source) within
    /// a second, until `want` of them.
    fn receive(socket: &OwnedFd, want: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut got = vec![];
        let mut buf = vec![0u8; 65536];
        while got.len() < want && Instant::now() < deadline {
            match recv(
                socket.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) if buf[6..12] == SRC || buf[6..12] == super::super::frame::SYNTHETIC_SRC => {
                    got.push(buf[..n].to_vec())
                }
                Ok(_) => {}
                Err(Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("recv: {e}"),
            }
        }
        got
    }

    fn listen_on_tgt1() -> OwnedFd {
        let socket = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .unwrap();
        bind(socket.as_raw_fd(), &link_addr("tgt1").unwrap()).unwrap();
        socket
    }

    #[test]
    fn frames_arrive_byte_identical_and_oversize_ones_are_counted() {
        let Some(()) = in_netns(|| {
            let sys = fake_sys(1500);
            let mut writer = InterfaceWriter::open("tgt0", sys.path()).unwrap();
            assert_eq!(writer.mtu, Some(1500));
            let rx = listen_on_tgt1();

            let frames: Vec<_> = (0..100).map(|i| ether(60 + i * 14, i as u8)).collect();
            let mut packets: Vec<_> = frames
                .iter()
                .map(|f| packet(1, f.len() as u32, f.clone()))
                .collect();
            // GRO super-frame, a runt, and the largest frame the MTU allows.
            packets.insert(10, packet(1, 9014, ether(9014, 0xee)));
            packets.insert(20, packet(1, 5, vec![1, 2, 3, 4, 5]));
            let full = ether(1514, 0xff);
            packets.push(packet(1, 1514, full.clone()));

            let got = writer.write(&origin(1), &packets);
            let sent_bytes: usize = frames.iter().map(Vec::len).sum::<usize>() + 1514;
            assert_eq!(
                (got.packets, got.bytes, got.oversize, got.failed),
                (101, sent_bytes as u64, 1, 1),
                "{got:?}"
            );
            let mut want = frames.clone();
            want.push(full);
            assert_eq!(receive(&rx, want.len()), want);

            let oversize = writer.write(&origin(1), &[packet(1, 9014, ether(9014, 0))]);
            assert_eq!(
                oversize.error.as_deref(),
                Some(
                    "frame of 9014 bytes exceeds the MTU 1500 of tgt0: disable GRO/GSO/TSO on the \
                     capturing host web-1 (ethtool -K eth0 gro off gso off tso off) or raise the \
                     MTU of tgt0"
                )
            );
        }) else {
            return;
        };
    }

    #[test]
    fn cooked_frames_get_an_ethernet_header() {
        let Some(()) = in_netns(|| {
            let sys = fake_sys(1500);
            let mut writer = InterfaceWriter::open("tgt0", sys.path()).unwrap();
            let rx = listen_on_tgt1();
            let ip = ether(80, 7)[14..].to_vec();
            let mut sll = vec![0, 0, 0, 1, 0, 6];
            sll.extend(SRC);
            sll.extend([0, 0, 0x08, 0x00]);
            sll.extend(&ip);
            let got = writer.write(&origin(113), &[packet(1, sll.len() as u32, sll)]);
            assert_eq!((got.packets, got.bytes), (1, 80), "{got:?}");
            assert_eq!(receive(&rx, 1), vec![ether(80, 7)]);
        }) else {
            return;
        };
    }

    /// When sysfs is wrong (here: says 9000 where the kernel has 1500), the kernel's refusal
    /// counts the frame as oversize all the same.
    #[test]
    fn the_kernels_refusal_is_oversize_too() {
        let Some(()) = in_netns(|| {
            let sys = fake_sys(9000);
            let mut writer = InterfaceWriter::open("tgt0", sys.path()).unwrap();
            let big = ether(3000, 1);
            let small = ether(100, 2);
            let packets = [
                packet(1, 100, small.clone()),
                packet(1, 3000, big),
                packet(1, 100, small),
            ];
            let got = writer.write(&origin(1), &packets);
            assert_eq!(
                (got.packets, got.oversize, got.failed),
                (2, 1, 0),
                "{got:?}"
            );
            assert!(
                got.error
                    .unwrap()
                    .starts_with("frame of 3000 bytes exceeds the MTU 9000 of tgt0")
            );
        }) else {
            return;
        };
    }

    /// Down, deleted, recreated: each write says why nothing went out, and mirroring resumes
    /// on the new interface of the same name.
    #[test]
    fn an_interface_that_goes_down_or_away_is_reported_then_found_again() {
        let Some(()) = in_netns(|| {
            let ip = |args: &str| {
                let status = Command::new("ip").args(args.split(' ')).status().unwrap();
                assert!(status.success(), "ip {args}");
            };
            let sys = fake_sys(1500);
            let mut writer = InterfaceWriter::open("tgt0", sys.path()).unwrap();
            let packets = [packet(1, 100, ether(100, 3))];

            ip("link set tgt0 down");
            let got = writer.write(&origin(1), &packets);
            assert_eq!(got.failed, 1, "{got:?}");
            assert_eq!(
                got.error.as_deref(),
                Some("interface tgt0 is down: bring it up (ip link set tgt0 up)")
            );

            ip("link del tgt0");
            let got = writer.write(&origin(1), &packets);
            assert_eq!(got.failed, 1, "{got:?}");
            assert!(got.error.unwrap().starts_with("interface tgt0 is gone"));

            ip("link add tgt0 type veth peer name tgt1");
            ip("link set tgt0 up");
            ip("link set tgt1 up");
            // Until the next look (every 5 s), still gone.
            assert_eq!(writer.write(&origin(1), &packets).failed, 1);
            writer.refreshed -= REFRESH;
            let rx = listen_on_tgt1();
            let got = writer.write(&origin(1), &packets);
            assert_eq!(got.packets, 1, "{got:?}");
            assert_eq!(receive(&rx, 1), vec![ether(100, 3)]);
        }) else {
            return;
        };
    }

    #[test]
    fn a_missing_interface_is_refused_with_the_fix() {
        let err = InterfaceWriter::open("tgh-nosuch0", Path::new("/sys"))
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "mirror target interface:tgh-nosuch0: no such interface in the controller's network \
             namespace: create it (e.g. `ip link add tgh-nosuch0 type dummy`) or fix the target"
        );
    }

    #[test]
    fn garbage_of_every_link_type_fails_without_sending() {
        let Some(()) = in_netns(|| {
            let sys = fake_sys(1500);
            let mut writer = InterfaceWriter::open("tgt0", sys.path()).unwrap();
            for linktype in [0, 1, 12, 113, 228, 229, 276, 999] {
                let packets = [packet(0, 0, vec![]), packet(0, 3, vec![0x90, 0, 0])];
                let got = writer.write(&origin(linktype), &packets);
                assert_eq!(
                    (got.packets, got.failed),
                    (0, 2),
                    "linktype {linktype}: {got:?}"
                );
                assert!(got.error.is_some());
            }
            assert_eq!(writer.write(&origin(1), &[]), Written::default());
        }) else {
            return;
        };
    }
}
