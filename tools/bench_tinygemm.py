#!/usr/bin/env python3
"""PyTorch's int4 GEMM (tinygemm: torch.ops.aten._weight_int4pack_mm) on the shapes `nibble
bench-gpu` times, on the same GPU, so that bench-gpu can print the ratio (--tinygemm FILE).

Weights are random int4 with group size 32 (as GGUF Q4_0) and bf16 scales and zeros; activations
bf16. Weight copies rotate so that each product reads its weights from device memory, not L2.
Times are CUDA-event medians, like bench-gpu's.

    python3 tools/bench_tinygemm.py --out tinygemm.json [--rows 1,4,16,32,64,256]
"""
import argparse
import json
import sys

from torch_peer import cuda_torch, median_us


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,16,32,64,256")
    p.add_argument("--shapes", default="8192x8192,8192x1024,8192x28672,28672x8192", help="KxN items")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--inner-k-tiles", type=int, default=8)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch = cuda_torch("bench_tinygemm")
    if torch is None:
        return 2
    dev = torch.device("cuda")
    l2 = torch.cuda.get_device_properties(dev).L2_cache_size
    rows_out = []
    for item in a.shapes.split(","):
        k, n = (int(v) for v in item.split("x"))
        packed_bytes = n * k // 2
        copies = max(2, min(64, -(-4 * l2 // packed_bytes)))
        weights = []
        for _ in range(copies):
            # Two random nibbles per byte; torch >= 2.5 takes [n, k / 2] uint8.
            w = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev)
            weights.append(torch.ops.aten._convert_weight_to_int4pack(w, a.inner_k_tiles))
        scales_zeros = (torch.rand(k // a.group_size, n, 2, device=dev) * 0.01 + 0.001).to(torch.bfloat16)
        for m in (int(v) for v in a.rows.split(",")):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=dev)

            def call(i: int):
                return torch.ops.aten._weight_int4pack_mm(x, weights[i % copies], a.group_size, scales_zeros)

            us = median_us(torch, call, a.iterations, a.repetitions)
            rows_out.append({"k": k, "n_out": n, "m": m, "us": us})
            print(f"tinygemm {k}x{n} m={m}: {us:.1f} us", file=sys.stderr)
        del weights
        torch.cuda.empty_cache()
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                   "group_size": a.group_size, "rows": rows_out}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
