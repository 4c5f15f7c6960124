//! The session registry: one task owns the table of agents and their live sessions. gRPC handlers
//! talk to it by message and never hold a lock across an await.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tapgraph::proto::{self, agent_message::Msg, controller_message};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::events::Events;
use crate::health::Health;
use crate::policies::{self, StoredPolicy};

/// One message the registry pushes to an agent's `Connect` response stream. Boxed: a channel
/// allocates its slots 32 at a time, and unboxed this was 6 KB per connected agent.
pub type Pushed = Box<Result<proto::ControllerMessage, Status>>;
/// What the registry pushes to an agent's `Connect` response stream.
pub type Outbound = mpsc::Sender<Pushed>;

/// Why a session ended, as the session task logs it.
#[derive(Debug, Clone)]
pub enum CloseReason {
    Replaced { by: SocketAddr },
    Shutdown,
    Closed(String),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Replaced { by } => write!(f, "replaced by a newer session from {by}"),
            Self::Shutdown => f.write_str("controller shutting down"),
            Self::Closed(why) => f.write_str(why),
        }
    }
}

enum Command {
    Register {
        agent_id: String,
        hello: proto::Hello,
        labels: BTreeMap<String, String>,
        remote: SocketAddr,
        outbound: Outbound,
        reply: oneshot::Sender<Result<Registered, Status>>,
    },
    SetPolicies {
        policies: Vec<StoredPolicy>,
        default: StoredPolicy,
        reply: oneshot::Sender<()>,
    },
    SetLabels {
        agent_id: String,
        labels: BTreeMap<String, String>,
        reply: oneshot::Sender<()>,
    },
    PolicyStatus {
        name: Option<String>,
        reply: oneshot::Sender<Vec<proto::AgentPolicyStatus>>,
    },
    Deregister {
        agent_id: String,
        session: u64,
        reason: String,
    },
    Message {
        agent_id: String,
        session: u64,
        msg: Msg,
    },
    List {
        reply: oneshot::Sender<Vec<AgentView>>,
    },
    Close {
        agent_id: String,
        status: Status,
        reply: oneshot::Sender<()>,
    },
    Send {
        agent_id: String,
        session: u64,
        msg: controller_message::Msg,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
    MirrorRoute {
        agent_id: String,
        reply: oneshot::Sender<Option<MirrorRoute>>,
    },
}

/// Where an agent's mirrored packets go: the target of the policy that resolves for it now.
#[derive(Debug, Clone)]
pub struct MirrorRoute {
    pub target: tapgraph::policy::Target,
    pub hostname: String,
}

/// The agent's virtual TAP, from its latest control record.
#[derive(Debug, Clone, Default, Serialize)]
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
}

#[derive(Debug, Clone, Serialize)]
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

    fn from_record(r: &proto::ControlRecord) -> Self {
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
        }
    }
}

/// A registered session: its number, and the signal that the registry ended it.
pub struct Registered {
    pub session: u64,
    pub closed: oneshot::Receiver<CloseReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// A heartbeat interval missed this many times makes an agent lost.
const LOST_AFTER: u32 = 3;
/// Clock offset: the sample with the shortest round trip among the last few wins (NTP's filter).
const PROBE_SAMPLES: usize = 8;
const TICK: Duration = Duration::from_millis(250);
const DEFAULT_HEARTBEAT_MS: u64 = 5_000;
/// A session replaced this many times within [`SHARED_WINDOW`] means two processes hold one
/// identity and knock each other off: reported once, instead of a connect event per replacement.
const SHARED_AFTER: usize = 3;
const SHARED_WINDOW: Duration = Duration::from_secs(60);

/// One agent as operators see it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    pub id: String,
    pub hostname: String,
    pub state: AgentState,
    pub remote_addr: String,
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
}

struct Live {
    session: u64,
    outbound: Outbound,
    close: oneshot::Sender<CloseReason>,
}

struct Agent {
    view: AgentView,
    live: Option<Live>,
    /// When the last control record (or the session) arrived.
    last_control: Instant,
    /// The previous control record's counters and time, for rates and new drops.
    previous: Option<(Instant, proto::Counters)>,
    /// Drops went up between the last two records.
    dropping: bool,
    probes: VecDeque<(i64, i64)>,
    next_probe: Instant,
    probe_id: u64,
    /// When its session was replaced by another, within the last [`SHARED_WINDOW`].
    replaced: VecDeque<Instant>,
    /// Set once "two processes share this identity" is reported, until replacements stop.
    shared_reported: bool,
}

/// What a session replacement means, from how often the agent's sessions were replaced lately.
#[derive(Debug, PartialEq, Eq)]
enum Replacement {
    /// A reconnect before the old stream was seen to end: normal.
    Reconnect,
    /// The replacement that shows two processes share the identity: report it.
    Shared { times: usize },
    /// Another one of those, already reported.
    StillShared,
}

impl Agent {
    /// An agent seen for the first time, not yet connected.
    fn new(id: &str) -> Self {
        Agent {
            view: AgentView {
                id: id.to_string(),
                hostname: String::new(),
                state: AgentState::Lost,
                remote_addr: String::new(),
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
            },
            live: None,
            last_control: Instant::now(),
            previous: None,
            dropping: false,
            probes: VecDeque::new(),
            next_probe: Instant::now(),
            probe_id: 0,
            replaced: VecDeque::new(),
            shared_reported: false,
        }
    }

    /// Whether two processes sharing this identity were reported and still replace each other.
    fn is_shared(&self, now: Instant) -> bool {
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

fn unix_ms(t: SystemTime) -> u64 {
    tapgraph::time::to_unix_nanos(t) / 1_000_000
}

/// A handle to the registry task; cheap to clone.
#[derive(Clone)]
pub struct Registry {
    tx: mpsc::Sender<Command>,
}

impl Registry {
    /// Starts the registry task. Agents receive the policy that resolves for them (see
    /// [`Registry::set_policies`], called before any agent can connect).
    /// The registry task, holding at most `max_sessions` live agent sessions.
    pub fn spawn(
        events: Events,
        health: Health,
        max_sessions: usize,
    ) -> (Self, impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(1024);
        let placeholder = StoredPolicy {
            name: policies::DEFAULT_NAME.into(),
            selector: policies::Selector::All,
            spec: policies::StoredSpec(
                tapgraph::policy::PolicySpec::default().to_proto(0, policies::DEFAULT_NAME),
            ),
            version: 0,
            updated_at_ms: 0,
        };
        let task = RegistryTask {
            agents: BTreeMap::new(),
            next_session: 1,
            max_sessions,
            policies: Vec::new(),
            default: placeholder,
            events,
            health,
        }
        .run(rx);
        (Self { tx }, task)
    }

    /// The mirror target of agent `id` now; `None` for an unknown agent.
    pub async fn mirror_route(&self, agent_id: &str) -> Option<MirrorRoute> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::MirrorRoute {
                agent_id: agent_id.to_string(),
                reply,
            })
            .await
            .ok()?;
        rx.await.ok()?
    }

    /// Replaces the stored policies; every live agent whose resolved policy changed gets it now.
    pub async fn set_policies(&self, policies: Vec<StoredPolicy>, default: StoredPolicy) {
        self.call(|reply| Command::SetPolicies {
            policies,
            default,
            reply,
        })
        .await;
    }

    /// Replaces an agent's labels; if that changes its policy, the agent gets the new one now.
    pub async fn set_labels(&self, agent_id: &str, labels: BTreeMap<String, String>) {
        let agent_id = agent_id.to_string();
        self.call(|reply| Command::SetLabels {
            agent_id,
            labels,
            reply,
        })
        .await;
    }

    /// Whether agent `id` has a live session now.
    pub async fn is_connected(&self, id: &str) -> bool {
        self.list()
            .await
            .iter()
            .any(|a| a.id == id && a.state != AgentState::Lost)
    }

    /// Rollout status per agent, for one policy or all.
    pub async fn policy_status(&self, name: Option<String>) -> Vec<proto::AgentPolicyStatus> {
        self.call(|reply| Command::PolicyStatus { name, reply })
            .await
            .unwrap_or_default()
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.ok()?;
        rx.await.ok()
    }

    /// Registers a session for `agent_id`, replacing (and closing) any earlier one, and queues the
    /// policy that resolves for it on `outbound`.
    pub async fn register(
        &self,
        agent_id: String,
        hello: proto::Hello,
        labels: BTreeMap<String, String>,
        remote: SocketAddr,
        outbound: Outbound,
    ) -> Result<Registered, Status> {
        self.call(|reply| Command::Register {
            agent_id,
            hello,
            labels,
            remote,
            outbound,
            reply,
        })
        .await
        .unwrap_or_else(|| Err(Status::unavailable("controller shutting down")))
    }

    pub async fn message(&self, agent_id: &str, session: u64, msg: Msg) {
        let _ = self
            .tx
            .send(Command::Message {
                agent_id: agent_id.to_string(),
                session,
                msg,
            })
            .await;
    }

    pub async fn list(&self) -> Vec<AgentView> {
        self.call(|reply| Command::List { reply })
            .await
            .unwrap_or_default()
    }

    /// Ends the live session of `agent_id`, if any, sending `status` to the agent.
    pub async fn close_agent(&self, agent_id: &str, status: Status) {
        let agent_id = agent_id.to_string();
        self.call(|reply| Command::Close {
            agent_id,
            status,
            reply,
        })
        .await;
    }

    /// Sends `msg` to the agent's live session `session`, if it is still the live one.
    pub async fn send(&self, agent_id: &str, session: u64, msg: controller_message::Msg) {
        let _ = self
            .tx
            .send(Command::Send {
                agent_id: agent_id.to_string(),
                session,
                msg,
            })
            .await;
    }

    /// Ends every live session with UNAVAILABLE, so agents reconnect to the next controller.
    pub async fn shutdown(&self) {
        self.call(|reply| Command::Shutdown { reply }).await;
    }

    /// Deregisters on drop: however the session task ends, the registry hears of it.
    pub fn guard(&self, agent_id: String, session: u64) -> SessionGuard {
        SessionGuard {
            tx: self.tx.clone(),
            agent_id,
            session,
            reason: "stream ended".into(),
        }
    }
}

/// Deregisters its session when dropped, with the last reason set.
pub struct SessionGuard {
    tx: mpsc::Sender<Command>,
    agent_id: String,
    session: u64,
    reason: String,
}

impl SessionGuard {
    pub fn set_reason(&mut self, reason: impl Into<String>) {
        self.reason = reason.into();
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let cmd = Command::Deregister {
            agent_id: std::mem::take(&mut self.agent_id),
            session: self.session,
            reason: std::mem::take(&mut self.reason),
        };
        // Drop cannot await: try first, and fall back to a task if the registry is busy.
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }
}

struct RegistryTask {
    /// Boxed: an `Agent` is 760 bytes, and B-tree nodes hold eleven values, half full or more.
    agents: BTreeMap<String, Box<Agent>>,
    next_session: u64,
    /// Live sessions at most (`session.max_agents`); a new agent beyond is refused.
    max_sessions: usize,
    policies: Vec<StoredPolicy>,
    default: StoredPolicy,
    events: Events,
    health: Health,
}

impl RegistryTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cmd = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => break,
                },
                _ = ticks.tick() => {
                    self.tick();
                    continue;
                }
            };
            match cmd {
                Command::Register {
                    agent_id,
                    hello,
                    labels,
                    remote,
                    outbound,
                    reply,
                } => {
                    let registered = self.register(agent_id, hello, labels, remote, outbound);
                    let _ = reply.send(registered);
                }
                Command::SetPolicies {
                    policies,
                    default,
                    reply,
                } => {
                    self.policies = policies;
                    self.default = default;
                    let ids: Vec<String> = self.agents.keys().cloned().collect();
                    for id in ids {
                        self.push_policy(&id, true);
                    }
                    let _ = reply.send(());
                }
                Command::SetLabels {
                    agent_id,
                    labels,
                    reply,
                } => {
                    if let Some(agent) = self.agents.get_mut(&agent_id) {
                        agent.view.labels = labels;
                        self.push_policy(&agent_id, true);
                    }
                    let _ = reply.send(());
                }
                Command::PolicyStatus { name, reply } => {
                    let _ = reply.send(self.policy_status(name.as_deref()));
                }
                Command::Deregister {
                    agent_id,
                    session,
                    reason,
                } => self.deregister(&agent_id, session, reason),
                Command::Message {
                    agent_id,
                    session,
                    msg,
                } => self.message(&agent_id, session, msg),
                Command::List { reply } => {
                    let _ = reply.send(self.agents.values().map(|a| a.view.clone()).collect());
                }
                Command::Close {
                    agent_id,
                    status,
                    reply,
                } => {
                    if let Some(agent) = self.agents.get_mut(&agent_id)
                        && let Some(live) = agent.live.take()
                    {
                        let reason = status.message().to_string();
                        let _ = live.outbound.try_send(Box::new(Err(status)));
                        let _ = live.close.send(CloseReason::Closed(reason));
                        agent.view.state = AgentState::Lost;
                    }
                    let _ = reply.send(());
                }
                Command::Send {
                    agent_id,
                    session,
                    msg,
                } => {
                    if let Some(live) = self
                        .agents
                        .get(&agent_id)
                        .and_then(|a| a.live.as_ref())
                        .filter(|l| l.session == session)
                    {
                        let push = proto::ControllerMessage { msg: Some(msg) };
                        if live.outbound.try_send(Box::new(Ok(push))).is_err() {
                            tracing::warn!(agent = %agent_id, "control channel full; message dropped");
                        }
                    }
                }
                Command::MirrorRoute { agent_id, reply } => {
                    let _ = reply.send(self.mirror_route(&agent_id));
                }
                Command::Shutdown { reply } => {
                    for agent in self.agents.values_mut() {
                        if let Some(live) = agent.live.take() {
                            let _ = live.outbound.try_send(Box::new(Err(Status::unavailable(
                                "controller shutting down",
                            ))));
                            let _ = live.close.send(CloseReason::Shutdown);
                            agent.view.state = AgentState::Lost;
                        }
                    }
                    let _ = reply.send(());
                }
            }
        }
    }

    fn register(
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
        // The first probe waits a moment: the agent is busy with its policy and first snapshot.
        agent.next_probe = Instant::now() + Duration::from_secs(1);
        let v = &mut agent.view;
        v.hostname = hello.hostname;
        v.remote_addr = remote.to_string();
        v.agent_version = hello.agent_version;
        v.kernel = hello.kernel;
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

    fn mirror_route(&self, id: &str) -> Option<MirrorRoute> {
        let agent = self.agents.get(id)?;
        let wanted = policies::resolve(&self.policies, &self.default, id, &agent.view.labels);
        let spec = tapgraph::policy::PolicySpec::from_proto(&wanted.message()).ok()?;
        Some(MirrorRoute {
            target: spec.target,
            hostname: agent.view.hostname.clone(),
        })
    }

    /// Sends agent `id` the policy that resolves for it, if it is live and that is not what it has;
    /// with `announce`, as an event too.
    fn push_policy(&mut self, id: &str, announce: bool) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        let Some(live) = &agent.live else {
            return;
        };
        let wanted = policies::resolve(&self.policies, &self.default, id, &agent.view.labels);
        let v = &mut agent.view;
        if v.policy_name == wanted.name && v.policy_version_sent == wanted.version {
            return;
        }
        let push = proto::ControllerMessage {
            msg: Some(controller_message::Msg::Policy(wanted.message())),
        };
        // The control channel holds 64 messages; an agent that lets it fill is not reading, and
        // its idle timeout will end the session. Its policy is resent when it reconnects.
        match live.outbound.try_send(Box::new(Ok(push))) {
            Ok(()) => {
                v.policy_name = wanted.name.clone();
                v.policy_version_sent = wanted.version;
                v.policy_error = None;
                // Lost is judged against the heartbeat interval of the policy sent.
                v.heartbeat_ms = match wanted.spec.0.heartbeat_interval_ms {
                    0 => DEFAULT_HEARTBEAT_MS,
                    ms => ms,
                };
                if announce {
                    self.events.emit(
                        "policy_sent",
                        id,
                        format!("policy {} v{} sent to {id}", wanted.name, wanted.version),
                    );
                }
            }
            Err(_) => {
                tracing::warn!(agent = %id, policy = %wanted.name, "control channel full; policy not sent");
            }
        }
    }

    fn policy_status(&self, name: Option<&str>) -> Vec<proto::AgentPolicyStatus> {
        self.agents
            .values()
            .filter(|a| a.live.is_some())
            .map(|a| {
                let wanted =
                    policies::resolve(&self.policies, &self.default, &a.view.id, &a.view.labels);
                proto::AgentPolicyStatus {
                    agent_id: a.view.id.clone(),
                    policy_name: wanted.name.clone(),
                    version_wanted: wanted.version,
                    version_applied: a.view.policy_version_applied,
                    pending: a.view.policy_version_applied != wanted.version
                        && a.view.policy_error.is_none(),
                    error: a.view.policy_error.clone().unwrap_or_default(),
                }
            })
            .filter(|s| name.is_none_or(|n| n == s.policy_name))
            .collect()
    }

    fn deregister(&mut self, agent_id: &str, session: u64, reason: String) {
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

    /// Judges an agent's state from what is known now: lost without a session or without control
    /// records for [`LOST_AFTER`] heartbeat intervals; degraded when it refuses its policy, its
    /// capture stopped, or its last control record showed new drops.
    fn judge(a: &Agent, now: Instant) -> (AgentState, Option<String>) {
        let v = &a.view;
        if a.live.is_none() {
            let why = v.last_disconnect_reason.clone().unwrap_or_default();
            return (AgentState::Lost, Some(format!("disconnected: {why}")));
        }
        let heartbeat = Duration::from_millis(v.heartbeat_ms.max(100));
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

    /// Re-judges agent `id`; a change is recorded, shared and, with `announce`, an event (connects
    /// and disconnects have their own events).
    fn update_state(&mut self, id: &str, announce: bool) {
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        let (state, reason) = Self::judge(agent, Instant::now());
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

    /// Every tick: agents whose control records stopped become lost, and live agents due a clock
    /// probe get one.
    fn tick(&mut self) {
        let now = Instant::now();
        let ids: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.live.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            self.update_state(&id, true);
            let Some(agent) = self.agents.get_mut(&id) else {
                continue;
            };
            let Some(live) = &agent.live else {
                continue;
            };
            if now < agent.next_probe {
                continue;
            }
            agent.probe_id += 1;
            agent.next_probe = now + Duration::from_millis(agent.view.heartbeat_ms.max(100));
            let probe = proto::ControllerMessage {
                msg: Some(controller_message::Msg::TimeProbe(proto::TimeProbe {
                    id: agent.probe_id,
                    sent_at_unix_nanos: tapgraph::time::unix_nanos(),
                })),
            };
            // A full control channel skips a probe; the next one comes a heartbeat later.
            let _ = live.outbound.try_send(Box::new(Ok(probe)));
        }
    }

    /// One probe's answer: t1 sent here, t2 received there, t3 answered there, t4 received here.
    fn probe_reply(&mut self, id: &str, reply: &proto::TimeProbeReply) {
        let t4 = tapgraph::time::unix_nanos() as i128;
        let Some(agent) = self.agents.get_mut(id) else {
            return;
        };
        let (t1, t2, t3) = (
            reply.probe_sent_at_unix_nanos as i128,
            reply.received_at_unix_nanos as i128,
            reply.sent_at_unix_nanos as i128,
        );
        let rtt = (t4 - t1) - (t3 - t2);
        if t1 == 0 || rtt < 0 || t4 - t1 > 60_000_000_000 {
            return; // not an answer to a probe of ours, or a nonsensical one
        }
        let offset = ((t2 - t1) + (t3 - t4)) / 2;
        agent.probes.push_back((rtt as i64, offset as i64));
        while agent.probes.len() > PROBE_SAMPLES {
            agent.probes.pop_front();
        }
        if let Some(&(rtt, offset)) = agent.probes.iter().min_by_key(|(rtt, _)| *rtt) {
            agent.view.clock_offset_ms = Some(offset as f64 / 1e6);
            agent.view.probe_rtt_ms = Some(rtt as f64 / 1e6);
            self.health.set_offset(id, offset);
        }
    }

    fn message(&mut self, agent_id: &str, session: u64, msg: Msg) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        if agent.live.as_ref().is_none_or(|l| l.session != session) {
            return;
        }
        let shared = agent.is_shared(Instant::now());
        let v = &mut agent.view;
        v.last_seen_unix_ms = unix_ms(SystemTime::now());
        match msg {
            Msg::Control(record) => {
                v.control_records += 1;
                v.last_control_sequence = record.sequence;
                let now = Instant::now();
                agent.last_control = now;
                let c = record.counters.unwrap_or_default();
                let drops = |c: &proto::Counters| {
                    c.packets_dropped_kernel + c.packets_dropped_limiter + c.packets_dropped_queue
                };
                if let Some((then, before)) = &agent.previous {
                    let dt = now.saturating_duration_since(*then).as_secs_f64().max(1e-3);
                    let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                    v.capture_pps = rate(c.packets_captured, before.packets_captured);
                    v.send_pps = rate(c.packets_sent, before.packets_sent);
                    v.send_bps = rate(c.bytes_sent, before.bytes_sent) * 8.0;
                    agent.dropping = drops(&c) > drops(before);
                }
                agent.previous = Some((now, c));
                v.snapshot_entries = record.snapshot_entries;
                let capture = CaptureView::from_record(&record);
                if capture.state != v.capture.state {
                    let what = match &capture.error {
                        Some(e) => format!("{agent_id} capture {}: {e}", capture.state),
                        None => format!("{agent_id} capture {}", capture.state),
                    };
                    self.events.emit("capture_state", agent_id, what);
                }
                v.capture = capture;
            }
            Msg::PolicyStatus(status) if status.version != v.policy_version_sent => {
                tracing::debug!(agent = %agent_id, version = status.version, current = v.policy_version_sent, "status for a superseded policy ignored");
            }
            Msg::PolicyStatus(status) => {
                if status.applied {
                    v.policy_version_applied = status.version;
                    v.policy_error = None;
                    tracing::info!(agent = %agent_id, version = status.version, "policy applied");
                    // Each of two processes sharing an identity applies it per session.
                    if !shared {
                        self.events.emit(
                            "policy_applied",
                            agent_id,
                            format!(
                                "{agent_id} applied policy {} v{}",
                                v.policy_name, status.version
                            ),
                        );
                    }
                } else {
                    tracing::warn!(agent = %agent_id, version = status.version, error = %status.error, "agent refused policy; its previous policy keeps running");
                    self.events.emit(
                        "policy_refused",
                        agent_id,
                        format!(
                            "{agent_id} refused policy {} v{}: {}",
                            v.policy_name, status.version, status.error
                        ),
                    );
                    v.policy_error = Some(status.error);
                }
            }
            Msg::Hello(_) => {
                tracing::warn!(agent = %agent_id, "second Hello on one stream ignored");
            }
            Msg::TimeProbeReply(reply) => self.probe_reply(agent_id, &reply),
            Msg::Snapshot(_) => {}
        }
        self.update_state(agent_id, true);
    }
}

#[cfg(test)]
mod tests {
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
}
