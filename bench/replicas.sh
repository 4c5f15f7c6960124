#!/usr/bin/env bash
# Controller replicas on PostgreSQL (issue 21): the same simulated fleet (tapgraph-loadgen: real
# enrollment, real mTLS sessions, 200-row snapshots, control records) against
#   embedded  one controller on its embedded store (the baseline),
#   pg1       one controller on PostgreSQL,
#   pg3       three controller replicas on one PostgreSQL, the fleet spread over them,
# in one run, side by side. Every controller and PostgreSQL share CPU 1; the simulator has CPU 0.
# Then, with FAILOVER=1, a failover: three replicas hold FAILOVER_AGENTS agents, one is killed
# (SIGKILL) in the middle of the hold, and its agents reconnect to the others.
#
#   bench/replicas.sh                                    # AGENTS=2000, all modes, then the failover
#   MODES=pg3 AGENTS=1000 FAILOVER=0 bench/replicas.sh
#   INTERVAL=2s ROLLOUTS=0 REVOCATIONS=0 bench/replicas.sh   # the snapshot ingest ceiling
#
# Reported per mode: enroll + connect time, controller CPU (% of one core, per replica and summed)
# and RSS per replica in steady state (the last STEADY_S of the hold), PostgreSQL's own CPU,
# rollout p50/p99 (tapgraphctl policy set through the first replica → every agent, wherever it is
# connected), revocation p99 (tapgraphctl agent revoke through the first replica → the end of the
# agent's session on another replica), snapshots applied per second (summed over replicas) and
# shed. Failover: time from a lost session to the first policy on another replica (p50, p99, max),
# and the time until a survivor's map holds as many rows as before the kill.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

MODES=${MODES:-"embedded pg1 pg3"}
AGENTS=${AGENTS:-2000}
ENTRIES=${ENTRIES:-200}
INTERVAL=${INTERVAL:-15s}
HOLD=${HOLD:-60s}
STEADY_S=${STEADY_S:-30}
ROLLOUTS=${ROLLOUTS:-10}
REVOCATIONS=${REVOCATIONS:-20}
RATE=${RATE:-500}
FAILOVER=${FAILOVER:-1}
FAILOVER_AGENTS=${FAILOVER_AGENTS:-1000}
BUILD=${BUILD:-1}                 # 0: use the binaries in BIN (default target/release) as they are

for tool in taskset python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench/replicas.sh: $tool is missing" >&2; exit 1; }
done
scripts/pg-server bin >/dev/null || { echo "bench/replicas.sh: PostgreSQL is missing (scripts/install-deps)" >&2; exit 1; }
ulimit -n "$(ulimit -Hn)"

if [ "$BUILD" = 1 ]; then
  echo "bench/replicas.sh: building release binaries..." >&2
  cargo build --release --locked --workspace --bins >/dev/null
fi
bin=${BIN:-$PWD/target/release}

work=$(mktemp -d /tmp/tapgraph-replicas.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  scripts/pg-server stop --dir "$work/pg" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Samples the summed CPU (utime+stime) and RSS of the processes `pgrep ARGS` finds, once a second,
# into FILE, until the file STOP exists.
sample() {
  local out=$1 stop=$2; shift 2
  python3 - "$out" "$stop" "$@" <<'PY' &
import os, subprocess, sys, time
out, stop, args = sys.argv[1], sys.argv[2], sys.argv[3:]
tick = os.sysconf("SC_CLK_TCK")
with open(out, "w") as f:
    while not os.path.exists(stop):
        pids = subprocess.run(["pgrep"] + args, capture_output=True, text=True).stdout.split()
        cpu = rss = 0
        for pid in pids:
            try:
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                cpu += (int(stat[11]) + int(stat[12])) / tick
                rss += int(next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")).split()[1])
            except (OSError, StopIteration):
                pass
        f.write(f"{time.time()} {cpu} {rss}\n"); f.flush()
        time.sleep(1)
PY
  pids+=($!)
}

pg_port=$(free_port)
scripts/pg-server start --dir "$work/pg" --port "$pg_port" >/dev/null
pg_url="postgres://tapgraph@127.0.0.1:$pg_port/tapgraph?sslmode=disable"
pg_pid=$(head -1 "$work/pg/data/postmaster.pid")
taskset -a -p -c 1 "$pg_pid" >/dev/null
psql_() { "$(scripts/pg-server bin)/psql" -h 127.0.0.1 -p "$pg_port" -U tapgraph -qAt "$@"; }

# One CA for every controller: made once by a controller that stops at once.
TAPGRAPH_LOG__LEVEL=error timeout 3 "$bin/tapgraph-controller" --state-dir "$work/ca" \
  --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >/dev/null 2>&1 || true
[ -f "$work/ca/pki/ca.pem" ] || { echo "bench/replicas.sh: no CA made in $work/ca/pki" >&2; exit 1; }

# start_replicas MODE N: starts N controllers (names r1..rN) for MODE; sets grpc_addrs, http_ports.
start_replicas() {
  local mode=$1 n=$2 dir=$3 i
  grpc_addrs=(); http_ports=(); ctl_pids=()
  local store_env=()
  if [ "$mode" != embedded ]; then
    psql_ -d postgres -c "DROP DATABASE IF EXISTS bench" -c "CREATE DATABASE bench"
    store_env=(TAPGRAPH_STORE__BACKEND=postgres
      "TAPGRAPH_STORE__POSTGRES__URL=postgres://tapgraph@127.0.0.1:$pg_port/bench?sslmode=disable")
  fi
  for i in $(seq "$n"); do
    local grpc http
    grpc=$(free_port); http=$(free_port)
    env TAPGRAPH_POLICY__SNAPSHOT_INTERVAL="$INTERVAL" TAPGRAPH_POLICY__HEARTBEAT_INTERVAL=5s \
      TAPGRAPH_ENROLLMENT__RATE=2000 TAPGRAPH_ENROLLMENT__BURST=2000 TAPGRAPH_LOG__LEVEL=warn \
      TAPGRAPH_REPLICA="r$i" TAPGRAPH_PKI__CA_CERT="$work/ca/pki/ca.pem" TAPGRAPH_PKI__CA_KEY="$work/ca/pki/ca.key" \
      "${store_env[@]}" \
      taskset -c 1 "$bin/tapgraph-controller" --state-dir "$dir/r$i" \
      --listen "127.0.0.1:$grpc" --http-listen "127.0.0.1:$http" >"$dir/r$i.log" 2>&1 &
    ctl_pids+=($!); pids+=($!)
    grpc_addrs+=("127.0.0.1:$grpc"); http_ports+=("$http")
  done
  for i in $(seq 0 $((n - 1))); do
    for _ in $(seq 200); do curl -fs "http://127.0.0.1:${http_ports[$i]}/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    curl -fs "http://127.0.0.1:${http_ports[$i]}/readyz" >/dev/null || { echo "replica r$((i + 1)) not ready: $(tail -5 "$dir/r$((i + 1)).log")" >&2; exit 1; }
  done
}

# run MODE N AGENTS KILL: one fleet against N replicas; KILL=1 kills r2 in the middle of the hold.
run() {
  local mode=$1 n=$2 agents=$3 kill_one=$4
  local dir="$work/$mode-$agents-$kill_one"; mkdir -p "$dir"
  start_replicas "$mode" "$n" "$dir"
  env TAPGRAPH_PKI__CA_CERT="$work/ca/pki/ca.pem" TAPGRAPH_PKI__CA_KEY="$work/ca/pki/ca.key" \
    "$bin/tapgraph-controller" operator issue bench --state-dir "$dir/r1" \
    --listen "${grpc_addrs[0]}" --out "$dir/ctl.toml" >/dev/null
  export TAPGRAPHCTL_CONFIG="$dir/ctl.toml"
  local token tok fp controllers
  token=$("$bin/tapgraphctl" -o json token create --uses "$agents" --ttl 1h --label env=loadgen)
  tok=$(printf '%s' "$token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  fp=$(printf '%s' "$token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["ca_fingerprint"])')
  controllers=$(IFS=,; echo "${grpc_addrs[*]}")
  sleep 2
  local stop="$dir/stop"
  for i in $(seq "$n"); do sample "$dir/cpu-r$i" "$stop" -f "state-dir $dir/r$i( |\$)"; done
  sample "$dir/cpu-pg" "$stop" -u postgres
  local before
  before=$(for p in "${http_ports[@]}"; do curl -fs "http://127.0.0.1:$p/api/v1/topology/stats"; echo; done)
  local start end
  start=$(date +%s.%N)
  taskset -c 0 "$bin/tapgraph-loadgen" --controller "$controllers" --server-name 127.0.0.1 \
    --token "$tok" --ca-fingerprint "$fp" --agents "$agents" --entries "$ENTRIES" --rate "$RATE" \
    --concurrency 256 --duration "$HOLD" --rollouts "$ROLLOUTS" --revocations "$REVOCATIONS" --json \
    >"$dir/report.json" 2>"$dir/loadgen.err" &
  local gen=$!
  local map_back="—"
  if [ "$kill_one" = 1 ]; then
    # Half-way through the hold: note the map's rows on r1, kill r2, time until r1's rows are back.
    local hold_s=${HOLD%s}
    sleep "$(python3 -c "print(${hold_s} / 2 + 10)")"
    local rows0 killed_at
    rows0=$(curl -fs "http://127.0.0.1:${http_ports[0]}/api/v1/topology/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"])')
    killed_at=$(date +%s.%N)
    kill -9 "${ctl_pids[1]}"
    wait "${ctl_pids[1]}" 2>/dev/null || true
    map_back=$(python3 - "${http_ports[0]}" "$rows0" "$killed_at" <<'PY'
import json, sys, time, urllib.request
port, rows0, t0 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
# The rows dip only if the map forgets the dead replica's agents; they are back when the
# survivor holds at least as many rows as before.
deadline = t0 + 60
while time.time() < deadline:
    try:
        rows = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/topology/stats"))["rows"]
    except OSError:
        rows = -1
    if rows >= rows0:
        print(f"{time.time() - t0:.1f} s ({rows:,} rows, {rows0:,} before)")
        break
    time.sleep(0.2)
else:
    print(f"not within 60 s ({rows0:,} rows before)")
PY
)
  fi
  wait "$gen" || echo "bench/replicas.sh: loadgen failed ($mode, $agents agents): $(tail -c 300 "$dir/loadgen.err")" >&2
  end=$(date +%s.%N)
  local after
  after=$(for p in "${http_ports[@]}"; do curl -fs "http://127.0.0.1:$p/api/v1/topology/stats" || echo '{}'; echo; done)
  touch "$stop"
  for p in "${ctl_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${ctl_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  python3 - "$dir" "$mode" "$n" "$agents" "$start" "$end" "$STEADY_S" "$kill_one" "$map_back" "$before" "$after" <<'PY'
import json, sys
d, mode, n, agents, start, end, steady, killed, map_back, before, after = sys.argv[1:]
n, agents, start, end, steady = int(n), int(agents), float(start), float(end), int(steady)
r = json.load(open(f"{d}/report.json"))
def steady_of(path):
    rows = [tuple(map(float, l.split())) for l in open(path) if l.strip()]
    win = [x for x in rows if end - steady - 1 <= x[0] <= end - 1] or rows[-steady:]
    if len(win) < 2:
        return float("nan"), float("nan")
    return (win[-1][1] - win[0][1]) / max(win[-1][0] - win[0][0], 1e-9) * 100, sum(x[2] for x in win) / len(win) / 1024
cpus, rsss = zip(*(steady_of(f"{d}/cpu-r{i}") for i in range(1, n + 1)))
pg_cpu, pg_rss = steady_of(f"{d}/cpu-pg")
parse = lambda s: [json.loads(l) for l in s.splitlines() if l.strip()]
b, a = parse(before), parse(after)
applied = sum(x.get("snapshots_applied", 0) for x in a) - sum(x.get("snapshots_applied", 0) for x in b)
shed = sum(x.get("snapshots_shed_busy", 0) for x in a)
ro = r["rollouts"]
rp50 = sorted(x["p50_ms"] for x in ro)[len(ro) // 2] if ro else float("nan")
rp99 = max((x["p99_ms"] for x in ro), default=float("nan"))
reached = min((x["agents"] for x in ro), default=None)
rtxt = f"{rp50:.0f} / {rp99:.0f}" + (f" (only {reached:,} of {r['connected']:,} reached)" if reached is not None and reached < r["connected"] - r.get("revocations_unfinished", 0) - (r.get("revocation_ms") or {}).get("count", 0) else "")
# A figure the run did not measure (no rollouts, no revocations) is null in the report: NaN here.
clean = lambda d: {k: (float("nan") if v is None else v) for k, v in (d or {}).items()}
rv, fo = clean(r.get("revocation_ms")), clean(r.get("failover_ms"))
cpu_txt = " + ".join(f"{c:.1f}" for c in cpus) + (f" = {sum(cpus):.1f}" if n > 1 else "")
rss_txt = " / ".join(f"{x:.0f}" for x in rsss)
if killed == "1":
    print(f"| {mode} (r2 killed) | {agents:,} | {r['sessions_lost']} sessions lost; {fo.get('count', 0)} reconnected: p50 {fo.get('p50', float('nan')):.0f} ms, p99 {fo.get('p99', float('nan')):.0f} ms, max {fo.get('max', float('nan')):.0f} ms | map on r1 back in {map_back} | {r['agents_per_controller']} |")
else:
    print(f"| {mode} | {agents:,} | {r['ramp_seconds']:.1f} ({r['connected']:,}) | {cpu_txt} | {rss_txt} | {pg_cpu:.1f} | {rtxt} | {rv.get('p50', float('nan')):.0f} / {rv.get('p99', float('nan')):.0f} ({rv.get('count', 0)}) | {applied / max(end - start, 1e-9):,.0f} | {shed} |")
if r.get("errors"):
    print(f"<!-- {mode}: errors {r['errors']} -->")
PY
  unset TAPGRAPHCTL_CONFIG
}

echo "| mode | agents | enroll + connect (s) | controller CPU, steady (% of a core, per replica) | RSS per replica (MB) | PostgreSQL CPU (%) | rollout p50 / p99 (ms) | revocation p50 / p99 (ms) | snapshots applied/s (all replicas) | shed |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for mode in $MODES; do
  case "$mode" in
    embedded|pg1) run "$mode" 1 "$AGENTS" 0 ;;
    pg3) run "$mode" 3 "$AGENTS" 0 ;;
    *) echo "bench/replicas.sh: unknown mode $mode (embedded, pg1, pg3)" >&2; exit 1 ;;
  esac
done
if [ "$FAILOVER" = 1 ]; then
  echo
  echo "| failover | agents | reconnected elsewhere (lost session → policy) | map complete again | agents per replica at the end |"
  echo "|---|---|---|---|---|"
  REVOCATIONS=0 ROLLOUTS=0 run pg3 3 "$FAILOVER_AGENTS" 1
fi
