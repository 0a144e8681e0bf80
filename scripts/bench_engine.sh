#!/usr/bin/env bash
# Engine benchmark of BENCHMARKS.md: Moebius and Hugging Face transformers on the same
# mid-sized random DeepSeek-V3-shaped checkpoint, one after the other in one run.
#   bash scripts/bench_engine.sh [prompt_len] [decode_tokens] [repeats]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt_len=${1:-128}
decode_tokens=${2:-32}
repeats=${3:-3}
model=bench-models/v3-bench
[ -f "$model/config.json" ] || python3 scripts/make_fixtures.py --bench-model "$model"
cargo build --release --quiet
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "== moebius bench engine"
./target/release/moebius bench engine --model "$model" --prompt-len "$prompt_len" \
    --decode-tokens "$decode_tokens" --batch 1,16 --repeats "$repeats"
echo "== moebius bench engine --bf16-activations"
./target/release/moebius bench engine --model "$model" --prompt-len "$prompt_len" \
    --decode-tokens "$decode_tokens" --batch 1,16 --repeats "$repeats" --bf16-activations
echo "== transformers"
python3 scripts/bench_transformers.py --model "$model" --prompt-len "$prompt_len" \
    --decode-tokens "$decode_tokens" --batch 1,16 --repeats "$repeats" --dtypes float32,bfloat16 --threads "$(nproc)"
