#!/usr/bin/env bash
# The OpenAI HTTP path against gRPC, in one run (BENCHMARKS.md): `moebius up` serves the model,
# and `moebius bench serve` sends the same load over gRPC and over HTTP (streamed
# /v1/completions), alternating, `rounds` times each. Prints each run as JSON, then the median
# output tokens/s of each protocol and their ratio.
#   bash scripts/bench_http.sh [model_dir] [workers] [rounds] [requests] [concurrency]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-bench-models/v3-bench}
workers=${2:-2}
rounds=${3:-3}
requests=${4:-64}
concurrency=${5:-16}
cargo build --release --quiet
bin=./target/release/moebius
log=$(mktemp)
out=$(mktemp)
$bin up --model "$model" --workers "$workers" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
  --http-listen 127.0.0.1:0 >"$log" 2>/dev/null &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up 2>/dev/null || true; rm -f "$log" "$out"' EXIT
grpc=""; http=""
for _ in $(seq 1 1200); do
  grpc=$(sed -n 's/^moebius is up: router on \([^,]*\),.*/\1/p' "$log")
  http=$(sed -n 's|^watch it: dashboard http://\([^/]*\)/.*|\1|p' "$log")
  [ -n "$grpc" ] && [ -n "$http" ] && break
  sleep 0.1
done
[ -n "$grpc" ] && [ -n "$http" ] || { echo "up did not start" >&2; exit 1; }
common=(--requests "$requests" --concurrency "$concurrency" --input-len 64 --output-len 32 --seed 0 --json)
for round in $(seq 1 "$rounds"); do
  for protocol in grpc openai; do
    addr=$grpc; [ "$protocol" = openai ] && addr=$http
    $bin bench serve --addr "$addr" --protocol "$protocol" "${common[@]}" 2>/dev/null | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = {}
for p in ("grpc", "openai"):
    rs = [r for r in runs if r["protocol"] == p]
    assert all(r["failed"] == 0 for r in rs), [r["first_error"] for r in rs]
    med[p] = {k: statistics.median(r[k] if not isinstance(r[k], dict) else r[k]["p50"] for r in rs)
              for k in ("output_tokens_per_s", "ttft_ms", "itl_ms")}
    print(p, {k: round(v, 2) for k, v in med[p].items()})
print("openai/grpc output tok/s ratio (medians):", round(med["openai"]["output_tokens_per_s"] / med["grpc"]["output_tokens_per_s"], 3))
PY
