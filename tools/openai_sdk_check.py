#!/usr/bin/env python3
"""The official `openai` Python package against a running `nibble openai` (test_openai_server runs it
when the package is installed): models, completions and chat completions whole and streamed, n choices,
logprobs, and the SDK's own error classes for refusals. Exits non-zero on the first mismatch.

With --tools, function calling instead: a named tool_choice's call, whole and streamed, and the
conversation continued with the call and its result (a server whose chat format has a tool form).
With --structured, the SDK's structured output: chat.completions.parse with a pydantic model (nested
models as "$defs" and "$ref", an optional one, an enum), its answer parsed back into the model.

  python3 tools/openai_sdk_check.py http://127.0.0.1:PORT MODEL_NAME [--tools | --structured]
"""
import enum
import json
import sys
import typing

import openai
import pydantic

# Its arguments' values are bounded (an enum, a boolean), so even a random model's call ends.
SET_MODE = {"type": "function", "function": {
    "name": "set_mode", "description": "Units and detail",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]},
                                                    "hourly": {"type": "boolean"}},
                   "required": ["unit", "hourly"], "additionalProperties": False}}}


def check_call(call) -> dict:
    assert call.type == "function" and call.function.name == "set_mode", call
    assert call.id.startswith("call_"), call.id
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"unit", "hourly"} and arguments["unit"] in ("celsius", "fahrenheit"), arguments
    assert isinstance(arguments["hourly"], bool), arguments
    return arguments


def tools(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "Fahrenheit, please."}]
    choice = {"type": "function", "function": {"name": "set_mode"}}
    whole = client.chat.completions.create(model=model, messages=messages, tools=[SET_MODE], tool_choice=choice,
                                           max_tokens=200, temperature=0.7, seed=3)
    answer = whole.choices[0]
    assert answer.finish_reason == "tool_calls", answer
    assert answer.message.content is None and len(answer.message.tool_calls) == 1, answer.message
    check_call(answer.message.tool_calls[0])
    # Streamed: no text, the call in one delta (the SDK's accumulation of tool-call deltas).
    text, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=model, messages=messages, tools=[SET_MODE],
                                                tool_choice=choice, max_tokens=200, temperature=0.7, seed=3,
                                                stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            for d in c.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += d.id or ""
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
            finish = c.finish_reason or finish
    assert text == "" and finish == "tool_calls" and list(calls) == [0], (text, finish, calls)
    assert calls[0]["name"] == "set_mode"
    assert json.loads(calls[0]["arguments"]) == json.loads(answer.message.tool_calls[0].function.arguments)
    # The conversation goes on with the call and its result.
    messages += [answer.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": answer.message.tool_calls[0].id, "content": "done"}]
    after = client.chat.completions.create(model=model, messages=messages, tools=[SET_MODE], tool_choice="none",
                                           max_tokens=4, temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length") and after.choices[0].message.tool_calls is None
    try:
        client.chat.completions.create(model=model, messages=messages, tools=[SET_MODE],
                                       tool_choice={"type": "function", "function": {"name": "other"}})
    except openai.BadRequestError as e:
        assert "no tool is named 'other'" in e.body["message"], e.body
    else:
        raise AssertionError("a tool_choice naming no tool was accepted")
    print("openai", openai.__version__, "tools ok")


class Color(str, enum.Enum):
    RED = "red"
    GREEN = "green"


class Mode(pydantic.BaseModel):  # every value bounded, so even a random model's answer ends
    unit: typing.Literal["celsius", "fahrenheit"]
    hourly: bool


class Settings(pydantic.BaseModel):
    primary: Mode
    backup: typing.Optional[Mode]
    color: Color


def structured(client: openai.OpenAI, model: str) -> None:
    for seed in range(3):
        completion = client.chat.completions.parse(model=model, response_format=Settings, max_tokens=200,
                                                   messages=[{"role": "user", "content": "Settings, please."}],
                                                   temperature=1.0, seed=seed)
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop", completion.choices[0]
        assert isinstance(message.parsed, Settings), message
        assert Settings.model_validate_json(message.content) == message.parsed
    print("openai", openai.__version__, "pydantic", pydantic.VERSION, "structured ok")


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    if sys.argv[3:] == ["--tools"]:
        tools(client, model)
        return
    if sys.argv[3:] == ["--structured"]:
        structured(client, model)
        return
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
