//! tapgraph-agent: parse and validate configuration, run the control session, stop on a signal.

mod config;
mod host;
mod session;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tapgraph::config::{EX_CONFIG, Sources};
use tapgraph::runtime::{Tasks, shutdown_signal};
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;

/// The tapgraph agent: holds one mTLS session to the controller, applies the policy it pushes and
/// reports heartbeats; reconnects with backoff whenever the controller goes away.
///
/// Configuration comes from, lowest to highest precedence: built-in defaults, the TOML file given
/// with --config, TAPGRAPH_* environment variables (`__` separates levels: TAPGRAPH_TLS__CERT is
/// tls.cert), and these flags. Invalid configuration exits with status 78 and names every bad key.
#[derive(Parser, Debug)]
#[command(version = tapgraph::VERSION, after_help = AFTER_HELP)]
struct Cli {
    /// TOML configuration file.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Controller gRPC address, HOST:PORT [key: controller, default 127.0.0.1:7443].
    #[arg(long, value_name = "HOST:PORT")]
    controller: Option<String>,
    /// Name the controller certificate must carry [key: server_name, default: HOST of --controller].
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Agent certificate, PEM [key: tls.cert].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<String>,
    /// Agent private key, PEM, mode 0600 [key: tls.key].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<String>,
    /// CA bundle the controller certificate must chain to [key: tls.ca].
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<String>,
    /// Log format: text or json [key: log.format].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Log filter, e.g. info or debug [key: log.level].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

const AFTER_HELP: &str = "\
Other keys (file or environment only): backoff.min (200ms), backoff.max (5s), backoff.jitter
(0.2), connect_timeout (5s), shutdown_timeout (5s).

Exit status: 0 after a clean shutdown, 78 on invalid configuration. Lost connections are
never fatal: the agent reconnects with capped exponential backoff and jitter.";

impl Cli {
    fn overrides(&self) -> Vec<(String, String)> {
        [
            ("controller", &self.controller),
            ("server_name", &self.server_name),
            ("tls.cert", &self.tls_cert),
            ("tls.key", &self.tls_key),
            ("tls.ca", &self.tls_ca),
            ("log.format", &self.log_format),
            ("log.level", &self.log_level),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
        .collect()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = Sources::from_process(cli.config.clone(), cli.overrides());
    let config = match AgentConfig::load(&sources) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("tapgraph-agent: {errors}");
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    tapgraph::logging::init(config.log_format, &config.log_filter);
    // Two worker threads at most: the agent must stay light on the host it watches.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("agent")
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("tapgraph-agent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        let mut tasks = Tasks::default();
        let deadline = config.shutdown_timeout;
        tracing::info!(controller = %config.controller, version = tapgraph::VERSION, "agent starting");
        tasks.spawn("session", session::run(config, stop.clone()));
        let signal = shutdown_signal().await;
        tracing::info!(signal, deadline = ?deadline, "shutting down");
        stop.cancel();
        tasks.drain(deadline).await;
        tracing::info!("agent stopped");
    });
    ExitCode::SUCCESS
}
