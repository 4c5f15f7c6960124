//! Turns connection tables into `ConnectionSnapshot` messages: a full one first, then the changes
//! since the last one sent, each numbered so the controller can tell a gap and ask for a resync.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tapgraph::proto;

use crate::bpf::{self, Connect, Tracer};
use crate::shortlived::{self, Catch, Catcher};
use crate::snapshot::closed::ClosedCounters;
use crate::snapshot::conntrack::{NatFront, Translations};
use crate::snapshot::{
    self, Direction, EntryKey, EntryValue, Listener, ProcessKey, Scope, Snapshotter, Table,
    direction,
};
use crate::traffic::Traffic;

/// Drops on the way from the host's sockets to a snapshot, since the agent started; the reporter
/// counts into them and `/metrics` shows them.
#[derive(Debug, Clone, Default)]
pub struct Drops {
    /// SYN-ACK catches: `dropped` counts those lost because the queue to the next snapshot was full.
    pub short_lived: Arc<shortlived::Counters>,
    /// Socket-table and process reads that failed, by source.
    pub table_reads: Arc<snapshot::ReadFailures>,
    /// Closed-socket notifications: received, and dropped by reason.
    pub closed: Arc<ClosedCounters>,
    /// BPF connects read, and dropped by reason (ring full, queue full, malformed).
    pub bpf: Arc<bpf::Counters>,
}

/// The agent's side of the connection table: owns the snapshotter (its inode→process cache) and
/// the SYN-ACK capture, and remembers what the controller was last sent.
///
/// Guarantees: sequence numbers start at 1 and grow by one per snapshot; a delta's
/// `base_sequence` is the snapshot it applies to, and applying it to the table the controller
/// holds yields the current one exactly; a full snapshot replaces that table. A failed read
/// returns an error and changes nothing, so the next delta is still against what was sent.
/// Rows only the SYN-ACK capture or the BPF connect tracer saw are marked `short_lived`; client
/// rows are named after the process the tracer saw connect, whenever the table read could not
/// name one.
pub struct Reporter {
    snapshotter: Snapshotter,
    /// The table the controller has, after the last snapshot it was sent.
    sent: Option<Table>,
    sequence: u64,
    /// The controllers' addresses.
    control_plane: Vec<SocketAddr>,
    /// SYN-ACK capture for connections too short for a table read; `None` without CAP_NET_RAW.
    catcher: Option<Catcher>,
    /// The process of every TCP connect, from BPF; `None` where it does not run.
    tracer: Option<Tracer>,
    /// Whether the tracer runs, and why not: told in Hello and on client rows it cannot name.
    bpf_status: bpf::Status,
    /// Scope `all`: the tracer reports every namespace; own namespace's inode, to tag its rows "".
    own_netns: Option<u32>,
    /// Connects the tracer had dropped, at the last look.
    bpf_dropped: u64,
    drops: Drops,
    /// Rows of the last table that only the SYN-ACK capture saw.
    short_lived: BTreeSet<EntryKey>,
    pub short_lived_caught: u64,
    /// SYN-ACKs the capture had to drop (queue full), at the last look.
    short_lived_dropped: u64,
    /// Traffic between snapshots; see [`crate::traffic`].
    traffic: Traffic,
}

/// Whether a flow is a session with one of `controllers`: its server end is a controller's
/// address (the agent's side, or the controller's own side where both share the host).
fn is_control_plane(t: &proto::FlowTraffic, controllers: &[SocketAddr]) -> bool {
    let server_ip = if t.direction == proto::Direction::Client as i32 {
        &t.remote_ip
    } else {
        &t.local_ip
    };
    controllers.iter().any(|cp| {
        u32::from(cp.port()) == t.server_port
            && server_ip.parse::<IpAddr>().ok() == Some(cp.ip().to_canonical())
    })
}

/// Adds the TCP connects the BPF tracer saw that `table` does not show with a process, as client
/// rows named after the connecting process; returns the keys added. `netns` gives the tag of a
/// namespace inode (as the table's rows are tagged). The cmdline is left empty: the process is
/// usually gone by now, and a row's key must not depend on whether it still was. A connect the
/// kernel translated (`nat`, the last snapshot's conntrack) is a row towards its backend, as the
/// table's own rows are.
pub fn merge_connects(
    table: &mut Table,
    connects: &[Connect],
    netns: impl Fn(u32) -> String,
    control_plane: &[SocketAddr],
    nat: &Translations,
) -> BTreeSet<EntryKey> {
    let mut added = BTreeSet::new();
    for c in connects {
        let dialled = SocketAddr::new(c.remote.ip().to_canonical(), c.remote.port());
        let local = SocketAddr::new(c.local.ip().to_canonical(), c.local.port());
        let backend = nat.backend(snapshot::Protocol::Tcp, local, dialled);
        let via = backend.map(|_| dialled);
        let remote = backend.unwrap_or(dialled);
        let (local_ip, remote_ip, server_port) = (local.ip(), remote.ip(), remote.port());
        // A connect that failed before a route was chosen has no local address: no row.
        if local_ip.is_unspecified() || remote_ip.is_unspecified() || server_port == 0 {
            continue;
        }
        let tag = netns(c.netns);
        let named = table.entries.keys().any(|k| {
            k.direction == Direction::Client
                && k.netns == tag
                && k.local_ip == local_ip
                && k.remote_ip == remote_ip
                && k.server_port == server_port
                && k.protocol == snapshot::Protocol::Tcp
                && !k.process.name.is_empty()
        });
        if named {
            continue;
        }
        let key = EntryKey {
            netns: tag,
            direction: Direction::Client,
            local_ip,
            remote_ip,
            server_port,
            protocol: snapshot::Protocol::Tcp,
            process: ProcessKey {
                name: c.comm.clone(),
                cmdline: String::new(),
                container: String::new(),
            },
            via,
        };
        let control = control_plane
            .iter()
            .any(|cp| cp.ip().to_canonical() == remote_ip && cp.port() == server_port);
        let value = table.entries.entry(key.clone()).or_insert(EntryValue {
            sockets: 1,
            pid: c.tgid,
            control_plane: control,
        });
        value.pid = value.pid.min(c.tgid);
        added.insert(key);
    }
    added
}

/// Adds the connections `catches` saw that `table` does not show, as rows of their own; returns the
/// keys added; client rows only when `clients` (the BPF tracer names those itself). A server-side row names the process listening on the port; a client-side row cannot
/// name its process (the socket is gone).
pub fn merge_catches(
    table: &mut Table,
    catches: &BTreeSet<Catch>,
    local: &BTreeSet<IpAddr>,
    control_plane: &[SocketAddr],
    clients: bool,
) -> BTreeSet<EntryKey> {
    let is_local = |ip: &IpAddr| ip.is_loopback() || local.contains(ip);
    let mut added = BTreeSet::new();
    for c in catches {
        let mut rows = Vec::new();
        if is_local(&c.server_ip) {
            let listener = table.listeners.iter().find(|(l, _)| {
                l.port == c.server_port
                    && l.protocol == snapshot::Protocol::Tcp
                    && direction::covers(l.ip, c.server_ip)
            });
            let (process, pid) = listener
                .map(|(l, pid)| (l.process.clone(), *pid))
                .unwrap_or_default();
            rows.push((Direction::Server, c.server_ip, c.client_ip, process, pid));
        }
        if clients && is_local(&c.client_ip) {
            rows.push((
                Direction::Client,
                c.client_ip,
                c.server_ip,
                ProcessKey::default(),
                0,
            ));
        }
        for (direction, local_ip, remote_ip, process, pid) in rows {
            let seen = table.entries.keys().any(|k| {
                k.direction == direction
                    && k.local_ip == local_ip
                    && k.remote_ip == remote_ip
                    && k.server_port == c.server_port
                    && k.protocol == snapshot::Protocol::Tcp
            });
            if seen {
                continue;
            }
            let key = EntryKey {
                netns: String::new(),
                direction,
                local_ip,
                remote_ip,
                server_port: c.server_port,
                protocol: snapshot::Protocol::Tcp,
                process,
                via: None,
            };
            let control = control_plane
                .iter()
                .any(|cp| cp.ip() == c.server_ip && cp.port() == c.server_port);
            table.entries.insert(
                key.clone(),
                EntryValue {
                    sockets: 1,
                    pid,
                    control_plane: control,
                },
            );
            added.insert(key);
        }
    }
    added
}

fn protocol(p: snapshot::Protocol) -> i32 {
    match p {
        snapshot::Protocol::Tcp => proto::Protocol::Tcp as i32,
        snapshot::Protocol::Udp => proto::Protocol::Udp as i32,
    }
}

fn process(pid: u32, key: &snapshot::ProcessKey) -> Option<proto::ProcessInfo> {
    (!key.name.is_empty()).then(|| proto::ProcessInfo {
        pid,
        name: key.name.clone(),
        cmdline: key.cmdline.clone(),
    })
}

/// A client TCP row whose process is unknown says why; every other row says nothing.
fn process_note<'a>(k: &EntryKey, bpf: &'a bpf::Status) -> &'a str {
    let unnamed = k.direction == Direction::Client
        && k.protocol == snapshot::Protocol::Tcp
        && k.process.name.is_empty();
    match bpf {
        _ if !unnamed => "",
        bpf::Status::Running => bpf::MISSED_NOTE,
        bpf::Status::Off(_) => bpf::NO_BPF_NOTE,
    }
}

fn entry(
    k: &EntryKey,
    v: Option<&EntryValue>,
    short_lived: bool,
    note: &str,
) -> proto::ConnectionEntry {
    proto::ConnectionEntry {
        direction: match k.direction {
            Direction::Client => proto::Direction::Client as i32,
            Direction::Server => proto::Direction::Server as i32,
        },
        local_ip: k.local_ip.to_string(),
        remote_ip: k.remote_ip.to_string(),
        server_port: u32::from(k.server_port),
        protocol: protocol(k.protocol),
        process: process(v.map_or(0, |v| v.pid), &k.process),
        sockets: v.map_or(0, |v| v.sockets),
        control_plane: v.is_some_and(|v| v.control_plane),
        netns: k.netns.clone(),
        container: k.process.container.clone(),
        short_lived,
        via: k.via.map(|v| v.to_string()).unwrap_or_default(),
        process_note: note.to_string(),
    }
}

fn nat_fronts(fronts: &BTreeSet<NatFront>) -> proto::NatFronts {
    proto::NatFronts {
        fronts: fronts
            .iter()
            .map(|f| proto::NatFront {
                protocol: protocol(f.protocol),
                front_ip: f.front.ip().to_string(),
                front_port: u32::from(f.front.port()),
                backend_ip: f.backend.ip().to_string(),
                backend_port: u32::from(f.backend.port()),
            })
            .collect(),
    }
}

fn listener(l: &Listener, pid: u32) -> proto::ListeningService {
    proto::ListeningService {
        ip: l.ip.to_string(),
        port: u32::from(l.port),
        protocol: protocol(l.protocol),
        process: process(pid, &l.process),
        netns: l.netns.clone(),
    }
}

impl Reporter {
    /// Starts the SYN-ACK capture where the agent may (CAP_NET_RAW), and, when `bpf`, the BPF
    /// connect tracer where the kernel allows it (the reason it does not is kept, see
    /// [`Reporter::bpf_status`]); counts drops into `drops`.
    pub fn new(control_plane: Option<SocketAddr>, scope: Scope, drops: &Drops, bpf: bool) -> Self {
        let own_netns = bpf::own_netns();
        let (tracer, bpf_status) = if !bpf {
            tracing::info!(
                "BPF connect tracing off (snapshot.bpf = false): client processes of short-lived connections stay unknown"
            );
            (
                None,
                bpf::Status::Off("disabled by configuration (snapshot.bpf = false)".into()),
            )
        } else {
            // Scope `own`: only this namespace's connects; `all`: every one, tagged.
            let only = match scope {
                Scope::Own => own_netns,
                Scope::All => None,
            };
            match Tracer::start(drops.bpf.clone(), only) {
                Ok(t) => {
                    tracing::info!(
                        "BPF connect tracing on: every TCP client is named after its process"
                    );
                    (Some(t), bpf::Status::Running)
                }
                Err(reason) => {
                    tracing::warn!(%reason, "no BPF connect tracing: client processes of short-lived connections stay unknown; SYN-ACK capture only");
                    (None, bpf::Status::Off(reason))
                }
            }
        };
        // In scope own the tracer sees this namespace's accepts as well as its connects: the
        // SYN-ACK capture would only repeat it, at a wake-up per connection. In scope all it
        // stays (catches are not tagged with their namespace).
        let catcher = if tracer.is_some() && scope == Scope::Own {
            None
        } else {
            match Catcher::start(drops.short_lived.clone()) {
                Ok(c) => Some(c),
                Err(error) => {
                    tracing::warn!(%error, "no short-lived connection capture (needs CAP_NET_RAW); periodic tables only");
                    None
                }
            }
        };
        Self {
            snapshotter: Snapshotter::with_scope("/proc".into(), control_plane, scope)
                .with_failures(drops.table_reads.clone()),
            sent: None,
            sequence: 0,
            control_plane: control_plane.into_iter().collect(),
            catcher,
            tracer,
            bpf_status,
            own_netns,
            bpf_dropped: 0,
            drops: drops.clone(),
            short_lived: BTreeSet::new(),
            short_lived_caught: 0,
            short_lived_dropped: 0,
            traffic: Traffic::start(&drops.closed),
        }
    }

    /// From the next snapshot, rows towards any of `controllers` are the control plane's: the
    /// replica the agent holds now, and those it may have left sockets towards.
    pub fn set_control_plane(&mut self, controllers: Vec<SocketAddr>) {
        self.control_plane.clone_from(&controllers);
        self.snapshotter.set_control_plane(controllers);
    }

    /// Whether the BPF connect tracer runs, and why not.
    pub fn bpf_status(&self) -> &bpf::Status {
        &self.bpf_status
    }

    /// Rows in the table the controller holds now.
    pub fn rows(&self) -> u64 {
        self.sent.as_ref().map_or(0, |t| t.entries.len() as u64)
    }

    /// The next snapshot: full when `full` or nothing was sent yet, else the changes since the last.
    /// Reads /proc: call it off the async workers.
    pub fn next(
        &mut self,
        full: bool,
    ) -> Result<proto::ConnectionSnapshot, snapshot::SnapshotError> {
        let mut table = self.snapshotter.take()?;
        let local = self.snapshotter.addresses();
        let mut short_lived = BTreeSet::new();
        if let Some(tracer) = &self.tracer {
            let connects = tracer.drain();
            let bpf = &self.drops.bpf;
            let dropped = bpf.ring_full.load(std::sync::atomic::Ordering::Relaxed)
                + bpf.queue_full.load(std::sync::atomic::Ordering::Relaxed);
            if dropped > self.bpf_dropped {
                tracing::warn!(
                    dropped = dropped - self.bpf_dropped,
                    "BPF connects dropped (ring or queue full): some short-lived clients may show no process"
                );
                self.bpf_dropped = dropped;
            }
            let own = self.own_netns;
            let snapshotter = &self.snapshotter;
            let tag = |inode: u32| -> String {
                if Some(inode) == own {
                    return String::new();
                }
                snapshotter
                    .namespace_name(u64::from(inode))
                    .map_or_else(|| format!("net:[{inode}]"), str::to_string)
            };
            let (accepts, connects): (Vec<Connect>, Vec<Connect>) =
                connects.into_iter().partition(|c| c.accepted);
            short_lived = merge_connects(
                &mut table,
                &connects,
                tag,
                &self.control_plane,
                snapshotter.translations(),
            );
            if self.catcher.is_none() {
                // This namespace's only: a catch has no namespace to be tagged with.
                let accepts: BTreeSet<Catch> = accepts
                    .iter()
                    .filter(|a| Some(a.netns) == own)
                    .map(|a| Catch {
                        server_ip: a.local.ip(),
                        server_port: a.local.port(),
                        client_ip: a.remote.ip(),
                    })
                    .collect();
                short_lived.extend(merge_catches(
                    &mut table,
                    &accepts,
                    &local,
                    &self.control_plane,
                    false,
                ));
            }
        }
        if let Some(catcher) = &self.catcher {
            let catches = catcher.drain();
            let dropped = catcher
                .counters
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed);
            if dropped > self.short_lived_dropped {
                tracing::warn!(
                    dropped = dropped - self.short_lived_dropped,
                    "short-lived connection catches dropped: more new connections than the queue holds between two snapshots"
                );
                self.short_lived_dropped = dropped;
            }
            short_lived.extend(merge_catches(
                &mut table,
                &catches,
                &local,
                &self.control_plane,
                true,
            ));
        }
        self.short_lived = short_lived;
        self.short_lived_caught += self.short_lived.len() as u64;
        let base = self.sequence;
        self.sequence += 1;
        let taken_at = tapgraph::time::unix_nanos();
        let (mut traffic, traffic_since) = self.traffic.take(
            &mut table,
            taken_at,
            self.snapshotter.translations(),
            &self.control_plane,
        );
        // The agent's own link to a controller is no dependency: its bytes would make an edge of
        // their own once its row is gone (a closed session), one not marked control plane.
        traffic.retain(|t| !is_control_plane(t, &self.control_plane));
        let mut msg = proto::ConnectionSnapshot {
            sequence: self.sequence,
            taken_at_unix_nanos: taken_at,
            addresses: local.iter().map(IpAddr::to_string).collect(),
            short_lived_caught: self.short_lived_caught,
            traffic,
            traffic_since_unix_nanos: traffic_since,
            ..Default::default()
        };
        let short = |k: &EntryKey| self.short_lived.contains(k);
        let note = |k: &EntryKey| process_note(k, &self.bpf_status);
        match (&self.sent, full) {
            (Some(prev), false) => {
                let d = snapshot::delta(prev, &table);
                msg.full = false;
                msg.base_sequence = base;
                msg.entries = d
                    .upserts
                    .iter()
                    .map(|(k, v)| entry(k, Some(v), short(k), note(k)))
                    .collect();
                msg.removed = d
                    .removed
                    .iter()
                    .map(|k| entry(k, None, false, ""))
                    .collect();
                msg.listeners = d
                    .listeners_added
                    .iter()
                    .map(|(l, pid)| listener(l, *pid))
                    .collect();
                msg.removed_listeners =
                    d.listeners_removed.iter().map(|l| listener(l, 0)).collect();
                if prev.nat_fronts != table.nat_fronts {
                    msg.nat = Some(nat_fronts(&table.nat_fronts));
                }
            }
            _ => {
                msg.full = true;
                msg.entries = table
                    .entries
                    .iter()
                    .map(|(k, v)| entry(k, Some(v), short(k), note(k)))
                    .collect();
                msg.listeners = table
                    .listeners
                    .iter()
                    .map(|(l, pid)| listener(l, *pid))
                    .collect();
                msg.nat = Some(nat_fronts(&table.nat_fronts));
            }
        }
        self.sent = Some(table);
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn table_with_listener() -> Table {
        let mut t = Table::default();
        t.listeners.insert(
            Listener {
                netns: String::new(),
                ip: ip("0.0.0.0"),
                port: 80,
                protocol: snapshot::Protocol::Tcp,
                process: ProcessKey {
                    name: "nginx".into(),
                    cmdline: "nginx: worker".into(),
                    container: String::new(),
                },
            },
            42,
        );
        t
    }

    #[test]
    fn a_caught_connection_becomes_a_row_on_the_right_side() {
        let local: BTreeSet<IpAddr> = [ip("10.0.0.2")].into();
        let catches: BTreeSet<Catch> = [
            // Someone connected to our nginx.
            Catch {
                server_ip: ip("10.0.0.2"),
                server_port: 80,
                client_ip: ip("10.0.0.9"),
            },
            // We connected out.
            Catch {
                server_ip: ip("10.0.0.7"),
                server_port: 5432,
                client_ip: ip("10.0.0.2"),
            },
            // Not ours (promiscuous leftovers): ignored.
            Catch {
                server_ip: ip("10.0.0.5"),
                server_port: 1,
                client_ip: ip("10.0.0.6"),
            },
        ]
        .into();
        let mut t = table_with_listener();
        let added = merge_catches(&mut t, &catches, &local, &[], true);
        assert_eq!(added.len(), 2);
        let server = t
            .entries
            .keys()
            .find(|k| k.direction == Direction::Server)
            .unwrap();
        assert_eq!(
            (server.server_port, server.process.name.as_str()),
            (80, "nginx")
        );
        assert_eq!(t.entries[server].pid, 42);
        let client = t
            .entries
            .keys()
            .find(|k| k.direction == Direction::Client)
            .unwrap();
        assert_eq!(
            (client.remote_ip, client.server_port),
            (ip("10.0.0.7"), 5432)
        );
        assert!(
            client.process.name.is_empty(),
            "the socket is gone: no process"
        );
    }

    #[test]
    fn a_caught_connection_to_any_controller_is_control_plane() {
        let local: BTreeSet<IpAddr> = [ip("10.0.0.2")].into();
        let out = |server: &str, port| Catch {
            server_ip: ip(server),
            server_port: port,
            client_ip: ip("10.0.0.2"),
        };
        let catches: BTreeSet<Catch> = [
            out("10.0.0.7", 7443),
            out("10.0.0.7", 5432),
            out("10.0.0.8", 7443),
            out("10.0.0.5", 7443),
        ]
        .into();
        let controllers = [sa("10.0.0.5:7443"), sa("10.0.0.7:7443")];
        let mut t = Table::default();
        merge_catches(&mut t, &catches, &local, &controllers, true);
        let marked: Vec<(IpAddr, u16, bool)> = t
            .entries
            .iter()
            .map(|(k, v)| (k.remote_ip, k.server_port, v.control_plane))
            .collect();
        assert_eq!(
            marked,
            vec![
                (ip("10.0.0.5"), 7443, true),
                (ip("10.0.0.7"), 5432, false),
                (ip("10.0.0.7"), 7443, true),
                (ip("10.0.0.8"), 7443, false),
            ]
        );
    }

    #[test]
    fn the_reporter_marks_rows_towards_the_controllers_it_is_given() {
        // A real loopback connection, read from this process's own table.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let controller = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(controller).unwrap();
        let _server = listener.accept().unwrap();
        let mut reporter = Reporter::new(None, Scope::Own, &Drops::default(), false);
        let towards = |snapshot: &proto::ConnectionSnapshot| -> Vec<bool> {
            snapshot
                .entries
                .iter()
                .filter(|e| {
                    e.direction == proto::Direction::Client as i32
                        && e.server_port == u32::from(controller.port())
                })
                .map(|e| e.control_plane)
                .collect()
        };
        assert_eq!(towards(&reporter.next(true).unwrap()), vec![false]);
        reporter.set_control_plane(vec![sa("127.0.0.1:1"), controller]);
        assert_eq!(towards(&reporter.next(true).unwrap()), vec![true]);
        reporter.set_control_plane(Vec::new());
        assert_eq!(towards(&reporter.next(true).unwrap()), vec![false]);
    }

    /// A real loopback connection: its first snapshot counts what it moved so far, the next
    /// only what it moved since, an idle interval sends nothing, and its close is counted.
    #[test]
    fn snapshots_carry_what_each_flow_moved_since_the_last() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut move_bytes = |up: usize, down: usize| {
            client.write_all(&vec![1; up]).unwrap();
            server.read_exact(&mut vec![0; up]).unwrap();
            server.write_all(&vec![2; down]).unwrap();
            client.read_exact(&mut vec![0; down]).unwrap();
        };
        move_bytes(5000, 200);
        let drops = Drops::default();
        let mut reporter = Reporter::new(None, Scope::Own, &drops, false);
        let ours = |s: &proto::ConnectionSnapshot| -> Vec<(i32, u64, u64, u32)> {
            s.traffic
                .iter()
                .filter(|t| t.server_port == u32::from(port))
                .map(|t| (t.direction, t.bytes_sent, t.bytes_received, t.closed))
                .collect()
        };
        let (c, sv) = (
            proto::Direction::Client as i32,
            proto::Direction::Server as i32,
        );
        // The last ACK can lag the data: read until both sides agree.
        let mut first = Vec::new();
        for _ in 0..50 {
            first = ours(&reporter.next(true).unwrap());
            if first.len() == 2 {
                break;
            }
        }
        let mut totals: BTreeSet<_> = first.iter().copied().collect();
        assert!(totals.contains(&(c, 5000, 200, 0)), "{totals:?}");
        assert!(totals.contains(&(sv, 200, 5000, 0)), "{totals:?}");
        move_bytes(700, 30);
        let second = ours(&reporter.next(false).unwrap());
        assert_eq!(
            second.iter().copied().collect::<BTreeSet<_>>(),
            [(c, 700, 30, 0), (sv, 30, 700, 0)].into()
        );
        assert!(ours(&reporter.next(false).unwrap()).is_empty());
        // Bytes on the wire for one flow's increments (a typical IPv4 flow).
        let one = reporter.next(false).unwrap();
        let sample = proto::FlowTraffic {
            direction: c,
            local_ip: "10.20.30.40".into(),
            remote_ip: "10.20.30.41".into(),
            server_port: 5432,
            bytes_sent: 1_500_000,
            bytes_received: 40_000,
            segments_sent: 1100,
            segments_received: 600,
            srtt_us: 350,
            min_rtt_us: 120,
            ..Default::default()
        };
        eprintln!(
            "one flow's increments: {} bytes on the wire; a snapshot without traffic: {}",
            prost::Message::encoded_len(&sample) + 2,
            prost::Message::encoded_len(&one)
        );
        drop(client);
        drop(server);
        if drops
            .closed
            .listening
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            eprintln!("SKIPPED the close: no CAP_NET_ADMIN for the destroy notifications");
            return;
        }
        for _ in 0..100 {
            for t in ours(&reporter.next(false).unwrap()) {
                totals.insert(t);
            }
            if totals.iter().filter(|t| t.3 == 1).count() == 2 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the close was not counted: {totals:?}");
    }

    #[test]
    fn a_connection_the_table_already_shows_is_not_added_twice() {
        let local: BTreeSet<IpAddr> = [ip("10.0.0.2")].into();
        let mut t = table_with_listener();
        t.entries.insert(
            EntryKey {
                netns: String::new(),
                direction: Direction::Server,
                local_ip: ip("10.0.0.2"),
                remote_ip: ip("10.0.0.9"),
                server_port: 80,
                protocol: snapshot::Protocol::Tcp,
                process: ProcessKey::default(),
                via: None,
            },
            EntryValue {
                sockets: 3,
                pid: 42,
                control_plane: false,
            },
        );
        let catches: BTreeSet<Catch> = [Catch {
            server_ip: ip("10.0.0.2"),
            server_port: 80,
            client_ip: ip("10.0.0.9"),
        }]
        .into();
        assert!(merge_catches(&mut t, &catches, &local, &[], true).is_empty());
        assert_eq!(t.entries.len(), 1);
    }

    /// The same connection, once read from the tables and once seen by its SYN-ACK only, makes
    /// the same rows: side, addresses, server port, protocol, and the server side's process.
    #[test]
    fn a_caught_connection_gets_the_direction_the_tables_give() {
        use crate::snapshot::{Protocol::Tcp, SocketRow, TcpState};
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let row = |local, remote, state, inode| SocketRow {
            protocol: Tcp,
            local: sa(local),
            remote: sa(remote),
            state,
            uid: 0,
            inode,
            tcp: None,
        };
        let nginx = ProcessKey {
            name: "nginx".into(),
            cmdline: "nginx: worker".into(),
            container: String::new(),
        };
        let build = |rows: &[SocketRow]| snapshot::build(rows, "", |_| Some((42, &nginx)), &[]);
        let rows = |table: &Table| -> BTreeSet<_> {
            table
                .entries
                .iter()
                .map(|(k, v)| {
                    let server = k.direction == Direction::Server;
                    let process = server.then(|| (k.process.clone(), v.pid));
                    (
                        k.direction,
                        k.local_ip,
                        k.remote_ip,
                        k.server_port,
                        k.protocol,
                        process,
                    )
                })
                .collect()
        };
        let (established, listen) = (TcpState::Established, TcpState::Listen);
        let cases = [
            // Inbound, on a wildcard listener.
            (
                row("0.0.0.0:80", "0.0.0.0:0", listen, 1),
                vec![row("10.0.0.2:80", "10.0.0.9:50000", established, 2)],
                Catch {
                    server_ip: ip("10.0.0.2"),
                    server_port: 80,
                    client_ip: ip("10.0.0.9"),
                },
            ),
            // Outbound.
            (
                row("0.0.0.0:80", "0.0.0.0:0", listen, 1),
                vec![row("10.0.0.2:40000", "10.0.0.7:5432", established, 2)],
                Catch {
                    server_ip: ip("10.0.0.7"),
                    server_port: 5432,
                    client_ip: ip("10.0.0.2"),
                },
            ),
            // Loopback, both sides, on a dual-stack listener.
            (
                row("[::]:8080", "[::]:0", listen, 1),
                vec![
                    row("127.0.0.1:8080", "127.0.0.1:40001", established, 2),
                    row("127.0.0.1:40001", "127.0.0.1:8080", established, 3),
                ],
                Catch {
                    server_ip: ip("127.0.0.1"),
                    server_port: 8080,
                    client_ip: ip("127.0.0.1"),
                },
            ),
        ];
        let local: BTreeSet<IpAddr> = [ip("10.0.0.2")].into();
        for (listener, sockets, catch) in cases {
            let read = build(&[&[listener][..], &sockets].concat());
            let mut merged = build(&[listener]);
            let added = merge_catches(&mut merged, &[catch].into(), &local, &[], true);
            assert_eq!(added.len(), sockets.len(), "{catch:?}");
            assert_eq!(rows(&merged), rows(&read), "{catch:?}");
        }
    }

    fn connect(comm: &str, tgid: u32, local: &str, remote: &str) -> Connect {
        Connect {
            tgid,
            comm: comm.into(),
            netns: 7,
            local: sa(local),
            remote: sa(remote),
            established: true,
            accepted: false,
        }
    }

    /// The agent's own link to a controller carries no traffic on the map: a closed session's
    /// bytes would otherwise make an edge of their own, not marked control plane.
    #[test]
    fn flows_to_a_controller_are_the_control_plane_s() {
        let flow = |remote: &str, port: u32, direction: proto::Direction| proto::FlowTraffic {
            direction: direction as i32,
            remote_ip: remote.into(),
            server_port: port,
            ..Default::default()
        };
        let controllers = [sa("[::ffff:10.0.0.5]:7443"), sa("10.0.0.6:7443")];
        assert!(is_control_plane(
            &flow("10.0.0.5", 7443, proto::Direction::Client),
            &controllers
        ));
        assert!(is_control_plane(
            &flow("10.0.0.6", 7443, proto::Direction::Client),
            &controllers
        ));
        assert!(!is_control_plane(
            &flow("10.0.0.5", 7444, proto::Direction::Client),
            &controllers
        ));
        assert!(!is_control_plane(
            &flow("10.0.0.5", 7443, proto::Direction::Server),
            &controllers
        ));
    }

    /// A connect the kernel translated (a ClusterIP's DNAT on this host) is a row towards the
    /// backend, like the table's own rows, with the dialled address as `via`.
    #[test]
    fn a_connect_bpf_saw_through_nat_lands_on_the_backend() {
        use crate::snapshot::conntrack::Flow;
        let local: BTreeSet<IpAddr> = [ip("10.0.0.2")].into();
        let nat = Translations::new(
            [Flow {
                protocol: snapshot::Protocol::Tcp,
                client: sa("10.0.0.2:40001"),
                dialled: sa("10.96.0.10:6379"),
                backend: sa("10.0.0.7:6379"),
            }],
            &local,
        );
        let mut t = Table::default();
        let connects = [connect(
            "redis-cli",
            902,
            "10.0.0.2:40001",
            "10.96.0.10:6379",
        )];
        let added = merge_connects(&mut t, &connects, |_| String::new(), &[], &nat);
        let rows: Vec<_> = added
            .iter()
            .map(|k| (k.remote_ip, k.server_port, k.via, k.process.name.as_str()))
            .collect();
        assert_eq!(
            rows,
            [(
                ip("10.0.0.7"),
                6379,
                Some(sa("10.96.0.10:6379")),
                "redis-cli"
            )]
        );
    }

    /// A CLI client that connected between two reads, whose socket and process are gone: the
    /// table shows nothing, BPF names the client, and the SYN-ACK capture adds only the server
    /// side (the client row it would add is already there, named).
    #[test]
    fn a_connect_seen_by_bpf_names_the_client_the_table_cannot() {
        let local: BTreeSet<IpAddr> = [ip("10.0.0.2")].into();
        let mut t = table_with_listener();
        let connects = [
            connect("curl", 900, "127.0.0.1:40000", "127.0.0.1:80"),
            connect("curl", 901, "127.0.0.1:40002", "127.0.0.1:80"),
            // The same client towards a remote host; one failed before it had an address.
            connect("redis-cli", 902, "10.0.0.2:40001", "10.0.0.7:6379"),
            connect("redis-cli", 903, "0.0.0.0:0", "10.0.0.9:6379"),
        ];
        let mut added = merge_connects(
            &mut t,
            &connects,
            |_| String::new(),
            &[],
            &Translations::default(),
        );
        let catches: BTreeSet<Catch> = [Catch {
            server_ip: ip("127.0.0.1"),
            server_port: 80,
            client_ip: ip("127.0.0.1"),
        }]
        .into();
        added.extend(merge_catches(&mut t, &catches, &local, &[], true));
        let rows: Vec<(Direction, IpAddr, u16, &str, u32, u32)> = t
            .entries
            .iter()
            .map(|(k, v)| {
                let name = k.process.name.as_str();
                (
                    k.direction,
                    k.remote_ip,
                    k.server_port,
                    name,
                    v.pid,
                    v.sockets,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                (Direction::Client, ip("10.0.0.7"), 6379, "redis-cli", 902, 1),
                (Direction::Client, ip("127.0.0.1"), 80, "curl", 900, 1),
                (Direction::Server, ip("127.0.0.1"), 80, "nginx", 42, 1),
            ]
        );
        assert_eq!(added.len(), 3, "all three rows are short-lived");
        let bpf_off = bpf::Status::Off("disabled by configuration".into());
        for k in t.entries.keys() {
            assert_eq!(process_note(k, &bpf_off), "", "{k:?} has a process");
        }
    }

    #[test]
    fn a_client_the_table_names_is_left_as_it_is_and_notes_say_why_a_process_is_unknown() {
        let mut t = Table::default();
        let key = EntryKey {
            netns: String::new(),
            direction: Direction::Client,
            local_ip: ip("10.0.0.2"),
            remote_ip: ip("10.0.0.7"),
            server_port: 5432,
            protocol: snapshot::Protocol::Tcp,
            process: ProcessKey {
                name: "psql".into(),
                cmdline: "psql -h db".into(),
                container: String::new(),
            },
            via: None,
        };
        t.entries.insert(
            key.clone(),
            EntryValue {
                sockets: 1,
                pid: 5,
                control_plane: false,
            },
        );
        let connects = [connect("psql", 5, "10.0.0.2:41000", "10.0.0.7:5432")];
        assert!(
            merge_connects(
                &mut t,
                &connects,
                |_| String::new(),
                &[],
                &Translations::default()
            )
            .is_empty()
        );
        assert_eq!(t.entries.len(), 1);
        // In another namespace, it is another row, tagged.
        let tagged = merge_connects(
            &mut t,
            &connects,
            |n| format!("net:[{n}]"),
            &[],
            &Translations::default(),
        );
        assert_eq!(tagged.first().map(|k| k.netns.as_str()), Some("net:[7]"));
        // A client row without a process says why; a server row never does.
        let unnamed = EntryKey {
            process: ProcessKey::default(),
            ..key.clone()
        };
        let off = bpf::Status::Off("EPERM".into());
        assert_eq!(process_note(&unnamed, &off), bpf::NO_BPF_NOTE);
        assert_eq!(
            process_note(&unnamed, &bpf::Status::Running),
            bpf::MISSED_NOTE
        );
        let server = EntryKey {
            direction: Direction::Server,
            ..unnamed
        };
        assert_eq!(process_note(&server, &off), "");
    }

    #[test]
    fn loopback_connections_give_both_sides() {
        let catches: BTreeSet<Catch> = [Catch {
            server_ip: ip("127.0.0.1"),
            server_port: 80,
            client_ip: ip("127.0.0.1"),
        }]
        .into();
        let mut t = table_with_listener();
        let added = merge_catches(&mut t, &catches, &BTreeSet::new(), &[], true);
        assert_eq!(added.len(), 2);
        // From BPF accepts, the server side only: BPF names the client from its connect.
        let mut t = table_with_listener();
        let added = merge_catches(&mut t, &catches, &BTreeSet::new(), &[], false);
        let sides: Vec<Direction> = added.iter().map(|k| k.direction).collect();
        assert_eq!(sides, vec![Direction::Server]);
    }
}
