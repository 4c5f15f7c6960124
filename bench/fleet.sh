#!/usr/bin/env bash
# Fleet scale (issue 11): N simulated agents (tapgraph-loadgen: real enrollment, real mTLS sessions,
# snapshots from a synthetic data centre, control records) against one release controller on
# loopback. The controller is pinned to CPU 1, the simulator to CPU 0: the controller has one core.
#
#   bench/fleet.sh                      # SIZES="1000 5000", ENTRIES=200, INTERVAL=15s, HOLD=60s
#   SIZES=2000 ROLLOUTS=20 bench/fleet.sh
#   NEO4J=1 bench/fleet.sh              # also mirror the map into a Bolt server (scripts/bolt-server)
#
# For each N it reports: time for the whole fleet to enroll and connect (and connect p99), controller
# CPU (share of one core) and RSS in steady state (the last STEADY_S of the hold), RSS per agent
# above the idle controller, policy rollouts (tapgraphctl policy set → each agent has the version)
# p50/p99 over ROLLOUTS, snapshots applied per second and the rows they carried, snapshots shed, the
# simulator's own CPU (when it nears 100% it, not the controller, is the limit), and with NEO4J=1
# the sink's largest delay (how long a change waited for the database) and its rows and errors. Enrollment is limited to ENROLL_RATE/s here (the default 100/s
# paces a fleet on purpose; this measures the controller, not the limit).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

SIZES=${SIZES:-"1000 5000"}
ENTRIES=${ENTRIES:-200}
INTERVAL=${INTERVAL:-15s}
HEARTBEAT=${HEARTBEAT:-5s}
HOLD=${HOLD:-60s}
STEADY_S=${STEADY_S:-30}
ROLLOUTS=${ROLLOUTS:-10}
RATE=${RATE:-500}
ENROLL_RATE=${ENROLL_RATE:-2000}
NEO4J=${NEO4J:-0}

for tool in taskset python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench/fleet.sh: $tool is missing" >&2; exit 1; }
done
# Each agent is a socket on both sides; the simulator and the controller need room.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge 12000 ] || echo "bench/fleet.sh: only $(ulimit -n) open files allowed; large fleets will fail" >&2

echo "bench/fleet.sh: building release binaries..." >&2
cargo build --release --locked --workspace --bins >/dev/null
bin=$PWD/target/release

work=$(mktemp -d /tmp/tapgraph-fleet.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ "$NEO4J" = 1 ] && scripts/bolt-server stop --dir "$work/bolt" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

neo4j_env=()
if [ "$NEO4J" = 1 ]; then
  bolt=$(free_port); bolt_http=$(free_port)
  scripts/bolt-server start --dir "$work/bolt" --port "$bolt" --http-port "$bolt_http" \
    --password fleet-bench --database tapgraph >/dev/null
  neo4j_env=(TAPGRAPH_GRAPH__NEO4J__URI="bolt://127.0.0.1:$bolt" TAPGRAPH_GRAPH__NEO4J__USER=root
    TAPGRAPH_GRAPH__NEO4J__PASSWORD=fleet-bench TAPGRAPH_GRAPH__NEO4J__DATABASE=tapgraph)
fi

# Samples a process's CPU (utime+stime) and RSS once a second into FILE, until it exits.
sample() {
  python3 - "$1" "$2" <<'PY' &
import os, sys, time
pid, out = sys.argv[1], sys.argv[2]
tick = os.sysconf("SC_CLK_TCK")
with open(out, "w") as f:
    while True:
        try:
            stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            rss = next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")).split()[1]
        except (OSError, StopIteration):
            break
        f.write(f"{time.time()} {(int(stat[11]) + int(stat[12])) / tick} {rss}\n"); f.flush()
        time.sleep(1)
PY
  pids+=($!)
}

echo "| agents | snapshot every | enroll + connect (s) | connect p99 (ms) | controller CPU, steady (% of a core) | controller RSS (MB) | RSS per agent (KB) | rollout p50 / p99 (ms) | snapshots applied/s (rows carried/s) | shed | simulator CPU (% of a core) | neo4j delay max (s) |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
for n in $SIZES; do
  dir="$work/n$n"; mkdir -p "$dir"
  grpc=$(free_port); http=$(free_port)
  env TAPGRAPH_POLICY__SNAPSHOT_INTERVAL="$INTERVAL" TAPGRAPH_POLICY__HEARTBEAT_INTERVAL="$HEARTBEAT" \
    TAPGRAPH_ENROLLMENT__RATE="$ENROLL_RATE" TAPGRAPH_ENROLLMENT__BURST="$ENROLL_RATE" \
    TAPGRAPH_LOG__LEVEL=warn "${neo4j_env[@]}" \
    taskset -c 1 "$bin/tapgraph-controller" --state-dir "$dir/controller" \
    --listen "127.0.0.1:$grpc" --http-listen "127.0.0.1:$http" >"$dir/controller.log" 2>&1 &
  ctl_pid=$!; pids+=($ctl_pid)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$http/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  "$bin/tapgraph-controller" operator issue bench --state-dir "$dir/controller" \
    --listen "127.0.0.1:$grpc" --out "$dir/ctl.toml" >/dev/null
  export TAPGRAPHCTL_CONFIG="$dir/ctl.toml"
  token=$("$bin/tapgraphctl" -o json token create --uses "$n" --ttl 1h --label env=loadgen)
  tok=$(printf '%s' "$token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  fp=$(printf '%s' "$token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_fingerprint"])')
  sleep 2
  idle_rss=$(awk '/VmRSS/ {print $2}' "/proc/$ctl_pid/status")
  sample "$ctl_pid" "$dir/samples"
  neo_log="$dir/neo4j"
  if [ "$NEO4J" = 1 ]; then
    ( while kill -0 "$ctl_pid" 2>/dev/null; do
        curl -fs "http://127.0.0.1:$http/api/v1/topology/stats" | python3 -c \
          'import json,sys; n=json.load(sys.stdin).get("neo4j") or {}; print(n.get("delay_seconds", 0), n.get("state", "?"), n.get("rows_written", 0), n.get("errors", 0), n.get("lag_seconds", 0))' || true
        sleep 1
      done ) >"$neo_log" 2>/dev/null &
    pids+=($!)
  fi
  curl -fs "http://127.0.0.1:$http/api/v1/topology/stats" >"$dir/stats-before.json"
  start=$(date +%s.%N)
  taskset -c 0 "$bin/tapgraph-loadgen" --controller "127.0.0.1:$grpc" --server-name 127.0.0.1 \
    --token "$tok" --ca-fingerprint "$fp" --agents "$n" --entries "$ENTRIES" --rate "$RATE" \
    --concurrency 256 --duration "$HOLD" --rollouts "$ROLLOUTS" --json \
    >"$dir/report.json" 2>"$dir/loadgen.err" &
  gen_pid=$!
  sample "$gen_pid" "$dir/gen-samples"
  wait "$gen_pid" || echo "bench/fleet.sh: loadgen failed for $n agents: $(tail -c 300 "$dir/loadgen.err")" >&2
  end=$(date +%s.%N)
  curl -fs "http://127.0.0.1:$http/api/v1/topology/stats" >"$dir/stats-after.json"
  kill "$ctl_pid" 2>/dev/null || true
  wait "$ctl_pid" 2>/dev/null || true
  python3 - "$dir" "$n" "$idle_rss" "$start" "$end" "$STEADY_S" "$NEO4J" "$INTERVAL" <<'PY'
import json, sys
d, n, idle, start, end, steady, neo, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "1", sys.argv[8]
r = json.load(open(f"{d}/report.json"))
def steady_cpu(path):
    rows = [tuple(map(float, l.split())) for l in open(path) if l.strip()]
    # Steady state: the last `steady` seconds before the simulator stopped.
    win = [x for x in rows if end - steady - 1 <= x[0] <= end - 1] or rows[-steady:]
    return (win[-1][1] - win[0][1]) / max(win[-1][0] - win[0][0], 1e-9) * 100, win
cpu, win = steady_cpu(f"{d}/samples")
gen_cpu, _ = steady_cpu(f"{d}/gen-samples")
rss = sum(x[2] for x in win) / len(win)
before, after = json.load(open(f"{d}/stats-before.json")), json.load(open(f"{d}/stats-after.json"))
applied = after["snapshots_applied"] - before["snapshots_applied"]
rows_per_s = r["snapshot_rows_sent"] / max(end - start, 1e-9)
ro = r["rollouts"]
p50 = sorted(x["p50_ms"] for x in ro)[len(ro) // 2] if ro else float("nan")
p99 = max((x["p99_ms"] for x in ro), default=float("nan"))
lag = "—"
if neo:
    samples = [l.split() for l in open(f"{d}/neo4j") if l.strip()]
    if samples:
        writing = sum(1 for x in samples if x[1] == "writing")
        lag = (f"{max(float(x[0]) for x in samples):.1f} ({samples[-1][2]} rows written, "
               f"{writing} of {len(samples)} samples writing, {samples[-1][3]} errors, "
               f"lag from failures {max(float(x[4]) for x in samples):.1f} s)")
    else:
        lag = "?"
print(f"| {n:,} | {every} | {r['ramp_seconds']:.1f} ({r['connected']:,} connected) | {r['connect_ms']['p99']:.0f} | {cpu:.1f} | {rss/1024:.1f} | {(rss - idle)/n:.1f} | {p50:.0f} / {p99:.0f} | {applied / max(end - start, 1e-9):,.0f} ({rows_per_s:,.0f}) | {after.get('snapshots_shed_busy', 0)} | {gen_cpu:.0f} | {lag} |")
if r.get("errors"):
    print(f"<!-- {n} agents: errors {r['errors']} -->")
PY
done
