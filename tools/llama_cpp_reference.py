#!/usr/bin/env python3
"""Makes llama.cpp's reference outputs for a GGUF model (through llama-cpp-python), in the format of
the fixtures in ../shared/fixtures (see its README.md), so that Nibble's forward pass can be checked
against an engine nobody on this project wrote, e.g. on a model `tools/llama_cpp_quantize.py` made.

Usage: llama_cpp_reference.py MODEL.gguf OUT_PREFIX [--prompt TEXT] [--generate 24] [--threads 2]
                              [--lora ADAPTER.gguf [--lora-scale S]] [--kv-cache-dtype q8_0|q4_0|...] [--cache-type-k T] [--cache-type-v T] [--no-kv-rotation]

The prompt is tokenized by llama.cpp's own tokenizer with BOS and evaluated in one batch; then
--generate tokens are generated greedily (argmax of the last row of logits), each fed back one at a
time. Writes
- OUT_PREFIX.tokens: line 1 `n_prompt N`, line 2 `n_vocab V`, line 3 the N prompt ids (BOS first)
  followed by the generated ids, space-separated;
- OUT_PREFIX.logits: float32 little-endian rows of V, N + generate rows: rows 0..N-1 the logits at
  every prompt position, row N+g the logits after generated token g was fed back (so generated token
  g is the argmax of row N-1+g)."""
import argparse
import os
import sys

try:
    import numpy as np
    import llama_cpp
except ImportError:
    sys.exit("llama_cpp (pip install llama-cpp-python) and numpy are needed")

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="GGUF model")
    parser.add_argument("out_prefix", help="writes OUT_PREFIX.tokens and OUT_PREFIX.logits")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--generate", type=int, default=24, help="greedy tokens to generate")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora", help="a LoRA adapter GGUF llama.cpp applies (its --lora)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="the adapter's scale (--lora-scaled)")
    cache_types = ["f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"]
    parser.add_argument("--kv-cache-dtype", choices=cache_types, default="f16",
                        help="llama.cpp's --cache-type-k and -v both (a quantized V with flash attention, which "
                             "it needs; a quantized K alone without, as llama.cpp can)")
    parser.add_argument("--cache-type-k", choices=cache_types, help="the K cache's alone (default --kv-cache-dtype)")
    parser.add_argument("--cache-type-v", choices=cache_types, help="the V cache's alone (default --kv-cache-dtype)")
    parser.add_argument("--no-kv-rotation", action="store_true",
                        help="a quantized cache unrotated (llama.cpp's LLAMA_ATTN_ROT_DISABLE=1; by default llama.cpp "
                             "rotates Q, K and V by a Hadamard transform for heads of a multiple of 64)")
    args = parser.parse_args()
    if args.no_kv_rotation:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"  # read when the context makes its KV cache
    if args.generate < 0:
        sys.exit("--generate must be >= 0")

    # n_batch = n_ubatch = n_ctx: the whole prompt goes in one batch. No flash attention (the default
    # here, and what the fixtures were made with: it rounds attention through fp16 differently).
    type_k = args.cache_type_k or args.kv_cache_dtype
    type_v = args.cache_type_v or args.kv_cache_dtype
    quantized_v = type_v != "f16"
    cache = {} if type_k == type_v == "f16" else {
        "type_k": getattr(llama_cpp, "GGML_TYPE_" + type_k.upper()),
        "type_v": getattr(llama_cpp, "GGML_TYPE_" + type_v.upper())}

    def load(n_ctx):
        return llama_cpp.Llama(model_path=args.model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                               logits_all=True, flash_attn=quantized_v, n_threads=args.threads,
                               n_threads_batch=args.threads, verbose=False, lora_path=args.lora,
                               lora_scale=args.lora_scale, **cache)

    n_ctx = 512
    llm = load(n_ctx)
    prompt = llm.tokenize(args.prompt.encode("utf-8"), add_bos=True, special=False)
    n_prompt = len(prompt)
    if n_prompt == 0:
        sys.exit("the prompt tokenized to nothing")
    if n_prompt + args.generate > n_ctx:
        del llm
        llm = load(n_prompt + args.generate)
    n_vocab = llm.n_vocab()

    rows = []
    llm.eval(prompt)  # one batch: n_batch and n_ubatch hold the whole prompt
    rows.append(np.array(llm.scores[:n_prompt, :], dtype=np.float32))
    generated = []
    for _ in range(args.generate):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1, :]))
        generated.append(token)
        llm.eval([token])
        rows.append(np.array(llm.scores[llm.n_tokens - 1: llm.n_tokens, :], dtype=np.float32))
    logits = np.concatenate(rows, axis=0)
    assert logits.shape == (n_prompt + args.generate, n_vocab)
    if not np.all(np.isfinite(logits)):
        sys.exit("llama.cpp produced non-finite logits")

    with open(args.out_prefix + ".tokens", "w") as f:
        f.write(f"n_prompt {n_prompt}\n")
        f.write(f"n_vocab {n_vocab}\n")
        f.write(" ".join(str(t) for t in prompt + generated) + "\n")
    logits.astype("<f4").tofile(args.out_prefix + ".logits")
    print(f"{args.out_prefix}: {n_prompt} prompt tokens, {len(generated)} generated, vocab {n_vocab}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
