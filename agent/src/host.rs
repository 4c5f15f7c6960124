//! Facts about this host for `Hello`: name, kernel, machine id and every interface with its
//! addresses, MAC, MTU and offload flags; and the listing of `tapgraph-agent interfaces`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::ifaddrs::getifaddrs;
use nix::libc;
use nix::net::if_::InterfaceFlags;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use tapgraph::proto;

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

pub fn kernel() -> String {
    match nix::sys::utsname::uname() {
        Ok(u) => format!(
            "{} {}",
            u.release().to_string_lossy(),
            u.version().to_string_lossy()
        ),
        Err(_) => String::new(),
    }
}

fn prefix_len(mask: Option<IpAddr>) -> u32 {
    match mask {
        Some(IpAddr::V4(m)) => u32::from(m).count_ones(),
        Some(IpAddr::V6(m)) => u128::from(m).count_ones(),
        None => 0,
    }
}

fn ip_of(addr: &nix::sys::socket::SockaddrStorage) -> Option<IpAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// Every interface of this network namespace, sorted by name.
pub fn interfaces() -> Vec<proto::Interface> {
    let mut by_name: BTreeMap<String, proto::Interface> = BTreeMap::new();
    let Ok(addrs) = getifaddrs() else {
        return Vec::new();
    };
    for ifa in addrs {
        let sys = Path::new("/sys/class/net").join(&ifa.interface_name);
        let entry = by_name
            .entry(ifa.interface_name.clone())
            .or_insert_with(|| proto::Interface {
                name: ifa.interface_name.clone(),
                index: read_trimmed(sys.join("ifindex"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                mac: read_trimmed(sys.join("address"))
                    .filter(|m| m != "00:00:00:00:00:00")
                    .unwrap_or_default(),
                addresses: Vec::new(),
                mtu: read_trimmed(sys.join("mtu"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
                up: false,
                offload: None,
            });
        entry.up |= ifa.flags.contains(InterfaceFlags::IFF_UP);
        if let Some(ip) = ifa.address.as_ref().and_then(ip_of) {
            let len = prefix_len(ifa.netmask.as_ref().and_then(ip_of));
            entry.addresses.push(format!("{ip}/{len}"));
        }
    }
    for iface in by_name.values_mut() {
        iface.offload = Some(read_offload(&iface.name).unwrap_or_else(|error| {
            tracing::debug!(interface = %iface.name, %error, "offload flags unknown");
            proto::Offload::default()
        }));
    }
    by_name.into_values().collect()
}

// Legacy ethtool "get" commands (linux/ethtool.h); each takes a `struct ethtool_value`.
const ETHTOOL_GTSO: u32 = 0x1e;
const ETHTOOL_GGSO: u32 = 0x23;
const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_GGRO: u32 = 0x2b;
/// Bit of ETHTOOL_GFLAGS's value that says large receive offload is on.
const ETH_FLAG_LRO: u32 = 0x8000;

/// Why the offload flags of an interface could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("interface name {0:?} is not a valid kernel interface name")]
    Name(String),
    #[error("cannot open a socket for the ethtool ioctl: {0}")]
    Socket(#[source] Errno),
    #[error("ethtool {command} on {interface}: {errno}")]
    Ioctl {
        interface: String,
        command: &'static str,
        #[source]
        errno: Errno,
    },
}

/// The GRO, GSO, TSO and LRO flags of interface `name` in this network namespace, as
/// `ethtool -k` shows them. Needs no privilege.
pub fn read_offload(name: &str) -> Result<proto::Offload, OffloadError> {
    let ifr_name = ifreq_name(name).ok_or_else(|| OffloadError::Name(name.to_string()))?;
    let sock = ethtool_socket().map_err(OffloadError::Socket)?;
    let get = |cmd, command| {
        ethtool_get(sock.as_fd(), &ifr_name, cmd).map_err(|errno| OffloadError::Ioctl {
            interface: name.to_string(),
            command,
            errno,
        })
    };
    Ok(proto::Offload {
        known: true,
        gro: get(ETHTOOL_GGRO, "GGRO")? != 0,
        gso: get(ETHTOOL_GGSO, "GGSO")? != 0,
        tso: get(ETHTOOL_GTSO, "GTSO")? != 0,
        lro: get(ETHTOOL_GFLAGS, "GFLAGS")? & ETH_FLAG_LRO != 0,
    })
}

/// Any socket carries SIOCETHTOOL to the device layer; ethtool(8) uses an AF_INET datagram one.
fn ethtool_socket() -> Result<OwnedFd, Errno> {
    socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// `name` as `ifr_name` wants it: NUL-terminated within IFNAMSIZ bytes; `None` when it cannot be.
fn ifreq_name(name: &str) -> Option<[libc::c_char; libc::IFNAMSIZ]> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return None;
    }
    let mut out = [0; libc::IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b as libc::c_char;
    }
    Some(out)
}

/// `struct ethtool_value` of linux/ethtool.h.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// One legacy ethtool "get" command on interface `ifr_name`; returns its `data`.
fn ethtool_get(
    sock: BorrowedFd<'_>,
    ifr_name: &[libc::c_char; libc::IFNAMSIZ],
    cmd: u32,
) -> Result<u32, Errno> {
    let mut value = EthtoolValue { cmd, data: 0 };
    let mut req = libc::ifreq {
        ifr_name: *ifr_name,
        ifr_ifru: libc::__c_anonymous_ifr_ifru {
            ifru_data: (&raw mut value).cast(),
        },
    };
    // SAFETY: `sock` is an open socket borrowed for the whole call. `req` is a fully initialised
    // `struct ifreq` whose name is NUL-terminated (`ifreq_name`), and whose `ifr_data` points to
    // `value`, a live `#[repr(C)]` `struct ethtool_value`. For the GTSO/GGSO/GFLAGS/GGRO commands
    // the kernel reads and writes exactly `sizeof(struct ethtool_value)` bytes there and keeps
    // no pointer after returning; both `req` and `value` outlive the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &raw mut req) };
    Errno::result(rc)?;
    Ok(value.data)
}

/// An operator-facing warning when `iface` has GRO, GSO, TSO or LRO on: capture then sees
/// super-frames larger than the MTU, which cannot be reinjected. `None` when they are all off or
/// the flags are unknown.
pub fn offload_warning(iface: &proto::Interface) -> Option<String> {
    let offload = iface.offload.as_ref().filter(|o| o.known)?;
    let on = offloads_on(offload);
    if on.is_empty() {
        return None;
    }
    let name = &iface.name;
    let upper: Vec<String> = on.iter().map(|o| o.to_uppercase()).collect();
    let mtu = match iface.mtu {
        0 => "the MTU".to_string(),
        mtu => format!("the MTU {mtu}"),
    };
    let off: Vec<String> = on.iter().map(|o| format!("{o} off")).collect();
    Some(format!(
        "{name} has {} on: captured frames can exceed {mtu} and cannot be reinjected; \
         disable with `ethtool -K {name} {}`",
        upper.join(", "),
        off.join(" ")
    ))
}

/// The offloads that are on, as ethtool -K names them.
fn offloads_on(o: &proto::Offload) -> Vec<&'static str> {
    [
        ("gro", o.gro),
        ("gso", o.gso),
        ("tso", o.tso),
        ("lro", o.lro),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect()
}

pub fn machine_id() -> String {
    read_trimmed("/etc/machine-id").unwrap_or_default()
}

/// Whether this process may capture packets (root or CAP_NET_RAW in its effective set).
pub fn can_capture() -> bool {
    has_capability(13) // CAP_NET_RAW
}

fn has_capability(bit: u32) -> bool {
    let Some(status) = std::fs::read_to_string("/proc/self/status").ok() else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

pub fn hello() -> proto::Hello {
    proto::Hello {
        hostname: hostname(),
        agent_version: tapgraph::VERSION.to_string(),
        kernel: kernel(),
        interfaces: interfaces(),
        capabilities: Some(proto::Capabilities {
            capture: can_capture(),
            process_attribution: has_capability(19), // CAP_SYS_PTRACE
            all_namespaces: has_capability(21),      // CAP_SYS_ADMIN
            // Set by the session from the connection reporter's BPF tracer.
            connect_process: false,
            connect_process_off_reason: String::new(),
        }),
        started_at_unix_nanos: 0,
        machine_id: machine_id(),
        scope: proto::SnapshotScope::Own as i32,
        agent_id: String::new(),
    }
}

/// A device libpcap offers for capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcapDevice {
    pub name: String,
    pub description: String,
}

/// What `tapgraph-agent interfaces` shows: the kernel's interfaces of this network namespace,
/// the devices libpcap would capture on, and whether this process may capture at all.
#[derive(Debug, Clone)]
pub struct Listing {
    pub interfaces: Vec<proto::Interface>,
    /// libpcap's devices, or why it could not list them.
    pub pcap: Result<Vec<PcapDevice>, String>,
    /// Root or CAP_NET_RAW: opening a capture is permitted.
    pub capture_permitted: bool,
}

impl Listing {
    /// Reads everything now; never fails (what could not be read says so).
    pub fn read() -> Listing {
        let pcap = pcap::Device::list()
            .map(|devices| {
                devices
                    .into_iter()
                    .map(|d| PcapDevice {
                        name: d.name,
                        description: d.desc.unwrap_or_default(),
                    })
                    .collect()
            })
            .map_err(|e| e.to_string());
        Listing {
            interfaces: interfaces(),
            pcap,
            capture_permitted: can_capture(),
        }
    }

    /// Whether libpcap lists `name`; `None` when the pcap listing failed.
    fn pcap_lists(&self, name: &str) -> Option<bool> {
        self.pcap
            .as_ref()
            .ok()
            .map(|devices| devices.iter().any(|d| d.name == name))
    }

    /// libpcap devices that are not kernel interfaces of this namespace: `any`, nflog, usbmon...
    fn pcap_only(&self) -> Vec<&PcapDevice> {
        let Ok(devices) = &self.pcap else {
            return Vec::new();
        };
        devices
            .iter()
            .filter(|d| !self.interfaces.iter().any(|i| i.name == d.name))
            .collect()
    }

    /// One JSON document: `interfaces` (each with `offload` null when unknown, `pcap` null when
    /// libpcap could not list devices, and `warning` null unless an offload is on), `pcap_only`,
    /// `pcap_error` and `capture_permitted`.
    pub fn to_json(&self) -> serde_json::Value {
        let interfaces: Vec<serde_json::Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let offload = i.offload.as_ref().filter(|o| o.known).map(|o| {
                    serde_json::json!({ "gro": o.gro, "gso": o.gso, "tso": o.tso, "lro": o.lro })
                });
                serde_json::json!({
                    "name": i.name,
                    "index": i.index,
                    "up": i.up,
                    "mac": i.mac,
                    "mtu": i.mtu,
                    "addresses": i.addresses,
                    "offload": offload,
                    "pcap": self.pcap_lists(&i.name),
                    "warning": offload_warning(i),
                })
            })
            .collect();
        let pcap_only: Vec<serde_json::Value> = self
            .pcap_only()
            .into_iter()
            .map(|d| serde_json::json!({ "name": d.name, "description": d.description }))
            .collect();
        serde_json::json!({
            "capture_permitted": self.capture_permitted,
            "interfaces": interfaces,
            "pcap_only": pcap_only,
            "pcap_error": self.pcap.as_ref().err(),
        })
    }

    /// An aligned table, then the pcap-only devices, capture permission and offload notes.
    pub fn table(&self) -> String {
        let header = [
            "NAME",
            "INDEX",
            "STATE",
            "MTU",
            "MAC",
            "OFFLOAD",
            "CAPTURE",
            "ADDRESSES",
        ];
        let mut rows: Vec<[String; 8]> = vec![header.map(String::from)];
        for i in &self.interfaces {
            let offload = match i.offload.as_ref().filter(|o| o.known) {
                None => "unknown".to_string(),
                Some(o) => match offloads_on(o) {
                    on if on.is_empty() => "off".to_string(),
                    on => on.join(","),
                },
            };
            // libpcap lists down interfaces too but refuses to capture on them until they are up.
            let capture = match (self.pcap_lists(&i.name), i.up, self.capture_permitted) {
                (None, _, _) => "?",
                (Some(false), _, _) => "no",
                (Some(true), false, _) => "when up",
                (Some(true), true, false) => "as root",
                (Some(true), true, true) => "yes",
            };
            let or_dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
            rows.push([
                i.name.clone(),
                i.index.to_string(),
                if i.up { "up" } else { "down" }.to_string(),
                i.mtu.to_string(),
                or_dash(i.mac.clone()),
                offload,
                capture.to_string(),
                or_dash(i.addresses.join(" ")),
            ]);
        }
        let mut widths = [0; 8];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (k, (cell, w)) in row.iter().zip(widths).enumerate() {
                if k > 0 {
                    line.push_str("  ");
                }
                line.push_str(&format!("{cell:<w$}"));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        match &self.pcap {
            Err(e) => out.push_str(&format!("\nlibpcap could not list devices: {e}\n")),
            Ok(_) => {
                let only = self.pcap_only();
                if !only.is_empty() {
                    out.push_str(
                        "\nOther libpcap devices (`any` captures on every interface at once, \
                         with cooked link headers):\n",
                    );
                    let w = only.iter().map(|d| d.name.len()).max().unwrap_or(0);
                    for d in only {
                        out.push_str(&format!("  {:<w$}  {}\n", d.name, d.description));
                    }
                }
            }
        }
        out.push_str(if self.capture_permitted {
            "\nCapture: permitted (root or CAP_NET_RAW).\n"
        } else {
            "\nCapture: not permitted for this process; the agent needs root or CAP_NET_RAW.\n"
        });
        let warnings: Vec<String> = self.interfaces.iter().filter_map(offload_warning).collect();
        if !warnings.is_empty() {
            out.push_str("\nOffloads:\n");
            for w in warnings {
                out.push_str(&format!("  {w}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_with_its_address() {
        let ifaces = interfaces();
        let lo = ifaces.iter().find(|i| i.name == "lo").expect("lo exists");
        assert!(lo.up);
        assert!(lo.addresses.iter().any(|a| a == "127.0.0.1/8"), "{lo:?}");
        assert!(lo.mtu > 0);
    }

    #[test]
    fn loopback_offload_flags_are_read() {
        // The legacy ethtool gets need no privilege and every netdev answers them from its
        // feature bits, so a failure here is a real bug, not an environment limit.
        let offload = read_offload("lo").unwrap_or_else(|e| panic!("lo: {e}"));
        assert!(offload.known);
        assert!(!offload.lro, "loopback never has LRO: {offload:?}");
        let lo = interfaces()
            .into_iter()
            .find(|i| i.name == "lo")
            .expect("lo exists");
        assert_eq!(lo.offload, Some(offload));
    }

    #[test]
    fn offload_of_a_missing_interface_names_it() {
        let err = read_offload("tgh-absent0").expect_err("no such interface");
        assert!(
            matches!(
                &err,
                OffloadError::Ioctl {
                    errno: Errno::ENODEV,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("tgh-absent0"), "{err}");
        assert!(matches!(
            read_offload("a-name-longer-than-15"),
            Err(OffloadError::Name(_))
        ));
        assert!(matches!(read_offload(""), Err(OffloadError::Name(_))));
    }

    fn iface(name: &str, offload: Option<proto::Offload>) -> proto::Interface {
        proto::Interface {
            name: name.into(),
            index: 2,
            mac: "02:00:00:00:00:01".into(),
            addresses: vec!["10.0.0.5/24".into()],
            mtu: 1500,
            up: true,
            offload,
        }
    }

    fn offload(gro: bool, gso: bool, tso: bool, lro: bool) -> Option<proto::Offload> {
        Some(proto::Offload {
            known: true,
            gro,
            gso,
            tso,
            lro,
        })
    }

    #[test]
    fn warning_names_the_offloads_on_and_how_to_disable_them() {
        assert_eq!(
            offload_warning(&iface("eth0", offload(true, false, true, false))).as_deref(),
            Some(
                "eth0 has GRO, TSO on: captured frames can exceed the MTU 1500 and cannot be \
                 reinjected; disable with `ethtool -K eth0 gro off tso off`"
            )
        );
        let lro = offload_warning(&iface("eth1", offload(false, false, false, true))).unwrap();
        assert!(lro.starts_with("eth1 has LRO on:") && lro.ends_with("`ethtool -K eth1 lro off`"));
    }

    #[test]
    fn no_warning_when_offloads_are_off_or_unknown() {
        assert_eq!(
            offload_warning(&iface("eth0", offload(false, false, false, false))),
            None
        );
        assert_eq!(
            offload_warning(&iface("eth0", Some(proto::Offload::default()))),
            None
        );
        assert_eq!(offload_warning(&iface("eth0", None)), None);
    }

    fn listing() -> Listing {
        let pcap = |name: &str, description: &str| PcapDevice {
            name: name.into(),
            description: description.into(),
        };
        let mut down = iface("veth9", Some(proto::Offload::default()));
        down.up = false;
        down.mac = String::new();
        down.addresses.clear();
        Listing {
            interfaces: vec![iface("eth0", offload(true, true, false, false)), down],
            pcap: Ok(vec![
                pcap("eth0", ""),
                pcap("veth9", ""),
                pcap("any", "Pseudo-device that captures on all interfaces"),
            ]),
            capture_permitted: false,
        }
    }

    #[test]
    fn json_has_one_object_per_interface_and_the_pcap_only_devices() {
        let json = listing().to_json();
        assert_eq!(
            json,
            serde_json::json!({
                "capture_permitted": false,
                "interfaces": [
                    {
                        "name": "eth0", "index": 2, "up": true, "mac": "02:00:00:00:00:01",
                        "mtu": 1500, "addresses": ["10.0.0.5/24"],
                        "offload": { "gro": true, "gso": true, "tso": false, "lro": false },
                        "pcap": true,
                        "warning": "eth0 has GRO, GSO on: captured frames can exceed the MTU 1500 \
                                    and cannot be reinjected; disable with \
                                    `ethtool -K eth0 gro off gso off`",
                    },
                    {
                        "name": "veth9", "index": 2, "up": false, "mac": "", "mtu": 1500,
                        "addresses": [], "offload": null, "pcap": true, "warning": null,
                    },
                ],
                "pcap_only": [
                    {
                        "name": "any",
                        "description": "Pseudo-device that captures on all interfaces",
                    },
                ],
                "pcap_error": null,
            })
        );
    }

    #[test]
    fn json_says_when_libpcap_could_not_list() {
        let mut l = listing();
        l.pcap = Err("socket: Operation not permitted".into());
        let json = l.to_json();
        assert_eq!(json["pcap_error"], "socket: Operation not permitted");
        assert_eq!(json["interfaces"][0]["pcap"], serde_json::Value::Null);
        assert_eq!(json["pcap_only"], serde_json::json!([]));
    }

    #[test]
    fn table_is_aligned_and_explains_capture() {
        let table = listing().table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            &lines[..3],
            [
                "NAME   INDEX  STATE  MTU   MAC                OFFLOAD  CAPTURE  ADDRESSES",
                "eth0   2      up     1500  02:00:00:00:00:01  gro,gso  as root  10.0.0.5/24",
                "veth9  2      down   1500  -                  unknown  when up  -",
            ]
        );
        assert!(
            table.contains(
                "
  any  Pseudo-device that captures on all interfaces
"
            ),
            "{table}"
        );
        assert!(table.contains("needs root or CAP_NET_RAW"), "{table}");
        assert!(
            table.contains(
                "
  eth0 has GRO, GSO on:"
            ),
            "{table}"
        );
    }
}
