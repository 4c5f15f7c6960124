//! Mirror targets: where the packets the agents capture are written out, as the operator's policy
//! says (`tapgraph::policy::Target`): reinjected into an interface, received on a TAP device,
//! written to pcapng files, or sent as VXLAN, GRE or ERSPAN.
//!
//! Each target is a [`Writer`] driven by one dedicated OS thread, so its system calls may block.
//! A write never panics and never stops the pipeline: every packet it is given is accounted for
//! in [`Written`] as written, oversize or failed, and the last reason comes with its fix.

pub mod frame;
mod gre;
mod interface;
mod pcapng;
mod tap;
mod vxlan;

use std::fmt;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage, sendmmsg};
use tapgraph::policy::Target;
use tapgraph::proto::Packet;

use gre::{Encapsulation, GreWriter};
use interface::InterfaceWriter;
use pcapng::PcapngWriter;
use tap::TapWriter;
use vxlan::VxlanWriter;

/// Who captured a batch: the pcapng target records each distinct origin as its own interface block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin<'a> {
    pub agent_id: &'a str,
    pub hostname: &'a str,
    pub interface: &'a str,
    /// libpcap DLT of the packets' data.
    pub linktype: u32,
    pub snaplen: u32,
}

/// What one write did. `packets + oversize + failed` == the packets given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Written {
    /// Packets written.
    pub packets: u64,
    /// Bytes of those packets as written: frames on the wire for an interface or a TAP device,
    /// inner frames for VXLAN, GRE and ERSPAN, captured bytes for pcapng.
    pub bytes: u64,
    /// Packets larger than the target can carry (the MTU), not written.
    pub oversize: u64,
    /// Packets not written for any other reason.
    pub failed: u64,
    /// The last error or oversize reason, with the fix, for operators.
    pub error: Option<String>,
}

impl Written {
    fn sent(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    fn fail(&mut self, reason: impl fmt::Display) {
        self.failed += 1;
        self.error = Some(reason.to_string());
    }

    fn too_big(&mut self, reason: String) {
        self.oversize += 1;
        self.error = Some(reason);
    }
}

/// A mirror target. Used from one blocking thread; never panics on any input.
pub trait Writer: Send {
    fn write(&mut self, origin: &Origin<'_>, packets: &[Packet]) -> Written;
    fn flush(&mut self) -> io::Result<()>;
    /// Whether a write only hands frames to the kernel's network stack, never waiting on a disk
    /// or a name lookup: a small one may then run on an async thread.
    fn quick(&self) -> bool {
        false
    }
    /// How the target was opened, when operators should know: `created` or `opened` for a TAP
    /// device (made by the controller, or one an operator made).
    fn note(&self) -> Option<&'static str> {
        None
    }
}

/// Why a target could not be opened: which target, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "mirror target interface:{name}: no such interface in the controller's network namespace: \
         create it (e.g. `ip link add {name} type dummy`) or fix the target"
    )]
    NoInterface { name: String },
    #[error("mirror target interface:{name}: listing the interfaces: {source}")]
    ListInterfaces { name: String, source: io::Error },
    #[error(
        "mirror target interface:{name}: not an Ethernet interface (ARPHRD type {hatype}): mirror \
         into an Ethernet, veth, bridge or dummy interface"
    )]
    NotEthernet { name: String, hatype: u16 },
    #[error("mirror target interface:{name}: opening a packet socket on it: {source}{}", needs_cap(.source))]
    PacketSocket { name: String, source: io::Error },
    #[error("mirror target vxlan:{host}:{port}: cannot resolve `{host}`: {source}")]
    Resolve {
        host: String,
        port: u16,
        source: io::Error,
    },
    #[error("mirror target vxlan:{host}:{port}: `{host}` has no address")]
    NoAddress { host: String, port: u16 },
    #[error("mirror target vxlan:{host}:{port}: VNI {vni} does not fit in 24 bits")]
    Vni { host: String, port: u16, vni: u32 },
    #[error("mirror target vxlan:{host}:{port}: opening a UDP socket towards {addr}: {source}")]
    Udp {
        host: String,
        port: u16,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error(
        "mirror target tap:{name}: opening /dev/net/tun: {source}: the controller needs \
         CAP_NET_ADMIN and the tun driver (modprobe tun)"
    )]
    TunDevice { name: String, source: io::Error },
    #[error("mirror target tap:{name}: attaching to the TAP device: {source}{}", tap_fix(.name, .source, *.existed))]
    TapSetup {
        name: String,
        existed: bool,
        source: io::Error,
    },
    #[error("mirror target tap:{name}: bringing the device up: {source}{}", needs_admin(.source))]
    TapUp { name: String, source: io::Error },
    #[error("mirror target {target}: cannot resolve `{host}`: {source}")]
    ResolveTunnel {
        target: String,
        host: String,
        source: io::Error,
    },
    #[error("mirror target {target}: `{host}` has no address")]
    NoTunnelAddress { target: String, host: String },
    #[error("mirror target {target}: opening a raw GRE socket towards {addr}: {source}{}", needs_cap(.source))]
    RawSocket {
        target: String,
        addr: IpAddr,
        source: io::Error,
    },
    #[error("mirror target pcap: creating {}: {source}", .path.display())]
    CreateFile { path: PathBuf, source: io::Error },
    #[error(
        "mirror target pcap: {} exists and is not a pcapng file: move it away or choose another \
         path",
        .path.display()
    )]
    NotPcapng { path: PathBuf },
    #[error(
        "mirror target pcap: {} ends inside a block (a write was cut short): move it away \
         (pcapfix can repair it) or turn rotation on",
        .path.display()
    )]
    Damaged { path: PathBuf },
}

fn needs_cap(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => " (the controller needs CAP_NET_RAW)",
        _ => "",
    }
}

fn needs_admin(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => " (the controller needs CAP_NET_ADMIN)",
        _ => "",
    }
}

/// What to do when TUNSETIFF refuses `name`.
fn tap_fix(name: &str, e: &io::Error, existed: bool) -> String {
    match Errno::from_raw(e.raw_os_error().unwrap_or(0)) {
        Errno::EPERM | Errno::EACCES => " (the controller needs CAP_NET_ADMIN)".into(),
        Errno::EBUSY => format!(
            ": another process holds {name} (a TAP device takes one writer): stop it or choose \
             another name"
        ),
        Errno::EINVAL if existed => format!(
            ": {name} exists and is not a TAP device (or is multi-queue): choose another name, or \
             remove it to let the controller create it"
        ),
        _ => String::new(),
    }
}

/// Opens `target`; a relative pcap path is under `state_dir`. [`Target::None`] gives a writer
/// that counts and discards. May block (name resolution, file creation).
pub fn open(target: &Target, state_dir: &Path) -> Result<Box<dyn Writer>, OpenError> {
    Ok(match target {
        Target::None => Box::new(Discard),
        Target::Interface(name) => Box::new(InterfaceWriter::open(name, Path::new("/sys"))?),
        Target::Pcap {
            path,
            rotate_bytes,
            rotate_interval,
        } => Box::new(PcapngWriter::open(
            &state_dir.join(path),
            *rotate_bytes,
            *rotate_interval,
        )?),
        Target::Vxlan { host, port, vni } => Box::new(VxlanWriter::open(host, *port, *vni)?),
        Target::Tap(name) => Box::new(TapWriter::open(name)?),
        Target::Gre { host, key } => Box::new(GreWriter::open(
            "gre",
            host,
            Encapsulation::Gre { key: *key },
        )?),
        Target::Erspan {
            host,
            kind,
            session,
        } => Box::new(GreWriter::open(
            "erspan",
            host,
            Encapsulation::Erspan {
                kind: *kind,
                session: *session,
            },
        )?),
    })
}

/// Target `none`: counts what it is given, writes nothing.
struct Discard;

impl Writer for Discard {
    fn write(&mut self, _: &Origin<'_>, packets: &[Packet]) -> Written {
        let mut written = Written::default();
        packets.iter().for_each(|p| written.sent(p.data.len()));
        written
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn quick(&self) -> bool {
        true
    }
}

/// How to stop frames larger than an MTU where they are captured: offloads build them.
fn offload_fix(origin: &Origin<'_>) -> String {
    let iface = match origin.interface {
        "" | "any" => "IFACE",
        name => name,
    };
    let host = match origin.hostname {
        "" => String::new(),
        name => format!(" {name}"),
    };
    format!(
        "disable GRO/GSO/TSO on the capturing host{host} (ethtool -K {iface} gro off gso off tso off)"
    )
}

/// Messages per `sendmmsg` call.
const BATCH: usize = 64;

/// Sends each of `messages` as one datagram on `fd`, in order, up to 64 per system call
/// (`sendmmsg`), and tells `outcome` what became of each, by index.
fn send_each<const N: usize>(
    fd: BorrowedFd<'_>,
    messages: &[[IoSlice<'_>; N]],
    outcome: impl FnMut(usize, Result<(), Errno>),
) {
    // No per-message address: the socket is bound or connected. `()` also makes reading the
    // results sound, as nothing uninitialized is read back.
    let no_address = [None::<()>; BATCH];
    let mut headers = MultiHeaders::<()>::preallocate(messages.len().min(BATCH), None);
    let send = |chunk: Range<usize>| {
        sendmmsg(
            fd.as_raw_fd(),
            &mut headers,
            &messages[chunk.clone()],
            &no_address[..chunk.len()],
            [],
            MsgFlags::empty(),
        )
        .map(Iterator::count)
    };
    send_batches(messages.len(), send, outcome);
}

/// [`send_each`] on a socket that is not connected: every message goes to `to`. nix's
/// `sendmmsg` would read back an uninitialized address per message here, so this calls libc's.
fn send_each_to<const N: usize>(
    fd: BorrowedFd<'_>,
    to: &SockaddrStorage,
    messages: &[[IoSlice<'_>; N]],
    outcome: impl FnMut(usize, Result<(), Errno>),
) {
    let send = |chunk: Range<usize>| {
        let mut headers: Vec<libc::mmsghdr> = messages[chunk]
            .iter()
            .map(|message| {
                // SAFETY: msghdr is plain data (pointers and integers): all zeroes is a valid
                // value, the empty message with no name and no control data.
                let mut msg_hdr: libc::msghdr = unsafe { std::mem::zeroed() };
                msg_hdr.msg_name = to.as_ptr().cast_mut().cast();
                msg_hdr.msg_namelen = to.len();
                // IoSlice is ABI-compatible with iovec (std guarantees it on Unix).
                msg_hdr.msg_iov = message.as_ptr().cast_mut().cast();
                msg_hdr.msg_iovlen = N;
                libc::mmsghdr {
                    msg_hdr,
                    msg_len: 0,
                }
            })
            .collect();
        // SAFETY: every header points at `to` and at one message's IoSlices, all borrowed for
        // this call; the kernel only reads them and writes each header's `msg_len`. The count is
        // the vector's length, at most BATCH.
        let sent = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                headers.as_mut_ptr(),
                headers.len() as libc::c_uint,
                0,
            )
        };
        Errno::result(sent).map(|n| n as usize)
    };
    send_batches(messages.len(), send, outcome);
}

/// Sends `count` messages in chunks of at most [`BATCH`] with `send` (which returns how many of
/// a chunk the kernel took), telling `outcome` what became of each, by index.
fn send_batches(
    count: usize,
    mut send: impl FnMut(Range<usize>) -> Result<usize, Errno>,
    mut outcome: impl FnMut(usize, Result<(), Errno>),
) {
    let mut next = 0;
    while next < count {
        let result = send(next..count.min(next + BATCH));
        // The kernel stops at the first message it refuses, having sent those before it; that
        // one's error comes back when the next call starts with it.
        match result {
            Ok(0) => {
                outcome(next, Err(Errno::EIO));
                next += 1;
            }
            Ok(sent) => {
                (next..next + sent).for_each(|i| outcome(i, Ok(())));
                next += sent;
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                outcome(next, Err(e));
                next += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn packet(nanos: u64, original_length: u32, data: Vec<u8>) -> Packet {
        Packet {
            timestamp_unix_nanos: nanos,
            original_length,
            data: data.into(),
        }
    }

    #[test]
    fn none_counts_and_discards() {
        let mut w = open(&Target::None, Path::new("/nonexistent")).unwrap();
        let origin = Origin {
            agent_id: "a",
            hostname: "h",
            interface: "eth0",
            linktype: 1,
            snaplen: 0,
        };
        let got = w.write(&origin, &[packet(1, 10, vec![0; 10]), packet(2, 0, vec![])]);
        assert_eq!(
            got,
            Written {
                packets: 2,
                bytes: 10,
                ..Written::default()
            }
        );
        w.flush().unwrap();
    }

    #[test]
    fn the_offload_fix_names_the_host_and_interface_when_known() {
        let mut origin = Origin {
            agent_id: "a",
            hostname: "web-1",
            interface: "eth0",
            linktype: 1,
            snaplen: 0,
        };
        assert_eq!(
            offload_fix(&origin),
            "disable GRO/GSO/TSO on the capturing host web-1 (ethtool -K eth0 gro off gso off tso off)"
        );
        origin.interface = "any";
        origin.hostname = "";
        assert_eq!(
            offload_fix(&origin),
            "disable GRO/GSO/TSO on the capturing host (ethtool -K IFACE gro off gso off tso off)"
        );
    }
}
