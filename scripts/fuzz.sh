#!/usr/bin/env bash
# Runs every cargo-fuzz target (or the ones named) for SECONDS each (default 60) on its
# committed corpus, one after another, and prints a table: target, runs, coverage, crashes.
# New inputs libFuzzer finds go to a scratch directory (the committed corpus is only read);
# crashing inputs go to fuzz/artifacts/TARGET/. Exits non-zero when any target crashed.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Installs cargo-fuzz when it is missing. Builds without a sanitizer by default, which works
# on the stable toolchain (the targets are safe Rust; debug assertions and overflow checks are
# on). FUZZ_SANITIZER=address tries AddressSanitizer, which needs nightly -Z flags
# (RUSTC_BOOTSTRAP=1 unlocks them on stable). FUZZ_KEEP=DIR keeps what the runs found in DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(wire_decode pipeline_input endpoint_decode knobs_parse)
fi
sanitizer=${FUZZ_SANITIZER:-none}

if ! command -v cargo-fuzz >/dev/null; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

echo "==> building the fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build -s "$sanitizer" >/dev/null

scratch=${FUZZ_KEEP:-$(mktemp -d)}
[ -n "${FUZZ_KEEP:-}" ] || trap 'rm -rf "$scratch"' EXIT
rows=()
failed=0
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target" "fuzz/artifacts/$target"
  log="$scratch/$target.log"
  before=$(find "fuzz/artifacts/$target" -type f | wc -l)
  echo "==> $target for ${seconds}s"
  status=0
  cargo fuzz run -s "$sanitizer" "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  after=$(find "fuzz/artifacts/$target" -type f | wc -l)
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  speed=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
  corpus=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1)
  crashes=$((after - before))
  if ((status != 0)) && ((crashes == 0)); then
    crashes="exit $status"
  fi
  if ((status != 0)); then
    failed=1
    echo "    $target failed; the end of its log:"
    tail -30 "$log" | sed 's/^/    /'
  fi
  rows+=("| $target | ${runs:-?} | ${speed:-?} | ${cov:-?} | ${corpus:-?} | $crashes |")
done

echo
echo "| target | runs | exec/s | coverage | corpus | crashes |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
if ((failed)); then
  echo "crashing inputs are in fuzz/artifacts/; reproduce with: cargo fuzz run -s $sanitizer TARGET FILE"
fi
exit "$failed"
