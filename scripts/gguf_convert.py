#!/usr/bin/env python3
"""Convert a Moebius benchmark checkpoint to GGUF with llama.cpp's own converter, for
`scripts/bench_llama_cpp.sh`.

    python3 scripts/gguf_convert.py LLAMA_CPP_DIR MODEL_DIR TOKENIZER_DIR OUT.gguf

The bench model (`bench-models/v3-bench`) has weights but no tokenizer, and llama.cpp's
converter needs one. This stages MODEL_DIR's files beside TOKENIZER_DIR's `tokenizer.json` and
`tokenizer_config.json` (the demo model's byte-level BPE, 4096 tokens; the converter pads the
vocabulary to the config's `vocab_size`), then runs `convert_hf_to_gguf.py --outtype bf16`.

llama.cpp recognises a tokenizer's pre-tokenizer by hashing how it splits a fixed text, and
refuses tokenizers it has never seen, as a freshly trained one is. The demo tokenizer splits with
GPT-2's byte-level expression, so this declares it as `gpt-2` instead of adding a hash to the
converter. `llama-bench` feeds token ids and never tokenizes text, so the figures do not depend
on this choice; it only lets the file load.
"""

import os
import runpy
import shutil
import sys
import tempfile

PRE_TOKENIZER = "gpt-2"


def main() -> None:
    if len(sys.argv) != 5:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    llama_cpp, model, tokenizer, out = (os.path.abspath(a) for a in sys.argv[1:])
    sys.path[:0] = [llama_cpp, os.path.join(llama_cpp, "gguf-py")]

    from conversion import base  # llama.cpp's converter package

    base.TextModel.get_vocab_base_pre = lambda self, tok: PRE_TOKENIZER

    with tempfile.TemporaryDirectory(prefix="gguf-stage-") as stage:
        for name in os.listdir(model):
            if name.endswith((".json", ".safetensors")):
                os.symlink(os.path.join(model, name), os.path.join(stage, name))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tokenizer, name), os.path.join(stage, name))
        sys.argv = [
            "convert_hf_to_gguf.py",
            stage,
            "--outtype",
            "bf16",
            "--outfile",
            out,
        ]
        runpy.run_path(os.path.join(llama_cpp, "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
