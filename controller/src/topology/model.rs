//! The dependency map as a pure model: per-agent connection tables in, one graph out.
//!
//! Each agent reports aggregated rows ("observations"). A client row of agent A towards B's
//! listening port and the server row of B for the same connection map to the same edge key,
//! `Host(A) → Service(B, tcp, 6379)`, so both ends reported by two agents make one edge. An address
//! that no agent owns is an `Address` node: an external or agentless endpoint.
//!
//! Edges are derived incrementally: each observation knows its edge key, and only observations
//! whose endpoints' ownership changes (a host's addresses or listeners) are re-keyed.
//!
//! An address two hosts claim is owned by the first claimant; the others are recorded, so the map
//! can show the conflict, and the next claimant takes over when the owner lets the address go.
//! Claim order is not stored: tables restored after a restart claim in the order they are given.
//! Values no real host reports (a broadcast endpoint, port 0, more sockets in a row than there are
//! ports) are refused by the `check_*` functions of [`super::ingest`] before they reach the
//! model.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::reporters::Reporters;

pub type AgentId = String;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    Client,
    Server,
}

/// One aggregated row as an agent reported it. Its names are boxed `str`s, not `String`s: the
/// model holds each row three times (its table, the row → edge index, its edge's reporters).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObsKey {
    /// The agent's network namespace for the row, in snapshot scope `all`; empty for its own.
    /// Rows of two namespaces never merge: `127.0.0.1` in each is a different place.
    #[serde(default)]
    pub netns: Box<str>,
    pub direction: Direction,
    pub local_ip: IpAddr,
    pub remote_ip: IpAddr,
    pub server_port: u16,
    pub protocol: Protocol,
    pub process: Box<str>,
    /// The address the client dialled, when its host's kernel translated the connection: the
    /// row is then towards the backend (`remote_ip`, `server_port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObsValue {
    pub sockets: u32,
    pub control_plane: bool,
    pub short_lived: bool,
    /// Why a client row has no process, as its agent said ("process unknown: no BPF on this
    /// host"); empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub process_note: String,
}

/// The endpoints of a TCP row without its process: what an agent counts traffic by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FlowKey {
    #[serde(default)]
    pub netns: Box<str>,
    pub direction: Direction,
    pub local_ip: IpAddr,
    pub remote_ip: IpAddr,
    pub server_port: u16,
}

impl FlowKey {
    /// The row this flow's sockets make, process left out: it belongs to the same edge.
    pub fn obs(&self) -> ObsKey {
        ObsKey {
            netns: self.netns.clone(),
            direction: self.direction,
            local_ip: self.local_ip,
            remote_ip: self.remote_ip,
            server_port: self.server_port,
            protocol: Protocol::Tcp,
            process: Box::default(),
            via: None,
        }
    }
}

/// A flow's traffic as one agent measured it from its side, summed over the snapshots that
/// carried increments for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTotals {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segments_sent: u64,
    pub segments_received: u64,
    pub retransmits: u64,
    /// Sockets counted at close.
    pub closed: u64,
    /// As of the last increment, µs; 0: no sample.
    pub srtt_us: u32,
    pub min_rtt_us: u32,
    /// The latest increment: when it came (controller time, ms), the interval it covered, and
    /// the bytes each way in it (zeroed by a snapshot that did not move the flow); the rates
    /// are these over the interval.
    pub last_ms: u64,
    pub last_interval_ms: u64,
    pub last_sent: u64,
    pub last_received: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ListenerKey {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// As [`ObsKey::netns`]: pods of one host may all listen on `0.0.0.0:8080`.
    #[serde(default)]
    pub netns: String,
}

/// An address a host translates for clients elsewhere: connections to `front` land on
/// `backend` (a DNAT on the way in, as for a published container port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NatFront {
    pub protocol: Protocol,
    pub front: SocketAddr,
    pub backend: SocketAddr,
}

/// A graph node's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Node {
    Host(AgentId),
    Address(IpAddr),
    Service {
        host: AgentId,
        protocol: Protocol,
        port: u16,
    },
}

impl Node {
    /// Stable text id: `host:web-1`, `addr:10.0.0.9`, `svc:db-1/tcp/5432`.
    pub fn id(&self) -> String {
        match self {
            Node::Host(h) => format!("host:{h}"),
            Node::Address(ip) => format!("addr:{ip}"),
            Node::Service {
                host,
                protocol,
                port,
            } => format!("svc:{host}/{}/{port}", protocol.as_str()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EdgeKey {
    pub from: Node,
    pub to: Node,
    pub port: u16,
    pub protocol: Protocol,
}

impl EdgeKey {
    /// Stable text id, e.g. `host:web|svc:db/tcp/6379|6379/tcp`.
    pub fn id(&self) -> String {
        format!(
            "{}|{}|{}/{}",
            self.from.id(),
            self.to.id(),
            self.port,
            self.protocol.as_str()
        )
    }
}

/// An edge as stored: its history outlives the observations that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edge {
    pub key: EdgeKey,
    /// The connecting process, when the client side was reported.
    pub process: String,
    pub sockets: u32,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub control_plane: bool,
    pub short_lived: bool,
    /// The address the client dialled when the connection was translated to this edge's
    /// service (`10.96.0.10:53`); empty for a connection made to the service itself.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub via: String,
    /// Why `process` is empty, as the client's agent said; empty once a process is known.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub process_note: String,
    /// Current observations (agent, row) backing this edge; empty once they are gone.
    #[serde(skip)]
    pub reporters: Reporters,
}

impl Edge {
    /// A new edge first seen at `now_ms`, with nothing known of it yet but its key.
    fn new(key: EdgeKey, now_ms: u64, short_lived: bool) -> Self {
        Edge {
            key,
            process: String::new(),
            sockets: 0,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            control_plane: false,
            short_lived,
            via: String::new(),
            process_note: String::new(),
            reporters: Reporters::default(),
        }
    }

    /// Active while seen within `ttl`. Every snapshot of a reporting agent refreshes `last_seen`,
    /// so a closed connection, and every edge of an agent that went silent, turns inactive after it.
    pub fn active(&self, now_ms: u64, ttl_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_seen_ms) < ttl_ms
    }
}

/// What one agent currently reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentTable {
    pub hostname: String,
    pub addresses: BTreeSet<IpAddr>,
    #[serde(with = "super::persist::pairs")]
    pub listeners: BTreeMap<ListenerKey, String>,
    #[serde(with = "super::persist::pairs")]
    pub entries: BTreeMap<ObsKey, ObsValue>,
    pub last_snapshot_ms: u64,
    /// TCP traffic this agent measured, per flow, kept across its full snapshots; a flow
    /// without increments for the retention is dropped.
    #[serde(default, with = "super::persist::pairs")]
    pub traffic: BTreeMap<FlowKey, FlowTotals>,
    /// The addresses this host translates for clients elsewhere.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub nat_fronts: BTreeSet<NatFront>,
}

impl AgentTable {
    /// Where a connection to `front` lands, when this host translates it: the lowest backend
    /// when it balances between several (a row does not say which one it reached).
    fn backend_of(&self, protocol: Protocol, front: SocketAddr) -> Option<SocketAddr> {
        let from = NatFront {
            protocol,
            front,
            backend: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        self.nat_fronts
            .range(from..)
            .next()
            .filter(|f| f.protocol == protocol && f.front == front)
            .map(|f| f.backend)
    }
}

/// A hash table this much larger than what it holds gives the memory back: after a burst (one
/// huge table, since replaced by a small one) it would otherwise stay at its largest for good.
/// Shrinking at a quarter keeps the cost amortised.
fn sparse(capacity: usize, len: usize) -> bool {
    capacity > 4 * len + 64
}

/// Addresses that never identify a host across the network.
fn is_local_only(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// Marks `edge` seen at `now_ms` through one of its rows; true when its stored form changed (see
/// [`Changes::edges_upserted`]), not only `last_seen`. The result depends on the edge's reporters,
/// not on the order rows arrive in: several client processes of one host on one edge name it
/// after the last in key order.
fn refresh(edge: &mut Edge, value: &ObsValue, now_ms: u64) -> bool {
    edge.last_seen_ms = edge.last_seen_ms.max(now_ms);
    let short_lived = value.short_lived && edge.reporters.len() == 1;
    let mut changed = short_lived != edge.short_lived;
    edge.short_lived = short_lived;
    if let Some(process) = edge.reporters.last_client_process()
        && *process != *edge.process
    {
        edge.process = process.to_string();
        changed = true;
    }
    // A client row says why its process is unknown; a server row (no note) never clears it.
    if !value.process_note.is_empty() || !edge.process.is_empty() {
        let note = if edge.process.is_empty() {
            value.process_note.as_str()
        } else {
            ""
        };
        if edge.process_note != note {
            edge.process_note = note.to_string();
            changed = true;
        }
    }
    changed
}

/// The whole map.
#[derive(Debug, Default)]
pub struct Model {
    pub agents: BTreeMap<AgentId, AgentTable>,
    pub edges: BTreeMap<EdgeKey, Edge>,
    /// The hosts claiming each routable address, first claimant first: it owns the address on
    /// the map, and any other makes a conflict.
    claims: HashMap<IpAddr, Vec<AgentId>>,
    /// Rows held in every agent's table: entries, listeners and addresses.
    rows: usize,
    /// The edge each current observation belongs to, by agent: looked up without cloning keys.
    keyed: HashMap<AgentId, HashMap<ObsKey, EdgeKey>>,
    /// The agents with rows whose far end is an address, and how many: to re-key those rows when
    /// the address's owner or listeners change. Counts, not the rows: the agents' tables have
    /// those, and a copy of every row here cost a quarter of the map's memory.
    by_remote: HashMap<IpAddr, HashMap<AgentId, u32>>,
    /// Rows `rekey` read, for tests that pin its cost.
    #[cfg(test)]
    scanned: usize,
}

/// What a change did, for the store and the sinks.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Edges whose stored form changed: new ones, and those whose process, sockets or flags
    /// changed or that lost their last reporter (their `last_seen` is history from then on). A
    /// `last_seen` refreshed while an agent still reports the edge is not stored: a restart
    /// restores it from that agent's table (its `last_snapshot_ms`), see [`Model::replace`].
    pub edges_upserted: BTreeSet<EdgeKey>,
    pub edges_removed: BTreeSet<EdgeKey>,
    /// Addresses this change claimed that another host already owns: one per new claim, not
    /// per snapshot that repeats it.
    pub conflicts: Vec<Conflict>,
}

/// A host claimed an address another host already owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub address: IpAddr,
    /// The host the map attributes the address to.
    pub owner: AgentId,
    pub claimant: AgentId,
}

/// The rows a table holds, as the fleet's budget counts them.
pub fn rows(table: &AgentTable) -> usize {
    table.entries.len() + table.listeners.len() + table.addresses.len() + table.nat_fronts.len()
}

impl Model {
    /// The host that owns `ip` as seen from `agent` (loopback belongs to the agent itself).
    fn owner(&self, agent: &str, ip: &IpAddr) -> Option<AgentId> {
        if is_local_only(ip) {
            return Some(agent.to_string());
        }
        self.claims.get(ip).and_then(|c| c.first()).cloned()
    }

    /// Rows held in every agent's table (see [`rows`]).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Addresses claimed by more than one host.
    pub fn conflicts(&self) -> usize {
        self.claims.values().filter(|c| c.len() > 1).count()
    }

    /// The hosts claiming `ip`, the owner first; empty for an address no host claims.
    pub fn claimants(&self, ip: &IpAddr) -> &[AgentId] {
        self.claims.get(ip).map_or(&[], Vec::as_slice)
    }

    /// `agent` claims `ip`; the conflict when another host owns it already.
    fn claim(&mut self, ip: IpAddr, agent: &str) -> Option<Conflict> {
        let claimants = self.claims.entry(ip).or_default();
        if claimants.iter().any(|c| c == agent) {
            return None;
        }
        claimants.push(agent.to_string());
        let owner = claimants.first().filter(|o| o.as_str() != agent)?;
        Some(Conflict {
            address: ip,
            owner: owner.clone(),
            claimant: agent.to_string(),
        })
    }

    /// `agent` no longer claims `ip`: the next claimant, if any, owns it now.
    fn unclaim(&mut self, ip: &IpAddr, agent: &str) {
        if let Some(claimants) = self.claims.get_mut(ip) {
            claimants.retain(|c| c != agent);
            if claimants.is_empty() {
                self.claims.remove(ip);
            }
        }
    }

    fn listens(&self, host: &str, ip: &IpAddr, port: u16, protocol: Protocol) -> bool {
        self.agents.get(host).is_some_and(|t| {
            t.listeners.keys().any(|l| {
                l.port == port
                    && l.protocol == protocol
                    && (l.ip == *ip || l.ip.is_unspecified() || is_local_only(ip))
            })
        })
    }

    /// Where a client row really goes when the host owning its far end translates that
    /// address (see [`NatFront`]): the backend, and the address dialled.
    fn translated(&self, agent: &str, obs: &ObsKey) -> Option<(SocketAddr, SocketAddr)> {
        if obs.direction != Direction::Client || obs.via.is_some() {
            return None;
        }
        let owner = self.owner(agent, &obs.remote_ip)?;
        let front = SocketAddr::new(obs.remote_ip, obs.server_port);
        let backend = self.agents.get(&owner)?.backend_of(obs.protocol, front)?;
        Some((backend, front))
    }

    /// The address a row's client dialled, when its connection was translated: by its own host
    /// (the row says so) or by the host it dialled.
    fn via(&self, agent: &str, obs: &ObsKey) -> Option<SocketAddr> {
        obs.via
            .or_else(|| self.translated(agent, obs).map(|(_, front)| front))
    }

    pub(super) fn edge_key(&self, agent: &str, obs: &ObsKey) -> EdgeKey {
        let far = |ip: &IpAddr| self.owner(agent, ip);
        let (remote_ip, server_port) = match self.translated(agent, obs) {
            Some((backend, _)) => (backend.ip(), backend.port()),
            None => (obs.remote_ip, obs.server_port),
        };
        let (from, to) = match obs.direction {
            Direction::Client => {
                // A loopback or link-local server is this host's own, listener seen or not: as an
                // Address node it would be one node shared by every host, joining them all.
                let local = is_local_only(&remote_ip);
                let to = match far(&remote_ip) {
                    Some(h) if local || self.listens(&h, &remote_ip, server_port, obs.protocol) => {
                        Node::Service {
                            host: h,
                            protocol: obs.protocol,
                            port: server_port,
                        }
                    }
                    _ => Node::Address(remote_ip),
                };
                (Node::Host(agent.to_string()), to)
            }
            Direction::Server => {
                let from = match far(&obs.remote_ip) {
                    Some(h) => Node::Host(h),
                    None => Node::Address(obs.remote_ip),
                };
                let to = Node::Service {
                    host: agent.to_string(),
                    protocol: obs.protocol,
                    port: obs.server_port,
                };
                (from, to)
            }
        };
        EdgeKey {
            from,
            to,
            port: server_port,
            protocol: obs.protocol,
        }
    }

    fn attach(
        &mut self,
        agent: &str,
        obs: &ObsKey,
        value: &ObsValue,
        now_ms: u64,
        ch: &mut Changes,
    ) {
        let key = self.edge_key(agent, obs);
        let via = self.via(agent, obs);
        let id = (agent.to_string(), obs.clone());
        let mut changed = false;
        let edge = self.edges.entry(key.clone()).or_insert_with(|| {
            changed = true;
            Edge::new(key.clone(), now_ms, false)
        });
        if let Some(via) = via.map(|v| v.to_string())
            && via != edge.via
        {
            edge.via = via;
            changed = true;
        }
        let before = (edge.sockets, edge.control_plane, edge.short_lived);
        changed |= edge.reporters.is_empty();
        // A row seen before the edge was made dates it (the row was keyed elsewhere until its
        // far end's table came, or its table came later from another replica): the first
        // sighting is the earliest of its rows', whatever order the tables arrive in.
        if now_ms < edge.first_seen_ms {
            edge.first_seen_ms = now_ms;
            changed = true;
        }
        edge.reporters.insert(id.clone(), value.sockets);
        edge.control_plane |= value.control_plane;
        // Both ends see the same sockets: the larger count, never the sum.
        edge.sockets = edge.reporters.max_sockets().unwrap_or(0);
        changed |= refresh(edge, value, now_ms);
        if changed || before != (edge.sockets, edge.control_plane, edge.short_lived) {
            ch.edges_upserted.insert(key.clone());
        }
        let rows = match self.keyed.get_mut(agent) {
            Some(rows) => rows,
            None => self.keyed.entry(agent.to_string()).or_default(),
        };
        if rows.insert(obs.clone(), key).is_none() {
            let agents = self.by_remote.entry(obs.remote_ip).or_default();
            match agents.get_mut(agent) {
                Some(n) => *n += 1,
                None => {
                    agents.insert(agent.to_string(), 1);
                }
            }
        }
    }

    /// Marks the edge of a row `agent` reports again, unchanged, as seen at `now_ms`.
    fn touch(
        &mut self,
        agent: &str,
        obs: &ObsKey,
        value: &ObsValue,
        now_ms: u64,
        ch: &mut Changes,
    ) {
        let Some(key) = self.keyed.get(agent).and_then(|rows| rows.get(obs)) else {
            return;
        };
        if let Some(edge) = self.edges.get_mut(key)
            && refresh(edge, value, now_ms)
        {
            ch.edges_upserted.insert(key.clone());
        }
    }

    fn detach(&mut self, agent: &str, obs: &ObsKey, ch: &mut Changes) {
        let id = (agent.to_string(), obs.clone());
        let Some(key) = self.keyed.get_mut(agent).and_then(|rows| rows.remove(obs)) else {
            return;
        };
        if let Some(agents) = self.by_remote.get_mut(&obs.remote_ip)
            && let Some(n) = agents.get_mut(agent)
        {
            *n -= 1;
            if *n == 0 {
                agents.remove(agent);
                if agents.is_empty() {
                    self.by_remote.remove(&obs.remote_ip);
                }
            }
        }
        if let Some(edge) = self.edges.get_mut(&key) {
            edge.reporters.remove(&id);
            let sockets = edge.reporters.max_sockets().unwrap_or(edge.sockets);
            if sockets != edge.sockets || edge.reporters.is_empty() {
                edge.sockets = sockets;
                ch.edges_upserted.insert(key);
            }
        }
    }

    /// Re-keys every observation whose far end is one of `ips` (their owner or listeners changed).
    /// Each agent with rows towards any of `ips` has its table scanned once, however many of
    /// `ips` it talks to: a host claiming many addresses a hub talks to costs one pass over the
    /// hub's table, not one per address.
    fn rekey(&mut self, ips: &BTreeSet<IpAddr>, ch: &mut Changes) {
        // Rows towards a front land on its backend: they move with the backend's owner too.
        let fronts: BTreeSet<IpAddr> = self
            .agents
            .values()
            .flat_map(|t| &t.nat_fronts)
            .filter(|f| ips.contains(&f.backend.ip()))
            .map(|f| f.front.ip())
            .collect();
        let ips: BTreeSet<IpAddr> = if fronts.is_empty() {
            ips.clone()
        } else {
            ips.union(&fronts).copied().collect()
        };
        let ips = &ips;
        let agents: BTreeSet<&AgentId> = ips
            .iter()
            .filter_map(|ip| self.by_remote.get(ip))
            .flat_map(|a| a.keys())
            .collect();
        let mut ids: Vec<(AgentId, ObsKey)> = Vec::new();
        for agent in agents {
            let Some(t) = self.agents.get(agent) else {
                continue;
            };
            #[cfg(test)]
            {
                self.scanned += t.entries.len();
            }
            let rows = t.entries.keys().filter(|obs| ips.contains(&obs.remote_ip));
            ids.extend(rows.map(|obs| (agent.clone(), obs.clone())));
        }
        for (agent, obs) in ids {
            // The row was last seen when its own agent last reported it, not now: after a
            // restart the tables come back one by one, and the edge keeps the later time.
            let Some((value, seen)) = self.agents.get(&agent).and_then(|t| {
                let value = t.entries.get(&obs)?.clone();
                Some((value, t.last_snapshot_ms))
            }) else {
                continue;
            };
            let old = self
                .keyed
                .get(&agent)
                .and_then(|rows| rows.get(&obs))
                .cloned();
            if old.as_ref() != Some(&self.edge_key(&agent, &obs)) {
                self.detach(&agent, &obs, ch);
                // An edge that existed only under the old ownership was never a dependency of its
                // own (e.g. `Address(10.0.0.2)` before the agent owning 10.0.0.2 reported).
                if let Some(old) = old
                    && self.edges.get(&old).is_some_and(|e| e.reporters.is_empty())
                {
                    self.edges.remove(&old);
                    ch.edges_upserted.remove(&old);
                    ch.edges_removed.insert(old);
                }
                self.attach(&agent, &obs, &value, seen, ch);
            }
        }
    }

    /// Replaces everything `agent` reports (a full snapshot, or the agent's first).
    pub fn replace(&mut self, agent: &str, table: AgentTable, now_ms: u64) -> Changes {
        self.replace_with(agent, table, now_ms, true)
    }

    /// Makes sure the edge of `agent`'s flow exists: a connection that opened and closed between
    /// two snapshots left no row, yet it was a dependency, and its traffic needs an edge to
    /// show on. Such an edge has no reporters: it is history from the start.
    pub fn ensure_flow_edge(&mut self, agent: &str, flow: &FlowKey, now_ms: u64, ch: &mut Changes) {
        let key = self.edge_key(agent, &flow.obs());
        match self.edges.get_mut(&key) {
            Some(edge) => {
                if edge.reporters.is_empty() && edge.last_seen_ms < now_ms {
                    edge.last_seen_ms = now_ms;
                    ch.edges_upserted.insert(key);
                }
            }
            None => {
                self.edges
                    .insert(key.clone(), Edge::new(key.clone(), now_ms, true));
                ch.edges_upserted.insert(key);
            }
        }
    }

    /// Removes `agent`'s table: its rows leave their edges (history stays, as when an agent
    /// reports them no more), the addresses it claimed pass to their next claimants, and its
    /// host leaves the map.
    pub fn remove(&mut self, agent: &str) -> Changes {
        if !self.agents.contains_key(agent) {
            return Changes::default();
        }
        let ch = self.replace(agent, AgentTable::default(), 0);
        self.agents.remove(agent);
        self.keyed.remove(agent);
        ch
    }

    /// `replace`; `incremental: false` re-attaches every row (tests compare the two ways).
    fn replace_with(
        &mut self,
        agent: &str,
        table: AgentTable,
        now_ms: u64,
        incremental: bool,
    ) -> Changes {
        let mut table = table;
        table.last_snapshot_ms = now_ms;
        let mut ch = Changes::default();
        let old = self.agents.remove(agent).unwrap_or_default();
        self.rows = self.rows - rows(&old) + rows(&table);
        if incremental
            && old.addresses == table.addresses
            && old.listeners.keys().eq(table.listeners.keys())
            && old.nat_fronts == table.nat_fronts
        {
            self.replace_rows(agent, old, table, now_ms, &mut ch);
            self.shrink_rows(agent);
            return ch;
        }
        let old_keys: Vec<(ObsKey, EdgeKey)> = match self.keyed.get(agent) {
            Some(rows) => old
                .entries
                .keys()
                .filter_map(|obs| Some((obs.clone(), rows.get(obs)?.clone())))
                .collect(),
            None => Vec::new(),
        };
        for obs in old.entries.keys() {
            self.detach(agent, obs, &mut ch);
        }
        // Ownership of addresses: an address let go passes to its next claimant (it is among
        // the `touched`, so its rows are re-keyed below).
        for ip in old.addresses.difference(&table.addresses) {
            self.unclaim(ip, agent);
        }
        for ip in table.addresses.difference(&old.addresses) {
            if !is_local_only(ip)
                && let Some(conflict) = self.claim(*ip, agent)
            {
                ch.conflicts.push(conflict);
            }
        }
        let mut touched: BTreeSet<IpAddr> =
            old.addresses.union(&table.addresses).copied().collect();
        touched.extend(old.listeners.keys().map(|l| l.ip));
        // Rows towards a front this host translates, or translated, land elsewhere now.
        touched.extend(
            old.nat_fronts
                .symmetric_difference(&table.nat_fronts)
                .map(|f| f.front.ip()),
        );
        // The rows are attached while the table, without them, is in place (attaching reads its
        // listeners, never its rows): no copy of a large table.
        let entries = std::mem::take(&mut table.entries);
        self.agents.insert(agent.to_string(), table);
        for (obs, value) in &entries {
            self.attach(agent, obs, value, now_ms, &mut ch);
        }
        if let Some(t) = self.agents.get_mut(agent) {
            t.entries = entries;
        }
        // A row still reported under a new key (its far end's owner or listener became known)
        // leaves no phantom behind: the old edge existed only under the old ownership.
        for (obs, old_key) in old_keys {
            let now_key = self.keyed.get(agent).and_then(|rows| rows.get(&obs));
            if now_key.is_some_and(|k| *k != old_key)
                && self
                    .edges
                    .get(&old_key)
                    .is_some_and(|e| e.reporters.is_empty())
            {
                self.edges.remove(&old_key);
                ch.edges_upserted.remove(&old_key);
                ch.edges_removed.insert(old_key);
            }
        }
        if old.addresses != self.agents[agent].addresses
            || old.listeners.keys().ne(self.agents[agent].listeners.keys())
            || old.nat_fronts != self.agents[agent].nat_fronts
        {
            touched.extend(self.agents[agent].addresses.iter().copied());
            self.rekey(&touched, &mut ch);
        }
        self.shrink_rows(agent);
        ch
    }

    /// Gives back the memory of `agent`'s row index when its table shrank to a fraction of it.
    fn shrink_rows(&mut self, agent: &str) {
        if let Some(rows) = self.keyed.get_mut(agent)
            && sparse(rows.capacity(), rows.len())
        {
            rows.shrink_to_fit();
        }
    }

    /// `replace` when the agent's addresses and listeners stay as they were, as in most deltas:
    /// every edge key stays as it was, so only the rows that changed are detached and attached,
    /// and the rows reported again unchanged only mark their edges seen.
    fn replace_rows(
        &mut self,
        agent: &str,
        old: AgentTable,
        table: AgentTable,
        now_ms: u64,
        ch: &mut Changes,
    ) {
        // Both tables are sorted: one pass over the two side by side, rather than a lookup of
        // each row in the other table (key comparisons were a quarter of the snapshot cost).
        let (mut gone, mut same, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
        let mut before = old.entries.iter().peekable();
        let mut after = table.entries.iter().peekable();
        loop {
            match (before.peek(), after.peek()) {
                (Some(&(ko, vo)), Some(&(kn, vn))) => match ko.cmp(kn) {
                    std::cmp::Ordering::Less => {
                        gone.push(ko);
                        before.next();
                    }
                    std::cmp::Ordering::Greater => {
                        fresh.push((kn.clone(), vn.clone()));
                        after.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if vo == vn {
                            same.push((kn, vn));
                        } else {
                            gone.push(ko);
                            fresh.push((kn.clone(), vn.clone()));
                        }
                        before.next();
                        after.next();
                    }
                },
                (Some(&(ko, _)), None) => {
                    gone.push(ko);
                    before.next();
                }
                (None, Some(&(kn, vn))) => {
                    fresh.push((kn.clone(), vn.clone()));
                    after.next();
                }
                (None, None) => break,
            }
        }
        for obs in gone {
            self.detach(agent, obs, ch);
        }
        for (obs, value) in same {
            self.touch(agent, obs, value, now_ms, ch);
        }
        // A new row's key may name this agent's own services: its table must be in place first.
        self.agents.insert(agent.to_string(), table);
        for (obs, value) in &fresh {
            self.attach(agent, obs, value, now_ms, ch);
        }
    }

    /// Removes edges last seen more than `retention_ms` ago.
    pub fn expire(&mut self, now_ms: u64, retention_ms: u64) -> Changes {
        let mut ch = Changes::default();
        self.edges.retain(|k, e| {
            let keep = now_ms.saturating_sub(e.last_seen_ms) < retention_ms;
            if !keep {
                ch.edges_removed.insert(k.clone());
            }
            keep
        });
        ch
    }

    /// Restores a persisted edge (its history); current reporters are re-attached by
    /// [`Model::restore_tables`].
    pub fn restore_edge(&mut self, edge: Edge) {
        self.edges.insert(edge.key.clone(), edge);
    }

    /// Loads the stored tables after a restart, into a model holding no table yet: the map
    /// [`Model::replace`] makes of them one by one, in the order given (it decides who owns a
    /// disputed address), at a cost in rows. Every address and listener is in place before any
    /// row is attached, so no row is re-keyed: one by one, a hub's table would be read again for
    /// each host it talks to. Each table's rows are seen at its `last_snapshot_ms`.
    pub fn restore_tables(
        &mut self,
        tables: impl IntoIterator<Item = (AgentId, AgentTable)>,
    ) -> Vec<Conflict> {
        let mut conflicts = Vec::new();
        let mut entries = Vec::new();
        for (agent, mut table) in tables {
            for ip in &table.addresses {
                if !is_local_only(ip)
                    && let Some(conflict) = self.claim(*ip, &agent)
                {
                    conflicts.push(conflict);
                }
            }
            self.rows += rows(&table);
            entries.push((agent.clone(), std::mem::take(&mut table.entries)));
            self.agents.insert(agent, table);
        }
        let mut ch = Changes::default();
        for (agent, rows) in entries {
            let seen = self.agents.get(&agent).map_or(0, |t| t.last_snapshot_ms);
            for (obs, value) in &rows {
                self.attach(&agent, obs, value, seen, &mut ch);
            }
            if let Some(t) = self.agents.get_mut(&agent) {
                t.entries = rows;
            }
        }
        conflicts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn table(
        addrs: &[&str],
        listeners: &[(u16, &str)],
        entries: &[(Direction, &str, &str, u16, &str, u32)],
    ) -> AgentTable {
        AgentTable {
            hostname: String::new(),
            addresses: addrs.iter().map(|a| ip(a)).collect(),
            listeners: listeners
                .iter()
                .map(|(port, process)| {
                    (
                        ListenerKey {
                            ip: ip("0.0.0.0"),
                            port: *port,
                            protocol: Protocol::Tcp,
                            netns: String::new(),
                        },
                        process.to_string(),
                    )
                })
                .collect(),
            entries: entries
                .iter()
                .map(|(d, local, remote, port, process, sockets)| {
                    (
                        ObsKey {
                            netns: Box::default(),
                            direction: *d,
                            local_ip: ip(local),
                            remote_ip: ip(remote),
                            server_port: *port,
                            protocol: Protocol::Tcp,
                            process: (*process).into(),
                            via: None,
                        },
                        ObsValue {
                            sockets: *sockets,
                            control_plane: false,
                            short_lived: false,
                            process_note: String::new(),
                        },
                    )
                })
                .collect(),
            last_snapshot_ms: 0,
            nat_fronts: BTreeSet::new(),
            traffic: BTreeMap::new(),
        }
    }

    fn svc(host: &str, port: u16) -> Node {
        Node::Service {
            host: host.into(),
            protocol: Protocol::Tcp,
            port,
        }
    }

    #[test]
    fn both_ends_reported_by_two_agents_make_one_edge() {
        let mut m = Model::default();
        m.replace(
            "web",
            table(
                &["10.0.0.1"],
                &[],
                &[(Direction::Client, "10.0.0.1", "10.0.0.2", 6379, "app", 3)],
            ),
            1,
        );
        m.replace(
            "db",
            table(
                &["10.0.0.2"],
                &[(6379, "redis-server")],
                &[(
                    Direction::Server,
                    "10.0.0.2",
                    "10.0.0.1",
                    6379,
                    "redis-server",
                    3,
                )],
            ),
            2,
        );
        assert_eq!(m.edges.len(), 1, "{:#?}", m.edges.keys());
        let e = m.edges.values().next().unwrap();
        assert_eq!(e.key.from, Node::Host("web".into()));
        assert_eq!(e.key.to, svc("db", 6379));
        assert_eq!(e.process, "app");
        assert_eq!(e.sockets, 3, "max of both ends, not the sum");
        assert_eq!(e.reporters.len(), 2);
    }

    /// A host that translates one of its addresses (a published container port: `:80` lands
    /// on `:8080`) tells the map so; the client's row, which names the front, and the backend's
    /// row, which names the client, make one edge, whichever host reports first, and it keeps
    /// the front as `via`. When the front goes, the client's row is its own edge again.
    #[test]
    fn a_connection_through_a_nat_front_lands_on_its_backend_as_one_edge() {
        let web = || {
            table(
                &["10.0.0.1"],
                &[],
                &[(Direction::Client, "10.0.0.1", "10.0.0.2", 80, "curl", 1)],
            )
        };
        let db = |front: bool| {
            let mut t = table(
                &["10.0.0.2"],
                &[(8080, "nginx")],
                &[(Direction::Server, "10.0.0.2", "10.0.0.1", 8080, "nginx", 1)],
            );
            if front {
                t.nat_fronts.insert(NatFront {
                    protocol: Protocol::Tcp,
                    front: "10.0.0.2:80".parse().unwrap(),
                    backend: "10.0.0.2:8080".parse().unwrap(),
                });
            }
            t
        };
        for web_first in [true, false] {
            let mut m = Model::default();
            if web_first {
                m.replace("web", web(), 1);
                m.replace("db", db(true), 2);
            } else {
                m.replace("db", db(true), 1);
                m.replace("web", web(), 2);
            }
            let live: Vec<_> = m
                .edges
                .values()
                .filter(|e| !e.reporters.is_empty())
                .collect();
            assert_eq!(
                live.len(),
                1,
                "web first: {web_first}: {:#?}",
                m.edges.keys()
            );
            let e = live[0];
            assert_eq!(e.key.from, Node::Host("web".into()));
            assert_eq!(e.key.to, svc("db", 8080));
            assert_eq!(e.via, "10.0.0.2:80");
            assert_eq!(e.process, "curl");
            assert_eq!(e.reporters.len(), 2);

            // The front is gone: the client's row no longer reaches the backend's service.
            m.replace("db", db(false), 3);
            let to: BTreeSet<_> = m
                .edges
                .values()
                .filter(|e| !e.reporters.is_empty())
                .map(|e| (e.key.to.id(), e.key.port))
                .collect();
            assert_eq!(
                to,
                [
                    ("addr:10.0.0.2".to_string(), 80),
                    ("svc:db/tcp/8080".to_string(), 8080)
                ]
                .into(),
                "web first: {web_first}"
            );
        }
    }

    /// A row its own host translated (kube-proxy's DNAT of a ClusterIP on the client's node)
    /// arrives towards the backend already; the edge keeps the address dialled.
    #[test]
    fn a_row_its_host_translated_keeps_the_address_dialled() {
        let mut m = Model::default();
        let mut web = table(
            &["10.0.0.1"],
            &[],
            &[(Direction::Client, "10.0.0.1", "10.0.0.2", 8053, "dig", 1)],
        );
        let (obs, value) = web.entries.pop_first().unwrap();
        let obs = ObsKey {
            via: Some("10.96.0.10:53".parse().unwrap()),
            ..obs
        };
        web.entries.insert(obs, value);
        m.replace("web", web, 1);
        m.replace("dns", table(&["10.0.0.2"], &[(8053, "coredns")], &[]), 2);
        let e = m.edges.values().next().unwrap();
        assert_eq!(m.edges.len(), 1);
        assert_eq!(e.key.to, svc("dns", 8053));
        assert_eq!(e.via, "10.96.0.10:53");
    }

    #[test]
    fn the_order_of_reports_does_not_matter() {
        // The server reports first: the client's address is unknown, so it is an Address at first.
        let mut m = Model::default();
        m.replace(
            "db",
            table(
                &["10.0.0.2"],
                &[(6379, "redis-server")],
                &[(
                    Direction::Server,
                    "10.0.0.2",
                    "10.0.0.1",
                    6379,
                    "redis-server",
                    1,
                )],
            ),
            1,
        );
        assert_eq!(
            m.edges.keys().next().unwrap().from,
            Node::Address(ip("10.0.0.1"))
        );
        m.replace(
            "web",
            table(
                &["10.0.0.1"],
                &[],
                &[(Direction::Client, "10.0.0.1", "10.0.0.2", 6379, "app", 1)],
            ),
            2,
        );
        let live: Vec<_> = m.edges.values().collect();
        assert_eq!(
            live.len(),
            1,
            "the provisional Address edge is gone: {:#?}",
            m.edges.keys()
        );
        assert_eq!(live[0].key.from, Node::Host("web".into()));
        assert_eq!(live[0].reporters.len(), 2);
    }

    #[test]
    fn loopback_servers_are_the_hosts_own_even_before_their_listener_is_seen() {
        let mut m = Model::default();
        let row = (Direction::Client, "127.0.0.1", "127.0.0.1", 8080, "app", 1);
        m.replace("a", table(&["10.0.0.1"], &[], &[row]), 1);
        m.replace("b", table(&["10.0.0.2"], &[], &[row]), 1);
        assert_eq!(m.edges.len(), 2, "{:#?}", m.edges.keys());
        assert!(
            m.edges.keys().all(|k| !matches!(k.to, Node::Address(_))),
            "no 127.0.0.1 node shared by a and b: {:#?}",
            m.edges.keys()
        );
        assert_eq!(m.edges.keys().next().unwrap().to, svc("a", 8080));
        // The listener appearing later changes nothing: no second edge.
        m.replace("a", table(&["10.0.0.1"], &[(8080, "server")], &[row]), 2);
        assert_eq!(m.edges.len(), 2, "{:#?}", m.edges.keys());
        assert_eq!(m.edges.keys().next().unwrap().to, svc("a", 8080));
    }

    #[test]
    fn tables_survive_a_round_trip_through_the_store_format() {
        let t = table(
            &["10.0.0.1"],
            &[(80, "nginx")],
            &[(Direction::Server, "10.0.0.1", "10.0.0.2", 80, "nginx", 2)],
        );
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<AgentTable>(&json).unwrap(), t);
    }

    #[test]
    fn every_snapshot_refreshes_the_edges_it_still_reports() {
        let mut m = Model::default();
        let row = (Direction::Client, "10.0.0.1", "203.0.113.7", 443, "curl", 1);
        m.replace("web", table(&["10.0.0.1"], &[], &[row]), 1_000);
        let ch = m.replace("web", table(&["10.0.0.1"], &[], &[row]), 5_000);
        let e = m.edges.values().next().unwrap().clone();
        assert_eq!((e.first_seen_ms, e.last_seen_ms), (1_000, 5_000));
        assert!(
            ch.edges_upserted.is_empty(),
            "a refreshed last_seen alone is not written: {ch:?}"
        );
        // After a restart the edge comes back as last stored (seen at 1,000) and the agent's
        // table, stored with each snapshot, brings last_seen back to its last snapshot.
        let mut restarted = restored(&e, 1_000);
        restarted.replace("web", table(&["10.0.0.1"], &[], &[row]), 5_000);
        assert_eq!(restarted.edges[&e.key], e);
        // Its last reporter gone, the edge is written: its last_seen is history from now on.
        let ch = m.replace("web", table(&["10.0.0.1"], &[], &[]), 9_000);
        assert!(ch.edges_upserted.contains(&e.key), "{ch:?}");
        assert_eq!(m.edges[&e.key].last_seen_ms, 5_000);
    }

    /// A model after a restart, before any table is loaded: `edge` as stored, seen last at
    /// `last_seen_ms`.
    fn restored(edge: &Edge, last_seen_ms: u64) -> Model {
        let mut m = Model::default();
        m.restore_edge(Edge {
            last_seen_ms,
            reporters: Reporters::default(),
            ..edge.clone()
        });
        m
    }

    #[test]
    fn an_edge_two_agents_report_is_seen_at_the_later_report() {
        let mut m = Model::default();
        let client = (Direction::Client, "10.0.0.1", "10.0.0.2", 6379, "app", 1);
        let server = (Direction::Server, "10.0.0.2", "10.0.0.1", 6379, "redis", 1);
        // The client reports first: its row is keyed to `Address(10.0.0.2)` until db reports,
        // then re-keyed to db's service.
        m.replace("app", table(&["10.0.0.1"], &[], &[client]), 1_000);
        m.replace(
            "db",
            table(&["10.0.0.2"], &[(6379, "redis")], &[server]),
            2_000,
        );
        m.replace("app", table(&["10.0.0.1"], &[], &[client]), 3_000);
        m.replace(
            "db",
            table(&["10.0.0.2"], &[(6379, "redis")], &[server]),
            4_000,
        );
        m.replace("app", table(&["10.0.0.1"], &[], &[client]), 5_000);
        assert_eq!(m.edges.len(), 1, "{:#?}", m.edges);
        let edge = m.edges.values().next().unwrap().clone();
        assert_eq!(edge.last_seen_ms, 5_000, "{:#?}", m.edges);
        // A restart loads the stored edge (last written when it was new) and then the tables,
        // the client's first: its row waits as an Address edge until db's table re-keys it, and
        // the edge keeps the client's later time, not db's.
        let mut restarted = restored(&edge, 2_000);
        restarted.replace("app", table(&["10.0.0.1"], &[], &[client]), 5_000);
        restarted.replace(
            "db",
            table(&["10.0.0.2"], &[(6379, "redis")], &[server]),
            4_000,
        );
        assert_eq!(restarted.edges.len(), 1, "{:#?}", restarted.edges);
        assert_eq!(restarted.edges[&edge.key], edge);
    }

    #[test]
    fn deltas_applied_row_by_row_make_the_same_map_as_full_replacement() {
        // Four agents report rows from a small pool, sometimes moving an address or a listener;
        // one model takes each table incrementally, the other re-attaches every row.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let hosts = ["a", "b", "c", "d"];
        let mut fast = Model::default();
        let mut full = Model::default();
        for step in 0..400u64 {
            let h = next(4) as usize;
            let own = format!("10.0.0.{}", h + 1);
            let moved = format!("10.0.1.{}", h + 1);
            let addr = if next(10) == 0 { &moved } else { &own };
            let listeners: &[(u16, &str)] = if next(8) == 0 {
                &[]
            } else {
                &[(6379, "redis")]
            };
            let mut rows = Vec::new();
            for _ in 0..next(6) {
                let peer = format!("10.0.{}.{}", next(2), next(5) + 1);
                let direction = if next(2) == 0 {
                    Direction::Client
                } else {
                    Direction::Server
                };
                let process = ["app", "curl", ""][next(3) as usize];
                rows.push((
                    direction,
                    peer,
                    [6379, 443][next(2) as usize],
                    process,
                    next(3) as u32 + 1,
                ));
            }
            let rows: Vec<_> = rows
                .iter()
                .map(|(d, peer, port, process, sockets)| {
                    (*d, addr.as_str(), peer.as_str(), *port, *process, *sockets)
                })
                .collect();
            let t = table(&[addr], listeners, &rows);
            let now = 1_000 + step * 10;
            fast.replace_with(hosts[h], t.clone(), now, true);
            full.replace_with(hosts[h], t, now, false);
            let differ: Vec<_> = fast
                .edges
                .iter()
                .filter(|(k, e)| full.edges.get(*k) != Some(*e))
                .map(|(k, e)| (e, full.edges.get(k)))
                .collect();
            let missing: Vec<_> = full
                .edges
                .keys()
                .filter(|k| !fast.edges.contains_key(*k))
                .collect();
            assert!(
                differ.is_empty() && missing.is_empty(),
                "step {step}: differ {differ:#?}, only in full {missing:#?}"
            );
            assert_eq!(fast.keyed, full.keyed, "step {step}");
            if step % 50 == 49 {
                // A restart (the edges as stored, then every table at once) gives the map back.
                let restored = restart(&fast);
                assert_eq!(restored.edges, fast.edges, "restored at step {step}");
                let rows = |m: &Model| -> Vec<_> {
                    let mut keyed: Vec<_> = m.keyed.iter().filter(|(_, r)| !r.is_empty()).collect();
                    keyed.sort_by_key(|(agent, _)| agent.as_str());
                    keyed
                        .into_iter()
                        .map(|(a, r)| (a.clone(), r.clone()))
                        .collect()
                };
                assert_eq!(rows(&restored), rows(&fast), "restored at step {step}");
                assert_eq!(
                    restored.by_remote, fast.by_remote,
                    "restored at step {step}"
                );
                assert_eq!(restored.claims, fast.claims, "restored at step {step}");
                assert_eq!(restored.rows, fast.rows, "restored at step {step}");
            }
        }
        assert!(
            fast.edges.len() > 10,
            "the walk made a map: {}",
            fast.edges.len()
        );
    }

    #[test]
    fn unowned_addresses_are_external_endpoints() {
        let mut m = Model::default();
        m.replace(
            "web",
            table(
                &["10.0.0.1"],
                &[],
                &[(Direction::Client, "10.0.0.1", "203.0.113.7", 443, "curl", 1)],
            ),
            1,
        );
        let e = m.edges.values().next().unwrap();
        assert_eq!(e.key.to, Node::Address(ip("203.0.113.7")));
    }

    #[test]
    fn removed_rows_leave_an_edge_that_goes_inactive_then_expires() {
        let mut m = Model::default();
        m.replace(
            "web",
            table(
                &["10.0.0.1"],
                &[],
                &[(Direction::Client, "10.0.0.1", "203.0.113.7", 443, "curl", 1)],
            ),
            1_000,
        );
        m.replace("web", table(&["10.0.0.1"], &[], &[]), 2_000);
        let e = m.edges.values().next().unwrap();
        assert!(e.reporters.is_empty());
        assert_eq!(e.last_seen_ms, 1_000, "last reported in the first snapshot");
        assert!(
            e.active(1_500, 1_000),
            "within the TTL after it was last seen"
        );
        assert!(!e.active(2_000, 1_000));
        assert!(m.expire(3_000, 5_000).edges_removed.is_empty());
        assert_eq!(m.expire(6_000, 5_000).edges_removed.len(), 1);
        assert!(m.edges.is_empty());
    }

    #[test]
    fn loopback_stays_inside_its_host() {
        let mut m = Model::default();
        m.replace(
            "a",
            table(
                &["10.0.0.1"],
                &[(5432, "postgres")],
                &[(Direction::Client, "127.0.0.1", "127.0.0.1", 5432, "app", 1)],
            ),
            1,
        );
        m.replace("b", table(&["10.0.0.2"], &[(5432, "postgres")], &[]), 1);
        let e = m.edges.values().next().unwrap();
        assert_eq!(e.key.from, Node::Host("a".into()));
        assert_eq!(e.key.to, svc("a", 5432));
    }

    #[test]
    fn a_second_claim_on_an_address_is_one_conflict_and_the_owner_keeps_it() {
        let mut m = Model::default();
        let client = (Direction::Client, "10.0.0.1", "10.0.0.5", 6379, "app", 1);
        m.replace("web", table(&["10.0.0.1"], &[], &[client]), 1);
        let db = table(&["10.0.0.5"], &[(6379, "redis")], &[]);
        assert!(m.replace("db", db.clone(), 2).conflicts.is_empty());
        let rogue = table(&["10.0.0.5", "10.0.0.66"], &[(6379, "fake")], &[]);
        let ch = m.replace("rogue", rogue.clone(), 3);
        assert_eq!(
            ch.conflicts,
            [Conflict {
                address: ip("10.0.0.5"),
                owner: "db".into(),
                claimant: "rogue".into(),
            }]
        );
        assert_eq!(m.claimants(&ip("10.0.0.5")), ["db", "rogue"]);
        assert_eq!(m.conflicts(), 1);
        // Reported once, not at every snapshot that repeats the claim, from either side.
        assert!(m.replace("rogue", rogue.clone(), 4).conflicts.is_empty());
        assert!(m.replace("db", db, 5).conflicts.is_empty());
        // The first claimant keeps the address: web's connection goes to db, not to the rogue.
        let to: Vec<_> = m.edges.keys().map(|k| k.to.clone()).collect();
        assert_eq!(to, [svc("db", 6379)]);
        // When db lets the address go, the rogue owns it and the conflict is over.
        m.replace("db", table(&["10.0.0.9"], &[(6379, "redis")], &[]), 6);
        assert_eq!(m.conflicts(), 0);
        assert_eq!(m.claimants(&ip("10.0.0.5")), ["rogue"]);
        let to: Vec<_> = m
            .edges
            .values()
            .filter(|e| !e.reporters.is_empty())
            .map(|e| e.key.to.clone())
            .collect();
        assert_eq!(to, [svc("rogue", 6379)]);
    }

    #[test]
    fn a_removed_table_leaves_the_map_as_if_never_reported() {
        let client = (Direction::Client, "10.0.0.1", "10.0.0.5", 6379, "app", 1);
        let web = table(&["10.0.0.1"], &[], &[client]);
        let rogue = table(&["10.0.0.5"], &[(6379, "fake")], &[]);
        let mut m = Model::default();
        m.replace("web", web.clone(), 1);
        m.replace("db", table(&["10.0.0.5"], &[(6379, "redis")], &[]), 2);
        m.replace("rogue", rogue.clone(), 3);
        assert_eq!(m.remove("nobody"), Changes::default());
        // db's address passes to the rogue, and web's connection with it.
        let ch = m.remove("db");
        assert!(ch.edges_removed.contains(&EdgeKey {
            from: Node::Host("web".into()),
            to: svc("db", 6379),
            port: 6379,
            protocol: Protocol::Tcp,
        }));
        let mut never = Model::default();
        never.replace("web", web, 1);
        never.replace("rogue", rogue, 3);
        let edges = |m: &Model| -> Vec<(EdgeKey, usize)> {
            m.edges
                .values()
                .map(|e| (e.key.clone(), e.reporters.len()))
                .collect()
        };
        assert_eq!(edges(&m), edges(&never));
        assert_eq!(m.agents, never.agents);
        assert_eq!(m.claims, never.claims);
        assert_eq!(m.rows, never.rows);
        assert!(!m.keyed.contains_key("db"));
        // An agent's own connections stay as history, reported by nobody.
        m.remove("web");
        assert_eq!(m.edges.len(), 1);
        assert!(m.edges.values().all(|e| e.reporters.is_empty()));
    }

    /// A hub's rows to `k` addresses (10.0.9.1…), `per` each, to ports 6379, 6378…
    fn hub_rows(k: u8, per: u16) -> Vec<(Direction, String, u16)> {
        (1..=k)
            .flat_map(|a| {
                (0..per).map(move |n| (Direction::Client, format!("10.0.9.{a}"), 6379 - n))
            })
            .collect()
    }

    fn hub_table(rows: &[(Direction, String, u16)]) -> AgentTable {
        let rows: Vec<_> = rows
            .iter()
            .map(|(d, remote, port)| (*d, "10.0.0.1", remote.as_str(), *port, "app", 1))
            .collect();
        table(&["10.0.0.1"], &[], &rows)
    }

    #[test]
    fn a_host_taking_and_dropping_many_addresses_re_keys_each_row_to_it_and_back() {
        let mut m = Model::default();
        let rows = hub_rows(3, 2);
        m.replace("hub", hub_table(&rows), 1);
        let other = (Direction::Client, "10.0.0.2", "10.0.9.2", 6379, "app", 1);
        m.replace("other", table(&["10.0.0.2"], &[], &[other]), 1);
        let live = |m: &Model| -> BTreeSet<(Node, Node, u16)> {
            m.edges
                .values()
                .filter(|e| !e.reporters.is_empty())
                .map(|e| (e.key.from.clone(), e.key.to.clone(), e.key.port))
                .collect()
        };
        let hub = || Node::Host("hub".into());
        let before: BTreeSet<_> = (1..=3u8)
            .flat_map(|a| {
                [6379, 6378].map(|p| (hub(), Node::Address(ip(&format!("10.0.9.{a}"))), p))
            })
            .chain([(
                Node::Host("other".into()),
                Node::Address(ip("10.0.9.2")),
                6379,
            )])
            .collect();
        assert_eq!(live(&m), before);
        // One host takes all three addresses, listening on 6379 only.
        let db = table(
            &["10.0.9.1", "10.0.9.2", "10.0.9.3"],
            &[(6379, "redis")],
            &[],
        );
        m.replace("db", db, 2);
        let taken: BTreeSet<_> = (1..=3u8)
            .flat_map(|a| {
                [
                    (hub(), svc("db", 6379), 6379),
                    (hub(), Node::Address(ip(&format!("10.0.9.{a}"))), 6378),
                ]
            })
            .chain([(Node::Host("other".into()), svc("db", 6379), 6379)])
            .collect();
        assert_eq!(live(&m), taken);
        // And lets them all go: every row is back on its address, no phantom left.
        m.replace("db", table(&["10.0.0.3"], &[(6379, "redis")], &[]), 3);
        assert_eq!(live(&m), before);
        assert_eq!(m.edges.len(), before.len(), "{:#?}", m.edges.keys());
    }

    /// `m` after a restart: its edges as stored (no reporters), then its tables.
    fn restart(m: &Model) -> Model {
        let mut restored = Model::default();
        for e in m.edges.values() {
            restored.restore_edge(Edge {
                reporters: Reporters::default(),
                ..e.clone()
            });
        }
        restored.restore_tables(m.agents.clone());
        restored
    }

    #[test]
    fn a_restart_attaches_each_row_once_to_its_owner_s_service() {
        // A hub talks to 50 hosts, each owning one address and listening on 6379. Its table comes
        // back first: one by one, each host's table would read it again (50 × 50 rows).
        let mut m = Model::default();
        let rows = hub_rows(50, 1);
        m.replace("a-hub", hub_table(&rows), 1);
        for a in 1..=50 {
            let addr = format!("10.0.9.{a}");
            m.replace(
                &format!("db{a:02}"),
                table(&[&addr], &[(6379, "redis")], &[]),
                2,
            );
        }
        let restored = restart(&m);
        assert_eq!(restored.scanned, 0, "no row re-keyed");
        let live: BTreeSet<_> = restored
            .edges
            .values()
            .filter(|e| !e.reporters.is_empty())
            .map(|e| e.key.to.clone())
            .collect();
        let dbs: BTreeSet<_> = (1..=50).map(|a| svc(&format!("db{a:02}"), 6379)).collect();
        assert_eq!(live, dbs);
        assert_eq!(restored.edges, m.edges);
    }

    #[test]
    fn re_keying_many_addresses_reads_each_talking_agent_s_table_once() {
        let mut m = Model::default();
        // A hub with 8 rows to each of 50 addresses: 400 rows.
        let rows = hub_rows(50, 8);
        m.replace("hub", hub_table(&rows), 1);
        let addrs: Vec<String> = (1..=50).map(|a| format!("10.0.9.{a}")).collect();
        let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        // A rogue claims all 50 and drops them again: each change reads the hub's table once,
        // not once per address (50 × 400).
        m.scanned = 0;
        m.replace("rogue", table(&addrs, &[(6379, "fake")], &[]), 2);
        assert_eq!(m.scanned, 400);
        m.replace("rogue", table(&["10.0.0.66"], &[], &[]), 3);
        assert_eq!(m.scanned, 800);
    }

    #[test]
    fn the_map_counts_its_rows_and_gives_back_a_burst_s_index() {
        let mut m = Model::default();
        let many: Vec<_> = (1..=5_000u16)
            .map(|p| (Direction::Client, "10.0.0.1", "203.0.113.7", p, "app", 1))
            .collect();
        m.replace("a", table(&["10.0.0.1"], &[(80, "nginx")], &many), 1);
        m.replace("b", table(&["10.0.0.2"], &[], &many[..10]), 1);
        assert_eq!(m.rows(), (5_000 + 1 + 1) + (10 + 1));
        let capacity = m.keyed["a"].capacity();
        m.replace("a", table(&["10.0.0.1"], &[(80, "nginx")], &many[..3]), 2);
        assert_eq!(m.rows(), (3 + 1 + 1) + (10 + 1));
        assert!(
            m.keyed["a"].capacity() < capacity / 4,
            "{} of {capacity}",
            m.keyed["a"].capacity()
        );
        assert_eq!(m.by_remote[&ip("203.0.113.7")]["a"], 3);
    }
}
