#!/usr/bin/env python3
"""The peer for `nibble bench --peer`: llama.cpp (through llama-cpp-python) timed the same way as
Nibble's bench: one batched forward of the prompt tokens, then single-token forwards, same token ids,
same thread count. Prints one JSON object. Exits 3 when llama_cpp is not installed."""
import argparse
import json
import os
import statistics
import sys
import time

try:
    from llama_cpp import Llama
except ImportError:
    print(json.dumps({"error": "llama_cpp (pip install llama-cpp-python) is not installed"}))
    sys.exit(3)

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--threads", type=int, required=True)
parser.add_argument("--tokens", required=True, help="comma-separated prompt token ids")
parser.add_argument("--gen-tokens", type=int, required=True)
parser.add_argument("--repetitions", type=int, default=3)
parser.add_argument("--lora", help="a LoRA adapter GGUF applied to every token (llama.cpp's --lora)")
parser.add_argument("--lora-scale", type=float, default=1.0)
CACHE_TYPES = ["f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]
parser.add_argument("--kv-cache-dtype", choices=CACHE_TYPES, default="f16",
                    help="llama.cpp's --cache-type-k and -v both (a quantized V needs flash attention)")
parser.add_argument("--cache-type-k", choices=CACHE_TYPES, help="the K cache's alone (default --kv-cache-dtype)")
parser.add_argument("--cache-type-v", choices=CACHE_TYPES, help="the V cache's alone (default --kv-cache-dtype)")
parser.add_argument("--no-kv-rotation", action="store_true",
                    help="a quantized cache unrotated (llama.cpp's LLAMA_ATTN_ROT_DISABLE=1)")
args = parser.parse_args()
if args.no_kv_rotation:
    os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"  # read when the context makes its KV cache

tokens = [int(t) for t in args.tokens.split(",")]
n_ctx = max(len(tokens), args.gen_tokens) + 16
# GGML's type ids of llama.cpp's --cache-type-k/-v choices (a quantized V cache needs flash attention).
GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "iq4_nl": 20}
type_k = args.cache_type_k or args.kv_cache_dtype
type_v = args.cache_type_v or args.kv_cache_dtype
cache = {} if type_k == type_v == "f16" else {
    "type_k": GGML_TYPES[type_k], "type_v": GGML_TYPES[type_v], "flash_attn": type_v != "f16"}
llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
            n_batch=max(len(tokens), 32), n_ctx=n_ctx, verbose=False, lora_path=args.lora,
            lora_scale=args.lora_scale, **cache)
llm.eval(tokens[:1])  # warm-up: page in the weights
pp, tg = [], []
for _ in range(args.repetitions):
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    pp.append(len(tokens) / (time.perf_counter() - start))
    llm.reset()
    start = time.perf_counter()
    for i in range(args.gen_tokens):
        llm.eval([tokens[i % len(tokens)]])
    tg.append(args.gen_tokens / (time.perf_counter() - start))
print(json.dumps({"prompt_tokens_per_second": statistics.mean(pp),
                  "gen_tokens_per_second": statistics.mean(tg)}))
