//! Direction inference: which side of a connection a socket is, from the listeners of its
//! namespace. Decided here only: the table build ([`super::aggregate`]) and the merge of
//! short-lived catches (`crate::report`) both ask this module.
//!
//! - A TCP socket is the `Server` side when its local port is listened on, in its namespace, on
//!   its own local address or a wildcard: `0.0.0.0` covers IPv4, `::` covers both (dual-stack;
//!   `IPV6_V6ONLY` cannot be seen in the tables). Anything else is `Client`.
//! - For UDP, a bound but unconnected socket is a listener, and a connected socket is `Server`
//!   when a UDP listener covers its local port the same way.
//! - A connection whose listener has since closed reads as `Client`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Protocol, SocketRow, TcpState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Client,
    Server,
}

/// What a socket row is to the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Listener,
    Connection,
    Ignored,
}

pub(super) fn role(row: &SocketRow) -> Role {
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

/// The listener addresses that take connections to `local`: its own, then the wildcards that
/// cover its family (`0.0.0.0` for IPv4 only, `::` for both).
fn covering(local: IpAddr) -> impl Iterator<Item = IpAddr> {
    let v4_wildcard = local.is_ipv4().then_some(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    [
        Some(local),
        v4_wildcard,
        Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
    ]
    .into_iter()
    .flatten()
}

/// Whether a listener bound to `bound` takes connections to `local` on its port and protocol.
pub fn covers(bound: IpAddr, local: IpAddr) -> bool {
    covering(local).any(|ip| ip == bound)
}

/// Listening `(protocol, ip, port)`s of one namespace's read, kept whether or not a process owns
/// them: a kernel listener (inode 0) still makes its connections `Server`s.
pub(super) struct Listening(HashSet<(Protocol, IpAddr, u16)>);

impl Listening {
    /// The listeners among `rows` (one namespace's).
    pub(super) fn of_rows(rows: &[SocketRow]) -> Self {
        Self(
            rows.iter()
                .filter(|row| role(row) == Role::Listener)
                .map(|row| (row.protocol, row.local.ip(), row.local.port()))
                .collect(),
        )
    }

    fn covers(&self, protocol: Protocol, local: SocketAddr) -> bool {
        covering(local.ip()).any(|ip| self.0.contains(&(protocol, ip, local.port())))
    }

    /// The side of a connection from `local` to `remote`, and its server's port: the local one
    /// for a `Server`, the remote one for a `Client`.
    pub(super) fn direction(
        &self,
        protocol: Protocol,
        local: SocketAddr,
        remote: SocketAddr,
    ) -> (Direction, u16) {
        if self.covers(protocol, local) {
            (Direction::Server, local.port())
        } else {
            (Direction::Client, remote.port())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::{build_one, directions, ip, tcp, udp};

    #[test]
    fn a_listener_covers_its_address_and_its_family_wildcards() {
        let covered = |bound: &str, local: &str| covers(ip(bound), ip(local));
        assert!(covered("10.0.0.1", "10.0.0.1"));
        assert!(covered("0.0.0.0", "10.0.0.1"));
        assert!(covered("::", "10.0.0.1"));
        assert!(covered("::", "fd00::1"));
        assert!(covered("fd00::1", "fd00::1"));
        assert!(!covered("10.0.0.2", "10.0.0.1"));
        assert!(!covered("0.0.0.0", "fd00::1"), "0.0.0.0 takes IPv4 only");
        assert!(!covered("127.0.0.1", "::1"));
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
}
