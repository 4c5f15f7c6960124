//! A synthetic data centre for simulated agents: clusters of hosts that talk among themselves,
//! a few hubs every host uses (DNS, a shared database), and external endpoints. Each agent's
//! table is `entries` rows; every snapshot interval a share of them changes.

use rand::Rng;
use rand::rngs::SmallRng;
use tapgraph::proto;

/// Hosts per cluster.
const CLUSTER: usize = 20;
/// The first agents are the hubs.
const HUBS: usize = 4;
const HUB_PORTS: [u32; HUBS] = [53, 5432, 6379, 9092];
const CLUSTER_PORTS: [u32; 4] = [80, 443, 8080, 9000];
/// External endpoints (203.0.113.1 and up) the whole fleet shares.
const EXTERNALS: u32 = 64;

/// The address of agent `i`: 10.C.C.H, C the cluster, H the host in it.
pub fn address(i: usize) -> String {
    let c = i / CLUSTER;
    format!("10.{}.{}.{}", (c >> 8) & 0xff, c & 0xff, i % CLUSTER + 1)
}

/// One simulated host's connection table.
pub struct Table {
    pub me: usize,
    pub agents: usize,
    pub entries: Vec<proto::ConnectionEntry>,
    pub listeners: Vec<proto::ListeningService>,
    next_ephemeral: u32,
    /// Every row to a far end of its own: an edge per row, the heaviest map a table can make.
    spread: bool,
}

fn process(name: &str, pid: u32) -> Option<proto::ProcessInfo> {
    Some(proto::ProcessInfo {
        pid,
        name: name.into(),
        cmdline: String::new(),
    })
}

fn outbound(local: &str, remote: String, port: u32, name: &str) -> proto::ConnectionEntry {
    proto::ConnectionEntry {
        direction: proto::Direction::Client as i32,
        local_ip: local.into(),
        remote_ip: remote,
        server_port: port,
        protocol: proto::Protocol::Tcp as i32,
        process: process(name, 1000 + port),
        sockets: 1,
        ..Default::default()
    }
}

impl Table {
    /// Agent `me` of `agents`, with `entries` rows; with `spread` each to a far end of its own.
    pub fn new(
        me: usize,
        agents: usize,
        entries: usize,
        spread: bool,
        rng: &mut SmallRng,
    ) -> Table {
        let local = address(me);
        let mut listeners: Vec<proto::ListeningService> = CLUSTER_PORTS
            .iter()
            .map(|&port| proto::ListeningService {
                ip: "0.0.0.0".into(),
                port,
                protocol: proto::Protocol::Tcp as i32,
                process: process("app", 500 + port),
                netns: String::new(),
            })
            .collect();
        if me < HUBS {
            listeners.push(proto::ListeningService {
                ip: "0.0.0.0".into(),
                port: HUB_PORTS[me],
                protocol: proto::Protocol::Tcp as i32,
                process: process("hub", 400),
                netns: String::new(),
            });
        }
        let mut table = Table {
            me,
            agents,
            entries: Vec::with_capacity(entries),
            listeners,
            next_ephemeral: 0,
            spread,
        };
        // Every host uses every hub (one row each), then its cluster, then the outside world.
        for (h, port) in HUB_PORTS.iter().enumerate().take(agents.min(HUBS)) {
            if h != me && table.entries.len() < entries {
                table
                    .entries
                    .push(outbound(&local, address(h), *port, "client"));
            }
        }
        while table.entries.len() < entries {
            let row = table.random_row(rng);
            table.entries.push(row);
        }
        table
    }

    /// A row to a peer in the cluster (mostly) or to an external endpoint, each distinct.
    fn random_row(&mut self, rng: &mut SmallRng) -> proto::ConnectionEntry {
        let local = address(self.me);
        self.next_ephemeral += 1;
        let n = self.next_ephemeral;
        if self.spread {
            // 100.64.0.0/10: addresses no agent of the fleet has.
            let far = format!("100.{}.{}.{}", 64 + (n >> 16) % 64, (n >> 8) % 256, n % 256);
            return outbound(&local, far, 443, &format!("fetch-{n}"));
        }
        if rng.random_bool(0.8) {
            let base = self.me / CLUSTER * CLUSTER;
            let size = CLUSTER.min(self.agents - base);
            let peer = base + rng.random_range(0..size);
            let port = CLUSTER_PORTS[rng.random_range(0..CLUSTER_PORTS.len())];
            // Distinct rows: the peer's port is the same, the client process differs.
            outbound(&local, address(peer), port, &format!("worker-{n}"))
        } else {
            // The outside world is a fixed set of services the fleet keeps calling.
            let ext = format!("203.0.113.{}", rng.random_range(1..=EXTERNALS));
            outbound(&local, ext, 443, &format!("fetch-{n}"))
        }
    }

    /// Replaces `share` of the rows (at least one): (upserts, removed).
    pub fn churn(
        &mut self,
        share: f64,
        rng: &mut SmallRng,
    ) -> (Vec<proto::ConnectionEntry>, Vec<proto::ConnectionEntry>) {
        // The hub rows stay; each other row changes at most once.
        let keep = HUBS.min(self.entries.len());
        let n =
            ((self.entries.len() as f64 * share).ceil() as usize).min(self.entries.len() - keep);
        let mut removed = Vec::with_capacity(n);
        let mut added = Vec::with_capacity(n);
        for i in rand::seq::index::sample(rng, self.entries.len() - keep, n) {
            let i = i + keep;
            let row = self.random_row(rng);
            removed.push(std::mem::replace(&mut self.entries[i], row.clone()));
            added.push(row);
        }
        (added, removed)
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn tables_have_the_size_asked_and_use_the_hubs() {
        let mut rng = SmallRng::seed_from_u64(1);
        let t = Table::new(25, 100, 200, false, &mut rng);
        assert_eq!(t.entries.len(), 200);
        assert_eq!(address(25), "10.0.1.6");
        for (h, port) in HUB_PORTS.iter().enumerate() {
            assert!(
                t.entries
                    .iter()
                    .any(|e| e.remote_ip == address(h) && e.server_port == *port)
            );
        }
        // Rows stay within the cluster or go outside.
        assert!(
            t.entries
                .iter()
                .all(|e| e.remote_ip.starts_with("10.0.") || e.remote_ip.starts_with("203.0."))
        );
    }

    #[test]
    fn churn_keeps_the_size_and_reports_both_sides() {
        let mut rng = SmallRng::seed_from_u64(2);
        let mut t = Table::new(3, 50, 200, false, &mut rng);
        let (added, removed) = t.churn(0.05, &mut rng);
        assert_eq!((added.len(), removed.len()), (10, 10));
        assert_eq!(t.entries.len(), 200);
        assert!(added.iter().all(|a| t.entries.contains(a)));
    }
}
