//! The agent table and its sessions: one entry per agent seen since the controller started, the
//! live session if it has one, and what replacing a session means (a reconnect, or two processes
//! sharing one identity). Registering, ending and closing sessions live here.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tapgraph::proto::{self, controller_message};
use tokio::sync::{mpsc::error::TrySendError, oneshot};
use tonic::Status;

use super::clock::Clock;
use super::health::{AgentState, DEFAULT_HEARTBEAT_MS};
use super::task::RegistryTask;
use super::view::{AgentView, CaptureView, ConnectProcess};
use super::{CloseReason, Outbound, Pushed, Registered};

/// A session replaced this many times within [`SHARED_WINDOW`] means two processes hold one
/// identity and knock each other off: reported once, instead of a connect event per replacement.
const SHARED_AFTER: usize = 3;
const SHARED_WINDOW: Duration = Duration::from_secs(60);

/// An agent's live session: where to push to it, and how to end it.
pub(super) struct Live {
    pub(super) session: u64,
    pub(super) outbound: Outbound,
    pub(super) close: oneshot::Sender<CloseReason>,
}

impl Live {
    /// Queues `msg` without waiting. A full channel drops it and counts one in `dropped`; a closed
    /// one means the session is ending, and nothing is counted. Whether it was queued.
    pub(super) fn push(&self, msg: Pushed, dropped: &AtomicU64) -> bool {
        match self.outbound.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

pub(super) struct Agent {
    pub(super) view: AgentView,
    pub(super) live: Option<Live>,
    /// When the last control record (or the session) arrived.
    pub(super) last_control: Instant,
    /// The previous control record's counters and time, for rates and new drops.
    pub(super) previous: Option<(Instant, proto::Counters)>,
    /// Drops went up between the last two records.
    pub(super) dropping: bool,
    pub(super) clock: Clock,
    /// When its session was replaced by another, within the last [`SHARED_WINDOW`].
    replaced: VecDeque<Instant>,
    /// Set once "two processes share this identity" is reported, until replacements stop.
    shared_reported: bool,
}

/// What a session replacement means, from how often the agent's sessions were replaced lately.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Replacement {
    /// A reconnect before the old stream was seen to end: normal.
    Reconnect,
    /// The replacement that shows two processes share the identity: report it.
    Shared { times: usize },
    /// Another one of those, already reported.
    StillShared,
}

impl Agent {
    /// An agent seen for the first time, not yet connected.
    pub(super) fn new(id: &str) -> Self {
        Agent {
            view: AgentView {
                id: id.to_string(),
                hostname: String::new(),
                state: AgentState::Lost,
                remote_addr: String::new(),
                controller: String::new(),
                agent_version: String::new(),
                kernel: String::new(),
                interfaces: Vec::new(),
                connected_at_unix_ms: 0,
                last_seen_unix_ms: 0,
                sessions: 0,
                last_disconnect_reason: None,
                labels: BTreeMap::new(),
                policy_name: String::new(),
                policy_version_sent: 0,
                policy_version_applied: 0,
                policy_error: None,
                control_records: 0,
                last_control_sequence: 0,
                capture: CaptureView {
                    state: "disabled".into(),
                    ..CaptureView::default()
                },
                state_reason: None,
                heartbeat_ms: DEFAULT_HEARTBEAT_MS,
                clock_offset_ms: None,
                probe_rtt_ms: None,
                capture_pps: 0.0,
                send_pps: 0.0,
                send_bps: 0.0,
                snapshot_entries: 0,
                connect_process: ConnectProcess::Unknown,
            },
            live: None,
            last_control: Instant::now(),
            previous: None,
            dropping: false,
            clock: Clock::new(Instant::now()),
            replaced: VecDeque::new(),
            shared_reported: false,
        }
    }

    /// Whether two processes sharing this identity were reported and still replace each other.
    pub(super) fn is_shared(&self, now: Instant) -> bool {
        self.shared_reported
            && self
                .replaced
                .back()
                .is_some_and(|t| now.saturating_duration_since(*t) <= SHARED_WINDOW)
    }

    /// Counts a replacement of the live session at `now`.
    fn replaced_at(&mut self, now: Instant) -> Replacement {
        while self
            .replaced
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > SHARED_WINDOW)
        {
            self.replaced.pop_front();
        }
        if self.replaced.is_empty() {
            self.shared_reported = false;
        }
        self.replaced.push_back(now);
        // Bounded: past the threshold only the count matters, and the window drops the rest.
        if self.replaced.len() > 1024 {
            self.replaced.pop_front();
        }
        match (self.replaced.len() >= SHARED_AFTER, self.shared_reported) {
            (false, _) => Replacement::Reconnect,
            (true, false) => {
                self.shared_reported = true;
                Replacement::Shared {
                    times: self.replaced.len(),
                }
            }
            (true, true) => Replacement::StillShared,
        }
    }
}

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    tapgraph::time::to_unix_nanos(t) / 1_000_000
}

impl RegistryTask {
    pub(super) fn register(
        &mut self,
        agent_id: String,
        hello: proto::Hello,
        labels: BTreeMap<String, String>,
        remote: SocketAddr,
        outbound: Outbound,
    ) -> Result<Registered, Status> {
        let reconnecting = self.agents.get(&agent_id).is_some_and(|a| a.live.is_some());
        let live = || self.agents.values().filter(|a| a.live.is_some()).count();
        if !reconnecting && live() >= self.max_sessions {
            return Err(Status::resource_exhausted(format!(
                "controller at its session limit ({} agents, session.max_agents): retry later",
                self.max_sessions
            )));
        }
        let session = self.next_session;
        self.next_session += 1;
        let now = unix_ms(SystemTime::now());
        let agent = self
            .agents
            .entry(agent_id.clone())
            .or_insert_with(|| Box::new(Agent::new(&agent_id)));
        let mut replacement = None;
        if let Some(old) = agent.live.take() {
            let was = agent.view.remote_addr.clone();
            let r = agent.replaced_at(Instant::now());
            match &r {
                Replacement::Reconnect => {
                    tracing::info!(agent = %agent_id, old_session = old.session, new_peer = %remote, "agent reconnected; closing its previous session")
                }
                Replacement::Shared { times } => {
                    let what = format!(
                        "agent {agent_id}: session replaced {times} times in the last minute: two \
                         processes share this identity (connections from {was} and {remote}); \
                         stop one, or enroll it again to give it its own id"
                    );
                    tracing::warn!(agent = %agent_id, times, peer = %remote, previous_peer = %was, "two processes share one agent identity; their sessions keep replacing each other");
                    let fields = BTreeMap::from([("times".to_string(), times.to_string())]);
                    self.events
                        .emit_with("identity_shared", &agent_id, what, fields);
                }
                Replacement::StillShared => {
                    tracing::debug!(agent = %agent_id, old_session = old.session, new_peer = %remote, "session replaced again by a process sharing this identity")
                }
            }
            replacement = Some(r);
            let _ = old.close.send(CloseReason::Replaced { by: remote });
        }
        agent.last_control = Instant::now();
        agent.previous = None;
        agent.dropping = false;
        agent.clock.session_started(Instant::now());
        let v = &mut agent.view;
        v.hostname = hello.hostname;
        v.remote_addr = remote.to_string();
        v.agent_version = hello.agent_version;
        v.kernel = hello.kernel;
        v.connect_process = ConnectProcess::from_hello(hello.capabilities.as_ref());
        v.interfaces = hello
            .interfaces
            .iter()
            .map(|i| format!("{} {}", i.name, i.addresses.join(",")))
            .collect();
        v.connected_at_unix_ms = now;
        v.last_seen_unix_ms = now;
        v.sessions += 1;
        v.labels = labels;
        // A new session starts without a policy: it gets the one that resolves for it now.
        v.policy_name = String::new();
        v.policy_version_sent = 0;
        v.policy_version_applied = 0;
        v.policy_error = None;
        let (close, closed) = oneshot::channel();
        agent.live = Some(Live {
            session,
            outbound,
            close,
        });
        // Two processes knocking each other off would make a connect event (and a policy push)
        // per replacement: the one `identity_shared` event stands for them.
        let quiet = matches!(
            replacement,
            Some(Replacement::Shared { .. } | Replacement::StillShared)
        );
        if !quiet {
            self.events.emit(
                "connected",
                &agent_id,
                format!("agent {agent_id} connected from {remote}"),
            );
        }
        self.push_policy(&agent_id, !quiet);
        self.update_state(&agent_id, false);
        Ok(Registered { session, closed })
    }

    pub(super) fn deregister(&mut self, agent_id: &str, session: u64, reason: String) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        // A replaced session's late deregistration must not end its successor.
        let ended = agent.live.as_ref().is_some_and(|l| l.session == session);
        agent.view.last_disconnect_reason = Some(reason.clone());
        if ended {
            agent.live = None;
            self.events.emit(
                "disconnected",
                agent_id,
                format!("agent {agent_id} disconnected: {reason}"),
            );
            self.update_state(agent_id, false);
        }
    }

    /// Ends the live session of `agent_id`, if any, telling the agent `status`.
    pub(super) fn close(&mut self, agent_id: &str, status: Status) {
        if let Some(agent) = self.agents.get_mut(agent_id)
            && let Some(live) = agent.live.take()
        {
            let reason = status.message().to_string();
            live.push(Box::new(Err(status)), &self.dropped.close_status);
            let _ = live.close.send(CloseReason::Closed(reason));
            agent.view.state = AgentState::Lost;
        }
    }

    /// Ends every live session with UNAVAILABLE.
    pub(super) fn shutdown(&mut self) {
        for agent in self.agents.values_mut() {
            if let Some(live) = agent.live.take() {
                let status = Status::unavailable("controller shutting down");
                live.push(Box::new(Err(status)), &self.dropped.close_status);
                let _ = live.close.send(CloseReason::Shutdown);
                agent.view.state = AgentState::Lost;
            }
        }
    }

    /// Sends `msg` to session `session` of `agent_id`, if it is still the live one.
    pub(super) fn send(&mut self, agent_id: &str, session: u64, msg: controller_message::Msg) {
        if let Some(live) = self
            .agents
            .get(agent_id)
            .and_then(|a| a.live.as_ref())
            .filter(|l| l.session == session)
        {
            let push = proto::ControllerMessage { msg: Some(msg) };
            if !live.push(Box::new(Ok(push)), &self.dropped.forwarded) {
                tracing::warn!(agent = %agent_id, "control channel full; message dropped");
            }
        }
    }

    /// Every agent as operators see it, those with a live session shown on this replica.
    pub(super) fn list(&self) -> Vec<AgentView> {
        self.agents
            .values()
            .map(|a| {
                let mut view = a.view.clone();
                if a.live.is_some() {
                    view.controller = self.replica.to_string();
                }
                view
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use tapgraph::proto::ResyncRequest;

    use super::super::fixture;
    use super::*;

    #[test]
    fn a_few_reconnects_are_normal_and_a_third_replacement_in_a_minute_is_reported_once() {
        let mut agent = Agent::new("vm");
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(agent.replaced_at(at(0)), Replacement::Reconnect);
        assert_eq!(agent.replaced_at(at(1)), Replacement::Reconnect);
        assert_eq!(
            agent.replaced_at(at(2)),
            Replacement::Shared {
                times: SHARED_AFTER
            }
        );
        for s in 3..50 {
            assert_eq!(agent.replaced_at(at(s)), Replacement::StillShared);
        }
        assert!(agent.is_shared(at(50)));
        // A quiet minute ends the episode; the next one is reported again.
        assert!(!agent.is_shared(at(200)));
        assert_eq!(agent.replaced_at(at(200)), Replacement::Reconnect);
        assert_eq!(agent.replaced_at(at(201)), Replacement::Reconnect);
        assert_eq!(
            agent.replaced_at(at(202)),
            Replacement::Shared {
                times: SHARED_AFTER
            }
        );
    }

    #[test]
    fn replacements_spread_over_more_than_a_minute_are_reconnects() {
        let mut agent = Agent::new("vm");
        let t0 = Instant::now();
        for n in 0..10 {
            let r = agent.replaced_at(t0 + Duration::from_secs(40 * n));
            assert_eq!(r, Replacement::Reconnect, "replacement {n}");
        }
    }

    #[test]
    fn a_replaced_sessions_late_end_does_not_end_its_successor() {
        let (mut task, health, _events) = fixture::task();
        let (first, _rx1) = fixture::connect(&mut task, "vm", 8);
        let (second, _rx2) = fixture::connect(&mut task, "vm", 8);
        assert!(second.session > first.session);
        let mut closed = first.closed;
        assert!(matches!(
            closed.try_recv(),
            Ok(CloseReason::Replaced { .. })
        ));
        task.deregister("vm", first.session, "stream ended".into());
        assert_eq!(task.agents["vm"].view.state, AgentState::Connected);
        task.deregister("vm", second.session, "stream ended".into());
        assert_eq!(task.agents["vm"].view.state, AgentState::Lost);
        assert_eq!(health.state("vm"), Some("lost"));
        assert_eq!(task.agents["vm"].view.sessions, 2);
    }

    #[test]
    fn past_the_session_limit_a_new_agent_is_refused_and_a_known_one_reconnects() {
        let (mut task, _health, _events) = fixture::task();
        task.max_sessions = 1;
        let (_a, _rx) = fixture::connect(&mut task, "a", 8);
        let (tx, _rx2) = tokio::sync::mpsc::channel(8);
        let remote = "192.0.2.2:1".parse().unwrap();
        let refused = task.register("b".into(), Default::default(), BTreeMap::new(), remote, tx);
        assert_eq!(
            refused.err().map(|s| s.code()),
            Some(tonic::Code::ResourceExhausted)
        );
        let (_again, _rx3) = fixture::connect(&mut task, "a", 8);
    }

    #[test]
    fn a_message_for_a_full_control_channel_is_dropped_and_counted() {
        let (mut task, _health, _events) = fixture::task();
        // The policy pushed at registration fills a channel of one.
        let (registered, mut rx) = fixture::connect(&mut task, "vm", 1);
        let resync = || controller_message::Msg::Resync(ResyncRequest::default());
        task.send("vm", registered.session, resync());
        task.send("vm", registered.session, resync());
        assert_eq!(task.dropped.read().forwarded, 2);
        // Another session's message is not sent, so not dropped either.
        task.send("vm", registered.session + 1, resync());
        assert_eq!(task.dropped.read().forwarded, 2);
        assert!(rx.try_recv().is_ok());
        task.send("vm", registered.session, resync());
        assert_eq!(task.dropped.read().forwarded, 2, "there was room");
        task.close("vm", Status::permission_denied("revoked"));
        assert_eq!(task.dropped.read().close_status, 1);
        let mut closed = registered.closed;
        assert!(matches!(closed.try_recv(), Ok(CloseReason::Closed(why)) if why == "revoked"));
        assert_eq!(task.agents["vm"].view.state, AgentState::Lost);
    }

    #[test]
    fn a_session_that_is_gone_is_not_counted_as_a_drop() {
        let (mut task, _health, _events) = fixture::task();
        let (registered, rx) = fixture::connect(&mut task, "vm", 1);
        drop(rx);
        let resync = controller_message::Msg::Resync(ResyncRequest::default());
        task.send("vm", registered.session, resync);
        task.shutdown();
        assert_eq!(task.dropped.read(), super::super::Dropped::default());
    }

    #[test]
    fn an_agent_shows_this_replica_as_its_controller_while_its_session_lives() {
        let (mut task, _health, _events) = fixture::task();
        let (a, _rx_a) = fixture::connect(&mut task, "a", 8);
        let (_b, _rx_b) = fixture::connect(&mut task, "b", 8);
        let (_c, _rx_c) = fixture::connect(&mut task, "c", 8);
        task.deregister("a", a.session, "stream ended".into());
        task.close("c", Status::permission_denied("revoked"));
        let controllers: BTreeMap<String, String> = task
            .list()
            .into_iter()
            .map(|v| (v.id, v.controller))
            .collect();
        let expected = [("a", ""), ("b", fixture::REPLICA), ("c", "")];
        let expected = expected.map(|(id, c)| (id.to_string(), c.to_string()));
        assert_eq!(controllers, BTreeMap::from(expected));
        // Back on a new session, it shows the replica again.
        let (_a, _rx_a) = fixture::connect(&mut task, "a", 8);
        assert_eq!(task.list()[0].controller, fixture::REPLICA);
    }

    #[test]
    fn shutdown_ends_every_session_with_unavailable() {
        let (mut task, _health, _events) = fixture::task();
        let (a, mut rx_a) = fixture::connect(&mut task, "a", 8);
        let (_b, _rx_b) = fixture::connect(&mut task, "b", 1);
        task.shutdown();
        let last = std::iter::from_fn(|| rx_a.try_recv().ok()).last().unwrap();
        assert_eq!(last.unwrap_err().code(), tonic::Code::Unavailable);
        let mut closed = a.closed;
        assert!(matches!(closed.try_recv(), Ok(CloseReason::Shutdown)));
        assert!(task.list().iter().all(|v| v.state == AgentState::Lost));
        assert_eq!(task.dropped.read().close_status, 1, "b's channel was full");
    }
}
