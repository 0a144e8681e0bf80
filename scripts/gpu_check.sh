#!/usr/bin/env bash
# The GPU check of issue #17, in one go on a machine with an NVIDIA GPU, its driver and CUDA 12's
# cuBLAS: builds moebius with `--features cuda`, runs the GPU test (worker/tests/gpu.rs: every
# fixture against its transformers golden on the GPU), checks `generate --device cuda` against
# `--device cpu` through the CLI, and runs a short `bench engine` on the GPU (the bench model when
# bench-models/v3-bench exists, else the demo fixture). Writes a summary for BENCHMARKS.md to
# target/gpu_check.md and prints it. Exits non-zero when a check fails.
#   bash scripts/gpu_check.sh [gpu]        (gpu: the CUDA device number, 0 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=${1:-0}
summary=target/gpu_check.md
mkdir -p target

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader || echo "gpu_check.sh: nvidia-smi not found; the test says whether a GPU answers"

cargo build --release --features cuda --quiet
echo "== GPU test (worker/tests/gpu.rs)"
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
cargo test --release --features cuda -p moebius-worker --test gpu -- --nocapture 2>&1 | tee "$test_log"
if grep -q '^skipped' "$test_log"; then
  echo "gpu_check.sh: the GPU test skipped (above): nothing here ran on a GPU" >&2
  exit 1
fi

echo "== generate through the CLI: --device cuda:$gpu against --device cpu"
fixture=fixtures/tiny-v2  # f32 weights: the GPU keeps f32 activations, so tokens must agree
args=(generate --model "$fixture" --prompt-ids 0,5,9,17 --max-new-tokens 16 --ignore-eos --json)
cpu=$(./target/release/moebius "${args[@]}" --device cpu | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
gpu_tokens=$(./target/release/moebius "${args[@]}" --device "cuda:$gpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
echo "cpu: $cpu"
echo "gpu: $gpu_tokens"
[ "$cpu" = "$gpu_tokens" ] || { echo "gpu_check.sh: the GPU's tokens differ from the CPU's" >&2; exit 1; }

model=bench-models/v3-bench
[ -f "$model/config.json" ] || model=fixtures/demo
echo "== bench engine on cuda:$gpu ($model)"
bench=$(./target/release/moebius bench engine --device "cuda:$gpu" --model "$model" \
  --prompt-len 128 --decode-tokens 32 --batch 1,16 --repeats 3 --json)
echo "$bench"
python3 - "$bench" "$model" "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed -n "$((gpu + 1))p")" > "$summary" <<'PY'
import json, sys
run, model, name = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] or "unknown GPU"
print(f"### {name}: `moebius bench engine --device cuda` ({model})\n")
print("| batch | prefill tok/s | decode tok/s |")
print("| --- | --- | --- |")
for r in run["results"]:
    print(f"| {r['batch']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} |")
print("\nMade by `bash scripts/gpu_check.sh`: weights on the GPU, every product with a weight in "
      "cuBLAS, activations copied to the GPU and back for each product, attention on the host.")
PY
echo "== summary ($summary)"
cat "$summary"
