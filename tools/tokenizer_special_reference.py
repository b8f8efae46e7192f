#!/usr/bin/env python3
"""llama.cpp's tokenization with parse_special (llama-cpp-python's tokenize(special=True)) of test texts
on the fixture vocabularies: tests/data/tokenizer-special/vectors.json for test_tokenizer.

  python3 tools/tokenizer_special_reference.py FIXTURES/tokenizer > tests/data/tokenizer-special/vectors.json
"""
import json
import sys

import llama_cpp

TEXTS = [
    "<s>Hello</s>",
    "Hello <s> world</s>",
    "</s></s>",
    "<s>",
    " <unk> x",
    "a</s>b<s>c",
    "Hi!</s>\n<s>[INST] x [/INST]",
    "<|endoftext|>Hello<|endoftext|> world",
    "<|endoftext|><|endoftext|>",
    "no special here",
    "<s </s >",
]


def main() -> None:
    folder = sys.argv[1]
    cases = []
    for vocab in ["ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"]:
        model = llama_cpp.Llama(model_path=f"{folder}/{vocab}", vocab_only=True, verbose=False)
        for text in TEXTS:
            for add_bos in (False, True):
                ids = model.tokenize(text.encode(), add_bos=add_bos, special=True)
                cases.append({"vocab": vocab, "text": text, "add_bos": add_bos, "ids": ids})
    json.dump({"llama_cpp_python": llama_cpp.__version__, "cases": cases}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
