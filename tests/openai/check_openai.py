"""The official `openai` Python client against a running Moebius router: completions and chat,
whole and streamed, usage, stop sequences, logprobs, and the errors the client raises. Run by
tests/openai_api.rs:

    python tests/openai/check_openai.py BASE_URL MODEL

Prints one line per check and exits 1 at the first that fails.
"""

import sys

import openai

TOKENS = 12


def fail(message):
    print(f"FAIL: {message}")
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def streamed_completion(client, **kwargs):
    text, usage, finish = "", None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage, finish


def streamed_chat(client, **kwargs):
    text, usage, finish, roles = "", None, None, []
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.choices:
            delta = chunk.choices[0].delta
            if delta.role:
                roles.append(delta.role)
            text += delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage, finish, roles


def main():
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)

    models = [m.id for m in client.models.list()]
    check(models == [model], f"models {models}, expected [{model!r}]")
    print(f"ok: models {models}")

    greedy = dict(model=model, temperature=0, max_tokens=TOKENS, extra_body={"ignore_eos": True})
    prompt = "The river"
    whole = client.completions.create(prompt=prompt, **greedy)
    choice = whole.choices[0]
    check(whole.object == "text_completion", f"object {whole.object}")
    check(whole.usage.completion_tokens == TOKENS, f"completion usage {whole.usage}")
    check(whole.usage.prompt_tokens > 0, f"prompt usage {whole.usage}")
    check(whole.usage.total_tokens == whole.usage.prompt_tokens + TOKENS, f"total {whole.usage}")
    check(choice.finish_reason == "length", f"finish {choice.finish_reason}")
    text, usage, finish = streamed_completion(client, prompt=prompt, **greedy)
    check(text == choice.text, f"streamed {text!r} != whole {choice.text!r}")
    check(usage is not None and usage.completion_tokens == TOKENS, f"streamed usage {usage}")
    check(finish == "length", f"streamed finish {finish}")
    print(f"ok: completion {choice.text!r}, streamed the same, usage {whole.usage.prompt_tokens}+{TOKENS}")

    ids = client.completions.create(prompt=[0, 17, 250, 31], **greedy)
    check(ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == TOKENS, f"token-id prompt usage {ids.usage}")
    print("ok: a prompt of token ids")

    logprobs = client.completions.create(prompt=prompt, logprobs=3, **greedy).choices[0].logprobs
    check(len(logprobs.tokens) == TOKENS and len(logprobs.token_logprobs) == TOKENS, f"logprobs {logprobs}")
    check(all(lp <= 0 for lp in logprobs.token_logprobs), f"positive logprob {logprobs.token_logprobs}")
    check(all(1 <= len(top) <= 3 for top in logprobs.top_logprobs), f"top_logprobs {logprobs.top_logprobs}")
    check(logprobs.text_offset == sorted(logprobs.text_offset), f"text_offset {logprobs.text_offset}")
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        # Greedy: no alternative is more likely than the chosen token.
        check(max(top.values()) <= lp + 1e-4, f"greedy token {token!r} {lp} is not the most likely: {top}")
    print(f"ok: completion logprobs, tokens {logprobs.tokens[:4]}...")

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me about the river."},
    ]
    chat = client.chat.completions.create(messages=messages, **greedy)
    check(chat.object == "chat.completion", f"object {chat.object}")
    message = chat.choices[0].message
    check(message.role == "assistant", f"role {message.role}")
    check(chat.usage.completion_tokens == TOKENS and chat.usage.prompt_tokens > 0, f"chat usage {chat.usage}")
    text, usage, finish, roles = streamed_chat(client, messages=messages, **greedy)
    check(text == message.content, f"streamed chat {text!r} != whole {message.content!r}")
    check(roles == ["assistant"], f"roles in the stream {roles}")
    check(usage is not None and usage.completion_tokens == TOKENS, f"streamed chat usage {usage}")
    print(f"ok: chat {message.content!r}, streamed the same, usage {chat.usage.prompt_tokens}+{TOKENS}")

    lp = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **greedy)
    content = lp.choices[0].logprobs.content
    check(len(content) == TOKENS, f"chat logprobs {len(content)} tokens")
    check(all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), f"chat top_logprobs {content[0]}")
    check("".join(t.token for t in content).startswith(message.content[:1]), "chat logprob tokens do not spell the text")
    print("ok: chat logprobs")

    # A stop sequence: cut the greedy text where a piece of it starts.
    stop_at = next((i for i in range(1, len(choice.text)) if choice.text[i:i + 2].strip()), None)
    if stop_at is not None:
        stop = choice.text[stop_at:stop_at + 2]
        cut = client.completions.create(prompt=prompt, stop=[stop], **greedy).choices[0]
        check(cut.finish_reason == "stop", f"stop: finish {cut.finish_reason}")
        check(cut.text == choice.text[:choice.text.find(stop)], f"stop {stop!r}: {cut.text!r} from {choice.text!r}")
        text, _, finish = streamed_completion(client, prompt=prompt, stop=[stop], **greedy)
        check(text == cut.text and finish == "stop", f"streamed stop {text!r} {finish}")
        print(f"ok: stop {stop!r} ends the text at {cut.text!r}")
    else:
        fail(f"no piece of {choice.text!r} to stop at")

    sampled = dict(model=model, max_tokens=TOKENS, temperature=0.8, seed=7, extra_body={"ignore_eos": True})
    one = client.completions.create(prompt=prompt, **sampled).choices[0].text
    two = client.completions.create(prompt=prompt, **sampled).choices[0].text
    check(one == two, f"the same seed gave {one!r} and {two!r}")
    print("ok: a seed makes sampling repeatable")

    for kwargs, error, param in [
        (dict(temperature=5), openai.BadRequestError, "temperature"),
        (dict(n=2), openai.BadRequestError, "n"),
        (dict(top_p=0), openai.BadRequestError, "top_p"),
        (dict(max_tokens=0), openai.BadRequestError, "max_tokens"),
        (dict(model="no-such-model"), openai.NotFoundError, "model"),
    ]:
        try:
            client.completions.create(**{"model": model, "prompt": prompt, **kwargs})
            fail(f"{kwargs} was accepted")
        except error as e:
            check(e.body.get("param") == param, f"{kwargs}: param {e.body}")
            print(f"ok: {kwargs} refused with {e.status_code}, param {param}: {e.body['message']}")
    try:
        client.chat.completions.create(model=model, messages=[{"role": "narrator", "content": "x"}])
        fail("an unknown role was accepted")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "messages[0].role", f"role error {e.body}")
        print(f"ok: unknown role refused: {e.body['message']}")
    print("all openai checks passed")


if __name__ == "__main__":
    main()
