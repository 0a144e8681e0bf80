#!/usr/bin/env bash
# Serving figures of BENCHMARKS.md: `moebius bench serve` against `moebius up` with 1 to 4
# workers on this machine, at a few concurrencies.
#   bash scripts/bench_serve.sh [requests] [input_len] [output_len]
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-200}
input_len=${2:-64}
output_len=${3:-32}
cargo build --release --quiet
bin=./target/release/moebius
for workers in 1 2 3 4; do
  log=$(mktemp)
  $bin up --model fixtures/tiny-v3 --listen 127.0.0.1:0 --workers "$workers" >"$log" 2>/dev/null &
  up=$!
  addr=""
  for _ in $(seq 1 600); do
    addr=$(sed -n 's/^moebius is up: router on \([^,]*\),.*/\1/p' "$log")
    [ -n "$addr" ] && break
    sleep 0.1
  done
  [ -n "$addr" ] || { echo "up with $workers workers did not start" >&2; kill $up; exit 1; }
  for conc in 1 8 32; do
    echo "== workers $workers, concurrency $conc"
    $bin bench serve --addr "$addr" --requests "$requests" --concurrency "$conc" \
        --input-len "$input_len" --output-len "$output_len" --seed 0 --json 2>/dev/null
  done
  kill -INT $up; wait $up || true
  rm -f "$log"
done
