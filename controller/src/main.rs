//! tapgraph-controller: parse and validate configuration, load state, start the named tasks, wait
//! for a signal, drain with a deadline.

mod admin;
mod alerts;
mod app;
mod auth;
mod config;
mod enrollment;
mod events;
mod health;
mod http;
mod metrics;
mod mirror;
mod operator;
mod policies;
mod policy_rules;
mod registry;
mod session;
mod sinks;
mod store;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tapgraph::config::{EX_CONFIG, Sources};
use tapgraph::runtime::{config_or_exit, daemon_runtime, shutdown_signal};

use crate::app::App;
use crate::config::ControllerConfig;
use crate::enrollment::ca::ControllerPki;
use crate::store::{Store, StoreSettings};

const PROGRAM: &str = "tapgraph-controller";

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
    /// This replica's name, shown as the controller of the agents connected to it
    /// (1–63 of A-Z, a-z, 0-9, '.', '_', '-') [key: replica, default HOSTNAME].
    #[arg(long, value_name = "NAME", global = true)]
    replica: Option<String>,
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
    /// The state store.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Copy a single controller's state (STATE_DIR/controller.redb: join tokens, agents and their
    /// revocations, policies, label rules, console tokens, the map) and its CA into the PostgreSQL
    /// database this configuration names, so that its agents move to the replicas with the
    /// certificates they hold. Stop the old controller first. The CA: nothing to copy with
    /// pki.ca_cert/pki.ca_key; stored sealed with pki.ca_seal_key_file; otherwise the steps are
    /// printed.
    #[command(
        after_help = "Example:\n  systemctl stop tapgraph-controller\n  tapgraph-controller --config /etc/tapgraph/replica.toml store migrate --from /var/lib/tapgraph"
    )]
    Migrate {
        /// The old controller's state directory (its state_dir).
        #[arg(long, value_name = "STATE_DIR")]
        from: PathBuf,
        /// Migrate into a database that already holds agents: each table copied becomes what
        /// STATE_DIR holds (rows only the database has are removed).
        #[arg(long)]
        force: bool,
    },
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
pki.ca_seal_key_file (replicas on PostgreSQL without pki.ca_cert: a file of 32 bytes sealing the
CA the first replica stores in the database),
pki.server_cert_lifetime (365d), pki.agent_cert_lifetime (24h; agents renew at 70%),
shutdown_timeout, session.handshake_timeout, session.hello_timeout, session.idle_timeout,
session.max_message_bytes, limits (session.max_agents 20000, session.max_streams 16 Mirror
streams per agent, enrollment.rate 100/s with enrollment.burst 200, topology.queue 4096 snapshots;
beyond them requests are refused with RESOURCE_EXHAUSTED and the limit named),
topology.max_rows (2000000 rows in the whole map; a snapshot past it is refused, naming it), console.auth
(auto: a token beyond loopback; token: always), and the default policy under policy.* (capture, interface, filter,
snaplen, mode, limit, check_interval, breach_intervals, target, vni, gre_key, erspan_type,
erspan_session, snapshot_interval, heartbeat_interval, ...).

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
            ("replica", &self.replica),
            ("log.format", &self.log_format),
            ("log.level", &self.log_level),
        ])
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // Before anything builds a TLS configuration: neo4rs builds its own (bolt+s) without naming a
    // provider, and turns on rustls's ring feature beside aws-lc-rs.
    tapgraph::tls::install_default_provider();
    let cli = Cli::parse();
    let sources = Sources::from_process(cli.config.clone(), cli.overrides());
    let config = match config_or_exit(PROGRAM, ControllerConfig::load(&sources)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(Command::Store(StoreCommand::Migrate { from, force })) = &cli.command {
        return match store::migrate::run(&config, from, *force) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("tapgraph-controller: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
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
    tapgraph::runtime::set_realtime(config.mirror_realtime);
    let runtime = match daemon_runtime(PROGRAM, None) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let (pki, store) = match runtime.block_on(open_state(&config)) {
        Ok(state) => state,
        Err(code) => return code,
    };
    match runtime.block_on(run(config, pki, store)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "controller failed");
            ExitCode::FAILURE
        }
    }
}

/// The PKI and the state store, each in the order the other needs: replicas sharing a database
/// keep their CA in it, so the database comes first; the embedded store opens in the state
/// directory the PKI has made. An unusable CA exits 78, a store that cannot be opened 1.
async fn open_state(config: &ControllerConfig) -> Result<(ControllerPki, Store), ExitCode> {
    let connect = async || {
        Store::connect(&config.store, &config.state_dir, &config.replica)
            .await
            .map_err(|error| {
                tracing::error!(%error, "cannot open the state store");
                eprintln!("tapgraph-controller: {error}");
                ExitCode::FAILURE
            })
    };
    let shared = match config.store {
        StoreSettings::Postgres(_) => Some(connect().await?),
        StoreSettings::Embedded { .. } => None,
    };
    let pki = ControllerPki::load(
        &config.pki,
        shared.as_ref().map(|s| (s, config.replica.as_str())),
    )
    .map_err(|error| {
        tracing::error!(%error, "cannot load or create the controller PKI");
        eprintln!(
            "tapgraph-controller: PKI in {}: {error}",
            config.pki.dir.display()
        );
        ExitCode::from(EX_CONFIG as u8)
    })?;
    let store = match shared {
        Some(store) => store,
        None => connect().await?,
    };
    Ok((pki, store))
}

/// Starts every task (`app.rs`), waits for SIGINT or SIGTERM, then drains within
/// `shutdown_timeout`.
async fn run(config: ControllerConfig, pki: ControllerPki, store: Store) -> anyhow::Result<()> {
    let app = App::start(&config, pki, store).await?;
    let signal = shutdown_signal().await;
    tracing::info!(signal, deadline = ?config.shutdown_timeout, "shutting down");
    app.shutdown(config.shutdown_timeout).await;
    tracing::info!("controller stopped");
    Ok(())
}
