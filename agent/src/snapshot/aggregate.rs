//! Socket rows of one namespace → the rows of the dependency map.
//!
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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use super::conntrack::Translations;
use super::direction::{Direction, Listening, Role, role};
use super::{EntryKey, EntryValue, Flow, Listener, ProcessKey, Protocol, SocketRow, Table};

/// Builds the table from one namespace's parsed rows; `owner` maps an inode to the pid and
/// process holding it. `netns` tags every row (empty for the agent's own namespace).
#[cfg(test)]
pub(crate) fn build<'a>(
    rows: &[SocketRow],
    netns: &str,
    owner: impl Fn(u64) -> Option<(u32, &'a ProcessKey)>,
    control_plane: &[SocketAddr],
) -> Table {
    build_with(rows, netns, owner, control_plane, &Translations::default())
}

/// [`build`], with the kernel's address translations: a connection the kernel translated is a
/// row towards its backend, `via` the address its socket dialled.
pub(crate) fn build_with<'a>(
    rows: &[SocketRow],
    netns: &str,
    owner: impl Fn(u64) -> Option<(u32, &'a ProcessKey)>,
    control_plane: &[SocketAddr],
    nat: &Translations,
) -> Table {
    let control_plane: Vec<SocketAddr> = control_plane
        .iter()
        .map(|cp| SocketAddr::new(cp.ip().to_canonical(), cp.port()))
        .collect();
    let listening = Listening::of_rows(rows);
    let mut table = Table::default();
    table.stats.sockets_read = rows.len() as u64;
    // Grouped by pid first, so a process key is cloned once per group, not once per socket.
    type Group = (
        Direction,
        IpAddr,
        IpAddr,
        u16,
        Protocol,
        u32,
        Option<SocketAddr>,
    );
    let mut groups: HashMap<Group, (u32, bool, &ProcessKey)> = HashMap::new();
    for row in rows {
        let role = role(row);
        if role == Role::Ignored {
            continue;
        }
        // Traffic is counted per flow whether or not a process is seen: an orphaned or not yet
        // accepted socket still moved its bytes.
        if let (Some(tcp), Role::Connection) = (row.tcp, role) {
            // A connection the kernel translated moves its bytes to the backend, where its row
            // goes too.
            let remote = nat
                .backend(row.protocol, row.local, row.remote)
                .unwrap_or(row.remote);
            let (direction, server_port) = listening.direction(row.protocol, row.local, remote);
            table.sockets.push((
                Flow {
                    netns: netns.to_string(),
                    direction,
                    local_ip: row.local.ip(),
                    remote_ip: remote.ip(),
                    server_port,
                },
                tcp,
            ));
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
        let (remote, via) = match nat.backend(row.protocol, row.local, row.remote) {
            Some(backend) => (backend, Some(row.remote)),
            None => (row.remote, None),
        };
        let (direction, server_port) = listening.direction(row.protocol, row.local, remote);
        let group = groups
            .entry((
                direction,
                row.local.ip(),
                remote.ip(),
                server_port,
                row.protocol,
                pid,
                via,
            ))
            .or_insert((0, false, process));
        group.0 = group.0.saturating_add(1);
        group.1 |= control_plane.contains(&row.remote);
    }
    for (
        (direction, local_ip, remote_ip, server_port, protocol, pid, via),
        (sockets, cp, process),
    ) in groups
    {
        let key = EntryKey {
            netns: netns.to_string(),
            direction,
            local_ip,
            remote_ip,
            server_port,
            protocol,
            process: process.clone(),
            via,
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
    use crate::snapshot::TcpState;
    use crate::snapshot::tests::{ip, process, sa, tcp};

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
            &[],
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
        let table = build(&rows, "", |inode| (inode == 56).then_some((9, &app)), &[]);
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
        let cp = [sa("[::ffff:10.0.0.5]:7443")];
        let table = build(&rows, "", |_| Some((1, &app)), &cp);
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
}
