#!/usr/bin/env bash
# What naming every TCP client's process costs (issue 23, part 1): agent CPU per 1,000
# connections a second with the BPF connect tracer and without it, side by side in the same run.
#
#   sudo bench/bpf-cost.sh                       # rates 0 and 1000/s, 30 s each: ≈ 2 minutes
#   sudo RATES="0 250 1000 2000" ROW_S=60 bench/bpf-cost.sh
#   sudo TAPGRAPH_BIN=/work/tgt-bpf/release bench/bpf-cost.sh   # binaries already built
#
# Hosts are network namespaces made here and deleted on exit:
#
#   cli ──── srv            cli: the load (a paced Python client: connect, GET, read to EOF, close)
#    └────── hub                 and TWO agents of the same build, `bpf` (snapshot.bpf = true)
#                                and `nobpf` (snapshot.bpf = false), both enrolled, both with
#                                the SYN-ACK capture, both reading the same sockets;
#                           srv: nginx (port 80, no keep-alive); hub: the controller.
#
# Both agents see the same connections at the same time, so their difference is the tracer's cost
# whatever else the machine does. Columns, per row (RATE connections a second for ROW_S seconds):
# - achieved: connections the client completed per second;
# - agent CPU, bpf / nobpf: utime+stime of each agent over the row, as a share of one core. The
#   bpf agent does not start the SYN-ACK capture (the tracepoint sees accepts too); the nobpf one
#   is today's agent without BPF: the capture wakes it for every new connection;
# - BPF in kernel: the program's own run time (kernel.bpf_stats_enabled), per run (it runs on
#   every TCP state change of the machine, every namespace's and other users' too), per
#   connection of the load, and as a share of a core; it runs in the connecting process's context
#   (and softirq), so it is charged to the clients, not to the agent: it is the rest of the
#   tracer's cost;
# - connects read: the bpf agent's tapgraph_bpf_connects over the row, and its drops
#   (tapgraph_bpf_dropped_connects, every reason);
# - others: CPU of processes that are not this benchmark's, as a share of the machine.
# The snapshot interval is the default policy's (15 s).
set -euo pipefail
BENCH=bench/bpf-cost.sh
RATES=${RATES:-0 1000}
ROW_S=${ROW_S:-30}
[ "$(id -u)" -eq 0 ] || { echo "$BENCH: needs root (namespaces, BPF)" >&2; exit 1; }
for tool in nginx python3 bpftool curl; do
  command -v "$tool" >/dev/null || { echo "$BENCH: $tool missing: run scripts/install-deps" >&2; exit 1; }
done
source "$(dirname "$0")/common.sh"

NS_CLI=tgbpf-cli-$$ NS_SRV=tgbpf-srv-$$ NS_HUB=tgbpf-hub-$$
ALL_NS=("$NS_CLI" "$NS_SRV" "$NS_HUB")
remove_leftover_namespaces 'tgbpf-(cli|srv|hub)'
work=$(mktemp -d /tmp/bpf-cost.XXXXXX)
started=()
stats_before=$(sysctl -n kernel.bpf_stats_enabled)
cleanup() {
  sysctl -qw kernel.bpf_stats_enabled="$stats_before" || true
  for p in "${started[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for ns in "${ALL_NS[@]}"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$p" 2>/dev/null || true; done
  done
  wait 2>/dev/null
  for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
  [ -n "${KEEP_LOGS:-}" ] && mkdir -p "$KEEP_LOGS" && cp -r "$work/log/." "$KEEP_LOGS/"
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$work/bin" "$work/log"

if [ -z "${TAPGRAPH_BIN:-}" ]; then
  cargo build --release --locked -p tapgraph-agent -p tapgraph-controller -p tapgraph-ctl >/dev/null
fi
cp "${TAPGRAPH_BIN:-${CARGO_TARGET_DIR:-target}/release}"/{tapgraph-agent,tapgraph-controller,tapgraphctl} "$work/bin/"
B=$work/bin

make_namespaces "${ALL_NS[@]}"
veth "$NS_CLI" cli0 "$NS_SRV" srv0
veth "$NS_CLI" cli1 "$NS_HUB" hub0
ip -n "$NS_CLI" addr add 198.18.1.1/24 dev cli0
ip -n "$NS_SRV" addr add 198.18.1.2/24 dev srv0
ip -n "$NS_CLI" addr add 198.18.2.1/24 dev cli1
ip -n "$NS_HUB" addr add 198.18.2.2/24 dev hub0
# The server closes first (no keep-alive), so its side holds the TIME_WAITs; the client may
# still reuse its own at 1,000+/s.
in_ns "$NS_CLI" sysctl -qw net.ipv4.tcp_tw_reuse=1 net.ipv4.ip_local_port_range="10000 65000"

cat >"$work/nginx.conf" <<EOF
daemon off; worker_processes 1; pid $work/nginx.pid; error_log $work/log/nginx-error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_timeout 0;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work; uwsgi_temp_path $work; scgi_temp_path $work;
  server { listen 80 backlog=4096; location / { return 200 "ok\n"; } } }
EOF
in_ns "$NS_SRV" nginx -c "$work/nginx.conf" -e "$work/log/nginx-startup.log" &
started+=($!)
wait_for nginx in_ns "$NS_CLI" curl -fsS -o /dev/null http://198.18.1.2/

# The controller, an operator, and the two agents (each enrolled with a token of its own).
st=$work/state
in_ns "$NS_HUB" "$B/tapgraph-controller" --state-dir "$st/ctl" --listen 198.18.2.2:7443 \
  --http-listen 198.18.2.2:7080 --server-names 198.18.2.2 >"$work/log/controller.log" 2>&1 &
started+=($!)
wait_for controller grep -q "controller ready" "$work/log/controller.log"
in_ns "$NS_HUB" "$B/tapgraph-controller" operator issue bench --state-dir "$st/ctl" \
  --listen 198.18.2.2:7443 --server-names 198.18.2.2 --out "$st/ctl.toml" >/dev/null
ctl() { in_ns "$NS_HUB" "$B/tapgraphctl" --config "$st/ctl.toml" "$@"; }
declare -A AGENT
for name in bpf nobpf; do
  tok=$(ctl token create -o json)
  field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])" <<<"$tok"; }
  in_ns "$NS_CLI" "$B/tapgraph-agent" enroll --controller 198.18.2.2:7443 --state-dir "$st/$name" \
    --name "$name" --token "$(field token)" --ca-fingerprint "$(field ca_fingerprint)" >/dev/null
  port=9464; [ "$name" = nobpf ] && port=9465
  bpf=true; [ "$name" = nobpf ] && bpf=false
  TAPGRAPH_METRICS__LISTEN=127.0.0.1:$port TAPGRAPH_SNAPSHOT__BPF=$bpf ip netns exec "$NS_CLI" \
    "$B/tapgraph-agent" --controller 198.18.2.2:7443 --state-dir "$st/$name" \
    >"$work/log/agent-$name.log" 2>&1 &
  started+=($!)
  AGENT[$name]=$!
done
# `ip netns exec` execs the agent: the pid started is the agent's.
for name in bpf nobpf; do
  wait_for "agent $name connected" sh -c "grep -q 'connected to controller' '$work/log/agent-$name.log'"
done
grep -q "BPF connect tracing on" "$work/log/agent-bpf.log" || {
  log "the bpf agent did not start its tracer:"; grep -i bpf "$work/log/agent-bpf.log" >&2; exit 1; }

metrics() { in_ns "$NS_CLI" curl -fsS "http://127.0.0.1:$1/metrics"; }
bpf_read() { metrics 9464 | awk '/^tapgraph_bpf_connects_total/ {print $2}'; }
bpf_dropped() { metrics 9464 | awk '/^tapgraph_bpf_dropped_connects_total/ {s += $2} END {print s + 0}'; }
# The bpf agent's program: run time (ns) and runs so far. Its id is in the fdinfo of the
# descriptors the agent holds (bpftool here cannot list programs by pid).
prog_ids() { grep -hs '^prog_id:' /proc/"${AGENT[bpf]}"/fdinfo/* | awk '{print $2}' | sort -u; }
prog_stats() {
  local t=0 n=0 id v
  for id in $(prog_ids); do
    v=$(bpftool prog show id "$id" -j | python3 -c "import json,sys; p=json.load(sys.stdin); print(p.get('run_time_ns', 0), p.get('run_cnt', 0))")
    t=$((t + ${v% *})); n=$((n + ${v#* }))
  done
  echo "$t $n"
}

cat >"$work/client.py" <<'EOF'
import socket, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
n = int(rate * seconds); done = 0
t0 = time.monotonic()
req = b"GET / HTTP/1.0\r\nHost: srv\r\n\r\n"
for i in range(n):
    d = t0 + i / rate - time.monotonic()
    if d > 0:
        time.sleep(d)
    try:
        s = socket.create_connection(("198.18.1.2", 80), timeout=5)
        s.sendall(req)
        while s.recv(4096):
            pass
        s.close()
        done += 1
    except OSError as e:
        print("connect failed:", e, file=sys.stderr)
took = max(time.monotonic() - t0, seconds)
print(f"{done} {took:.3f}")
EOF

sysctl -qw kernel.bpf_stats_enabled=1
# Settle: the agents' first snapshots and caches.
sleep 5
printf '| rate (conn/s) | achieved | agent CPU, bpf | agent CPU, nobpf (SYN-ACK capture) | bpf − nobpf | BPF in kernel, per run (runs) | BPF in kernel, per connection | BPF in kernel, share of a core | connects read (dropped) | others |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for rate in $RATES; do
  others save "$rate"
  t0=$(date +%s%N)
  a0=$(cpu_ticks "${AGENT[bpf]}") n0=$(cpu_ticks "${AGENT[nobpf]}")
  read -r k0 c0 < <(prog_stats)
  r0=$(bpf_read) d0=$(bpf_dropped)
  if [ "$rate" = 0 ]; then
    sleep "$ROW_S"; achieved="0"; done=0
  else
    read -r done took < <(in_ns "$NS_CLI" python3 "$work/client.py" "$rate" "$ROW_S" 2>>"$work/log/client.log")
    achieved=$(python3 -c "print(f'{$done/$took:.0f}/s')")
  fi
  t1=$(date +%s%N)
  a1=$(cpu_ticks "${AGENT[bpf]}") n1=$(cpu_ticks "${AGENT[nobpf]}")
  read -r k1 c1 < <(prog_stats)
  r1=$(bpf_read) d1=$(bpf_dropped)
  oth=$(others since "$rate")
  python3 - "$done" "$rate" "$achieved" "$t0" "$t1" "$a0" "$a1" "$n0" "$n1" "$k0" "$k1" "$c0" "$c1" "$r0" "$r1" "$d0" "$d1" "$oth" "$HZ" <<'EOF'
import sys
(conns, rate, achieved, t0, t1, a0, a1, n0, n1, k0, k1, c0, c1, r0, r1, d0, d1, oth, hz) = sys.argv[1:]
wall = (int(t1) - int(t0)) / 1e9
hz = float(hz)
share = lambda ticks: 100 * ticks / hz / wall
a, n = share(int(a1) - int(a0)), share(int(n1) - int(n0))
runs = int(c1) - int(c0)
kns = int(k1) - int(k0)
per = f"{kns / runs / 1000:.2f} µs ({runs})" if runs else "-"
per_conn = f"{kns / int(conns) / 1000:.2f} µs" if int(conns) else "-"
kshare = f"{100 * kns / 1e9 / wall:.3f}%"
read = float(r1) - float(r0)
drop = float(d1) - float(d0)
print(f"| {rate} | {achieved} | {a:.2f}% | {n:.2f}% | {a - n:+.2f}% | {per} | {per_conn} | {kshare} | {read:.0f} ({drop:.0f}) | {oth} |")
EOF
done
