//! Mirror targets: where the packets the agents capture are written out, as the operator's policy
//! says (`tapgraph::policy::Target`): reinjected into an interface, received on a TAP device,
//! written to pcapng files, or sent as VXLAN, GRE or ERSPAN.
//!
//! Each target is a [`Writer`] driven by one dedicated OS thread, so its system calls may block.
//! A write never panics and never stops the pipeline: every packet it is given is accounted for
//! in [`Written`] as written, oversize or failed, and the last reason comes with its fix.

mod interface;
mod pcapng;
mod tap;

use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use tapgraph::policy::Target;
use tapgraph::proto::Packet;

pub use tapgraph_encap::{Origin, Writer, Written, frame};

use interface::InterfaceWriter;
use pcapng::PcapngWriter;
use tap::TapWriter;

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
    /// A `vxlan`, `gre` or `erspan` target.
    #[error(transparent)]
    Tunnel(#[from] tapgraph_encap::OpenError),
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
        Target::Tap(name) => Box::new(TapWriter::open(name)?),
        Target::Vxlan { .. } | Target::Gre { .. } | Target::Erspan { .. } => {
            tapgraph_encap::open(target)?
        }
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

    /// The origin of the targets' tests: agent a1 (web-1) capturing eth0 with `linktype`.
    pub(super) fn origin(linktype: u32) -> Origin<'static> {
        Origin {
            agent_id: "a1",
            hostname: "web-1",
            interface: "eth0",
            linktype,
            snaplen: 0,
        }
    }

    /// An Ethernet frame of `len` bytes from `src` to the synthetic destination, IPv4, its
    /// payload marked with `mark`.
    pub(super) fn ether(src: [u8; 6], len: usize, mark: u8) -> Vec<u8> {
        let mut f = [&frame::SYNTHETIC_DST[..], &src, &[0x08, 0x00, 0x45]].concat();
        f.resize(len, mark);
        f
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
}
