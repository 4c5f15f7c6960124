#!/usr/bin/env bash
# Mirror under a real service's load (issue 22): the packets of a TCP service (redis) under a
# client's load, mirrored by tapgraph to each target kind, side by side in the same run with the
# naive pipeline; nothing pinned, everything sharing the machine, as on a busy monitored host.
#
#   sudo bench/burst.sh                                  # steady and flood, every target: ≈ 3 minutes
#   sudo TARGETS="interface naive" SHAPES=flood ROW_S=20 bench/burst.sh
#   sudo TAPGRAPH_BIN=/tmp/burst-target/release DIAG=1 KEEP_LOGS=/tmp/burst bench/burst.sh
#   sudo RING=4MiB TAPGRAPH_CAPTURE__REALTIME=false TAPGRAPH_MIRROR__REALTIME=false bench/burst.sh
#       # as before issue 22's fixes: the old ring, the packet-path threads at the default policy
#   sudo HOGS=2 bench/burst.sh     # and src also runs two CPU-bound loops during each row
#
# Hosts are network namespaces made here and deleted on exit, with every process started in them:
#
#   cli ──── src ─────────── hub ──────── span
#   cli0     src0            hub1 ─────── span0: the analyzer (tcpdump) for interface: and naive
#            src1 ────────── hub0         vx0 (VXLAN 42 over span0): the analyzer for vxlan:
#
# src, the monitored host, runs redis-server and the tapgraph agent, which captures `tcp port 6379`
# on src0; the client host cli runs the load against it (redis-cli / redis-benchmark); hub runs the
# controller; span is the analyzer's side of the SPAN link. A recorder (tcpdump, 256 MiB buffer)
# on src0 is the source truth; the analyzer is tcpdump with the same buffer on span0, or on vx0
# where the kernel decapsulates VXLAN. Offloads are off on every veth: frames are wire-sized.
#
# Loads (SHAPES), each for ROW_S of load per row:
#   steady  STEADY_CONNS redis-cli loops (SET and GET, one command each per STEADY_INTERVAL s):
#           ≈ 10,000 packets/s of small requests and replies;
#   flood   BURSTS bursts of redis-benchmark flat out (FLOOD_CLIENTS connections, pipelines of
#           FLOOD_PIPELINE, ping/set/get, values of FLOOD_DATA bytes) of BURST_ON_S each, BURST_OFF_S
#           apart.
# Pipelines (TARGETS, a list: add a kind with a line in `target_spec` and one in `analyzer_if`):
#   interface  tapgraph, --target interface:hub1 (reinjected into the SPAN link);
#   vxlan      tapgraph, --target vxlan:198.18.3.2:4789 --vni 42;
#   pcap       tapgraph, --target pcap:FILE (compared with the file; no delay: the file holds capture
#              times);
#   tap        tapgraph, --target tap:tap9 (the controller's TAP device on hub; the analyzer reads it
#              inbound, `tcpdump -Q in`, where a SPAN port's frames arrive);
#   gre, erspan, erspan3  tapgraph, --target gre:198.18.3.2, erspan:… (type II), erspan:…
#              --erspan-type 3: captured on span0 and compared without their outer headers;
#   naive      `tcpdump -U -w - | socat - TCP:hub` on src, `socat TCP-LISTEN - | tcpreplay -t -i
#              hub1 -` on hub, as in bench/mirror.sh.
# The policy's limit (LIMIT, 1Gbit) is far above the traffic: whatever is lost is lost below it.
#
# Columns:
# - offered: packets the recorder saw on src0 per second of load (mean; peak = the busiest second);
# - delivered, missing, reordered, altered: the recorder's frames found at the analyzer, matched by
#   their bytes (bench/burst_compare.py; altered = found only by the bytes after the Ethernet
#   header); reordered = delivered after a frame captured later than it (a few per 100,000 with
#   every pipeline: two packet sockets on two CPUs see sent and received frames interleaved a
#   little differently);
# - delay: analyzer timestamp − recorder timestamp (kernel timestamps, same clock), p50/p99/max;
# - lost per stage, from the product's counters over the row (`tapgraphctl -o json mirror`):
#   agent kernel (ring overflow) / limiter / agent queue / lost in transit / controller queue /
#   failed+oversize; and the controller's capture→write delay p50/p99 over the row (from its
#   histogram in /metrics, buckets of 2^k µs: the bound of the bucket);
# - CPU: share of a core (over the load's wall time, bursts and gaps) of the mirror's processes on src (the agent, or tcpdump+socat) and on hub
#   (the controller, or socat+tcpreplay) during the load; the machine's busy share (wall − idle);
# - rec/ana drops: the recorder's and the analyzer's own "dropped by kernel" (must be 0);
# - others: CPU used by processes not this benchmark's, as a share of the machine (bench/others.py).
# With DIAG=1 the log also gets, per row, the run-queue wait of each agent and controller thread
# (/proc/PID/task/*/schedstat) and the largest Send-Q/Recv-Q of the gRPC connection (ss, every
# 50 ms).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
BENCH=bench/burst.sh
[ "$(id -u)" -eq 0 ] || { echo "$BENCH: needs root (network namespaces)" >&2; exit 1; }
for tool in ip tcpdump tcpreplay socat ethtool ss python3 redis-server redis-cli redis-benchmark timeout; do
  command -v "$tool" >/dev/null || { echo "$BENCH: $tool is missing (scripts/install-deps)" >&2; exit 1; }
done

SHAPES=${SHAPES:-"steady flood"}
TARGETS=${TARGETS:-"interface tap vxlan gre erspan erspan3 pcap naive"}
ROW_S=${ROW_S:-12}
STEADY_CONNS=${STEADY_CONNS:-7}
STEADY_INTERVAL=${STEADY_INTERVAL:-0.001}
FLOOD_CLIENTS=${FLOOD_CLIENTS:-20}
FLOOD_PIPELINE=${FLOOD_PIPELINE:-8}
FLOOD_DATA=${FLOOD_DATA:-1024}      # redis-benchmark -d: bytes of each SET's value
BURSTS=${BURSTS:-3}
BURST_ON_S=${BURST_ON_S:-3}
BURST_OFF_S=${BURST_OFF_S:-1}
LIMIT=${LIMIT:-1Gbit}
MODE=${MODE:-buffered}
BUFFER_KB=${BUFFER_KB:-262144}   # the recorder's and the analyzer's tcpdump -B
MAX_OTHERS=${MAX_OTHERS:-10}     # others' load (%) above which a row waits (up to 5 minutes)
DIAG=${DIAG:-}

source bench/common.sh
remove_leftover_namespaces 'tgburst-(cli|src|hub|span)'
work=$(mktemp -d /tmp/tgburst.XXXXXX)
NS_CLI=tgburst-cli-$$ NS_SRC=tgburst-src-$$ NS_HUB=tgburst-hub-$$ NS_SPAN=tgburst-span-$$
ALL_NS=("$NS_CLI" "$NS_SRC" "$NS_HUB" "$NS_SPAN")
started=()
cleanup() {
  set +e
  for p in "${started[@]}"; do kill -KILL "$p" 2>/dev/null; done
  for ns in "${ALL_NS[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  done
  wait 2>/dev/null
  for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
  if [ -n "${KEEP_LOGS:-}" ]; then
    mkdir -p "$KEEP_LOGS" && cp -r "$work/log/." "$KEEP_LOGS/"
    (cd "$work" && find rows -type f \( ! -name '*.pcap*' -o -name '*.log' \) -exec cp --parents {} "$KEEP_LOGS" \;)
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/bin" "$work/log" "$work/rows"

# --- Build (or TAPGRAPH_BIN=DIR). Binaries are copied to $work/bin.
if [ -z "${TAPGRAPH_BIN:-}" ]; then
  cargo build --release --locked -p tapgraph-agent -p tapgraph-controller -p tapgraph-ctl >/dev/null
fi
cp "${TAPGRAPH_BIN:-${CARGO_TARGET_DIR:-target}/release}"/{tapgraph-agent,tapgraph-controller,tapgraphctl} "$work/bin/"

# --- Topology.
make_namespaces "${ALL_NS[@]}"
veth "$NS_CLI" cli0 "$NS_SRC" src0
veth "$NS_SRC" src1 "$NS_HUB" hub0
veth "$NS_HUB" hub1 "$NS_SPAN" span0
ip -n "$NS_CLI" addr add 198.18.1.1/24 dev cli0
ip -n "$NS_SRC" addr add 198.18.1.2/24 dev src0
ip -n "$NS_SRC" addr add 198.18.2.1/24 dev src1
ip -n "$NS_HUB" addr add 198.18.2.2/24 dev hub0
ip -n "$NS_HUB" addr add 198.18.3.1/24 dev hub1
ip -n "$NS_SPAN" addr add 198.18.3.2/24 dev span0
ip -n "$NS_SPAN" link add vx0 type vxlan id 42 dstport 4789 local 198.18.3.2 dev span0
ip -n "$NS_SPAN" link set vx0 up
# The analyzer's TAP device, made by the operator (the controller opens it and keeps it up), so
# the analyzer can listen on it before the first mirrored frame.
ip -n "$NS_HUB" tuntap add dev tap9 mode tap
ip -n "$NS_HUB" link set tap9 up
# Static neighbours: no ARP on the links, so the analyzers see only mirrored frames.
ip -n "$NS_CLI" neigh replace 198.18.1.2 lladdr "$(mac "$NS_SRC" src0)" dev cli0 nud permanent
ip -n "$NS_SRC" neigh replace 198.18.1.1 lladdr "$(mac "$NS_CLI" cli0)" dev src0 nud permanent
ip -n "$NS_SRC" neigh replace 198.18.2.2 lladdr "$(mac "$NS_HUB" hub0)" dev src1 nud permanent
ip -n "$NS_HUB" neigh replace 198.18.2.1 lladdr "$(mac "$NS_SRC" src1)" dev hub0 nud permanent
ip -n "$NS_HUB" neigh replace 198.18.3.2 lladdr "$(mac "$NS_SPAN" span0)" dev hub1 nud permanent

# --- The service and tapgraph (both always running; a naive row turns capture off).
ip netns exec "$NS_SRC" redis-server --bind 198.18.1.2 --port 6379 --save '' --appendonly no \
  --protected-mode no --logfile "$work/log/redis.log" &
started+=($!)
wait_for redis ip netns exec "$NS_CLI" redis-cli -h 198.18.1.2 ping
tapgraph_start "$NS_HUB" 198.18.2.2 "$NS_SRC" in_ns || { log "tapgraph did not start"; exit 1; }
if [ -n "$DIAG" ] && command -v strace >/dev/null; then
  # The kernel ring libpcap asks for when the agent opens its capture (PACKET_RX_RING).
  strace -f -e trace=setsockopt -p "$TG_AGENT" -o "$work/log/agent-setsockopt.strace" 2>/dev/null & STRACE=$!
  sleep 0.5
fi

# target_spec KIND ROW: the policy's --target arguments for KIND.
target_spec() {
  case $1 in
    interface) echo "--target interface:hub1" ;;
    vxlan) echo "--target vxlan:198.18.3.2:4789 --vni 42" ;;
    pcap) echo "--target pcap:$work/rows/$2/mirror.pcapng" ;;
    tap) echo "--target tap:tap9" ;;
    gre) echo "--target gre:198.18.3.2" ;;
    erspan) echo "--target erspan:198.18.3.2" ;;
    erspan3) echo "--target erspan:198.18.3.2 --erspan-type 3" ;;
    *) return 1 ;;
  esac
}
# analyzer_if KIND: where the analyzer listens in span ("-": none, the target is a file).
analyzer_if() {
  case $1 in
    interface | naive | gre | erspan | erspan3) echo span0 ;;
    vxlan) echo vx0 ;;
    tap) echo tap9 ;;
    pcap) echo - ;;
    *) echo "$BENCH: unknown target $1" >&2; exit 2 ;;
  esac
}
# analyzer_ns KIND: the analyzer's host: the TAP device is the controller's, on hub.
analyzer_ns() { if [ "$1" = tap ]; then echo "$NS_HUB"; else echo "$NS_SPAN"; fi; }
# analyzer_args KIND: tcpdump's filter and options at the analyzer: GRE and ERSPAN are captured
# whole (no kernel here decapsulates them) and their outer headers cut by burst_compare.py
# (--strip: Ethernet 14 + IPv4 20 + GRE 4, or 8 with a sequence number, + ERSPAN II 8 or III 12);
# on the TAP device, inbound only, where a SPAN port's frames arrive.
analyzer_args() {
  case $1 in
    gre) echo "--strip 38 -- ip proto 47" ;;
    erspan) echo "--strip 50 -- ip proto 47" ;;
    erspan3) echo "--strip 54 -- ip proto 47" ;;
    tap) echo "-Q in -- tcp port 6379" ;;
    *) echo "-- tcp port 6379" ;;
  esac
}
policy() { ctl policy set burst --all --interface src0 --filter 'tcp port 6379' --mode "$MODE" \
  --limit "$LIMIT" --breach-intervals 0 --heartbeat-interval 1s ${RING:+--buffer-size "$RING"} "$@" >/dev/null && ctl policy status burst --wait --timeout 30s >/dev/null; }

naive_start() {
  ip netns exec "$NS_HUB" sh -c "socat -u TCP-LISTEN:5555,reuseaddr - 2>'$work/log/naive-socat-hub.log' \
    | tcpreplay -q -t -i hub1 - >'$work/log/naive-tcpreplay.log' 2>&1" &
  started+=($!); NAIVE=($!)
  wait_for "socat listening" sh -c "ip netns exec $NS_HUB ss -ltn | grep -q ':5555 '"
  ip netns exec "$NS_SRC" sh -c "tcpdump -i src0 -U -w - 'tcp port 6379' 2>'$work/log/naive-tcpdump.log' \
    | socat -u - TCP:198.18.2.2:5555 2>'$work/log/naive-socat-src.log'" &
  started+=($!); NAIVE+=($!)
  wait_for "naive tcpdump" grep -q "listening on" "$work/log/naive-tcpdump.log"
}
naive_stop() {
  local p
  for p in $(ip netns pids "$NS_SRC") $(ip netns pids "$NS_HUB"); do
    case $(cat "/proc/$p/comm" 2>/dev/null) in
      socat | tcpreplay) kill -TERM "$p" 2>/dev/null || true ;;
      tcpdump) [ "$p" = "$REC" ] || kill -TERM "$p" 2>/dev/null || true ;;
    esac
  done
  wait "${NAIVE[@]}" 2>/dev/null || true
}

# tcpdump_start NS IF FILE: a recorder; sets TD_PID once it listens.
tcpdump_start() {  # NS IF FILE [TCPDUMP OPTION...] [-- FILTER]: by default, `tcp port 6379`
  local ns=$1 if=$2 out=$3 opts=() filter="tcp port 6379"; shift 3
  while [ $# -gt 0 ]; do
    case $1 in --strip) shift 2 ;; --) shift; filter="$*"; break ;; *) opts+=("$1"); shift ;; esac
  done
  ip netns exec "$ns" tcpdump -i "$if" -p -B "$BUFFER_KB" --time-stamp-precision=nano "${opts[@]}" \
    -w "$out" "$filter" >/dev/null 2>"$out.log" &
  TD_PID=$!; started+=($!)
  wait_for "tcpdump on $if" grep -q "listening on" "$out.log"
}
tcpdump_stop() {  # PID LOG → its "dropped by kernel" count
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for _ in $(seq 50); do grep -q "dropped by kernel" "$2" && break; sleep 0.1; done
  sed -n 's/^\([0-9]*\) packets dropped by kernel.*/\1/p' "$2"
}

# The load. load SHAPE: runs it in cli for ROW_S (steady) or BURSTS × BURST_ON_S (flood); sets
# LOAD_S, the seconds of load.
load() {
  local i pids=() hogs=()
  # HOGS busy loops on src for the row: the monitored host also runs CPU-bound work.
  for i in $(seq "${HOGS:-0}"); do ip netns exec "$NS_SRC" sh -c 'while :; do :; done' & hogs+=($!); done
  case $1 in
    steady)
      for i in $(seq "$STEADY_CONNS"); do
        if [ $((i % 2)) = 1 ]; then cmd=(SET "k$i" "$(head -c 100 /dev/zero | tr '\0' v)"); else cmd=(GET "k$((i - 1))"); fi
        ip netns exec "$NS_CLI" timeout "$ROW_S" redis-cli -h 198.18.1.2 -r 100000000 -i "$STEADY_INTERVAL" \
          "${cmd[@]}" >/dev/null 2>&1 &
        pids+=($!)
      done
      wait "${pids[@]}" 2>/dev/null || true
      LOAD_S=$ROW_S ;;
    flood)
      for i in $(seq "$BURSTS"); do
        [ "$i" = 1 ] || sleep "$BURST_OFF_S"
        ip netns exec "$NS_CLI" timeout "$BURST_ON_S" redis-benchmark -h 198.18.1.2 -q -c "$FLOOD_CLIENTS" \
          -P "$FLOOD_PIPELINE" -d "$FLOOD_DATA" -t ping,set,get -n 1000000000 -r 100000 >/dev/null 2>&1 || true
      done
      LOAD_S=$((BURSTS * BURST_ON_S)) ;;
    *) echo "$BENCH: unknown shape $1 (steady flood)" >&2; exit 2 ;;
  esac
  [ ${#hogs[@]} = 0 ] || { kill "${hogs[@]}" 2>/dev/null; wait "${hogs[@]}" 2>/dev/null || true; }
}

# The product's counters: `tapgraphctl -o json mirror` and the controller's delay histogram.
counters() {  # FILE
  ctl -o json mirror >"$1.json" 2>/dev/null || echo "[]" >"$1.json"
  ip netns exec "$NS_HUB" python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://$TG_HTTP/metrics', timeout=5).read().decode())" \
    2>/dev/null | grep '^tapgraph_mirror_delay_seconds_bucket' >"$1.metrics" || true
}
settle() {  # until the agent's sent and the controller's written counts stop moving (≤ 15 s)
  local last="" now same=0
  for _ in $(seq 60); do
    now=$(ctl -o json mirror 2>/dev/null | python3 -c "import json,sys; a=json.load(sys.stdin); print(sum(x['sent']+sum(t['written']+sum(t['dropped'].values()) for t in x['targets']) for x in a))" 2>/dev/null) || now=""
    if [ -n "$now" ] && [ "$now" = "$last" ]; then same=$((same + 1)); [ "$same" -ge 4 ] && break; else same=0; last=$now; fi
    sleep 0.25
  done
}
# Per-thread run-queue wait (DIAG=1): "PID TID NAME RUN_NS WAIT_NS SLICES" lines.
schedstat() {
  local p t
  for p in "$@"; do
    for t in /proc/"$p"/task/*; do
      echo "$p ${t##*/} $(tr ' ' _ <"$t/comm" 2>/dev/null) $(cat "$t/schedstat" 2>/dev/null)"
    done
  done
}
ss_sampler() {  # OUT: the gRPC connection's queues every 50 ms, both ends
  while :; do
    # With a state filter ss leaves the State column out: Recv-Q is $1, Send-Q $2.
    echo "src $(ip netns exec "$NS_SRC" ss -tnH state established dst 198.18.2.2:7443 | awk '{s+=$2} END {print s+0}')"
    echo "hub $(ip netns exec "$NS_HUB" ss -tnH state established src 198.18.2.2:7443 | awk '{r+=$1} END {print r+0}')"
    sleep 0.05
  done >"$1"
}

wait_quiet() {  # waits (≤ QUIET_WAIT_S) until others use ≤ MAX_OTHERS % of the machine over 3 s
  local o
  for _ in $(seq $(( ${QUIET_WAIT_S:-60} / 5 ))); do
    others save quiet; sleep 3; o=$(others since quiet)
    [ "${o%\%}" -gt "$MAX_OTHERS" ] || return 0
    log "others' load $o: waiting"
    sleep 2
  done
}

ROWS=()
row() {  # SHAPE KIND
  local shape=$1 kind=$2 id=$1-$2 dir ana_if ana rec t0 t1 m busy c_src c_hub src_p hub_p o ssp=""
  dir=$work/rows/$id; mkdir -p "$dir"
  ana_if=$(analyzer_if "$kind")
  if [ "$kind" = naive ]; then
    policy --no-capture || { log "$id: policy failed"; return 1; }
    naive_start
  else
    policy --capture $(target_spec "$kind" "$id") || { log "$id: policy failed"; return 1; }
  fi
  sleep 1
  if [ -n "${STRACE:-}" ]; then
    kill "$STRACE" 2>/dev/null; wait "$STRACE" 2>/dev/null || true; STRACE=""
    grep -E "PACKET_RX_RING|SO_RCVBUF|PACKET_VERSION" "$work/log/agent-setsockopt.strace" | while read -r l; do log "agent: $l"; done
  fi
  wait_quiet
  ana=""; [ "$ana_if" = - ] || { tcpdump_start "$(analyzer_ns "$kind")" "$ana_if" "$dir/ana.pcap" $(analyzer_args "$kind"); ana=$TD_PID; }
  tcpdump_start "$NS_SRC" src0 "$dir/src.pcap"; REC=$TD_PID
  counters "$dir/before"
  src_p=($(for p in $(ip netns pids "$NS_SRC"); do case $(cat /proc/$p/comm) in redis-server) ;; tcpdump) [ "$p" = "$REC" ] || echo "$p" ;; *) echo "$p" ;; esac; done))
  hub_p=($(ip netns pids "$NS_HUB"))
  local perfp=""
  if [ -n "$DIAG" ]; then
    schedstat "${src_p[@]}" "${hub_p[@]}" >"$dir/sched-0"; ss_sampler "$dir/ss" & ssp=$!
    if command -v perf >/dev/null; then
      perf sched record -a -o "$dir/perf-sched.data" >/dev/null 2>&1 & perfp=$!
    fi
  fi
  others save "$id"
  c_src=$(cpu_ticks "${src_p[@]}"); c_hub=$(cpu_ticks "${hub_p[@]}"); m=$(machine_mark)
  log "$id: load"
  t0=$(date +%s%N)
  load "$shape"
  t1=$(date +%s%N)
  echo "$t0 $t1" >"$dir/window"   # the load's window, Unix ns
  busy=$(machine_busy_since "$m")
  c_src=$(( $(cpu_ticks "${src_p[@]}") - c_src )); c_hub=$(( $(cpu_ticks "${hub_p[@]}") - c_hub ))
  o=$(others since "$id")
  [ -z "$ssp" ] || { kill "$ssp" 2>/dev/null; wait "$ssp" 2>/dev/null || true; schedstat "${src_p[@]}" "${hub_p[@]}" >"$dir/sched-1"; }
  [ -z "$perfp" ] || { kill -INT "$perfp" 2>/dev/null; wait "$perfp" 2>/dev/null || true; }
  [ "$kind" = naive ] || settle
  sleep 2   # tcpdump's ring hands over a partly filled block after 1 s
  counters "$dir/after"
  local rec_drop ana_drop="—"
  rec_drop=$(tcpdump_stop "$REC" "$dir/src.pcap.log")
  [ -z "$ana" ] || ana_drop=$(tcpdump_stop "$ana" "$dir/ana.pcap.log")
  [ "$kind" != naive ] || naive_stop
  local file=$dir/ana.pcap nodelay=""
  if [ "$kind" = pcap ]; then
    ctl policy set burst --target none >/dev/null; ctl policy status burst --wait --timeout 30s >/dev/null || true
    sleep 0.5; file=$(ls "$dir"/mirror*.pcapng 2>/dev/null | head -1); nodelay=--no-delay
  fi
  local strip; strip=$(analyzer_args "$kind" | sed -n 's/^--strip \([0-9]*\).*/--strip \1/p')
  python3 bench/burst_compare.py "$dir/src.pcap" "${file:-/dev/null}" $nodelay $strip --from "$t0" --to "$t1" >"$dir/compare.json"
  [ -z "$DIAG" ] || diag "$id" "$dir"
  ROWS+=("$(python3 - "$dir" "$shape" "$kind" "$LOAD_S" "$(( (t1 - t0) / 1000000 ))" "$c_src" "$c_hub" "$HZ" "$busy" "$NCPU" "$rec_drop" "$ana_drop" "$o" <<'PY'
import json, sys
d, shape, kind, load_s, wall_ms, c_src, c_hub, hz, busy, ncpu, rec_drop, ana_drop, others = sys.argv[1:]
load_s, hz, wall = float(load_s), float(hz), float(wall_ms) / 1000
cmp = json.load(open(f"{d}/compare.json"))
def agent_target(path):
    try:
        a = json.load(open(path))
    except Exception:
        return {}, {}
    a = a[0] if a else {}
    t = next((t for t in a.get("targets", []) if kind in t["target"]), {}) if kind != "naive" else {}
    return a, t
a0, t0 = agent_target(f"{d}/before.json")
a1, t1 = agent_target(f"{d}/after.json")
def delta(x1, x0, *path):
    def get(x):
        for p in path:
            x = (x or {}).get(p, 0)
        return x or 0
    return get(x1) - get(x0)
def hist(path):
    h = {}
    try:
        for line in open(path):
            if kind not in line:
                continue
            le = line.split('le="')[1].split('"')[0]
            h[le] = float(line.rsplit(" ", 1)[1])
    except (OSError, IndexError):
        pass
    return h
h0, h1 = hist(f"{d}/before.metrics"), hist(f"{d}/after.metrics")
ctl_q = "—"
if h1:
    rows = sorted(((float(le) if le != "+Inf" else float("inf")), h1[le] - h0.get(le, 0)) for le in h1)
    total = rows[-1][1]
    def q(x):
        for le, c in rows:
            if c >= x * total:
                return "∞" if le == float("inf") else (f"{le*1e3:g}" if le < 1 else f"{le:g} s")
    if total > 0:
        ctl_q = f"≤ {q(0.5)} / ≤ {q(0.99)}"
n = cmp["source"]
pct = lambda a, b: "100%" if a >= b else f"{int(1000 * a / max(b, 1)) / 10:.1f}%"
ms = lambda us: "—" if us is None else f"{us / 1000:.1f}"
delay = "—" if "delay_p50_us" not in cmp else f"{ms(cmp['delay_p50_us'])} / {ms(cmp['delay_p99_us'])} / {ms(cmp['delay_max_us'])}"
if kind == "naive":
    stages = "—"
else:
    dq = lambda r: delta(t1, t0, "dropped", r)
    stages = " / ".join(str(x) for x in (
        delta(a1, a0, "dropped", "kernel"), delta(a1, a0, "dropped", "limiter"), delta(a1, a0, "dropped", "queue"),
        delta(t1, t0, "batches_lost"), dq("queue"), dq("failed") + dq("oversize")))
    stages += f" (captured {delta(a1, a0, 'captured')}, written {delta(t1, t0, 'written')})"
cpu = lambda t: f"{100 * float(t) / hz / wall:.0f}%"
print(f"| {shape} | {kind} | {n / load_s:,.0f} / {cmp.get('peak_pps', 0):,} | {cmp['delivered']:,} ({pct(cmp['delivered'], n)}) "
      f"| {cmp['missing']:,} | {cmp['reordered']:,} | {cmp['altered']:,} | {delay} | {stages} | {ctl_q} "
      f"| {cpu(c_src)} / {cpu(c_hub)} | {100 * float(busy) / float(ncpu) / wall:.0f}% | {rec_drop or '?'} / {ana_drop or '?'} | {others} |")
PY
)")
  log "${ROWS[-1]}"
}

# diag ID DIR: logs each thread's run-queue wait over the row, and the gRPC connection's largest
# queues.
diag() {
  python3 - "$2/sched-0" "$2/sched-1" <<'PY' | while read -r l; do log "  $1 $l"; done
import sys
def load(p):
    r = {}
    for line in open(p):
        f = line.split()
        if len(f) == 6:
            r[f[1]] = (f[2], int(f[3]), int(f[4]), int(f[5]))
    return r
a, b = load(sys.argv[1]), load(sys.argv[2])
for tid, (name, run, wait, n) in b.items():
    r0, w0, n0 = a.get(tid, (name, 0, 0, 0))[1:]
    dn = n - n0
    if dn > 0:
        print(f"thread {name} ({tid}): ran {(run - r0) / 1e6:.0f} ms, waited {(wait - w0) / 1e6:.0f} ms on the run queue over {dn} slices ({(wait - w0) / dn / 1e3:.0f} µs mean)")
PY
  [ ! -s "$2/perf-sched.data" ] || perf sched latency -i "$2/perf-sched.data" --sort max 2>/dev/null \
    | grep -E "tapgraph|capture|tokio|mirror-wr|redis|tcpdump|socat|tcpreplay" | head -12 \
    | while read -r l; do log "  $1 perf sched: $l"; done
  rm -f "$2/perf-sched.data"
  [ ! -s "$2/ss" ] || log "  $1 gRPC connection: largest Send-Q on src $(awk '$1 == "src" && $2 > m {m = $2} END {print m + 0}' "$2/ss") B, Recv-Q on hub $(awk '$1 == "hub" && $2 > m {m = $2} END {print m + 0}' "$2/ss") B"
}

for shape in $SHAPES; do
  for kind in $TARGETS; do
    [ "$kind" = naive ] || target_spec "$kind" x >/dev/null || { echo "$BENCH: unknown target $kind" >&2; exit 2; }
    row "$shape" "$kind" || ROWS+=("| $shape | $kind | not run | | | | | | | | | | | |")
  done
done

echo
echo "Command: $(for v in SHAPES TARGETS ROW_S STEADY_CONNS STEADY_INTERVAL FLOOD_CLIENTS FLOOD_PIPELINE BURSTS BURST_ON_S BURST_OFF_S LIMIT MODE HOGS RING TAPGRAPH_CAPTURE__REALTIME TAPGRAPH_MIRROR__REALTIME; do [ -n "${!v:-}" ] || continue; printf '%s="%s" ' "$v" "${!v}"; done)bench/burst.sh (at $(git rev-parse --short HEAD 2>/dev/null), $(date +%F))"
echo
echo "| load | pipeline | offered pps: mean / peak 1 s | delivered | missing | reordered | altered | delay p50 / p99 / max (ms) | lost per stage: agent kernel / limiter / queue / batches lost in transit / controller queue / failed | controller capture→write p50 / p99 (ms) | CPU src / hub (of a core) | machine busy | rec / ana tcpdump drops | others' load |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
