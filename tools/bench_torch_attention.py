#!/usr/bin/env python3
"""PyTorch's attention (torch.nn.functional.scaled_dot_product_attention: FlashAttention's kernels for
fp16 on a recent GPU) on the cases `nibble bench-gpu`'s attention tables time, on the same GPU, so that
bench-gpu can print the ratio (--torch-attention FILE): the peer of the decode attention (one query a
sequence over its whole context; the keys in contiguous tensors, not a paged cache) and of the prefill
attention (one causal prompt).

Heads as llama-70b's by default (64 query heads, 8 KV heads of 128: grouped-query attention through
enable_gqa, or the KV heads repeated where this PyTorch lacks it). Decode K / V copies rotate so that
each call reads them from device memory, as bench-gpu's block tables do. Times are CUDA-event medians,
like bench-gpu's.

    python3 tools/bench_torch_attention.py --out torch-attention.json [--batches 1,8,64]
        [--contexts 128,1024,4096] [--prompts 512,2048,8192]
"""
import argparse
import json
import sys

from torch_peer import cuda_torch, median_us


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--contexts", default="128,1024,4096")
    p.add_argument("--prompts", default="512,2048,8192")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch = cuda_torch("bench_torch_attention")
    if torch is None:
        return 2
    import torch.nn.functional as F
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    group = a.heads // a.kv_heads
    scale = a.head_dim ** -0.5

    def sdpa(q, k, v, causal: bool):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
        except TypeError:  # PyTorch before 2.5: no enable_gqa
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                                  v.repeat_interleave(group, dim=1), is_causal=causal,
                                                  scale=scale)

    decode = []
    for batch in (int(v) for v in a.batches.split(",") if v):
        for context in (int(v) for v in a.contexts.split(",") if v):
            kv_bytes = batch * context * a.kv_heads * a.head_dim * 2 * 2
            copies = max(1, min(4096, -(-4 * l2 // kv_bytes)))  # as bench-gpu: 4x the L2 in all
            kv = [(torch.randn(batch, a.kv_heads, context, a.head_dim, dtype=torch.float16, device=dev),
                   torch.randn(batch, a.kv_heads, context, a.head_dim, dtype=torch.float16, device=dev))
                  for _ in range(copies)]
            q = torch.randn(batch, a.heads, 1, a.head_dim, dtype=torch.float16, device=dev)

            def call(i: int):
                k, v = kv[i % copies]
                return sdpa(q, k, v, False)

            us = median_us(torch, call, a.iterations, a.repetitions)
            decode.append({"batch": batch, "context": context, "queries": 1, "us": us})
            print(f"torch attention decode batch {batch} context {context}: {us:.1f} us", file=sys.stderr)
            del kv
            torch.cuda.empty_cache()
    prefill = []
    for tokens in (int(v) for v in a.prompts.split(",") if v):
        q = torch.randn(1, a.heads, tokens, a.head_dim, dtype=torch.float16, device=dev)
        k = torch.randn(1, a.kv_heads, tokens, a.head_dim, dtype=torch.float16, device=dev)
        v = torch.randn(1, a.kv_heads, tokens, a.head_dim, dtype=torch.float16, device=dev)
        us = median_us(torch, lambda i: sdpa(q, k, v, True), max(1, a.iterations // 4), a.repetitions)
        prefill.append({"tokens": tokens, "us": us})
        print(f"torch attention prefill {tokens} tokens: {us:.1f} us", file=sys.stderr)
        del q, k, v
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                   "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                   "decode": decode, "prefill": prefill}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
