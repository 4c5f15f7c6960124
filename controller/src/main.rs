//! tapgraph-controller: parse and validate configuration, load state, start the named tasks, wait
//! for a signal, drain with a deadline.

mod admin;
mod auth;
mod config;
mod console;
mod enrollment;
mod events;
mod health;
mod http;
mod metrics;
mod mirror;
mod operator;
mod policies;
mod registry;
mod session;
mod sinks;
mod store;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tapgraph::config::{EX_CONFIG, Sources};
use tapgraph::proto::admin_service_server::AdminServiceServer;
use tapgraph::proto::agent_service_server::AgentServiceServer;
use tapgraph::proto::enrollment_service_server::EnrollmentServiceServer;
use tapgraph::runtime::{Tasks, config_or_exit, daemon_runtime, shutdown_signal};

const PROGRAM: &str = "tapgraph-controller";
/// The largest HTTP/2 frame agents may send: a mirror batch (at most 1 MiB) in one frame.
const MAX_FRAME_SIZE: u32 = 1 << 20;
use tokio_util::sync::CancellationToken;

use crate::config::ControllerConfig;

/// mimalloc, not glibc's malloc: the controller holds thousands of mostly idle sessions and
/// applies their snapshots on one task. Measured with `bench/fleet.sh`, it cut the RSS of an
/// idle agent's session by a seventh and the topology task's time in malloc and free (a fifth of
/// its CPU under glibc) — see BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Freed pages go back to the system 100 ms after they empty, not mimalloc's 1 s: a purge comes
/// due only while the thread that freed them keeps allocating, and after a burst of large
/// snapshots the threads that held them go idle, keeping the burst as RSS (BENCHMARKS.md, "The
/// map's memory"). `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn tune_allocator() {
    /// `mi_option_purge_delay` in mimalloc.h, which the bindings do not name.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an integer option; mimalloc reads options atomically from any thread.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 100) }
    }
}
use crate::enrollment::Enrollment;
use crate::enrollment::ca::ControllerPki;
use crate::registry::Registry;
use crate::session::{AgentApi, StreamLimits};

/// The tapgraph controller: enrolls agents, holds one mTLS gRPC session per agent, pushes policy,
/// merges the fleet's connection tables into one graph and receives mirrored packets.
///
/// On first start it creates its CA and serving certificate in STATE_DIR/pki (or uses the
/// operator's CA from pki.ca_cert and pki.ca_key), and reuses them afterwards.
///
/// Configuration comes from, lowest to highest precedence: built-in defaults, the TOML file given
/// with --config, TAPGRAPH_* environment variables (`__` separates levels: TAPGRAPH_STATE_DIR is
/// state_dir, TAPGRAPH_PKI__SERVER_NAMES is pki.server_names), and these flags. Invalid
/// configuration exits with status 78 and names every bad key.
#[derive(Parser, Debug)]
#[command(version = tapgraph::VERSION, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// State directory: PKI, tokens, agents [key: state_dir, default /var/lib/tapgraph].
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<String>,
    /// gRPC listen address for agents and operators [key: listen, default 127.0.0.1:7443].
    #[arg(long, value_name = "ADDR", global = true)]
    listen: Option<String>,
    /// HTTP listen address for /healthz, /readyz and /api/v1 [key: http.listen, default 127.0.0.1:7080].
    #[arg(long, value_name = "ADDR", global = true)]
    http_listen: Option<String>,
    /// Names agents reach the controller by, comma-separated, for its certificate
    /// [key: pki.server_names, default localhost,127.0.0.1,::1,HOSTNAME].
    #[arg(long, value_name = "NAMES", global = true)]
    server_names: Option<String>,
    /// Log format: text or json [key: log.format].
    #[arg(long, value_name = "FORMAT", global = true)]
    log_format: Option<String>,
    /// Log filter, e.g. info or debug,h2=info [key: log.level].
    #[arg(long, value_name = "FILTER", global = true)]
    log_level: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (the default).
    Run,
    /// Operator identities for tapgraphctl.
    #[command(subcommand)]
    Operator(OperatorCommand),
}

#[derive(Subcommand, Debug)]
enum OperatorCommand {
    /// Issue an operator certificate from this controller's CA and write a tapgraphctl config file
    /// (controller address, CA, certificate and key inline; mode 0600). Run it on the controller
    /// host, with the controller's configuration.
    #[command(
        after_help = "Example:\n  tapgraph-controller operator issue alice --out ~/.config/tapgraph/tapgraphctl.toml\n  export TAPGRAPHCTL_CONFIG=~/.config/tapgraph/tapgraphctl.toml\n  tapgraphctl agent list"
    )]
    Issue {
        /// Operator name (1–64 of a-z, A-Z, 0-9, '.', '_', '-').
        name: String,
        /// Where to write the tapgraphctl config, or `-` for stdout [default: ./tapgraphctl-NAME.toml].
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Controller address tapgraphctl should dial [default: from `listen`].
        #[arg(long, value_name = "HOST:PORT")]
        address: Option<String>,
        /// Certificate lifetime, e.g. 30d or 12h.
        #[arg(long, value_name = "DURATION", default_value = "720h")]
        lifetime: String,
    },
}

const AFTER_HELP: &str = "\
Other keys (file or environment only): pki.ca_cert and pki.ca_key (an existing CA),
pki.server_cert_lifetime (365d), pki.agent_cert_lifetime (24h; agents renew at 70%),
shutdown_timeout, session.handshake_timeout, session.hello_timeout, session.idle_timeout,
session.max_message_bytes, limits (session.max_agents 20000, session.max_streams 16 Mirror
streams per agent, enrollment.rate 100/s with enrollment.burst 200, topology.queue 4096 snapshots;
beyond them requests are refused with RESOURCE_EXHAUSTED and the limit named),
topology.max_rows (2000000 rows in the whole map; a snapshot past it is refused, naming it), console.auth
(auto: a token beyond loopback; token: always), and the default policy under policy.* (capture, interface, filter,
snaplen, mode, limit, check_interval, breach_intervals, target, vni, snapshot_interval,
heartbeat_interval, ...).

The HTTP listener (http.*): header_read_timeout (10s for a request's head, and the longest a
kept-alive connection waits for the next one), idle_timeout (60s, at least 20s, without a byte moving),
max_connections (auto: 1024, but at most half the descriptors left after 256 reserved; the rest
stay gRPC's), max_connections_per_source (64 per IPv4 address or IPv6 /64; a connection past a cap
is closed at once), auth_failures_per_minute (10 bad tokens from one source, then 429),
metrics_token_file (a file holding the bearer token /metrics then requires), tls_cert and
tls_key (serve HTTPS; the console's cookie is then Secure).

Exit status: 0 after a clean shutdown, 1 on a runtime failure (e.g. address in use),
78 on invalid configuration or an unusable CA.";

impl Cli {
    fn overrides(&self) -> Vec<(String, String)> {
        tapgraph::config::flag_overrides(&[
            ("state_dir", &self.state_dir),
            ("listen", &self.listen),
            ("http.listen", &self.http_listen),
            ("pki.server_names", &self.server_names),
            ("log.format", &self.log_format),
            ("log.level", &self.log_level),
        ])
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let sources = Sources::from_process(cli.config.clone(), cli.overrides());
    let config = match config_or_exit(PROGRAM, ControllerConfig::load(&sources)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(Command::Operator(OperatorCommand::Issue {
        name,
        out,
        address,
        lifetime,
    })) = cli.command
    {
        return match operator::issue(&config, &name, out, address, &lifetime) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("tapgraph-controller: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    tapgraph::logging::init(config.log_format, &config.log_filter);
    let pki = match ControllerPki::load_or_create(&config.pki) {
        Ok(pki) => pki,
        Err(error) => {
            tracing::error!(%error, "cannot load or create the controller PKI");
            eprintln!(
                "tapgraph-controller: PKI in {}: {error}",
                config.pki.dir.display()
            );
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    let runtime = match daemon_runtime(PROGRAM, None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(run(config, pki)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "controller failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ControllerConfig, pki: ControllerPki) -> anyhow::Result<()> {
    let tls = pki
        .server_config()
        .map_err(anyhow::Error::msg)
        .context("serving certificate")?;
    let store = store::Store::open_with_cache(
        &config.state_dir.join("controller.redb"),
        config.store_cache,
    )?;
    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.listen))?;
    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let mut tasks = Tasks::default();
    let stop = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));

    let events = events::Events::new(1024);
    let agent_health = health::Health::default();
    let (registry, registry_task) =
        Registry::spawn(events.clone(), agent_health.clone(), config.max_agents);
    tasks.spawn("registry", registry_task);
    let fingerprint = pki.fingerprint();
    let (enrollment, enrollment_task) = Enrollment::spawn(
        store.clone(),
        pki.ca,
        config.agent_cert_lifetime,
        registry.clone(),
        events.clone(),
        enrollment::limits::EnrollLimits::new(config.enroll_rate, config.enroll_burst),
    )?;
    tasks.spawn("enrollment", enrollment_task);
    // Loaded before the listener serves, so the first agent already gets its stored policy.
    let store_for_topology = store.clone();
    let rules_store = store.clone();
    let console_store = store.clone();
    let (policies, policies_task) = policies::Policies::spawn(
        store,
        &config.default_policy,
        registry.clone(),
        events.clone(),
    )
    .await?;
    tasks.spawn("policies", policies_task);
    let topology_ttl = config.topology.ttl;
    let (topology, topology_task) =
        topology::Topology::spawn(store_for_topology, config.topology, events.clone())?;
    tasks.spawn("topology", topology_task);

    let (health, health_service) = tonic_health::server::health_reporter();
    set_grpc_health(&health, tonic_health::ServingStatus::Serving).await;
    let (reflection_v1, reflection_v1alpha) = reflection()?;
    let mirrors = mirror::Mirrors::new(config.state_dir.clone(), agent_health.clone());
    let agents = AgentServiceServer::new(AgentApi::new(
        registry.clone(),
        enrollment.clone(),
        topology.clone(),
        mirrors.clone(),
        StreamLimits {
            hello_timeout: config.hello_timeout,
            idle_timeout: config.idle_timeout,
            max_mirror_streams: config.max_streams as usize,
        },
    ))
    .max_decoding_message_size(config.max_message_bytes);
    let enroll =
        EnrollmentServiceServer::new(enrollment::service::EnrollmentApi::new(enrollment.clone()))
            .max_decoding_message_size(64 * 1024);
    let naming = topology::Naming {
        config_rules: config.label_rules.clone(),
        operator_rules: topology::labels::OperatorRules::load(rules_store)?,
        names: if config.reverse_dns {
            topology::names::Names::new(std::time::Duration::from_secs(3600))
        } else {
            topology::names::Names::disabled()
        },
        agents: agent_health.clone(),
    };
    let sink = config.neo4j.clone().map(|settings| {
        let (sink, handle) = sinks::neo4j::Sink::new(
            settings,
            topology.clone(),
            enrollment.clone(),
            naming.clone(),
            events.clone(),
            topology_ttl,
        );
        tasks.spawn("neo4j-sink", sink.run(stop.clone()));
        handle
    });
    let http_stats = Arc::new(http::HttpStats::default());
    let access = console::Access::new(
        console::ConsoleTokens::load(console_store)?,
        config.console_token_always || !config.http_listen.ip().is_loopback(),
        &config.http,
        http_stats.clone(),
    );
    let console_url = console_url(&config, http_addr);
    let admin = AdminServiceServer::new(admin::AdminApi {
        enrollment: enrollment.clone(),
        registry: registry.clone(),
        policies: policies.clone(),
        topology: topology.clone(),
        events: events.clone(),
        naming: naming.clone(),
        mirrors: mirrors.clone(),
        console: access.clone(),
        console_url: console_url.clone(),
    });
    let incoming = tapgraph::transport::tls_incoming(grpc_listener, tls, config.handshake_timeout);
    let grpc_stop = stop.clone();
    tasks.spawn("grpc", async move {
        let served = tonic::transport::Server::builder()
            // Mirror streams are bulk: HTTP/2's default 64 KiB window would stall each one
            // every 64 KiB for a WINDOW_UPDATE round trip. Credit, not memory.
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(8 << 20))
            // ... and a batch goes as one DATA frame instead of a 16 KiB one per TLS record:
            // HTTP/2's per-frame work on both ends (flow control, stream wake-ups) then comes
            // once per batch.
            .max_frame_size(Some(MAX_FRAME_SIZE))
            .max_concurrent_streams(Some(config.max_streams + session::STREAM_HEADROOM))
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(agents)
            .add_service(enroll)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(error = %tapgraph::error_chain(&error), "gRPC server failed");
        }
    });

    let http_state = http::HttpState {
        registry: registry.clone(),
        topology: topology.clone(),
        enrollment: enrollment.clone(),
        naming,
        policies: policies.clone(),
        events,
        ready: ready.clone(),
        sink,
        mirrors: mirrors.clone(),
        access: access.clone(),
        http_stats,
        stop: stop.clone(),
    };
    let http_stop = stop.clone();
    let http_settings = config.http.clone();
    tasks.spawn("http", async move {
        http::serve(http_listener, http_state, &http_settings, http_stop).await;
    });

    ready.store(true, Ordering::Release);
    // The bound addresses, which differ from the configured ones when a port is 0.
    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        state_dir = %config.state_dir.display(),
        ca_fingerprint = %fingerprint,
        console = %console_url,
        console_token = access.required,
        console_built = console::built(),
        version = tapgraph::VERSION,
        "controller ready"
    );

    let signal = shutdown_signal().await;
    tracing::info!(signal, deadline = ?config.shutdown_timeout, "shutting down");
    ready.store(false, Ordering::Release);
    set_grpc_health(&health, tonic_health::ServingStatus::NotServing).await;
    // Sessions end first, so the gRPC server's graceful shutdown is not held up by open streams.
    registry.shutdown().await;
    stop.cancel();
    drop((registry, enrollment, policies, topology));
    tasks.drain(config.shutdown_timeout).await;
    tracing::info!("controller stopped");
    Ok(())
}

/// The services gRPC health reports: the server as a whole ("") and each of tapgraph's.
const GRPC_SERVICES: [&str; 4] = [
    "",
    tapgraph::proto::agent_service_server::SERVICE_NAME,
    tapgraph::proto::enrollment_service_server::SERVICE_NAME,
    tapgraph::proto::admin_service_server::SERVICE_NAME,
];

async fn set_grpc_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for service in GRPC_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// gRPC reflection in both versions, v1 and the v1alpha that many tools still speak (grpcio's
/// Python client among them), each listing tapgraph's services, grpc.health.v1.Health and both
/// reflection services: a generic client needs no local .proto file.
fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tapgraph::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection v1")?;
    let v1alpha = builder()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("gRPC reflection v1alpha")?;
    Ok((v1, v1alpha))
}

/// Where operators open the console: the HTTP listener's address, or the first server name when
/// it listens on every address.
fn console_url(config: &ControllerConfig, bound: std::net::SocketAddr) -> String {
    let host = if bound.ip().is_unspecified() {
        config
            .pki
            .server_names
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into())
    } else {
        bound.ip().to_string()
    };
    let scheme = if config.http.tls.is_some() {
        "https"
    } else {
        "http"
    };
    if host.contains(':') {
        format!("{scheme}://[{host}]:{}/", bound.port())
    } else {
        format!("{scheme}://{host}:{}/", bound.port())
    }
}
