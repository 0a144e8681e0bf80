#!/usr/bin/env bash
# Prebuilt binaries for `scripts/gpu_check.sh` on a GPU machine without Rust or a network: builds
# moebius and the GPU test (worker/tests/gpu.rs) with `--features cuda` here, on any x86-64
# machine, and puts them, stripped, in target/gpu-bundle. Copy that folder to the GPU machine
# beside the repository (same relative path), and gpu_check.sh runs them instead of building.
#   bash scripts/gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle"
cargo build --release --locked --features cuda --quiet
cp target/release/moebius "$bundle/moebius"
# The test binary's path, from cargo's own report of what it built.
test_bin=$(cargo test --release --locked --features cuda -p moebius-worker --test gpu --no-run \
  --message-format=json 2>/dev/null |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
cp "$test_bin" "$bundle/gpu-test"
strip "$bundle/moebius" "$bundle/gpu-test"
git rev-parse --short HEAD >"$bundle/commit"
du -sh "$bundle"/*
