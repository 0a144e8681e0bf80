#!/usr/bin/env python3
"""Train the bundled demo model, fixtures/demo: a small DeepSeek-V3-architecture MoE
(MLA attention, 8 routed experts with top-2 group-limited sigmoid routing, 1 shared
expert) that writes English-looking text, with its own byte-level BPE tokenizer.

    apt-get install -y wordnet-base           # the training text (WordNet 3.0 glosses)
    nice -n 19 python3 scripts/train_demo_model.py   # ~10 min on 2 idle CPU cores, longer on a busy machine

Steps: build an English corpus from the WordNet database files installed by Debian's
`wordnet-base` package (definitions turned into sentences, plus the example sentences),
train a tokenizer with `tokenizers`, train `DeepseekV3ForCausalLM` from transformers on
CPU in float32 with a fixed seed, write the checkpoint in DeepSeek's on-disk naming
(per-expert tensors) as ONE bfloat16 `model.safetensors`, then reload the directory with
transformers in float32 and write `golden.json` (greedy outputs, same format as the other
fixtures, made with the helpers of scripts/make_fixtures.py).

    python3 scripts/train_demo_model.py --golden-only   # only re-check/re-write golden.json

Not run by CI. Needs torch, transformers (5.x), safetensors and tokenizers.
"""

import argparse
import json
import math
import os
import random
import re
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (shared helpers: storage, golden, margins)

ROOT = mf.ROOT
OUT = os.path.join(ROOT, "fixtures", "demo")
WORDNET_DIR = "/usr/share/wordnet"
WORDNET_PKG = "wordnet-base"

BOS, EOS = mf.BOS, mf.EOS
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
SPECIALS = [BOS, EOS, USER, ASSISTANT]  # ids 0, 1, 2, 3
VOCAB = 4096
SEED = 20240501

SEQ = 128
BATCH = 16
STEPS = 1000
LR, LR_MIN, WARMUP = 3e-3, 2e-4, 100
BIAS_UPDATE = 1e-3  # DeepSeek-V3's auxiliary-loss-free balancing: bias += u * sign(mean - load)

NEW_TOKENS = 16
MIN_MARGIN = 1e-2  # top1-top2 logit margin a golden case must keep (else the prompt is dropped)

# Golden prompts, in order of preference; the first is required, then the first others
# whose greedy continuation is decisive enough are kept (up to MAX_CASES).
PROMPTS = [
    ("the-river", "The river"),
    ("a-small", "A small"),
    ("in-the-morning", "In the morning"),
    ("she-opened", "She opened the door"),
    ("a-bird", "A bird is"),
    ("the-old-man", "The old man"),
    ("to-run", "To run is"),
    ("the-children", "The children"),
    ("music", "Music is"),
]
MAX_CASES = 5

CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}{% endif %}"
    "{{ bos_token }}{{ ns.system }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def model_config(vocab_size):
    cfg = mf.v3_cfg(
        hidden_size=256, intermediate_size=640, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1,
        num_attention_heads=4, num_key_value_heads=4,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
        routed_scaling_factor=2.5, rope_interleave=True, max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        dtype="bfloat16", torch_dtype="bfloat16",
    )
    cfg["vocab_size"] = vocab_size
    return cfg


# --------------------------------------------------------------------------- corpus

def _clean(s):
    s = s.strip().strip(";").strip()
    s = re.sub(r"\s+", " ", s)
    return s


def _sentence(s):
    s = _clean(s).strip('"').strip()
    if not s:
        return None
    s = s[0].upper() + s[1:]
    if s[-1] not in ".!?":
        s += "."
    return s


def _article(word):
    return "An" if word[0].lower() in "aeiou" else "A"


def build_corpus():
    """English sentences from WordNet 3.0: every synset's definition as a sentence
    ("A river is a large natural stream of water ..."), and its example sentences."""
    files = [os.path.join(WORDNET_DIR, f"data.{p}") for p in ("noun", "verb", "adj", "adv")]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        sys.exit(f"missing {missing[0]}: install the training text with "
                 f"`apt-get install -y {WORDNET_PKG}` (Debian/Ubuntu package {WORDNET_PKG})")
    rng = random.Random(SEED)
    sents = []
    for path in files:
        pos = path.rsplit(".", 1)[1]
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # license header
                head, gloss = line.split("|", 1)
                fields = head.split()
                nwords = int(fields[3], 16)
                lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(nwords)]
                lemmas = [re.sub(r"\(.*\)$", "", w) for w in lemmas]  # adj markers like (a)
                word = lemmas[0]
                parts = [p.strip() for p in gloss.split(";")]
                defs = [p for p in parts if p and not p.startswith('"')]
                examples = re.findall(r'"([^"]{8,})"', gloss)
                if defs:
                    d = _clean(defs[0])
                    if d:
                        if pos == "noun":
                            if word[0].isupper():
                                s = f"{word} is {d}"
                            elif rng.random() < 0.5:
                                s = f"The {word} is {d}"
                            else:
                                s = f"{_article(word)} {word} is {d}"
                        elif pos == "verb":
                            s = f"To {word} is to {d}"
                        elif pos == "adj":
                            s = f"{word[0].upper() + word[1:]} means {d}"
                        else:
                            s = f"{word[0].upper() + word[1:]} means {d}"
                        s = _sentence(s)
                        if s:
                            sents.append(s)
                for e in examples:
                    s = _sentence(e)
                    if s and len(s.split()) >= 3:
                        sents.append(s)
    rng.shuffle(sents)
    # paragraphs of 3-7 sentences
    paras, i = [], 0
    while i < len(sents):
        n = rng.randint(3, 7)
        paras.append(" ".join(sents[i:i + n]))
        i += n
    return paras


# --------------------------------------------------------------------------- tokenizer

def build_tokenizer(paras):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(paras, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, s
    return tok


def encode_corpus(tok, paras):
    ids = []
    for enc in tok.encode_batch(paras, add_special_tokens=False):
        ids.append(mf.BOS_ID)
        ids.extend(enc.ids)
        ids.append(mf.EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- training

def hf_config(cfg):
    from transformers import DeepseekV3Config

    c = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "dtype", "torch_dtype")}
    return DeepseekV3Config(**c)


def train(cfg, data, steps, log, max_minutes=1e9):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(SEED)
    model = DeepseekV3ForCausalLM(hf_config(cfg)).float()
    with torch.no_grad():  # make sure the fused experts are initialised
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                p.normal_(0.0, 0.02)
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.02)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"parameters: {nparams:,}")
    model.train()

    # auxiliary-loss-free load balancing: count expert loads per step through router hooks
    routers, loads = [], {}
    for name, mod in model.named_modules():
        if name.endswith("mlp.gate"):
            routers.append((name, mod))
            loads[name] = torch.zeros(cfg["n_routed_experts"])

            def hook(m, inp, out, name=name):
                loads[name] += torch.bincount(out[2].reshape(-1), minlength=cfg["n_routed_experts"]).float()
            mod.register_forward_hook(hook)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(SEED)
    n_windows = (len(data) - 1) // SEQ
    t0, ema = time.time(), None
    for step in range(steps):
        lr = LR * (step + 1) / WARMUP if step < WARMUP else \
            LR_MIN + 0.5 * (LR - LR_MIN) * (1 + math.cos(math.pi * (step - WARMUP) / max(1, steps - WARMUP)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, n_windows, (BATCH,), generator=g) * SEQ
        x = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone(), use_cache=False)
        # transformers shifts labels itself; feed the input as labels
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for name, mod in routers:
                ld = loads[name]
                mod.e_score_correction_bias += BIAS_UPDATE * torch.sign(ld.mean() - ld)
                ld.zero_()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if time.time() - t0 > max_minutes * 60 and step < steps - 1:
            log(f"step {step}: time cap of {max_minutes} min reached, stopping training early")
            break
        if step % 50 == 0 or step == steps - 1:
            el = time.time() - t0
            log(f"step {step:5d}/{steps} loss {loss.item():.3f} (ema {ema:.3f}) lr {lr:.2e} "
                f"{el / (step + 1):.2f}s/step elapsed {el / 60:.1f} min")
    return model, nparams, ema, time.time() - t0


def to_deepseek_naming(model, cfg):
    """transformers v5 in-memory (fused experts) -> DeepSeek on-disk per-expert tensors."""
    sd = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    out = {}
    I = cfg["moe_intermediate_size"]
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[p + f"{e}.gate_proj.weight"] = v[e, :I].contiguous()
                out[p + f"{e}.up_proj.weight"] = v[e, I:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[p + f"{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def write_checkpoint(model, cfg, tok):
    os.makedirs(OUT, exist_ok=True)
    for fn in os.listdir(OUT):
        if fn.endswith(".safetensors") or fn == "model.safetensors.index.json":
            os.remove(os.path.join(OUT, fn))
    sd = to_deepseek_naming(model, cfg)
    tensors, ref = mf.to_storage(sd, torch.bfloat16, cfg["model_type"])
    mf.save_tensors(OUT, tensors, 1, torch.bfloat16)
    mf.write_json(os.path.join(OUT, "config.json"), cfg, sort_keys=True)
    mf.write_json(os.path.join(OUT, "generation_config.json"),
                  {"bos_token_id": mf.BOS_ID, "eos_token_id": mf.EOS_ID, "do_sample": False,
                   "transformers_version": cfg["transformers_version"]})
    tok.save(os.path.join(OUT, "tokenizer.json"))
    mf.write_json(os.path.join(OUT, "tokenizer_config.json"),
                  {"add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
                   "model_max_length": cfg["max_position_embeddings"],
                   "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                   "chat_template": CHAT_TEMPLATE})
    return sd, tensors, ref


# --------------------------------------------------------------------------- golden

def check_reloaded(model, cfg, sd, ref):
    msd = model.state_dict()
    I = cfg["moe_intermediate_size"]
    for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp."
        for e in range(cfg["n_routed_experts"]):
            gu = msd[p + "experts.gate_up_proj"][e]
            assert torch.equal(gu[:I], ref[p + f"experts.{e}.gate_proj.weight"])
            assert torch.equal(gu[I:], ref[p + f"experts.{e}.up_proj.weight"])
            assert torch.equal(msd[p + "experts.down_proj"][e], ref[p + f"experts.{e}.down_proj.weight"])
        assert torch.equal(msd[p + "gate.weight"], ref[p + "gate.weight"])
        assert torch.equal(msd[p + "gate.e_score_correction_bias"], sd[p + "gate.e_score_correction_bias"])
    for k, v in ref.items():
        if ".experts." in k or k.endswith(("gate.weight", "correction_bias")):
            continue
        assert torch.equal(msd[k], v), k


def make_golden(cfg, tok, seed, log, sd=None, ref=None):
    model = mf.load_reloaded(OUT)
    if ref is not None:
        check_reloaded(model, cfg, sd, ref)
    rope_info = mf.check_rope(model, cfg)
    margins = mf.RouterMargins(model, cfg)
    cases, min_logit = [], float("inf")
    for cname, text in PROMPTS:
        ids = mf.encode_prompt(tok, text)
        new, lps, tops, m = mf.greedy(model, ids, NEW_TOKENS)
        log(f"  {cname}: margin {m:.4f}  {text!r} -> {tok.decode(new)!r}")
        if m < MIN_MARGIN:
            if not cases:
                sys.exit(f"required prompt {text!r} has logit margin {m} < {MIN_MARGIN}")
            continue
        min_logit = min(min_logit, m)
        cases.append({"name": cname, "prompt_text": text, "prompt_ids": ids, "new_token_ids": new,
                      "logprobs": lps, "top_logprobs": tops, "new_text": tok.decode(new)})
        if len(cases) == MAX_CASES:
            break
    margins.remove()
    reference = (f"transformers {cfg['transformers_version']}, torch float32, greedy, "
                 "on the bfloat16-rounded weights")
    golden = mf.golden_record("demo", reference, True, NEW_TOKENS, min_logit, margins, cases,
                              seed=seed)
    log(f"golden: {len(cases)} cases, min logit margin {min_logit:.4f}, router expert margin "
        f"{margins.expert_min:.2e}, group margin {margins.group_min:.2e}; {rope_info}")
    return golden, model


def samples(model, tok, log):
    """Greedy continuations through transformers' own tokenizer + generate()."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(OUT)
    for text in ("The river", "A small", "In the morning", "The old man"):
        ids = [mf.BOS_ID] + hf_tok.encode(text, add_special_tokens=False)
        out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        log(f"  {text!r} -> {hf_tok.decode(out[0, len(ids):])!r}")
    chat = hf_tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is a river?"}],
        add_generation_prompt=True, tokenize=False)
    log(f"  chat template renders: {chat!r}")


def main():
    global OUT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--max-train-minutes", type=float, default=40.0,
                    help="safety cap: stop training early (logged) if a busy machine makes it this slow")
    ap.add_argument("--golden-only", action="store_true", help="reload fixtures/demo and rewrite golden.json")
    ap.add_argument("--check", action="store_true", help="reload fixtures/demo and verify golden.json")
    ap.add_argument("--out", default=os.path.join(ROOT, "fixtures", "demo"), help="output directory (default fixtures/demo)")
    args = ap.parse_args()
    OUT = os.path.abspath(args.out)
    torch.set_num_threads(2)
    random.seed(SEED)
    t_start = time.time()

    def log(msg):
        print(f"[{(time.time() - t_start) / 60:5.1f} min] {msg}", flush=True)

    if args.golden_only or args.check:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(os.path.join(OUT, "tokenizer.json"))
        with open(os.path.join(OUT, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(OUT, "golden.json")) as f:
            old = json.load(f)
        golden, model = make_golden(cfg, tok, old.get("seed", SEED), log)
        if args.check:
            a = [(c["prompt_ids"], c["new_token_ids"]) for c in old["cases"]]
            b = [(c["prompt_ids"], c["new_token_ids"]) for c in golden["cases"]]
            ok = a == b and all(max(abs(x - y) for x, y in zip(c["logprobs"], d["logprobs"])) < 1e-4
                                for c, d in zip(old["cases"], golden["cases"]))
            log("golden.json reproduces" if ok else "golden.json does NOT reproduce")
            sys.exit(0 if ok else 1)
        mf.write_json(os.path.join(OUT, "golden.json"), golden)
        return

    paras = build_corpus()
    log(f"corpus: {len(paras)} paragraphs, {sum(map(len, paras)) / 1e6:.1f} M characters")
    tok = build_tokenizer(paras)
    log(f"tokenizer: vocab {tok.get_vocab_size()}")
    data = encode_corpus(tok, paras)
    log(f"corpus: {len(data) / 1e6:.2f} M tokens; training on {args.steps * BATCH * SEQ / 1e6:.2f} M")
    cfg = model_config(tok.get_vocab_size())
    cfg["transformers_version"] = __import__("transformers").__version__
    model, nparams, final_loss, train_s = train(cfg, data, args.steps, log, args.max_train_minutes)
    log(f"training: {train_s / 60:.1f} min, final loss (ema) {final_loss:.3f}")

    sd, tensors, ref = write_checkpoint(model, cfg, tok)
    golden, reloaded = make_golden(cfg, tok, SEED, log, sd, ref)
    mf.write_json(os.path.join(OUT, "golden.json"), golden)
    log("greedy samples (transformers generate on the reloaded bf16-rounded checkpoint):")
    samples(reloaded, tok, log)
    log(f"done: {nparams:,} parameters, final loss {final_loss:.3f}, total {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
