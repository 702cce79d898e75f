#!/usr/bin/env bash
# Creates (up) or removes (down) N network namespaces rzab-ns0..N-1, each with one veth into a
# shared bridge and the address 10.77.0.(n+1)/24, for multi-host tests on one machine. Root only.
#   scripts/netns.sh up 3 | scripts/netns.sh down 3
set -euo pipefail
action=${1:?up or down}; count=${2:-3}
bridge=rzab-br0
if [ "$action" = up ]; then
  ip link add "$bridge" type bridge 2>/dev/null || true
  ip link set "$bridge" up
  for ((n = 0; n < count; n++)); do
    ns=rzab-ns$n
    ip netns add "$ns"
    ip link add "rzab-v$n" type veth peer name eth0 netns "$ns"
    ip link set "rzab-v$n" master "$bridge" up
    ip -n "$ns" addr add "10.77.0.$((n + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
else
  for ((n = 0; n < count; n++)); do ip netns del "rzab-ns$n" 2>/dev/null || true; ip link del "rzab-v$n" 2>/dev/null || true; done
  ip link del "$bridge" 2>/dev/null || true
fi
