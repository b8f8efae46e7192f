#!/usr/bin/env python3
"""llama.cpp's chat formatting (llama_chat_apply_template through llama-cpp-python) of test conversations
for every format Nibble writes, by name and by a template string llama.cpp detects the format from:
tests/data/chat-templates/reference.json for test_chat_template.

  python3 tools/chat_template_reference.py > tests/data/chat-templates/reference.json
"""
import ctypes
import json

import llama_cpp

# Every format llama.cpp has a name for (llama_chat_builtin_templates), checked against that list below.
NAMES = ["chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "mistral-v1", "mistral-v3",
         "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "phi3", "phi4", "falcon3", "zephyr", "monarch",
         "gemma", "orion", "openchat", "vicuna", "vicuna-orca", "deepseek", "deepseek2", "deepseek3",
         "deepseek-ocr", "command-r", "llama3", "chatglm3", "chatglm4", "glmedge", "minicpm", "exaone3", "exaone4",
         "exaone-moe", "rwkv-world", "granite", "granite-4.0", "granite-4.1", "gigachat", "megrez", "yandex",
         "bailing", "bailing-think", "bailing2", "llama4", "smolvlm", "hunyuan-moe", "gpt-oss", "hunyuan-dense",
         "hunyuan-vl", "kimi-k2", "seed_oss", "grok-2", "pangu-embedded", "solar-open"]

CONVERSATIONS = [
    [["user", "Hello"]],
    [["system", "You are a helpful assistant"], ["user", "Hello"], ["assistant", "Hi there"],
     ["user", "Who are you"]],
    [["system", "  Be brief.  "], ["user", " spaced question \n"], ["assistant", "  an answer  "],
     ["user", "again"]],
    [["user", "first"], ["assistant", "reply"], ["user", "second"], ["assistant", "reply 2"]],
    # Roles some formats write in their own way and others drop or write as given.
    [["user", "what is the weather"], ["assistant_tool_call", "[{\"name\": \"weather\"}]"],
     ["tool", " sunny "], ["function", "f"], ["critic", "ok"], ["user", "thanks"]],
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
    "{{ '[AVAILABLE_TOOLS]' }}{{ \"[INST]\" }}",
    "{{ bos_token + '[INST] ' + message['content'] }}",
    "{{'<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>'}}",
    "<|im_start|>{{ 'User:' + content + '<end_of_utterance>' }}",
    "[gMASK]<sop>{% for item in messages %}<|{{ item['role'] }}|>{% endfor %}",
    "{{ '<|user|>\\n' + content + '\\n' + '<|assistant|>\\n' + '</s>' }}",
    "{{ '<|user|>\\n' + content + '<|assistant|>' }}",
    "{{ '<|user|>' + content + '<|assistant|>' + '<|tool_declare|>' }}",
    "{% for item in messages %}<|{{ item['role'] }}|>{% endfor %}<|begin_of_image|>",
    "{{ bos_token + message['role'] + '\\n' + message['content'] + eos_token }}",
    "{{ 'Human: ' + content + '\\n\\nAssistant: ' + eos_token }}",
    "{{ 'GPT4 Correct ' + role + ': ' + content + '<|end_of_turn|>' }}",
    "{{ 'USER: ' + content + '\\n' }}{{ 'ASSISTANT: ' }}",
    "{{ 'SYSTEM: ' + system }}{{ 'USER: ' + content + '\\n' }}{{ 'ASSISTANT: ' }}",
    "{{ '### Instruction:\\n' + content + '\\n### Response:\\n' + '<|EOT|>' }}",
    "{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + content + '<|END_OF_TURN_TOKEN|>' }}",
    "[gMASK]sop{% for m in messages %}<|{{ m['role'] }}|>{% endfor %}",
    "{{ '<用户>' + content + '<AI>' }}",
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{{ 'Assistant: ' + message['content'] + eos_token }}",
    "{{ '<｜User｜>' + content + '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}",
    "{{ '[|system|]' + content + '[|endofturn|]' + '[|assistant|]' }}",
    "{{ '[|system|]' + content + '[|endofturn|]' + '[|assistant|]' + '[|tool|]' }}",
    "{{- 'User: ' + message['content']|trim + '\\n\\n' -}}",
    "{{ '<|start_of_role|>' + role + '<|end_of_role|>' }}",
    "{{ '<|start_of_role|>' + g4_default_system_message + '<tools>' }}",
    "{{ '<|start_of_role|>' + role + '<tool_call>' }}",
    "{{ message['role'] + additional_special_tokens[0] + message['content'] + additional_special_tokens[1] }}",
    "{{ '<|role_start|>' + role + '<|role_end|>' + content + '<|turn_end|>' }}",
    "{{ ' Пользователь: ' + content }}{{ ' Ассистент:' }}",
    "{{ '<role>' + 'HUMAN' + '</role>' }}{{ '<role>ASSISTANT</role>' }}",
    "{{ '<role>' + \"HUMAN\" + '</role>' }}{{ '<role>ASSISTANT</role><think>' }}",
    "{{ '<role>HUMAN</role>' + content + '<|role_end|>' }}{{ '<role>ASSISTANT</role>' }}",
    "{{ '<|header_start|>' + role + '<|header_end|>\\n\\n' + content + '<|eot|>' }}",
    "{{ '<|userprompt|>' + content + '<|endofuserprompt|>' }}",
    "{{ '<|startoftext|>' + content + '<|extra_0|>' }}{{ '<|extra_4|>' }}",
    "{{ '<|start|>' + role + '<|channel|>' + channel + '<|message|>' }}",
    "{{ '<｜hy_begin▁of▁sentence｜>' + content + '<｜hy_Assistant｜>' }}",
    "{{ content + '<｜hy_place▁holder▁no▁3｜>' + '<｜hy_Assistant｜>' }}",
    "{{ '<|im_assistant|>assistant<|im_middle|>' + content + '<|im_end|>' }}",
    "{{ '<seed:bos>' + role + '\\n' + content + '<seed:eos>' }}",
    "{{ 'Assistant: '  + message['content'] + '<|separator|>\\n\\n' }}",
    "{{ '[unused9]系统：[unused10]' }}",
    "{{ '<|begin|>' + role + '<|content|>' + content + '<|end|>' }}",
]

# Templates llama.cpp detects no format in (the service refuses conversations for them).
UNDETECTED = [
    "plain {{ content }}",
    "",
    "{{ '<|user|>' + content }}",
    "{{ 'USER: ' + content }}",
    "{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}",
]


def apply(template: bytes, conversation, add_assistant: bool) -> str:
    message = llama_cpp.llama_chat_message
    chat = (message * len(conversation))(*[message(role=r.encode(), content=c.encode()) for r, c in conversation])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template, chat, len(conversation), add_assistant, buf, len(buf))
    assert 0 <= n < len(buf), n
    return buf.raw[:n].decode()


def detects(template: str) -> bool:
    return llama_cpp.llama_chat_apply_template(template.encode(), None, 0, True, None, 0) >= 0


def main() -> None:
    n = llama_cpp.llama_chat_builtin_templates(None, 0)
    builtin = (ctypes.c_char_p * n)()
    llama_cpp.llama_chat_builtin_templates(builtin, n)
    assert sorted(NAMES) == sorted(b.decode() for b in builtin), "llama.cpp's formats changed"
    named = []
    for name in NAMES:
        for conversation in CONVERSATIONS:
            for add_assistant in (True, False):
                named.append({"format": name, "messages": conversation, "add_assistant": add_assistant,
                              "text": apply(name.encode(), conversation, add_assistant)})
    def texts(template: bytes):
        return [apply(template, c, a) for c in CONVERSATIONS for a in (True, False)]

    by_name = {name: texts(name.encode()) for name in NAMES}
    detected = []
    for template in DETECTED:
        # Its texts for every conversation (with, then without the assistant's header), and the names
        # llama.cpp writes the same texts with (more than one where formats coincide; none for dots1).
        t = texts(template.encode())
        detected.append({"template": template, "texts": t, "formats": [n for n, v in by_name.items() if v == t]})
    for template in UNDETECTED:
        assert not detects(template), template
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "named": named,
                      "conversations": CONVERSATIONS, "detected": detected,
                      "undetected": UNDETECTED}, indent=1))


if __name__ == "__main__":
    main()
