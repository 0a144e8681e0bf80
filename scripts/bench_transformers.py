#!/usr/bin/env python3
"""Baseline throughput of Hugging Face transformers on a DeepSeek-V3/V2 checkpoint (CPU).

    python3 scripts/make_fixtures.py --bench-model bench-models/v3-bench
    python3 scripts/bench_transformers.py --model bench-models/v3-bench \
        [--prompt-len 128] [--decode-tokens 32] [--batch 1,16] [--dtypes float32,bfloat16] \
        [--threads 2] [--repeats 3] [--json]

For every (dtype, batch), --repeats times with fresh random prompts, reporting the medians:
  prefill_tok_s: one forward over batch x prompt-len random ids (logits of the last position
                 only, like a serving engine), timed after one untimed warm-up forward of 1 x prompt-len;
  decode_tok_s:  steady-state greedy decode with the KV cache after that prefill: 2 untimed
                 steps, then --decode-tokens timed steps; tokens = batch x steps.
This is what `moebius bench engine --repeats` measures, so the two are compared like for like.
"""

import argparse
import json
import statistics
import time

import torch


def cache_of(out):
    for attr in ("cache", "past_key_values"):
        c = getattr(out, attr, None)
        if c is not None:
            return c
    raise RuntimeError("no cache in model output")


@torch.no_grad()
def bench_one(model, vocab, batch, prompt_len, decode_tokens, seed, warm_steps=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, prompt_len), generator=g)

    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - t0
    cache = cache_of(out)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(warm_steps):
        out = model(input_ids=tok, cache=cache, use_cache=True)
        cache = cache_of(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=tok, cache=cache, use_cache=True)
        cache = cache_of(out)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    decode_s = time.perf_counter() - t0
    return {
        "prefill_tok_s": batch * prompt_len / prefill_s,
        "prefill_s": prefill_s,
        "decode_tok_s": batch * decode_tokens / decode_s,
        "decode_ms_per_step": 1000 * decode_s / decode_tokens,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated torch dtypes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per batch; medians are reported")
    ap.add_argument("--json", action="store_true", help="also print the results as one JSON list")
    args = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch.split(",") if b]
    results = []
    for dname in [d for d in args.dtypes.split(",") if d]:
        dtype = getattr(torch, dname)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        load_s = time.perf_counter() - t0
        vocab = model.config.vocab_size
        with torch.no_grad():  # warm-up (first touch of the weights, allocator, kernels)
            model(input_ids=torch.randint(2, vocab, (1, args.prompt_len)), use_cache=False, logits_to_keep=1)
        for b in batches:
            runs = [bench_one(model, vocab, b, args.prompt_len, args.decode_tokens, seed=b * 1000 + i)
                    for i in range(args.repeats)]
            print(f"# {dname} batch {b}: prefill tok/s of each run " + ", ".join(f"{run['prefill_tok_s']:.1f}" for run in runs), flush=True)
            r = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            r.update({"repeats": args.repeats, "dtype": dname, "batch": b, "prompt_len": args.prompt_len,
                      "decode_tokens": args.decode_tokens, "threads": args.threads, "load_s": load_s})
            results.append(r)
            print(f"# {dname} batch {b}: prefill {r['prefill_tok_s']:.1f} tok/s, "
                  f"decode {r['decode_tok_s']:.2f} tok/s", flush=True)
        del model

    print(f"\ntransformers {transformers.__version__}, torch {torch.__version__}, threads {args.threads}, "
          f"prompt {args.prompt_len}, decode {args.decode_tokens} steps, model {args.model}")
    print(f"{'dtype':<10} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/decode step':>15}")
    for r in results:
        print(f"{r['dtype']:<10} {r['batch']:>5} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.2f} "
              f"{r['decode_ms_per_step']:>15.1f}")
    if args.json:
        print(json.dumps([{k: r[k] for k in ("dtype", "batch", "prefill_tok_s", "decode_tok_s")} for r in results]))


if __name__ == "__main__":
    main()
