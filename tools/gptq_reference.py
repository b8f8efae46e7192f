#!/usr/bin/env python3
"""GPTQ and AWQ checkpoints for Nibble's quantized-checkpoint reader, with transformers' logits.

Builds one small random float LlamaForCausalLM (tools/hf_reference.py's recipe, a shape whose
matrices hold several groups of 32, 64 and 128 columns), rounds every linear layer of every block to
4 bits in the layout a model hub's GPTQ (AutoGPTQ / GPTQModel) or AWQ (AutoAWQ "gemm") checkpoint
uses, and writes each variant as an HF checkpoint directory (config.json with quantization_config +
model.safetensors; embedding, norms and lm_head in float16):

  OUT/<variant>/config.json, model.safetensors
  OUT/<variant>/logits_fp16kv.f32   transformers' float32 forward of the *dequantized* model (every
                                    linear weight replaced by (q - z) * s, the other weights the
                                    float16 values saved), attention rounded to fp16 as Nibble's
                                    KV cache does (tools/hf_reference.py); [43, vocab] float32
  OUT/reference.json                sequences, variants, and per linear layer the FNV-1a 64 hash of
                                    its dequantized float32 weight [out_features, in_features]

Packing (the formats' own definitions; w[n][j] = (q[j][n] - z[g_idx[j]][n]) * s[g_idx[j]][n]):
  GPTQ  qweight int32 [k/8, n]: row r holds q[8r + i][n] in bits 4i..4i+3 (lowest nibble first)
        qzeros  int32 [groups, n/8]: zero of output 8c + i in bits 4i..4i+3; checkpoint_format
                "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself
        scales  float16 [groups, n]; g_idx int32 [k], the group of each input column (act-order:
                groups are runs of the columns in decreasing-importance order, so not monotonic)
  AWQ   qweight int32 [k, n/8]: output 8c + ORDER[i] in bits 4i..4i+3, ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
        qzeros  int32 [groups, n/8], same order, zeros as they are; scales float16 [groups, n]

The rounding itself is plain round-to-nearest (AutoGPTQ's Quantizer: symmetric zero 8, or
asymmetric min/max range including 0): these files test the format, not the GPTQ solver.

Needs numpy, torch and transformers. Usage:
  python3 tools/gptq_reference.py --out tests/data/gptq-tiny-llama
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_reference  # noqa: E402  (registers the fp16-KV attention)

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,  # down_proj: 256 input columns, two groups of 128
    vocab_size=96,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
SEQUENCE_LENGTHS = [1, 9, 33]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

# name: (method, group_size, sym, act_order, checkpoint_format, tied)
VARIANTS = {
    # symmetric, zero 8, trivial g_idx: exactly GGUF Q4_0 (Nibble loads it bit-exact)
    "gptq-g32-sym": ("gptq", 32, True, False, "gptq", False),
    # asymmetric, act-order: g_idx not monotonic (Nibble dequantizes to F16)
    "gptq-g32-asym-actorder": ("gptq", 32, False, True, "gptq", False),
    # symmetric, act-order with 128-column groups: only down_proj has more than one group
    "gptq-g128-sym-actorder": ("gptq", 128, True, True, "gptq", False),
    # per-channel (group_size -1), asymmetric, zeros stored as they are
    "gptq-perchannel-asym-v2": ("gptq", -1, False, False, "gptq_v2", True),
    "awq-g64": ("awq", 64, False, False, "gemm", True),
}


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def quantize(w, group_size, sym, act_order, rng):
    """w: float32 [n, k]. Returns levels [k, n], zeros [groups, n], fp16 scales [groups, n], g_idx [k]."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    groups = (k + g - 1) // g
    order = rng.permutation(k) if act_order else np.arange(k)  # stands in for argsort(-diag(H))
    g_idx = np.empty(k, dtype=np.int32)
    g_idx[order] = np.arange(k) // g
    levels = np.zeros((k, n), dtype=np.int64)
    zeros = np.zeros((groups, n), dtype=np.int64)
    scales = np.zeros((groups, n), dtype=np.float16)
    for gi in range(groups):
        cols = np.nonzero(g_idx == gi)[0]
        x = w[:, cols]  # [n, cols]
        lo = np.minimum(x.min(axis=1), 0)
        hi = np.maximum(x.max(axis=1), 0)
        if sym:
            amax = np.maximum(-lo, hi)
            scale = amax * 2 / 15
            zero = np.full(n, 8)
        else:
            scale = (hi - lo) / 15
            zero = np.rint(-lo / scale).astype(np.int64)
        scale16 = scale.astype(np.float16)
        q = np.clip(np.rint(x / scale[:, None]) + zero[:, None], 0, 15).astype(np.int64)
        levels[cols, :] = q.T
        zeros[gi] = zero
        scales[gi] = scale16
    return levels, zeros, scales, g_idx


def dequantize(levels, zeros, scales, g_idx):
    """float32 [n, k] = (q - z) * s, in float32 like every reader does."""
    z = zeros[g_idx, :].astype(np.float32)  # [k, n]
    s = scales[g_idx, :].astype(np.float32)
    return ((levels.astype(np.float32) - z) * s).T.copy()


def pack_nibbles(values, axis, order=None):
    """Packs 4-bit values (int64, 0..15) 8 to an int32 along `axis` (lowest nibble first)."""
    v = np.moveaxis(values, axis, -1)
    v = v.reshape(v.shape[:-1] + (v.shape[-1] // 8, 8))
    if order is not None:
        v = v[..., order]
    packed = np.zeros(v.shape[:-1], dtype=np.uint32)
    for i in range(8):
        packed |= (v[..., i].astype(np.uint32) & 0xF) << np.uint32(4 * i)
    return np.moveaxis(packed.view(np.int32), -1, axis)


def quantized_tensors(prefix, levels, zeros, scales, g_idx, method, fmt):
    if method == "gptq":
        stored = zeros - 1 if fmt == "gptq" else zeros
        assert stored.min() >= 0, "a zero of 0 cannot be stored in GPTQ v1"
        return {
            prefix + ".qweight": pack_nibbles(levels, 0),
            prefix + ".qzeros": pack_nibbles(stored, 1),
            prefix + ".scales": scales,
            prefix + ".g_idx": g_idx,
        }
    return {
        prefix + ".qweight": pack_nibbles(levels, 1, AWQ_ORDER),
        prefix + ".qzeros": pack_nibbles(zeros, 1, AWQ_ORDER),
        prefix + ".scales": scales,
    }


def quantization_config(method, group_size, sym, act_order, fmt):
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": fmt}
    return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": sym,
            "damp_percent": 0.01, "static_groups": False, "true_sequential": True, "checkpoint_format": fmt}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    hf_reference.SHAPE = SHAPE
    rng = np.random.default_rng(11)
    sequences = [rng.integers(0, SHAPE["vocab_size"], size=n).tolist() for n in SEQUENCE_LENGTHS]
    variants = {}
    for v, (name, (method, group_size, sym, act_order, fmt, tied)) in enumerate(VARIANTS.items()):
        model = hf_reference.build(seed=20 + v, tied=tied)
        directory = os.path.join(args.out, name)
        os.makedirs(directory, exist_ok=True)
        tensors, hashes = {}, {}
        qrng = np.random.default_rng(100 + v)
        with torch.no_grad():
            for pname, p in model.named_parameters():  # float16 everywhere but the linear layers
                p.copy_(p.to(torch.float16).to(torch.float32))
            for layer in range(SHAPE["num_hidden_layers"]):
                for linear in LINEARS:
                    prefix = "model.layers.%d.%s" % (layer, linear)
                    module = model.get_submodule(prefix)
                    w = module.weight.detach().numpy().astype(np.float32)
                    levels, zeros, scales, g_idx = quantize(w, group_size, sym, act_order, qrng)
                    tensors.update(quantized_tensors(prefix, levels, zeros, scales, g_idx, method, fmt))
                    deq = dequantize(levels, zeros, scales, g_idx)
                    hashes[prefix] = fnv1a64(deq.astype("<f4").tobytes())
                    module.weight.copy_(torch.from_numpy(deq))
        for pname, p in model.named_parameters():
            if not any(pname.startswith("model.layers.%d.%s" % (l, s))
                       for l in range(SHAPE["num_hidden_layers"]) for s in LINEARS):
                if tied and pname == "lm_head.weight":
                    continue
                tensors[pname] = p.detach().numpy().astype(np.float16)
        if tied:
            tensors.pop("lm_head.weight", None)
        logits = hf_reference.logits_of(model, sequences, "nibble_fp16_kv")
        logits.tofile(os.path.join(directory, "logits_fp16kv.f32"))
        model.config._attn_implementation = "eager"
        model.save_pretrained(directory, safe_serialization=True)  # for config.json only
        for extra in ("generation_config.json", "model.safetensors"):
            if os.path.exists(os.path.join(directory, extra)):
                os.remove(os.path.join(directory, extra))
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        config.pop("transformers_version", None)
        config["dtype"] = "float16"
        config["quantization_config"] = quantization_config(method, group_size, sym, act_order, fmt)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(config, f, indent=1, sort_keys=True)
            f.write("\n")
        # save_file writes an array's memory in its own order: make every one C-contiguous first
        tensors = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        variants[name] = {"method": method, "group_size": group_size, "sym": sym, "act_order": act_order,
                          "format": fmt, "tied": tied, "logits_shape": list(logits.shape),
                          "dequantized_fnv1a64": hashes}
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({"generator": "tools/gptq_reference.py", "torch": torch.__version__,
                   "transformers": transformers.__version__, "numpy": np.__version__, "shape": SHAPE,
                   "sequences": sequences, "variants": variants}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
