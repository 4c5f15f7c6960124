//! How `agent list`, `agent show` and `agent label` render an agent: a table row, `key value`
//! lines, or JSON for scripts.

use serde_json::json;
use tapgraph::proto;

use crate::{labels_text, ns_time};

/// `agent list`'s columns, in the order [`row`] fills them.
pub const HEADERS: &[&str] = &[
    "ID",
    "HOSTNAME",
    "STATE",
    "CONTROLLER",
    "LABELS",
    "LAST SEEN",
    "POLICY",
    "PPS CAP/SENT",
    "DROPS",
    "LOST",
    "DELAY P50/P99",
    "CLOCK",
];

/// One agent as a row of `agent list`, under [`HEADERS`].
pub fn row(a: &proto::AgentInfo) -> Vec<String> {
    vec![
        a.id.clone(),
        a.hostname.clone(),
        state_name(a.state).into(),
        or_dash(&a.controller),
        labels_text(&a.labels),
        ns_time(a.last_seen_unix_nanos),
        a.policy_version_applied.to_string(),
        format!(
            "{:.0}/{:.0}",
            a.capture_packets_per_second, a.send_packets_per_second
        ),
        drops_text(a),
        a.packets_lost_in_transit.to_string(),
        delay_text(a),
        offset_text(a),
    ]
}

/// One agent as `agent show` prints it: `key value` lines.
pub fn fields(a: &proto::AgentInfo) -> Vec<(&'static str, String)> {
    vec![
        ("id", a.id.clone()),
        ("hostname", a.hostname.clone()),
        ("state", state_name(a.state).into()),
        ("controller", or_dash(&a.controller)),
        ("labels", labels_text(&a.labels)),
        ("last seen", ns_time(a.last_seen_unix_nanos)),
        ("certificate expires", ns_time(a.cert_not_after_unix_nanos)),
        ("policy applied", a.policy_version_applied.to_string()),
        ("policy error", or_dash(&a.policy_error)),
        ("agent version", a.agent_version.clone()),
        ("remote address", a.remote_addr.clone()),
        ("state reason", or_dash(&a.state_reason)),
        ("policy sent", a.policy_version_sent.to_string()),
        ("capture", a.capture_state.clone()),
        (
            "rates",
            format!(
                "captured {:.0} pps, sent {:.0} pps ({})",
                a.capture_packets_per_second,
                a.send_packets_per_second,
                tapgraph::units::format_bitrate(a.send_bits_per_second as u64)
            ),
        ),
        ("drops", drops_text(a)),
        ("lost in transit", a.packets_lost_in_transit.to_string()),
        ("delay p50/p99", delay_text(a)),
        ("clock offset", offset_text(a)),
        ("snapshot entries", a.snapshot_entries.to_string()),
        ("connect process", connect_process_text(a)),
    ]
}

/// Whether the agent names every TCP client's process: `bpf`, or why not (its clients of
/// short-lived connections may then show no process).
fn connect_process_text(a: &proto::AgentInfo) -> String {
    match &a.connect_process {
        None => "-".into(),
        Some(c) if c.bpf => "bpf (every TCP connect names its process)".into(),
        Some(c) => format!(
            "no BPF on this host: SYN-ACK capture only, short-lived clients' processes unknown ({})",
            c.off_reason
        ),
    }
}

/// One agent for `-o json`; `controller` is `""` while the agent is not connected.
pub fn json(a: &proto::AgentInfo) -> serde_json::Value {
    json!({
        "id": a.id,
        "hostname": a.hostname,
        "state": state_name(a.state),
        "controller": a.controller,
        "labels": a.labels,
        "last_seen": ns_time(a.last_seen_unix_nanos),
        "cert_not_after": ns_time(a.cert_not_after_unix_nanos),
        "policy_version_applied": a.policy_version_applied,
        "policy_version_sent": a.policy_version_sent,
        "policy_error": a.policy_error,
        "agent_version": a.agent_version,
        "remote_addr": a.remote_addr,
        "state_reason": a.state_reason,
        "capture": a.capture_state,
        "capture_pps": a.capture_packets_per_second,
        "send_pps": a.send_packets_per_second,
        "send_bps": a.send_bits_per_second,
        "counters": a.counters.map(|c| json!({
            "captured": c.packets_captured, "sent": c.packets_sent, "in_flight": c.packets_in_flight,
            "dropped": {"kernel": c.packets_dropped_kernel, "limiter": c.packets_dropped_limiter,
                        "queue": c.packets_dropped_queue},
        })),
        "dropped_at_targets": a.dropped_at_targets,
        "lost_in_transit": a.packets_lost_in_transit,
        "delay_p50_ms": a.delay_p50_ms,
        "delay_p99_ms": a.delay_p99_ms,
        "clock_offset_ms": a.clock_offset_known.then_some(a.clock_offset_ms),
        "snapshot_entries": a.snapshot_entries,
        "connect_process": a.connect_process.as_ref().map(|c| json!({
            "bpf": c.bpf, "off_reason": c.off_reason,
        })),
    })
}

fn state_name(state: i32) -> &'static str {
    match proto::AgentState::try_from(state) {
        Ok(proto::AgentState::Connected) => "connected",
        Ok(proto::AgentState::Degraded) => "degraded",
        Ok(proto::AgentState::Lost) => "lost",
        Ok(proto::AgentState::Revoked) => "revoked",
        _ => "enrolled",
    }
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_string()
    }
}

/// Drops by stage, e.g. `k0 l12 q0 | t3`: kernel, limiter, queue on the agent; at the targets.
fn drops_text(a: &proto::AgentInfo) -> String {
    let c = a.counters.unwrap_or_default();
    let at_targets: u64 = a.dropped_at_targets.values().sum();
    format!(
        "k{} l{} q{} | t{}",
        c.packets_dropped_kernel, c.packets_dropped_limiter, c.packets_dropped_queue, at_targets
    )
}

fn offset_text(a: &proto::AgentInfo) -> String {
    if a.clock_offset_known {
        format!("{:+.2} ms", a.clock_offset_ms)
    } else {
        "-".into()
    }
}

fn delay_text(a: &proto::AgentInfo) -> String {
    if a.delay_p99_ms > 0.0 {
        format!("{:.2}/{:.2} ms", a.delay_p50_ms, a.delay_p99_ms)
    } else {
        "-".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, state: proto::AgentState, controller: &str) -> proto::AgentInfo {
        proto::AgentInfo {
            id: id.into(),
            hostname: format!("{id}.example"),
            state: state as i32,
            controller: controller.into(),
            ..Default::default()
        }
    }

    #[test]
    fn agent_list_shows_the_controller_of_each_agent_after_its_state() {
        let agents = [
            agent("web-1", proto::AgentState::Connected, "ctl-b"),
            agent("db-1", proto::AgentState::Unspecified, ""),
        ];
        let rows: Vec<Vec<String>> = agents.iter().map(row).collect();
        let lines = crate::table::render(HEADERS, &rows);
        let words = |line: &str| -> Vec<String> {
            line.split_whitespace().take(4).map(String::from).collect()
        };
        assert_eq!(words(&lines[0]), ["ID", "HOSTNAME", "STATE", "CONTROLLER"]);
        assert_eq!(
            words(&lines[1]),
            ["web-1", "web-1.example", "connected", "ctl-b"]
        );
        assert_eq!(words(&lines[2]), ["db-1", "db-1.example", "enrolled", "-"]);
        assert!(rows.iter().all(|r| r.len() == HEADERS.len()));
    }

    #[test]
    fn the_figures_read_as_their_columns_say() {
        let mut a = agent("web-1", proto::AgentState::Degraded, "ctl-b");
        a.counters = Some(proto::Counters {
            packets_dropped_kernel: 1,
            packets_dropped_limiter: 2,
            packets_dropped_queue: 3,
            ..Default::default()
        });
        a.dropped_at_targets = [("queue".to_string(), 4), ("failed".to_string(), 5)].into();
        (a.clock_offset_known, a.clock_offset_ms) = (true, -1.234);
        (a.delay_p50_ms, a.delay_p99_ms) = (0.5, 2.25);
        let cell = |a: &proto::AgentInfo, header: &str| {
            let at = HEADERS.iter().position(|h| *h == header).unwrap();
            row(a)[at].clone()
        };
        assert_eq!(cell(&a, "STATE"), "degraded");
        assert_eq!(cell(&a, "DROPS"), "k1 l2 q3 | t9");
        assert_eq!(cell(&a, "DELAY P50/P99"), "0.50/2.25 ms");
        assert_eq!(cell(&a, "CLOCK"), "-1.23 ms");
        let quiet = agent("db-1", proto::AgentState::Connected, "ctl-b");
        assert_eq!(cell(&quiet, "DELAY P50/P99"), "-");
        assert_eq!(cell(&quiet, "CLOCK"), "-");
        for (state, name) in [
            (proto::AgentState::Connected, "connected"),
            (proto::AgentState::Lost, "lost"),
            (proto::AgentState::Revoked, "revoked"),
            (proto::AgentState::Unspecified, "enrolled"),
        ] {
            assert_eq!(cell(&agent("x", state, ""), "STATE"), name);
        }
    }

    #[test]
    fn agent_show_says_whether_every_client_process_is_named() {
        let mut a = agent("web-1", proto::AgentState::Connected, "ctl-a");
        let shown = |a: &proto::AgentInfo| {
            fields(a)
                .into_iter()
                .find(|(k, _)| *k == "connect process")
                .map(|(_, v)| v)
                .unwrap()
        };
        assert_eq!(shown(&a), "-", "an older agent did not say");
        a.connect_process = Some(proto::ConnectProcess {
            bpf: true,
            off_reason: String::new(),
        });
        assert!(shown(&a).starts_with("bpf"));
        a.connect_process = Some(proto::ConnectProcess {
            bpf: false,
            off_reason: "disabled by configuration (snapshot.bpf = false)".into(),
        });
        let off = shown(&a);
        assert!(off.starts_with("no BPF on this host"), "{off}");
        assert!(off.contains("snapshot.bpf = false"), "{off}");
        assert_eq!(json(&a)["connect_process"]["bpf"], false);
    }

    #[test]
    fn agent_show_and_json_carry_the_controller() {
        let a = agent("web-1", proto::AgentState::Connected, "ctl-b");
        assert!(fields(&a).contains(&("controller", "ctl-b".to_string())));
        assert_eq!(json(&a)["controller"], "ctl-b");
        let gone = agent("db-1", proto::AgentState::Lost, "");
        assert!(fields(&gone).contains(&("controller", "-".to_string())));
        assert_eq!(json(&gone)["controller"], "");
    }
}
