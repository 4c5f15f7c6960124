//! The health judgement: from an agent's session, its control records (heartbeats) and what they
//! say, whether it is connected, degraded or lost, and why. [`judge`] decides; the task records a
//! change, shares it through [`crate::health::Health`] for the map, and announces it as an event.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tapgraph::proto;

use super::agents::Agent;
use super::task::RegistryTask;
use super::view::CaptureView;

/// A heartbeat interval missed this many times makes an agent lost.
pub(super) const LOST_AFTER: u32 = 3;
/// The heartbeat interval until a policy says otherwise, and for a policy that leaves it at 0.
pub(super) const DEFAULT_HEARTBEAT_MS: u64 = 5_000;
/// Silence is judged against a heartbeat of at least this long.
const MIN_HEARTBEAT_MS: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    Connected,
    /// Connected, but dropping packets, stopped by the breach rule, or refusing its policy.
    Degraded,
    /// No control record for 3 heartbeat intervals, or its stream is gone.
    Lost,
}

impl AgentState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Degraded => "degraded",
            Self::Lost => "lost",
        }
    }
}

/// Judges an agent's state from what is known at `now`: lost without a session or without
/// control records for [`LOST_AFTER`] heartbeat intervals; degraded when it refuses its policy,
/// its capture stopped, or its last control record showed new drops.
pub(super) fn judge(a: &Agent, now: Instant) -> (AgentState, Option<String>) {
    let v = &a.view;
    if a.live.is_none() {
        let why = v.last_disconnect_reason.clone().unwrap_or_default();
        return (AgentState::Lost, Some(format!("disconnected: {why}")));
    }
    let heartbeat = Duration::from_millis(v.heartbeat_ms.max(MIN_HEARTBEAT_MS));
    let silent = now.saturating_duration_since(a.last_control);
    if silent > heartbeat * LOST_AFTER {
        return (
            AgentState::Lost,
            Some(format!(
                "no control record for {:.1} s ({LOST_AFTER} heartbeat intervals of {:.1} s)",
                silent.as_secs_f64(),
                heartbeat.as_secs_f64()
            )),
        );
    }
    if let Some(e) = &v.policy_error {
        return (AgentState::Degraded, Some(format!("policy refused: {e}")));
    }
    if matches!(v.capture.state.as_str(), "stopped_breach" | "failed") {
        let why = v
            .capture
            .error
            .clone()
            .unwrap_or_else(|| v.capture.state.clone());
        return (AgentState::Degraded, Some(why));
    }
    if a.dropping {
        let c = &v.capture;
        return (
            AgentState::Degraded,
            Some(format!(
                "dropping packets (so far: kernel {}, limiter {}, queue {})",
                c.packets_dropped_kernel, c.packets_dropped_limiter, c.packets_dropped_queue
            )),
        );
    }
    (AgentState::Connected, None)
}

fn drops(c: &proto::Counters) -> u64 {
    c.packets_dropped_kernel + c.packets_dropped_limiter + c.packets_dropped_queue
}

impl Agent {
    /// Takes in a control record received at `now`: the heartbeat, the rates since the previous
    /// record, whether drops grew since it, and the capture it reports. The capture view it
    /// replaces, when the state changed.
    pub(super) fn heard(
        &mut self,
        now: Instant,
        record: &proto::ControlRecord,
    ) -> Option<CaptureView> {
        let v = &mut self.view;
        v.control_records += 1;
        v.last_control_sequence = record.sequence;
        self.last_control = now;
        let c = record.counters.unwrap_or_default();
        if let Some((then, before)) = &self.previous {
            let dt = now.saturating_duration_since(*then).as_secs_f64().max(1e-3);
            let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
            v.capture_pps = rate(c.packets_captured, before.packets_captured);
            v.send_pps = rate(c.packets_sent, before.packets_sent);
            v.send_bps = rate(c.bytes_sent, before.bytes_sent) * 8.0;
            self.dropping = drops(&c) > drops(before);
        }
        self.previous = Some((now, c));
        v.snapshot_entries = record.snapshot_entries;
        let capture = CaptureView::from_record(record);
        let changed = capture.state != v.capture.state;
        let before = std::mem::replace(&mut v.capture, capture);
        changed.then_some(before)
    }
}

impl RegistryTask {
    /// A control record from agent `agent_id`'s live session; a new capture state is an event.
    pub(super) fn control_record(&mut self, agent_id: &str, record: &proto::ControlRecord) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        if agent.heard(Instant::now(), record).is_some() {
            let capture = &agent.view.capture;
            let what = match &capture.error {
                Some(e) => format!("{agent_id} capture {}: {e}", capture.state),
                None => format!("{agent_id} capture {}", capture.state),
            };
            self.events.emit("capture_state", agent_id, what);
        }
    }

    /// Re-judges agent `id`; a change is recorded, shared and, with `announce`, an event (connects
    /// and disconnects have their own events).
    pub(super) fn update_state(&mut self, id: &str, announce: bool) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        let (state, reason) = judge(agent, Instant::now());
        let changed = state != agent.view.state;
        agent.view.state_reason = reason.clone();
        if !changed {
            return;
        }
        agent.view.state = state;
        self.health.set_state(id, state.name());
        if announce {
            let what = match &reason {
                Some(r) => format!("agent {id} is {}: {r}", state.name()),
                None => format!("agent {id} is {}", state.name()),
            };
            match state {
                AgentState::Lost => tracing::warn!(agent = %id, reason = ?reason, "agent lost"),
                _ => {
                    tracing::info!(agent = %id, state = state.name(), reason = ?reason, "agent state")
                }
            }
            let fields = BTreeMap::from([("state".to_string(), state.name().to_string())]);
            self.events.emit_with("state", id, what, fields);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use tapgraph::proto::CaptureState;

    use super::super::fixture::{self, live_agent, record};
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn state(a: &Agent, now: Instant) -> AgentState {
        judge(a, now).0
    }

    fn reason(a: &Agent, now: Instant) -> String {
        judge(a, now).1.unwrap_or_default()
    }

    #[test]
    fn an_agent_without_a_session_is_lost_and_says_why() {
        let mut a = Agent::new("vm");
        a.view.last_disconnect_reason = Some("stream ended".into());
        let now = a.last_control;
        assert_eq!(
            judge(&a, now),
            (AgentState::Lost, Some("disconnected: stream ended".into()))
        );
        a.view.last_disconnect_reason = None;
        assert_eq!(reason(&a, now), "disconnected: ");
    }

    #[test]
    fn a_live_agent_that_reports_in_is_connected() {
        let (a, _rx) = live_agent("vm");
        assert_eq!(judge(&a, a.last_control), (AgentState::Connected, None));
    }

    #[test]
    fn three_missed_heartbeats_make_it_lost_and_not_one_ms_sooner() {
        let (mut a, _rx) = live_agent("vm");
        a.view.heartbeat_ms = 2_000;
        let t0 = a.last_control;
        assert_eq!(state(&a, t0 + 6_000 * MS), AgentState::Connected);
        assert_eq!(state(&a, t0 + 6_001 * MS), AgentState::Lost);
        assert_eq!(
            reason(&a, t0 + 7_000 * MS),
            "no control record for 7.0 s (3 heartbeat intervals of 2.0 s)"
        );
        // The clock running backwards (an `Instant` before the record) is no silence.
        assert_eq!(state(&a, t0 - MS), AgentState::Connected);
    }

    #[test]
    fn a_heartbeat_below_100_ms_is_judged_as_100_ms() {
        let (mut a, _rx) = live_agent("vm");
        a.view.heartbeat_ms = 10;
        let t0 = a.last_control;
        assert_eq!(state(&a, t0 + 300 * MS), AgentState::Connected);
        assert_eq!(state(&a, t0 + 301 * MS), AgentState::Lost);
        a.view.heartbeat_ms = 0;
        assert_eq!(state(&a, t0 + 300 * MS), AgentState::Connected);
    }

    #[test]
    fn a_refused_policy_degrades_it() {
        let (mut a, _rx) = live_agent("vm");
        a.view.policy_error = Some("bad filter".into());
        assert_eq!(
            judge(&a, a.last_control),
            (
                AgentState::Degraded,
                Some("policy refused: bad filter".into())
            )
        );
    }

    #[test]
    fn a_stopped_or_failed_capture_degrades_it_and_running_does_not() {
        let (mut a, _rx) = live_agent("vm");
        let now = a.last_control;
        for st in ["stopped_breach", "failed"] {
            a.view.capture.state = st.into();
            a.view.capture.error = None;
            assert_eq!(judge(&a, now), (AgentState::Degraded, Some(st.into())));
            a.view.capture.error = Some("interface gone".into());
            assert_eq!(reason(&a, now), "interface gone");
        }
        for st in ["running", "disabled"] {
            a.view.capture.state = st.into();
            assert_eq!(judge(&a, now), (AgentState::Connected, None), "{st}");
        }
    }

    #[test]
    fn new_drops_degrade_it() {
        let (mut a, _rx) = live_agent("vm");
        a.dropping = true;
        a.view.capture.packets_dropped_kernel = 1;
        a.view.capture.packets_dropped_limiter = 2;
        a.view.capture.packets_dropped_queue = 3;
        assert_eq!(
            judge(&a, a.last_control),
            (
                AgentState::Degraded,
                Some("dropping packets (so far: kernel 1, limiter 2, queue 3)".into())
            )
        );
    }

    #[test]
    fn lost_outranks_degraded_and_the_reasons_have_an_order() {
        let (mut a, _rx) = live_agent("vm");
        let now = a.last_control;
        a.dropping = true;
        assert!(reason(&a, now).starts_with("dropping"));
        a.view.capture.state = "failed".into();
        assert_eq!(reason(&a, now), "failed");
        a.view.policy_error = Some("no".into());
        assert_eq!(reason(&a, now), "policy refused: no");
        let silent = now + Duration::from_millis(a.view.heartbeat_ms * 3) + MS;
        assert_eq!(state(&a, silent), AgentState::Lost);
        a.live = None;
        assert!(reason(&a, now).starts_with("disconnected"));
    }

    #[test]
    fn drops_growing_between_two_records_degrade_it_until_they_stop() {
        let (mut a, _rx) = live_agent("vm");
        let t0 = a.last_control;
        let running = CaptureState::Running;
        a.heard(t0, &record((5, 5, 5), running));
        assert!(!a.dropping, "the first record has nothing to compare with");
        assert_eq!(state(&a, t0), AgentState::Connected);
        // Each stage's drops count.
        let mut t = t0;
        for drops in [(6, 5, 5), (6, 6, 5), (6, 6, 6)] {
            t += MS;
            a.heard(t, &record(drops, running));
            assert!(a.dropping, "{drops:?}");
            assert_eq!(state(&a, t), AgentState::Degraded, "{drops:?}");
        }
        a.heard(t + MS, &record((6, 6, 6), running));
        assert!(!a.dropping);
        assert_eq!(state(&a, t + MS), AgentState::Connected);
        // A restarted agent's counters start again: no drops, no underflow.
        a.heard(t + 2 * MS, &record((0, 0, 0), running));
        assert!(!a.dropping);
    }

    #[test]
    fn a_heartbeat_brings_a_lost_agent_back() {
        let (mut a, _rx) = live_agent("vm");
        let later = a.last_control + Duration::from_secs(60);
        assert_eq!(state(&a, later), AgentState::Lost);
        a.heard(later, &record((0, 0, 0), CaptureState::Running));
        assert_eq!(judge(&a, later), (AgentState::Connected, None));
        assert_eq!(a.last_control, later);
    }

    #[test]
    fn a_record_gives_rates_over_the_time_between_two() {
        let (mut a, _rx) = live_agent("vm");
        let t0 = a.last_control;
        let counters = |captured, sent, bytes| proto::ControlRecord {
            sequence: 9,
            snapshot_entries: 42,
            counters: Some(proto::Counters {
                packets_captured: captured,
                packets_sent: sent,
                bytes_sent: bytes,
                ..Default::default()
            }),
            ..Default::default()
        };
        a.heard(t0, &counters(100, 50, 1_000));
        assert_eq!((a.view.capture_pps, a.view.send_pps), (0.0, 0.0));
        a.heard(t0 + Duration::from_secs(2), &counters(300, 90, 3_000));
        assert_eq!(a.view.capture_pps, 100.0);
        assert_eq!(a.view.send_pps, 20.0);
        assert_eq!(a.view.send_bps, 8_000.0);
        assert_eq!(a.view.control_records, 2);
        assert_eq!(a.view.last_control_sequence, 9);
        assert_eq!(a.view.snapshot_entries, 42);
        // Two records at one instant are taken as 1 ms apart, not as an infinite rate.
        let t = t0 + Duration::from_secs(2);
        a.heard(t, &counters(301, 90, 3_000));
        assert_eq!(a.view.capture_pps, 1_000.0);
    }

    #[test]
    fn a_record_hands_back_the_capture_it_replaces_only_when_the_state_changes() {
        let (mut a, _rx) = live_agent("vm");
        let t0 = a.last_control;
        let before = a.heard(t0, &record((0, 0, 0), CaptureState::Running));
        assert_eq!(before.map(|c| c.state), Some("disabled".into()));
        assert!(
            a.heard(t0, &record((0, 0, 0), CaptureState::Running))
                .is_none()
        );
        assert_eq!(a.view.capture.state, "running");
    }

    #[test]
    fn a_change_of_state_is_shared_and_announced_once() {
        let (mut task, health, events) = fixture::task();
        let mut watch = events.subscribe();
        let (_registered, _rx) = fixture::connect(&mut task, "vm", 8);
        assert_eq!(health.state("vm"), Some("connected"));
        let agent = task.agents.get_mut("vm").unwrap();
        agent.view.policy_error = Some("bad".into());
        task.update_state("vm", true);
        assert_eq!(health.state("vm"), Some("degraded"));
        let view = &task.agents["vm"].view;
        assert_eq!(view.state, AgentState::Degraded);
        assert_eq!(view.state_reason.as_deref(), Some("policy refused: bad"));
        let states: Vec<_> = std::iter::from_fn(|| watch.try_recv().ok())
            .filter(|e| e.kind == "state")
            .collect();
        assert_eq!(states.len(), 1);
        assert_eq!(
            states[0].message,
            "agent vm is degraded: policy refused: bad"
        );
        assert_eq!(
            states[0].fields.get("state").map(String::as_str),
            Some("degraded")
        );
        // Unchanged: nothing new to announce.
        task.update_state("vm", true);
        assert!(watch.try_recv().is_err());
    }

    #[test]
    fn each_stage_alone_counts_as_dropping() {
        for drops in [(1, 0, 0), (0, 1, 0), (0, 0, 1)] {
            let (mut a, _rx) = live_agent("vm");
            let t0 = a.last_control;
            a.heard(t0, &record((0, 0, 0), CaptureState::Running));
            a.heard(t0 + MS, &record(drops, CaptureState::Running));
            assert!(a.dropping, "{drops:?}");
        }
    }

    #[test]
    fn a_control_record_is_taken_in_and_a_new_capture_state_announced() {
        let (mut task, health, events) = fixture::task();
        let mut watch = events.subscribe();
        let (_registered, _rx) = fixture::connect(&mut task, "vm", 8);
        let mut failed = record((0, 0, 0), CaptureState::Failed);
        failed.last_error = "no such device".into();
        task.control_record("vm", &failed);
        task.control_record("vm", &failed);
        task.control_record("unknown", &failed);
        task.update_state("vm", true);
        let view = &task.agents["vm"].view;
        assert_eq!(view.control_records, 2);
        assert_eq!(view.capture.error.as_deref(), Some("no such device"));
        assert_eq!(health.state("vm"), Some("degraded"));
        let captures: Vec<_> = std::iter::from_fn(|| watch.try_recv().ok())
            .filter(|e| e.kind == "capture_state")
            .map(|e| e.message)
            .collect();
        assert_eq!(captures, ["vm capture failed: no such device"]);
    }
}
