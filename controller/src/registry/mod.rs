//! The session registry: one task owns the table of agents and their live sessions. gRPC handlers
//! talk to it by message and never hold a lock across an await.
//!
//! - `agents`: the table, one entry per agent seen, its live session, and session replacement;
//! - `health`: the judgement connected, degraded or lost, from control records (heartbeats);
//! - `clock`: time probes and the agent's clock offset;
//! - `rollout`: which policy each agent runs, sending it, and what the agent reports back;
//! - `view`: what operators see of an agent;
//! - `presence`: with a shared store, which replica holds each agent, so that every replica
//!   answers for the whole fleet;
//! - `task`: the owning task, whose loop only dispatches to the above.

mod agents;
mod clock;
mod health;
pub mod presence;
mod rollout;
mod task;
mod view;

#[cfg(test)]
mod fixture;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tapgraph::proto::{self, agent_message::Msg, controller_message};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use crate::events::Events;
use crate::health::Health;
use crate::policy_rules::StoredPolicy;
use crate::store::Store;
use presence::{Fleet, FleetView, PresenceStats, Writer};
use task::{Command, RegistryTask};

pub use health::AgentState;
pub use view::{AgentView, ConnectProcess, DirectView};

/// Commands queued to the registry task at most; senders wait beyond.
const COMMANDS: usize = 1024;

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

/// Where an agent's mirrored packets go: the targets of the policy that resolves for it now
/// (empty: none).
#[derive(Debug, Clone)]
pub struct MirrorRoute {
    pub targets: Vec<tapgraph::policy::Target>,
    pub hostname: String,
    /// Whether the agent's packets are deduplicated at its targets (the policy's `dedup`).
    pub dedup: bool,
}

/// A registered session: its number, and the signal that the registry ended it.
pub struct Registered {
    pub session: u64,
    pub closed: oneshot::Receiver<CloseReason>,
}

/// Messages to agents that the registry dropped, by what they were: each found its agent's
/// control channel full. An agent that lets it fill is not reading; its idle timeout ends it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// A policy (resent when the agent reconnects).
    pub policy: u64,
    /// A time probe (the next one comes a heartbeat later).
    pub time_probe: u64,
    /// A message a session task asked to send (a resync request).
    pub forwarded: u64,
    /// The status that tells an agent why its session was closed (the session ends anyway).
    pub close_status: u64,
}

/// [`Dropped`], counted by the registry task and read by scrapes.
#[derive(Debug, Default)]
struct DropCounters {
    policy: AtomicU64,
    time_probe: AtomicU64,
    forwarded: AtomicU64,
    close_status: AtomicU64,
}

impl DropCounters {
    fn read(&self) -> Dropped {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Dropped {
            policy: get(&self.policy),
            time_probe: get(&self.time_probe),
            forwarded: get(&self.forwarded),
            close_status: get(&self.close_status),
        }
    }
}

/// A handle to the registry task; cheap to clone. Every call is one command to the one task that
/// owns the agent table, so calls from one caller take effect in order and none holds a lock.
/// Calls that answer wait for the task (and get an empty answer once it has stopped); none waits
/// for an agent: what is pushed to an agent is queued on its session's bounded control channel,
/// and dropped and counted ([`Registry::dropped`]) when that is full.
#[derive(Clone)]
pub struct Registry {
    tx: mpsc::Sender<Command>,
    dropped: Arc<DropCounters>,
    replica: Arc<str>,
    /// The other replicas' agents, with a shared store.
    fleet: Option<Arc<Fleet>>,
}

/// How a registry shares its agents with the other replicas through a shared store.
pub struct Sharing {
    pub store: Store,
    /// Where this replica serves, written with its lease for operators.
    pub addresses: Vec<String>,
    /// [`presence::LEASE`], shorter in tests.
    pub lease: Duration,
    /// [`presence::REFRESH`].
    pub refresh: Duration,
    /// [`presence::INTERVAL`].
    pub interval: Duration,
}

impl Sharing {
    pub fn new(store: Store, addresses: Vec<String>) -> Self {
        Sharing {
            store,
            addresses,
            lease: presence::LEASE,
            refresh: presence::REFRESH,
            interval: presence::INTERVAL,
        }
    }
}

impl Registry {
    /// Starts the registry task of replica `replica`, holding at most `max_sessions` live agent
    /// sessions. Agents receive the policy that resolves for them (see
    /// [`Registry::set_policies`], called before any agent can connect).
    pub fn spawn(
        replica: &str,
        events: Events,
        health: Health,
        max_sessions: usize,
    ) -> (Self, impl std::future::Future<Output = ()> + use<>) {
        let (registry, task, rx) = Self::build(replica, events, health, max_sessions);
        (registry, task.run(rx))
    }

    /// As [`Registry::spawn`], on a store the replicas share: with the task that writes this
    /// replica's lease and its agents' presence, and queries that answer for the whole fleet.
    pub fn spawn_shared(
        replica: &str,
        events: Events,
        health: Health,
        max_sessions: usize,
        sharing: Sharing,
    ) -> (
        Self,
        impl std::future::Future<Output = ()> + use<>,
        impl std::future::Future<Output = ()> + use<>,
    ) {
        let (mut registry, mut task, rx) = Self::build(replica, events, health, max_sessions);
        let (held, handed) = watch::channel(presence::Held::default());
        let stats = Arc::new(PresenceStats::default());
        let mut fleet = Fleet::new(sharing.store.clone(), sharing.lease, stats.clone());
        let writer = Writer::new(
            sharing.store,
            replica,
            sharing.addresses,
            sharing.refresh,
            stats,
        );
        fleet.started_at_unix_ms = writer.started_at_unix_ms();
        task.share(held, sharing.interval, writer.published());
        registry.fleet = Some(Arc::new(fleet));
        (registry, task.run(rx), writer.run(handed))
    }

    fn build(
        replica: &str,
        events: Events,
        health: Health,
        max_sessions: usize,
    ) -> (Self, RegistryTask, mpsc::Receiver<Command>) {
        let (tx, rx) = mpsc::channel(COMMANDS);
        let dropped = Arc::new(DropCounters::default());
        let replica: Arc<str> = replica.into();
        let task = RegistryTask::new(
            replica.clone(),
            events,
            health,
            max_sessions,
            dropped.clone(),
        );
        let registry = Self {
            tx,
            dropped,
            replica,
            fleet: None,
        };
        (registry, task, rx)
    }

    /// The name of the replica this registry runs on: the controller its agents show.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Messages to agents dropped so far because their control channel was full.
    pub fn dropped(&self) -> Dropped {
        self.dropped.read()
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

    /// Rollout status per agent, for one policy or all; with a shared store, of the agents of
    /// every replica, judged against the policies this replica holds.
    pub async fn policy_status(&self, name: Option<String>) -> Vec<proto::AgentPolicyStatus> {
        let (remote, mut interfaces) = match &self.fleet {
            Some(fleet) => (
                fleet.remote_live(&self.replica, self.list_local().await),
                fleet.interfaces(),
            ),
            None => Default::default(),
        };
        interfaces.insert(self.replica.to_string(), presence::local_interfaces());
        self.call(|reply| Command::PolicyStatus {
            name,
            remote,
            interfaces,
            reply,
        })
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

    /// Every agent as operators see it: with a shared store, the whole fleet's, each shown on
    /// the replica holding its session.
    pub async fn list(&self) -> Vec<AgentView> {
        match self.fleet().await {
            Some(fleet) => fleet.agents.into_iter().map(|a| a.view).collect(),
            None => self.list_local().await,
        }
    }

    /// The agents this replica has seen since it started, as [`Registry::list`] shows them
    /// with the embedded store.
    pub async fn list_local(&self) -> Vec<AgentView> {
        self.call(|reply| Command::List { reply })
            .await
            .unwrap_or_default()
    }

    /// With a shared store, the whole fleet now; `None` otherwise.
    pub async fn fleet(&self) -> Option<FleetView> {
        let fleet = self.fleet.as_ref()?;
        Some(fleet.merge(&self.replica, self.list_local().await))
    }

    /// With a shared store, the task that writes the mirror streams landing on this replica
    /// for the others to show, until `stop`.
    pub fn mirror_writer(
        &self,
        mirrors: crate::mirror::Mirrors,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()> + use<>> {
        let fleet = self.fleet.as_ref()?;
        Some(fleet.mirror_writer(&self.replica, mirrors, stop))
    }

    /// The mirror streams landing on the other replicas (none without a shared store).
    pub async fn remote_mirrors(&self) -> Vec<presence::RemoteTarget> {
        match &self.fleet {
            Some(fleet) => fleet.remote_mirrors(&self.replica),
            None => Vec::new(),
        }
    }

    /// Presence reads and writes that failed; `None` without a shared store.
    pub fn presence_stats(&self) -> Option<&PresenceStats> {
        self.fleet.as_ref().map(|f| f.stats())
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
        // Drop cannot await: try first, and fall back to a task if the registry is busy. Nothing
        // is dropped: the task waits for room.
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.tx.try_send(cmd) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(cmd).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use tapgraph::proto::ResyncRequest;

    use super::*;

    /// The counts a scrape reads are the ones the task keeps, whatever the handle.
    #[tokio::test]
    async fn the_handle_reads_what_the_task_dropped() {
        let (registry, task) = Registry::spawn("replica-a", Events::new(16), Health::default(), 10);
        tokio::spawn(task);
        let (tx, _rx) = mpsc::channel(1);
        let remote = "192.0.2.1:1".parse().unwrap();
        let hello = proto::Hello::default();
        let registered = registry
            .register("vm".into(), hello, BTreeMap::new(), remote, tx)
            .await
            .unwrap();
        let resync = || controller_message::Msg::Resync(ResyncRequest::default());
        registry.send("vm", registered.session, resync()).await;
        registry.send("vm", registered.session, resync()).await;
        let copy = registry.clone();
        let listed = copy.list().await; // the sends above are handled by now
        assert_eq!(copy.replica(), "replica-a");
        assert_eq!(listed[0].controller, "replica-a");
        assert_eq!(
            copy.dropped(),
            Dropped {
                forwarded: 2,
                ..Dropped::default()
            }
        );
    }
}
