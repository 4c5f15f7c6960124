//! Turns connection tables into `ConnectionSnapshot` messages: a full one first, then the changes
//! since the last one sent, each numbered so the controller can tell a gap and ask for a resync.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tapgraph::proto;

use crate::shortlived::{self, Catch, Catcher};
use crate::snapshot::closed::ClosedCounters;
use crate::snapshot::conntrack::NatFront;
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
}

/// The agent's side of the connection table: owns the snapshotter (its inode→process cache) and
/// the SYN-ACK capture, and remembers what the controller was last sent.
///
/// Guarantees: sequence numbers start at 1 and grow by one per snapshot; a delta's
/// `base_sequence` is the snapshot it applies to, and applying it to the table the controller
/// holds yields the current one exactly; a full snapshot replaces that table. A failed read
/// returns an error and changes nothing, so the next delta is still against what was sent.
/// Rows only the SYN-ACK capture saw are marked `short_lived`.
pub struct Reporter {
    snapshotter: Snapshotter,
    /// The table the controller has, after the last snapshot it was sent.
    sent: Option<Table>,
    sequence: u64,
    /// The controllers' addresses.
    control_plane: Vec<SocketAddr>,
    /// SYN-ACK capture for connections too short for a table read; `None` without CAP_NET_RAW.
    catcher: Option<Catcher>,
    /// Rows of the last table that only the SYN-ACK capture saw.
    short_lived: BTreeSet<EntryKey>,
    pub short_lived_caught: u64,
    /// SYN-ACKs the capture had to drop (queue full), at the last look.
    short_lived_dropped: u64,
    /// Traffic between snapshots; see [`crate::traffic`].
    traffic: Traffic,
}

/// Adds the connections `catches` saw that `table` does not show, as rows of their own; returns the
/// keys added. A server-side row names the process listening on the port; a client-side row cannot
/// name its process (the socket is gone).
pub fn merge_catches(
    table: &mut Table,
    catches: &BTreeSet<Catch>,
    local: &BTreeSet<IpAddr>,
    control_plane: &[SocketAddr],
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
        if is_local(&c.client_ip) {
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

fn entry(k: &EntryKey, v: Option<&EntryValue>, short_lived: bool) -> proto::ConnectionEntry {
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
    /// Starts the SYN-ACK capture where the agent may (CAP_NET_RAW); counts drops into `drops`.
    pub fn new(control_plane: Option<SocketAddr>, scope: Scope, drops: &Drops) -> Self {
        let catcher = match Catcher::start(drops.short_lived.clone()) {
            Ok(c) => Some(c),
            Err(error) => {
                tracing::warn!(%error, "no short-lived connection capture (needs CAP_NET_RAW); periodic tables only");
                None
            }
        };
        Self {
            snapshotter: Snapshotter::with_scope("/proc".into(), control_plane, scope)
                .with_failures(drops.table_reads.clone()),
            sent: None,
            sequence: 0,
            control_plane: control_plane.into_iter().collect(),
            catcher,
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
            self.short_lived = merge_catches(&mut table, &catches, &local, &self.control_plane);
            self.short_lived_caught += self.short_lived.len() as u64;
        }
        let base = self.sequence;
        self.sequence += 1;
        let taken_at = tapgraph::time::unix_nanos();
        let (traffic, traffic_since) = self.traffic.take(&mut table, taken_at);
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
        match (&self.sent, full) {
            (Some(prev), false) => {
                let d = snapshot::delta(prev, &table);
                msg.full = false;
                msg.base_sequence = base;
                msg.entries = d
                    .upserts
                    .iter()
                    .map(|(k, v)| entry(k, Some(v), short(k)))
                    .collect();
                msg.removed = d.removed.iter().map(|k| entry(k, None, false)).collect();
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
                    .map(|(k, v)| entry(k, Some(v), short(k)))
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
        let added = merge_catches(&mut t, &catches, &local, &[]);
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
        merge_catches(&mut t, &catches, &local, &controllers);
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
        let mut reporter = Reporter::new(None, Scope::Own, &Drops::default());
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
        let mut reporter = Reporter::new(None, Scope::Own, &drops);
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
        assert!(merge_catches(&mut t, &catches, &local, &[]).is_empty());
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
            let added = merge_catches(&mut merged, &[catch].into(), &local, &[]);
            assert_eq!(added.len(), sockets.len(), "{catch:?}");
            assert_eq!(rows(&merged), rows(&read), "{catch:?}");
        }
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
        let added = merge_catches(&mut t, &catches, &BTreeSet::new(), &[]);
        assert_eq!(added.len(), 2);
    }
}
