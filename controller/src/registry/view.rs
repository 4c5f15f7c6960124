//! What operators see of an agent: the registry's record of it, copied out whole for the API, the
//! console and `/metrics`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tapgraph::proto;

use super::health::AgentState;

/// The agent's virtual TAP, from its latest control record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CaptureView {
    /// disabled, running, stopped_breach or failed.
    pub state: String,
    pub error: Option<String>,
    pub packets_captured: u64,
    pub bytes_captured: u64,
    pub packets_sent: u64,
    pub bytes_sent: u64,
    pub packets_dropped_kernel: u64,
    pub packets_dropped_limiter: u64,
    pub packets_dropped_queue: u64,
    pub packets_in_flight: u64,
    pub breach: Option<BreachView>,
    /// In direct mode, what the agent sent to each target itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub direct: Vec<DirectView>,
}

/// One target an agent in direct mode sends to, as its control record counts it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectView {
    pub target: String,
    pub batches: u64,
    pub packets_written: u64,
    pub bytes_written: u64,
    pub packets_oversize: u64,
    pub packets_failed: u64,
    pub last_error: Option<String>,
    /// Capture to send on the agent's clock, µs; `None` before anything was sent.
    pub delay_p50_us: Option<u64>,
    pub delay_p99_us: Option<u64>,
}

impl From<&proto::DirectTarget> for DirectView {
    fn from(t: &proto::DirectTarget) -> Self {
        let sent = t.packets_written > 0;
        Self {
            target: t.target.clone(),
            batches: t.batches,
            packets_written: t.packets_written,
            bytes_written: t.bytes_written,
            packets_oversize: t.packets_oversize,
            packets_failed: t.packets_failed,
            last_error: (!t.last_error.is_empty()).then(|| t.last_error.clone()),
            delay_p50_us: sent.then_some(t.delay_p50_us),
            delay_p99_us: sent.then_some(t.delay_p99_us),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BreachView {
    pub measured_bps: u64,
    pub limit_bps: u64,
    pub intervals: u32,
    /// End of the interval that completed the breach, on the agent's clock.
    pub at_unix_ns: u64,
}

impl CaptureView {
    /// The agent's counters as the wire carries them (bytes dropped and batches are not kept).
    pub fn counters(&self) -> proto::Counters {
        proto::Counters {
            packets_captured: self.packets_captured,
            bytes_captured: self.bytes_captured,
            packets_sent: self.packets_sent,
            bytes_sent: self.bytes_sent,
            packets_dropped_kernel: self.packets_dropped_kernel,
            packets_dropped_limiter: self.packets_dropped_limiter,
            packets_dropped_queue: self.packets_dropped_queue,
            packets_in_flight: self.packets_in_flight,
            ..Default::default()
        }
    }

    pub(super) fn from_record(r: &proto::ControlRecord) -> Self {
        let c = r.counters.unwrap_or_default();
        let state = match proto::CaptureState::try_from(r.capture_state) {
            Ok(proto::CaptureState::Running) => "running",
            Ok(proto::CaptureState::StoppedBreach) => "stopped_breach",
            Ok(proto::CaptureState::Failed) => "failed",
            _ => "disabled",
        };
        Self {
            state: state.into(),
            error: (!r.last_error.is_empty()).then(|| r.last_error.clone()),
            packets_captured: c.packets_captured,
            bytes_captured: c.bytes_captured,
            packets_sent: c.packets_sent,
            bytes_sent: c.bytes_sent,
            packets_dropped_kernel: c.packets_dropped_kernel,
            packets_dropped_limiter: c.packets_dropped_limiter,
            packets_dropped_queue: c.packets_dropped_queue,
            packets_in_flight: c.packets_in_flight,
            breach: r.breach.map(|b| BreachView {
                measured_bps: b.measured_bits_per_second,
                limit_bps: b.limit_bits_per_second,
                intervals: b.intervals,
                at_unix_ns: b.at_unix_nanos,
            }),
            direct: r.direct_targets.iter().map(DirectView::from).collect(),
        }
    }
}

/// Whether an agent names the process of every TCP connect (its BPF tracer), as its Hello said.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnectProcess {
    /// An agent that has not said (older, or not connected yet).
    #[default]
    Unknown,
    Bpf,
    /// SYN-ACK capture only; the reason the agent gave.
    Off(String),
}

impl ConnectProcess {
    pub fn from_hello(caps: Option<&tapgraph::proto::Capabilities>) -> Self {
        match caps {
            Some(c) if c.connect_process => ConnectProcess::Bpf,
            Some(c) if !c.connect_process_off_reason.is_empty() => {
                ConnectProcess::Off(c.connect_process_off_reason.clone())
            }
            _ => ConnectProcess::Unknown,
        }
    }
}

/// One agent as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    pub id: String,
    pub hostname: String,
    pub state: AgentState,
    pub remote_addr: String,
    /// The replica holding the agent's live session; empty while it has none.
    pub controller: String,
    pub agent_version: String,
    pub kernel: String,
    pub interfaces: Vec<String>,
    pub connected_at_unix_ms: u64,
    pub last_seen_unix_ms: u64,
    pub sessions: u64,
    pub last_disconnect_reason: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub policy_name: String,
    pub policy_version_sent: u64,
    pub policy_version_applied: u64,
    pub policy_error: Option<String>,
    pub control_records: u64,
    pub last_control_sequence: u64,
    pub capture: CaptureView,
    /// Why the agent is degraded or lost.
    pub state_reason: Option<String>,
    pub heartbeat_ms: u64,
    /// The agent's clock minus the controller's, from TimeProbe round trips (NTP-style).
    pub clock_offset_ms: Option<f64>,
    pub probe_rtt_ms: Option<f64>,
    /// Rates between the last two control records.
    pub capture_pps: f64,
    pub send_pps: f64,
    pub send_bps: f64,
    pub snapshot_entries: u64,
    /// Whether the agent names every TCP client's process (BPF), from its Hello.
    #[serde(default)]
    pub connect_process: ConnectProcess,
}
