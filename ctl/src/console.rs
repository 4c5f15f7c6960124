//! `tapgraphctl console …`: access tokens for the web console, which asks for one when the
//! controller's HTTP listener is reachable beyond loopback.

use anyhow::anyhow;
use clap::Subcommand;
use serde_json::json;
use tapgraph::proto::{self, admin_service_client::AdminServiceClient};
use tonic::transport::Channel;

use crate::{Failure, ns_time, print_json, table};

#[derive(Subcommand, Debug)]
pub enum ConsoleCommand {
    /// Issue an access token and print the console address that logs a browser in with it (the
    /// token then lives in a cookie, not in the address bar).
    #[command(
        after_help = "Example:\n  tapgraphctl console token --ttl 8h --description 'war room'\n  curl -H \"Authorization: Bearer $TOKEN\" http://CONTROLLER:7080/api/v1/graph"
    )]
    Token {
        /// How long it lets a browser in, 1m to 30d.
        #[arg(long, default_value = "12h")]
        ttl: String,
        /// A note for `console tokens`.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List unexpired console tokens (their secrets are never shown again).
    Tokens,
    /// Revoke a console token: browsers using it are refused from the next request.
    Revoke {
        /// Token id (the middle part of tgc.<id>.<secret>, as `console tokens` shows).
        id: String,
    },
}

pub async fn run(
    admin: &mut AdminServiceClient<Channel>,
    command: ConsoleCommand,
    json_out: bool,
) -> Result<(), Failure> {
    match command {
        ConsoleCommand::Token { ttl, description } => {
            let ttl = tapgraph::units::parse_duration(&ttl)
                .map_err(|e| Failure(2, anyhow!("--ttl: {e}")))?;
            let created = admin
                .create_console_token(proto::CreateConsoleTokenRequest {
                    ttl_ms: ttl.as_millis() as u64,
                    description,
                })
                .await?
                .into_inner();
            if json_out {
                print_json(&json!({
                    "id": created.id,
                    "token": created.token,
                    "url": created.url,
                    "expires_at": ns_time(created.expires_at_unix_nanos),
                    "required": created.required,
                }));
            } else {
                println!(
                    "Console token (shown once; the controller keeps only its hash):\n  {}",
                    created.token
                );
                println!("Open in a browser:\n  {}", created.url);
                println!(
                    "Valid until {}. Scripts: Authorization: Bearer TOKEN.",
                    ns_time(created.expires_at_unix_nanos)
                );
                if !created.required {
                    println!(
                        "(This controller's console listens on loopback and asks for no token; set console.auth = \"token\" to require one.)"
                    );
                }
            }
        }
        ConsoleCommand::Tokens => {
            let tokens = admin
                .list_console_tokens(proto::ListConsoleTokensRequest {})
                .await?
                .into_inner()
                .tokens;
            if json_out {
                print_json(&json!(tokens.iter().map(|t| json!({
                    "id": t.id, "created_by": t.created_by, "created_at": ns_time(t.created_at_unix_nanos),
                    "expires_at": ns_time(t.expires_at_unix_nanos), "description": t.description,
                })).collect::<Vec<_>>()));
            } else {
                let rows: Vec<Vec<String>> = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.created_by.clone(),
                            ns_time(t.created_at_unix_nanos),
                            ns_time(t.expires_at_unix_nanos),
                            t.description.clone(),
                        ]
                    })
                    .collect();
                table::print(
                    &["ID", "CREATED BY", "CREATED", "EXPIRES", "DESCRIPTION"],
                    &rows,
                );
            }
        }
        ConsoleCommand::Revoke { id } => {
            admin
                .revoke_console_token(proto::RevokeConsoleTokenRequest { id: id.clone() })
                .await?;
            if !json_out {
                println!("console token {id} revoked");
            }
        }
    }
    Ok(())
}
