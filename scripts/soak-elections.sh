#!/usr/bin/env bash
# Counts spurious elections: runs a 3-node cluster (release build, shm, one worker per node,
# the default knobs: election_timeout_ms 50, heartbeat_interval_ms 20) under a full client
# load for --minutes (10 by default) with no fault injected, so every election it counts is
# one the failure detector started for a leader that was alive (three busy processes share
# this machine's two cores and are descheduled for milliseconds). Prints a markdown table.
#
#   scripts/soak-elections.sh [--minutes 10] [--write-ratio 200] [--knob NAME=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=10 ratio=200 knobs=()
while (($#)); do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --write-ratio) ratio="$2"; shift 2 ;;
    --knob) knobs+=(--knob "$2"); shift 2 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
cargo build --release --bin rzab-dataplane -q
cluster=soak$$
logs=$(mktemp -d)
trap 'pkill -TERM -f "rzab-dataplane --cluster $cluster" 2>/dev/null || true; rm -rf "$logs" /dev/shm/rzab-$cluster-n* /dev/shm/rzab-fabric-$cluster' EXIT
seconds=$((minutes * 60))
echo "==> 3 nodes, shm, ${ratio}‰ writes, ${seconds} s, no faults${knobs[*]:+, ${knobs[*]}}"
for n in 0 1 2; do
  ./target/release/rzab-dataplane --cluster "$cluster" --node "$n" --nodes 3 --keys 100000 \
    --write-ratio "$ratio" --duration "$seconds" --knob stats_interval_ms=60000 "${knobs[@]}" \
    >"$logs/$n.log" 2>&1 &
done
wait
python3 - "$logs" "$minutes" "$ratio" <<'PY'
import json, sys
logs, minutes, ratio = sys.argv[1], sys.argv[2], int(sys.argv[3])
summaries = []
for n in range(3):
    for line in open(f"{logs}/{n}.log"):
        if line.startswith("summary "):
            summaries.append(json.loads(line[8:]))
        elif "leads epoch" in line:
            print("   ", line.rstrip())
if len(summaries) != 3:
    sys.exit("a node did not finish: " + " ".join(open(f"{logs}/{n}.log").read()[-400:] for n in range(3)))
ops = sum(s["reads"] + s["writes"] for s in summaries) / summaries[0]["seconds"]
same = len({(s["applied_zxid"], s["store_digest"]) for s in summaries}) == 1
elections = sum(s["elections"] for s in summaries)
print("| run | cluster M ops/s | elections started (all nodes) | epoch at the end | replicas identical |")
print("|---|---|---|---|---|")
print(f"| {minutes} min, {ratio/10:g}% writes, no faults | {ops/1e6:.2f} | {elections} | {max(s['epoch'] for s in summaries)} | {'yes' if same else 'NO'} |")
PY
