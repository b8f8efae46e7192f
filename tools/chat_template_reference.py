#!/usr/bin/env python3
"""llama.cpp's chat formatting (llama_chat_apply_template through llama-cpp-python) of test conversations
for every format Nibble writes, by name and by a template string llama.cpp detects the format from:
tests/data/chat-templates/reference.json for test_chat_template.

  python3 tools/chat_template_reference.py > tests/data/chat-templates/reference.json
"""
import ctypes
import json

import llama_cpp

NAMES = ["chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "llama3", "mistral-v1",
         "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "phi3", "zephyr", "gemma"]

CONVERSATIONS = [
    [["user", "Hello"]],
    [["system", "You are a helpful assistant"], ["user", "Hello"], ["assistant", "Hi there"],
     ["user", "Who are you"]],
    [["system", "  Be brief.  "], ["user", " spaced question \n"], ["assistant", "  an answer  "],
     ["user", "again"]],
    [["user", "first"], ["assistant", "reply"], ["user", "second"], ["assistant", "reply 2"]],
]

# Template strings (fragments of real templates' Jinja) and the format llama.cpp detects in them.
DETECTED = [
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'}}",
    "{{ bos_token }}{% for message in messages %}{{ '[INST] ' + message['content'] + ' [/INST]' }}",
    "{% if messages[0]['role'] == 'system' %}<<SYS>>\\n{{ system }}\\n<</SYS>>{% endif %}[INST]",
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}",
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}",
    "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' + '<|assistant|>\\n' }}",
    "{{ '<|user|>\\n' + message['content'] + '<|endoftext|>' }}",
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}",
    "{{ '[SYSTEM_PROMPT]' + system + '[/SYSTEM_PROMPT]' }}{{ '[INST]' + content + '[/INST]' }}",
    "{{ ' [INST] ' + system_message }}",
    "{{ '[AVAILABLE_TOOLS]' }}{{ '[INST]' }}",
]


def apply(template: bytes, conversation, add_assistant: bool) -> str:
    message = llama_cpp.llama_chat_message
    chat = (message * len(conversation))(*[message(role=r.encode(), content=c.encode()) for r, c in conversation])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(conversation), add_assistant, buf, len(buf))
    assert 0 <= n < len(buf), n
    return buf.raw[:n].decode()


def main() -> None:
    named = []
    for name in NAMES:
        for conversation in CONVERSATIONS:
            for add_assistant in (True, False):
                named.append({"format": name, "messages": conversation, "add_assistant": add_assistant,
                              "text": apply(name.encode(), conversation, add_assistant)})
    detected = []
    for template in DETECTED:
        conversation = CONVERSATIONS[1]
        detected.append({"template": template, "messages": conversation,
                         "text": apply(template.encode(), conversation, True)})
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "named": named, "detected": detected}, indent=1))


if __name__ == "__main__":
    main()
