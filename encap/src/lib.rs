//! What both ends of the virtual TAP need to send captured packets on as tunnelled Ethernet: the
//! [`Writer`] every mirror target implements, captured frames as Ethernet ([`frame`]), the VXLAN,
//! GRE and ERSPAN writers, and batched sends (`sendmmsg`). The controller's mirror hub uses them
//! for its targets; an agent in direct mode uses them to send to the analyzer itself.
//!
//! A write never panics and never stops the pipeline: every packet it is given is accounted for
//! in [`Written`] as written, oversize or failed, and the last reason comes with its fix.
//!
//! A crate of its own, not a module of `tapgraph`: that one forbids `unsafe`, and the raw GRE
//! socket and `sendmmsg` to an address need a few FFI calls.

pub mod frame;
mod gre;
mod send;
mod vxlan;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use tapgraph::policy::Target;
use tapgraph::proto::Packet;

pub use gre::{Encapsulation, GreWriter, Header};
pub use send::{send_each, send_each_to};
pub use vxlan::VxlanWriter;

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
    /// One packet of `bytes` written.
    pub fn sent(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    /// One packet not written, for `reason`.
    pub fn fail(&mut self, reason: impl fmt::Display) {
        self.failed += 1;
        self.error = Some(reason.to_string());
    }

    /// One packet too large for the target, for `reason`.
    pub fn too_big(&mut self, reason: String) {
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

/// Why a tunnel target could not be opened: which target, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
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
    #[error("mirror target {target}: cannot resolve `{host}`: {source}")]
    ResolveTunnel {
        target: String,
        host: String,
        source: io::Error,
    },
    #[error("mirror target {target}: `{host}` has no address")]
    NoTunnelAddress { target: String, host: String },
    #[error("mirror target {target}: opening a raw GRE socket towards {addr}: {source}{}", needs_raw(.source))]
    RawSocket {
        target: String,
        addr: IpAddr,
        source: io::Error,
    },
    #[error("mirror target {0} is not a tunnel: only vxlan, gre and erspan encapsulate")]
    NotATunnel(String),
}

fn needs_raw(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => " (needs CAP_NET_RAW)",
        _ => "",
    }
}

/// Opens a `vxlan`, `gre` or `erspan` target. May block (name resolution).
pub fn open(target: &Target) -> Result<Box<dyn Writer>, OpenError> {
    Ok(match target {
        Target::Vxlan { host, port, vni } => Box::new(VxlanWriter::open(host, *port, *vni)?),
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
        other => return Err(OpenError::NotATunnel(other.to_string())),
    })
}

/// How to stop frames larger than an MTU where they are captured: offloads build them.
pub fn offload_fix(origin: &Origin<'_>) -> String {
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

/// A packet for tests: captured at `nanos`, `original_length` on the wire.
#[cfg(test)]
pub(crate) fn packet(nanos: u64, original_length: u32, data: Vec<u8>) -> Packet {
    Packet {
        timestamp_unix_nanos: nanos,
        original_length,
        data: data.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn only_tunnels_open_here() {
        let err = open(&Target::Interface("eth9".into())).err().unwrap();
        assert_eq!(
            err.to_string(),
            "mirror target interface:eth9 is not a tunnel: only vxlan, gre and erspan encapsulate"
        );
    }
}
