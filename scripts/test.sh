#!/usr/bin/env bash
# The README's second command: installs what the test suite needs, then runs all of it —
# formatting, lints (with and without the verbs feature), and every test with the verbs
# feature built in (the hardware tests stay ignored without RZAB_VERBS_DEVICE).
#
#   scripts/test.sh
#
# Debian packages installed when missing (apt-get, with sudo when not root):
#   libibverbs-dev librdmacm-dev libclang-dev pkg-config  the verbs transport's build
#   memcached         the control planes' registry (tests start their own on loopback ports)
#   prometheus        the dashboard test runs a real Prometheus (and promtool checks the config)
#   curl              run-local.sh's live line, exercised by the tests
#   iproute2          network-namespace tests (ip netns; they run only as root)
#   ShellCheck        lints scripts/*.sh (package shellcheck)
#   python3-venv      for schemathesis's virtual environment (only where python3 lacks venv)
#
# From PyPI, when missing: schemathesis, into the virtual environment
# ${CARGO_TARGET_DIR:-target}/schemathesis-venv (the control plane's OpenAPI conformance test
# runs it; RZAB_SCHEMATHESIS names it for the test).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

case "${1:-}" in
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  "") ;;
  *) die "unknown option $1 (see --help)" ;;
esac

command -v cargo >/dev/null || die "cargo is needed: install Rust from https://rustup.rs" 1
apt_install "the test suite" libibverbs-dev librdmacm-dev libclang-dev pkg-config \
  memcached prometheus curl iproute2 shellcheck

# schemathesis checks the control plane against its OpenAPI document. A virtual environment
# keeps it off the system Python (which Debian marks externally managed).
venv="${CARGO_TARGET_DIR:-target}/schemathesis-venv"
if [ ! -x "$venv/bin/st" ]; then
  command -v python3 >/dev/null || apt_install "schemathesis" python3
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install "schemathesis's virtual environment" python3-venv
  echo "==> installing schemathesis into $venv (pip)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check schemathesis
fi
RZAB_SCHEMATHESIS="$(cd "$venv/bin" && pwd)/st"
export RZAB_SCHEMATHESIS

echo "==> cargo fmt --check"
cargo fmt --all -- --check
rustfmt --edition 2024 --check fuzz/fuzz_targets/*.rs
echo "==> cargo clippy (default features)"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo clippy (--features rzab-dataplane/verbs)"
cargo clippy --workspace --all-targets --features rzab-dataplane/verbs -- -D warnings
echo "==> cargo test (all features; hardware tests stay ignored without RZAB_VERBS_DEVICE)"
cargo test --workspace --features rzab-dataplane/verbs
