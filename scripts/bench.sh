#!/usr/bin/env bash
# Measures rzab on this machine and prints markdown tables:
#  1. the raw message rate of the transports between two processes (rzab-transport-tool bench);
#  2. a 3-node cluster (shm, 1 worker each, adaptive polling, 1M keys, 32-byte values) at
#     0%, 5%, 50% and 100% writes: cluster throughput and write latency p50/p99.
#   scripts/bench.sh [--seconds 5] [--skip-transport]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=5 skip_transport=0
while (($#)); do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --skip-transport) skip_transport=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release --bins -q

if ((skip_transport == 0)); then
  ./target/release/rzab-transport-tool bench --seconds 1 --runs 3
  echo
fi

cluster=bench$$
logs=$(mktemp -d)
trap 'pkill -TERM -f "rzab-dataplane --cluster $cluster" 2>/dev/null || true; rm -rf "$logs" /dev/shm/rzab-$cluster-n* /dev/shm/rzab-fabric-$cluster' EXIT
echo "3 nodes, shm, 1 worker each, adaptive polling, 1M keys, 32 B values, 32 sessions per node, $seconds s per row"
echo "| writes | cluster M ops/s | M reads/s | M writes/s | write p50 (us) | write p99 (us) | replicas identical |"
echo "|---|---|---|---|---|---|---|"
for ratio in 0 50 500 1000; do
  rm -f /dev/shm/rzab-fabric-$cluster
  for n in 0 1 2; do
    ./target/release/rzab-dataplane --cluster "$cluster" --node "$n" --nodes 3 --duration "$seconds" \
      --write-ratio "$ratio" --knob stats_interval_ms=60000 >"$logs/$n.log" 2>&1 &
  done
  wait
  python3 - "$ratio" "$logs" <<'PY'
import json, sys
ratio, logs = int(sys.argv[1]), sys.argv[2]
summaries = []
for n in range(3):
    for line in open(f"{logs}/{n}.log"):
        if line.startswith("summary "):
            summaries.append(json.loads(line[8:]))
if len(summaries) != 3:
    print(f"| {ratio/10:g}% | failed | | | | | |"); sys.exit(0)
reads = sum(s["reads"] / s["seconds"] for s in summaries)
writes = sum(s["writes"] / s["seconds"] for s in summaries)
p50 = max(s["write_p50_ns"] for s in summaries) / 1000
p99 = max(s["write_p99_ns"] for s in summaries) / 1000
same = len({(s["applied_zxid"], s["digest"]) for s in summaries}) == 1
lat = lambda v: "-" if writes == 0 else f"< {v:g}"
print(f"| {ratio/10:g}% | {(reads+writes)/1e6:.2f} | {reads/1e6:.2f} | {writes/1e6:.3f} | {lat(p50)} | {lat(p99)} | {'yes' if same else 'NO'} |")
PY
done
echo "(latency columns are log2 histogram bucket upper bounds)"
