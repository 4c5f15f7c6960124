#!/usr/bin/env bash
# Virtual TAP benchmark (issue 7): packets captured on a monitored host, carried to another host and
# reinjected into an interface there (a SPAN port), side by side in the same run with
#   capture   `tcpdump -w /dev/null` alone on the monitored interface: the capture ceiling;
#   kernel    `tc … action mirred` into a VXLAN tunnel, decapsulated and redirected into the SPAN
#             interface by tc on the far side: the kernel path;
#   naive     `tcpdump -U -w - | socat - TCP:hub` on the monitored host, `socat TCP-LISTEN - |
#             tcpreplay -t -i IF -` on the far side: what a sysadmin would script;
#   tapgraph  the agent and the controller: capture, mTLS gRPC, reinjection (MODE=buffered|immediate);
#   floor     no mirror: what the kernel alone costs per packet to reinject a frame (sendmmsg, or one
#             send per frame as tcpreplay) and to carry it over plain TCP (C programs, bench/floor/).
#
#   sudo bench/mirror.sh                                  # all of it: 10½ minutes
#   sudo ONLY="kernel naive" SIZES=1400 bench/mirror.sh   # some of it; other knobs below
#   sudo ROUNDS=4 ONLY="capture base tapgraph floor" TAPGRAPH_BASE=DIR CPU_ONLY=1 bench/mirror.sh
#       # the CPU goal (issue 22): 4 interleaved rounds, each tapgraph figure against its round's
#       # floors, and beside it another build's ("base": the binaries in DIR)
#   sudo ONLY=tapgraph CPU_ONLY=1 PERF=/tmp/mirror bench/mirror.sh   # only the CPU trial, with a
#       per-thread split in the log (every run logs it) and `perf record -C 1 -g` of CPU 1 saved
#       as /tmp/mirror-SIZE-TRY.data; TAPGRAPH_BIN=DIR takes the binaries from DIR (a build with
#       line tables, with PERF_ARGS="-F 499 --call-graph dwarf") instead of building them
#
# Hosts are network namespaces made here and deleted on exit, with every process started in them:
#
#   gen ──── src ─────────── hub ──────── span
#   gen0     src0            hub1 ─────── span0: the analyzer counts and timestamps here
#            src1 ────────── hub0: the tunnel, TCP or gRPC between the two hosts
#
# The generator (examples/udpgen.rs) sends UDP to src (frames of exactly 64 or 1400 bytes as libpcap
# sees them, no FCS), pinned to CPU 0. The pipeline's processes are pinned to CPU 1. With veth, the
# monitored host's kernel receive path (and so the kernel's half of any capture, and all of the
# kernel path's mirroring) runs in the generator's send call on CPU 0; RPS=1 moves it to CPU 1 with
# the pipeline instead (a host whose capture competes with its own packet processing; the issue's
# reference figures match RPS=0). Either way the generator cannot outrun the monitored host's kernel:
# its socket's send buffer holds each packet until src has processed it, so the generator's flat-out
# rate is what src takes in (less when the kernel path mirrors in that same call), and every packet
# lost is lost by the mirror. The analyzer (udpgen recv) is test equipment on CPU 0; its timestamps
# are the kernel's.
#
# For each pipeline and frame size:
# - max rate: the generator flat out for FLOOD_S; delivered = packets seen at the far end (capture:
#   tcpdump's own "captured" count; the others: rx_packets of span0), as a rate and a share of sent.
# - zero-loss rate: the highest rate at which every packet sent was delivered: SEARCH_STEPS trials of
#   TRIAL_S, the first at 90% of the rate delivered at max rate, then bisecting.
# - CPU per packet at 50 kpps for CPU_S: utime+stime (/proc/PID/stat) of every process of the
#   pipeline (all processes in src and hub) per delivered packet; and the whole machine's busy time
#   (wall time less idle time, which NO_HZ measures exactly, unlike tick-sampled softirq time) per
#   packet, less the same with no mirror at all: everything mirroring costs, kernel included. The
#   kernel path has only the latter. The process figure is tick-sampled: ±5% at 50 kpps. A trial
#   during which others used more than 2% of the machine is run again (3 tries), the least kept.
# - delay at 10 kpps for DELAY_S: the analyzer's receive timestamp on span0 minus the send time the
#   generator stamped in the payload (CLOCK_REALTIME on both sides: same machine, same clock). This
#   includes the generator's own send path and the gen→src hop, which the "no mirror" line measures
#   with the analyzer on src0 itself (the capture point): capture-to-reinjection is the difference.
# - CPU (share of a core) and RSS (sum of VmRSS) of the pipeline's processes on each host during that
#   run, and on src at idle (no traffic, IDLE_S, before the first trial).
# - others' load: CPU used by processes that are not this benchmark's during the row, as a share of
#   the machine (approximate: a process that exits is counted through its parent, whole). On a shared
#   machine anything above a few % skews that row, the machine CPU column first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
[ "$(id -u)" -eq 0 ] || { echo "bench/mirror.sh: needs root (network namespaces)" >&2; exit 1; }
for tool in ip tc taskset tcpdump tcpreplay socat ethtool ss python3 cc; do
  command -v "$tool" >/dev/null || { echo "bench/mirror.sh: $tool is missing (scripts/install-deps)" >&2; exit 1; }
done

SIZES=${SIZES:-"64 1400"}
ONLY=${ONLY:-"capture kernel naive tapgraph floor"}
FLOOD_S=${FLOOD_S:-5}
TRIAL_S=${TRIAL_S:-3}
SEARCH_STEPS=${SEARCH_STEPS:-6}
CPU_S=${CPU_S:-10}
DELAY_S=${DELAY_S:-10}
IDLE_S=${IDLE_S:-5}
RPS=${RPS:-0}
# The link between src and hub carries only the pipelines' own traffic (TCP, gRPC, the kernel
# path's tunnel). With TRANSPORT_OFFLOADS=on its veths keep segmentation and receive offloads on, as
# a host's NIC has them: large TCP writes cross it as large segments. The capture and SPAN links
# stay without offloads either way (every frame there is a real frame no larger than the MTU).
TRANSPORT_OFFLOADS=${TRANSPORT_OFFLOADS:-off}
# ROUNDS=N runs the ONLY list N times over, interleaved: with CPU_ONLY=1 and "capture tapgraph floor",
# each round's tapgraph figure is set against that round's floors, and the table at the end gives
# every round's ratio and their median. This VM's speed drifts by a quarter over minutes (the same
# build, and the floors, measured minutes apart), so a ratio only holds within a round.
ROUNDS=${ROUNDS:-1}
SETTLE_S=${SETTLE_S:-2}   # delivered count unchanged this long = pipeline drained (tcpdump's
                          # libpcap hands over a partly filled buffer block after 1 s)

# The bench itself (polling, counters) stays off CPU 1: only what is pinned there runs there.
taskset -pc 0 $$ >/dev/null

BENCH=bench/mirror.sh
source bench/common.sh
# Leftovers of an earlier run that died without its trap: kill what runs in its namespaces.
remove_leftover_namespaces 'tgb-(gen|src|hub|span)'

work=$(mktemp -d /tmp/tgb-mirror.XXXXXX)
NS_GEN=tgb-gen-$$ NS_SRC=tgb-src-$$ NS_HUB=tgb-hub-$$ NS_SPAN=tgb-span-$$
ALL_NS=("$NS_GEN" "$NS_SRC" "$NS_HUB" "$NS_SPAN")
started=()
cleanup() {
  set +e
  for p in "${started[@]}"; do kill -KILL "$p" 2>/dev/null; done
  for ns in "${ALL_NS[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  done
  # Our own binaries run from $work/bin: whatever still runs from there is this run's.
  pkill -KILL -f "^$work/bin/" 2>/dev/null
  wait 2>/dev/null
  for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
  if [ -n "${KEEP_LOGS:-}" ]; then mkdir -p "$KEEP_LOGS" && cp -r "$work/log/." "$KEEP_LOGS/"; fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- Build. Binaries are copied to $work/bin, so that this run's processes are known by path.
cargo build --release --locked -p tapgraph --example udpgen >/dev/null
mkdir -p "$work/bin" "$work/log"
cp "${CARGO_TARGET_DIR:-target}"/release/examples/udpgen "$work/bin/"
UDPGEN=$work/bin/udpgen

on1() { local ns=$1; shift; ip netns exec "$ns" taskset -c 1 "$@"; }   # the pipeline's core
on0() { local ns=$1; shift; ip netns exec "$ns" taskset -c 0 "$@"; }   # the test equipment's core

# --- Topology.
make_namespaces "${ALL_NS[@]}"
veth "$NS_GEN" gen0 "$NS_SRC" src0
# The generator's batches leave as UDP GSO sends, which gen0 must split: else one send per datagram.
GEN_GSO=1
features=$(in_ns "$NS_GEN" ethtool -k gen0)
! grep -qE '^(generic-segmentation-offload|tx-udp-segmentation): on' <<<"$features" || GEN_GSO=0
veth "$NS_SRC" src1 "$NS_HUB" hub0
offloads_on() {  # NS IF
  local f
  for f in gro gso tso; do in_ns "$1" ethtool -K "$2" "$f" on >/dev/null 2>&1 || true; done
}
[ "$TRANSPORT_OFFLOADS" != on ] || { offloads_on "$NS_SRC" src1; offloads_on "$NS_HUB" hub0; }
veth "$NS_HUB" hub1 "$NS_SPAN" span0
ip -n "$NS_GEN" addr add 198.18.1.1/24 dev gen0
ip -n "$NS_SRC" addr add 198.18.1.2/24 dev src0
ip -n "$NS_SRC" addr add 198.18.2.1/24 dev src1
ip -n "$NS_HUB" addr add 198.18.2.2/24 dev hub0
# Static neighbours: no ARP on the monitored link, so the only frames there are the generator's.
ip -n "$NS_GEN" neigh replace 198.18.1.2 lladdr "$(mac "$NS_SRC" src0)" dev gen0 nud permanent
ip -n "$NS_SRC" neigh replace 198.18.1.1 lladdr "$(mac "$NS_GEN" gen0)" dev src0 nud permanent
ip -n "$NS_SRC" neigh replace 198.18.2.2 lladdr "$(mac "$NS_HUB" hub0)" dev src1 nud permanent
ip -n "$NS_HUB" neigh replace 198.18.2.1 lladdr "$(mac "$NS_SRC" src1)" dev hub0 nud permanent
[ "$RPS" = 0 ] || in_ns "$NS_SRC" sh -c 'echo 2 > /sys/class/net/src0/queues/rx-0/rps_cpus'
# The kernel path's tunnel, idle until its tc filters are added.
ip -n "$NS_SRC" link add vx0 type vxlan id 42 local 198.18.2.1 remote 198.18.2.2 dstport 4789 dev src1
ip -n "$NS_HUB" link add vx0 type vxlan id 42 local 198.18.2.2 remote 198.18.2.1 dstport 4789 dev hub0
ip -n "$NS_SRC" link set vx0 up
ip -n "$NS_HUB" link set vx0 up

# --- Counters.
rx() { in_ns "$1" cat "/sys/class/net/$2/statistics/rx_packets"; }
span_rx() { rx "$NS_SPAN" span0; }
src_rx() { rx "$NS_SRC" src0; }
pipeline_pids() { ip netns pids "$NS_SRC"; ip netns pids "$NS_HUB"; }

run_id=0
# gen SIZE RATE SECS: one generator run (RATE 0 = flat out); sets SENT and SENT_PPS. It paces by
# spinning (smooth), or with PACE=sleep by sleeping (CPU 0 idle between batches, so that the
# machine's busy time is the traffic's cost, not the generator's spinning).
gen() {
  local out
  run_id=$(( (run_id + 1) % 65536 ))
  out=$(on0 "$NS_GEN" "$UDPGEN" send --dst 198.18.1.2:9000 --size "$1" --rate "$2" --duration "$3" --run "$run_id" --pace "${PACE:-spin}" --gso "$GEN_GSO")
  SENT=$(sed -n 's/.*sent=\([0-9]*\).*/\1/p' <<<"$out")
  SENT_PPS=$(sed -n 's/.* pps=\([0-9]*\).*/\1/p' <<<"$out")
}
# settle: waits until $COUNT has not moved for SETTLE_S (at most 30 s); prints the count.
settle() {
  local last now same=0 waited=0
  last=$($COUNT)
  while [ "$same" -lt $((SETTLE_S * 4)) ] && [ "$waited" -lt 120 ]; do
    sleep 0.25; now=$($COUNT)
    if [ "$now" = "$last" ]; then same=$((same + 1)); else same=0; last=$now; fi
    waited=$((waited + 1))
  done
  echo "$last"
}
check_alive() {
  local p
  for p in "${PIPE_PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || { log "pipeline process $p died; logs:"; tail -n 5 "$work"/log/* >&2; exit 1; }
  done
}
# trial SIZE RATE SECS: sets SENT, SENT_PPS, DELIVERED. Whatever ran before it has drained.
trial() {
  local c0
  check_alive
  c0=$($COUNT)
  gen "$@"
  DELIVERED=$(( $(settle) - c0 ))
}

# --- The pipelines. Each starts its processes (pinned to CPU 1, in src and hub) and returns 0 once
# they are ready; it may set COUNT to a command printing its cumulative delivered count (default:
# span0's rx_packets). stop_pipeline removes whatever any of them left behind.

# (a) tcpdump alone. Its captured count is read with SIGUSR1 (it prints its stats and carries on).
capture_alone() {
  on1 "$NS_SRC" tcpdump -i src0 -w /dev/null 'udp dst port 9000' 2>"$work/log/tcpdump-alone.log" &
  started+=($!)
  wait_for tcpdump grep -q "listening on" "$work/log/tcpdump-alone.log"
  COUNT=tcpdump_count
}
tcpdump_count() {
  local n0
  n0=$(grep -c "packets captured" "$work/log/tcpdump-alone.log" || true)
  kill -USR1 "${PIPE_PIDS[0]}"
  while [ "$(grep -c "packets captured" "$work/log/tcpdump-alone.log" || true)" -le "$n0" ]; do sleep 0.02; done
  grep "packets captured" "$work/log/tcpdump-alone.log" | tail -1 | sed 's/^[^0-9]*\([0-9]*\) packets captured.*/\1/'
}

# (b) The kernel path: every frame entering src0 mirrored into the VXLAN tunnel; in hub, whatever the
# tunnel delivers redirected into hub1, towards the analyzer.
kernel_mirror() {
  in_ns "$NS_SRC" tc qdisc add dev src0 clsact
  in_ns "$NS_HUB" tc qdisc add dev vx0 clsact
  # matchall where the kernel has it; else a u32 filter that matches everything.
  local all="matchall"
  in_ns "$NS_SRC" tc filter add dev src0 ingress matchall action mirred egress mirror dev vx0 2>/dev/null ||
    { all="protocol all u32 match u32 0 0"
      in_ns "$NS_SRC" tc filter add dev src0 ingress $all action mirred egress mirror dev vx0; }
  in_ns "$NS_HUB" tc filter add dev vx0 ingress $all action mirred egress redirect dev hub1
}

# (c) The naive pipeline, as a sysadmin would script it. tcpreplay reads the pcap stream from stdin
# and sends each packet at once (-t: no replay of the capture's timing).
naive_pipeline() {
  on1 "$NS_HUB" socat -u TCP-LISTEN:5555,reuseaddr - 2>"$work/log/naive-socat-hub.log" \
    | on1 "$NS_HUB" tcpreplay -q -t -i hub1 - >"$work/log/naive-tcpreplay.log" 2>&1 &
  started+=($!)
  wait_for "socat listening" sh -c "ip netns exec $NS_HUB ss -ltn | grep -q ':5555 '"
  on1 "$NS_SRC" tcpdump -i src0 -U -w - 'udp dst port 9000' 2>"$work/log/naive-tcpdump.log" \
    | on1 "$NS_SRC" socat -u - TCP:198.18.2.2:5555 2>"$work/log/naive-socat-src.log" &
  started+=($!)
  wait_for tcpdump grep -q "listening on" "$work/log/naive-tcpdump.log"
}

# (d) tapgraph: the agent in src captures src0 and streams to the controller in hub over mTLS gRPC;
# the controller reinjects into hub1.
# The agent captures src0 and streams over mTLS gRPC to the controller in hub, which reinjects into
# hub1. MODE=immediate|buffered (default buffered) is the agent's capture mode. Each step that can
# fail says `|| return 1`: this runs in an `||` list, where errexit is off.
tapgraph_build() {  # TAPGRAPH_BIN=DIR: binaries built elsewhere (a profiling build, say)
  [ -n "${TAPGRAPH_BIN:-}" ] || [ -n "${TAPGRAPH_BUILT:-}" ] ||
    cargo build --release --locked -p tapgraph-agent -p tapgraph-controller -p tapgraph-ctl >/dev/null
  TAPGRAPH_BUILT=1
  tapgraph_copy "${TAPGRAPH_BIN:-${CARGO_TARGET_DIR:-target}/release}"
}
tapgraph_copy() { cp "$1"/{tapgraph-agent,tapgraph-controller,tapgraphctl} "$work/bin/"; }
tapgraph_pipeline() {
  tapgraph_start "$NS_HUB" 198.18.2.2 "$NS_SRC" on1 || return 1
  ctl policy set bench --all --capture --interface src0 --filter 'udp dst port 9000' \
    --mode "${MODE:-buffered}" --limit 100G --breach-intervals 0 --target interface:hub1 \
    >/dev/null || return 1
  ctl policy status bench --wait --timeout 30s >"$work/log/policy.log"
}

stop_pipeline() {
  local p
  for p in $(pipeline_pids); do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 30); do [ -z "$(pipeline_pids)" ] && break; sleep 0.1; done
  for p in $(pipeline_pids); do kill -KILL "$p" 2>/dev/null || true; done
  in_ns "$NS_SRC" tc qdisc del dev src0 clsact 2>/dev/null || true
  in_ns "$NS_HUB" tc qdisc del dev vx0 clsact 2>/dev/null || true
  wait 2>/dev/null || true
}

# --- Measurements.
fmt() { python3 -c "import sys; print(f'{float(sys.argv[1]):,.0f}')" "$1"; }
pct() {  # a share, rounded down: 99.97% of packets is not 100%
  python3 -c "import sys,math; a,b=map(float,sys.argv[1:]); print('100%' if a>=b else f'{math.floor(1000*a/max(b,1))/10:.1f}%')" "$1" "$2"
}
div() { python3 -c "import sys; print(f'{float(sys.argv[1])/max(float(sys.argv[2]),1e-9):.${3:-2}f}')" "$1" "$2" "${3:-2}"; }
side() {  # side NS TICKS SECS: "CPU% / RSS MB" of the processes in NS, TICKS of CPU over SECS
  local p=($(ip netns pids "$1"))
  [ ${#p[@]} -gt 0 ] || { echo "—"; return; }
  echo "$(div "${2}00" "$(( $3 * HZ ))" 1)% / $(div "$(rss_kb "${p[@]}")" 1024 1) MB"
}

# delay_run SIZE NAME NS IF: the analyzer on NS/IF (or no analyzer, with IF "-") during DELAY_S at
# 10 kpps. Sets DELAY to "p50 p99 max received sent", and SRC_10K and HUB_10K to each host's
# processes' "CPU% / RSS".
delay_run() {
  local size=$1 name=$2 ns=$3 ifc=$4 r out apid s0 h0 sp
  if [ "$ifc" != - ]; then
    rm -f "$work/log/recv-$name.err"
    r=$(( (run_id + 1) % 65536 ))
    on0 "$ns" "$UDPGEN" recv --iface "$ifc" --run "$r" --idle 3 --duration $((DELAY_S + 30)) \
      >"$work/log/recv-$name.out" 2>"$work/log/recv-$name.err" &
    apid=$!; started+=($apid)
    wait_for analyzer grep -q ready "$work/log/recv-$name.err"
  fi
  sp=($(ip netns pids "$NS_SRC")); s0=$(cpu_ticks "${sp[@]}"); h0=$(cpu_ticks $(ip netns pids "$NS_HUB"))
  gen "$size" 10000 "$DELAY_S"
  SRC_10K=$(side "$NS_SRC" "$(( $(cpu_ticks "${sp[@]}") - s0 ))" "$DELAY_S")
  HUB_10K=$(side "$NS_HUB" "$(( $(cpu_ticks $(ip netns pids "$NS_HUB")) - h0 ))" "$DELAY_S")
  DELAY="- - - 0 $SENT"
  [ "$ifc" != - ] || return 0
  wait "$apid"
  out=$(cat "$work/log/recv-$name.out")
  field() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" <<<"$out"; }
  DELAY="$(field p50_us) $(field p99_us) $(field max_us) $(field received) $SENT"
}

# Per-thread CPU of the pipeline's processes: "TID NAME TICKS" lines, then the split per delivered
# packet in the log, so that where a pipeline's time goes shows in every run.
thread_ticks() {
  local p t
  for p in "${PIPE_PIDS[@]}"; do
    for t in /proc/"$p"/task/*; do
      awk -v tid="${t##*/}" '{n = $0; sub(/^[^(]*\(/, "", n); sub(/\).*$/, "", n); sub(/^.*\) /, ""); print tid, n, $12 + $13}' "$t/stat" 2>/dev/null || true
    done
  done
}
thread_split() {  # DELIVERED: logs "name µs" per thread that ran, busiest first
  python3 - "$work/threads-0" "$work/threads-1" "$1" "$HZ" <<'PY' | while read -r l; do log "  $l"; done
import sys
def load(p):
    r = {}
    for line in open(p):
        tid, *name, t = line.split()
        r[tid] = (" ".join(name), int(t))
    return r
a, b, n, hz = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = sorted(((t - a.get(tid, (0, 0))[1], name, tid) for tid, (name, t) in b.items()), reverse=True)
for d, name, tid in rows:
    if d > 0:
        print(f"thread {name} ({tid}): {d * 1e6 / hz / max(n, 1):.2f} µs per packet")
PY
}

# cpu_trial SIZE: the traffic at 50 kpps for CPU_S, paced by sleeping. Sets PROC_US (CPU of the
# pipeline's processes per delivered packet, µs), BUSY_US (the machine's busy time per delivered
# packet, µs), CPU_OTHERS, CPU_SENT and CPU_DELIVERED. Others' load only adds busy time: while it is
# above 2%, the trial is run again (3 tries at most) and the least busy one kept.
cpu_trial() {
  local size=$1 try c0 m busy o us pu perf
  BUSY_US=""
  for try in 1 2 3; do
    others save cpu
    thread_ticks >"$work/threads-0"
    if [ -n "${PERF:-}" ] && [ "${#PIPE_PIDS[@]}" -gt 0 ]; then
      perf record -q -C 1 ${PERF_ARGS:--g} -o "$work/perf-$size-$try.data" -- sleep "$CPU_S" 2>/dev/null &
      perf=$!
    fi
    c0=$(cpu_ticks "${PIPE_PIDS[@]}"); m=$(machine_mark)
    PACE="sleep" trial "$size" 50000 "$CPU_S"
    busy=$(machine_busy_since "$m"); o=$(others since cpu)
    pu=$(div "$(( $(cpu_ticks "${PIPE_PIDS[@]}") - c0 ))e6" "$((DELIVERED * HZ))" 2)
    thread_ticks >"$work/threads-1"
    us=$(div "${busy}e6" "$DELIVERED" 3)
    [ "${#PIPE_PIDS[@]}" -eq 0 ] || thread_split "$DELIVERED"
    [ -z "${perf:-}" ] || { wait "$perf" || true; cp "$work/perf-$size-$try.data" "$PERF-$size-$try.data"; log "perf: $PERF-$size-$try.data"; perf=""; }
    if [ -z "$BUSY_US" ] || python3 -c "import sys; sys.exit(float(sys.argv[1]) >= float(sys.argv[2]))" "$us" "$BUSY_US"; then
      BUSY_US=$us PROC_US=$pu CPU_OTHERS=$o CPU_SENT=$SENT CPU_DELIVERED=$DELIVERED
    fi
    [ "${o%\%}" -gt 2 ] || break
    log "others' load $o during the CPU trial (try $try of 3)"
  done
}

# Reference, no mirror: the machine's busy time per packet received at 50 kpps, and the delay floor
# (generator → capture point).
declare -A REF_CPU REF_DELAY REF_OTHERS
reference() {
  local size=$1 m
  COUNT=src_rx
  PIPE_PIDS=()
  cpu_trial "$size"
  REF_CPU[$size]=$BUSY_US REF_OTHERS[$size]=$CPU_OTHERS
  delay_run "$size" "ref-$size" "$NS_SRC" src0
  REF_DELAY[$size]=$DELAY
}

ROWS=()
# measure NAME FUNCTION REINJECTS: one pipeline through every measurement, for every size.
measure() {
  local name=$1 fn=$2 reinjects=$3 size rc t0 idle flood_sent flood_pps flood_del
  local lo hi mid zl proc_us all_us d
  COUNT=span_rx
  rc=0; "$fn" || rc=$?
  if [ "$rc" -ne 0 ]; then
    stop_pipeline
    for size in $SIZES; do ROWS+=("| $name | $size B | not run | | | | | | | | | |"); done
    return
  fi
  PIPE_PIDS=($(pipeline_pids))
  sleep 1
  t0=$(cpu_ticks $(ip netns pids "$NS_SRC")); sleep "$IDLE_S"
  idle=$(side "$NS_SRC" "$(( $(cpu_ticks $(ip netns pids "$NS_SRC")) - t0 ))" "$IDLE_S")
  for size in $SIZES; do
    others save "$name"
    if [ -n "${CPU_ONLY:-}" ]; then
      cpu_trial "$size"
      log "$name, $size B: $PROC_US µs per packet (processes), $BUSY_US µs (machine), others $CPU_OTHERS"
      ROUND_CPU[$name,$round,$size]=$PROC_US
      continue
    fi
    log "$name, $size B: max rate"
    trial "$size" 0 "$FLOOD_S"; flood_sent=$SENT; flood_pps=$SENT_PPS; flood_del=$DELIVERED
    log "$name, $size B: $flood_pps pps offered, $flood_sent sent, $flood_del delivered"
    if [ "$flood_del" -ge "$flood_sent" ]; then
      zl="≥ $(fmt "$flood_pps") (max)"
    else
      lo=0; hi=$flood_pps; mid=$(( flood_del * 9 / 10 * flood_pps / flood_sent ))
      for _ in $(seq "$SEARCH_STEPS"); do
        [ "$mid" -gt 1000 ] || mid=1000
        trial "$size" "$mid" "$TRIAL_S"
        log "$name, $size B: $mid pps asked, $SENT_PPS offered, $SENT sent, $DELIVERED delivered"
        if [ "$DELIVERED" -ge "$SENT" ] && [ "$SENT_PPS" -ge $((mid * 97 / 100)) ]; then lo=$mid; else hi=$mid; fi
        mid=$(( (lo + hi) / 2 ))
      done
      if [ "$lo" -gt 0 ]; then zl=$(fmt "$lo"); else zl="< $(fmt "$hi")"; fi
    fi
    log "$name, $size B: CPU at 50 kpps"
    cpu_trial "$size"
    proc_us=$PROC_US
    all_us=$(python3 -c "import sys; b,r=map(float,sys.argv[1:]); print(f'{b-r:.2f}')" "$BUSY_US" "${REF_CPU[$size]}")
    [ "$name" != kernel ] || proc_us="—"
    [ "$CPU_DELIVERED" -ge "$CPU_SENT" ] || all_us="$all_us (lost $((CPU_SENT - CPU_DELIVERED)))"
    [ "${CPU_OTHERS%\%}" -le 2 ] || all_us="$all_us (others $CPU_OTHERS)"
    log "$name, $size B: delay at 10 kpps"
    check_alive
    if [ "$reinjects" = 1 ]; then
      delay_run "$size" "$name-$size" "$NS_SPAN" span0
      d=($DELAY); d="${d[0]} / ${d[1]} / ${d[2]} ($(pct "${d[3]}" "${d[4]}"))"
    else
      delay_run "$size" "$name-$size" "$NS_SPAN" -
      d="—"
    fi
    [ "$name" != kernel ] || { SRC_10K="—"; HUB_10K="—"; idle="—"; }
    ROWS+=("| $name | $size B | $(fmt "$flood_pps") | $(fmt "$((flood_del * flood_pps / flood_sent))") ($(pct "$flood_del" "$flood_sent")) | $zl | $proc_us | $all_us | $d | $SRC_10K | $idle | $HUB_10K | $(others since "$name") |")
  done
  stop_pipeline
}

# (e) Floors: what the kernel alone costs, on the same veths and core, for the two things any of
# these mirrors does per packet beyond capturing it: reinjecting it into hub1 over AF_PACKET
# (sendmmsg of up to 64 frames, as tapgraph's writer, without and with PACKET_QDISC_BYPASS; a
# PACKET_TX_RING with PACKET_QDISC_BYPASS flushed once per burst; one send per frame, as tcpreplay), and
# carrying it over a plain TCP connection from src to hub (no TLS, no HTTP/2), at 50 kpps in 1 ms
# bursts for CPU_S. Small C programs (bench/floor/), so nothing else is counted.
FLOOR_ROWS=()
floors() {
  local size r64 r64b rring r1 snd rp
  cc -O2 -o "$work/bin/reinject" bench/floor/reinject.c || return 1
  cc -O2 -o "$work/bin/tcpfloor" bench/floor/tcp.c || return 1
  floor_us() { sed -n 's/.*cpu_per_[a-z]*_us=\([0-9.]*\).*/\1/p' <<<"$1"; }
  for size in $SIZES; do
    log "floors, $size B"
    others save floor
    r64=$(on1 "$NS_HUB" "$work/bin/reinject" hub1 "$size" 50000 "$CPU_S" 64) || return 1
    r64b=$(BYPASS=1 on1 "$NS_HUB" "$work/bin/reinject" hub1 "$size" 50000 "$CPU_S" 64) || return 1
    rring=$(BYPASS=1 on1 "$NS_HUB" "$work/bin/reinject" hub1 "$size" 50000 "$CPU_S" -1) || return 1
    r1=$(on1 "$NS_HUB" "$work/bin/reinject" hub1 "$size" 50000 "$CPU_S" 0) || return 1
    on1 "$NS_HUB" "$work/bin/tcpfloor" recv 6000 "$size" >"$work/log/tcpfloor-recv.out" &
    rp=$!; started+=($rp)
    wait_for "floor receiver" sh -c "ip netns exec $NS_HUB ss -ltn | grep -q ':6000 '"
    snd=$(on1 "$NS_SRC" "$work/bin/tcpfloor" send 198.18.2.2 6000 "$size" 50000 "$CPU_S") || return 1
    wait "$rp"
    FLOOR_ROWS+=("| $size B | $(floor_us "$r64") | $(floor_us "$r64b") | $(floor_us "$rring") | $(floor_us "$r1") | $(floor_us "$snd") | $(floor_us "$(cat "$work/log/tcpfloor-recv.out")") | $(others since floor) |")
    ROUND_FLOOR[$round,$size]="$(floor_us "$r64") $(floor_us "$r64b") $(floor_us "$rring") $(floor_us "$snd") $(floor_us "$(cat "$work/log/tcpfloor-recv.out")")"
  done
}

declare -A ROUND_CPU=() ROUND_FLOOR=()
for size in $SIZES; do log "no mirror, $size B"; reference "$size"; done
for round in $(seq "$ROUNDS"); do
  [ "$ROUNDS" = 1 ] || log "round $round of $ROUNDS"
  for what in $ONLY; do
    case $what in
      capture) measure capture capture_alone 0 ;;
      kernel) measure kernel kernel_mirror 1 ;;
      naive) measure naive naive_pipeline 1 ;;
      tapgraph) tapgraph_build; measure tapgraph tapgraph_pipeline 1 ;;
      base) tapgraph_copy "${TAPGRAPH_BASE:?base: set TAPGRAPH_BASE=DIR, the binaries of another build}"
        measure base tapgraph_pipeline 1 ;;
      floor) floors || log "floors: not run" ;;
      *) echo "bench/mirror.sh: unknown pipeline $what (capture kernel naive tapgraph base floor)" >&2; exit 2 ;;
    esac
  done
done

echo
echo "RPS=$RPS: the monitored host's receive path runs on CPU $([ "$RPS" = 0 ] && echo "0, in the generator's send call" || echo "1, with the pipeline")."
echo "TRANSPORT_OFFLOADS=$TRANSPORT_OFFLOADS: src1/hub0 (src ↔ hub) $(in_ns "$NS_SRC" ethtool -k src1 | grep -E '^(tcp-segmentation-offload|generic-receive-offload):' | tr -s ' \n' ' ')"
for size in $SIZES; do
  r=(${REF_DELAY[$size]})
  echo "No mirror, $size B: the machine busy ${REF_CPU[$size]} µs per packet at 50 kpps (others' load ${REF_OTHERS[$size]}); delay gen → src0 (the capture point) p50 / p99 / max ${r[0]} / ${r[1]} / ${r[2]} µs."
done
echo
echo "| pipeline | frame | max rate offered (pps) | delivered at max rate (pps) | zero-loss rate (pps) | process CPU per packet at 50 kpps (µs) | machine CPU per packet at 50 kpps, above no mirror (µs) | delay p50 / p99 / max at 10 kpps, µs (share delivered) | src processes at 10 kpps: CPU / RSS | src idle: CPU / RSS | hub processes at 10 kpps: CPU / RSS | others' load |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
if [ -n "${CPU_ONLY:-}" ] && [ ${#ROUND_FLOOR[@]} -gt 0 ]; then
  echo
  echo "Per round: tapgraph's process CPU per packet against that round's floors (µs; cheapest reinjection)."
  echo
  echo "| frame | round | capture floor | TCP floor, sender + receiver | reinjection floor (cheapest) | sum of the floors | naive (tapgraph / naive) | base (TAPGRAPH_BASE; / floors) | tapgraph | tapgraph / floors |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for size in $SIZES; do
    ratios=()
    for round in $(seq "$ROUNDS"); do
      f=(${ROUND_FLOOR[$round,$size]:-})
      c=${ROUND_CPU[capture,$round,$size]:-}
      t=${ROUND_CPU[tapgraph,$round,$size]:-}
      b=${ROUND_CPU[base,$round,$size]:-0}
      n=${ROUND_CPU[naive,$round,$size]:-0}
      [ ${#f[@]} -eq 5 ] && [ -n "$c" ] && [ -n "$t" ] || continue
      row=$(python3 -c "import sys
r64, r64b, ring, snd, rcv, cap, tg, base, naive = map(float, sys.argv[1:])
floor = cap + snd + rcv + min(r64, r64b, ring)
b = f'{base:.2f} ({base / floor:.2f}×)' if base else '—'
n = f'{naive:.2f} ({tg / naive:.2f}×)' if naive else '—'
print(f'{cap:.2f} | {snd:.2f} + {rcv:.2f} | {min(r64, r64b, ring):.2f} | {floor:.2f} | {n} | {b} | {tg:.2f} | {tg / floor:.2f}')" "${f[@]}" "$c" "$t" "$b" "$n")
      ratios+=("${row##*| }")
      echo "| $size B | $round | $row× |"
    done
    [ ${#ratios[@]} -eq 0 ] || echo "| $size B | median of ${#ratios[@]} | | | | | | | | $(python3 -c "import sys, statistics; print(f'{statistics.median(map(float, sys.argv[1:])):.2f}')" "${ratios[@]}")× |"
  done
fi
if [ ${#FLOOR_ROWS[@]} -gt 0 ]; then
  echo
  echo "Floors at 50 kpps: CPU per packet (µs) of C programs doing only that, on the same veths and core."
  echo
  echo "| frame | reinjection into hub1, sendmmsg of ≤ 64 | the same, PACKET_QDISC_BYPASS | PACKET_TX_RING, PACKET_QDISC_BYPASS | reinjection, one send per frame | TCP src → hub, sender | TCP, receiver | others' load |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${FLOOR_ROWS[@]}"
fi
