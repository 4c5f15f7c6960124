//! Traffic per flow between two snapshots, from each TCP socket's cumulative `tcp_info`.
//!
//! The agent, not the controller, takes the differences: only it sees single sockets (by their
//! sock_diag cookie) and the ones that closed, while the controller sees aggregated rows whose
//! sockets come and go. A socket counts, at each read, what it moved since the read before
//! (all of it the first time it is seen); a socket that closed counts, from its destroy
//! notification, what it moved since it was last read (all of it if it lived between two
//! reads). So every byte is counted once, and a snapshot carries increments for the flows that
//! moved only: an idle connection costs nothing on the wire.
//!
//! Without destroy notifications (no CAP_NET_ADMIN), what a socket moved after its last read
//! before closing is lost, and so is a connection that lived between two reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tapgraph::proto;

use crate::snapshot::closed::{ClosedCounters, ClosedListener};
use crate::snapshot::conntrack::Translations;
use crate::snapshot::{Direction, Flow, Listener, Protocol, SocketRow, Table, TcpInfo, direction};

/// A socket not seen by this many reads in a row, and never reported closed, is forgotten: its
/// destroy notification was dropped, or it left with its namespace.
const FORGET_AFTER_READS: u64 = 3;

/// What one flow moved over an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moved {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segs_out: u64,
    pub segs_in: u64,
    pub retransmits: u64,
    /// Mean smoothed RTT over the flow's sockets that have a sample, µs (0: none).
    pub srtt_us: u32,
    /// Lowest RTT over them, µs (0: none).
    pub min_rtt_us: u32,
    /// Sockets that closed in the interval.
    pub closed: u32,
    srtt_sum: u64,
    srtt_n: u64,
}

impl Moved {
    fn add(&mut self, now: &TcpInfo, before: Option<&TcpInfo>) {
        let base = before.copied().unwrap_or_default();
        self.bytes_sent += now.bytes_sent.saturating_sub(base.bytes_sent);
        self.bytes_received += now.bytes_received.saturating_sub(base.bytes_received);
        self.segs_out += now.segs_out.saturating_sub(base.segs_out);
        self.segs_in += now.segs_in.saturating_sub(base.segs_in);
        self.retransmits += now.retransmits.saturating_sub(base.retransmits);
        if now.srtt_us > 0 {
            self.srtt_sum += u64::from(now.srtt_us);
            self.srtt_n += 1;
            self.srtt_us = (self.srtt_sum / self.srtt_n) as u32;
        }
        if now.min_rtt_us > 0 && (self.min_rtt_us == 0 || now.min_rtt_us < self.min_rtt_us) {
            self.min_rtt_us = now.min_rtt_us;
        }
    }

    fn moved(&self) -> bool {
        self.bytes_sent + self.bytes_received + self.segs_out + self.segs_in + self.retransmits > 0
            || self.closed > 0
    }
}

struct Seen {
    flow: Flow,
    info: TcpInfo,
    read: u64,
}

/// Remembers each live socket's counters at the last read.
#[derive(Default)]
pub struct Accountant {
    /// By (namespace, cookie): cookies are per namespace on older kernels.
    last: HashMap<(String, u64), Seen>,
    reads: u64,
}

impl Accountant {
    /// What moved since the last call, per flow that moved: `live` are the sockets of this read,
    /// `closed` the destroy notifications since the last call (the agent's own namespace),
    /// placed by `listeners` when the socket was never read.
    pub fn account(
        &mut self,
        live: Vec<(Flow, TcpInfo)>,
        closed: Vec<SocketRow>,
        listeners: &BTreeMap<Listener, u32>,
        nat: &Translations,
    ) -> BTreeMap<Flow, Moved> {
        self.reads += 1;
        let mut moved: BTreeMap<Flow, Moved> = BTreeMap::new();
        for (flow, info) in live {
            let key = (flow.netns.clone(), info.cookie);
            let before = self.last.get(&key).filter(|s| s.flow == flow);
            moved
                .entry(flow.clone())
                .or_default()
                .add(&info, before.map(|s| &s.info));
            self.last.insert(
                key,
                Seen {
                    flow,
                    info,
                    read: self.reads,
                },
            );
        }
        for row in closed {
            let Some(mut info) = row.tcp else { continue };
            let (flow, before) = match self.last.remove(&(String::new(), info.cookie)) {
                Some(seen) => {
                    // Read after the peer's FIN: the final count has it too.
                    if seen.info.peer_fin && !info.peer_fin {
                        info.bytes_received = info.bytes_received.saturating_sub(1);
                    }
                    (seen.flow, Some(seen.info))
                }
                None => (flow_of(&row, listeners, nat), None),
            };
            let m = moved.entry(flow).or_default();
            m.add(&info, before.as_ref());
            m.closed += 1;
        }
        let reads = self.reads;
        self.last
            .retain(|_, seen| reads - seen.read < FORGET_AFTER_READS);
        moved.retain(|_, m| m.moved());
        moved
    }

    /// Sockets remembered from earlier reads.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.last.len()
    }
}

/// The flow of a socket no read saw: a `Server` when a TCP listener of the namespace covers its
/// local address and port; a client the kernel translated (its conntrack entry outlives the
/// socket) is a flow towards the backend, as its row is.
fn flow_of(row: &SocketRow, listeners: &BTreeMap<Listener, u32>, nat: &Translations) -> Flow {
    let server = listeners.keys().any(|l| {
        l.protocol == Protocol::Tcp
            && l.netns.is_empty()
            && l.port == row.local.port()
            && direction::covers(l.ip, row.local.ip())
    });
    let remote = if server {
        row.remote
    } else {
        nat.backend(Protocol::Tcp, row.local, row.remote)
            .unwrap_or(row.remote)
    };
    let (direction, server_port) = if server {
        (Direction::Server, row.local.port())
    } else {
        (Direction::Client, remote.port())
    };
    Flow {
        netns: String::new(),
        direction,
        local_ip: row.local.ip(),
        remote_ip: remote.ip(),
        server_port,
    }
}

/// Most closed connections that wait for the next snapshot; past it they are dropped, counted.
const CLOSED_QUEUE: usize = 16_384;

/// The traffic side of `crate::report::Reporter`: per-socket counters, closed-socket
/// notifications, the last read's time; what a snapshot's `traffic` list is made of.
pub struct Traffic {
    accountant: Accountant,
    /// Destroy notifications; `None` without CAP_NET_ADMIN.
    closed: Option<ClosedListener>,
    /// When the read the next increments start from was taken (0: none yet).
    since: u64,
    /// Notifications dropped (queue full, kernel overruns) at the last look.
    dropped: u64,
}

impl Traffic {
    pub fn start(counters: &Arc<ClosedCounters>) -> Self {
        let closed = match ClosedListener::start(counters.clone(), CLOSED_QUEUE) {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::warn!(%error, "no closed-socket notifications (sock_diag destroy groups need CAP_NET_ADMIN): bytes a connection moves after the last table read before it closes are not counted");
                None
            }
        };
        Self {
            accountant: Accountant::default(),
            closed,
            since: 0,
            dropped: 0,
        }
    }

    /// The increments since the last snapshot, on the wire; `table.sockets` is taken.
    /// A closed connection no read saw is placed with `nat`, the last snapshot's translations;
    /// one with an end at a controller's address (`control_plane`) is a session, not a
    /// dependency, and is left out (once its listener is gone, its direction cannot be told).
    pub fn take(
        &mut self,
        table: &mut Table,
        now: u64,
        nat: &Translations,
        control_plane: &[std::net::SocketAddr],
    ) -> (Vec<proto::FlowTraffic>, u64) {
        let closed = match &self.closed {
            Some(listener) => {
                let c = &listener.counters;
                let dropped = c
                    .dropped_queue_full
                    .load(std::sync::atomic::Ordering::Relaxed)
                    + c.kernel_overruns.load(std::sync::atomic::Ordering::Relaxed);
                if dropped > self.dropped {
                    tracing::warn!(
                        dropped = dropped - self.dropped,
                        "closed-socket notifications dropped: their last bytes are not counted"
                    );
                    self.dropped = dropped;
                }
                listener.drain()
            }
            None => Vec::new(),
        };
        let closed: Vec<SocketRow> = closed
            .into_iter()
            .filter(|row| {
                let canon = |a: std::net::SocketAddr| {
                    std::net::SocketAddr::new(a.ip().to_canonical(), a.port())
                };
                !control_plane
                    .iter()
                    .map(|cp| canon(*cp))
                    .any(|cp| cp == canon(row.local) || cp == canon(row.remote))
            })
            .collect();
        let sockets = std::mem::take(&mut table.sockets);
        let moved = self
            .accountant
            .account(sockets, closed, &table.listeners, nat);
        let since = std::mem::replace(&mut self.since, now);
        (
            moved.iter().map(|(f, m)| flow_traffic(f, m)).collect(),
            since,
        )
    }
}

fn flow_traffic(f: &Flow, m: &Moved) -> proto::FlowTraffic {
    proto::FlowTraffic {
        direction: match f.direction {
            Direction::Client => proto::Direction::Client as i32,
            Direction::Server => proto::Direction::Server as i32,
        },
        local_ip: f.local_ip.to_string(),
        remote_ip: f.remote_ip.to_string(),
        server_port: u32::from(f.server_port),
        netns: f.netns.clone(),
        bytes_sent: m.bytes_sent,
        bytes_received: m.bytes_received,
        segments_sent: m.segs_out,
        segments_received: m.segs_in,
        retransmits: m.retransmits,
        srtt_us: m.srtt_us,
        min_rtt_us: m.min_rtt_us,
        closed: m.closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{ProcessKey, TcpState};

    fn flow(direction: Direction, port: u16) -> Flow {
        Flow {
            netns: String::new(),
            direction,
            local_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: "10.0.0.2".parse().unwrap(),
            server_port: port,
        }
    }

    fn info(cookie: u64, sent: u64, received: u64) -> TcpInfo {
        TcpInfo {
            cookie,
            bytes_sent: sent,
            bytes_received: received,
            segs_out: sent / 100,
            segs_in: received / 100,
            retransmits: 0,
            srtt_us: 1000 * cookie as u32,
            min_rtt_us: 500 * cookie as u32,
            peer_fin: false,
        }
    }

    fn closed(local: &str, remote: &str, info: TcpInfo) -> SocketRow {
        SocketRow {
            protocol: Protocol::Tcp,
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: TcpState::Close,
            uid: 0,
            inode: 0,
            tcp: Some(info),
        }
    }

    fn sent(m: &BTreeMap<Flow, Moved>) -> Vec<(Direction, u16, u64, u64, u32)> {
        m.iter()
            .map(|(f, m)| {
                (
                    f.direction,
                    f.server_port,
                    m.bytes_sent,
                    m.bytes_received,
                    m.closed,
                )
            })
            .collect()
    }

    /// Every byte once: live sockets count their growth, a socket that closes counts what it
    /// moved after its last read, a connection that lived between two reads counts whole,
    /// and an idle flow is not sent.
    #[test]
    fn every_byte_is_counted_once() {
        use Direction::*;
        let listeners: BTreeMap<Listener, u32> = [(
            Listener {
                netns: String::new(),
                ip: "0.0.0.0".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                process: ProcessKey::default(),
            },
            1,
        )]
        .into();
        let db = flow(Client, 5432);
        let mut a = Accountant::default();
        // Two sockets of one flow, first seen: all they moved so far.
        let first = a.account(
            vec![
                (db.clone(), info(1, 1000, 50)),
                (db.clone(), info(2, 10, 5)),
            ],
            vec![],
            &listeners,
            &Translations::default(),
        );
        assert_eq!(sent(&first), [(Client, 5432, 1010, 55, 0)]);
        assert_eq!(first[&db].srtt_us, 1500);
        assert_eq!(first[&db].min_rtt_us, 500);
        // Socket 1 moved 500 more; socket 2 idle.
        let second = a.account(
            vec![
                (db.clone(), info(1, 1500, 50)),
                (db.clone(), info(2, 10, 5)),
            ],
            vec![],
            &listeners,
            &Translations::default(),
        );
        assert_eq!(sent(&second), [(Client, 5432, 500, 0, 0)]);
        // Nothing moved: nothing to send.
        let idle = a.account(
            vec![
                (db.clone(), info(1, 1500, 50)),
                (db.clone(), info(2, 10, 5)),
            ],
            vec![],
            &listeners,
            &Translations::default(),
        );
        assert!(idle.is_empty());
        // Socket 2 closes after moving 90 more; a connection to :80 came and went between two
        // reads (never read); socket 1 stays idle.
        let third = a.account(
            vec![(db.clone(), info(1, 1500, 50))],
            vec![
                closed("10.0.0.1:40000", "10.0.0.2:5432", info(2, 100, 5)),
                closed("10.0.0.1:80", "10.0.0.9:50000", info(7, 300, 4000)),
            ],
            &listeners,
            &Translations::default(),
        );
        assert_eq!(
            sent(&third),
            [(Client, 5432, 90, 0, 1), (Server, 80, 300, 4000, 1)]
        );
        assert_eq!(a.remembered(), 1);
    }

    /// A socket whose notification never comes is forgotten after a few reads.
    #[test]
    fn unseen_sockets_are_forgotten() {
        let mut a = Accountant::default();
        let f = flow(Direction::Client, 443);
        a.account(
            vec![(f, info(1, 1, 1))],
            vec![],
            &BTreeMap::new(),
            &Translations::default(),
        );
        for _ in 0..FORGET_AFTER_READS {
            assert_eq!(a.remembered(), 1);
            a.account(vec![], vec![], &BTreeMap::new(), &Translations::default());
        }
        assert_eq!(a.remembered(), 0);
    }

    /// A client of a virtual address that came and went between two reads: its bytes count on
    /// the backend's flow, as its row would, from the conntrack entry that outlives the socket.
    #[test]
    fn a_closed_connection_through_nat_counts_on_the_backend() {
        use crate::snapshot::conntrack::Flow as Translated;
        let local: std::collections::BTreeSet<std::net::IpAddr> =
            ["10.0.0.1".parse().unwrap()].into();
        let nat = Translations::new(
            [Translated {
                protocol: Protocol::Tcp,
                client: "10.0.0.1:40000".parse().unwrap(),
                dialled: "10.96.0.10:53".parse().unwrap(),
                backend: "10.0.0.2:8053".parse().unwrap(),
            }],
            &local,
        );
        let mut a = Accountant::default();
        let moved = a.account(
            vec![],
            vec![closed("10.0.0.1:40000", "10.96.0.10:53", info(3, 100, 20))],
            &BTreeMap::new(),
            &nat,
        );
        let flows: Vec<_> = moved.keys().map(|f| (f.remote_ip, f.server_port)).collect();
        assert_eq!(flows, [("10.0.0.2".parse().unwrap(), 8053)]);
    }
}
