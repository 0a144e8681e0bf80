#!/usr/bin/env python3
"""Summary of a `scripts/bench_engine.sh` run: medians over the rounds, and ratios taken within
each round (so that a slower or faster moment of a shared machine moves both sides) and then
their median.

    python3 scripts/bench_summary.py RUNS.jsonl

Each line of RUNS.jsonl is one engine's run in one round: `moebius bench engine --json`,
`llama-bench -o jsonl`, or `bench_transformers.py --json`, tagged with engine and round.
"""

import json
import statistics
import sys
from collections import defaultdict


def spread(values):
    """'median (low-high)' of a list of figures."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.1f}"
    return f"{med:.1f} ({min(values):.1f}-{max(values):.1f})"


def ratio(nums, dens):
    """Median over rounds of num / den, both taken in the same round."""
    pairs = [n / d for r, n in nums.items() if (d := dens.get(r)) and n]
    return f"{statistics.median(pairs):.2f}" if pairs else "-"


def main() -> None:
    runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip().startswith("{")]
    # (label, batch) -> {"prefill": {round: tok/s}, "decode": {round: tok/s},
    #                    "of_ceiling": {round: batch-1 decode / ceiling}}
    rows = defaultdict(lambda: {"prefill": {}, "decode": {}, "of_ceiling": {}})
    # {round: batch-1 decode ceilings of the round's runs}
    ceilings = defaultdict(list)
    names = {}  # family -> label of the Moebius rows
    llama_of = {}  # family -> label of its llama.cpp rows
    for run in runs:
        r = run["round"]
        if run["engine"] == "moebius":
            label = f"moebius {run['kernels']}" + (" (auto)" if run["family"] == "auto" else "")
            names[run["family"]] = label
            ceilings[r].append(run["batch1_decode_ceiling_tok_s"])
            for res in run["results"]:
                rows[(label, res["batch"])]["prefill"][r] = res["prefill_tok_s"]
                rows[(label, res["batch"])]["decode"][r] = res["decode_tok_s"]
                if "decode_ceiling_ratio" in res:
                    rows[(label, res["batch"])]["of_ceiling"][r] = res["decode_ceiling_ratio"]
        elif run["engine"] == "llama.cpp":
            label = f"llama.cpp bf16 ({run['build']} build)"
            llama_of[run["family"]] = label
            tok_s = statistics.median(run["samples_ts"])
            what = "prefill" if run["n_prompt"] > 0 else "decode"
            rows[(label, 1)][what][r] = tok_s
        elif run["engine"] == "transformers":
            for res in run["results"]:
                label = f"transformers {res['dtype']}" + (f" ({run['isa']} only)" if "isa" in run else "")
                rows[(label, res["batch"])]["prefill"][r] = res["prefill_tok_s"]
                rows[(label, res["batch"])]["decode"][r] = res["decode_tok_s"]

    rounds = len({run["round"] for run in runs})
    print(f"\nmedians of {rounds} rounds (range in brackets); ratios are medians of per-round ratios;")
    print("rows of a family compare with transformers float32 held to that family's instruction sets")
    print("where it was run so (e.g. 'avx2 only'), else with plain transformers float32")
    head = (f"{'engine':<34} {'batch':>5} {'prefill tok/s':>22} {'decode tok/s':>20} "
            f"{'vs llama.cpp p/d':>17} {'vs transformers f32 p/d':>24} {'decode / ceiling':>17}")
    print(head)
    def tf32(family, batch):
        """transformers float32 on the instruction sets of `family` where it was run so."""
        held = rows.get((f"transformers float32 ({family} only)", batch))
        return held or rows.get(("transformers float32", batch))

    order = []
    for family, label in names.items():
        if family in llama_of and (llama_of[family], 1) not in order:
            order.append((llama_of[family], 1))
        order += sorted(k for k in rows if k[0] == label)
    order += sorted(k for k in rows if k[0].startswith("transformers"))
    family_of = {label: family for family, label in names.items()}
    llama_family = {label: family for family, label in llama_of.items()}
    for key in order:
        label, batch = key
        row = rows[key]
        vs_llama, vs_tf, vs_ceiling = "", "", ""
        family = family_of.get(label)
        if family is not None and batch == 1 and family in llama_of:
            base = rows[(llama_of[family], 1)]
            vs_llama = f"{ratio(row['prefill'], base['prefill'])} / {ratio(row['decode'], base['decode'])}"
        base = tf32(family or llama_family.get(label), batch)
        if base and not label.startswith("transformers float32"):
            vs_tf = f"{ratio(row['prefill'], base['prefill'])} / {ratio(row['decode'], base['decode'])}"
        if family is not None and batch == 1:
            # each run holds its passes against the bandwidth measured around them (moebius
            # bench engine's decode_ceiling_ratio); older runs against the round's best ceiling
            if row["of_ceiling"]:
                vs_ceiling = f"{statistics.median(row['of_ceiling'].values()):.2f}"
            else:
                vs_ceiling = ratio(row["decode"], {r: max(c) for r, c in ceilings.items()})
        print(f"{label:<34} {batch:>5} {spread(row['prefill'].values()):>22} "
              f"{spread(row['decode'].values()):>20} {vs_llama:>17} {vs_tf:>24} {vs_ceiling:>17}")
    print(f"batch-1 decode ceiling (weights per step / median read bandwidth of a run): "
          f"{spread([c for cs in ceilings.values() for c in cs])} tok/s")


if __name__ == "__main__":
    main()
