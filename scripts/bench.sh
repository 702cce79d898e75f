#!/usr/bin/env bash
# Measures rzab on this machine and prints markdown tables:
#  1. the raw message rate of the transports between two processes (rzab-transport-tool bench),
#     and what sealing and checking a datagram costs (CRC32C and MAC, rzab-transport-tool
#     seal-bench);
#  2. a 3-node cluster (shm, 1 worker each, adaptive polling, 1M keys, 32-byte values) at
#     0%, 5%, 50% and 100% writes: cluster throughput and write latency p50/p99/p99.9/max;
#  3. the same at 20% writes with 0%, 1% and 10% of every node's sends lost (plus 1%
#     duplicated and 1% reordered), against the lossless run;
#  4. how long a follower killed and restarted under load takes to catch up with 1M keys;
#  5. transactions of 32 B, 1 KiB, 64 KiB and 1 MiB at 100% writes (those past a 64 KiB
#     datagram travel as fragments): transactions/s, committed MB/s, write latency, and the
#     bare shared-memory ring's byte rate at 64 KiB datagrams (the consumer copying them out) measured in the same run;
#  6. leader failover: 20 leader kills (SIGKILL) in a row under a 20% write load, each old
#     leader restarted: how long each election took, as the nodes report it, and whether the
#     replicas end identical.
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
  ./target/release/rzab-transport-tool seal-bench --sizes 112,1024,4096,65536
  echo
fi

cluster=bench$$
logs=$(mktemp -d)
trap 'pkill -TERM -f "rzab-dataplane --cluster $cluster" 2>/dev/null || true; rm -rf "$logs" /dev/shm/rzab-$cluster-n* /dev/shm/rzab-fabric-$cluster' EXIT
# run_three ARGS...: a fresh 3-node cluster for $seconds with ARGS on every node, logs in $logs/N.log.
run_three() {
  rm -f /dev/shm/rzab-fabric-$cluster
  for n in 0 1 2; do
    ./target/release/rzab-dataplane --cluster "$cluster" --node "$n" --nodes 3 --duration "$seconds" \
      --knob stats_interval_ms=60000 "$@" >"$logs/$n.log" 2>&1 &
  done
  wait
}
# The nodes' summary lines, for the Python below: `summaries = json_summaries(logs)`.
summaries_py='import json
def json_summaries(logs):
    found = []
    for n in range(3):
        for line in open(f"{logs}/{n}.log"):
            if line.startswith("summary "):
                found.append(json.loads(line[8:]))
    return found'

echo "3 nodes, shm, 1 worker each, adaptive polling, 1M keys, 32 B values, 32 sessions per node, $seconds s per row"
echo "| writes | cluster M ops/s | M reads/s | M writes/s | write p50 (us) | write p99 (us) | write p99.9 (us) | write max (us) | replicas identical |"
echo "|---|---|---|---|---|---|---|---|---|"
for ratio in 0 50 500 1000; do
  run_three --write-ratio "$ratio"
  python3 - "$ratio" "$logs" "$summaries_py" <<'PY'
import sys
exec(sys.argv[3])
ratio, logs = int(sys.argv[1]), sys.argv[2]
summaries = json_summaries(logs)
if len(summaries) != 3:
    print(f"| {ratio/10:g}% | failed | | | | | | | |"); sys.exit(0)
reads = sum(s["reads"] / s["seconds"] for s in summaries)
writes = sum(s["writes"] / s["seconds"] for s in summaries)
# The worst node's figure for each column.
worst = lambda key: max(s[key] for s in summaries) / 1000
same = len({(s["applied_zxid"], s["digest"]) for s in summaries}) == 1
lat = lambda key: "-" if writes == 0 else f"{worst(key):.3g}" if worst(key) < 100 else f"{worst(key):.0f}"
columns = " | ".join(lat(f"write_{p}_ns") for p in ("p50", "p99", "p999", "max"))
print(f"| {ratio/10:g}% | {(reads+writes)/1e6:.2f} | {reads/1e6:.2f} | {writes/1e6:.3f} | {columns} | {'yes' if same else 'NO'} |")
PY
done
echo "(latency: the worst node's; p50/p99/p99.9 within 0.78% of the exact sample (log-linear histogram), max exact)"

# Transaction sizes: the key-value store's transaction is its value and an 8-byte key.
echo
ring=$(./target/release/rzab-transport-tool ring-rate --size 65536 --batch 16 --seconds 1)
echo "3 nodes, shm, 1 worker each, 100% writes, 8 sessions per node, $seconds s per row; bare shm ring copying 64 KiB datagrams out, batch 16: $(python3 -c "print(f'{$ring/1e9:.2f}')") GB/s"
echo "| transaction | keys | transactions/s | committed MB/s | vs bare ring | write p50 (us) | write p99 (us) | replicas identical |"
echo "|---|---|---|---|---|---|---|---|"
# The last row mixes transactions of 32 B and 1 MiB in one run (each session takes them in
# turn), so its byte rate is for their mean size.
for row in "32 1000000" "1024 100000" "65536 4096" "1048576 256" "1048576 256 32"; do
  read -r txn keys mixed <<<"$row"
  mix=()
  [ -n "${mixed:-}" ] && mix=(--value-mix "$((mixed - 8)),$((txn - 8))")
  run_three --write-ratio 1000 --sessions 8 --keys "$keys" --value-size $((txn - 8)) "${mix[@]}"
  python3 - "$txn" "$keys" "$ring" "$logs" "$summaries_py" "${mixed:-0}" <<'PY'
import sys
exec(sys.argv[5])
txn, keys, ring, logs = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
mixed = int(sys.argv[6])
summaries = json_summaries(logs)
size = lambda n: f"{n} B" if n < 1024 else f"{n // 1024} KiB" if n < 1 << 20 else f"{n >> 20} MiB"
label = f"{size(mixed)} and {size(txn)} in turn" if mixed else size(txn)
txn = (txn + mixed) / 2 if mixed else txn
if len(summaries) != 3:
    print(f"| {label} | {keys} | failed | | | | | |"); sys.exit(0)
writes = sum(s["writes"] / s["seconds"] for s in summaries)
rate = writes * txn
worst = lambda key: max(s[key] for s in summaries) / 1000
same = len({(s["applied_zxid"], s["digest"]) for s in summaries}) == 1
print(f"| {label} | {keys} | {writes:,.0f} | {rate/1e6:,.0f} | {rate/ring:.0%} | {worst('write_p50_ns'):.3g} | {worst('write_p99_ns'):.3g} | {'yes' if same else 'NO'} |")
PY
done

# Microsecond commits: 2 nodes (leader and one follower), one pinned to each core, busy
# polling, one session per node issuing one write at a time; and 3 nodes for the record (three
# busy processes on two cores: the scheduler's slices, not the protocol, set that latency).
# The limit: a round trip between the two cores over shared cache lines, as a commit needs a
# PREPARE out and an ACK back.
echo
# The best of three runs (by p50): a run that shared a core with something else says little.
read -r rtt_p50 rtt_p99 _ <<<"$(for _ in 1 2 3; do ./target/release/rzab-transport-tool ring-pingpong; done | sort -n | head -1)"
echo "1 worker per node pinned one per core, busy polling, 1 session per node, 100% writes, $seconds s per row; limit: a round trip between cores 0 and 1 over shared cache lines, p50 $rtt_p50 ns, p99 $rtt_p99 ns"
echo "| nodes | leader's writes/s | leader's write p50 (us) | p99 (us) | p50 against the round trip | follower's write p50 (us) | replicas identical (in step) |"
echo "|---|---|---|---|---|---|---|"
for nodes in 2 3; do
  rm -f /dev/shm/rzab-fabric-$cluster
  for ((n = 0; n < nodes; n++)); do
    ./target/release/rzab-dataplane --cluster "$cluster" --node "$n" --nodes "$nodes" --duration "$seconds" \
      --knob stats_interval_ms=60000 --poll-mode busy --pin on --sessions 1 --write-ratio 1000 \
      --keys 100000 >"$logs/$n.log" 2>&1 &
  done
  wait
  python3 - "$nodes" "$rtt_p50" "$logs" <<'PY'
import json, sys
nodes, rtt, logs = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
s = []
for n in range(nodes):
    for line in open(f"{logs}/{n}.log"):
        if line.startswith("summary "):
            s.append(json.loads(line[8:]))
if len(s) != nodes:
    print(f"| {nodes} | failed | | | | | |"); sys.exit(0)
leader, follower = s[0], s[1]
# With 3 busy pinned nodes on 2 cores, node 2 shares core 0 with the leader and starves: it
# is behind when the run ends (a quorum goes on without it), not diverged. Say so.
top = max(x["applied_zxid"] for x in s)
behind = [i for i, x in enumerate(s) if x["applied_zxid"] < top]
level = {x["digest"] for x in s if x["applied_zxid"] == top}
same = "yes" if len(level) == 1 else "NO"
if behind and len(level) == 1:
    same = "yes; " + ", ".join(f"node {i} {top - s[i]['applied_zxid']:,} writes behind" for i in behind)
p50 = leader["write_p50_ns"]
print(f"| {nodes} | {leader['writes'] / leader['seconds']:,.0f} | {p50 / 1000:.3g} | {leader['write_p99_ns'] / 1000:.3g} | {p50 / rtt:.1f}x | {follower['write_p50_ns'] / 1000:.3g} | {same} |")
PY
done

# Loss recovery: the same cluster (20% writes) with faults injected into every node's sends,
# against the lossless run; then the time a restarted follower takes to catch up.
echo
echo "3 nodes, shm, 1 worker each, 20% writes, $seconds s per row; faults injected into every node's sends"
echo "| injected loss | duplicated / reordered | cluster M ops/s | vs lossless | retransmissions (all nodes) | replicas identical |"
echo "|---|---|---|---|---|---|"
for loss in 0 1 10; do
  faults=()
  if ((loss > 0)); then faults=(--inject-loss "$loss" --inject-duplicate 1 --inject-reorder 1); fi
  run_three --write-ratio 200 "${faults[@]}"
  python3 - "$loss" "$logs" "$summaries_py" <<'PY'
import os, sys
exec(sys.argv[3])
loss, logs = int(sys.argv[1]), sys.argv[2]
summaries = json_summaries(logs)
if len(summaries) != 3:
    print(f"| {loss}% | | failed | | | |"); sys.exit(0)
ops = sum((s["reads"] + s["writes"]) / s["seconds"] for s in summaries)
base_file = f"{logs}/lossless"
if loss == 0:
    open(base_file, "w").write(str(ops))
base = float(open(base_file).read()) if os.path.exists(base_file) else ops
same = len({(s["applied_zxid"], s["store_digest"]) for s in summaries}) == 1
retransmissions = sum(s.get("retransmissions", 0) for s in summaries)
faults = "1% / 1%" if loss else "-"
print(f"| {loss}% | {faults} | {ops/1e6:.2f} | {100 * ops / base:.0f}% | {retransmissions} | {'yes' if same else 'NO'} |")
PY
done

# Catch-up: 1M keys; node 2 is killed after 3 s and restarted 1 s later, under load.
rm -f /dev/shm/rzab-fabric-$cluster
pids=()
for n in 0 1 2; do
  ./target/release/rzab-dataplane --cluster "$cluster" --node "$n" --nodes 3 --keys 1000000 \
    --write-ratio 200 --knob stats_interval_ms=60000 >"$logs/c$n.log" 2>&1 &
  pids+=($!)
done
sleep 3
kill -KILL "${pids[2]}"; wait "${pids[2]}" 2>/dev/null || true
sleep 1
./target/release/rzab-dataplane --cluster "$cluster" --node 2 --nodes 3 --keys 1000000 \
  --write-ratio 200 --knob stats_interval_ms=60000 >"$logs/c2b.log" 2>&1 &
pids[2]=$!
for _ in $(seq 1 300); do grep -q 'caught up' "$logs/c2b.log" && break; sleep 0.1; done
sleep 1
kill -TERM "${pids[@]}"; wait || true
echo
echo "Restarted follower catching up, 1M keys, 3 nodes, shm, 20% writes continuing:"
grep -h 'caught up' "$logs/c2b.log" || echo "did not catch up"
python3 - "$logs" <<'PY'
import json, sys
logs = sys.argv[1]
summaries = {}
for name in ("c0", "c1", "c2b"):
    for line in open(f"{logs}/{name}.log"):
        if line.startswith("summary "):
            summaries[name] = json.loads(line[8:])
same = len({(s["applied_zxid"], s["store_digest"]) for s in summaries.values()}) == 1 and len(summaries) == 3
print(f"stores identical after the run: {'yes' if same else 'NO'}")
PY

# Failover: 20 leader kills in a row under load (3 nodes, shm, 20% writes, default knobs), each
# killed leader restarted once the others lead and commit again.
echo
echo "Leader failover, 3 nodes, shm, 1 worker each, 20% writes, default knobs (election_timeout_ms 50, heartbeat_interval_ms 20):"
rm -f /dev/shm/rzab-fabric-$cluster
python3 - "$cluster" "$logs" <<'PY'
import json, re, signal, statistics, subprocess, sys, time
cluster, logs = sys.argv[1], sys.argv[2]
args = lambda n: ["./target/release/rzab-dataplane", "--cluster", cluster, "--node", str(n), "--nodes", "3",
                  "--keys", "100000", "--write-ratio", "200", "--knob", "stats_interval_ms=60000"]
procs, files, starts = {}, {}, {}
def start(n):
    starts[n] = starts.get(n, -1) + 1
    files[n] = f"{logs}/f{n}-{starts[n]}.log"
    procs[n] = subprocess.Popen(args(n), stdout=open(files[n], "w"), stderr=subprocess.STDOUT)
def log(n):
    return open(files[n]).read()
def wait(what, condition, seconds=30):
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.01)
for n in range(3):
    start(n)
time.sleep(2)
leader, epoch, rows = 0, 1, []
for kill in range(20):
    victim = leader
    others = [n for n in range(3) if n != victim]
    killed_at = time.time()
    procs[victim].send_signal(signal.SIGKILL)
    procs[victim].wait()
    pattern = re.compile(r"node (\d+) leads epoch (\d+) \(was .*the election took ([\d.]+) ms")
    def elected():
        found = [pattern.findall(log(n)) for n in others]
        return all(any(int(e) > epoch for _, e, _ in f) for f in found)
    wait(f"an election after kill {kill}", elected)
    seen = time.time() - killed_at
    found = [[m for m in pattern.findall(log(n)) if int(m[1]) > epoch][0] for n in others]
    new_leader, new_epoch = int(found[0][0]), int(found[0][1])
    took = max(float(m[2]) for m in found)
    start(victim)
    wait(f"node {victim} caught up", lambda: "caught up" in log(victim), 60)
    rows.append((kill, victim, new_leader, new_epoch, took, seen))
    leader, epoch = new_leader, new_epoch
    time.sleep(0.5)
for n in range(3):
    procs[n].send_signal(signal.SIGTERM)
for n in range(3):
    procs[n].wait()
summaries = []
for n in range(3):
    for line in log(n).splitlines():
        if line.startswith("summary "):
            summaries.append(json.loads(line[8:]))
same = len(summaries) == 3 and len({(s["applied_zxid"], s["store_digest"]) for s in summaries}) == 1
elections = [r[4] for r in rows]
print("| kills | new leader found every time | election, median (ms) | election, max (ms) | kill to both survivors logging the new leader, median (ms) | epochs | stores identical at the end |")
print("|---|---|---|---|---|---|---|")
print(f"| {len(rows)} | yes | {statistics.median(elections):.1f} | {max(elections):.1f} | {statistics.median(r[5] for r in rows) * 1000:.0f} | 1 to {rows[-1][3]} | {'yes' if same else 'NO'} |")
print("(election: from giving up the old leader, election_timeout_ms after its last message, to following or leading the next, as each survivor reports it; the logging time adds the timeout and the reporting thread's 50 ms poll)")
PY
