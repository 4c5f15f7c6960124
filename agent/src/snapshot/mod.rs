//! Connection snapshots: this network namespace's TCP and UDP sockets (or every namespace's, in
//! scope `all`), attributed to their processes and aggregated into the rows of the dependency map.
//!
//! One stage per file, in the order a snapshot runs them:
//! - [`reader`]: the [`Snapshotter`], which reads the socket tables of the scope ([`diag`] over
//!   netlink sock_diag, its socket in [`netlink`] as [`conntrack`]'s is, [`proc_net`] from
//!   `/proc/net`, namespaces through [`netns`]), finds the processes that hold them ([`procs`]),
//!   and the addresses of the namespaces it read;
//! - [`direction`]: which side of a connection a socket is, from the listeners of its namespace
//!   (the short-lived merge in `crate::report` asks it too);
//! - [`aggregate`]: one namespace's rows into [`Table`] entries and listeners;
//! - here: the table's types, and the [`Delta`] between two tables that is sent after the first.

mod aggregate;
pub mod closed;
pub mod conntrack;
mod diag;
pub mod direction;
mod netlink;
pub mod netns;
mod proc_net;
mod procs;
mod reader;
mod tcp_info;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

#[cfg(test)]
pub(crate) use aggregate::build;
pub use direction::Direction;
// ParseError is part of the interface, for callers that parse single lines; none does yet.
#[allow(unused_imports)]
pub use proc_net::{ParseError, Protocol, SocketRow, TcpState};
pub use reader::{ReadFailures, Reader, Scope, Snapshotter};
pub use tcp_info::TcpInfo;

/// One aggregated row: every socket with the same key counts into `sockets`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    /// The network namespace, in scope `all`: empty for the agent's own, else its name
    /// (see [`netns`]). Part of the key: `127.0.0.1` in two namespaces is two places.
    pub netns: String,
    pub direction: Direction,
    /// IPv4-mapped IPv6 is normalised to IPv4.
    pub local_ip: IpAddr,
    pub remote_ip: IpAddr,
    /// The remote port for `Client` rows, the local port for `Server` rows.
    pub server_port: u16,
    pub protocol: Protocol,
    /// Name and cmdline, not the pid, so restarts of a daemon do not churn.
    pub process: ProcessKey,
    /// The address a client dialled when the kernel translated it (conntrack DNAT): `remote_ip`
    /// and `server_port` are then the backend's.
    pub via: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ProcessKey {
    /// `comm`: at most 15 bytes, as the kernel keeps it.
    pub name: String,
    /// Arguments joined by spaces, at most 256 bytes.
    pub cmdline: String,
    /// Container or pod (see [`netns::container_of`]), in scope `all`; empty otherwise.
    pub container: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryValue {
    pub sockets: u32,
    pub pid: u32,
    /// Some socket of the entry has the controller's address as its remote endpoint.
    pub control_plane: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Listener {
    /// As [`EntryKey::netns`].
    pub netns: String,
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub process: ProcessKey,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub entries: BTreeMap<EntryKey, EntryValue>,
    /// Listener → lowest pid listening.
    pub listeners: BTreeMap<Listener, u32>,
    /// Addresses this host translates for clients elsewhere (see [`conntrack`]).
    pub nat_fronts: BTreeSet<conntrack::NatFront>,
    pub stats: Stats,
    /// Every connected TCP socket that came with its `tcp_info` (sock_diag reads), with its
    /// flow; not part of a [`Delta`]: `crate::traffic` turns them into increments.
    pub sockets: Vec<(Flow, TcpInfo)>,
}

/// The endpoints of an [`EntryKey`] without its process: what traffic is counted by. A flow's
/// sockets may belong to several processes, or to none visible.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flow {
    pub netns: String,
    pub direction: Direction,
    pub local_ip: IpAddr,
    pub remote_ip: IpAddr,
    pub server_port: u16,
}

/// Counters of one read; they describe the read, not the host, and are not part of a [`Delta`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Well-formed lines of the four tables.
    pub sockets_read: u64,
    /// Malformed lines skipped.
    pub bad_lines: u64,
    /// Connections and listeners left out because no visible process holds them.
    pub unattributed: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// New rows and rows whose value changed.
    pub upserts: Vec<(EntryKey, EntryValue)>,
    pub removed: Vec<EntryKey>,
    /// New listeners and listeners whose pid changed.
    pub listeners_added: Vec<(Listener, u32)>,
    pub listeners_removed: Vec<Listener>,
}

impl Delta {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.removed.is_empty()
            && self.listeners_added.is_empty()
            && self.listeners_removed.is_empty()
    }
}

/// What changed from `prev` to `next`, in key order; applying it to `prev` yields `next`'s
/// entries and listeners exactly. `stats` are left out: they describe one read, not state.
pub fn delta(prev: &Table, next: &Table) -> Delta {
    Delta {
        upserts: next
            .entries
            .iter()
            .filter(|(key, value)| prev.entries.get(key) != Some(value))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect(),
        removed: prev
            .entries
            .keys()
            .filter(|key| !next.entries.contains_key(key))
            .cloned()
            .collect(),
        listeners_added: next
            .listeners
            .iter()
            .filter(|(listener, pid)| prev.listeners.get(listener) != Some(pid))
            .map(|(listener, pid)| (listener.clone(), *pid))
            .collect(),
        listeners_removed: prev
            .listeners
            .keys()
            .filter(|listener| !next.listeners.contains_key(listener))
            .cloned()
            .collect(),
    }
}

/// Applies a delta: removals first, then upserts. Leaves `stats` as they were.
#[cfg(test)]
pub fn apply(table: &mut Table, delta: &Delta) {
    for key in &delta.removed {
        table.entries.remove(key);
    }
    for (key, value) in &delta.upserts {
        table.entries.insert(key.clone(), value.clone());
    }
    for listener in &delta.listeners_removed {
        table.listeners.remove(listener);
    }
    for (listener, pid) in &delta.listeners_added {
        table.listeners.insert(listener.clone(), *pid);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read socket table {path}: {source}")]
    ReadTable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot list processes in {path}: {source}")]
    ListProcesses {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    //! Also the row builders the tests of the other stages share.
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    pub(super) fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    pub(super) fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    pub(super) fn process(name: &str) -> ProcessKey {
        ProcessKey {
            name: name.into(),
            cmdline: format!("/usr/bin/{name}"),
            container: String::new(),
        }
    }

    pub(super) fn row(
        protocol: Protocol,
        local: &str,
        remote: &str,
        state: TcpState,
        inode: u64,
    ) -> SocketRow {
        SocketRow {
            protocol,
            local: sa(local),
            remote: sa(remote),
            state,
            uid: 0,
            inode,
            tcp: None,
        }
    }

    pub(super) fn tcp(local: &str, remote: &str, state: TcpState, inode: u64) -> SocketRow {
        row(Protocol::Tcp, local, remote, state, inode)
    }

    pub(super) fn udp(local: &str, remote: &str, inode: u64) -> SocketRow {
        let state = if remote.ends_with(":0") {
            TcpState::Close
        } else {
            TcpState::Established
        };
        row(Protocol::Udp, local, remote, state, inode)
    }

    /// Every inode belongs to pid 7, "app".
    pub(super) fn build_one(rows: &[SocketRow]) -> Table {
        let app = process("app");
        build(rows, "", |_| Some((7, &app)), &[])
    }

    pub(super) fn directions(table: &Table) -> Vec<(Direction, Protocol, IpAddr, u16)> {
        table
            .entries
            .keys()
            .map(|k| (k.direction, k.protocol, k.local_ip, k.server_port))
            .collect()
    }

    /// A random table over a small universe, so pairs share, drop and change rows.
    fn random_table(next: &mut impl FnMut() -> u64) -> Table {
        let mut table = Table::default();
        for _ in 0..(next() % 24) {
            let key = EntryKey {
                netns: String::new(),
                direction: if next() % 2 == 1 {
                    Direction::Server
                } else {
                    Direction::Client
                },
                local_ip: ip("10.0.0.1"),
                remote_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 1, (next() % 3) as u8)),
                server_port: [80, 443, 5432][(next() % 3) as usize],
                protocol: if next() % 4 == 3 {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                process: process(["a", "b"][(next() % 2) as usize]),
                via: None,
            };
            let value = EntryValue {
                sockets: (next() % 4 + 1) as u32,
                pid: (next() % 3 + 1) as u32,
                control_plane: next() % 5 == 4,
            };
            table.entries.insert(key, value);
        }
        for _ in 0..(next() % 6) {
            let listener = Listener {
                netns: String::new(),
                ip: ["0.0.0.0", "::", "127.0.0.1"][(next() % 3) as usize]
                    .parse()
                    .unwrap(),
                port: [22, 80][(next() % 2) as usize],
                protocol: Protocol::Tcp,
                process: process(["a", "b"][(next() % 2) as usize]),
            };
            table.listeners.insert(listener, (next() % 3 + 1) as u32);
        }
        table.stats.sockets_read = next() % 100;
        table
    }

    #[test]
    fn delta_applied_to_prev_yields_next() {
        // Seeded: every run tries the same inputs.
        let mut rng =
            <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0x2545_F491_4F6C_DD1D);
        let mut next = move || rand::Rng::random::<u64>(&mut rng);
        let mut pairs = vec![
            (Table::default(), random_table(&mut next)),
            (random_table(&mut next), Table::default()),
        ];
        let same = random_table(&mut next);
        pairs.push((same.clone(), same));
        for _ in 0..300 {
            pairs.push((random_table(&mut next), random_table(&mut next)));
        }
        for (prev, next_table) in pairs {
            let d = delta(&prev, &next_table);
            let mut applied = prev.clone();
            apply(&mut applied, &d);
            assert_eq!(applied.entries, next_table.entries);
            assert_eq!(applied.listeners, next_table.listeners);
            assert_eq!(applied.stats, prev.stats);
            let unchanged =
                prev.entries == next_table.entries && prev.listeners == next_table.listeners;
            assert_eq!(d.is_empty(), unchanged);
            assert!(delta(&next_table, &next_table).is_empty());
        }
    }
}
