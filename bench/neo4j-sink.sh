#!/usr/bin/env bash
# Neo4j sink benchmark (issue 6): 100,000 CONNECTS_TO edges among 2,020 nodes written by the
# controller's sink into a real Bolt server (ArcadeDB, scripts/bolt-server), side by side with the
# naive way (one auto-committed MERGE per edge) on the same server in the same run.
#
#   bench/neo4j-sink.sh
#
# Prints a markdown table: edges, seconds and edges/s of both, and the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps
cargo build --release --locked --workspace --bins >/dev/null
TAPGRAPH_BIN_DIR="$PWD/target/release" cargo test --release --locked --test integration \
  bench_neo4j_sink_against_one_statement_per_edge -- --ignored --nocapture 2>&1 \
  | sed -n "/^| writer/,/^ratio/p"
