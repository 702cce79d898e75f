# shellcheck shell=bash
# Functions shared by run-local.sh and run-cluster.sh (sourced, not run): errors, installing
# missing Debian packages, free-port checks, and the live line computed from the control
# planes' Prometheus /metrics.

# Prints an error and exits with status 2 (bad usage) or the given status.
die() {
  echo "error: $1" >&2
  exit "${2:-2}"
}

# Checks that an option has a value: need_value OPTION "$@".
need_value() {
  if (($# < 2)) || [[ -z "$2" || "$2" == --* ]]; then
    die "$1 needs a value (see --help)"
  fi
}

# Checks that a value is a non-negative integer within [min, max]: check_int NAME VALUE MIN MAX.
check_int() {
  if ! [[ "$2" =~ ^(0|[1-9][0-9]{0,8})$ ]] || (($2 < $3 || $2 > $4)); then
    die "$1 $2: expected an integer from $3 to $4"
  fi
}

# Installs the Debian packages named (those not installed yet), saying what it does and why.
# apt_install WHY PACKAGE...
apt_install() {
  local why=$1 missing=() package
  shift
  for package in "$@"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  ((${#missing[@]})) || return 0
  command -v apt-get >/dev/null ||
    die "${missing[*]} missing ($why) and apt-get is not available: install it with your package manager" 1
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "${missing[*]} missing ($why): run as root or install sudo" 1
    sudo=(sudo)
  fi
  echo "==> installing ${missing[*]} ($why): apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Whether something accepts TCP connections on HOST:PORT.
port_in_use() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

# Prints the first port from START (inclusive) on which nothing listens on 127.0.0.1.
free_port() {
  local port=$1
  while port_in_use 127.0.0.1 "$port"; do
    port=$((port + 1))
    ((port < 65536)) || die "no free port above $1" 1
  done
  echo "$port"
}

# Waits until HOST:PORT accepts connections or the process PID has exited; returns 1 then.
wait_listening() {
  local host=$1 port=$2 pid=$3 tries=0
  until port_in_use "$host" "$port"; do
    kill -0 "$pid" 2>/dev/null || return 1
    tries=$((tries + 1))
    ((tries < 300)) || return 1
    sleep 0.1
  done
}

# Scrapes every BASE URL's /metrics (curl, 1 s timeout) and prints one line of cluster totals:
#   scraped reads writes prepare_entries prepare_messages write_entries write_messages
#   ack_entries ack_messages commit_entries commit_messages broadcasts_multicast
#   broadcasts_unicast dataplanes_up multicast_knob_min LE=COUNT...
# where the LE=COUNT fields are rzab_write_latency_seconds_bucket summed over the nodes, one
# per bound in ascending order (+Inf last; none while no data plane is attached).
# A node whose control plane does not answer is left out (and not counted in `scraped`).
scrape_totals() {
  local url
  for url in "$@"; do
    if curl -fsS --max-time 1 "$url/metrics" 2>/dev/null; then
      echo "# end-of-node"
    fi
  done | awk '
    function label(name,   found) {
      if (match($0, name "=\"[a-z_]+\"")) {
        found = substr($0, RSTART + length(name) + 2, RLENGTH - length(name) - 3)
        return found
      }
      return ""
    }
    /^# end-of-node/ { scraped++ }
    /^rzab_operations_total\{/ { ops[label("kind")] += $NF }
    /^rzab_batch_entries_total\{/ { entries[label("type")] += $NF }
    /^rzab_batch_messages_total\{/ { messages[label("type")] += $NF }
    /^rzab_messages_sent_total\{/ {
      type = label("type")
      if (type == "prepare" || type == "commit") sent[label("path")] += $NF
    }
    /^rzab_dataplane_up\{/ { up += $NF }
    /^rzab_write_latency_seconds_bucket\{/ {
      if (match($0, /[{,]le="[^"]+"/)) {
        le = substr($0, RSTART + 5, RLENGTH - 6)
        if (!(le in latency)) bounds[++nbounds] = le
        latency[le] += $NF
      }
    }
    /^rzab_knob_value\{/ {
      if (label("knob") == "multicast") {
        if (mc == "" || $NF + 0 < mc + 0) mc = $NF
      }
    }
    END {
      if (mc == "") mc = -1
      printf "%d %.0f %.0f", scraped, ops["read"], ops["write"]
      n = split("prepare write ack commit", types, " ")
      for (i = 1; i <= n; i++) printf " %.0f %.0f", entries[types[i]], messages[types[i]]
      printf " %.0f %.0f %d %d", sent["multicast"], sent["unicast"], up, mc
      for (i = 1; i <= nbounds; i++) printf " %s=%.0f", bounds[i], latency[bounds[i]]
      printf "\n"
    }'
}

# Prints the live line from two scrape_totals lines taken SECONDS apart, with the write
# latency percentiles of the interval computed as Prometheus's histogram_quantile does (linear
# inside the exported log-linear bucket, within 1.6% of the data planes' own figures):
# live_line SECONDS NODES "BEFORE" "NOW"
live_line() {
  awk -v seconds="$1" -v nodes="$2" -v before="$3" -v now="$4" '
    function rate(i) { return (n[i] - b[i]) / seconds }
    function avg(i) { return (n[i + 1] - b[i + 1]) > 0 ? (n[i] - b[i]) / (n[i + 1] - b[i + 1]) : 0 }
    function micros(v) {
      v *= 1e6
      return v < 10 ? sprintf("%.2f", v) : (v < 100 ? sprintf("%.1f", v) : sprintf("%.0f", v))
    }
    # histogram_quantile(q) over bound[1..k] (the last is +Inf) and cumulative counts cum[].
    function quantile(q,   rank, i, lower, below) {
      rank = q * cum[k]; lower = 0; below = 0
      for (i = 1; i <= k; i++) {
        if (cum[i] >= rank) {
          if (bound[i] == "+Inf") return i > 1 ? bound[i - 1] + 0 : 0
          return lower + (bound[i] - lower) * (cum[i] > below ? (rank - below) / (cum[i] - below) : 1)
        }
        lower = bound[i] + 0; below = cum[i]
      }
      return lower
    }
    function human(v) {
      if (v >= 1e6) return sprintf("%.2f M", v / 1e6)
      if (v >= 1e3) return sprintf("%.1f k", v / 1e3)
      return sprintf("%.0f", v)
    }
    BEGIN {
      fields_before = split(before, b, " "); fields_now = split(now, n, " ")
      if (n[1] == 0) { print "no control plane answers /metrics"; exit }
      reads = rate(2); writes = rate(3)
      path = n[15] == 1 ? "multicast" : (n[15] == 0 ? "unicast" : "?")
      printf "cluster %s ops/s (reads %s, writes %s) | batch prepare %.1f write %.1f ack %.1f commit %.1f | broadcasts by %s: multicast %s/s unicast %s/s | data planes up %d/%d",
        human(reads + writes), human(reads), human(writes), avg(4), avg(6), avg(8), avg(10),
        path, human(rate(12)), human(rate(13)), n[14], nodes
      k = 0
      if (fields_now == fields_before && fields_now > 15) {
        for (i = 16; i <= fields_now; i++) {
          split(n[i], pn, "="); split(b[i], pb, "=")
          if (pn[1] != pb[1]) { k = 0; break }
          bound[++k] = pn[1]; cum[k] = pn[2] - pb[2]
        }
      }
      if (k > 1 && cum[k] > 0)
        printf " | write us p50 %s p99 %s p99.9 %s max %s", micros(quantile(0.5)), micros(quantile(0.99)), micros(quantile(0.999)), micros(quantile(1))
      if (n[1] < nodes) printf " | %d of %d control planes answer", n[1], nodes
      printf "\n"
    }'
}

# Nanoseconds since the epoch.
now_ns() {
  date +%s%N
}

# catch_stop_signals: Ctrl-C and SIGTERM only record the exit status (130, 143) in
# stop_status, so a script can stop what it started in its EXIT trap; its waiting loops call
# check_stop, which exits with that status once a signal came.
stop_status=0
catch_stop_signals() {
  trap 'stop_status=130' INT
  trap 'stop_status=143' TERM
}
check_stop() {
  ((stop_status == 0)) || exit "$stop_status"
}
