#!/usr/bin/env bash
# Engine benchmark of BENCHMARKS.md: Moebius, llama.cpp and Hugging Face transformers on the same
# mid-sized random DeepSeek-V3-shaped checkpoint (bf16), back to back in one run, `rounds` times.
# Each round runs, for every kernel family listed, `moebius --kernels F bench engine` (batch 1 and
# 16, 3 measurements each) and `llama-bench` built for the same instruction sets (bf16 GGUF from
# llama.cpp's converter, 3 repetitions: prompt processing from an empty context, generation after
# the prompt), then transformers float32 and bfloat16 (and float32 held to AVX2 when avx2 runs on
# a CPU with AVX-512). Prints every run as JSON, then the medians
# over the rounds with the ratios to llama.cpp and to transformers float32
# (scripts/bench_summary.py).
#   bash scripts/bench_engine.sh [prompt_len] [decode_tokens] [rounds] [families]
# families: comma-separated --kernels names, `auto` for this CPU's best; by default auto, and
# avx2 too on a CPU with AVX-512 (against llama.cpp built without AVX-512).
set -euo pipefail
cd "$(dirname "$0")/.."
prompt_len=${1:-128}
decode_tokens=${2:-32}
rounds=${3:-3}
avx512=$(grep -q -w avx512f /proc/cpuinfo && echo yes || echo no)
families=${4:-$([ "$avx512" = yes ] && echo auto,avx2 || echo auto)}
model=bench-models/v3-bench
threads=$(nproc)
source scripts/bench_env.sh
[ -f "$model/config.json" ] || "$BENCH_PY" scripts/make_fixtures.py --bench-model "$model"
cargo build --release --quiet

# The llama.cpp build that matches a family: without AVX-512 for avx2 where the CPU has it.
llama_build() { [ "$1" = avx2 ] && [ "$avx512" = yes ] && echo avx2 || echo native; }
declare -A llama
for family in ${families//,/ }; do
  build=$(llama_build "$family")
  [ -n "${llama[$build]:-}" ] || llama[$build]=$(bash scripts/llama_cpp.sh "$build" "$model" | paste -sd' ')
done

echo "== machine: $threads cores, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/{print $2}') GiB"
echo "== instruction sets: $(grep -o -w -E 'avx2|fma|f16c|avx512f|avx512_bf16|avx512_vnni|amx_bf16|asimd|sve|bf16' /proc/cpuinfo | sort -u | paste -sd' ')"
echo "== commit: $(git rev-parse --short HEAD)$(git diff --quiet || echo ' (with changes)')"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq 1 "$rounds"); do
  for family in ${families//,/ }; do
    ./target/release/moebius --kernels "$family" bench engine --model "$model" --threads "$threads" \
      --prompt-len "$prompt_len" --decode-tokens "$decode_tokens" --batch 1,16 --repeats 3 --json |
      sed "s/^{/{\"engine\":\"moebius\",\"family\":\"$family\",\"round\":$round,/" | tee -a "$out"
    build=$(llama_build "$family")
    read -r bench gguf <<<"${llama[$build]}"
    for test in "-p $prompt_len -n 0" "-p 0 -n $decode_tokens -d $prompt_len"; do
      # shellcheck disable=SC2086 # $test is two or three options
      "$bench" -m "$gguf" $test -t "$threads" -r 3 -o jsonl 2>/dev/null |
        sed "s/^{/{\"engine\":\"llama.cpp\",\"build\":\"$build\",\"family\":\"$family\",\"round\":$round,/" |
        tee -a "$out"
    done
  done
  "$BENCH_PY" scripts/bench_transformers.py --model "$model" --prompt-len "$prompt_len" \
    --decode-tokens "$decode_tokens" --batch 1,16 --repeats 3 --dtypes float32,bfloat16 \
    --threads "$threads" --json | tail -1 |
    sed "s/^/{\"engine\":\"transformers\",\"round\":$round,\"results\":/; s/\$/}/" | tee -a "$out"
  if [[ ",$families," == *,avx2,* ]] && [ "$avx512" = yes ]; then
    # PyTorch's own kernels, oneDNN and MKL held to AVX2, for the avx2 family's comparison.
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
      "$BENCH_PY" scripts/bench_transformers.py --model "$model" --prompt-len "$prompt_len" \
      --decode-tokens "$decode_tokens" --batch 1,16 --repeats 3 --dtypes float32 \
      --threads "$threads" --json | tail -1 |
      sed "s/^/{\"engine\":\"transformers\",\"isa\":\"avx2\",\"round\":$round,\"results\":/; s/\$/}/" |
      tee -a "$out"
  fi
done
python3 scripts/bench_summary.py "$out"
