#!/usr/bin/env bash
# The README's second command: installs what the test suite needs, then runs all of it —
# formatting, lints (with and without the verbs feature), the verbs build, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
dpkg -s libibverbs-dev >/dev/null 2>&1 || need_packages+=(libibverbs-dev)
dpkg -s librdmacm-dev >/dev/null 2>&1 || need_packages+=(librdmacm-dev)
dpkg -s libclang-dev >/dev/null 2>&1 || need_packages+=(libclang-dev)
dpkg -s pkg-config >/dev/null 2>&1 || need_packages+=(pkg-config)
dpkg -s iproute2 >/dev/null 2>&1 || need_packages+=(iproute2)
dpkg -s memcached >/dev/null 2>&1 || need_packages+=(memcached)
if ((${#need_packages[@]})); then
  echo "==> installing ${need_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy (default features)"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo clippy (--features verbs)"
cargo clippy --workspace --all-targets --features rzab-dataplane/verbs -- -D warnings
echo "==> cargo test (all features; hardware tests stay ignored without RZAB_VERBS_DEVICE)"
cargo test --workspace --features rzab-dataplane/verbs
