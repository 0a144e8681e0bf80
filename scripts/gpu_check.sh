#!/usr/bin/env bash
# The GPU check of issue #17, in one go on a machine with an NVIDIA GPU, its driver and CUDA's
# cuBLAS and NVRTC (12, or 13 through unversioned links this script makes): builds moebius with
# `--features cuda` (or, where there is no cargo, runs the binaries of `scripts/gpu_bundle.sh`
# from target/gpu-bundle), runs the GPU test (worker/tests/gpu.rs: every fixture against its
# transformers golden on the GPU), checks `generate --device cuda` against `--device cpu`
# through the CLI and a GPU rank beside a CPU rank (`up --device cuda:N,cpu`, expert parallel
# over the tcp data plane) against the CPU alone, with two GPUs or more also two GPU ranks over
# the nccl data plane (`up --data-plane nccl`), and runs a short `bench engine` on the GPU
# (the bench model in bf16 and in FP8, made with python3's torch and transformers where missing and they
# are there, else the demo fixture; FP8 models also with `--fp8-activations`). Writes a summary for
# BENCHMARKS.md to target/gpu_check.md and prints it. Exits non-zero when a check fails. Also
# measures the products alone (`bench products`, bf16 and FP8 weights, FP8 also with
# `--fp8-activations`) against cuBLAS' bf16 peak that python3's torch reaches in the same run.
#   bash scripts/gpu_check.sh [gpu]        (gpu: the CUDA device number, 0 by default)
# To try the script itself without a GPU, run it on the CPU's stand-in for one, with small
# models and products (its figures then mean nothing):
#   bash worker/tests/cuda_host/build_shim.sh target/cuda-host-shim
#   CUDA_HOST_DEVICES=2 LD_LIBRARY_PATH=$PWD/target/cuda-host-shim GPU_CHECK_MODELS=fixtures/demo \
#     GPU_CHECK_SHAPES=64x64 GPU_CHECK_ROWS=1,4 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=${1:-0}
summary=target/gpu_check.md
bundle=target/gpu-bundle
mkdir -p target

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader || echo "gpu_check.sh: nvidia-smi not found; the test says whether a GPU answers"

# cudarc (built for CUDA 12.8) loads libcublas.so / libnvrtc.so, or their .so.12, and
# libnccl.so. A machine with CUDA 13 alone has only .so.13, and NCCL's wheel only .so.2: link
# the unversioned names to what is there (the C API of the calls Moebius makes is the same), and
# put their folders on the library path.
links=target/gpu-libs
mkdir -p "$links"
for lib in cublas nvrtc nccl; do
  if ! "$(command -v ldconfig || echo /sbin/ldconfig)" -p | grep -q -E "lib$lib\.so(\.12)? "; then
    found=$(find /usr/local /usr/lib /opt -name "lib$lib.so.[0-9]*" 2>/dev/null | grep -v -E 'alt|builtins' |
      sort -V | tail -1 || true)
    if [ -n "$found" ]; then
      echo "gpu_check.sh: lib$lib.so -> $found"
      ln -sf "$found" "$links/lib$lib.so"
      export LD_LIBRARY_PATH="$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  fi
done
export LD_LIBRARY_PATH="$PWD/$links${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
echo "== GPU test (worker/tests/gpu.rs)"
if command -v cargo >/dev/null; then
  cargo build --release --features cuda --quiet
  moebius=./target/release/moebius
  cargo test --release --features cuda -p moebius-worker --test gpu -- --nocapture 2>&1 | tee "$test_log"
elif [ -x "$bundle/moebius" ] && [ -x "$bundle/gpu-test" ]; then
  echo "gpu_check.sh: no cargo here; running the binaries of $bundle (commit $(cat "$bundle/commit"))"
  moebius=$bundle/moebius
  MOEBIUS_FIXTURES="$PWD/fixtures" "$bundle/gpu-test" --nocapture 2>&1 | tee "$test_log"
else
  echo "gpu_check.sh: no cargo here and no $bundle: run scripts/gpu_bundle.sh on a machine with Rust" >&2
  exit 1
fi
if grep -q '^skipped' "$test_log"; then
  echo "gpu_check.sh: the GPU test skipped (above): nothing here ran on a GPU" >&2
  exit 1
fi

echo "== generate through the CLI: --device cuda:$gpu against --device cpu"
fixture=fixtures/tiny-v2  # f32 weights: the GPU keeps f32 activations, so tokens must agree
args=(generate --model "$fixture" --prompt-ids 0,5,9,17 --max-new-tokens 16 --ignore-eos --json)
cpu=$("$moebius" "${args[@]}" --device cpu | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
gpu_tokens=$("$moebius" "${args[@]}" --device "cuda:$gpu" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
echo "cpu: $cpu"
echo "gpu: $gpu_tokens"
[ "$cpu" = "$gpu_tokens" ] || { echo "gpu_check.sh: the GPU's tokens differ from the CPU's" >&2; exit 1; }

# up_tokens ARGS...: starts `moebius up` on the fixture with two workers and ARGS, asks it for
# the same continuation over the OpenAI API, stops it and prints the token ids.
up_log=$(mktemp)
trap 'rm -f "$test_log" "$up_log"' EXIT
up_tokens() {
  "$moebius" up --model "$fixture" --workers 2 --threads 1 "$@" \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >"$up_log" 2>&1 &
  local up_pid=$! http=""
  for _ in $(seq 1 120); do
    http=$(sed -n 's|^watch it: dashboard https\?://\([^/]*\)/.*|\1|p' "$up_log")
    [ -n "$http" ] && grep -q "^epoch .* active with 2 workers" "$up_log" && break
    kill -0 "$up_pid" 2>/dev/null || { cat "$up_log" >&2; echo "gpu_check.sh: up $* stopped" >&2; return 1; }
    sleep 0.5
  done
  [ -n "$http" ] || { kill "$up_pid"; cat "$up_log" >&2; echo "gpu_check.sh: up $* did not come up in 60 s" >&2; return 1; }
  grep "^epoch .* active" "$up_log" >&2
  python3 - "$http" <<'PY' || { kill "$up_pid"; return 1; }
import json, sys, urllib.request
body = {"prompt": [0, 5, 9, 17], "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": 1}
req = urllib.request.Request(f"http://{sys.argv[1]}/v1/completions", json.dumps(body).encode(),
                             {"content-type": "application/json"})
tokens = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["logprobs"]["tokens"]
print([int(t.removeprefix("token_id:")) for t in tokens])
PY
  kill "$up_pid"
  wait "$up_pid" 2>/dev/null || true
}

echo "== a GPU rank beside a CPU rank over the tcp data plane: up --device cuda:$gpu,cpu"
mixed=$(up_tokens --device "cuda:$gpu,cpu")
echo "cpu alone:     $cpu"
echo "cuda:$gpu + cpu: $mixed"
[ "$cpu" = "$mixed" ] || { echo "gpu_check.sh: the GPU and CPU ranks' tokens differ from the CPU's alone" >&2; exit 1; }

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ "${gpus:-0}" -ge $((gpu + 2)) ]; then
  echo "== two GPU ranks over the nccl data plane: up --device cuda:$gpu --data-plane nccl"
  nccl=$(up_tokens --device "cuda:$gpu" --data-plane nccl)
  echo "cpu alone:       $cpu"
  echo "cuda x2 on nccl: $nccl"
  [ "$cpu" = "$nccl" ] || { echo "gpu_check.sh: the tokens over nccl differ from the CPU's alone" >&2; exit 1; }
else
  echo "== nccl: this machine has ${gpus:-0} GPU(s) from cuda:$gpu on; up --data-plane nccl needs two (not run)"
fi

# The bench model as bf16 and as FP8 (block-quantised as DeepSeek-V3 is released), made with
# the machine's torch and transformers where missing.
models=()
for variant in "" -fp8; do
  model=bench-models/v3-bench$variant
  if [ ! -f "$model/config.json" ] && python3 -c 'import torch, transformers, tokenizers' 2>/dev/null; then
    echo "== making the bench model ($model) with python3's torch and transformers"
    python3 scripts/make_fixtures.py --bench-model "$model" ${variant:+--fp8} || rm -rf "$model"
  fi
  [ -f "$model/config.json" ] && models+=("$model")
done
[ ${#models[@]} -gt 0 ] || models=(fixtures/demo)
[ -z "${GPU_CHECK_MODELS:-}" ] || read -r -a models <<<"$GPU_CHECK_MODELS"
benches=()
for model in "${models[@]}"; do
  # FP8 models once more with --fp8-activations (tensor cores, where the GPU has them).
  flags=("")
  [ ! -f "$model/config.json" ] || ! grep -q '"quantization_config"' "$model/config.json" ||
    flags+=(--fp8-activations)
  for flag in "${flags[@]}"; do
    echo "== bench engine on cuda:$gpu ($model${flag:+ $flag})"
    benches+=("$model${flag:+ $flag}" "$("$moebius" ${flag:+$flag} bench engine --device "cuda:$gpu" \
      --model "$model" --prompt-len 128 --decode-tokens 32 --batch 1,16 --repeats 3 --json)")
    echo "${benches[-1]}"
  done
done
# DeepSeek-V3's expert gate_up and down and a square one, as decode (1 row) and prefill rows.
shapes=${GPU_CHECK_SHAPES:-4096x7168,7168x2048,7168x7168}
rows=${GPU_CHECK_ROWS:-1,64,2048}
echo "== bench products on cuda:$gpu (bf16 and fp8 weights: $shapes)"
products=()
for run in bf16 fp8 "fp8 --fp8-activations"; do
  read -r dtype flag <<<"$run"
  products+=("$("$moebius" ${flag:+$flag} bench products --device "cuda:$gpu" --dtype "$dtype" \
    --shapes "$shapes" --rows "$rows" --repeats 5 --json)")
  echo "${products[-1]}"
done
echo "== cuBLAS' own peak in this run: torch's bf16 8192^3 matmul, operands on the GPU"
peak=$(python3 - <<'PY' || echo '{"error": "python3 failed"}'
import json
try:
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 10
    print(json.dumps({"tflop_s": 2 * 8192**3 / ms / 1e9}))
except Exception as e:  # no torch, or no GPU for it: the summary says so
    print(json.dumps({"error": str(e)}))
PY
)
echo "$peak"
python3 - "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed -n "$((gpu + 1))p")" \
  "$peak" "${#benches[@]}" "${benches[@]}" "${products[@]}" > "$summary" <<'PY'
import json, sys
name, peak = sys.argv[1] or "unknown GPU", json.loads(sys.argv[2])
count = int(sys.argv[3])
benches = sys.argv[4:4 + count]
print(f"### {name}: `moebius bench engine --device cuda`\n")
print("| model | weights on the GPU | batch | prefill tok/s | decode tok/s "
      "| GPU waits per decode step | launches per decode step |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for model, run in zip(benches[::2], map(json.loads, benches[1::2])):
    if "--fp8-activations" in model and not run.get("fp8_tensor_cores"):
        model += " (no FP8 tensor cores here: bf16 products)"
    for r in run["results"]:
        print(f"| {model} | {run['weights_bytes'] / 1e9:.2f} GB | {r['batch']} "
              f"| {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} "
              f"| {r.get('gpu_waits_per_decode_step', float('nan')):.0f} "
              f"| {r.get('gpu_launches_per_decode_step', float('nan')):.0f} |")
print("\n`moebius bench products --device cuda` (activations from the host and back, as the engine "
      "calls them), against cuBLAS' bf16 peak measured by torch in the same run: "
      + (f"{peak['tflop_s']:.0f} TFLOP/s" if "tflop_s" in peak else f"not measured ({peak.get('error')})")
      + "\n")
print("| weights | rows | weight | TFLOP/s | of the peak | weight GB/s |")
print("| --- | --- | --- | --- | --- | --- |")
for products in map(json.loads, sys.argv[4 + count:]):
    weights = products["dtype"]
    if products.get("fp8_tensor_cores"):
        weights += ", FP8 activations on tensor cores"
    for r in products["results"]:
        share = f"{r['tflop_s'] / peak['tflop_s']:.3f}" if "tflop_s" in peak else "-"
        print(f"| {weights} | {r['rows']} | {r['out']}x{r['in']} | {r['tflop_s']:.2f} "
              f"| {share} | {r['weight_gb_s']:.0f} |")
print("\nMade by `bash scripts/gpu_check.sh`: weights on the GPU in their checkpoint's precision, "
      "every product with a weight in cuBLAS (FP8 weights of a few rows in the backend's NVRTC "
      "kernels; of more, dequantised to bf16, or with --fp8-activations on cuBLASLt's FP8 "
      "tensor cores), activations copied to the GPU and back for each block: a whole attention "
      "block (RoPE, norms, the cache rows appended to their pages, absorbed attention over "
      "every sequence in four launches, o_proj; in a MoE layer also the residual, the "
      "post-attention norm and the gate's routing) in one round trip, a MoE layer's experts in "
      "another (FP8 ones of a few rows one grouped launch, bf16 ones of one shape one batched "
      "cuBLAS call), the LM head and each row's best logits in a last.")
PY
echo "== summary ($summary)"
cat "$summary"
