#!/usr/bin/env bash
# Rebalance figures of BENCHMARKS.md, in one run: `moebius up` with 4 workers serves a skewed
# workload (`bench serve --vocab 4`: prompts of 2 token ids), then `moebius admin rebalance`
# switches to EPLB's plan while the same workload runs. Prints, as JSON lines: decode
# throughput and inter-token latency before, during and after; the imbalance before and after
# (max/mean rows per rank, mean over MoE layers); the time from the admin call to the active
# epoch; and each worker's epoch-switch pause (moebius_worker_epoch_switch_pause_seconds: from
# the agreed pause of the old group to the first step of the new one).
#   bash scripts/bench_rebalance.sh [model_dir] [workers] [redundant]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-fixtures/tiny-v3}
workers=${2:-4}
redundant=${3:-4}
cargo build --release --quiet
bin=./target/release/moebius
log=$(mktemp)
$bin up --model "$model" --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --workers "$workers" \
    --threads 1 --redundant-experts "$redundant" --rebalance-threshold 0 --stats-interval-s 1 \
    >"$log" 2>/dev/null &
up=$!
trap 'kill -INT $up 2>/dev/null; wait $up 2>/dev/null || true; rm -f "$log"' EXIT
addr=""; admin=""; http=""
for _ in $(seq 1 600); do
  addr=$(sed -n 's/^moebius is up: router on \([^,]*\),.*/\1/p' "$log")
  admin=$(sed -n 's/^operate it: moebius admin topology --coordinator //p' "$log")
  http=$(sed -n 's|^watch it: dashboard http://\([^/]*\)/.*|\1|p' "$log")
  [ -n "$addr" ] && [ -n "$admin" ] && [ -n "$http" ] && break
  sleep 0.1
done
[ -n "$admin" ] || { echo "up did not start" >&2; exit 1; }
serve() {
  $bin bench serve --addr "$addr" --requests 96 --concurrency 32 --input-len 32 \
      --output-len 64 --vocab 4 --seed "$1" --json 2>/dev/null
}
imbalance() { $bin admin topology --json --coordinator "$admin" | python3 -c 'import json,sys; t=json.load(sys.stdin); print(t["imbalance"], t["epoch"])'; }
serve 1 >/dev/null   # warm-up, and the load the balancer plans from
sleep 3
echo "{\"phase\": \"before\", \"serve\": $(serve 2), \"imbalance_epoch\": \"$(imbalance)\"}"
serve 3 >"$log.during" &
during=$!
sleep 1
t0=$(date +%s.%N)
plan=$($bin admin rebalance --json --coordinator "$admin")
epoch=$(echo "$plan" | python3 -c 'import json,sys; print(json.load(sys.stdin)["epoch"])')
until [ "$($bin admin topology --json --coordinator "$admin" | python3 -c 'import json,sys; t=json.load(sys.stdin); print(t["epoch"], t["epoch_state"])')" = "$epoch active" ]; do
  sleep 0.005
done
t1=$(date +%s.%N)
wait "$during"
echo "{\"phase\": \"during\", \"serve\": $(cat "$log.during"), \"plan\": $(echo "$plan" | python3 -c 'import json,sys; p=json.load(sys.stdin); p.pop("placement"); print(json.dumps(p))'), \"decision_to_active_s\": $(python3 -c "print(round($t1 - $t0, 4))")}"
rm -f "$log.during"
sleep 3
echo "{\"phase\": \"after\", \"serve\": $(serve 4), \"imbalance_epoch\": \"$(imbalance)\"}"
pauses=$(python3 - "$http" <<'PY'
import json, re, sys, urllib.request
text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics").read().decode()
out = {}
for kind in ("sum", "count"):
    for w, v in re.findall(r'moebius_worker_epoch_switch_pause_seconds_%s\{worker="([^"]+)"\} (\S+)' % kind, text):
        out.setdefault(w, {})[kind] = float(v)
print(json.dumps(out))
PY
)
echo "{\"phase\": \"switch\", \"epoch_switch_pause_s\": $pauses}"
