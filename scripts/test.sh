#!/usr/bin/env bash
# The test command of README.md: installs what the tests need when it is missing (Debian's
# etcd, Prometheus and Chromium), then checks formatting and lints and runs every test of the
# workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests run for real: etcd (the topology store), Prometheus (scrapes a
# cluster) and Chromium (loads the built-in dashboard).
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing ${missing[*]} (Debian packages) for the end-to-end tests"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
