//! End-to-end tests with the real binaries. Build them first: `cargo build --workspace --bins`
//! (`scripts/test` does it).

mod console;
mod console_browser;
mod demo;
mod enrollment;
mod fleet;
mod harness;
mod health;
mod http_hardening;
mod identity;
mod map_guard;
mod mirror;
mod mirror_limits;
mod neo4j;
mod operator_tools;
mod policy;
mod session;
mod topology;
