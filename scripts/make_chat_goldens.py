"""Renders the chat templates of fixtures/chat-templates/ with transformers'
`apply_chat_template` over a handful of conversations, and writes what it renders to
fixtures/chat-templates/goldens.json, which worker/tests/chat_templates.rs compares Moebius'
rendering with. Needs torch-free transformers and tokenizers:

    python3 scripts/make_chat_goldens.py
"""

import json
from pathlib import Path

import transformers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "fixtures" / "chat-templates"
TOKENIZER = ROOT / "fixtures" / "tiny-v3" / "tokenizer.json"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

CONVERSATIONS = {
    "one-user-turn": [{"role": "user", "content": "Where does the river go?"}],
    "system-and-turns": [
        {"role": "system", "content": "You answer briefly. "},
        {"role": "user", "content": "Name a river."},
        {"role": "assistant", "content": "The Danube."},
        {"role": "user", "content": "  And another?  "},
    ],
    "reasoning-in-history": [
        {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "<think>Add them.</think> Four."},
        {"role": "user", "content": "Times three?"},
    ],
    "tool-call": [
        {"role": "system", "content": "Tools are available."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo", "unit": "C"}}},
        ]},
        {"role": "tool", "content": "{\"temp\": 3}"},
        {"role": "tool", "content": "{\"wind\": 12}"},
    ],
    "roles-not-alternating": [
        {"role": "user", "content": "One."},
        {"role": "user", "content": "Two."},
    ],
    "two-system-messages": [
        {"role": "system", "content": "First rule."},
        {"role": "system", "content": "Second rule."},
        {"role": "user", "content": "Hello"},
    ],
}

# Which conversations each template takes (the alternating one refuses tool turns).
USES = {
    "deepseek-style": [c for c in CONVERSATIONS if c != "roles-not-alternating"],
    "alternating": ["one-user-turn", "system-and-turns", "reasoning-in-history", "roles-not-alternating"],
}


def main():
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), bos_token=BOS, eos_token=EOS)
    cases = []
    for name, conversations in USES.items():
        source = (TEMPLATES / f"{name}.jinja").read_text()
        for conversation in conversations:
            for add_generation_prompt in (True, False):
                messages = CONVERSATIONS[conversation]
                case = {
                    "template": name,
                    "conversation": conversation,
                    "add_generation_prompt": add_generation_prompt,
                    "messages": messages,
                }
                try:
                    case["text"] = tokenizer.apply_chat_template(
                        messages, chat_template=source, tokenize=False,
                        add_generation_prompt=add_generation_prompt,
                    )
                except Exception as e:  # the template's raise_exception
                    case["error"] = str(e)
                cases.append(case)
    out = {
        "reference": f"transformers {transformers.__version__} apply_chat_template(tokenize=False)",
        "bos_token": BOS,
        "eos_token": EOS,
        "cases": cases,
    }
    (TEMPLATES / "goldens.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
