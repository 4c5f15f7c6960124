#!/usr/bin/env bash
# NAT seen through (issue 23): what reading conntrack adds to a snapshot, side by side with
# `conntrack -L` on the same table, in a network namespace made for it (torn down on exit).
#
#   sudo bench/conntrack.sh [N ...]        default: 10000 50000 (translated flows)
#   TAPGRAPH_BIN=DIR                        a release agent built elsewhere
#
# For each N: N TCP flows, one in ten of them DNAT'd (a node's mix: most flows are not
# translated), are loaded into the namespace's conntrack (`conntrack -R`, no traffic), then the median of 5 `conntrack -L` (conntrack-tools printing the table) against the
# agent's warm snapshot (reads 2-9 of 9) with those flows and with an empty table: the difference is
# what conntrack costs a snapshot. The namespace holds no socket, so the snapshot is that and the
# empty socket tables.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(10000 50000)
[ "$(id -u)" -eq 0 ] || { echo "bench/conntrack.sh: needs root (network namespace)" >&2; exit 1; }
command -v conntrack >/dev/null || { echo "bench/conntrack.sh: needs conntrack (Debian: conntrack)" >&2; exit 1; }

if [ -z "${TAPGRAPH_BIN:-}" ]; then
  cargo build --release --locked -p tapgraph-agent >/dev/null
  TAPGRAPH_BIN=${CARGO_TARGET_DIR:-target}/release
fi
agent=$TAPGRAPH_BIN/tapgraph-agent
ns=tgb-ct-$$
work=$(mktemp -d)
cleanup() { ip netns del "$ns" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
ip netns add "$ns"
ip -n "$ns" link set lo up
in_ns() { ip netns exec "$ns" "$@"; }
# A NAT rule makes the namespace track connections.
in_ns iptables -t nat -A OUTPUT -p tcp -d 10.96.0.0/16 -j DNAT --to-destination 10.0.0.2:8080

ms() { python3 -c "import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):.2f}')" "$@"; }
time_cmd() {  # median wall ms of 5 runs of "$@" (after one warm-up run)
  local runs=() s e
  "$@" >/dev/null 2>&1
  for _ in 1 2 3 4 5; do
    s=$(date +%s%N); "$@" >/dev/null 2>&1; e=$(date +%s%N)
    runs+=("$(( (e - s) / 1000 ))e-3")
  done
  ms "${runs[@]}"
}
snapshot() {  # "warm-median-ms cpu-mean-ms" of the agent's snapshot in the namespace
  local out
  out=$(in_ns "$agent" snapshot --repeat 9 --quiet 2>&1)
  echo "$(ms $(echo "$out" | sed -n 's/^read [2-9]: \([0-9.]*\) ms.*/\1/p'))" \
    "$(python3 -c "import sys,statistics; print(f'{statistics.mean(float(x) for x in sys.argv[1:]):.2f}')" $(echo "$out" | sed -n 's/^read [2-9]: .*(cpu \([0-9.]*\) ms).*/\1/p'))"
}

read -r empty_ms empty_cpu < <(snapshot)
printf '%-8s %-14s %-16s %-16s %-14s %-10s\n' "flows (1/10 NAT)" "conntrack -L" "snapshot empty" "snapshot+flows" "conntrack part" "ratio/-L"
for n in "${sizes[@]}"; do
  in_ns conntrack -F >/dev/null 2>&1 || true
  python3 - "$n" >"$work/flows" <<'PY'
import sys
for i in range(int(sys.argv[1])):
    nat = f" --dst-nat 10.0.{i % 200}.2:8053" if i % 10 == 0 else ""
    print(f"-I -p tcp -s 10.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1} -d 10.96.{i % 200}.10 "
          f"--sport {20000 + i % 40000} --dport 53 --state ESTABLISHED -u SEEN_REPLY,ASSURED -t 3600{nat}")
PY
  in_ns conntrack -R "$work/flows" >/dev/null 2>&1
  have=$(in_ns conntrack -C)
  list_ms=$(time_cmd in_ns conntrack -L)
  read -r with_ms with_cpu < <(snapshot)
  part=$(python3 -c "import sys; print(f'{float(sys.argv[1]) - float(sys.argv[2]):.2f}')" "$with_ms" "$empty_ms")
  ratio=$(python3 -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.2f}')" "$part" "$list_ms")
  printf '%-8s %-14s %-16s %-16s %-14s %-10s\n' "$have" "$list_ms ms" "$empty_ms ms" "$with_ms ms" "$part ms" "$ratio"
  echo "  cpu per snapshot: empty $empty_cpu ms, with $have flows $with_cpu ms"
done
