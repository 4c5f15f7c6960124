//! `tapgraphctl policy …`: set, get, list, delete, and rollout status.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use clap::{Args, Subcommand};
use serde_json::json;
use tapgraph::policy::{CaptureMode, ErspanType, PolicySpec, Target, Targets};
use tapgraph::proto::{self, admin_service_client::AdminServiceClient};
use tapgraph::units::{format_duration, parse_bitrate, parse_duration};
use tonic::transport::Channel;

use crate::{Failure, print_json, table};

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Create or change a policy. Flags not given keep their current value (or the default, for a
    /// new policy). Everything is validated here first, the BPF filter compiled with libpcap; a bad
    /// value is refused with the reason and nothing is sent.
    #[command(after_help = "\
Examples:
  tapgraphctl policy set web --selector role=web --filter 'tcp port 80' --limit 2Mbit \\
      --check-interval 10s --breach-intervals 6 --target interface:span0
  tapgraphctl policy set web --limit 5Mbit          # change one field, keep the rest
  tapgraphctl policy set fleet --all --heartbeat-interval 5s
  tapgraphctl policy set db7 --agent db-7 --interface eth1

The most specific policy wins for each agent: --agent, then the selector with the most labels,
then --all, then the controller's configured default. Two policies that could tie for an agent are
refused. Units: rates 500kbit, 2Mbit, 1G (bit/s); durations 500ms, 10s, 5m.
Targets: interface:NAME (reinject: sent on NAME), tap:NAME (received on TAP device NAME, created
if missing), pcap:PATH, vxlan:HOST[:PORT] (with --vni), gre:HOST (with --gre-key),
erspan:HOST (with --erspan-type 2|3, --erspan-session), none. Several --target flags write
every packet to each, e.g. --target tap:span0 --target pcap:web.pcapng; each has its own counters
and queue, so a slow one never holds up the others.")]
    Set(Box<SetArgs>),
    /// Show one policy.
    Get { name: String },
    /// List policies, the configured default last.
    List,
    /// Delete a policy; its agents fall back to the next most specific match.
    Delete { name: String },
    /// Rollout status: for each connected agent, the policy and version it should run, the version it
    /// applied, and any error. With --wait, block until every targeted agent applied it (exit 0), one
    /// refused it (exit 4) or the timeout passed (exit 5).
    Status {
        /// Only agents that this policy applies to.
        name: Option<String>,
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Args, Debug)]
pub struct SetArgs {
    /// Policy name.
    name: String,
    /// Apply to every agent.
    #[arg(long, conflicts_with_all = ["selector", "agent"])]
    all: bool,
    /// Apply to agents with these labels, e.g. role=web,env=prod.
    #[arg(long, value_name = "K=V,...", value_parser = tapgraph::labels::parse_selector, conflicts_with = "agent")]
    selector: Option<BTreeMap<String, String>>,
    /// Apply to one agent.
    #[arg(long, value_name = "ID")]
    agent: Option<String>,
    /// Turn capture on.
    #[arg(long, conflicts_with = "no_capture")]
    capture: bool,
    /// Turn capture off.
    #[arg(long)]
    no_capture: bool,
    /// Capture interface, or `any`.
    #[arg(long, value_name = "NAME")]
    interface: Option<String>,
    /// BPF filter (libpcap syntax); '' captures everything.
    #[arg(long, value_name = "EXPR")]
    filter: Option<String>,
    /// Bytes kept of each packet.
    #[arg(long, value_name = "BYTES")]
    snaplen: Option<u32>,
    /// immediate (lowest delay) or buffered (least CPU).
    #[arg(long, value_name = "MODE", value_parser = |s: &str| s.parse::<CaptureMode>())]
    mode: Option<CaptureMode>,
    /// Speed limit, e.g. 2Mbit.
    #[arg(long, value_name = "RATE", value_parser = parse_bitrate)]
    limit: Option<u64>,
    /// How often the offered rate is checked against the limit.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    check_interval: Option<Duration>,
    /// Capture stops after this many consecutive intervals over the limit; 0 disables the rule.
    #[arg(long, value_name = "N")]
    breach_intervals: Option<u32>,
    /// Where mirrored packets go: interface:NAME, tap:NAME, pcap:PATH, vxlan:HOST[:PORT],
    /// gre:HOST, erspan:HOST or none. Give it several times to write every packet to each (e.g.
    /// reinject and record); the flags replace the policy's targets.
    #[arg(long, value_name = "TARGET", value_parser = |s: &str| s.parse::<Target>())]
    target: Vec<Target>,
    /// The agent sends the encapsulated stream to the targets itself (all vxlan, gre or erspan),
    /// as cloud traffic mirroring does: the controller stays off the packet path.
    #[arg(long, conflicts_with = "no_direct")]
    direct: bool,
    /// The agent streams to the controller, which writes the targets (the default).
    #[arg(long)]
    no_direct: bool,
    /// VXLAN network identifier, with a vxlan target.
    #[arg(long, value_name = "VNI")]
    vni: Option<u32>,
    /// With a pcap target: start a new file after this many bytes, e.g. 100MB (0: never).
    #[arg(long, value_name = "SIZE", value_parser = tapgraph::units::parse_size)]
    rotate_size: Option<u64>,
    /// With a pcap target: start a new file this often, e.g. 1h (0s: never).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    rotate_interval: Option<Duration>,
    /// Buffered mode: longest the kernel holds packets before handing them over (1ms..1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    buffer_timeout: Option<Duration>,
    /// The agent's kernel capture ring, e.g. 32MiB (tcpdump's -B): how long a burst can wait
    /// for the capture thread. It counts in the agent's RSS.
    #[arg(long, value_name = "SIZE", value_parser = tapgraph::units::parse_size)]
    buffer_size: Option<u64>,
    /// How often the agent sends connection-table changes.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    snapshot_interval: Option<Duration>,
    /// How often the agent sends a control record.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Packets per mirror batch at most.
    #[arg(long, value_name = "N")]
    batch_packets: Option<u32>,
    /// Longest a packet waits for its batch.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    batch_delay: Option<Duration>,
    /// Deliver each packet once to a target fed by several agents (on, the default): a copy
    /// another agent captured within 50 ms (the other end of the connection) is dropped and
    /// counted as `duplicate`. Off: every agent's copy is written.
    #[arg(long, value_name = "on|off", value_parser = clap::builder::BoolishValueParser::new())]
    dedup: Option<bool>,
    /// GRE key (32 bits), with a gre target; without it the header has no key.
    #[arg(long, value_name = "KEY")]
    gre_key: Option<u32>,
    /// ERSPAN type, with an erspan target: 2 (type II, the default) or 3 (type III, timestamped).
    #[arg(long, value_name = "2|3", value_parser = |s: &str| s.parse::<ErspanType>())]
    erspan_type: Option<ErspanType>,
    /// ERSPAN session id (0..=1023), with an erspan target.
    #[arg(long, value_name = "ID")]
    erspan_session: Option<u16>,
}

impl SetArgs {
    fn selector(&self) -> Option<proto::Selector> {
        let kind = if self.all {
            proto::selector::Kind::All(true)
        } else if let Some(labels) = &self.selector {
            proto::selector::Kind::Labels(proto::Labels {
                labels: labels.clone().into_iter().collect(),
            })
        } else {
            proto::selector::Kind::AgentId(self.agent.clone()?)
        };
        Some(proto::Selector { kind: Some(kind) })
    }

    /// `base` with every given flag applied.
    fn apply(&self, mut spec: PolicySpec) -> PolicySpec {
        if self.capture {
            spec.capture = true;
        }
        if self.no_capture {
            spec.capture = false;
        }
        if self.direct {
            spec.direct = true;
        }
        if self.no_direct {
            spec.direct = false;
        }
        macro_rules! set {
            ($($field:ident <- $flag:ident),*) => {$(
                if let Some(v) = &self.$flag { spec.$field = v.clone(); }
            )*};
        }
        set!(interface <- interface, filter <- filter, snaplen <- snaplen, mode <- mode,
             limit_bps <- limit, check_interval <- check_interval,
             breach_intervals <- breach_intervals,
             snapshot_interval <- snapshot_interval, heartbeat_interval <- heartbeat_interval,
             batch_packets <- batch_packets, batch_delay <- batch_delay,
             buffer_timeout <- buffer_timeout, buffer_size <- buffer_size, dedup <- dedup);
        if !self.target.is_empty() {
            // `none` alone clears; with others it is refused by validation.
            spec.targets = match self.target.as_slice() {
                [Target::None] => Vec::new(),
                targets => targets.to_vec(),
            };
        }
        for target in &mut spec.targets {
            match target {
                Target::Vxlan { vni: v, .. } => {
                    if let Some(vni) = self.vni {
                        *v = vni;
                    }
                }
                Target::Pcap {
                    rotate_bytes,
                    rotate_interval,
                    ..
                } => {
                    if let Some(b) = self.rotate_size {
                        *rotate_bytes = b;
                    }
                    if let Some(d) = self.rotate_interval {
                        *rotate_interval = d;
                    }
                }
                Target::Gre { key, .. } => {
                    if let Some(k) = self.gre_key {
                        *key = Some(k);
                    }
                }
                Target::Erspan { kind, session, .. } => {
                    if let Some(k) = self.erspan_type {
                        *kind = k;
                    }
                    if let Some(s) = self.erspan_session {
                        *session = s;
                    }
                }
                _ => {}
            }
        }
        spec
    }
}

fn selector_text(s: Option<&proto::Selector>) -> String {
    match s.and_then(|s| s.kind.as_ref()) {
        Some(proto::selector::Kind::All(_)) | None => "all".into(),
        Some(proto::selector::Kind::AgentId(id)) => format!("agent={id}"),
        Some(proto::selector::Kind::Labels(l)) => {
            let mut v: Vec<String> = l.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            v.sort();
            v.join(",")
        }
    }
}

fn spec_of(p: &proto::StoredPolicy) -> Result<PolicySpec, Failure> {
    let policy = p
        .policy
        .as_ref()
        .ok_or_else(|| Failure(1, anyhow!("controller sent a policy without contents")))?;
    PolicySpec::from_proto(policy)
        .map_err(|e| Failure(1, anyhow!("controller sent an invalid policy: {e}")))
}

fn policy_json(p: &proto::StoredPolicy) -> Result<serde_json::Value, Failure> {
    let mut v = json!({
        "name": p.name,
        "selector": selector_text(p.selector.as_ref()),
        "version": p.policy.as_ref().map_or(0, |x| x.version),
    });
    if let (Some(out), serde_json::Value::Object(spec)) = (v.as_object_mut(), spec_of(p)?.to_json())
    {
        out.extend(spec);
    }
    Ok(v)
}

fn state_of(s: &proto::AgentPolicyStatus) -> &'static str {
    if !s.error.is_empty() {
        "failed"
    } else if s.pending {
        "pending"
    } else {
        "applied"
    }
}

pub async fn run(
    admin: &mut AdminServiceClient<Channel>,
    command: PolicyCommand,
    json_out: bool,
) -> Result<(), Failure> {
    match command {
        PolicyCommand::Set(args) => {
            let existing = match admin
                .get_policy(proto::GetPolicyRequest {
                    name: args.name.clone(),
                })
                .await
            {
                Ok(p) => Some(p.into_inner()),
                Err(s) if s.code() == tonic::Code::NotFound => None,
                Err(s) => return Err(s.into()),
            };
            let selector = match (args.selector(), &existing) {
                (Some(s), _) => s,
                (None, Some(p)) => p.selector.clone().unwrap_or_default(),
                (None, None) => {
                    return Err(Failure(
                        2,
                        anyhow!(
                            "policy {} is new: say whom it applies to with --all, --selector K=V,... or --agent ID",
                            args.name
                        ),
                    ));
                }
            };
            let base = match &existing {
                Some(p) => spec_of(p)?,
                None => PolicySpec::default(),
            };
            let spec = args.apply(base);
            // Flags for a target the policy does not have would be ignored silently: refuse them.
            let has = |kind: fn(&Target) -> bool| spec.targets.iter().any(kind);
            let target_flag = if args.vni.is_some() && !has(|t| matches!(t, Target::Vxlan { .. })) {
                Some("--vni needs a vxlan target")
            } else if args.gre_key.is_some() && !has(|t| matches!(t, Target::Gre { .. })) {
                Some("--gre-key needs a gre target")
            } else if (args.erspan_type.is_some() || args.erspan_session.is_some())
                && !has(|t| matches!(t, Target::Erspan { .. }))
            {
                Some("--erspan-type and --erspan-session need an erspan target")
            } else if (args.rotate_size.is_some() || args.rotate_interval.is_some())
                && !has(|t| matches!(t, Target::Pcap { .. }))
            {
                Some("--rotate-size and --rotate-interval need a pcap target")
            } else {
                None
            };
            if let Some(reason) = target_flag {
                return Err(Failure(
                    2,
                    anyhow!(
                        "{reason} (the policy's targets are {}); nothing was changed",
                        Targets(spec.targets.clone())
                    ),
                ));
            }
            // Refused here, with the reason, before anything is sent.
            spec.validate(true)
                .map_err(|e| Failure(2, anyhow!("{e}; nothing was changed")))?;
            let stored = admin
                .set_policy(proto::SetPolicyRequest {
                    name: args.name.clone(),
                    selector: Some(selector),
                    policy: Some(spec.to_proto(0, &args.name)),
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&policy_json(&stored)?);
            } else {
                println!(
                    "policy {} v{} set for {}",
                    stored.name,
                    stored.policy.as_ref().map_or(0, |p| p.version),
                    selector_text(stored.selector.as_ref())
                );
                println!(
                    "  follow the rollout: tapgraphctl policy status {} --wait",
                    stored.name
                );
            }
        }
        PolicyCommand::Get { name } => {
            let p = admin
                .get_policy(proto::GetPolicyRequest { name })
                .await?
                .into_inner();
            let v = policy_json(&p)?;
            if json_out {
                print_json(&v);
            } else if let Some(map) = v.as_object() {
                let pairs: Vec<(String, String)> = map
                    .iter()
                    .map(|(k, val)| {
                        let text = val.as_str().map_or_else(|| val.to_string(), str::to_string);
                        let text = if text.is_empty() { "''".into() } else { text };
                        (k.replace('_', " "), text)
                    })
                    .collect();
                table::fields(&pairs);
            }
        }
        PolicyCommand::List => {
            let list = admin
                .list_policies(proto::ListPoliciesRequest {})
                .await?
                .into_inner()
                .policies;
            let values: Vec<serde_json::Value> =
                list.iter().map(policy_json).collect::<Result<_, _>>()?;
            if json_out {
                print_json(&json!(values));
            } else {
                let rows: Vec<Vec<String>> = values
                    .iter()
                    .map(|v| {
                        [
                            "name",
                            "selector",
                            "version",
                            "capture",
                            "interface",
                            "filter",
                            "limit",
                            "target",
                            "heartbeat_interval",
                        ]
                        .iter()
                        .map(|k| {
                            v[k].as_str()
                                .map_or_else(|| v[k].to_string(), str::to_string)
                        })
                        .collect()
                    })
                    .collect();
                table::print(
                    &[
                        "NAME",
                        "SELECTOR",
                        "VERSION",
                        "CAPTURE",
                        "INTERFACE",
                        "FILTER",
                        "LIMIT",
                        "TARGET",
                        "HEARTBEAT",
                    ],
                    &rows,
                );
            }
        }
        PolicyCommand::Delete { name } => {
            admin
                .delete_policy(proto::DeletePolicyRequest { name: name.clone() })
                .await?;
            if !json_out {
                println!(
                    "policy {name} deleted; its agents fall back to the next most specific policy"
                );
            }
        }
        PolicyCommand::Status {
            name,
            wait,
            timeout,
        } => {
            let request = proto::GetPolicyStatusRequest {
                name: name.clone().unwrap_or_default(),
            };
            let started = Instant::now();
            let agents = loop {
                let agents = admin
                    .get_policy_status(request.clone())
                    .await?
                    .into_inner()
                    .agents;
                let failed = agents.iter().any(|a| !a.error.is_empty());
                let pending = agents.iter().any(|a| a.pending);
                if !wait || failed || !pending || started.elapsed() >= timeout {
                    break agents;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            if json_out {
                print_json(&json!(agents.iter().map(|a| json!({
                    "agent": a.agent_id, "policy": a.policy_name, "version_wanted": a.version_wanted,
                    "version_applied": a.version_applied, "state": state_of(a), "error": a.error,
                    "target_error": a.target_error,
                })).collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = agents
                    .iter()
                    .map(|a| {
                        vec![
                            a.agent_id.clone(),
                            a.policy_name.clone(),
                            a.version_wanted.to_string(),
                            a.version_applied.to_string(),
                            state_of(a).into(),
                            match (a.error.as_str(), a.target_error.as_str()) {
                                ("", "") => "-".into(),
                                ("", target) => target.into(),
                                (error, _) => error.into(),
                            },
                        ]
                    })
                    .collect();
                table::print(
                    &["AGENT", "POLICY", "WANTED", "APPLIED", "STATE", "ERROR"],
                    &rows,
                );
            }
            if wait {
                if let Some(a) = agents.iter().find(|a| !a.error.is_empty()) {
                    return Err(Failure(
                        4,
                        anyhow!(
                            "agent {} refused policy {} v{}: {}",
                            a.agent_id,
                            a.policy_name,
                            a.version_wanted,
                            a.error
                        ),
                    ));
                }
                if agents.iter().any(|a| a.pending) {
                    return Err(Failure(
                        5,
                        anyhow!(
                            "timed out after {} with agents still pending",
                            format_duration(timeout)
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}
