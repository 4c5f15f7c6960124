//! tapgraph-loadgen: a fleet of simulated agents against a real controller. Each simulated agent
//! enrolls through the real flow (its own key and CSR, one join token of N uses), holds its own
//! mTLS connection, says Hello, acknowledges policies, answers time probes, sends control records
//! every heartbeat and connection snapshots (full, then deltas) from a synthetic data centre.
//! It reports enrollment and connect times, policy push latency and errors, with a progress line.

#![forbid(unsafe_code)]

mod synth;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tapgraph::proto::agent_service_client::AgentServiceClient;
use tapgraph::proto::enrollment_service_client::EnrollmentServiceClient;
use tapgraph::proto::{self, agent_message, controller_message};
use tapgraph::transport::{self, ChannelOptions};
use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Simulated tapgraph agents: N real mTLS sessions against a real controller, each enrolled with
/// its own certificate through a join token of N uses.
///
/// Make the token first: `tapgraphctl -o json token create --uses N --ttl 1h --label env=loadgen`.
/// With --rollouts, policy pushes are timed: `tapgraphctl policy set` (with TAPGRAPHCTL_CONFIG)
/// changes a policy for the token's labels, and the time until each simulated agent has the new
/// version is measured, in this one process, on one clock.
#[derive(Parser, Debug)]
#[command(version = tapgraph::VERSION, after_help = "Example:
  tapgraph-loadgen --controller 127.0.0.1:7443 --token \"$TOKEN\" --ca-fingerprint \"$FP\" \\
      --agents 1000 --entries 200 --snapshot-interval 15s --duration 60s --rollouts 5")]
struct Cli {
    /// Controller gRPC address, or several replicas' comma-separated: agent i starts on the
    /// (i mod n)-th, and once connected, moves to the next when its session is lost (as a real
    /// agent would, after the same backoff: 200 ms doubling to 5 s).
    #[arg(
        long,
        default_value = "127.0.0.1:7443",
        value_name = "HOST:PORT[,HOST:PORT…]"
    )]
    controller: String,
    /// Name the controllers' certificate must carry [default: the host of the first --controller].
    #[arg(long)]
    server_name: Option<String>,
    /// Join token with at least --agents uses.
    #[arg(long, env = "TAPGRAPH_LOADGEN_TOKEN")]
    token: String,
    /// SHA-256 fingerprint of the controller CA (printed with the token).
    #[arg(long)]
    ca_fingerprint: String,
    /// How many agents to simulate.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Agent ids are PREFIX-00001 and so on.
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Connection-table rows per agent; 0: idle agents (Hello and control records, no snapshots).
    #[arg(long, default_value_t = 200)]
    entries: usize,
    /// Every row to an address of its own outside the fleet, so each row is an edge of its own:
    /// the heaviest map a table of --entries rows can make.
    #[arg(long)]
    spread: bool,
    /// Share of rows that change between two snapshots.
    #[arg(long, default_value_t = 0.05)]
    churn: f64,
    /// Agents started per second while ramping up.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Enrollments and connects in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to hold the fleet after the ramp, e.g. 60s.
    #[arg(long, default_value = "30s")]
    duration: String,
    /// Policy rollouts to time during the hold (needs tapgraphctl and TAPGRAPHCTL_CONFIG).
    #[arg(long, default_value_t = 0)]
    rollouts: u32,
    /// Policy name and label selector the rollouts use (the token's labels).
    #[arg(long, default_value = "env=loadgen")]
    selector: String,
    /// Mirror batches per second per agent (0: none), of 10 packets of 200 bytes.
    #[arg(long, default_value_t = 0)]
    mirror_batches: u32,
    /// Revocations to time during the hold: `tapgraphctl agent revoke` (TAPGRAPHCTL_CONFIG, which
    /// names the first --controller) of agents connected to another replica, measured until their
    /// session there ends.
    #[arg(long, default_value_t = 0)]
    revocations: u32,
    /// Keeps the agents' certificates here and reuses them in later runs (no token use).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Counters and samples shared by every simulated agent.
#[derive(Default)]
struct Stats {
    enrolled: AtomicU64,
    /// Enrollments told to retry later (the controller's rate limit).
    enroll_retries: AtomicU64,
    connected: AtomicU64,
    snapshots: AtomicU64,
    entries_sent: AtomicU64,
    control_records: AtomicU64,
    mirror_batches: AtomicU64,
    resyncs: AtomicU64,
    /// Agents that gave up before their first policy.
    failed: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Milliseconds from an agent's start to its first policy (enrolled, connected, Hello done).
    connect_ms: Mutex<Vec<f64>>,
    /// Policy version → when each agent received it.
    policy_seen: Mutex<BTreeMap<u64, Vec<Instant>>>,
    /// Sessions lost after a first policy, and reconnected elsewhere.
    lost: AtomicU64,
    /// Milliseconds from a lost session to the first policy on the next one (another replica).
    failover_ms: Mutex<Vec<f64>>,
    /// Agent id → the index of the controller it is connected to now.
    on: Mutex<BTreeMap<String, usize>>,
    /// Agent id → when its revocation was asked for; its session's end is then timed.
    revoking: Mutex<BTreeMap<String, Instant>>,
    /// Milliseconds from `tapgraphctl agent revoke` to the end of the agent's session.
    revocation_ms: Mutex<Vec<f64>>,
}

impl Stats {
    async fn error(&self, kind: &str, detail: impl std::fmt::Display) {
        let mut errors = self.errors.lock().await;
        let n = errors.entry(kind.to_string()).or_default();
        *n += 1;
        if *n <= 3 {
            eprintln!("loadgen: {kind}: {detail}");
        }
    }
}

struct Settings {
    /// Enrollment goes to the first; sessions as --controller says.
    controllers: Vec<String>,
    server_name: String,
    token: String,
    fingerprint: String,
    agents: usize,
    entries: usize,
    spread: bool,
    churn: f64,
    mirror_batches: u32,
    state_dir: Option<PathBuf>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// An agent's identity: from the state directory, or enrolled now.
async fn identity(
    settings: &Settings,
    id: &str,
    stats: &Stats,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let files = settings.state_dir.as_ref().map(|d| {
        (
            d.join(format!("{id}.pem")),
            d.join(format!("{id}.key")),
            d.join("ca.pem"),
        )
    });
    if let Some((cert, key, ca)) = &files
        && cert.exists()
    {
        return tapgraph::tls::client_config_files(ca, Some((cert, key)))
            .map_err(|e| anyhow!("{id}: {e}"));
    }
    let pinned = tapgraph::tls::pinned_client_config(&settings.fingerprint)?;
    let channel = transport::connect(
        &settings.controllers[0],
        &settings.server_name,
        pinned,
        &ChannelOptions::default(),
    )
    .await?;
    let (key_pem, csr_pem) = tapgraph::pki::new_key_and_csr(id)?;
    let request = proto::EnrollRequest {
        token: settings.token.clone(),
        csr_pem,
        hostname: id.to_string(),
        machine_id: String::new(),
        requested_id: id.to_string(),
    };
    let mut client = EnrollmentServiceClient::new(channel);
    // The controller's enrollment rate limit says when to retry, as a real agent's backoff would.
    let deadline = Instant::now() + Duration::from_secs(120);
    let response = loop {
        match client.enroll(request.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(s) if s.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {
                stats.enroll_retries.fetch_add(1, Ordering::Relaxed);
                let wait = rand::random_range(50..250);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Err(s) => bail!("enrollment refused: {}", s.message()),
        }
    };
    stats.enrolled.fetch_add(1, Ordering::Relaxed);
    if let Some((cert, key, ca)) = &files {
        tapgraph::fsutil::write_private(key, key_pem.as_bytes())?;
        tapgraph::fsutil::write_private(cert, response.certificate_pem.as_bytes())?;
        tapgraph::fsutil::write_private(ca, response.ca_bundle_pem.as_bytes())?;
    }
    let chain = tapgraph::tls::parse_certs(response.certificate_pem.as_bytes())
        .map_err(|_| anyhow!("controller sent no certificate"))?;
    let key = tapgraph::tls::parse_key(key_pem.as_bytes()).map_err(|e| anyhow!(e))?;
    let roots =
        tapgraph::tls::roots_from_pem(response.ca_bundle_pem.as_bytes()).map_err(|e| anyhow!(e))?;
    Ok(tapgraph::tls::client_config(roots, Some((chain, key)))?)
}

fn now_ns() -> u64 {
    tapgraph::time::unix_nanos()
}

/// One simulated agent, until `stop`. `permit` (a ramp-up slot) is released once it has its
/// first policy. Returns whether it got that far. Once connected, a lost session is followed by
/// another on the next controller of the list, after the agent's backoff.
async fn agent(
    index: usize,
    id: String,
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    stop: tokio_util::sync::CancellationToken,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> bool {
    let mut permit = Some(permit);
    let started = Instant::now();
    let tls = match identity(&settings, &id, &stats).await {
        Ok(tls) => tls,
        Err(e) => {
            stats.error("enroll", format!("{id}: {e:#}")).await;
            return false;
        }
    };
    let mut rng = SmallRng::seed_from_u64(index as u64);
    let table = synth::Table::new(
        index,
        settings.agents,
        settings.entries,
        settings.spread,
        &mut rng,
    );
    let mut sim = Sim {
        table,
        rng,
        sequence: 0,
        control_sequence: 0,
        policy_version: 0,
        first_policy: true,
    };
    // The agent's defaults (backoff.min 200 ms, backoff.max 5 s, jitter 0.2).
    let mut backoff = tapgraph::backoff::BackoffPolicy::default().start();
    let n = settings.controllers.len();
    let mut pick = index % n;
    // Where to go next: another controller, at random, as a real agent's shuffle picks.
    let mut next_rng = SmallRng::seed_from_u64(index as u64 ^ 0x5eed);
    let mut lost: Option<Instant> = None;
    loop {
        let end = session(
            index,
            &id,
            pick % n,
            tls.clone(),
            &settings,
            &stats,
            &stop,
            &mut sim,
            &mut permit,
            started,
            &mut lost,
        )
        .await;
        match end {
            End::Stopped => return !sim.first_policy,
            End::Lost { had_policy } => {
                if let Some(asked) = stats.revoking.lock().await.remove(&id) {
                    stats
                        .revocation_ms
                        .lock()
                        .await
                        .push(asked.elapsed().as_secs_f64() * 1e3);
                    return !sim.first_policy;
                }
                if sim.first_policy {
                    // Never connected: as before, a failed start is reported, not retried.
                    return false;
                }
                if had_policy {
                    stats.lost.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                    lost.get_or_insert_with(Instant::now);
                }
                if n > 1 {
                    pick = (pick + 1 + next_rng.random_range(0..n - 1)) % n;
                }
                tokio::select! {
                    _ = stop.cancelled() => return true,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// What a simulated agent keeps from one session to the next.
struct Sim {
    table: synth::Table,
    rng: SmallRng,
    sequence: u64,
    control_sequence: u64,
    policy_version: u64,
    first_policy: bool,
}

enum End {
    Stopped,
    /// The session failed or ended; `had_policy`: it had got as far as a policy.
    Lost {
        had_policy: bool,
    },
}

/// One session with controller `on` (an index into --controller), until `stop` or its end.
#[allow(clippy::too_many_arguments)]
async fn session(
    index: usize,
    id: &str,
    on: usize,
    tls: Arc<rustls::ClientConfig>,
    settings: &Settings,
    stats: &Arc<Stats>,
    stop: &tokio_util::sync::CancellationToken,
    sim: &mut Sim,
    permit: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    started: Instant,
    lost: &mut Option<Instant>,
) -> End {
    let channel = match transport::connect(
        &settings.controllers[on],
        &settings.server_name,
        tls,
        &ChannelOptions::default(),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => {
            stats.error("connect", format!("{id}: {e}")).await;
            return End::Lost { had_policy: false };
        }
    };
    let (tx, rx) = mpsc::channel::<proto::AgentMessage>(64);
    let send = |msg: agent_message::Msg| proto::AgentMessage { msg: Some(msg) };
    let hello = proto::Hello {
        hostname: id.to_string(),
        agent_version: format!("{}-loadgen", tapgraph::VERSION),
        kernel: "loadgen".into(),
        interfaces: vec![proto::Interface {
            name: "eth0".into(),
            index: 2,
            addresses: vec![format!("{}/16", synth::address(index))],
            mtu: 1500,
            up: true,
            ..Default::default()
        }],
        started_at_unix_nanos: now_ns(),
        ..Default::default()
    };
    let _ = tx.send(send(agent_message::Msg::Hello(hello))).await;
    let mut client = AgentServiceClient::new(channel.clone());
    let mut inbound = match client.connect(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            stats
                .error("session", format!("{id}: {}", s.message()))
                .await;
            return End::Lost { had_policy: false };
        }
    };
    let mut full_due = true;
    let mut had_policy = false;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
    let mut snapshots = tokio::time::interval(Duration::from_secs(15));
    let mut mirror = (settings.mirror_batches > 0).then(|| {
        tokio::time::interval(Duration::from_secs_f64(
            1.0 / settings.mirror_batches as f64,
        ))
    });
    let mut mirror_tx: Option<mpsc::Sender<proto::MirrorBatch>> = None;
    let mut mirror_sequence = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return End::Stopped,
            message = inbound.message() => match message {
                Ok(Some(proto::ControllerMessage { msg: Some(m) })) => match m {
                    controller_message::Msg::Policy(p) => {
                        let seen = Instant::now();
                        if sim.first_policy {
                            sim.first_policy = false;
                            permit.take();
                            stats.connected.fetch_add(1, Ordering::Relaxed);
                            stats.connect_ms.lock().await.push(started.elapsed().as_secs_f64() * 1e3);
                        }
                        if !had_policy {
                            had_policy = true;
                            stats.on.lock().await.insert(id.to_string(), on);
                            if let Some(t) = lost.take() {
                                stats.failover_ms.lock().await.push(t.elapsed().as_secs_f64() * 1e3);
                            }
                        }
                        stats.policy_seen.lock().await.entry(p.version).or_default().push(seen);
                        sim.policy_version = p.version;
                        // As the agent does: a timer restarts only when its interval changes. A
                        // new heartbeat interval starts a period from now; a new snapshot interval
                        // sends a snapshot at once.
                        let every = Duration::from_millis(p.heartbeat_interval_ms);
                        if p.heartbeat_interval_ms > 0 && every != heartbeat.period() {
                            heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        }
                        let every = Duration::from_millis(p.snapshot_interval_ms);
                        if p.snapshot_interval_ms > 0 && every != snapshots.period() {
                            snapshots = tokio::time::interval(every);
                        }
                        let ack = proto::PolicyStatus { version: p.version, applied: true, error: String::new() };
                        let _ = tx.send(send(agent_message::Msg::PolicyStatus(ack))).await;
                    }
                    controller_message::Msg::TimeProbe(t) => {
                        let now = now_ns();
                        let reply = proto::TimeProbeReply {
                            id: t.id,
                            probe_sent_at_unix_nanos: t.sent_at_unix_nanos,
                            received_at_unix_nanos: now,
                            sent_at_unix_nanos: now,
                        };
                        let _ = tx.send(send(agent_message::Msg::TimeProbeReply(reply))).await;
                    }
                    controller_message::Msg::Resync(_) => {
                        stats.resyncs.fetch_add(1, Ordering::Relaxed);
                        full_due = true;
                    }
                },
                Ok(Some(_)) => {}
                Ok(None) => {
                    stats.error("session", format!("{id}: the controller ended the session")).await;
                    return End::Lost { had_policy };
                }
                Err(s) => {
                    stats.error("session", format!("{id}: {}", s.message())).await;
                    return End::Lost { had_policy };
                }
            },
            _ = heartbeat.tick() => {
                sim.control_sequence += 1;
                let record = proto::ControlRecord {
                    sequence: sim.control_sequence,
                    sent_at_unix_nanos: now_ns(),
                    capture_state: proto::CaptureState::Disabled as i32,
                    policy_version: sim.policy_version,
                    snapshot_entries: sim.table.entries.len() as u64,
                    ..Default::default()
                };
                if tx.send(send(agent_message::Msg::Control(record))).await.is_ok() {
                    stats.control_records.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = snapshots.tick(), if had_policy && settings.entries > 0 => {
                sim.sequence += 1;
                let snapshot = if full_due {
                    full_due = false;
                    proto::ConnectionSnapshot {
                        sequence: sim.sequence,
                        full: true,
                        taken_at_unix_nanos: now_ns(),
                        entries: sim.table.entries.clone(),
                        listeners: sim.table.listeners.clone(),
                        addresses: vec![synth::address(index)],
                        ..Default::default()
                    }
                } else {
                    let (upserts, removed) = sim.table.churn(settings.churn, &mut sim.rng);
                    proto::ConnectionSnapshot {
                        sequence: sim.sequence,
                        full: false,
                        base_sequence: sim.sequence - 1,
                        taken_at_unix_nanos: now_ns(),
                        entries: upserts,
                        removed,
                        ..Default::default()
                    }
                };
                let rows = (snapshot.entries.len() + snapshot.removed.len()) as u64;
                if tx.send(send(agent_message::Msg::Snapshot(snapshot))).await.is_ok() {
                    stats.snapshots.fetch_add(1, Ordering::Relaxed);
                    stats.entries_sent.fetch_add(rows, Ordering::Relaxed);
                }
            }
            _ = async { mirror.as_mut().unwrap().tick().await }, if mirror.is_some() && had_policy => {
                if mirror_tx.is_none() {
                    let (mtx, mrx) = mpsc::channel(16);
                    let mut c = AgentServiceClient::new(channel.clone());
                    let stats = stats.clone();
                    let id = id.to_string();
                    tokio::spawn(async move {
                        if let Err(s) = c.mirror(ReceiverStream::new(mrx)).await {
                            stats.error("mirror", format!("{id}: {}", s.message())).await;
                        }
                    });
                    mirror_tx = Some(mtx);
                }
                mirror_sequence += 1;
                let packets = (0..10).map(|_| proto::Packet {
                    timestamp_unix_nanos: now_ns(),
                    original_length: 200,
                    data: vec![0u8; 200].into(),
                }).collect();
                let batch = proto::MirrorBatch {
                    sequence: mirror_sequence,
                    sent_at_unix_nanos: now_ns(),
                    policy_version: sim.policy_version,
                    packets,
                    linktype: 1,
                    interface: "eth0".into(),
                    snaplen: 262_144,
                    ..Default::default()
                };
                if let Some(m) = &mirror_tx && m.try_send(batch).is_ok() {
                    stats.mirror_batches.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// tapgraphctl beside this program, or on PATH.
fn tapgraphctl() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("tapgraphctl")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("tapgraphctl"))
}

/// `tapgraphctl agent revoke ID`.
fn revoke(id: &str) -> anyhow::Result<()> {
    let ctl = tapgraphctl();
    let out = std::process::Command::new(&ctl)
        .args(["agent", "revoke", id])
        .output()
        .with_context(|| format!("cannot run {}", ctl.display()))?;
    if !out.status.success() {
        bail!(
            "tapgraphctl agent revoke {id}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `tapgraphctl policy set` for the loadgen's agents: a new version every call.
fn rollout(selector: &str, n: u32) -> anyhow::Result<Instant> {
    let ctl = tapgraphctl();
    let interval = if n.is_multiple_of(2) { "5s" } else { "6s" };
    let t0 = Instant::now();
    let out = std::process::Command::new(&ctl)
        .args([
            "policy",
            "set",
            "loadgen",
            "--selector",
            selector,
            "--heartbeat-interval",
            interval,
        ])
        .output()
        .with_context(|| format!("cannot run {}", ctl.display()))?;
    if !out.status.success() {
        bail!(
            "tapgraphctl policy set: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(t0)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let hold =
        tapgraph::units::parse_duration(&cli.duration).map_err(|e| anyhow!("--duration: {e}"))?;
    if cli.agents == 0 || cli.rate == 0 || cli.concurrency == 0 {
        bail!("--agents, --rate and --concurrency must be at least 1");
    }
    if !(0.0..=1.0).contains(&cli.churn) {
        bail!("--churn {} is not a share between 0 and 1", cli.churn);
    }
    if cli.rollouts > 0 && std::env::var_os("TAPGRAPHCTL_CONFIG").is_none() {
        bail!(
            "--rollouts needs TAPGRAPHCTL_CONFIG (an operator config from `tapgraph-controller operator issue`)"
        );
    }
    let fingerprint = tapgraph::tls::normalize_fingerprint(&cli.ca_fingerprint)
        .map_err(|e| anyhow!("--ca-fingerprint: {e}"))?;
    let controllers: Vec<String> = cli
        .controller
        .split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect();
    if controllers.is_empty() {
        bail!("--controller names no address");
    }
    if cli.revocations > 0 && std::env::var_os("TAPGRAPHCTL_CONFIG").is_none() {
        bail!(
            "--revocations needs TAPGRAPHCTL_CONFIG (an operator config for the first --controller)"
        );
    }
    let server_name = cli.server_name.clone().unwrap_or_else(|| {
        controllers[0]
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .unwrap_or_default()
    });
    if let Some(dir) = &cli.state_dir {
        tapgraph::fsutil::private_dir(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let settings = Arc::new(Settings {
        controllers,
        server_name,
        token: cli.token.clone(),
        fingerprint,
        agents: cli.agents,
        entries: cli.entries,
        spread: cli.spread,
        churn: cli.churn,
        mirror_batches: cli.mirror_batches,
        state_dir: cli.state_dir.clone(),
    });
    let stats = Arc::new(Stats::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(cli.concurrency));
    let ramp_start = Instant::now();

    // Progress line while ramping up and holding.
    let progress = {
        let stats = stats.clone();
        let stop = stop.clone();
        let agents = cli.agents;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! { _ = stop.cancelled() => break, _ = tick.tick() => {} }
                let errors: u64 = stats.errors.lock().await.values().sum();
                eprint!(
                    "\rloadgen: {:>6.1} s  enrolled {}  connected {}/{agents}  snapshots {}  errors {errors}   ",
                    ramp_start.elapsed().as_secs_f64(),
                    stats.enrolled.load(Ordering::Relaxed),
                    stats.connected.load(Ordering::Relaxed),
                    stats.snapshots.load(Ordering::Relaxed),
                );
            }
            eprintln!();
        })
    };

    let mut tasks = tokio::task::JoinSet::new();
    let spacing = Duration::from_secs_f64(1.0 / cli.rate as f64);
    for i in 0..cli.agents {
        let permit = gate.clone().acquire_owned().await?;
        let (settings, stats, stop) = (settings.clone(), stats.clone(), stop.clone());
        let id = format!("{}-{:05}", cli.prefix, i + 1);
        tasks.spawn(async move {
            if !agent(i, id, settings, stats.clone(), stop, permit).await {
                stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        });
        tokio::time::sleep(spacing).await;
    }
    // Ramped up: every agent connected or gave up (or two minutes passed).
    let deadline = Instant::now() + Duration::from_secs(120);
    while ((stats.connected.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed))
        as usize)
        < cli.agents
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ramp = ramp_start.elapsed();
    let connected_after_ramp = stats.connected.load(Ordering::Relaxed);

    // Hold, with timed rollouts spread over it.
    let mut rollouts = Vec::new();
    let hold_start = Instant::now();
    for n in 0..cli.rollouts {
        let before: Vec<u64> = stats.policy_seen.lock().await.keys().copied().collect();
        let t0 = tokio::task::spawn_blocking({
            let selector = cli.selector.clone();
            move || rollout(&selector, n)
        })
        .await??;
        // Wait for the new version at every connected agent.
        let want = stats.connected.load(Ordering::Relaxed) as usize;
        let wait_until = Instant::now() + Duration::from_secs(30);
        let latencies = loop {
            let seen = stats.policy_seen.lock().await;
            let newest = seen.iter().rev().find(|(v, _)| !before.contains(v));
            if let Some((_, times)) = newest
                && (times.len() >= want || Instant::now() > wait_until)
            {
                let mut l: Vec<f64> = times
                    .iter()
                    .map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1e3)
                    .collect();
                l.sort_by(f64::total_cmp);
                break l;
            }
            drop(seen);
            if Instant::now() > wait_until {
                break Vec::new();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        rollouts.push(latencies);
        tokio::time::sleep(hold / (cli.rollouts + 1)).await;
    }
    // Revocations through the first controller of agents connected to the others.
    let targets: Vec<String> = stats
        .on
        .lock()
        .await
        .iter()
        .filter(|(_, on)| **on != 0 || settings.controllers.len() == 1)
        .map(|(id, _)| id.clone())
        .take(cli.revocations as usize)
        .collect();
    for id in targets {
        stats
            .revoking
            .lock()
            .await
            .insert(id.clone(), Instant::now());
        let asked = id.clone();
        tokio::task::spawn_blocking(move || revoke(&asked)).await??;
        // One at a time: the next once this one's session ended (or 5 s passed).
        let until = Instant::now() + Duration::from_secs(5);
        while stats.revoking.lock().await.contains_key(&id) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let left = hold.saturating_sub(hold_start.elapsed());
    tokio::time::sleep(left).await;
    stop.cancel();
    let _ = progress.await;
    tasks.shutdown().await;

    let mut connect = stats.connect_ms.lock().await.clone();
    connect.sort_by(f64::total_cmp);
    let errors = stats.errors.lock().await.clone();
    let mut failover = stats.failover_ms.lock().await.clone();
    failover.sort_by(f64::total_cmp);
    let mut revocation = stats.revocation_ms.lock().await.clone();
    revocation.sort_by(f64::total_cmp);
    let timed = |v: &[f64]| {
        serde_json::json!({
            "count": v.len(), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99),
            "max": v.last().copied().unwrap_or(f64::NAN),
        })
    };
    let mut per_controller = vec![0u64; settings.controllers.len()];
    for on in stats.on.lock().await.values() {
        per_controller[*on] += 1;
    }
    let report = serde_json::json!({
        "agents": cli.agents,
        "connected": connected_after_ramp,
        "enrolled_now": stats.enrolled.load(Ordering::Relaxed),
        "enroll_retries": stats.enroll_retries.load(Ordering::Relaxed),
        "ramp_seconds": ramp.as_secs_f64(),
        "connect_ms": { "p50": percentile(&connect, 0.5), "p99": percentile(&connect, 0.99), "max": connect.last().copied().unwrap_or(f64::NAN) },
        "snapshots": stats.snapshots.load(Ordering::Relaxed),
        "snapshot_rows_sent": stats.entries_sent.load(Ordering::Relaxed),
        "control_records": stats.control_records.load(Ordering::Relaxed),
        "mirror_batches": stats.mirror_batches.load(Ordering::Relaxed),
        "resync_requests": stats.resyncs.load(Ordering::Relaxed),
        "rollouts": rollouts.iter().map(|l| serde_json::json!({
            "agents": l.len(), "p50_ms": percentile(l, 0.5), "p99_ms": percentile(l, 0.99),
            "max_ms": l.last().copied().unwrap_or(f64::NAN),
        })).collect::<Vec<_>>(),
        "sessions_lost": stats.lost.load(Ordering::Relaxed),
        "failover_ms": timed(&failover),
        "revocation_ms": timed(&revocation),
        "revocations_unfinished": stats.revoking.lock().await.len(),
        "agents_per_controller": settings.controllers.iter().cloned().zip(per_controller).collect::<BTreeMap<_, _>>(),
        "errors": errors,
    });
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "agents {} connected {} in {:.1} s (connect p50 {:.0} ms, p99 {:.0} ms)",
            cli.agents,
            connected_after_ramp,
            ramp.as_secs_f64(),
            percentile(&connect, 0.5),
            percentile(&connect, 0.99)
        );
        println!(
            "sent {} snapshots ({} rows), {} control records, {} mirror batches; {} resync requests",
            report["snapshots"],
            report["snapshot_rows_sent"],
            report["control_records"],
            report["mirror_batches"],
            report["resync_requests"]
        );
        for (i, l) in rollouts.iter().enumerate() {
            println!(
                "rollout {}: {} agents, policy set -> agent p50 {:.0} ms, p99 {:.0} ms",
                i + 1,
                l.len(),
                percentile(l, 0.5),
                percentile(l, 0.99)
            );
        }
        if !failover.is_empty() {
            println!(
                "{} sessions lost; reconnected elsewhere: {} agents, lost -> policy p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                report["sessions_lost"],
                failover.len(),
                percentile(&failover, 0.5),
                percentile(&failover, 0.99),
                failover.last().copied().unwrap_or(f64::NAN)
            );
        }
        if !revocation.is_empty() {
            println!(
                "{} revocations: agent revoke -> session ended p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                revocation.len(),
                percentile(&revocation, 0.5),
                percentile(&revocation, 0.99),
                revocation.last().copied().unwrap_or(f64::NAN)
            );
        }
        if !errors.is_empty() {
            println!("errors: {errors:?}");
        }
    }
    if connected_after_ramp as usize != cli.agents {
        bail!(
            "{} of {} agents connected",
            connected_after_ramp,
            cli.agents
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tapgraph-loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tapgraph-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}
