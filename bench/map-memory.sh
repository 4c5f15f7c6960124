#!/usr/bin/env bash
# The map's memory (issue 19, item 4): a release controller on loopback gets one agent's
# ROWS-row table, then FIVE more agents' (tapgraph-loadgen: real enrollment, real mTLS sessions,
# a full snapshot then deltas), and its RSS is read at each step.
#
#   bench/map-memory.sh                       # ROWS=90000, FIVE=5, HOLD=25s, IDLE_S=30
#   BIN=/tmp/old/bin bench/map-memory.sh      # another build's binaries (e.g. before a change)
#   MAX_ROWS=300000 bench/map-memory.sh       # with a smaller fleet budget (topology.max_rows)
#   SPREAD=1 bench/map-memory.sh              # every row to a far end of its own: an edge per row
#
# Prints one line per step: RSS idle; the highest RSS while one agent sends its table, and once it
# has gone; the highest while FIVE agents send theirs; RSS IDLE_S seconds after they stopped; and
# the map's rows and refusals (from /api/v1/topology/stats).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

ROWS=${ROWS:-90000}
FIVE=${FIVE:-5}
HOLD=${HOLD:-25s}
IDLE_S=${IDLE_S:-30}
MAX_ROWS=${MAX_ROWS:-}
SPREAD=${SPREAD:-0}

for tool in python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench/map-memory.sh: $tool is missing" >&2; exit 1; }
done
if [ -z "${BIN:-}" ]; then
  echo "bench/map-memory.sh: building release binaries..." >&2
  cargo build --release --locked -p tapgraph-controller -p tapgraph-loadgen -p tapgraph-ctl >/dev/null
  BIN=$PWD/target/release
fi

work=$(mktemp -d /tmp/tapgraph-map-memory.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_mb() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
# The highest RSS of process $1 while process $2 runs.
peak_while() {
  local peak=0 now
  while kill -0 "$2" 2>/dev/null; do
    now=$(rss_mb "$1"); [ "$now" -gt "$peak" ] && peak=$now
    sleep 0.2
  done
  echo "$peak"
}

grpc=$(free_port); http=$(free_port)
budget=()
spread=()
[ "$SPREAD" = 1 ] && spread=(--spread)
[ -n "$MAX_ROWS" ] && budget=(TAPGRAPH_TOPOLOGY__MAX_ROWS="$MAX_ROWS")
env TAPGRAPH_ENROLLMENT__RATE=1000 TAPGRAPH_ENROLLMENT__BURST=1000 TAPGRAPH_LOG__LEVEL=warn \
  "${budget[@]}" "$BIN/tapgraph-controller" --state-dir "$work/controller" \
  --listen "127.0.0.1:$grpc" --http-listen "127.0.0.1:$http" >"$work/controller.log" 2>&1 &
ctl_pid=$!; pids+=($ctl_pid)
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$http/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN/tapgraph-controller" operator issue bench --state-dir "$work/controller" \
  --listen "127.0.0.1:$grpc" --out "$work/ctl.toml" >/dev/null
export TAPGRAPHCTL_CONFIG="$work/ctl.toml"
token=$("$BIN/tapgraphctl" -o json token create --uses $((FIVE + 1)) --ttl 1h --label env=loadgen)
tok=$(printf '%s' "$token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
fp=$(printf '%s' "$token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_fingerprint"])')
sleep 3

fleet() { # PREFIX AGENTS
  "$BIN/tapgraph-loadgen" --controller "127.0.0.1:$grpc" --server-name 127.0.0.1 --token "$tok" \
    --ca-fingerprint "$fp" --prefix "$1" --agents "$2" --entries "$ROWS" --duration "$HOLD" \
    "${spread[@]}" --json >"$work/report-$1.json" 2>"$work/loadgen-$1.err" &
  local gen=$!
  peak_while "$ctl_pid" "$gen"
  wait "$gen" || echo "bench/map-memory.sh: loadgen failed: $(tail -c 300 "$work/loadgen-$1.err")" >&2
}
stats() {
  curl -fs "http://127.0.0.1:$http/api/v1/topology/stats" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print("applied", s["snapshots_applied"], "refused (budget)", s.get("snapshots_refused_budget", "-"), "rows held", s.get("rows", "-"))'
}

echo "idle:                          $(rss_mb "$ctl_pid") MB"
peak=$(fleet one 1)
sleep 2
echo "one agent of $ROWS rows: peak $peak MB, after $(rss_mb "$ctl_pid") MB; $(stats)"
peak=$(fleet five "$FIVE")
echo "$FIVE more agents:              peak $peak MB; $(stats)"
sleep "$IDLE_S"
echo "idle ${IDLE_S} s after:               $(rss_mb "$ctl_pid") MB"
