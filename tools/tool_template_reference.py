#!/usr/bin/env python3
"""Real chat templates' prompts for conversations with tools (function calling), rendered by Jinja as
Hugging Face transformers' apply_chat_template renders them (the templates vLLM and llama.cpp's --jinja
run): tests/data/tool-templates/reference.json for test_tool_calls, which checks model/tool_calls's
writing of each form against them byte for byte.

The templates are llama.cpp's copies of the models' own (models/templates in the llama.cpp tree that
llama-cpp-python's PyPI source archive vendors, as tools/build-llama-cpp.sh fetches it). Only the
rendered prompts are written, not the templates.

  python3 tools/tool_template_reference.py > tests/data/tool-templates/reference.json
  python3 tools/tool_template_reference.py --templates DIR   (an unpacked models/templates folder)
"""
import argparse
import copy
import json
import pathlib
import subprocess
import tarfile
import tempfile

import jinja2
import jinja2.ext
import jinja2.sandbox

VERSION = "0.3.36"  # llama-cpp-python release, as tools/build-llama-cpp.sh
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TODAY = "06 Dec 2026"  # what strftime_now("%d %b %Y") gives the templates that ask for the day
TEMPLATES = [
    # (file, the chat format Nibble detects in it)
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3"),
    ("meta-llama-Llama-3.3-70B-Instruct.jinja", "llama3"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3"),  # "Today Date" from strftime_now
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "chatml"),
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city, in \u00b0C or \u00b0F (\"units\")",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "e.g. Z\u00fcrich"},
                "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "hourly": {"type": "boolean"},
                "stations": {"type": "array", "items": {"type": "number"}},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "current_time", "description": "Now, as ISO 8601"}}
NO_ARGS = {"type": "function", "function": {"name": "roll-dice_2", "parameters": {"type": "object", "properties": {}}}}


def call(name, arguments, call_id="call_1"):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


CASES = [
    {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "  You answer in one line.\n"},
        {"role": "user", "content": "Weather in Paris? "}]},
    {"tools": [WEATHER, CLOCK, NO_ARGS], "messages": [{"role": "user", "content": "What time is it?"}]},
    {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Z\u00fcrich for 2 days"},
        {"role": "assistant", "content": "",
         "tool_calls": [call("get_weather", {"city": "Z\u00fcrich", "days": 2, "stations": [1.5, 2e-07, 3]})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}\nline \"2\""},
        {"role": "assistant", "content": "It is 21.5 \u00b0C and clear."},
        {"role": "user", "content": "And tomorrow?"}]},
    {"tools": [WEATHER, CLOCK], "messages": [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Time, and weather in Oslo"},
        {"role": "assistant", "content": "Looking both up.",
         "tool_calls": [call("current_time", {}), call("get_weather", {"city": "Oslo"}, "call_2")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "tool", "tool_call_id": "call_2", "content": "snow"}]},
    # No tools offered, but the conversation holds a call and its result.
    {"tools": [], "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [call("current_time", {})]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"}]},
]


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' own tojson filter (Jinja's would escape HTML characters).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def render(template_text, case, add_generation_prompt):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: TODAY  # transformers' is the clock's; a fixed day here
    messages = copy.deepcopy(case["messages"])
    for m in messages:  # as vLLM hands them to templates: arguments as objects
        for c in m.get("tool_calls", []):
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
        if not m.get("tool_calls"):
            m.pop("tool_calls", None)
    # BOS is the tokenizer's to add, as Nibble's formats leave it.
    return env.from_string(template_text).render(messages=messages, tools=case["tools"] or None,
                                                 add_generation_prompt=add_generation_prompt, bos_token="")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--templates", help="an unpacked models/templates folder (default: fetched from PyPI)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder = args.templates
        if folder is None:
            subprocess.run(["python3", "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={VERSION}", "-d", work], check=True)
            with tarfile.open(f"{work}/llama_cpp_python-{VERSION}.tar.gz") as archive:
                prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/templates/"
                for name, _ in TEMPLATES:
                    archive.extract(prefix + name, work, filter="data")
            folder = f"{work}/{prefix}"
        out = {"source": f"llama-cpp-python {VERSION}: vendor/llama.cpp/models/templates", "cases": []}
        for name, chat_format in TEMPLATES:
            text = (pathlib.Path(folder) / name).read_text()
            for index, case in enumerate(CASES):
                for add in (True, False):
                    try:
                        expected = render(text, case, add)
                    except jinja2.exceptions.TemplateError as e:
                        expected = None
                        error = str(e)
                    entry = {"template": name, "chat_format": chat_format,
                             "template_has_qwen_system": QWEN_SYSTEM in text,
                             "date": TODAY if "strftime_now" in text else None, "case": index,
                             "tools": case["tools"], "messages": case["messages"], "add_generation_prompt": add}
                    if expected is None:
                        entry["error"] = error
                    else:
                        entry["expected"] = expected
                    out["cases"].append(entry)
    json.dump(out, __import__("sys").stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
