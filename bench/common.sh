# Building blocks of the network-namespace benchmarks (bench/mirror.sh, bench/burst.sh), sourced
# by them, never run. Before sourcing, a script sets BENCH (its name, for messages) and `work` (its
# temporary directory, with log/ and bin/ under it). Nothing here starts a process by itself.

log() { echo "[$(date +%T)] $*" >&2; }
# wait_for WHAT COMMAND...: polls COMMAND for 20 s, then gives up and shows the logs.
wait_for() {
  local what=$1; shift
  for _ in $(seq 200); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "timed out waiting for $what; logs:"; tail -n 5 "$work"/log/* >&2; exit 1
}
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# remove_leftover_namespaces REGEX: namespaces named REGEX-PID (an earlier run that died without
# its trap, PID no longer alive): what runs in them is killed and they are deleted.
remove_leftover_namespaces() {
  local ns p
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$1-[0-9]+\$" || true); do
    kill -0 "${ns##*-}" 2>/dev/null && continue
    echo "$BENCH: removing leftover namespace $ns" >&2
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
}

# make_namespaces NS...: each with loopback up and no IPv6 (no router solicitations on the links).
make_namespaces() {
  local ns
  for ns; do
    ip netns add "$ns"
    in_ns "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$ns" link set lo up
  done
}
# veth NS_A IF_A NS_B IF_B: a link, up, with software segmentation on both ends (the UDP GSO of a
# generator included): every frame is a real frame no larger than the MTU, as on a wire.
veth() {
  ip link add "$2" netns "$1" type veth peer name "$4" netns "$3"
  for end in "$1 $2" "$3 $4"; do
    set -- $end
    for f in gro gso tso tx-udp-segmentation; do in_ns "$1" ethtool -K "$2" "$f" off >/dev/null 2>&1 || true; done
    ip -n "$1" link set "$2" up
  done
}
mac() { ip -n "$1" -br link show "$2" | awk '{print $3}'; }

# --- CPU accounting.
HZ=$(getconf CLK_TCK)
cpu_ticks() {  # utime+stime of the given processes (all their threads), in USER_HZ ticks
  local t=0 p v
  for p in "$@"; do
    v=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null) || continue
    t=$((t + v))
  done
  echo "$t"
}
rss_kb() {
  local t=0 p v
  for p in "$@"; do
    v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
# The machine's busy time, as wall time less idle time: NO_HZ measures idle periods exactly, while
# softirq and system time are sampled by a tick that a CPU woken from idle for a few µs of packet
# processing never takes. So this counts everything, the kernel's work included.
NCPU=$(nproc --all)   # not plain nproc: a script may be pinned
machine_mark() { echo "$(date +%s%N) $(awk '$1 == "cpu" {print $5 + $6 + $9}' /proc/stat)"; }
machine_busy_since() {  # MARK → CPU-seconds the machine was busy since
  local m=($1) n=($(machine_mark))
  python3 -c "import sys; w0,i0,w1,i1,hz,n=map(float,sys.argv[1:]); print(f'{n*(w1-w0)/1e9-(i1-i0)/hz:.4f}')" \
    "${m[0]}" "${m[1]}" "${n[0]}" "${n[1]}" "$HZ" "$NCPU"
}
# others save|since KEY: others' load, the CPU time of processes that are neither in the namespaces
# ALL_NS nor descendants of this script, between `save` and `since` (which prints it as a share of
# the machine). A process that exits during the window is counted through its parent's
# cutime/cstime (approximate: whole).
others() { python3 "$(dirname "${BASH_SOURCE[0]}")/others.py" "$1" "$work/others-$2.json" $$ "${ALL_NS[@]}"; }

# --- tapgraph: a controller and one enrolled agent named src, each in its namespace.
# tapgraph_start HUB_NS HUB_IP SRC_NS EXEC: the controller on HUB_IP (gRPC :7443, HTTP :7080), the
# agent in SRC_NS; EXEC NS CMD... runs a daemon (in_ns, or a wrapper that pins it). Binaries come
# from $work/bin; state goes to $work/tapgraph. Defines `ctl` (tapgraphctl as the operator). Each
# step that can fail says `|| return 1`: callers run it in an `||` list, where errexit is off.
tapgraph_start() {
  local hub=$1 ip=$2 src=$3 exec=$4 st=$work/tapgraph B=$work/bin tok
  TG_GRPC=$ip:7443 TG_HTTP=$ip:7080 TG_HUB_NS=$hub TG_STATE=$st
  rm -rf "$st"
  $exec "$hub" "$B/tapgraph-controller" --state-dir "$st/ctl" --listen "$TG_GRPC" \
    --http-listen "$TG_HTTP" --server-names "$ip" >"$work/log/controller.log" 2>&1 &
  started+=($!)
  wait_for controller grep -q "controller ready" "$work/log/controller.log"
  in_ns "$hub" "$B/tapgraph-controller" operator issue bench --state-dir "$st/ctl" \
    --listen "$TG_GRPC" --server-names "$ip" --out "$st/ctl.toml" >/dev/null || return 1
  tok=$(ctl token create -o json) || return 1
  json() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])" <<<"$tok"; }
  in_ns "$src" "$B/tapgraph-agent" enroll --controller "$TG_GRPC" --state-dir "$st/agent" --name src \
    --token "$(json token)" --ca-fingerprint "$(json ca_fingerprint)" >/dev/null || return 1
  TAPGRAPH_METRICS__LISTEN=off $exec "$src" "$B/tapgraph-agent" --controller "$TG_GRPC" \
    --state-dir "$st/agent" >"$work/log/agent.log" 2>&1 &
  started+=($!)
  wait_for agent ns_pid "$src" tapgraph-agent
  TG_AGENT=$(ns_pid "$src" tapgraph-agent) TG_CONTROLLER=$(ns_pid "$hub" tapgraph-contro)
}
ctl() { in_ns "$TG_HUB_NS" "$work/bin/tapgraphctl" --config "$TG_STATE/ctl.toml" "$@"; }
# ns_pid NS COMM: the process named COMM (as in /proc/PID/comm) running in NS, the oldest first.
ns_pid() {
  local p
  for p in $(ip netns pids "$1" 2>/dev/null | sort -n); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && { echo "$p"; return 0; }
  done
  return 1
}
