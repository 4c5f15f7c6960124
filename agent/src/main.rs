//! tapgraph-agent: parse and validate configuration, enroll if needed, run the control session,
//! stop on a signal.

mod bpf;
mod capture;
mod config;
mod dial;
mod enroll;
mod host;
mod metrics;
mod report;
mod session;
mod shortlived;
mod snapshot;
mod traffic;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tapgraph::config::{EX_CONFIG, Sources};
use tapgraph::runtime::{Tasks, config_or_exit, daemon_runtime, shutdown_signal};

const PROGRAM: &str = "tapgraph-agent";
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, Credentials, Purpose};
use crate::enroll::EnrollParams;

/// The tapgraph agent: holds one mTLS session to the controller, applies the policy it pushes and
/// reports heartbeats; reconnects with backoff whenever the controller goes away. With no
/// certificate yet and a join token configured, it enrolls by itself first.
///
/// Configuration comes from, lowest to highest precedence: built-in defaults, the TOML file given
/// with --config, TAPGRAPH_* environment variables (`__` separates levels: TAPGRAPH_ENROLL__TOKEN
/// is enroll.token), and these flags. Invalid configuration exits with status 78 and names every
/// bad key.
#[derive(Parser, Debug)]
#[command(version = tapgraph::VERSION, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Controller gRPC address, HOST:PORT, or the replicas' addresses comma-separated
    /// (ctl-a:7443,ctl-b:7443; IPv6 as [::1]:7443). At every (re)connect and enrollment, each
    /// address of each entry (a DNS name with several addresses counts as several) is tried in
    /// random order, and the agent backs off only when none answers [key: controller, default
    /// 127.0.0.1:7443].
    #[arg(long, value_name = "HOST:PORT[,...]", global = true)]
    controller: Option<String>,
    /// Name the controller certificate must carry, at every address of --controller [key:
    /// server_name, default: the HOST of each --controller entry].
    #[arg(long, value_name = "NAME", global = true)]
    server_name: Option<String>,
    /// Where the agent keeps its key and certificates [key: state_dir, default /var/lib/tapgraph-agent].
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<String>,
    /// Agent certificate, PEM [key: tls.cert, default STATE_DIR/agent.pem].
    #[arg(long, value_name = "FILE", global = true)]
    tls_cert: Option<String>,
    /// Agent private key, PEM, mode 0600 [key: tls.key, default STATE_DIR/agent.key].
    #[arg(long, value_name = "FILE", global = true)]
    tls_key: Option<String>,
    /// CA bundle the controller certificate must chain to [key: tls.ca, default STATE_DIR/ca.pem].
    #[arg(long, value_name = "FILE", global = true)]
    tls_ca: Option<String>,
    /// Join token from `tapgraphctl token create` [key: enroll.token; or enroll.token_file].
    #[arg(long, value_name = "TOKEN", global = true)]
    token: Option<String>,
    /// SHA-256 fingerprint of the controller CA, printed with the token [key: enroll.ca_fingerprint].
    #[arg(long, value_name = "SHA256", global = true)]
    ca_fingerprint: Option<String>,
    /// Agent id to ask for when enrolling [key: enroll.name, default: from the hostname].
    #[arg(long, value_name = "ID", global = true)]
    name: Option<String>,
    /// Log format: text or json [key: log.format].
    #[arg(long, value_name = "FORMAT", global = true)]
    log_format: Option<String>,
    /// Log filter, e.g. info or debug [key: log.level].
    #[arg(long, value_name = "FILTER", global = true)]
    log_level: Option<String>,
    /// Network namespaces to report: `own` (this one: a VM, or a host that is a namespace) or
    /// `all` (every namespace on the host, for container hosts; rows are tagged with their
    /// namespace and container; needs root) [key: snapshot.scope, default own].
    #[arg(long, value_name = "own|all", global = true)]
    scope: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Enroll with a join token: make a key here, send a CSR to the controller (whose CA is pinned
    /// by --ca-fingerprint), and write the key and certificate into the state directory (0600).
    #[command(
        after_help = "Example:\n  tapgraph-agent enroll --controller ctl.lan:7443 --token tgj.… --ca-fingerprint 9ec8…\n\nExit status: 0 enrolled, 1 refused or unreachable (the reason is printed), 78 bad configuration."
    )]
    Enroll,
    /// Read this host's connection table once, as the agent would report it, and print it with
    /// the time the read took (no controller needed). With --repeat, later reads use the warm
    /// socket→process cache, as a running agent does.
    Snapshot {
        /// Read this many times and print each read's duration.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Print the rows as JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Print only the timing and row counts.
        #[arg(long)]
        quiet: bool,
        /// How to read the socket tables: `netlink` (sock_diag, the agent's way) or `proc`
        /// (/proc/net text tables), to compare the two.
        #[arg(long, value_name = "netlink|proc", default_value = "netlink")]
        reader: snapshot::Reader,
        /// Do not ask sock_diag for each TCP socket's tcp_info (no traffic figures), to measure
        /// what the extension costs.
        #[arg(long)]
        no_tcp_info: bool,
    },
    /// List this namespace's interfaces with their offload flags and whether libpcap can capture
    /// on each (like `tcpdump -D`).
    ///
    /// For each interface: index, state, MTU, MAC, addresses, offload flags (GRO, GSO, TSO, LRO:
    /// frames they build exceed the MTU and cannot be reinjected) and capture; then libpcap's
    /// other devices (`any`: every interface at once). Needs no controller and no privilege;
    /// without privilege libpcap may list fewer devices.
    #[command(
        after_help = "CAPTURE column: yes (libpcap lists it and it is up), as root (the same, but this process lacks\nroot or CAP_NET_RAW), when up (listed but down), no (libpcap does not list it).\nOFFLOAD column: the offloads that are on, off, or unknown (the ethtool ioctl failed).\n\nExample:\n  tapgraph-agent interfaces --json | jq '.interfaces[] | select(.warning) | .warning'"
    )]
    Interfaces {
        /// Print one JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

const AFTER_HELP: &str = "\
Other keys (file or environment only): backoff.min (200ms), backoff.max (5s), backoff.jitter
(0.2), connect_timeout (5s), shutdown_timeout (5s), metrics.listen (where Prometheus /metrics is
served: 127.0.0.1:9464; off disables it), snapshot.bpf (true: name the process of every TCP
connect with BPF where the kernel allows it; false: the SYN-ACK capture alone).

Exit status: 0 after a clean shutdown, 1 when enrollment was refused, 78 on invalid
configuration or unusable credentials. Lost connections are never fatal: the agent reconnects
with capped exponential backoff and jitter.";

impl Cli {
    fn overrides(&self) -> Vec<(String, String)> {
        tapgraph::config::flag_overrides(&[
            ("controller", &self.controller),
            ("server_name", &self.server_name),
            ("state_dir", &self.state_dir),
            ("tls.cert", &self.tls_cert),
            ("tls.key", &self.tls_key),
            ("tls.ca", &self.tls_ca),
            ("enroll.token", &self.token),
            ("enroll.ca_fingerprint", &self.ca_fingerprint),
            ("enroll.name", &self.name),
            ("log.format", &self.log_format),
            ("log.level", &self.log_level),
            ("snapshot.scope", &self.scope),
        ])
    }
}

fn main() -> ExitCode {
    // Built with the whole workspace, this binary's rustls also has ring (the controller's neo4rs
    // turns it on), and a configuration built without naming a provider needs a default.
    tapgraph::tls::install_default_provider();
    let cli = Cli::parse();
    if let Some(Command::Snapshot {
        repeat,
        json,
        quiet,
        reader,
        no_tcp_info,
    }) = cli.command
    {
        let scope = match cli.scope.as_deref().unwrap_or("own").parse() {
            Ok(scope) => scope,
            Err(e) => {
                eprintln!("{PROGRAM}: --scope: {e}");
                return ExitCode::from(tapgraph::config::EX_CONFIG as u8);
            }
        };
        return print_snapshot(scope, reader, !no_tcp_info, repeat, json, quiet);
    }
    if let Some(Command::Interfaces { json }) = cli.command {
        let listing = host::Listing::read();
        let text = if json {
            format!("{:#}\n", listing.to_json())
        } else {
            listing.table()
        };
        // A reader that stops early (`| head`) is no error; `print!` would panic on it.
        return match std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                eprintln!("{PROGRAM}: {e}");
                ExitCode::FAILURE
            }
            _ => ExitCode::SUCCESS,
        };
    }
    let purpose = match cli.command {
        Some(Command::Enroll) => Purpose::Enroll,
        Some(Command::Run | Command::Snapshot { .. } | Command::Interfaces { .. }) | None => {
            Purpose::Run
        }
    };
    let sources = Sources::from_process(cli.config.clone(), cli.overrides());
    let config = match config_or_exit(PROGRAM, AgentConfig::load(&sources, purpose)) {
        Ok(c) => c,
        Err(code) => return code,
    };
    tapgraph::logging::init(config.log_format, &config.log_filter);
    tapgraph::runtime::set_realtime(config.capture_realtime);
    // One worker thread: the agent must stay light on the host it watches, and with the capture on
    // its own thread a second worker only added cross-thread wake-ups (agent CPU at 10 kpps of
    // mirroring 8.5% -> 5.2%, bench/mirror.sh).
    let runtime = match daemon_runtime(PROGRAM, Some(1)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        match purpose {
            Purpose::Enroll => enroll_once(&config).await,
            Purpose::Run => run(config).await,
        }
    })
}

/// `tapgraph-agent snapshot`: one or more reads of the connection table, printed.
fn print_snapshot(
    scope: snapshot::Scope,
    reader: snapshot::Reader,
    tcp_info: bool,
    repeat: u32,
    json: bool,
    quiet: bool,
) -> ExitCode {
    let mut snapshotter =
        snapshot::Snapshotter::with_scope("/proc".into(), None, scope).with_reader(reader);
    if !tcp_info {
        snapshotter = snapshotter.without_tcp_info();
    }
    let mut last = None;
    // The traffic increments a report would send: part of what a snapshot costs.
    let mut accountant = traffic::Accountant::default();
    for i in 1..=repeat.max(1) {
        let started = std::time::Instant::now();
        let cpu_before = cpu_ms();
        match snapshotter.take() {
            Ok(mut table) => {
                let measured = table.sockets.len();
                let moved = accountant
                    .account(
                        std::mem::take(&mut table.sockets),
                        Vec::new(),
                        &table.listeners,
                        snapshotter.translations(),
                    )
                    .len();
                let took = started.elapsed();
                eprintln!(
                    "read {i}: {:.1} ms (cpu {:.1} ms), {} sockets, {} rows, {} listeners, {} bad lines, {} unattributed, {measured} with tcp_info, {moved} flows moved",
                    took.as_secs_f64() * 1e3,
                    cpu_ms() - cpu_before,
                    table.stats.sockets_read,
                    table.entries.len(),
                    table.listeners.len(),
                    table.stats.bad_lines,
                    table.stats.unattributed
                );
                last = Some(table);
            }
            Err(error) => {
                eprintln!("tapgraph-agent: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    // CPU time of all reads and the peak resident set, for the benchmark's side-by-side table.
    {
        let hwm = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .map(|v| v.trim().trim_end_matches("kB").trim().to_string())
            })
            .unwrap_or_default();
        eprintln!(
            "cpu: {:.1} ms (user+sys, {} reads), peak RSS {hwm} kB",
            cpu_ms(),
            repeat.max(1)
        );
    }
    let Some(table) = last.filter(|_| !quiet) else {
        return ExitCode::SUCCESS;
    };
    let name = |p: &snapshot::ProcessKey| {
        if p.name.is_empty() {
            "-".to_string()
        } else {
            p.name.clone()
        }
    };
    // Scope `all` only: where a row lives, as ` [netns container]`.
    let place = |netns: &str, p: &snapshot::ProcessKey| match (netns, p.container.as_str()) {
        ("", "") => String::new(),
        (ns, "") => format!(" [{ns}]"),
        ("", c) => format!(" [{c}]"),
        (ns, c) => format!(" [{ns} {c}]"),
    };
    for (l, pid) in &table.listeners {
        if json {
            let row = serde_json::json!({
                "netns": l.netns,
                "listen": l.ip.to_string(),
                "port": l.port,
                "protocol": format!("{:?}", l.protocol),
                "process": name(&l.process),
                "container": l.process.container,
                "pid": pid,
            });
            println!("{row}");
        } else {
            println!(
                "LISTEN  {:?} {}:{}  {} ({pid}){}",
                l.protocol,
                l.ip,
                l.port,
                name(&l.process),
                place(&l.netns, &l.process)
            );
        }
    }
    for (k, v) in &table.entries {
        if json {
            let row = serde_json::json!({
                "netns": k.netns,
                "direction": format!("{:?}", k.direction),
                "local": k.local_ip.to_string(),
                "remote": k.remote_ip.to_string(),
                "port": k.server_port,
                "protocol": format!("{:?}", k.protocol),
                "process": name(&k.process),
                "container": k.process.container,
                "sockets": v.sockets,
            });
            println!("{row}");
        } else {
            println!(
                "{:?}  {:?} {} -> {} port {}  {}  x{}{}",
                k.direction,
                k.protocol,
                k.local_ip,
                k.remote_ip,
                k.server_port,
                name(&k.process),
                v.sockets,
                place(&k.netns, &k.process)
            );
        }
    }
    ExitCode::SUCCESS
}

/// CPU time (user + system) this process has used, in ms.
fn cpu_ms() -> f64 {
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map_or(0.0, |u| ms(u.user_time()) + ms(u.system_time()))
}

fn params(config: &AgentConfig) -> Option<EnrollParams> {
    config.enroll.as_ref().map(|e| EnrollParams {
        controller: config.controller.clone(),
        token: e.token.clone(),
        fingerprint: e.fingerprint.clone(),
        name: e.name.clone(),
        connect_timeout: config.connect_timeout,
    })
}

/// `tapgraph-agent enroll`: one attempt, the outcome printed.
async fn enroll_once(config: &AgentConfig) -> ExitCode {
    let Some(params) = params(config) else {
        eprintln!("tapgraph-agent: enroll needs --token and --ca-fingerprint");
        return ExitCode::from(EX_CONFIG as u8);
    };
    match enroll::enroll(&params, &config.tls).await {
        Ok(done) => {
            println!("Enrolled as agent {}", done.agent_id);
            println!(
                "  certificate: {} (valid until {})",
                config.tls.cert.display(),
                tapgraph::time::rfc3339(done.not_after)
            );
            println!(
                "  key:         {} (mode 0600, made on this host)",
                config.tls.key.display()
            );
            if !done.labels.is_empty() {
                let labels: Vec<String> = done
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!(
                    "  labels:      {}",
                    tapgraph::text::escape(&labels.join(","))
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            // The error may quote the controller's words: no control character reaches the terminal.
            eprintln!(
                "tapgraph-agent: {}",
                tapgraph::text::escape(&error.to_string())
            );
            ExitCode::FAILURE
        }
    }
}

/// The daemon: enroll if needed (retrying while the controller is unreachable), then run sessions.
async fn run(config: AgentConfig) -> ExitCode {
    let stop = CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        let signal = shutdown_signal().await;
        tracing::info!(signal, "shutting down");
        signal_stop.cancel();
    });
    if let Credentials::Enroll(why) = &config.credentials {
        let Some(params) = params(&config) else {
            return ExitCode::from(EX_CONFIG as u8);
        };
        tracing::info!(reason = %why, controller = %config.controller, "enrolling with the configured join token");
        let mut backoff = config.backoff.start();
        loop {
            let attempt = tokio::select! {
                r = enroll::enroll(&params, &config.tls) => r,
                () = stop.cancelled() => return ExitCode::SUCCESS,
            };
            match attempt {
                Ok(done) => {
                    tracing::info!(agent = %done.agent_id, labels = ?done.labels, "enrolled");
                    break;
                }
                Err(error) if error.permanent => {
                    tracing::error!(%error, "enrollment refused; fix the token or fingerprint and restart");
                    return ExitCode::FAILURE;
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%error, retry_in = ?delay, "enrollment failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = stop.cancelled() => return ExitCode::SUCCESS,
                    }
                }
            }
        }
    }
    let mut tasks = Tasks::default();
    let deadline = config.shutdown_timeout;
    tracing::info!(controller = %config.controller, version = tapgraph::VERSION, "agent starting");
    let metrics = Arc::new(metrics::Metrics::default());
    if let Some(addr) = config.metrics_listen {
        tasks.spawn(
            "metrics",
            metrics::serve(addr, metrics.clone(), stop.clone()),
        );
    }
    tasks.spawn("session", session::run(config, metrics, stop.clone()));
    stop.cancelled().await;
    tasks.drain(deadline).await;
    tracing::info!("agent stopped");
    ExitCode::SUCCESS
}
