//! A snapshot's rows read into the model's types, and checked: a row carrying a value no real
//! host reports (a broadcast endpoint, port 0, more sockets than ports, an overlong name) is
//! refused by the `check_*` functions before it reaches the model, and counted by
//! [`Invalid::reason`]; the rest of the snapshot is taken.

use std::net::{IpAddr, SocketAddr};

use tapgraph::proto;

use super::Stats;
use super::model::{
    AgentTable, Direction, FlowKey, ListenerKey, NatFront, ObsKey, ObsValue, Protocol,
};

/// Longest process, namespace or container name a row may carry (Linux's NAME_MAX): a file name
/// is the longest thing an agent puts there.
pub const MAX_NAME: usize = 255;

/// Most sockets one row can count. A row fixes both addresses and the server's port, so its
/// sockets differ by the other port alone: there are 65,535 of those.
pub const MAX_SOCKETS: u32 = 65_535;

/// A value in a snapshot that no real host reports: the row, listener or address carrying it is
/// refused, and counted by [`Invalid::reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("{field} `{value}` cannot be parsed")]
    Malformed { field: &'static str, value: String },
    #[error("{field} {ip} is {what}, never a {role}")]
    Address {
        field: &'static str,
        ip: IpAddr,
        what: &'static str,
        role: &'static str,
    },
    #[error("{field} {value} is not a port a connection can use (1 to 65535)")]
    Port { field: &'static str, value: u32 },
    #[error("{sockets} sockets in one row; at most {MAX_SOCKETS} can share its addresses and port")]
    Sockets { sockets: u32 },
    #[error("a {field} of {len} bytes; at most {MAX_NAME} are accepted")]
    Name { field: &'static str, len: usize },
}

/// Every [`Invalid::reason`].
pub const REASONS: [&str; 5] = ["malformed", "address", "port", "sockets", "name"];

impl Invalid {
    /// The metric label: `malformed`, `address`, `port`, `sockets` or `name`.
    pub fn reason(&self) -> &'static str {
        match self {
            Invalid::Malformed { .. } => "malformed",
            Invalid::Address { .. } => "address",
            Invalid::Port { .. } => "port",
            Invalid::Sockets { .. } => "sockets",
            Invalid::Name { .. } => "name",
        }
    }
}

/// What makes `ip` impossible as the endpoint of a `protocol` socket: the unspecified address,
/// the limited broadcast, or for TCP a multicast group.
fn not_an_endpoint(ip: &IpAddr, protocol: Protocol) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if *ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else if ip.is_multicast() && protocol == Protocol::Tcp {
        Some("a multicast group")
    } else {
        None
    }
}

/// A name (`field`) longer than [`MAX_NAME`] is refused.
pub fn check_name(field: &'static str, name: &str) -> Result<(), Invalid> {
    if name.len() > MAX_NAME {
        return Err(Invalid::Name {
            field,
            len: name.len(),
        });
    }
    Ok(())
}

/// A row is refused when either end is no endpoint, or it counts more sockets than ports exist.
pub fn check_row(key: &ObsKey, value: &ObsValue) -> Result<(), Invalid> {
    for (field, ip) in [("local_ip", &key.local_ip), ("remote_ip", &key.remote_ip)] {
        if let Some(what) = not_an_endpoint(ip, key.protocol) {
            return Err(Invalid::Address {
                field,
                ip: *ip,
                what,
                role: "connection's endpoint",
            });
        }
    }
    if key.server_port == 0 {
        return Err(Invalid::Port {
            field: "server_port",
            value: 0,
        });
    }
    if let Some(via) = &key.via {
        if let Some(what) = not_an_endpoint(&via.ip(), key.protocol) {
            return Err(Invalid::Address {
                field: "via",
                ip: via.ip(),
                what,
                role: "dialled address",
            });
        }
        if via.port() == 0 {
            return Err(Invalid::Port {
                field: "via",
                value: 0,
            });
        }
    }
    if value.sockets > MAX_SOCKETS {
        return Err(Invalid::Sockets {
            sockets: value.sockets,
        });
    }
    check_name("netns", &key.netns)
}

/// A listener may be bound to the unspecified address (every address), not to the broadcast
/// address, nor for TCP to a multicast group.
pub fn check_listener(key: &ListenerKey, process: &str) -> Result<(), Invalid> {
    if key.port == 0 {
        return Err(Invalid::Port {
            field: "port",
            value: 0,
        });
    }
    if !key.ip.is_unspecified()
        && let Some(what) = not_an_endpoint(&key.ip, key.protocol)
    {
        return Err(Invalid::Address {
            field: "listener ip",
            ip: key.ip,
            what,
            role: "listening address",
        });
    }
    check_name("netns", &key.netns)?;
    check_name("process name", process)
}

/// A host's own address is never unspecified, a broadcast address or a multicast group.
pub fn check_host_address(ip: &IpAddr) -> Result<(), Invalid> {
    let what = if ip.is_multicast() {
        Some("a multicast group")
    } else {
        not_an_endpoint(ip, Protocol::Udp)
    };
    match what {
        Some(what) => Err(Invalid::Address {
            field: "address",
            ip: *ip,
            what,
            role: "host's address",
        }),
        None => Ok(()),
    }
}

fn malformed(field: &'static str, value: impl ToString) -> Invalid {
    Invalid::Malformed {
        field,
        value: value.to_string(),
    }
}

fn ip(field: &'static str, text: &str) -> Result<IpAddr, Invalid> {
    text.parse().map_err(|_| malformed(field, text))
}

fn port(field: &'static str, value: u32) -> Result<u16, Invalid> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p > 0)
        .ok_or(Invalid::Port { field, value })
}

/// Converts one wire row; a row carrying a value no host reports is refused (counted, skipped).
/// A removed row only needs to parse: it can only remove what was accepted.
fn row(e: &proto::ConnectionEntry, removed: bool) -> Result<(ObsKey, ObsValue), Invalid> {
    let direction = match proto::Direction::try_from(e.direction) {
        Ok(proto::Direction::Client) => Direction::Client,
        Ok(proto::Direction::Server) => Direction::Server,
        _ => return Err(malformed("direction", e.direction)),
    };
    let protocol = protocol(e.protocol)?;
    let name = e.process.as_ref().map(|p| p.name.as_str()).unwrap_or("");
    check_name("process name", name)?;
    check_name("container", &e.container)?;
    check_name("process note", &e.process_note)?;
    // In scope `all` the container says more than the program: `redis-server (docker:4f1c2e9a7b3d)`.
    let process = if e.container.is_empty() {
        name.into()
    } else {
        format!("{name} ({})", e.container).into()
    };
    let key = ObsKey {
        netns: e.netns.as_str().into(),
        direction,
        local_ip: ip("local_ip", &e.local_ip)?,
        remote_ip: ip("remote_ip", &e.remote_ip)?,
        server_port: port("server_port", e.server_port)?,
        protocol,
        process,
        via: match e.via.as_str() {
            "" => None,
            via => Some(via.parse().map_err(|_| malformed("via", via))?),
        },
    };
    let value = ObsValue {
        sockets: e.sockets.max(1),
        control_plane: e.control_plane,
        short_lived: e.short_lived,
        process_note: e.process_note.clone(),
    };
    if !removed {
        check_row(&key, &value)?;
    }
    Ok((key, value))
}

fn protocol(p: i32) -> Result<Protocol, Invalid> {
    match proto::Protocol::try_from(p) {
        Ok(proto::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(proto::Protocol::Udp) => Ok(Protocol::Udp),
        _ => Err(malformed("protocol", p)),
    }
}

fn listener(l: &proto::ListeningService) -> Result<(ListenerKey, String), Invalid> {
    let key = ListenerKey {
        ip: ip("listener ip", &l.ip)?,
        port: port("port", l.port)?,
        protocol: protocol(l.protocol)?,
        netns: l.netns.clone(),
    };
    let process = l
        .process
        .as_ref()
        .map(|p| p.name.clone())
        .unwrap_or_default();
    check_listener(&key, &process)?;
    Ok((key, process))
}

/// A NAT front: both ends real endpoints of its protocol.
fn nat_front(f: &proto::NatFront) -> Result<NatFront, Invalid> {
    let protocol = protocol(f.protocol)?;
    let endpoint = |field, text: &str, p: u32| -> Result<SocketAddr, Invalid> {
        let ip = ip(field, text)?;
        if let Some(what) = not_an_endpoint(&ip, protocol) {
            return Err(Invalid::Address {
                field,
                ip,
                what,
                role: "NAT front's endpoint",
            });
        }
        Ok(SocketAddr::new(ip, port(field, p)?))
    };
    Ok(NatFront {
        protocol,
        front: endpoint("nat front", &f.front_ip, f.front_port)?,
        backend: endpoint("nat backend", &f.backend_ip, f.backend_port)?,
    })
}

/// Converts one flow's increments; refused like a row when an endpoint, the port or the
/// namespace could not be a real socket's.
fn flow(t: &proto::FlowTraffic) -> Result<FlowKey, Invalid> {
    let direction = match proto::Direction::try_from(t.direction) {
        Ok(proto::Direction::Client) => Direction::Client,
        Ok(proto::Direction::Server) => Direction::Server,
        _ => return Err(malformed("direction", t.direction)),
    };
    let key = FlowKey {
        netns: t.netns.as_str().into(),
        direction,
        local_ip: ip("local_ip", &t.local_ip)?,
        remote_ip: ip("remote_ip", &t.remote_ip)?,
        server_port: port("server_port", t.server_port)?,
    };
    check_row(
        &key.obs(),
        &ObsValue {
            sockets: 1,
            control_plane: false,
            short_lived: false,
            process_note: String::new(),
        },
    )?;
    Ok(key)
}

/// Adds `s`'s traffic increments to `table.traffic`, at `now_ms`; returns the flows that moved.
/// A snapshot carries at most `max` flows; the rest are refused, counted in
/// `stats.traffic_flows_refused`; a flow no real socket has is refused like a row.
pub(super) fn merge_traffic(
    table: &mut AgentTable,
    s: &proto::ConnectionSnapshot,
    now_ms: u64,
    max: usize,
    stats: &mut Stats,
) -> (Skipped, Vec<FlowKey>) {
    let mut skipped = Skipped::default();
    let mut moved = Vec::with_capacity(s.traffic.len().min(max));
    let interval_ms = match (s.traffic_since_unix_nanos, s.taken_at_unix_nanos) {
        (since, taken) if since > 0 && taken > since => (taken - since) / 1_000_000,
        _ => 0,
    };
    // Rates are of the latest interval: a flow that did not move in it moved nothing.
    for f in table.traffic.values_mut() {
        f.last_sent = 0;
        f.last_received = 0;
    }
    // More flows than rows a snapshot may carry: the rest are refused, counted.
    let refused = s.traffic.len().saturating_sub(max);
    stats.traffic_flows_refused += refused as u64;
    for t in s.traffic.iter().take(max) {
        let key = match flow(t) {
            Ok(key) => key,
            Err(invalid) => {
                skipped.add(stats, invalid);
                continue;
            }
        };
        let f = table.traffic.entry(key.clone()).or_default();
        f.bytes_sent = f.bytes_sent.saturating_add(t.bytes_sent);
        f.bytes_received = f.bytes_received.saturating_add(t.bytes_received);
        f.segments_sent = f.segments_sent.saturating_add(t.segments_sent);
        f.segments_received = f.segments_received.saturating_add(t.segments_received);
        f.retransmits = f.retransmits.saturating_add(t.retransmits);
        f.closed = f.closed.saturating_add(u64::from(t.closed));
        if t.srtt_us > 0 {
            f.srtt_us = t.srtt_us;
        }
        if t.min_rtt_us > 0 {
            f.min_rtt_us = t.min_rtt_us;
        }
        f.last_ms = now_ms;
        f.last_interval_ms = interval_ms;
        f.last_sent = t.bytes_sent;
        f.last_received = t.bytes_received;
        moved.push(key);
    }
    (skipped, moved)
}

/// Rows refused in one snapshot: how many, and the first one's reason.
#[derive(Default)]
pub(super) struct Skipped {
    pub(super) count: u64,
    pub(super) first: Option<Invalid>,
}

impl Skipped {
    fn add(&mut self, stats: &mut Stats, invalid: Invalid) {
        self.count += 1;
        *stats
            .rows_skipped_by_reason
            .entry(invalid.reason())
            .or_default() += 1;
        self.first.get_or_insert(invalid);
    }
}

/// Reads `s`'s rows into `table`: removed rows and listeners out, new ones in, and its addresses
/// in place of the table's when it is full or names any. Refused rows are counted by reason in
/// `stats`, and in the result; a removed row only needs to parse.
pub(super) fn merge(
    table: &mut AgentTable,
    s: &proto::ConnectionSnapshot,
    stats: &mut Stats,
) -> Skipped {
    let mut skipped = Skipped::default();
    for e in &s.removed {
        match row(e, true) {
            Ok((k, _)) => {
                table.entries.remove(&k);
            }
            Err(invalid) => skipped.add(stats, invalid),
        }
    }
    for e in &s.entries {
        match row(e, false) {
            Ok((k, v)) => {
                table.entries.insert(k, v);
            }
            Err(invalid) => skipped.add(stats, invalid),
        }
    }
    for l in &s.removed_listeners {
        if let Ok((k, _)) = listener(l) {
            table.listeners.remove(&k);
        }
    }
    for l in &s.listeners {
        match listener(l) {
            Ok((k, p)) => {
                table.listeners.insert(k, p);
            }
            Err(invalid) => skipped.add(stats, invalid),
        }
    }
    if s.full || s.nat.is_some() {
        table.nat_fronts.clear();
        for f in s.nat.iter().flat_map(|n| &n.fronts) {
            match nat_front(f) {
                Ok(front) => {
                    table.nat_fronts.insert(front);
                }
                Err(invalid) => skipped.add(stats, invalid),
            }
        }
    }
    if s.full || !s.addresses.is_empty() {
        table.addresses.clear();
        for a in &s.addresses {
            match ip("address", a).and_then(|ip| check_host_address(&ip).map(|()| ip)) {
                Ok(ip) => {
                    table.addresses.insert(ip);
                }
                Err(invalid) => skipped.add(stats, invalid),
            }
        }
    }
    skipped
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    pub(in crate::topology) fn obs(remote: &str, port: u16, protocol: Protocol) -> ObsKey {
        ObsKey {
            netns: Box::default(),
            direction: Direction::Client,
            local_ip: ip("10.0.0.1"),
            remote_ip: ip(remote),
            server_port: port,
            protocol,
            process: "app".into(),
            via: None,
        }
    }

    fn sockets(n: u32) -> ObsValue {
        ObsValue {
            sockets: n,
            control_plane: false,
            short_lived: false,
            process_note: String::new(),
        }
    }

    /// Flows are checked like rows and bounded per snapshot; the good ones add up.
    #[test]
    fn traffic_flows_are_checked_bounded_and_summed() {
        let flow = |remote: &str, sent: u64| proto::FlowTraffic {
            direction: proto::Direction::Client as i32,
            local_ip: "10.0.0.1".into(),
            remote_ip: remote.into(),
            server_port: 443,
            bytes_sent: sent,
            ..Default::default()
        };
        let s = proto::ConnectionSnapshot {
            taken_at_unix_nanos: 5_000_000_000,
            traffic_since_unix_nanos: 3_000_000_000,
            traffic: vec![
                flow("10.0.0.2", 100),
                flow("0.0.0.0", 5),
                flow("not an address", 5),
                flow("10.0.0.3", 7),
            ],
            ..Default::default()
        };
        let mut table = AgentTable::default();
        let mut stats = Stats::default();
        let (skipped, moved) = merge_traffic(&mut table, &s, 42, 3, &mut stats);
        assert_eq!(skipped.count, 2);
        assert_eq!(
            stats.traffic_flows_refused, 1,
            "the fourth is past the bound of 3"
        );
        assert_eq!(moved.len(), 1);
        let f = &table.traffic[&moved[0]];
        assert_eq!(
            (f.bytes_sent, f.last_ms, f.last_interval_ms),
            (100, 42, 2000)
        );
        // Again: totals add, the latest interval is the last increment.
        merge_traffic(&mut table, &s, 43, 3, &mut stats);
        let f = &table.traffic[&moved[0]];
        assert_eq!((f.bytes_sent, f.last_sent), (200, 100));
    }

    #[test]
    fn values_no_host_reports_are_refused_naming_the_value() {
        let tcp = Protocol::Tcp;
        let refused = |key: ObsKey, value: ObsValue| check_row(&key, &value).unwrap_err();
        let e = refused(obs("255.255.255.255", 443, tcp), sockets(1));
        assert_eq!(e.reason(), "address");
        assert!(
            e.to_string()
                .contains("remote_ip 255.255.255.255 is the broadcast address"),
            "{e}"
        );
        assert_eq!(
            refused(obs("0.0.0.0", 443, tcp), sockets(1)).reason(),
            "address"
        );
        assert_eq!(refused(obs("::", 443, tcp), sockets(1)).reason(), "address");
        assert_eq!(
            refused(obs("224.0.0.251", 5353, tcp), sockets(1)).reason(),
            "address"
        );
        let mut local = obs("10.0.0.2", 443, tcp);
        local.local_ip = ip("255.255.255.255");
        assert!(
            refused(local, sockets(1))
                .to_string()
                .starts_with("local_ip")
        );
        let e = refused(obs("10.0.0.2", 443, tcp), sockets(u32::MAX));
        assert_eq!(e.reason(), "sockets");
        assert!(e.to_string().contains("4294967295"), "{e}");
        assert_eq!(
            refused(obs("10.0.0.2", 0, tcp), sockets(1)).reason(),
            "port"
        );
        let mut long = obs("10.0.0.2", 443, tcp);
        long.netns = "n".repeat(MAX_NAME + 1).into();
        assert_eq!(refused(long, sockets(1)).reason(), "name");
        // What real hosts do report passes.
        for key in [
            obs("10.0.0.2", 443, tcp),
            obs("203.0.113.7", 65535, tcp),
            obs("224.0.0.251", 5353, Protocol::Udp),
            obs("::1", 8080, tcp),
        ] {
            check_row(&key, &sockets(MAX_SOCKETS)).unwrap();
        }

        let listener = |addr: &str, port: u16| ListenerKey {
            ip: ip(addr),
            port,
            protocol: tcp,
            netns: String::new(),
        };
        check_listener(&listener("0.0.0.0", 80), "nginx").unwrap();
        check_listener(&listener("::", 80), "nginx").unwrap();
        assert_eq!(
            check_listener(&listener("255.255.255.255", 80), "x")
                .unwrap_err()
                .reason(),
            "address"
        );
        assert_eq!(
            check_listener(&listener("0.0.0.0", 0), "x")
                .unwrap_err()
                .reason(),
            "port"
        );
        assert_eq!(
            check_listener(&listener("0.0.0.0", 80), &"p".repeat(256))
                .unwrap_err()
                .reason(),
            "name"
        );

        for bad in ["255.255.255.255", "0.0.0.0", "::", "239.1.1.1", "ff02::1"] {
            let e = check_host_address(&ip(bad)).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        for good in ["10.0.0.1", "127.0.0.1", "fe80::1", "2001:db8::1"] {
            check_host_address(&ip(good)).unwrap();
        }
    }

    fn entry(
        direction: proto::Direction,
        remote: &str,
        port: u32,
        protocol: proto::Protocol,
    ) -> proto::ConnectionEntry {
        proto::ConnectionEntry {
            direction: direction as i32,
            local_ip: "10.0.0.1".into(),
            remote_ip: remote.into(),
            server_port: port,
            protocol: protocol as i32,
            process: Some(proto::ProcessInfo {
                name: "app".into(),
                ..Default::default()
            }),
            sockets: 1,
            ..Default::default()
        }
    }

    #[test]
    fn a_row_is_read_into_the_model_s_types_or_refused_naming_the_field() {
        use proto::Direction::{Client, Server, Unspecified};
        use proto::Protocol::{Tcp, Udp};
        let (key, value) = row(&entry(Client, "10.0.0.2", 65535, Tcp), false).unwrap();
        assert_eq!(key, obs("10.0.0.2", 65535, Protocol::Tcp));
        assert_eq!(value, sockets(1));
        let (key, _) = row(&entry(Server, "10.0.0.2", 53, Udp), false).unwrap();
        assert_eq!(
            (key.direction, key.server_port, key.protocol),
            (Direction::Server, 53, Protocol::Udp)
        );
        let refused = |e: proto::ConnectionEntry| row(&e, false).unwrap_err();
        let mut unknown = entry(Client, "10.0.0.2", 80, Tcp);
        unknown.direction = Unspecified as i32;
        assert_eq!(refused(unknown), malformed("direction", 0));
        let mut unknown = entry(Client, "10.0.0.2", 80, Tcp);
        unknown.protocol = proto::Protocol::Unspecified as i32;
        assert_eq!(refused(unknown), malformed("protocol", 0));
        for port in [0, 65536] {
            let e = refused(entry(Client, "10.0.0.2", port, Tcp));
            assert_eq!(
                e,
                Invalid::Port {
                    field: "server_port",
                    value: port
                }
            );
        }
        // A name of NAME_MAX bytes is one a host can have.
        let mut longest = entry(Client, "10.0.0.2", 80, Tcp);
        longest.process.as_mut().unwrap().name = "p".repeat(MAX_NAME);
        row(&longest, false).unwrap();
        // A removed row only needs to parse: it can only remove what was accepted.
        let broadcast = entry(Client, "255.255.255.255", 80, Tcp);
        assert_eq!(refused(broadcast.clone()).reason(), "address");
        row(&broadcast, true).unwrap();
    }

    #[test]
    fn nat_views_are_read_or_refused_naming_the_field() {
        use proto::Direction::Client;
        use proto::Protocol::Tcp;
        let mut through = entry(Client, "10.0.0.2", 8053, Tcp);
        through.via = "10.96.0.10:53".into();
        let (key, _) = row(&through, false).unwrap();
        assert_eq!(key.via, Some("10.96.0.10:53".parse().unwrap()));
        for (bad, reason) in [
            ("10.96.0.10", "malformed"),
            ("10.96.0.10:0", "port"),
            ("255.255.255.255:53", "address"),
        ] {
            through.via = bad.into();
            let e = row(&through, false).unwrap_err();
            assert_eq!(e.reason(), reason, "{bad}: {e}");
            assert!(e.to_string().contains("via"), "{e}");
        }
        let front = |front_ip: &str, front_port, backend_ip: &str| proto::NatFront {
            protocol: Tcp as i32,
            front_ip: front_ip.into(),
            front_port,
            backend_ip: backend_ip.into(),
            backend_port: 8080,
        };
        let mut table = AgentTable::default();
        let mut stats = Stats::default();
        let full = proto::ConnectionSnapshot {
            full: true,
            nat: Some(proto::NatFronts {
                fronts: vec![
                    front("10.0.0.1", 80, "172.17.0.2"),
                    front("10.0.0.1", 0, "172.17.0.2"),
                    front("10.0.0.1", 81, "0.0.0.0"),
                ],
            }),
            ..Default::default()
        };
        assert_eq!(merge(&mut table, &full, &mut stats).count, 2);
        assert_eq!(table.nat_fronts.len(), 1);
        // A delta without the set keeps it; one with an empty set clears it.
        merge(
            &mut table,
            &proto::ConnectionSnapshot::default(),
            &mut stats,
        );
        assert_eq!(table.nat_fronts.len(), 1);
        let cleared = proto::ConnectionSnapshot {
            nat: Some(proto::NatFronts::default()),
            ..Default::default()
        };
        merge(&mut table, &cleared, &mut stats);
        assert!(table.nat_fronts.is_empty());
    }

    #[test]
    fn a_snapshot_s_rows_fold_into_the_table_and_refusals_are_counted_by_reason() {
        use proto::Direction::Client;
        use proto::Protocol::Tcp;
        let mut table = AgentTable::default();
        let mut stats = Stats::default();
        let full = proto::ConnectionSnapshot {
            full: true,
            entries: vec![
                entry(Client, "10.0.0.2", 80, Tcp),
                entry(Client, "10.0.0.3", 0, Tcp),
                entry(Client, "10.0.0.4", 0, Tcp),
            ],
            addresses: vec!["10.0.0.1".into(), "not an address".into()],
            ..Default::default()
        };
        let skipped = merge(&mut table, &full, &mut stats);
        assert_eq!(skipped.count, 3);
        assert_eq!(skipped.first.unwrap().reason(), "port");
        let by_reason = BTreeMap::from([("malformed", 1), ("port", 2)]);
        assert_eq!(stats.rows_skipped_by_reason, by_reason);
        assert_eq!(table.entries.len(), 1);
        assert_eq!(table.addresses, [ip("10.0.0.1")].into());
        // A delta naming no address keeps the table's; one naming some replaces them.
        let delta = proto::ConnectionSnapshot {
            removed: vec![entry(Client, "10.0.0.2", 80, Tcp)],
            ..Default::default()
        };
        assert_eq!(merge(&mut table, &delta, &mut stats).count, 0);
        assert!(table.entries.is_empty());
        assert_eq!(table.addresses, [ip("10.0.0.1")].into());
        let moved = proto::ConnectionSnapshot {
            addresses: vec!["10.0.0.9".into()],
            ..Default::default()
        };
        merge(&mut table, &moved, &mut stats);
        assert_eq!(table.addresses, [ip("10.0.0.9")].into());
        // A full snapshot naming none leaves none.
        merge(
            &mut table,
            &proto::ConnectionSnapshot {
                full: true,
                ..Default::default()
            },
            &mut stats,
        );
        assert!(table.addresses.is_empty());
    }
}
