//! Reading a snapshot: the socket tables of the scope's namespaces (over sock_diag, [`diag`],
//! or from `/proc/net`, [`proc_net`]), their owners ([`procs`]), then direction and rows per
//! namespace ([`aggregate`]); and the addresses of those namespaces.
//!
//! - **Scope.** The tables are `PROC/net/{tcp,tcp6,udp,udp6}`: with the real `/proc`, the
//!   namespace of the agent process (`/proc/net` is `/proc/self/net`, the thread-group
//!   leader's; a thread that `setns()`es must read `/proc/thread-self/net` instead). Only
//!   inodes from these tables are ever attributed, so sockets of other namespaces are never
//!   reported, even though their processes are visible. That is scope `own`, the default. In
//!   scope `all` (container hosts) the tables of every namespace a process is in are read from
//!   `PROC/PID/net` of one of its processes ([`netns`]), direction is inferred within each
//!   namespace, and rows carry the namespace's name and their process's container.
//! - **Failed reads.** A sock_diag dump that fails falls back to `/proc/net` for that table; a
//!   table or the process list that cannot be read fails the snapshot (another namespace's is
//!   skipped). Each failure is counted by source in [`ReadFailures`], for `/metrics`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tapgraph::proto;

use super::direction::{Role, role};
use super::{
    Protocol, SnapshotError, SocketRow, Table, aggregate, conntrack, diag, netns, proc_net, procs,
};

/// Table reads that failed, by source, since the agent started. Shared with `/metrics`.
#[derive(Debug, Default)]
pub struct ReadFailures {
    /// A sock_diag socket that could not be opened, or a dump of one table that failed (that
    /// table is then read from `/proc/net`).
    pub sock_diag: AtomicU64,
    /// A `/proc/net` table that could not be read (a missing v6 table, IPv6 off, is no failure).
    pub proc_net: AtomicU64,
    /// The process list or the namespace list that could not be read.
    pub procs: AtomicU64,
    /// A conntrack dump that failed (that snapshot sees no NAT).
    pub conntrack: AtomicU64,
    /// Translated flows left out of a snapshot beyond [`conntrack::MAX_FLOWS`].
    pub nat_dropped: AtomicU64,
}

impl ReadFailures {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
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
    /// The controllers' addresses: rows towards them are the control plane's.
    control_plane: Vec<SocketAddr>,
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
    /// The agent's own namespace's conntrack: `None` until opened, or once it failed (logged).
    conntrack: Option<Result<conntrack::ConntrackReader, ()>>,
    /// The translations the last snapshot read (for what is merged into it after).
    nat: conntrack::Translations,
    failures: Arc<ReadFailures>,
    /// sock_diag dumps ask for `tcp_info`.
    tcp_info: bool,
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
            control_plane: control_plane.into_iter().collect(),
            buf: Vec::new(),
            reader: Reader::default(),
            diag: HashMap::new(),
            diag_failed: HashSet::new(),
            others: Vec::new(),
            conntrack: None,
            nat: conntrack::Translations::default(),
            failures: Arc::default(),
            tcp_info: true,
        }
    }

    /// sock_diag dumps without `tcp_info`: no traffic, as before issue 23 (for the benchmark
    /// that measures what the extension costs).
    pub fn without_tcp_info(mut self) -> Self {
        self.tcp_info = false;
        self
    }

    /// Counts failed reads into `failures` (shared with `/metrics`) instead of a private tally.
    pub fn with_failures(mut self, failures: Arc<ReadFailures>) -> Self {
        self.failures = failures;
        self
    }

    /// The tag rows of namespace `inode` carry, if the last snapshot read it as another
    /// namespace than the agent's own (scope `all`); `None` otherwise.
    pub fn namespace_name(&self, inode: u64) -> Option<&str> {
        self.others
            .iter()
            .find(|(ns, _)| ns.inode == inode)
            .map(|(ns, _)| ns.name.as_str())
    }

    /// Rows whose remote endpoint is one of `controllers` get `control_plane = true` from the next
    /// read: the agent reconnected, and the controllers' addresses are known anew.
    pub fn set_control_plane(&mut self, controllers: Vec<SocketAddr>) {
        self.control_plane = controllers;
    }

    /// Chooses the table reader; fixture trees (a proc root other than `/proc`) always use
    /// [`Reader::Proc`].
    pub fn with_reader(mut self, reader: Reader) -> Self {
        self.reader = reader;
        self
    }

    /// Every address of every interface of this namespace, and of the other namespaces the last
    /// snapshot read (scope `all`: a container's address is the host's too).
    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        let of = |interfaces: Vec<proto::Interface>| -> BTreeSet<IpAddr> {
            interfaces
                .iter()
                .flat_map(|i| i.addresses.iter())
                .filter_map(|cidr| cidr.split('/').next()?.parse::<IpAddr>().ok())
                .collect()
        };
        let mut all = of(crate::host::interfaces());
        for (ns, pid) in &self.others {
            match netns::open_checked(&self.proc_root, *pid, ns.inode)
                .and_then(|file| netns::run_in(&file, crate::host::interfaces))
            {
                Ok(interfaces) => all.extend(of(interfaces)),
                Err(error) => {
                    tracing::debug!(namespace = %ns.name, %error, "cannot read the namespace's addresses")
                }
            }
        }
        all
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
        let resolution = self.processes.resolve(&wanted).map_err(|source| {
            ReadFailures::count(&self.failures.procs);
            SnapshotError::ListProcesses {
                path: self.proc_root.clone(),
                source,
            }
        })?;
        let nat = self.read_translations();
        let processes = &self.processes;
        let owner = |inode| {
            let pid = *resolution.owners.get(&inode)?;
            Some((pid, processes.process(pid)?))
        };
        let mut table = Table::default();
        for space in &spaces {
            let part =
                aggregate::build_with(&space.rows, &space.tag, owner, &self.control_plane, &nat);
            table.entries.extend(part.entries);
            table.listeners.extend(part.listeners);
            table.sockets.extend(part.sockets);
            table.stats.sockets_read += part.stats.sockets_read;
            table.stats.unattributed += part.stats.unattributed;
        }
        table.stats.bad_lines = bad_lines;
        table.nat_fronts = nat.fronts().clone();
        self.nat = nat;
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

    /// The translations the last snapshot read.
    pub fn translations(&self) -> &conntrack::Translations {
        &self.nat
    }

    /// The translated flows of the agent's own namespace (a pod's traffic is translated in its
    /// host's namespace, so scope `all` needs no other). Empty on a fixture tree, and where
    /// conntrack cannot be read: no NAT module loaded, or no CAP_NET_ADMIN (logged once, counted).
    fn read_translations(&mut self) -> conntrack::Translations {
        if self.proc_root != Path::new("/proc") {
            return conntrack::Translations::default();
        }
        let reader = self.conntrack.get_or_insert_with(|| {
            conntrack::ConntrackReader::open().map_err(|error| {
                tracing::warn!(%error, "no conntrack netlink socket: connections through NAT show the address they dialled");
            })
        });
        let Ok(reader) = reader else {
            return conntrack::Translations::default();
        };
        match reader.dump() {
            Ok((flows, dropped)) => {
                if dropped > 0 {
                    self.failures
                        .nat_dropped
                        .fetch_add(dropped, Ordering::Relaxed);
                    tracing::warn!(
                        kept = conntrack::MAX_FLOWS,
                        dropped,
                        "more translated flows than one snapshot keeps"
                    );
                }
                if flows.is_empty() {
                    return conntrack::Translations::default();
                }
                conntrack::Translations::new(flows, &self.addresses())
            }
            Err(error) => {
                ReadFailures::count(&self.failures.conntrack);
                if self.diag_failed.insert((0, "conntrack")) {
                    tracing::warn!(%error, "cannot read conntrack: connections through NAT show the address they dialled");
                }
                conntrack::Translations::default()
            }
        }
    }

    /// Scope `all`: the tables of every namespace, through `/proc/PID/net` of one of its
    /// processes. A namespace that vanishes between listing and reading is skipped; only the
    /// agent's own tables failing is an error.
    fn read_all(&mut self, bad_lines: &mut u64) -> Result<Vec<Space>, SnapshotError> {
        let own = netns::inode_of(&self.proc_root.join("self/ns/net")).map_err(|source| {
            ReadFailures::count(&self.failures.procs);
            SnapshotError::ReadTable {
                path: self.proc_root.join("self/ns/net"),
                source,
            }
        })?;
        let list = netns::list(&self.proc_root).map_err(|source| {
            ReadFailures::count(&self.failures.procs);
            SnapshotError::ListProcesses {
                path: self.proc_root.clone(),
                source,
            }
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
        if self.reader != Reader::Netlink || self.proc_root != Path::new("/proc") {
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
                Ok(mut reader) => {
                    reader.set_tcp_info(self.tcp_info);
                    self.diag.insert(inode, reader);
                }
                Err(error) => {
                    ReadFailures::count(&self.failures.sock_diag);
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
        dir: &Path,
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
                        ReadFailures::count(&self.failures.sock_diag);
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
                Err(source) => {
                    ReadFailures::count(&self.failures.proc_net);
                    return Err(SnapshotError::ReadTable { path, source });
                }
            }
            let (mut parsed, bad) =
                proc_net::parse(&String::from_utf8_lossy(&self.buf), protocol, v6);
            rows.append(&mut parsed);
            *bad_lines += bad;
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::procs::tests::FakeProc;
    use crate::snapshot::tests::{ip, sa};
    use crate::snapshot::{Direction, EntryKey, EntryValue, ProcessKey, Stats};
    use std::collections::BTreeMap;
    use std::net::{TcpListener, TcpStream};

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
    fn the_control_plane_follows_the_controller_the_agent_moved_to() {
        let fake = fixture_host();
        let mut snapshotter = Snapshotter::new(fake.root(), Some(sa("127.0.0.1:37877")));
        let marked = |s: &mut Snapshotter| -> Vec<u16> {
            let table = s.take().unwrap();
            table
                .entries
                .iter()
                .filter(|(_, v)| v.control_plane)
                .map(|(k, _)| k.server_port)
                .collect()
        };
        assert_eq!(marked(&mut snapshotter), vec![37877]);
        snapshotter.set_control_plane(vec![sa("127.0.0.1:51323")]);
        assert_eq!(marked(&mut snapshotter), vec![51323]);
        // Every replica's address: the one the agent holds, and the others it may have left.
        snapshotter.set_control_plane(vec![sa("127.0.0.1:51323"), sa("127.0.0.1:37877")]);
        assert_eq!(marked(&mut snapshotter), vec![37877, 51323]);
        snapshotter.set_control_plane(Vec::new());
        assert_eq!(marked(&mut snapshotter), Vec::<u16>::new());
    }

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
                    via: None,
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

    fn failures(snapshotter: &Snapshotter) -> [u64; 3] {
        let f = &snapshotter.failures;
        [&f.sock_diag, &f.proc_net, &f.procs].map(|n| n.load(Ordering::Relaxed))
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn a_table_that_cannot_be_read_is_counted() {
        let fake = fixture_host();
        let shared = Arc::new(ReadFailures::default());
        let mut snapshotter = Snapshotter::new(fake.root(), None).with_failures(shared.clone());
        snapshotter.take().unwrap();
        // A missing v6 table means IPv6 is off: no failure.
        std::fs::remove_file(fake.root().join("net/udp6")).unwrap();
        snapshotter.take().unwrap();
        assert_eq!(failures(&snapshotter), [0, 0, 0]);
        std::fs::remove_file(fake.root().join("net/udp")).unwrap();
        snapshotter.take().unwrap_err();
        snapshotter.take().unwrap_err();
        assert_eq!(failures(&snapshotter), [0, 2, 0]);
        assert_eq!(
            shared.proc_net.load(Ordering::Relaxed),
            2,
            "counted where /metrics reads"
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn a_process_list_that_cannot_be_read_is_counted() {
        let fake = fixture_host();
        let mut snapshotter = Snapshotter::new(fake.root(), None);
        snapshotter.processes = procs::ProcessTable::new(fake.root().join("gone"), false);
        let err = snapshotter.take().unwrap_err();
        assert!(matches!(err, SnapshotError::ListProcesses { .. }), "{err}");
        assert_eq!(failures(&snapshotter), [0, 0, 1]);
        // Scope `all` lists namespaces first.
        let mut all = Snapshotter::with_scope(fake.root(), None, Scope::All);
        all.take().unwrap_err();
        assert_eq!(failures(&all), [0, 0, 1]);
    }

    /// On the live host: every sock_diag dump fails, each is counted, and the tables come from
    /// `/proc/net` instead.
    #[test]
    fn a_failed_sock_diag_dump_is_counted_and_read_from_proc() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut snapshotter = Snapshotter::new(PathBuf::from("/proc"), None);
        assert_eq!(snapshotter.reader, Reader::Netlink);
        snapshotter
            .diag
            .insert(0, diag::DiagReader::failing().unwrap());
        let table = snapshotter.take().unwrap();
        assert_eq!(failures(&snapshotter), [4, 0, 0]);
        assert!(
            table.listeners.keys().any(|l| l.port == port),
            "read from /proc/net"
        );
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
