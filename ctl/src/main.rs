//! tapgraphctl: the operator's command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// Steer a tapgraph fleet.
#[derive(Parser, Debug)]
#[command(name = "tapgraphctl", version = tapgraph::VERSION, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const EXIT_CODES: &str = "\
Exit status: 0 on success, 1 when the command failed (the reason is printed), 2 on a usage error.";

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a development PKI: a CA, a controller certificate, agent and operator certificates.
    ///
    /// For trying tapgraph on one machine or in tests. Production fleets enroll agents with join
    /// tokens instead. Keys are written with mode 0600.
    #[command(after_help = "\
Files written in DIR:
  ca.pem, ca.key                 the CA (keep ca.key private)
  controller.pem, controller.key the controller's serving certificate
  agent-ID.pem, agent-ID.key     one per --agent
  operator-NAME.pem/.key         for tapgraphctl

Example:
  tapgraphctl dev-certs ./certs --agent web-1 --agent db-1 --name controller.lan")]
    DevCerts {
        /// Directory to write into (created if missing).
        dir: PathBuf,
        /// DNS name or IP the controller is reached by; repeatable. Always includes localhost,
        /// 127.0.0.1 and ::1.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Agent id to issue a certificate for; repeatable [default: local].
        #[arg(long = "agent", value_name = "ID")]
        agents: Vec<String>,
        /// Operator name for the tapgraphctl certificate.
        #[arg(long, value_name = "NAME", default_value = "admin")]
        operator: String,
        /// Certificate lifetime in days.
        #[arg(long, value_name = "DAYS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
        /// Overwrite an existing CA in DIR (every certificate it signed stops working).
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tapgraphctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::DevCerts {
            dir,
            names,
            agents,
            operator,
            days,
            force,
        } => {
            if dir.join("ca.pem").exists() && !force {
                bail!(
                    "{} already holds a CA (ca.pem); pass --force to replace it and every certificate it signed",
                    dir.display()
                );
            }
            let mut server_names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
            for n in names {
                if !server_names.contains(&n) {
                    server_names.push(n);
                }
            }
            let agents = if agents.is_empty() {
                vec!["local".to_string()]
            } else {
                agents
            };
            let made = tapgraph::pki::write_dev_certs(
                &dir,
                &server_names,
                &agents,
                &operator,
                Duration::from_secs(days * 86_400),
            )
            .context("cannot make development certificates")?;
            println!("Development PKI written to {}", made.dir.display());
            println!("  CA fingerprint (SHA-256): {}", made.fingerprint);
            println!(
                "  controller: controller.pem/.key, valid for {}",
                server_names.join(", ")
            );
            for id in &made.agents {
                println!("  agent {id}: agent-{id}.pem/.key");
            }
            println!(
                "  operator {}: operator-{}.pem/.key",
                made.operator, made.operator
            );
            Ok(())
        }
    }
}
