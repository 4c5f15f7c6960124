//! Connection snapshots: this network namespace's TCP and UDP sockets, attributed to their
//! processes and aggregated into the rows of the dependency map.
//!
//! - **Scope.** The tables are `PROC/net/{tcp,tcp6,udp,udp6}`: with the real `/proc`, the
//!   namespace of the agent process (`/proc/net` is `/proc/self/net`, the thread-group
//!   leader's; a thread that `setns()`es must read `/proc/thread-self/net` instead). Only
//!   inodes from these tables are ever attributed, so sockets of other namespaces are never
//!   reported, even though their processes are visible. That is scope `own`, the default. In
//!   scope `all` (container hosts) the tables of every namespace a process is in are read from
//!   `PROC/PID/net` of one of its processes ([`netns`]), direction is inferred within each
//!   namespace, and rows carry the namespace's name and their process's container.
//! - **Direction.** A TCP socket is the `Server` side when its local port is listened on, in
//!   this namespace, on its own local address or a wildcard: `0.0.0.0` covers IPv4, `::` covers
//!   both (dual-stack; `IPV6_V6ONLY` cannot be seen in the tables). Anything else is `Client`.
//!   For UDP, a bound but unconnected socket is a listener, and a connected socket is `Server`
//!   when a UDP listener covers its local port the same way. A connection whose listener has
//!   since closed reads as `Client`.
//! - **What becomes a row.** LISTEN sockets and unconnected UDP sockets become `listeners`,
//!   never entries. Every other TCP state that has a peer is an entry, SYN_SENT included (a
//!   dependency that is failing is still a dependency). Loopback is kept: the controller
//!   decides what to show.
//! - **Sockets without a process.** TIME_WAIT, orphaned FIN_WAIT, and accepted-but-not-yet-
//!   `accept()`ed sockets have inode 0: no file, so no process. They, and sockets whose inode no
//!   visible process holds, are counted in `stats.unattributed` and left out of `entries` and
//!   `listeners`: every row names a real process, and a flow that is still open shows up
//!   through the socket that has one. Their listeners still decide direction.
//! - **Aggregation.** One entry per [`EntryKey`]; the process is keyed by name and cmdline so a
//!   restart does not churn, and `pid` is the lowest pid that holds a socket of the entry.

mod diag;
pub mod netns;
mod proc_net;
mod procs;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

// ParseError is part of the interface, for callers that parse single lines; none does yet.
#[allow(unused_imports)]
pub use proc_net::{ParseError, Protocol, SocketRow, TcpState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Client,
    Server,
}

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
    pub stats: Stats,
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

const TABLES: [(&str, Protocol, bool); 4] = [
    ("tcp", Protocol::Tcp, false),
    ("tcp6", Protocol::Tcp, true),
    ("udp", Protocol::Udp, false),
    ("udp6", Protocol::Udp, true),
];

/// Which sockets a snapshot covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// The agent's own network namespace: a VM, or one host among namespaces sharing a kernel.
    #[default]
    Own,
    /// Every network namespace some process is in, for container hosts; rows carry their
    /// namespace and container.
    All,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "own" => Ok(Scope::Own),
            "all" => Ok(Scope::All),
            other => Err(format!(
                "`{other}` is not a snapshot scope: use `own` (this network namespace) or `all` (every namespace, for container hosts)"
            )),
        }
    }
}

/// How socket tables are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reader {
    /// Netlink sock_diag ([`diag`]), with `/proc` for a table it cannot dump: about 2.4× faster.
    #[default]
    Netlink,
    /// The text tables under `/proc/net` only (and the only choice for a fixture tree).
    Proc,
}

impl std::str::FromStr for Reader {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "netlink" => Ok(Reader::Netlink),
            "proc" => Ok(Reader::Proc),
            other => Err(format!(
                "`{other}` is not a table reader: use `netlink` (sock_diag) or `proc` (/proc/net)"
            )),
        }
    }
}

/// One namespace's socket tables, as one read found them.
struct Space {
    /// Empty for the agent's own namespace.
    tag: String,
    rows: Vec<SocketRow>,
}

/// Reads connection tables; keeps the inode → process cache between reads.
#[derive(Debug)]
pub struct Snapshotter {
    proc_root: PathBuf,
    scope: Scope,
    control_plane: Option<SocketAddr>,
    processes: procs::ProcessTable,
    /// Reused between tables and snapshots: a busy table is megabytes.
    buf: Vec<u8>,
    reader: Reader,
    /// sock_diag sockets by namespace inode (0: the agent's own), kept between snapshots.
    diag: HashMap<u64, diag::DiagReader>,
    /// Tables sock_diag could not dump, already logged: `(namespace inode, table)`.
    diag_failed: HashSet<(u64, &'static str)>,
    /// Scope `all`: the other namespaces the last snapshot read, with the pid it read them through.
    others: Vec<(netns::Namespace, u32)>,
}

impl Snapshotter {
    /// `proc_root` is normally "/proc" (tests may point it at a fixture tree).
    /// `control_plane`: the controller's address; rows whose remote endpoint is it get
    /// `control_plane = true`.
    #[cfg(test)]
    pub fn new(proc_root: PathBuf, control_plane: Option<SocketAddr>) -> Self {
        Self::with_scope(proc_root, control_plane, Scope::Own)
    }

    pub fn with_scope(proc_root: PathBuf, control_plane: Option<SocketAddr>, scope: Scope) -> Self {
        Self {
            processes: procs::ProcessTable::new(proc_root.clone(), scope == Scope::All),
            proc_root,
            scope,
            control_plane,
            buf: Vec::new(),
            reader: Reader::default(),
            diag: HashMap::new(),
            diag_failed: HashSet::new(),
            others: Vec::new(),
        }
    }

    /// Chooses the table reader; fixture trees (a proc root other than `/proc`) always use
    /// [`Reader::Proc`].
    pub fn with_reader(mut self, reader: Reader) -> Self {
        self.reader = reader;
        self
    }

    /// Scope `all`: the other network namespaces the last snapshot read, each with a pid in it.
    pub fn other_namespaces(&self) -> &[(netns::Namespace, u32)] {
        &self.others
    }

    /// Reads the TCP and UDP sockets (v4 and v6) of the scope with their owning processes,
    /// infers direction per namespace, aggregates. Never panics on odd input: bad lines are
    /// counted in stats.
    pub fn take(&mut self) -> Result<Table, SnapshotError> {
        let mut bad_lines = 0;
        let spaces = match self.scope {
            Scope::Own => {
                let dir = self.proc_root.join("net");
                vec![Space {
                    tag: String::new(),
                    rows: self.read_tables(&dir, &mut bad_lines, None)?,
                }]
            }
            Scope::All => self.read_all(&mut bad_lines)?,
        };
        let mut wanted: Vec<u64> = spaces
            .iter()
            .flat_map(|space| &space.rows)
            .filter(|row| row.inode != 0 && role(row) != Role::Ignored)
            .map(|row| row.inode)
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let resolution =
            self.processes
                .resolve(&wanted)
                .map_err(|source| SnapshotError::ListProcesses {
                    path: self.proc_root.clone(),
                    source,
                })?;
        let processes = &self.processes;
        let owner = |inode| {
            let pid = *resolution.owners.get(&inode)?;
            Some((pid, processes.process(pid)?))
        };
        let mut table = Table::default();
        for space in &spaces {
            let part = build(&space.rows, &space.tag, owner, self.control_plane);
            table.entries.extend(part.entries);
            table.listeners.extend(part.listeners);
            table.stats.sockets_read += part.stats.sockets_read;
            table.stats.unattributed += part.stats.unattributed;
        }
        table.stats.bad_lines = bad_lines;
        let r = &resolution.stats;
        tracing::debug!(
            namespaces = spaces.len(),
            sockets = table.stats.sockets_read,
            entries = table.entries.len(),
            listeners = table.listeners.len(),
            unattributed = table.stats.unattributed,
            bad_lines,
            verified = r.verified,
            stale = r.stale,
            pids_scanned = r.pids_scanned,
            links_read = r.links_read,
            "connection snapshot"
        );
        Ok(table)
    }

    /// Scope `all`: the tables of every namespace, through `/proc/PID/net` of one of its
    /// processes. A namespace that vanishes between listing and reading is skipped; only the
    /// agent's own tables failing is an error.
    fn read_all(&mut self, bad_lines: &mut u64) -> Result<Vec<Space>, SnapshotError> {
        let own = netns::inode_of(&self.proc_root.join("self/ns/net")).map_err(|source| {
            SnapshotError::ReadTable {
                path: self.proc_root.join("self/ns/net"),
                source,
            }
        })?;
        let list = netns::list(&self.proc_root).map_err(|source| SnapshotError::ListProcesses {
            path: self.proc_root.clone(),
            source,
        })?;
        let mut spaces = Vec::with_capacity(list.len());
        let spaces_inodes: Vec<u64> = list.iter().map(|ns| ns.inode).collect();
        self.others.clear();
        for ns in list {
            let mine = ns.inode == own;
            // Through the lowest pid in it, or the next should that one exit meanwhile.
            let mut read = None;
            for pid in std::iter::once(ns.pid).chain(ns.others.iter().copied()) {
                let dir = netns::net_dir(&self.proc_root, pid);
                let key = (!mine).then_some((ns.inode, pid));
                let ns_link = self.proc_root.join(pid.to_string()).join("ns/net");
                match self.read_tables(&dir, bad_lines, key) {
                    // Still there: a pid reused meanwhile would have shown another namespace.
                    Ok(rows) if netns::inode_of(&ns_link).is_ok_and(|i| i == ns.inode) => {
                        read = Some(Ok((rows, pid)));
                        break;
                    }
                    Ok(_) => {
                        read = Some(Err(SnapshotError::ReadTable {
                            path: ns_link,
                            source: io::Error::other("the process left the namespace"),
                        }))
                    }
                    Err(e) => read = Some(Err(e)),
                }
            }
            match read {
                Some(Ok((rows, pid))) => {
                    spaces.push(Space {
                        tag: if mine { String::new() } else { ns.name.clone() },
                        rows,
                    });
                    if !mine {
                        self.others.push((ns, pid));
                    }
                }
                Some(Err(e)) if mine => return Err(e),
                Some(Err(e)) => {
                    tracing::debug!(namespace = %ns.name, error = %e, "namespace gone before its tables were read")
                }
                None => {}
            }
        }
        // Sockets of namespaces that are gone are closed.
        let live: HashSet<u64> = spaces_inodes.into_iter().collect();
        self.diag
            .retain(|inode, _| *inode == 0 || live.contains(inode));
        self.diag_failed
            .retain(|(inode, _)| *inode == 0 || live.contains(inode));
        Ok(spaces)
    }

    /// The sock_diag socket of a namespace (`None`: the agent's own; else its inode and a pid in
    /// it), opened on first use. `None` when netlink is not to be used or cannot be.
    fn diag_reader(&mut self, ns: Option<(u64, u32)>) -> Option<&mut diag::DiagReader> {
        if self.reader != Reader::Netlink || self.proc_root != std::path::Path::new("/proc") {
            return None;
        }
        let inode = ns.map_or(0, |(inode, _)| inode);
        if !self.diag.contains_key(&inode) {
            let opened = match ns {
                None => diag::DiagReader::open(),
                Some((inode, pid)) => netns::open_checked(&self.proc_root, pid, inode)
                    .and_then(|file| diag::DiagReader::open_in(&file)),
            };
            match opened {
                Ok(reader) => {
                    self.diag.insert(inode, reader);
                }
                Err(error) => {
                    if self.diag_failed.insert((inode, "open")) {
                        tracing::warn!(namespace = inode, %error, "no netlink sock_diag socket; reading /proc/net instead");
                    }
                    return None;
                }
            }
        }
        self.diag.get_mut(&inode)
    }

    /// The four tables of a namespace: over sock_diag where it works, else from the text tables
    /// under `dir` (a `net` directory of the proc root).
    fn read_tables(
        &mut self,
        dir: &std::path::Path,
        bad_lines: &mut u64,
        ns: Option<(u64, u32)>,
    ) -> Result<Vec<SocketRow>, SnapshotError> {
        let mut rows = Vec::new();
        let inode = ns.map_or(0, |(inode, _)| inode);
        for (name, protocol, v6) in TABLES {
            if let Some(reader) = self.diag_reader(ns) {
                match reader.read_table(diag::Table::new(protocol, v6), &mut rows) {
                    Ok(_) => continue,
                    Err(error) => {
                        if self.diag_failed.insert((inode, name)) {
                            tracing::warn!(table = name, namespace = inode, %error, "sock_diag cannot dump this table; reading it from /proc/net");
                        }
                    }
                }
            }
            let path = dir.join(name);
            self.buf.clear();
            match File::open(&path).and_then(|mut f| f.read_to_end(&mut self.buf)) {
                Ok(_) => {}
                // A kernel booted with ipv6.disable=1 has no v6 tables.
                Err(e) if v6 && e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(SnapshotError::ReadTable { path, source }),
            }
            let (mut parsed, bad) =
                proc_net::parse(&String::from_utf8_lossy(&self.buf), protocol, v6);
            rows.append(&mut parsed);
            *bad_lines += bad;
        }
        Ok(rows)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Listener,
    Connection,
    Ignored,
}

fn role(row: &SocketRow) -> Role {
    match row.protocol {
        Protocol::Tcp => match row.state {
            TcpState::Listen => Role::Listener,
            // No peer (CLOSE, bound only), or a state this code does not know.
            TcpState::Close | TcpState::BoundInactive | TcpState::Unknown(_) => Role::Ignored,
            _ => Role::Connection,
        },
        Protocol::Udp if row.local.port() == 0 => Role::Ignored,
        Protocol::Udp if row.is_unconnected() => Role::Listener,
        Protocol::Udp => Role::Connection,
    }
}

/// Listening `(protocol, ip, port)`s of one read, kept whether or not a process owns them.
struct Listening(HashSet<(Protocol, IpAddr, u16)>);

impl Listening {
    fn covers(&self, protocol: Protocol, local: SocketAddr) -> bool {
        let (ip, port) = (local.ip(), local.port());
        self.0.contains(&(protocol, ip, port))
            || (ip.is_ipv4()
                && self
                    .0
                    .contains(&(protocol, IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)))
            || self
                .0
                .contains(&(protocol, IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
    }
}

/// Builds the table from parsed rows; `owner` maps an inode to the pid and process holding it.
fn build<'a>(
    rows: &[SocketRow],
    netns: &str,
    owner: impl Fn(u64) -> Option<(u32, &'a ProcessKey)>,
    control_plane: Option<SocketAddr>,
) -> Table {
    let control_plane = control_plane.map(|cp| SocketAddr::new(cp.ip().to_canonical(), cp.port()));
    let listening = Listening(
        rows.iter()
            .filter(|row| role(row) == Role::Listener)
            .map(|row| (row.protocol, row.local.ip(), row.local.port()))
            .collect(),
    );
    let mut table = Table::default();
    table.stats.sockets_read = rows.len() as u64;
    // Grouped by pid first, so a process key is cloned once per group, not once per socket.
    type Group = (Direction, IpAddr, IpAddr, u16, Protocol, u32);
    let mut groups: HashMap<Group, (u32, bool, &ProcessKey)> = HashMap::new();
    for row in rows {
        let role = role(row);
        if role == Role::Ignored {
            continue;
        }
        let Some((pid, process)) = (row.inode != 0).then(|| owner(row.inode)).flatten() else {
            table.stats.unattributed += 1;
            continue;
        };
        if role == Role::Listener {
            let listener = Listener {
                netns: netns.to_string(),
                ip: row.local.ip(),
                port: row.local.port(),
                protocol: row.protocol,
                process: process.clone(),
            };
            let lowest = table.listeners.entry(listener).or_insert(pid);
            *lowest = (*lowest).min(pid);
            continue;
        }
        let (direction, server_port) = if listening.covers(row.protocol, row.local) {
            (Direction::Server, row.local.port())
        } else {
            (Direction::Client, row.remote.port())
        };
        let group = groups
            .entry((
                direction,
                row.local.ip(),
                row.remote.ip(),
                server_port,
                row.protocol,
                pid,
            ))
            .or_insert((0, false, process));
        group.0 = group.0.saturating_add(1);
        group.1 |= control_plane == Some(row.remote);
    }
    for ((direction, local_ip, remote_ip, server_port, protocol, pid), (sockets, cp, process)) in
        groups
    {
        let key = EntryKey {
            netns: netns.to_string(),
            direction,
            local_ip,
            remote_ip,
            server_port,
            protocol,
            process: process.clone(),
        };
        let value = table.entries.entry(key).or_insert(EntryValue {
            sockets: 0,
            pid,
            control_plane: false,
        });
        value.sockets = value.sockets.saturating_add(sockets);
        value.pid = value.pid.min(pid);
        value.control_plane |= cp;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::procs::tests::FakeProc;
    use std::net::{TcpListener, TcpStream};

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn process(name: &str) -> ProcessKey {
        ProcessKey {
            name: name.into(),
            cmdline: format!("/usr/bin/{name}"),
            container: String::new(),
        }
    }

    fn row(
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
        }
    }

    fn tcp(local: &str, remote: &str, state: TcpState, inode: u64) -> SocketRow {
        row(Protocol::Tcp, local, remote, state, inode)
    }

    fn udp(local: &str, remote: &str, inode: u64) -> SocketRow {
        let state = if remote.ends_with(":0") {
            TcpState::Close
        } else {
            TcpState::Established
        };
        row(Protocol::Udp, local, remote, state, inode)
    }

    /// Every inode belongs to pid 7, "app".
    fn build_one(rows: &[SocketRow]) -> Table {
        let app = process("app");
        build(rows, "", |_| Some((7, &app)), None)
    }

    fn directions(table: &Table) -> Vec<(Direction, Protocol, IpAddr, u16)> {
        table
            .entries
            .keys()
            .map(|k| (k.direction, k.protocol, k.local_ip, k.server_port))
            .collect()
    }

    #[test]
    fn wildcard_listener_makes_server_rows() {
        use Direction::*;
        use TcpState::*;
        let table = build_one(&[
            tcp("0.0.0.0:80", "0.0.0.0:0", Listen, 1),
            tcp("10.0.0.1:80", "10.0.0.9:50000", Established, 2),
            tcp("10.0.0.1:50001", "10.0.0.2:443", Established, 3),
        ]);
        assert_eq!(
            directions(&table),
            vec![
                (Client, Protocol::Tcp, ip("10.0.0.1"), 443),
                (Server, Protocol::Tcp, ip("10.0.0.1"), 80),
            ]
        );
        assert_eq!(table.listeners.len(), 1);
    }

    #[test]
    fn specific_listener_covers_only_its_address() {
        use Direction::*;
        use TcpState::*;
        let table = build_one(&[
            tcp("127.0.0.1:8080", "0.0.0.0:0", Listen, 1),
            tcp("127.0.0.1:8080", "127.0.0.1:40000", Established, 2),
            // Same port on another address: not this listener's.
            tcp("10.0.0.1:8080", "10.0.0.2:443", Established, 3),
        ]);
        assert_eq!(
            directions(&table),
            vec![
                (Client, Protocol::Tcp, ip("10.0.0.1"), 443),
                (Server, Protocol::Tcp, ip("127.0.0.1"), 8080),
            ]
        );
    }

    #[test]
    fn v6_wildcard_covers_v4_but_not_the_reverse() {
        use Direction::*;
        use TcpState::*;
        let table = build_one(&[
            tcp("[::]:22", "[::]:0", Listen, 1),
            tcp("10.0.0.1:22", "10.0.0.5:60000", Established, 2),
            tcp("[fd00::2]:22", "[fd00::5]:60000", Established, 3),
            tcp("0.0.0.0:53", "0.0.0.0:0", Listen, 4),
            tcp("[fd00::2]:53", "[fd00::5]:60001", Established, 5),
        ]);
        assert_eq!(
            directions(&table),
            vec![
                (Client, Protocol::Tcp, ip("fd00::2"), 60001),
                (Server, Protocol::Tcp, ip("10.0.0.1"), 22),
                (Server, Protocol::Tcp, ip("fd00::2"), 22),
            ]
        );
    }

    #[test]
    fn udp_bound_sockets_are_listeners_and_make_connected_ones_servers() {
        use Direction::*;
        let table = build_one(&[
            udp("0.0.0.0:53", "0.0.0.0:0", 1),
            udp("10.0.0.1:53", "10.0.0.7:33333", 2),
            udp("10.0.0.1:40000", "10.0.0.53:53", 3),
            // A TCP listener says nothing about UDP.
            tcp("0.0.0.0:443", "0.0.0.0:0", TcpState::Listen, 4),
            udp("10.0.0.1:443", "10.0.0.8:50000", 5),
        ]);
        assert_eq!(
            directions(&table),
            vec![
                // Sorted by remote address: 10.0.0.8 before 10.0.0.53.
                (Client, Protocol::Udp, ip("10.0.0.1"), 50000),
                (Client, Protocol::Udp, ip("10.0.0.1"), 53),
                (Server, Protocol::Udp, ip("10.0.0.1"), 53),
            ]
        );
        let udp_listeners: Vec<_> = table
            .listeners
            .keys()
            .filter(|l| l.protocol == Protocol::Udp)
            .map(|l| (l.ip, l.port))
            .collect();
        assert_eq!(udp_listeners, vec![(ip("0.0.0.0"), 53)]);
    }

    #[test]
    fn ephemeral_connections_collapse_into_one_entry() {
        let (a, b) = (process("worker"), process("other"));
        let mut rows: Vec<SocketRow> = (0..10_000u64)
            .map(|i| {
                tcp(
                    &format!("10.0.0.1:{}", 30_000 + i),
                    "10.0.0.2:5432",
                    TcpState::Established,
                    1000 + i,
                )
            })
            .collect();
        rows.push(tcp(
            "10.0.0.1:29999",
            "10.0.0.2:5432",
            TcpState::Established,
            99,
        ));
        // Two pids of one program share an entry and report the lower pid; another program
        // gets its own.
        let table = build(
            &rows,
            "",
            |inode| match inode {
                99 => Some((3, &b)),
                i if i % 2 == 0 => Some((40, &a)),
                _ => Some((41, &a)),
            },
            None,
        );
        let values: Vec<_> = table
            .entries
            .iter()
            .map(|(k, v)| (k.process.name.as_str(), k.server_port, v.sockets, v.pid))
            .collect();
        assert_eq!(
            values,
            vec![("other", 5432, 1, 3), ("worker", 5432, 10_000, 40)]
        );
    }

    #[test]
    fn sockets_without_a_visible_process_are_counted_not_reported() {
        use TcpState::*;
        let app = process("app");
        let rows = [
            tcp("0.0.0.0:2049", "0.0.0.0:0", Listen, 0), // kernel listener (nfsd)
            tcp("10.0.0.1:2049", "10.0.0.3:700", Established, 0),
            tcp("10.0.0.1:40000", "10.0.0.2:80", TimeWait, 0),
            tcp("10.0.0.1:40001", "10.0.0.2:80", Established, 55), // nobody visible holds 55
            tcp("10.0.0.1:40002", "10.0.0.2:80", Established, 56),
            tcp("10.0.0.1:40003", "0.0.0.0:0", Close, 57),
        ];
        let table = build(&rows, "", |inode| (inode == 56).then_some((9, &app)), None);
        assert_eq!(table.stats.unattributed, 4);
        assert_eq!(table.stats.sockets_read, 6);
        assert_eq!(table.entries.len(), 1);
        assert!(table.listeners.is_empty());
    }

    #[test]
    fn control_plane_rows_are_marked() {
        use TcpState::*;
        let rows = [
            tcp("10.0.0.1:40000", "10.0.0.5:7443", Established, 1),
            tcp("10.0.0.1:40001", "10.0.0.5:7444", Established, 2),
            tcp("10.0.0.1:40002", "10.0.0.6:7443", Established, 3),
        ];
        let app = process("agent");
        // Given as IPv4-mapped, as a dual-stack resolver may hand it over.
        let cp = Some(sa("[::ffff:10.0.0.5]:7443"));
        let table = build(&rows, "", |_| Some((1, &app)), cp);
        let marked: Vec<_> = table
            .entries
            .iter()
            .map(|(k, v)| (k.remote_ip, k.server_port, v.control_plane))
            .collect();
        assert_eq!(
            marked,
            vec![
                (ip("10.0.0.5"), 7443, true),
                (ip("10.0.0.5"), 7444, false),
                (ip("10.0.0.6"), 7443, false),
            ]
        );
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

    /// The fixture tables read through a fake /proc whose one process holds every socket of
    /// the capture except 1223 (a listener on :2024 of another program on the capture host).
    #[cfg(target_endian = "little")]
    fn fixture_host() -> FakeProc {
        let fake = FakeProc::new();
        let net = fake.root().join("net");
        std::fs::create_dir_all(&net).unwrap();
        for name in ["tcp", "tcp6", "udp", "udp6"] {
            let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/snapshot/fixtures")
                .join(name);
            std::fs::copy(from, net.join(name)).unwrap();
        }
        fake.spawn(4242, "python3", 100, &["python3", "capture.py"]);
        let inodes = [
            84985, 84986, 84987, 84988, 84991, 86017, 86018, 86019, 86020, 86021, 86022, 86023,
            86024, 86025, 86026, 86027, 86028, 86029, 86030, 86031, 86032, 86033, 86034, 86035,
        ];
        for (fd, inode) in (3..).zip(inodes) {
            fake.open(4242, fd, inode);
        }
        fake
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn fixture_capture_gives_the_expected_table() {
        use Direction::*;
        let fake = fixture_host();
        let table = Snapshotter::new(fake.root(), Some(sa("127.0.0.1:37877")))
            .take()
            .unwrap();
        let py = ProcessKey {
            name: "python3".into(),
            cmdline: "python3 capture.py".into(),
            container: String::new(),
        };
        let entry = |direction, local: &str, remote: &str, port, protocol, sockets, cp| {
            (
                EntryKey {
                    netns: String::new(),
                    direction,
                    local_ip: ip(local),
                    remote_ip: ip(remote),
                    server_port: port,
                    protocol,
                    process: py.clone(),
                },
                EntryValue {
                    sockets,
                    pid: 4242,
                    control_plane: cp,
                },
            )
        };
        let (lo, lo6, tcp, udp) = ("127.0.0.1", "::1", Protocol::Tcp, Protocol::Udp);
        let expected: BTreeMap<_, _> = [
            // ESTABLISHED, CLOSE_WAIT, and the AF_INET6 socket that dialled ::ffff:127.0.0.1.
            entry(Client, lo, lo, 37877, tcp, 3, true),
            entry(Client, lo, lo, 43755, tcp, 1, false),
            // One that completed into a full accept queue, two stuck in SYN_SENT behind it.
            entry(Client, lo, lo, 51323, tcp, 3, false),
            entry(Client, lo6, lo6, 43755, tcp, 1, false),
            entry(Server, lo, lo, 37877, tcp, 2, false),
            // Accepted on [::]:43755 from an IPv4 client.
            entry(Server, lo, lo, 43755, tcp, 1, false),
            entry(Server, lo6, lo6, 43755, tcp, 1, false),
            entry(Client, lo, lo, 40753, udp, 2, false),
            entry(Client, lo6, lo6, 57230, udp, 1, false),
            // Connected, on the port of the 0.0.0.0:33464 UDP listener.
            entry(Server, lo, lo, 33464, udp, 1, false),
        ]
        .into_iter()
        .collect();
        assert_eq!(table.entries, expected);
        let listeners: Vec<_> = table
            .listeners
            .iter()
            .map(|(l, pid)| (l.protocol, SocketAddr::new(l.ip, l.port), *pid))
            .collect();
        assert_eq!(
            listeners,
            vec![
                (udp, sa("0.0.0.0:33464"), 4242),
                (tcp, sa("0.0.0.0:38449"), 4242),
                (tcp, sa("127.0.0.1:37877"), 4242),
                (udp, sa("127.0.0.1:40753"), 4242),
                (tcp, sa("127.0.0.1:51323"), 4242),
                (tcp, sa("[::]:43755"), 4242),
                (udp, sa("[::]:57230"), 4242),
                (tcp, sa("[::1]:57225"), 4242),
            ]
        );
        // FIN_WAIT2, TIME_WAIT, the unaccepted connection (inode 0), and :2024's listener.
        assert_eq!(
            table.stats,
            Stats {
                sockets_read: 28,
                bad_lines: 0,
                unattributed: 4,
            }
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn a_garbled_table_costs_its_bad_lines_only() {
        let fake = fixture_host();
        let tcp = fake.root().join("net/tcp");
        let text = std::fs::read_to_string(&tcp).unwrap();
        let garbled: String = text
            .lines()
            .enumerate()
            .map(|(i, line)| match i {
                3 => format!("{}\n", &line[..20]),
                5 => format!("{}\n", line.replacen(':', "#", 2)),
                _ => format!("{line}\n"),
            })
            .collect();
        std::fs::write(&tcp, garbled).unwrap();
        std::fs::remove_file(fake.root().join("net/udp6")).unwrap();
        let mut snapshotter = Snapshotter::new(fake.root(), None);
        // A missing v4 table is an error; a missing v6 table means IPv6 is off.
        let table = snapshotter.take().unwrap();
        assert_eq!(table.stats.bad_lines, 2);
        assert_eq!(table.stats.sockets_read, 28 - 2 - 3);
        std::fs::remove_file(fake.root().join("net/udp")).unwrap();
        let err = snapshotter.take().unwrap_err();
        assert!(matches!(err, SnapshotError::ReadTable { .. }), "{err}");
    }

    /// On the live host: a listener and two clients of this test process.
    #[test]
    fn sees_its_own_loopback_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let _clients = [
            TcpStream::connect(("127.0.0.1", port)).unwrap(),
            TcpStream::connect(("127.0.0.1", port)).unwrap(),
        ];
        let _accepted = [listener.accept().unwrap(), listener.accept().unwrap()];
        let me = std::process::id();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let comm = procs::parse_stat(&stat).unwrap().comm;
        // A test binary's name is longer than the kernel's 15-byte comm: argv0 completes it.
        let name = procs::full_name(&comm, &std::fs::read("/proc/self/cmdline").unwrap());

        let mut snapshotter = Snapshotter::new(PathBuf::from("/proc"), None);
        for _ in 0..2 {
            // The second take answers from the warm cache.
            let table = snapshotter.take().unwrap();
            let ours: Vec<_> = table
                .entries
                .iter()
                .filter(|(k, _)| k.protocol == Protocol::Tcp && k.server_port == port)
                .map(|(k, v)| {
                    (
                        k.direction,
                        k.local_ip,
                        k.remote_ip,
                        k.process.name.as_str(),
                        v.sockets,
                        v.pid,
                    )
                })
                .collect();
            let lo = ip("127.0.0.1");
            assert_eq!(
                ours,
                vec![
                    (Direction::Client, lo, lo, name.as_str(), 2, me),
                    (Direction::Server, lo, lo, name.as_str(), 2, me),
                ]
            );
            let listening: Vec<_> = table
                .listeners
                .iter()
                .filter(|(l, _)| l.protocol == Protocol::Tcp && l.port == port)
                .map(|(l, pid)| (l.ip, l.process.name.as_str(), *pid))
                .collect();
            assert_eq!(listening, vec![(lo, name.as_str(), me)]);
        }
    }
}
