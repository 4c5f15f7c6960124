//! Facts about this host for `Hello`: name, kernel, machine id and every interface with its
//! addresses, MAC and MTU.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;
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
                // Offload flags need the ethtool ioctl; read by the capture pipeline's issue.
                offload: Some(proto::Offload::default()),
            });
        entry.up |= ifa.flags.contains(InterfaceFlags::IFF_UP);
        if let Some(ip) = ifa.address.as_ref().and_then(ip_of) {
            let len = prefix_len(ifa.netmask.as_ref().and_then(ip_of));
            entry.addresses.push(format!("{ip}/{len}"));
        }
    }
    by_name.into_values().collect()
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
        }),
        started_at_unix_nanos: 0,
        machine_id: machine_id(),
        scope: proto::SnapshotScope::Own as i32,
        agent_id: String::new(),
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
}
