#!/usr/bin/env python3
"""Quantization quality on one text, two evaluators: llama.cpp's quantizer against Nibble's files.

1. Quantizes --model (an F16 GGUF) with llama.cpp's own quantizer (llama-cpp-python's
   llama_model_quantize): Q8_0, Q4_K_M and Q4_0 with params.pure (every matrix 4-bit).
2. For each llama.cpp-made file, each --nibble-file LABEL=PATH, and the F16 itself, computes
   - perplexity with llama.cpp (Llama(..., logits_all=True)), on exactly the windows that
     `nibble eval ppl` uses (worker/evaluation.cpp): the text tokenized by Nibble with BOS, cut into
     consecutive windows of --ctx tokens (a partial last window dropped), the first token of each
     replaced by BOS, positions ctx/2 .. ctx-2 scored on the next token, as llama-perplexity does;
   - `nibble eval compare --base F16 --json`: Nibble's perplexity, mean KL and top-1 agreement.
3. Prints a Markdown table. Sizes are whole files in 10^6 bytes.

Needs llama-cpp-python (pip install llama-cpp-python) and numpy.
"""
import argparse
import ctypes
import json
import os
import subprocess
import sys

import numpy as np

try:
    import llama_cpp
    from llama_cpp import Llama
except ImportError:
    sys.exit("llama_cpp (pip install llama-cpp-python) is not installed")

LLAMA_CPP_TYPES = [  # (label, ftype, pure)
    ("Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, False),
    ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, False),
    ("Q4_0 pure", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True),
]


def llama_cpp_quantize(src, dst, ftype, pure, threads):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.pure = pure
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed ({rc}) for {dst}")


def nibble_tokens(nibble, model, text):
    """The ids `nibble eval` scores: Nibble's tokenizer, BOS added (the text passed byte-exact)."""
    out = subprocess.run([nibble, "tokenize", "-m", model, "--text", text],
                         check=True, capture_output=True, text=True).stdout
    return [int(t) for t in out.split()]


def windows_of(tokens, ctx, bos):
    """worker::evaluation_windows: consecutive, non-overlapping, first token set to BOS."""
    return [[bos] + tokens[start + 1:start + ctx] for start in range(0, len(tokens) - ctx + 1, ctx)]


def llama_cpp_perplexity(path, windows, ctx, threads):
    llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, logits_all=True, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    nll, scored = 0.0, 0
    for window in windows:
        llm.reset()
        llm.eval(window)
        rows = np.asarray(llm.scores[ctx // 2:ctx - 1], dtype=np.float64)  # positions ctx/2 .. ctx-2
        targets = np.asarray(window[ctx // 2 + 1:ctx])
        peak = rows.max(axis=1)
        log_z = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1))
        nll -= (rows[np.arange(len(targets)), targets] - log_z).sum()
        scored += len(targets)
    del llm
    return float(np.exp(nll / scored)), scored


def nibble_eval(nibble, args, base, path):
    cmd = [nibble, "eval", "compare", "--base", base, "-m", path, "--text", args.text,
           "--ctx", str(args.ctx), "-t", str(args.threads), "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"nibble eval compare failed on {path}: {res.stderr.strip()}", file=sys.stderr)
        return None
    return json.loads(res.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nibble", required=True, help="the nibble binary")
    p.add_argument("--model", required=True, help="F16 GGUF to quantize and to compare against")
    p.add_argument("--text", required=True, help="held-out text")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--out-dir", required=True, help="where llama.cpp's quantized files go")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nibble-file", action="append", default=[], metavar="LABEL=PATH",
                   help="a Nibble-made GGUF to evaluate alongside (repeatable)")
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)

    rows = [("F16", "—", args.model)]
    for label, ftype, pure in LLAMA_CPP_TYPES:
        dst = os.path.join(args.out_dir, "llamacpp-" + label.lower().replace(" ", "-") + ".gguf")
        if not os.path.exists(dst):
            llama_cpp_quantize(args.model, dst, ftype, pure, args.threads)
        rows.append((label, "llama.cpp", dst))
    for spec in args.nibble_file:
        label, path = spec.split("=", 1)
        rows.append((label, "Nibble", path))

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    tokens = nibble_tokens(args.nibble, args.model, text)
    bos = tokens[0]
    vocab = Llama(model_path=args.model, vocab_only=True, verbose=False)
    same = vocab.tokenize(text.encode(), add_bos=True) == tokens
    del vocab
    windows = windows_of(tokens, args.ctx, bos)
    print(f"{len(tokens)} tokens (llama.cpp's tokenizer gives {'the same' if same else 'DIFFERENT'} ids), "
          f"{len(windows)} windows of {args.ctx}", file=sys.stderr)

    results = []
    for label, maker, path in rows:
        ppl_l, scored = llama_cpp_perplexity(path, windows, args.ctx, args.threads)
        nib = nibble_eval(args.nibble, args, args.model, path)
        results.append((label, maker, os.path.getsize(path) / 1e6, ppl_l, nib))
        print(f"{label} ({maker}): llama.cpp ppl {ppl_l:.4f} over {scored} tokens; nibble "
              f"{nib['model']['perplexity'] if nib else 'failed'}", file=sys.stderr)

    base_l = results[0][3]
    base_n = results[0][4]["base"]["perplexity"] if results[0][4] else float("nan")
    print("| model | made by | size (MB) | ppl (llama.cpp) | vs F16 | ppl (Nibble) | vs F16 "
          "| mean KL vs F16 | top-1 agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, maker, size, ppl_l, nib in results:
        if nib:
            ppl_n = nib["model"]["perplexity"]
            nibble_cols = (f"{ppl_n:.2f} | {100 * (ppl_n / base_n - 1):+.2f}% | {nib['mean_kl']:.5f} "
                           f"| {100 * nib['top1_agreement']:.2f}%")
        else:
            nibble_cols = "— | — | — | —"
        print(f"| {label} | {maker} | {size:.2f} | {ppl_l:.2f} | {100 * (ppl_l / base_l - 1):+.2f}% "
              f"| {nibble_cols} |")


if __name__ == "__main__":
    main()
