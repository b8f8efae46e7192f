#!/usr/bin/env python3
"""The official `openai` Python package against a running `nibble openai` (test_openai_server runs it
when the package is installed): models, completions and chat completions whole and streamed, n choices,
logprobs, and the SDK's own error classes for refusals. Exits non-zero on the first mismatch.

  python3 tools/openai_sdk_check.py http://127.0.0.1:PORT MODEL_NAME
"""
import sys

import openai


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [model]

    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0,
                                      logprobs=2)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert whole.usage.completion_tokens == len(choice.logprobs.tokens) > 0
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    streamed = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == choice.text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3, n=2)
    assert len(chat.choices) == 2 and [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same answer
    assert all(len(t.top_logprobs) == 3 for t in chat.choices[0].logprobs.content)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
    assert text == chat.choices[0].message.content, (text, chat.choices[0].message.content)
    assert usage is not None and usage.prompt_tokens == chat.usage.prompt_tokens

    for bad, error in ((dict(model="other"), openai.NotFoundError), (dict(model=model, frequency_penalty=3),
                                                                   openai.BadRequestError)):
        try:
            client.completions.create(prompt="x", max_tokens=2, **bad)
        except error as e:
            assert e.body is not None and "message" in e.body, e.body
        else:
            raise AssertionError(f"{bad} was accepted")
    print("openai", openai.__version__, "ok")


if __name__ == "__main__":
    main()
