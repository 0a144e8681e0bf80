#!/usr/bin/env bash
# What the data plane's proof of the cluster secret costs (BENCHMARKS.md): `moebius bench
# alltoall` over the plain tcp mesh and over the tcp mesh whose connections prove a secret,
# alternating, `rounds` times each. Prints each run as JSON, then per token count the median
# dispatch p50 of each and their ratio, and the median time to form the mesh.
#   bash scripts/bench_data_plane_auth.sh [ranks] [rounds] [iters]
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=${1:-2}
rounds=${2:-3}
iters=${3:-50}
cargo build --release --quiet
bin=./target/release/moebius
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for _ in $(seq 1 "$rounds"); do
  for transport in tcp tcp-secret; do
    $bin bench alltoall --ranks "$ranks" --transport "$transport" --tokens 1,16,1024 \
      --hidden 7168 --topk 8 --experts 256 --iters "$iters" --warmup 5 --seed 0 --json | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by = {}
for run in runs:
    for row in run["results"]:
        by.setdefault((run["transport"], row["tokens"]), []).append(row)
tokens = sorted({t for (_, t) in by})
print("tokens  plain p50 us  secret p50 us  secret/plain  plain formed ms  secret formed ms")
for t in tokens:
    med = lambda tr, f: statistics.median(f(r) for r in by[(tr, t)])
    p50 = lambda r: r["dispatch_latency_us"]["p50"]
    formed = lambda r: r["group_formed_ms"]
    a, b = med("tcp", p50), med("tcp-secret", p50)
    print(f"{t:>6}  {a:>12.1f}  {b:>13.1f}  {b / a:>12.3f}  {med('tcp', formed):>15.2f}  {med('tcp-secret', formed):>16.2f}")
PY
