#!/usr/bin/env bash
# The aarch64 kernels (NEON) on an x86-64 machine: lints the worker for aarch64, then runs,
# under qemu's user-mode emulation (correctness only: emulated speed means nothing), the
# backend's unit tests (every kernel family the CPU has against an f64 reference) and
# worker/tests/kernel_families.rs (each family against the transformers goldens of the bf16
# fixtures). Not part of scripts/test.sh, to keep CI short; run it after changing a kernel. Installs
# the aarch64 Rust standard library, Debian's cross compiler and qemu-user when missing.
#   bash scripts/test_aarch64.sh
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=(qemu-user)
if [ ${#missing[@]} -gt 0 ]; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo clippy -p moebius-worker --target "$target" --all-targets --locked -- -D warnings
cargo test -p moebius-worker --target "$target" --locked --lib backend:: -- --nocapture
cargo test -p moebius-worker --target "$target" --locked --test kernel_families -- --nocapture
