//! `tapgraphctl mirror`: each agent's virtual TAP, from capture on the agent to the write at each
//! target, with the drops of every stage by reason.

use serde_json::json;
use tapgraph::proto::{self, admin_service_client::AdminServiceClient};
use tonic::transport::Channel;

use crate::{Failure, print_json, table};

#[derive(clap::Args, Debug)]
#[command(after_help = "Stages and their drops:
  agent       kernel (the capture ring overflowed), limiter (over the policy's speed limit),
              queue (the stream to the controller, or direct sends, could not keep up)
  direct      oversize, failed: a target the agent sends to itself (policy --direct), as its
              control records count it; the controller receives none of these packets
  controller  queue (the target's writer could not keep up), oversize (frame above the target's
              MTU: turn off GRO/GSO/TSO on the capturing interface or raise the MTU), failed,
              invalid, target_unavailable (the target could not be opened; see ERROR),
              duplicate (another agent sent the target this packet first: both ends of a
              connection are monitored; the policy's --dedup off keeps every copy)
TARGET says (created) or (opened) after a TAP device the controller made or one an operator made,
and (direct) after a target the agent sends to itself.
DELAY is capture to write (p50/p99), on the controller's clock; for a direct target, capture to
send on the agent's.")]
pub struct MirrorArgs {
    /// Only this agent.
    #[arg(long, value_name = "ID")]
    agent: Option<String>,
}

fn drops(map: &std::collections::HashMap<String, u64>) -> String {
    let mut parts: Vec<String> = map
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    parts.sort();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

pub async fn run(
    admin: &mut AdminServiceClient<Channel>,
    args: MirrorArgs,
    json_out: bool,
) -> Result<(), Failure> {
    let stats = admin
        .get_mirror_stats(proto::GetMirrorStatsRequest {
            agent_id: args.agent.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if json_out {
        let agents: Vec<_> = stats
            .agents
            .iter()
            .map(|a| {
                let c = a.counters.unwrap_or_default();
                json!({
                    "agent": a.agent_id, "hostname": a.hostname, "capture": a.capture_state,
                    "error": a.capture_error, "captured": c.packets_captured, "sent": c.packets_sent,
                    "in_flight": c.packets_in_flight,
                    "dropped": {"kernel": c.packets_dropped_kernel, "limiter": c.packets_dropped_limiter,
                                "queue": c.packets_dropped_queue},
                    "targets": a.targets.iter().map(|t| json!({
                        "target": t.target, "note": (!t.target_note.is_empty()).then_some(&t.target_note),
                        "direct": t.direct,
                        "received": t.packets_received, "written": t.packets_written,
                        "bytes_written": t.bytes_written, "batches_lost": t.batches_lost,
                        "dropped": t.dropped, "error": t.last_error,
                        "delay_p50_us": t.delay_p50_us, "delay_p99_us": t.delay_p99_us,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        print_json(&json!(agents));
        return Ok(());
    }
    let mut rows = Vec::new();
    for a in &stats.agents {
        let c = a.counters.unwrap_or_default();
        let agent_drops = format!(
            "{}/{}/{}",
            c.packets_dropped_kernel, c.packets_dropped_limiter, c.packets_dropped_queue
        );
        let mut first = vec![
            a.agent_id.clone(),
            a.capture_state.clone(),
            c.packets_captured.to_string(),
            c.packets_sent.to_string(),
            agent_drops,
        ];
        if a.targets.is_empty() {
            first.extend(["-", "-", "-", "-", "-"].map(String::from));
            first.push(if a.capture_error.is_empty() {
                "-".into()
            } else {
                a.capture_error.clone()
            });
            rows.push(first);
            continue;
        }
        for (i, t) in a.targets.iter().enumerate() {
            let mut row = if i == 0 {
                first.clone()
            } else {
                vec![String::new(); 5]
            };
            let error = [&a.capture_error, &t.last_error]
                .into_iter()
                .filter(|e| !e.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join("; ");
            row.extend([
                if t.target_note.is_empty() {
                    t.target.clone()
                } else {
                    format!("{} ({})", t.target, t.target_note)
                },
                if t.direct {
                    "-".into()
                } else {
                    t.packets_received.to_string()
                },
                t.packets_written.to_string(),
                drops(&t.dropped),
                if t.packets_written == 0 {
                    "-".into()
                } else {
                    format!("{}/{} µs", t.delay_p50_us, t.delay_p99_us)
                },
                if error.is_empty() { "-".into() } else { error },
            ]);
            rows.push(row);
        }
    }
    table::print(
        &[
            "AGENT",
            "CAPTURE",
            "CAPTURED",
            "SENT",
            "DROP K/L/Q",
            "TARGET",
            "RECEIVED",
            "WRITTEN",
            "DROPPED",
            "DELAY",
            "ERROR",
        ],
        &rows,
    );
    Ok(())
}
