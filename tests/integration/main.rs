//! End-to-end tests with the real binaries. Build them first: `cargo build --workspace --bins`
//! (`scripts/test` does it).

mod bpf_process;
mod console;
mod console_browser;
mod controller_list;
mod demo;
mod enrollment;
mod fleet;
mod harness;
mod health;
mod history;
mod http_flood;
mod http_hardening;
mod identity;
mod map_guard;
mod mirror;
mod mirror_burst;
mod mirror_direct;
mod mirror_limits;
mod mirror_rate;
mod mirror_targets;
mod nat;
mod neo4j;
mod neo4j_bench;
mod neo4j_freshness;
mod neo4j_readme;
mod operator_tools;
mod policy;
mod replicas;
mod session;
mod topology;
mod topology_snapshots;
mod traffic;
