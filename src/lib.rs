//! What the tapgraph controller, agent and ctl share: the wire protocol, identity and TLS, units,
//! layered configuration, backoff, policy validation and process plumbing.

// No FFI here: the agent's and the controller's few `unsafe` calls live in their own crates.
#![forbid(unsafe_code)]
// Only the programs write to stdout; the library reports through `tracing` and returned errors.
#![warn(clippy::print_stdout)]

pub mod backoff;
pub mod bpf;
pub mod codec;
pub mod config;
pub mod delay;
pub mod exposition;
pub mod fsutil;
pub mod graph;
pub mod history;
pub mod identity;
pub mod labels;
pub mod logging;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod proto;
pub mod runtime;
pub mod text;
pub mod time;
pub mod tls;
pub mod transport;
pub mod units;

/// The version every binary reports, in `Hello` and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Formats an error with its whole source chain on one line: `outer: middle: root cause`.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}
