#!/usr/bin/env bash
# Snapshot benchmark (issues 5 and 23): the agent's connection-table read with process attribution
# and, over sock_diag, every TCP socket's tcp_info turned into per-flow traffic increments, side by
# side with `ss -tanp`, `ss -tanpi` (the same with tcp_info) and a plain read of /proc/net/tcp*, on
# the same established loopback connections, in the same run, inside a network namespace made for
# it (torn down on exit). The connections have moved data, so their counters are real.
#
#   sudo bench/conntable.sh [N ...]        default: 10000 50000 (connections; 2N sockets)
#
# Prints a table: per N (sockets: 2N), median milliseconds of ss, ss -i and cat over 5 runs; the
# agent's median warm read (reads 2-9 of 9) with the /proc/net reader, with sock_diag but without
# tcp_info (--no-tcp-info, "agent -info"), and with its default sock_diag reader (tcp_info and
# traffic), and the latter's ratio to `ss -tanp` and to `ss -tanpi`; its first (cold-cache) read;
# its mean CPU per warm read and that as a share of a core at a 15 s interval; its peak RSS; the
# load average while it ran (others may share the machine: the ratios come from one run and
# still hold).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(10000 50000)
[ "$(id -u)" -eq 0 ] || { echo "bench/conntable.sh: needs root (network namespace)" >&2; exit 1; }

cargo build --release --locked -p tapgraph-agent >/dev/null
agent=${CARGO_TARGET_DIR:-$PWD/target}/release/tapgraph-agent
ns=tgb-conn-$$
work=$(mktemp -d)
pids=()
cleanup() {
  # `ip netns exec` may fork, and a holder may ignore SIGTERM (inherited): kill them by script path.
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  pkill -KILL -f "$work/hold.py" 2>/dev/null || true
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
ip netns add "$ns"
ip -n "$ns" link set lo up
in_ns() { ip netns exec "$ns" "$@"; }

# One holder process per 8,000 connections (16,000 descriptors: under the 20,000 per-process limit):
# it listens on its own port, connects to itself N times, accepts, and holds everything open.
cat >"$work/hold.py" <<'PY'
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(4096)
held = []
for i in range(n):
    c = socket.create_connection(("127.0.0.1", port)); s, _ = srv.accept(); held += [c, s]
    # Some bytes each way, so every socket's tcp_info has counters and an RTT sample.
    c.sendall(b"q" * 100); s.recv(100); s.sendall(b"a" * 1000); c.recv(1000)
print("ready", flush=True)
time.sleep(3600)
PY

ms() { python3 -c "import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):.1f}')" "$@"; }
time_cmd() {  # median wall ms of 5 runs of "$@" (after one warm-up run)
  local runs=() s e
  "$@" >/dev/null 2>&1
  for _ in 1 2 3 4 5; do
    s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N)
    runs+=("$(( (e - s) / 1000 ))e-3")
  done
  ms "${runs[@]}"
}

printf '%-8s %-10s %-10s %-10s %-12s %-12s %-12s %-9s %-10s %-10s %-9s %-10s %-9s %-s\n' sockets "ss -tanp" "ss -tanpi" "cat /proc" "agent/proc" "agent -info" "agent warm" "ratio/ss" "ratio/ss-i" "agent cold" "cpu/read" "peak RSS" "cpu@15s" "load avg"
held=0; port=20000
for n in "${sizes[@]}"; do
  while [ "$held" -lt "$n" ]; do
    chunk=$(( n - held < 8000 ? n - held : 8000 ))
    in_ns python3 "$work/hold.py" "$port" "$chunk" >"$work/hold-$port.log" 2>&1 &
    pids+=($!)
    until grep -q ready "$work/hold-$port.log" 2>/dev/null; do sleep 0.2; done
    held=$(( held + chunk )); port=$(( port + 1 ))
  done
  ss_ms=$(time_cmd in_ns ss -tanp)
  ssi_ms=$(time_cmd in_ns ss -tanpi)
  cat_ms=$(time_cmd in_ns cat /proc/net/tcp /proc/net/tcp6)
  # Nine reads: the cold one, then eight warm ones, a whole re-check rotation of the cache.
  proc_out=$(in_ns "$agent" snapshot --reader proc --repeat 9 --quiet 2>&1)
  proc_warm=$(ms $(echo "$proc_out" | sed -n 's/^read [2-9]: \([0-9.]*\) ms.*/\1/p'))
  bare_out=$(in_ns "$agent" snapshot --no-tcp-info --repeat 9 --quiet 2>&1)
  bare=$(ms $(echo "$bare_out" | sed -n 's/^read [2-9]: \([0-9.]*\) ms.*/\1/p'))
  out=$(in_ns "$agent" snapshot --repeat 9 --quiet 2>&1)
  cold=$(echo "$out" | sed -n 's/^read 1: \([0-9.]*\) ms.*/\1/p')
  warm=$(ms $(echo "$out" | sed -n 's/^read [2-9]: \([0-9.]*\) ms.*/\1/p'))
  cpu=$(python3 -c "import sys,statistics; print(f'{statistics.mean(float(x) for x in sys.argv[1:]):.1f}')" $(echo "$out" | sed -n 's/^read [2-9]: .*(cpu \([0-9.]*\) ms).*/\1/p'))
  rss=$(echo "$out" | sed -n 's/.*peak RSS \([0-9]*\) kB.*/\1/p')
  ratio=$(python3 -c "print(f'{$warm/$ss_ms:.2f}')")
  ratio_i=$(python3 -c "print(f'{$warm/$ssi_ms:.2f}')")
  share=$(python3 -c "print(f'{$cpu/15000*100:.3f}%')")
  measured=$(echo "$out" | sed -n 's/^read 9: .* \([0-9]*\) with tcp_info.*/\1/p')
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  printf '%-8s %-10s %-10s %-10s %-12s %-12s %-12s %-9s %-10s %-10s %-9s %-10s %-9s %-s\n' "$((2*n))" "$ss_ms" "$ssi_ms" "$cat_ms" "$proc_warm" "$bare" "$warm" "$ratio" "$ratio_i" "$cold" "$cpu" "${rss}kB" "$share" "$load"
  echo "  (agent read 9: $measured sockets with tcp_info)"
done
