//! tapgraphctl: the operator's command line.

#![forbid(unsafe_code)]

mod agent;
mod client;
mod console;
mod graph;
mod mirror;
mod policy;
mod table;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tapgraph::proto;
use tapgraph::text::Escaped;

use crate::client::CtlConfig;

/// Steer a tapgraph fleet: join tokens, agents, policies, live events and the dependency map.
///
/// tapgraphctl talks to the controller's AdminService over mTLS with an operator certificate. Get
/// a config file on the controller host with `tapgraph-controller operator issue NAME`.
#[derive(Parser, Debug)]
#[command(name = "tapgraphctl", version = tapgraph::VERSION, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// tapgraphctl config file [env: TAPGRAPHCTL_CONFIG, default ~/.config/tapgraph/tapgraphctl.toml].
    #[arg(long, value_name = "FILE", global = true, env = "TAPGRAPHCTL_CONFIG")]
    config: Option<PathBuf>,
    /// Controller address, overriding the config file.
    #[arg(
        long,
        value_name = "HOST:PORT",
        global = true,
        env = "TAPGRAPHCTL_CONTROLLER"
    )]
    controller: Option<String>,
    /// Name the controller certificate must carry, overriding the config file.
    #[arg(long, value_name = "NAME", global = true)]
    server_name: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

const EXIT_CODES: &str = "\
Exit status:
  0  success
  1  the controller refused the request (its gRPC status and message are printed)
  2  usage error, or a value refused here (bad filter, unit, target, label): nothing was sent
  3  no usable config, or the controller cannot be reached
  4  policy status --wait: an agent refused the policy
  5  policy status --wait: timed out with agents still pending

Config: the file from `tapgraph-controller operator issue` holds the controller address and the
operator's certificate; TAPGRAPHCTL_CONFIG names it, TAPGRAPHCTL_CONTROLLER or --controller
override its address.";

#[derive(Subcommand, Debug)]
enum Command {
    /// Join tokens that let agents enroll.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled and connected agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Policies: what agents capture, how fast, where it goes, how often they report.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// The dependency map: who connects to whom, orphans, clusters, exports.
    Graph(graph::GraphArgs),
    /// One host of the map.
    #[command(subcommand)]
    Host(HostCommand),
    /// The virtual TAP: each agent's capture and what became of its packets at each target.
    Mirror(mirror::MirrorArgs),
    /// The web console's access tokens.
    #[command(subcommand)]
    Console(console::ConsoleCommand),
    /// Follow live events: agent connects and disconnects, policy rollouts, acks and refusals,
    /// label changes, revocations. Runs until interrupted, or until --count events.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Print a shell completion script, e.g. `tapgraphctl completion bash > /etc/bash_completion.d/tapgraphctl`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum HostCommand {
    /// What the host depends on (outbound) and what depends on it (inbound), with processes and ports.
    Show { name: String },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a join token; prints it (once) with the CA fingerprint agents pin.
    #[command(
        after_help = "Example:\n  tapgraphctl token create --ttl 1h --uses 50 --label role=web --label env=prod"
    )]
    Create {
        /// How long the token can be used, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Label given to every agent enrolled with it, key=value; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = tapgraph::labels::parse_pair)]
        labels: Vec<(String, String)>,
        /// A note for `token list`.
        #[arg(long, default_value = "")]
        description: String,
        /// Let the host that enrolls with this token (one use) take over this agent id with its new
        /// key, e.g. after a reinstall lost the agent's key. Without it, such a host gets a new id.
        #[arg(long, value_name = "AGENT_ID")]
        replaces: Option<String>,
    },
    /// List tokens: id, expiry, uses left, labels, state. Secrets are never shown again.
    List,
    /// Revoke a token: no further enrollment with it. Agents already enrolled keep working.
    Revoke {
        /// Token id (the middle part of tgj.<id>.<secret>, as `token list` shows).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// List agents with state, the controller replica each is connected to, labels and last seen.
    List {
        /// Only agents with these labels, e.g. role=web,env=prod.
        #[arg(long, value_name = "K=V,...", value_parser = tapgraph::labels::parse_selector)]
        selector: Option<BTreeMap<String, String>>,
    },
    /// Everything known about one agent.
    Show { id: String },
    /// Revoke an agent: its live streams close within a second and its certificate is refused
    /// from then on, across controller restarts.
    Revoke { id: String },
    /// Set or remove labels; the agent's policy follows at once if its labels change which applies.
    #[command(
        after_help = "Example:\n  tapgraphctl agent label web-17 role=web env=prod --remove canary"
    )]
    Label {
        id: String,
        /// Labels to set, key=value.
        #[arg(value_name = "KEY=VALUE", value_parser = tapgraph::labels::parse_pair)]
        set: Vec<(String, String)>,
        /// Label keys to remove; repeatable.
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
}

/// A failure with its exit status.
pub(crate) struct Failure(pub(crate) u8, pub(crate) anyhow::Error);

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure(1, anyhow!("{:?}: {}", s.code(), s.message()))
    }
}

fn main() -> ExitCode {
    // Built with the whole workspace, this binary's rustls also has ring (the controller's neo4rs
    // turns it on), and a configuration built without naming a provider needs a default.
    tapgraph::tls::install_default_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tapgraphctl: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, error)) => {
            // The controller's message may quote what an agent sent.
            let text = format!("{error:#}");
            eprintln!("tapgraphctl: {}", tapgraph::text::escape(&text));
            ExitCode::from(code)
        }
    }
}

pub(crate) fn ns_time(ns: u64) -> String {
    if ns == 0 {
        return "-".into();
    }
    tapgraph::time::rfc3339(tapgraph::time::from_unix_nanos(ns))
}

pub(crate) fn labels_text<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> String {
    let mut v: Vec<String> = labels
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    v.sort();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

fn token_state(t: &proto::TokenInfo) -> &'static str {
    if t.revoked {
        "revoked"
    } else if t.expires_at_unix_nanos <= tapgraph::time::unix_nanos() {
        "expired"
    } else if t.uses_left == 0 {
        "used up"
    } else {
        "active"
    }
}

pub(crate) fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Completion { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "tapgraphctl", &mut std::io::stdout());
        return Ok(());
    }
    let path = cli
        .config
        .clone()
        .unwrap_or_else(client::default_config_path);
    let config = CtlConfig::load(&path, cli.controller.clone(), cli.server_name.clone())
        .map_err(|e| Failure(3, e))?;
    let mut admin = config.admin().await.map_err(|e| Failure(3, e))?;
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Token(TokenCommand::Create {
            ttl,
            uses,
            labels,
            description,
            replaces,
        }) => {
            let ttl = tapgraph::units::parse_duration(&ttl)
                .map_err(|e| Failure(2, anyhow!("--ttl: {e}")))?;
            let created = admin
                .create_token(proto::CreateTokenRequest {
                    ttl_ms: ttl.as_millis() as u64,
                    uses,
                    labels: labels.into_iter().collect(),
                    description,
                    replaces: replaces.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let info = created.info.unwrap_or_default();
            if json {
                print_json(&json!({
                    "token": created.token,
                    "id": info.id,
                    "ca_fingerprint": created.ca_fingerprint,
                    "expires_at": ns_time(info.expires_at_unix_nanos),
                    "uses": info.uses_left,
                    "labels": info.labels,
                    "replaces": info.replaces,
                }));
            } else {
                println!(
                    "Join token (shown once; the controller keeps only its hash):\n  {}",
                    created.token
                );
                println!("CA fingerprint (SHA-256):\n  {}", created.ca_fingerprint);
                println!(
                    "Valid until {} for {} enrollment(s); labels {}",
                    ns_time(info.expires_at_unix_nanos),
                    info.uses_left,
                    labels_text(&info.labels)
                );
                if !info.replaces.is_empty() {
                    println!(
                        "The host enrolling with it becomes agent {} (its previous key no longer claims the id)",
                        info.replaces
                    );
                }
                println!(
                    "Enroll an agent:\n  tapgraph-agent enroll --controller {} --token {} --ca-fingerprint {}",
                    config.controller, created.token, created.ca_fingerprint
                );
            }
        }
        Command::Token(TokenCommand::List) => {
            let tokens = admin
                .list_tokens(proto::ListTokensRequest {})
                .await?
                .into_inner()
                .tokens;
            if json {
                print_json(&json!(tokens.iter().map(|t| json!({
                    "id": t.id, "expires_at": ns_time(t.expires_at_unix_nanos), "uses_left": t.uses_left,
                    "labels": t.labels, "state": token_state(t), "description": t.description,
                    "replaces": t.replaces,
                })).collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            token_state(t).into(),
                            ns_time(t.expires_at_unix_nanos),
                            t.uses_left.to_string(),
                            labels_text(&t.labels),
                            t.replaces.clone(),
                            t.description.clone(),
                        ]
                    })
                    .collect();
                table::print(
                    &[
                        "ID",
                        "STATE",
                        "EXPIRES",
                        "USES LEFT",
                        "LABELS",
                        "REPLACES",
                        "DESCRIPTION",
                    ],
                    &rows,
                );
            }
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            admin
                .revoke_token(proto::RevokeTokenRequest { id: id.clone() })
                .await?;
            if !json {
                println!("token {id} revoked: no agent can enroll with it any more");
            }
        }
        Command::Agent(AgentCommand::List { selector }) => {
            let agents = admin
                .list_agents(proto::ListAgentsRequest {
                    selector: selector.unwrap_or_default().into_iter().collect(),
                })
                .await?
                .into_inner()
                .agents;
            if json {
                print_json(&json!(agents.iter().map(agent::json).collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = agents.iter().map(agent::row).collect();
                table::print(agent::HEADERS, &rows);
            }
        }
        Command::Agent(AgentCommand::Show { id }) => {
            let a = admin
                .get_agent(proto::GetAgentRequest { id })
                .await?
                .into_inner();
            if json {
                print_json(&agent::json(&a));
            } else {
                table::fields(&agent::fields(&a));
            }
        }
        Command::Policy(command) => policy::run(&mut admin, command, json).await?,
        Command::Graph(args) => graph::run(&mut admin, args, json).await?,
        Command::Mirror(args) => mirror::run(&mut admin, args, json).await?,
        Command::Console(command) => console::run(&mut admin, command, json).await?,
        Command::Host(HostCommand::Show { name }) => {
            graph::show_host(&mut admin, &name, json).await?
        }
        Command::Events { count } => {
            let mut stream = admin
                .watch_events(proto::WatchEventsRequest {})
                .await?
                .into_inner();
            let mut seen = 0;
            while count.is_none_or(|c| seen < c) {
                let Some(e) = stream.message().await? else {
                    return Err(Failure(
                        3,
                        anyhow!("the controller closed the event stream"),
                    ));
                };
                seen += 1;
                if json {
                    println!(
                        "{}",
                        json!({"at": ns_time(e.at_unix_nanos), "kind": e.kind, "agent": e.agent_id, "message": e.message, "fields": e.fields})
                    );
                } else {
                    println!(
                        "{}  {:<15} {}",
                        ns_time(e.at_unix_nanos),
                        Escaped(&e.kind),
                        Escaped(&e.message)
                    );
                }
                use std::io::Write;
                let _ = std::io::stdout().flush();
            }
        }
        Command::Completion { .. } => {}
        Command::Agent(AgentCommand::Label { id, set, remove }) => {
            let a = admin
                .label_agent(proto::LabelAgentRequest {
                    id,
                    set: set.into_iter().collect(),
                    remove,
                })
                .await?
                .into_inner();
            if json {
                print_json(&agent::json(&a));
            } else {
                println!(
                    "agent {} labels: {}",
                    Escaped(&a.id),
                    Escaped(&labels_text(&a.labels))
                );
            }
        }
        Command::Agent(AgentCommand::Revoke { id }) => {
            admin
                .revoke_agent(proto::RevokeAgentRequest { id: id.clone() })
                .await?;
            if !json {
                println!(
                    "agent {id} revoked: its streams are closed and its certificate is refused"
                );
            }
        }
    }
    Ok(())
}
