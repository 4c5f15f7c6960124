//! The registry task: it owns the agent table, takes one command at a time, and every
//! [`TICK`] re-judges live agents and sends the time probes that are due. Its loop only
//! dispatches; what each command does is a named method in the module of its concern.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tapgraph::proto::{self, agent_message::Msg, controller_message};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use super::agents::{Agent, unix_ms};
use super::presence::{Held, Interfaces, Published};
use super::view::AgentView;
use super::{DropCounters, MirrorRoute, Outbound, Registered};
use crate::events::Events;
use crate::health::Health;
use crate::policy_rules::{DEFAULT_NAME, Selector, StoredPolicy, StoredSpec};

/// How often live agents are re-judged and probes sent.
const TICK: Duration = Duration::from_millis(250);
/// A change operators wait for (a session, a policy ack) is handed to the presence writer at
/// once, but not more often than this: a connect storm or a rollout's acks cost a list of every
/// agent per this period, not per agent (at 2,000 agents a list is a few hundred microseconds of
/// copying; at 50 ms it was a twentieth of a PostgreSQL replica's CPU during rollouts).
const HANDOVER_SOON: Duration = Duration::from_millis(200);

/// With a shared store: the agents handed to the presence writer, every `every`, and soon after a
/// change operators wait for.
pub(super) struct Handover {
    held: watch::Sender<Held>,
    every: Duration,
    last: Instant,
    /// A change since the last handover that should not wait for `every`.
    changed: bool,
}

pub(super) enum Command {
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
        /// Agents live on other replicas, judged with this replica's.
        remote: Vec<AgentView>,
        /// Each replica's network interfaces, this one's included.
        interfaces: Interfaces,
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

pub(super) struct RegistryTask {
    /// This replica's name, the controller of every agent with a live session here.
    pub(super) replica: Arc<str>,
    /// Boxed: an `Agent` is 760 bytes, and B-tree nodes hold eleven values, half full or more.
    pub(super) agents: BTreeMap<String, Box<Agent>>,
    pub(super) next_session: u64,
    /// Live sessions at most (`session.max_agents`); a new agent beyond is refused.
    pub(super) max_sessions: usize,
    pub(super) policies: Vec<StoredPolicy>,
    pub(super) default: StoredPolicy,
    pub(super) events: Events,
    pub(super) health: Health,
    pub(super) dropped: Arc<DropCounters>,
    pub(super) handover: Option<Handover>,
    /// With a shared store: the policy versions of this replica's agents that the other
    /// replicas can read (`policy status` counts an ack once it is there).
    pub(super) published: Option<Published>,
}

/// Resolves when a change operators wait for is due to be handed over (never without one).
async fn handover_soon(handover: &Option<Handover>) {
    match handover {
        Some(h) if h.changed => {
            tokio::time::sleep_until((h.last + HANDOVER_SOON).into()).await;
        }
        _ => std::future::pending().await,
    }
}

/// Whether `cmd` changes what operators wait to see on the other replicas: a session begun or
/// ended, labels or policies, an agent's policy ack or refusal.
fn awaited(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Register { .. }
            | Command::Deregister { .. }
            | Command::Close { .. }
            | Command::SetLabels { .. }
            | Command::SetPolicies { .. }
            | Command::Shutdown { .. }
            | Command::Message {
                msg: Msg::PolicyStatus(_),
                ..
            }
    )
}

impl RegistryTask {
    /// No agents yet, and until the policy task sets them, the built-in default policy.
    pub(super) fn new(
        replica: Arc<str>,
        events: Events,
        health: Health,
        max_sessions: usize,
        dropped: Arc<DropCounters>,
    ) -> Self {
        let placeholder = StoredPolicy {
            name: DEFAULT_NAME.into(),
            selector: Selector::All,
            spec: StoredSpec(tapgraph::policy::PolicySpec::default().to_proto(0, DEFAULT_NAME)),
            version: 0,
            updated_at_ms: 0,
        };
        Self {
            replica,
            agents: BTreeMap::new(),
            next_session: 1,
            max_sessions,
            policies: Vec::new(),
            default: placeholder,
            events,
            health,
            dropped,
            handover: None,
            published: None,
        }
    }

    /// Hands the agents to the presence writer on `held` every `every`.
    pub(super) fn share(
        &mut self,
        held: watch::Sender<Held>,
        every: Duration,
        published: Published,
    ) {
        self.published = Some(published);
        self.handover = Some(Handover {
            held,
            every,
            last: Instant::now(),
            changed: false,
        });
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        let awaited = awaited(&cmd);
                        self.handle(cmd);
                        if awaited {
                            self.hand_over(Instant::now(), true);
                        }
                    }
                    None => break,
                },
                _ = ticks.tick() => self.tick(),
                _ = handover_soon(&self.handover) => self.hand_over(Instant::now(), false),
            }
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Register {
                agent_id,
                hello,
                labels,
                remote,
                outbound,
                reply,
            } => {
                let _ = reply.send(self.register(agent_id, hello, labels, remote, outbound));
            }
            Command::SetPolicies {
                policies,
                default,
                reply,
            } => {
                self.set_policies(policies, default);
                let _ = reply.send(());
            }
            Command::SetLabels {
                agent_id,
                labels,
                reply,
            } => {
                self.set_labels(&agent_id, labels);
                let _ = reply.send(());
            }
            Command::PolicyStatus {
                name,
                remote,
                interfaces,
                reply,
            } => {
                let _ = reply.send(self.fleet_policy_status(name.as_deref(), &remote, &interfaces));
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
                let _ = reply.send(self.list());
            }
            Command::Close {
                agent_id,
                status,
                reply,
            } => {
                self.close(&agent_id, status);
                let _ = reply.send(());
            }
            Command::Send {
                agent_id,
                session,
                msg,
            } => self.send(&agent_id, session, msg),
            Command::MirrorRoute { agent_id, reply } => {
                let _ = reply.send(self.mirror_route(&agent_id));
            }
            Command::Shutdown { reply } => {
                self.shutdown();
                let _ = reply.send(());
            }
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
            self.probe(&id, now);
        }
        self.hand_over(now, false);
    }

    /// With a shared store, hands the agents to the presence writer when due: every `every`, or
    /// [`HANDOVER_SOON`] after a change operators wait for (`changed`: one happened now).
    fn hand_over(&mut self, now: Instant, changed: bool) {
        let Some(h) = &mut self.handover else {
            return;
        };
        h.changed |= changed;
        let since = now.saturating_duration_since(h.last);
        if since < h.every && !(h.changed && since >= HANDOVER_SOON) {
            return;
        }
        let agents = Arc::new(self.list());
        if let Some(h) = &mut self.handover {
            h.held.send_replace(agents);
            h.last = now;
            h.changed = false;
        }
    }

    /// A message from session `session` of `agent_id`; one from a session since replaced is
    /// ignored.
    fn message(&mut self, agent_id: &str, session: u64, msg: Msg) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        if agent.live.as_ref().is_none_or(|l| l.session != session) {
            return;
        }
        agent.view.last_seen_unix_ms = unix_ms(SystemTime::now());
        match msg {
            Msg::Control(record) => self.control_record(agent_id, &record),
            Msg::PolicyStatus(status) => self.policy_report(agent_id, status),
            Msg::Hello(_) => {
                tracing::warn!(agent = %agent_id, "second Hello on one stream ignored");
            }
            Msg::TimeProbeReply(reply) => self.probe_reply(agent_id, &reply),
            Msg::Snapshot(_) => {}
        }
        self.update_state(agent_id, true);
    }
}
