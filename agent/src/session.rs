//! The control session: connect, say Hello, apply policies, send heartbeats; on any failure,
//! reconnect with backoff. It never gives up on a transient error.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tapgraph::policy::PolicySpec;
use tapgraph::proto::{
    self, agent_message::Msg, agent_service_client::AgentServiceClient, controller_message,
};
use tapgraph::transport::ChannelOptions;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::capture::{self, Tap};
use crate::config::AgentConfig;
use crate::report::Reporter;
use crate::{dial, host};

/// What survives reconnects: the applied policy, the heartbeat sequence and the connection-table
/// reporter (its inode→process cache is what makes snapshots cheap).
struct State {
    policy: PolicySpec,
    policy_version: u64,
    control_sequence: u64,
    started_at: u64,
    reporter: Option<Reporter>,
    /// The next snapshot must be full: a new session, or the controller asked.
    full_snapshot: bool,
    snapshot_entries: u64,
    /// The virtual TAP: survives sessions, so a reconnect neither restarts nor loses a capture.
    tap: Tap,
    /// The policy version stamped on mirror batches.
    mirror_version: Arc<AtomicU64>,
    /// The session's mirror forwarder, holding the TAP's queue until it is stopped.
    mirror: Option<(CancellationToken, tokio::task::JoinHandle<capture::QueueRx>)>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl State {
    /// Takes the TAP's queue back from the last session's forwarder.
    async fn reclaim_queue(&mut self) {
        if let Some((stop, forwarder)) = self.mirror.take() {
            stop.cancel();
            match forwarder.await {
                Ok(queue) => self.tap.outbound = Some(queue),
                Err(e) => {
                    tracing::error!(error = %e, "mirror forwarder failed; mirrored packets are dropped until restart")
                }
            }
        }
    }

    fn control_record(&mut self) -> proto::ControlRecord {
        self.control_sequence += 1;
        let record = proto::ControlRecord {
            sequence: self.control_sequence,
            sent_at_unix_nanos: tapgraph::time::unix_nanos(),
            counters: Some(self.tap.counters()),
            capture_state: self.tap.state() as i32,
            last_error: self.tap.last_error().to_string(),
            policy_version: self.policy_version,
            snapshot_entries: self.snapshot_entries,
            breach: self.tap.breach(),
            direct_targets: self.tap.direct_targets(),
        };
        self.metrics.observe(&record);
        record
    }
}

/// The connection-table reporter, made on first use and kept across sessions (it holds the
/// inode→process cache, the SYN-ACK capture and the BPF tracer).
fn reporter<'a>(config: &AgentConfig, state: &'a mut State) -> &'a mut Reporter {
    state.reporter.get_or_insert_with(|| {
        Reporter::new(
            None,
            config.scope,
            &state.metrics.snapshot_drops,
            config.bpf,
        )
    })
}

/// How a session ended.
enum End {
    /// Shutdown requested: stop.
    Shutdown,
    /// The session was established and then lost: reconnect from the shortest delay.
    Lost(String),
    /// The session never got going: back off further.
    Failed(String),
}

/// Runs sessions until `shutdown` is cancelled; every control record is also shown on `metrics`.
pub async fn run(
    config: AgentConfig,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    let mut state = State {
        policy: PolicySpec::default(),
        policy_version: 0,
        control_sequence: 0,
        started_at: tapgraph::time::unix_nanos(),
        reporter: None,
        full_snapshot: true,
        snapshot_entries: 0,
        tap: Tap::default(),
        mirror_version: Arc::new(AtomicU64::new(0)),
        mirror: None,
        metrics,
    };
    let mut backoff = config.backoff.start();
    loop {
        let end = session(&config, &mut state, &shutdown).await;
        state.reclaim_queue().await;
        let reason = match end {
            End::Shutdown => return,
            End::Lost(reason) => {
                backoff.reset();
                reason
            }
            End::Failed(reason) => reason,
        };
        let delay = backoff.next_delay();
        tracing::warn!(controller = %config.controller, error = %reason, retry_in = ?delay, attempt = backoff.attempt(), "no session with the controller");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

fn message(msg: Msg) -> proto::AgentMessage {
    proto::AgentMessage { msg: Some(msg) }
}

async fn session(config: &AgentConfig, state: &mut State, shutdown: &CancellationToken) -> End {
    // Certificates are re-read on every attempt, so a renewed pair takes effect on reconnect.
    let tls = match config.tls.client_config() {
        Ok(tls) => tls,
        Err(e) => return End::Failed(e.to_string()),
    };
    let agent_id = std::fs::read_to_string(&config.tls.cert)
        .ok()
        .and_then(|pem| tapgraph::pki::cert_info(&pem).ok())
        .and_then(|info| match info.identity {
            Some(tapgraph::identity::Identity::Agent(id)) => Some(id),
            _ => None,
        })
        .unwrap_or_default();
    let options = ChannelOptions {
        connect_timeout: config.connect_timeout,
        ..ChannelOptions::default()
    };
    // Every address of every configured controller, in random order, before backing off.
    let dialled = tokio::select! {
        c = dial::dial(&config.controller, tls, &options) => c,
        () = shutdown.cancelled() => return End::Shutdown,
    };
    let dial::Connected {
        channel,
        chosen,
        controllers,
    } = match dialled {
        Ok(c) => c,
        Err(e) => return End::Failed(e.to_string()),
    };
    let mut client = AgentServiceClient::new(channel.clone());
    if let Some(queue) = state.tap.outbound.take() {
        let stop = CancellationToken::new();
        let forwarder = tokio::spawn(capture::forward(
            queue,
            channel.clone(),
            state.mirror_version.clone(),
            stop.clone(),
        ));
        state.mirror = Some((stop, forwarder));
    }
    let (tx, rx) = mpsc::channel::<proto::AgentMessage>(64);
    let mut hello = host::hello();
    // Whether every TCP client is named after its process (BPF), and why not, so the operator
    // knows what an unnamed short-lived client means.
    if let Some(caps) = hello.capabilities.as_mut() {
        match reporter(config, state).bpf_status() {
            crate::bpf::Status::Running => caps.connect_process = true,
            crate::bpf::Status::Off(reason) => caps.connect_process_off_reason.clone_from(reason),
        }
    }
    hello.started_at_unix_nanos = state.started_at;
    hello.agent_id = agent_id.clone();
    hello.scope = match config.scope {
        crate::snapshot::Scope::Own => proto::SnapshotScope::Own,
        crate::snapshot::Scope::All => proto::SnapshotScope::All,
    } as i32;
    // The channel is new and empty: Hello is queued before the stream opens, as the controller requires.
    if tx.try_send(message(Msg::Hello(hello))).is_err() {
        return End::Failed("cannot queue Hello".into());
    }
    let response = tokio::select! {
        r = client.connect(ReceiverStream::new(rx)) => r,
        () = shutdown.cancelled() => return End::Shutdown,
    };
    let mut inbound = match response {
        Ok(r) => r.into_inner(),
        Err(status) => {
            return End::Failed(format!(
                "stream refused: {:?}: {}",
                status.code(),
                status.message()
            ));
        }
    };
    tracing::info!(controller = %chosen.addr, agent = %agent_id, "connected to controller");
    // Renewal runs on the same connection for as long as this session lives.
    let renewal = CancellationToken::new();
    let _renewal_guard = renewal.clone().drop_guard();
    tokio::spawn(crate::enroll::renew_loop(
        channel,
        config.tls.clone(),
        renewal,
    ));

    // Rows towards the controllers are marked control-plane (hidden from the map by default):
    // towards every replica's address as resolved now, so that the sockets left towards one the
    // agent moved away from are not shown as the host's own traffic either.
    reporter(config, state).set_control_plane(controllers);
    state.full_snapshot = true;
    let mut established = false;
    let mut heartbeat = new_ticker(state.policy.heartbeat_interval);
    // The first snapshot goes out at once; then one every snapshot interval.
    let mut snapshots = tokio::time::interval(state.policy.snapshot_interval);
    snapshots.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return End::Shutdown,
            _ = heartbeat.tick() => {
                let record = state.control_record();
                if tx.send(message(Msg::Control(record))).await.is_err() {
                    return lost(established, "control stream closed".into());
                }
            }
            Some(event) = state.tap.events.recv() => {
                // A breach or a failure is reported at once, not at the next heartbeat.
                state.tap.on_event(&event);
                let record = state.control_record();
                if tx.send(message(Msg::Control(record))).await.is_err() {
                    return lost(established, "control stream closed".into());
                }
            }
            _ = snapshots.tick() => {
                if let Some(snapshot) = take_snapshot(state).await
                    && tx.send(message(Msg::Snapshot(snapshot))).await.is_err()
                {
                    return lost(established, "control stream closed".into());
                }
            }
            next = inbound.message() => match next {
                Ok(Some(proto::ControllerMessage { msg: Some(msg) })) => {
                    established = true;
                    let interval = state.policy.snapshot_interval;
                    let resync = matches!(msg, controller_message::Msg::Resync(_));
                    let policy = matches!(msg, controller_message::Msg::Policy(_));
                    let capture = state.tap.state();
                    let reply = handle(msg, state, &mut heartbeat);
                    if resync || state.policy.snapshot_interval != interval {
                        // A resync is answered at once; a new interval starts now.
                        snapshots = tokio::time::interval(state.policy.snapshot_interval);
                        snapshots.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                    if let Some(reply) = reply
                        && tx.send(message(reply)).await.is_err()
                    {
                        return lost(established, "control stream closed".into());
                    }
                    // A policy that changed the capture's state is reported at once.
                    if policy
                        && state.tap.state() != capture
                        && tx.send(message(Msg::Control(state.control_record()))).await.is_err()
                    {
                        return lost(established, "control stream closed".into());
                    }
                }
                Ok(Some(proto::ControllerMessage { msg: None })) => {}
                Ok(None) => return lost(established, "controller closed the stream".into()),
                Err(status) => {
                    return lost(established, format!("{:?}: {}", status.code(), status.message()));
                }
            },
        }
    }
}

/// What only this host can judge: the interface exists here, and this host's libpcap compiles the
/// filter. Opening the capture checks the rest (permission, the filter on the real link type).
fn check_on_host(spec: &PolicySpec) -> Result<(), String> {
    if spec.interface != "any" {
        let names: Vec<String> = host::interfaces().into_iter().map(|i| i.name).collect();
        if !names.contains(&spec.interface) {
            return Err(format!(
                "interface: {} does not exist on this host (it has {})",
                spec.interface,
                names.join(", ")
            ));
        }
    }
    tapgraph::bpf::check_filter(&spec.filter).map_err(|e| format!("filter: {}", e.reason))?;
    Ok(())
}

/// Takes the next snapshot on a blocking thread (it reads /proc); `None` if it failed (logged).
async fn take_snapshot(state: &mut State) -> Option<proto::ConnectionSnapshot> {
    let mut reporter = state.reporter.take()?;
    let full = state.full_snapshot;
    let (reporter, result) = tokio::task::spawn_blocking(move || {
        let result = reporter.next(full);
        (reporter, result)
    })
    .await
    .ok()?;
    state.snapshot_entries = reporter.rows();
    state.reporter = Some(reporter);
    match result {
        Ok(snapshot) => {
            state.full_snapshot = false;
            tracing::debug!(
                sequence = snapshot.sequence,
                full = snapshot.full,
                rows = snapshot.entries.len(),
                removed = snapshot.removed.len(),
                "snapshot"
            );
            Some(snapshot)
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read the connection table");
            None
        }
    }
}

fn lost(established: bool, reason: String) -> End {
    if established {
        End::Lost(reason)
    } else {
        End::Failed(reason)
    }
}

fn new_ticker(period: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(Instant::now() + period, period);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// Applies one controller message; returns the reply to send, if any.
fn handle(
    msg: controller_message::Msg,
    state: &mut State,
    heartbeat: &mut tokio::time::Interval,
) -> Option<Msg> {
    match msg {
        controller_message::Msg::Policy(p) => Some(Msg::PolicyStatus(apply(&p, state, heartbeat))),
        controller_message::Msg::TimeProbe(probe) => {
            let received = tapgraph::time::unix_nanos();
            Some(Msg::TimeProbeReply(proto::TimeProbeReply {
                id: probe.id,
                probe_sent_at_unix_nanos: probe.sent_at_unix_nanos,
                received_at_unix_nanos: received,
                sent_at_unix_nanos: tapgraph::time::unix_nanos(),
            }))
        }
        controller_message::Msg::Resync(request) => {
            tracing::info!(reason = %request.reason, "controller asked for a full snapshot");
            state.full_snapshot = true;
            None
        }
    }
}

/// Applies a policy entirely or not at all. On refusal the previous policy keeps running and the
/// exact reason goes back to the controller.
fn apply(
    p: &proto::Policy,
    state: &mut State,
    heartbeat: &mut tokio::time::Interval,
) -> proto::PolicyStatus {
    let refuse = |error: String| {
        tracing::warn!(version = p.version, %error, "policy refused; the previous policy keeps running");
        proto::PolicyStatus {
            version: p.version,
            applied: false,
            error,
        }
    };
    let spec = match PolicySpec::from_proto(p) {
        Ok(spec) => spec,
        Err(e) => return refuse(e.to_string()),
    };
    if let Err(e) = check_on_host(&spec) {
        return refuse(e);
    }
    let new_version = p.version != state.policy_version;
    match state
        .tap
        .apply(capture::Settings::from_policy(&spec), new_version)
    {
        Ok(true) => warn_offload(&spec.interface),
        Ok(false) => {}
        Err(e) => return refuse(e.to_string()),
    }
    if spec.heartbeat_interval != state.policy.heartbeat_interval {
        *heartbeat = new_ticker(spec.heartbeat_interval);
    }
    tracing::info!(
        version = p.version,
        name = %p.name,
        heartbeat = ?spec.heartbeat_interval,
        interface = %spec.interface,
        filter = %spec.filter,
        limit = %tapgraph::units::format_bitrate(spec.limit_bps),
        targets = %tapgraph::policy::Targets(spec.targets.clone()),
        "policy applied"
    );
    state.policy = spec;
    state.policy_version = p.version;
    state.mirror_version.store(p.version, Ordering::Relaxed);
    proto::PolicyStatus {
        version: p.version,
        applied: true,
        error: String::new(),
    }
}

/// Offloaded super-frames exceed the MTU and cannot be reinjected: say so when capture starts.
fn warn_offload(interface: &str) {
    for iface in host::interfaces() {
        if (interface == "any" || iface.name == interface)
            && let Some(warning) = host::offload_warning(&iface)
        {
            tracing::warn!(interface = %iface.name, "{warning}");
        }
    }
}
