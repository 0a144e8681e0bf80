#!/usr/bin/env bash
# The kernel families on one CPU, in one run (BENCHMARKS.md): `moebius bench engine` on the
# bench model with each family this CPU has forced (--kernels), alternating, `rounds` times
# each. Prints each run as JSON, then per family and batch the median prefill and decode
# tokens/s and their ratio to the first family listed.
#   bash scripts/bench_kernels.sh [families] [rounds] [prompt_len] [decode_tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
families=${1:-avx512,avx2,portable}
rounds=${2:-3}
prompt_len=${3:-128}
decode_tokens=${4:-32}
model=bench-models/v3-bench
[ -f "$model/config.json" ] || python3 scripts/make_fixtures.py --bench-model "$model"
cargo build --release --quiet
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq 1 "$rounds"); do
  for family in ${families//,/ }; do
    ./target/release/moebius --kernels "$family" bench engine --model "$model" \
      --prompt-len "$prompt_len" --decode-tokens "$decode_tokens" --batch 1,16 --repeats 1 \
      --json | tee -a "$out"
  done
done
python3 - "$out" "$families" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
families = sys.argv[2].split(",")
by = {}
for run in runs:
    for row in run["results"]:
        by.setdefault((run["kernels"], row["batch"]), []).append(row)
print("kernels      batch  prefill tok/s  decode tok/s  prefill / first  decode / first")
for batch in sorted({b for (_, b) in by}):
    base = None
    for family in families:
        rows = by.get((family, batch), [])
        if not rows:
            continue
        p = statistics.median(r["prefill_tok_s"] for r in rows)
        d = statistics.median(r["decode_tok_s"] for r in rows)
        base = base or (p, d)
        print(f"{family:<12} {batch:>5}  {p:>13.1f}  {d:>12.1f}  {p / base[0]:>15.2f}  {d / base[1]:>14.2f}")
PY
