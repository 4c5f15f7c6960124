//! tapgraph-controller: parse and validate configuration, start the named tasks, wait for a signal,
//! drain with a deadline.

mod config;
mod http;
mod registry;
mod session;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::Parser;
use tapgraph::config::{EX_CONFIG, Sources};
use tapgraph::proto::agent_service_server::AgentServiceServer;
use tapgraph::runtime::{Tasks, shutdown_signal};
use tokio_util::sync::CancellationToken;

use crate::config::ControllerConfig;
use crate::registry::Registry;
use crate::session::{AgentApi, StreamLimits};

/// The tapgraph controller: holds one mTLS gRPC session per agent, pushes policy, merges the
/// fleet's connection tables into one graph and receives mirrored packets.
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
    /// gRPC listen address for agents and operators [key: listen, default 127.0.0.1:7443].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// HTTP listen address for /healthz, /readyz and /api/v1 [key: http.listen, default 127.0.0.1:7080].
    #[arg(long, value_name = "ADDR")]
    http_listen: Option<String>,
    /// Controller certificate, PEM [key: tls.cert].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<String>,
    /// Controller private key, PEM, mode 0600 [key: tls.key].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<String>,
    /// CA bundle that agent and operator certificates must chain to [key: tls.ca].
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<String>,
    /// Log format: text or json [key: log.format].
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Log filter, e.g. info or debug,h2=info [key: log.level].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

const AFTER_HELP: &str = "\
Other keys (file or environment only): shutdown_timeout, session.handshake_timeout,
session.hello_timeout, session.idle_timeout, session.max_message_bytes, and the default policy
under policy.* (capture, interface, filter, snaplen, mode, limit, check_interval,
breach_intervals, target, vni, snapshot_interval, heartbeat_interval, ...).

Exit status: 0 after a clean shutdown, 1 on a runtime failure (e.g. address in use),
78 on invalid configuration.";

impl Cli {
    fn overrides(&self) -> Vec<(String, String)> {
        [
            ("listen", &self.listen),
            ("http.listen", &self.http_listen),
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
    let config = match ControllerConfig::load(&sources) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("tapgraph-controller: {errors}");
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    tapgraph::logging::init(config.log_format, &config.log_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("controller")
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("tapgraph-controller: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "controller failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ControllerConfig) -> anyhow::Result<()> {
    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.listen))?;
    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;

    let mut tasks = Tasks::default();
    let stop = CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));

    let (registry, registry_task) = Registry::spawn(config.default_policy.clone());
    tasks.spawn("registry", registry_task);

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServiceServer<AgentApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tapgraph::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection")?;
    let agents = AgentServiceServer::new(AgentApi::new(
        registry.clone(),
        StreamLimits {
            hello_timeout: config.hello_timeout,
            idle_timeout: config.idle_timeout,
        },
    ))
    .max_decoding_message_size(config.max_message_bytes);
    let incoming = tapgraph::transport::tls_incoming(
        grpc_listener,
        config.tls.clone(),
        config.handshake_timeout,
    );
    let grpc_stop = stop.clone();
    tasks.spawn("grpc", async move {
        let served = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(agents)
            .serve_with_incoming_shutdown(incoming, grpc_stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(error = %tapgraph::error_chain(&error), "gRPC server failed");
        }
    });

    let http_state = http::HttpState {
        registry: registry.clone(),
        ready: ready.clone(),
    };
    let http_stop = stop.clone();
    tasks.spawn("http", async move {
        let served = axum::serve(http_listener, http::router(http_state))
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server failed");
        }
    });

    ready.store(true, Ordering::Release);
    tracing::info!(
        grpc = %config.listen,
        http = %config.http_listen,
        version = tapgraph::VERSION,
        "controller ready"
    );

    let signal = shutdown_signal().await;
    tracing::info!(signal, deadline = ?config.shutdown_timeout, "shutting down");
    ready.store(false, Ordering::Release);
    // Sessions end first, so the gRPC server's graceful shutdown is not held up by open streams.
    registry.shutdown().await;
    stop.cancel();
    drop(registry);
    tasks.drain(config.shutdown_timeout).await;
    tracing::info!("controller stopped");
    Ok(())
}
