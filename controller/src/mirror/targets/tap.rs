//! Target `tap:NAME`: each frame, as Ethernet, written to TAP device NAME of the controller's host.
//! A frame written to a TAP descriptor enters the kernel as *received* on NAME (its RX path), where
//! a switch's SPAN port delivers: an analyzer on NAME sees it inbound (`tcpdump -Q in`). An
//! `interface:` target sends on its interface's TX path instead.
//!
//! The device is created when missing (not persistent: it goes when the controller closes the
//! target) or attached to when an operator made it (`ip tuntap add dev NAME mode tap`); the
//! target's note says which. It is brought up at open, and again when found down (looked at
//! every 5 s, and when a write is refused because it is down). One `writev` per frame (the
//! synthesized header, if any, and the captured bytes), on a non-blocking descriptor. A frame
//! whose L3 part exceeds NAME's MTU is oversize, as on an interface; the MTU is read at open,
//! every 5 s and when the kernel refuses a frame as too long.
//!
//! The host's own packets out of NAME (IPv6 router solicitations, say) queue on the descriptor,
//! never read: the device's transmit queue bounds them and the kernel drops the rest.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use tapgraph::proto::Packet;

use super::frame::Frame;
use super::{OpenError, Origin, Writer, Written};
use tapgraph_encap::offload_fix;

/// How often the MTU is re-read and the device checked to be up.
const REFRESH: Duration = Duration::from_secs(5);

pub struct TapWriter {
    name: String,
    device: File,
    /// A datagram socket for the interface ioctls (flags, MTU): any socket serves.
    control: OwnedFd,
    /// `None` when the kernel would not tell; its refusals still count as oversize.
    mtu: Option<u32>,
    created: bool,
    refreshed: Instant,
}

impl TapWriter {
    pub fn open(name: &str) -> Result<Self, OpenError> {
        // The policy checked the name (1 to 15 bytes); an ifreq holds 15 and a NUL.
        let existed = nix::net::if_::if_nametoindex(name).is_ok();
        let device = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| OpenError::TunDevice {
                name: name.to_string(),
                source,
            })?;
        let mut request = ifreq(name);
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `request` is, borrowed for the call;
        // `device` is an open /dev/net/tun descriptor.
        let set = unsafe { libc::ioctl(device.as_raw_fd(), libc::TUNSETIFF, &raw mut request) };
        if set < 0 {
            return Err(OpenError::TapSetup {
                name: name.to_string(),
                existed,
                source: io::Error::last_os_error(),
            });
        }
        let control = socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| OpenError::TapUp {
            name: name.to_string(),
            source: e.into(),
        })?;
        let mut writer = Self {
            name: name.to_string(),
            device,
            control,
            mtu: None,
            created: !existed,
            refreshed: Instant::now(),
        };
        writer.bring_up().map_err(|e| OpenError::TapUp {
            name: name.to_string(),
            source: e.into(),
        })?;
        writer.mtu = writer.read_mtu();
        tracing::info!(device = %name, created = writer.created, "mirror target TAP device ready");
        Ok(writer)
    }

    /// Sets the device up if it is down.
    fn bring_up(&self) -> Result<(), Errno> {
        let mut request = ifreq(&self.name);
        self.ioctl(libc::SIOCGIFFLAGS, &mut request)?;
        // SAFETY: SIOCGIFFLAGS filled the union's flags member.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        let up = libc::IFF_UP as libc::c_short;
        if flags & up != 0 {
            return Ok(());
        }
        request.ifr_ifru.ifru_flags = flags | up;
        self.ioctl(libc::SIOCSIFFLAGS, &mut request)
    }

    fn read_mtu(&self) -> Option<u32> {
        let mut request = ifreq(&self.name);
        self.ioctl(libc::SIOCGIFMTU, &mut request).ok()?;
        // SAFETY: SIOCGIFMTU filled the union's MTU member.
        let mtu = unsafe { request.ifr_ifru.ifru_mtu };
        u32::try_from(mtu).ok()
    }

    /// An interface ioctl (`SIOCGIF*`/`SIOCSIF*`) on the control socket.
    fn ioctl(&self, request: libc::c_ulong, ifr: &mut libc::ifreq) -> Result<(), Errno> {
        // SAFETY: every request passed here reads and writes one ifreq, which `ifr` is, borrowed
        // for the call; `control` is an open socket.
        let r = unsafe { libc::ioctl(self.control.as_raw_fd(), request, std::ptr::from_mut(ifr)) };
        Errno::result(r).map(drop)
    }

    fn refresh(&mut self) {
        self.refreshed = Instant::now();
        self.mtu = self.read_mtu();
        if let Err(e) = self.bring_up() {
            tracing::warn!(device = %self.name, error = %e, "cannot bring the mirror TAP device up");
        }
    }

    fn oversize(&self, origin: &Origin<'_>, len: usize) -> String {
        let mtu = self.mtu.map(|m| format!(" {m}")).unwrap_or_default();
        format!(
            "frame of {len} bytes exceeds the MTU{mtu} of TAP device {name}: {fix} or raise the \
             MTU of {name}",
            name = self.name,
            fix = offload_fix(origin),
        )
    }

    /// Writes one frame; `Err` is the errno of a refusal.
    fn send(&mut self, frame: &Frame<'_>) -> Result<(), Errno> {
        let parts = [IoSlice::new(frame.header()), IoSlice::new(frame.rest())];
        match self.device.write_vectored(&parts) {
            // A TAP device takes a frame whole or not at all.
            Ok(n) if n == frame.len() => Ok(()),
            Ok(_) => Err(Errno::EIO),
            Err(e) => Err(Errno::from_raw(e.raw_os_error().unwrap_or(0))),
        }
    }
}

/// An ifreq naming `name` (cut to 15 bytes), the rest zero.
fn ifreq(name: &str) -> libc::ifreq {
    let mut ifr_name = [0 as libc::c_char; libc::IFNAMSIZ];
    for (to, from) in ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *to = from as libc::c_char;
    }
    libc::ifreq {
        ifr_name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_mtu: 0 },
    }
}

impl Writer for TapWriter {
    fn write(&mut self, origin: &Origin<'_>, packets: &[Packet]) -> Written {
        if self.refreshed.elapsed() >= REFRESH {
            self.refresh();
        }
        let mut written = Written::default();
        for p in packets {
            let frame = match Frame::from_capture(origin.linktype, &p.data) {
                Err(e) => {
                    written.fail(e);
                    continue;
                }
                Ok(f) if self.mtu.is_some_and(|mtu| f.l3_len() > mtu as usize) => {
                    written.too_big(self.oversize(origin, f.len()));
                    continue;
                }
                Ok(f) => f,
            };
            let mut result = self.send(&frame);
            // Down (an operator, or a script): up again, and the frame goes.
            if result == Err(Errno::EIO) && self.bring_up().is_ok() {
                result = self.send(&frame);
            }
            match result {
                Ok(()) => written.sent(frame.len()),
                Err(Errno::EMSGSIZE | Errno::EINVAL) => {
                    self.mtu = self.read_mtu();
                    written.too_big(self.oversize(origin, frame.len()));
                }
                Err(Errno::EAGAIN) => written.fail(format_args!(
                    "TAP device {} took no more frames (EAGAIN): it receives less than the \
                     mirrored traffic; narrow the policy's filter or lower its rate",
                    self.name
                )),
                Err(Errno::EIO) => written.fail(format_args!(
                    "TAP device {0} is down and cannot be brought up: bring it up (ip link set \
                     {0} up)",
                    self.name
                )),
                Err(e) => written.fail(format_args!(
                    "writing to TAP device {}: {}",
                    self.name,
                    e.desc()
                )),
            }
        }
        written
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn quick(&self) -> bool {
        true
    }

    fn note(&self) -> Option<&'static str> {
        Some(if self.created { "created" } else { "opened" })
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use nix::sched::CloneFlags;
    use nix::sys::socket::{SockProtocol, bind, recv};

    use super::super::frame::{SYNTHETIC_DST, SYNTHETIC_SRC};
    use super::super::tests::{origin, packet};
    use super::*;

    const SRC: [u8; 6] = [0x02, 0x74, 0x67, 0xaa, 0xbb, 0xcd];

    fn ether(len: usize, mark: u8) -> Vec<u8> {
        super::super::tests::ether(SRC, len, mark)
    }

    /// Runs `test` on a thread in a new network namespace (gone with the thread); `None` without
    /// the privilege to make one.
    fn in_netns<T: Send + 'static>(test: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWNET) {
                eprintln!("SKIPPED: needs root (unshare(CLONE_NEWNET): {e})");
                return None;
            }
            Some(test())
        })
        .join()
        .unwrap()
    }

    /// `ip ARGS` in this thread's namespace.
    fn ip(args: &str) -> String {
        let out = Command::new("ip").args(args.split(' ')).output().unwrap();
        assert!(out.status.success(), "ip {args}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A packet socket on `name`: what the kernel receives there, from [`SRC`] or the synthetic
    /// source.
    fn listen_on(name: &str) -> OwnedFd {
        let socket = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::EthAll,
        )
        .unwrap();
        let link = nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter(|ifa| ifa.interface_name == name)
            .find_map(|ifa| ifa.address.as_ref().and_then(|a| a.as_link_addr()).copied())
            .unwrap();
        bind(socket.as_raw_fd(), &link).unwrap();
        socket
    }

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
                Ok(n) if n >= 12 && (buf[6..12] == SRC || buf[6..12] == SYNTHETIC_SRC) => {
                    got.push(buf[..n].to_vec())
                }
                Ok(_) => {}
                Err(Errno::EAGAIN) => std::thread::sleep(Duration::from_millis(5)),
                // Reported once after the device went down (and up again).
                Err(Errno::ENETDOWN) => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        got
    }

    #[test]
    fn a_missing_device_is_created_up_and_receives_the_frames() {
        let Some(()) = in_netns(|| {
            let mut writer = TapWriter::open("tgtap0").unwrap();
            assert_eq!(writer.note(), Some("created"));
            assert!(ip("link show tgtap0").contains(",UP"), "brought up");
            assert_eq!(writer.mtu, Some(1500));
            let rx = listen_on("tgtap0");

            let frames: Vec<_> = (0..50).map(|i| ether(60 + i * 20, i as u8)).collect();
            let mut packets: Vec<_> = frames
                .iter()
                .map(|f| packet(1, f.len() as u32, f.clone()))
                .collect();
            packets.insert(5, packet(1, 9014, ether(9014, 0xee)));
            packets.insert(9, packet(1, 5, vec![1, 2, 3, 4, 5]));
            let ip_packet = ether(80, 7)[14..].to_vec();
            let got = writer.write(&origin(1), &packets);
            assert_eq!(
                (got.packets, got.oversize, got.failed),
                (50, 1, 1),
                "{got:?}"
            );
            assert_eq!(got.bytes, frames.iter().map(Vec::len).sum::<usize>() as u64);
            assert_eq!(receive(&rx, 50), frames, "in order, byte for byte");

            // A raw IP capture gets the synthesized header.
            let got = writer.write(&origin(228), &[packet(1, 66, ip_packet.clone())]);
            assert_eq!((got.packets, got.bytes), (1, 80), "{got:?}");
            let synthesized = [
                &SYNTHETIC_DST[..],
                &SYNTHETIC_SRC,
                &[0x08, 0x00],
                &ip_packet,
            ]
            .concat();
            assert_eq!(receive(&rx, 1), vec![synthesized]);

            let oversize = writer.write(&origin(1), &[packet(1, 9014, ether(9014, 0))]);
            assert_eq!(
                oversize.error.as_deref(),
                Some(
                    "frame of 9014 bytes exceeds the MTU 1500 of TAP device tgtap0: disable \
                     GRO/GSO/TSO on the capturing host web-1 (ethtool -K eth0 gro off gso off \
                     tso off) or raise the MTU of tgtap0"
                )
            );

            // Not persistent: it goes with the writer.
            drop(writer);
            assert!(nix::net::if_::if_nametoindex("tgtap0").is_err());
        }) else {
            return;
        };
    }

    #[test]
    fn an_operators_device_is_opened_and_kept_up() {
        let Some(()) = in_netns(|| {
            ip("tuntap add dev tgtap1 mode tap");
            let mut writer = TapWriter::open("tgtap1").unwrap();
            assert_eq!(writer.note(), Some("opened"));
            assert!(ip("link show tgtap1").contains(",UP"));
            let rx = listen_on("tgtap1");

            ip("link set tgtap1 down");
            let frame = ether(100, 3);
            let got = writer.write(&origin(1), &[packet(1, 100, frame.clone())]);
            assert_eq!(got.packets, 1, "{got:?}");
            assert!(ip("link show tgtap1").contains(",UP"), "up again");
            assert_eq!(receive(&rx, 1), vec![frame]);

            // The operator's device stays when the target closes.
            drop(writer);
            assert!(nix::net::if_::if_nametoindex("tgtap1").is_ok());
        }) else {
            return;
        };
    }

    #[test]
    fn a_device_that_is_not_a_tap_is_refused_with_the_fix() {
        let Some(()) = in_netns(|| {
            ip("link add tgveth0 type veth peer name tgveth1");
            let err = TapWriter::open("tgveth0").err().unwrap();
            assert_eq!(
                err.to_string(),
                "mirror target tap:tgveth0: attaching to the TAP device: Invalid argument (os \
                 error 22): tgveth0 exists and is not a TAP device (or is multi-queue): choose \
                 another name, or remove it to let the controller create it"
            );
            // One writer per TAP device: a second target on it is refused, saying why.
            let _first = TapWriter::open("tgtap2").unwrap();
            let err = TapWriter::open("tgtap2").err().unwrap();
            assert!(
                err.to_string().contains("another process holds tgtap2"),
                "{err}"
            );
        }) else {
            return;
        };
    }
}
