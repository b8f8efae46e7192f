#!/usr/bin/env python3
"""Reference logits for Nibble's Hugging Face checkpoint reader, from PyTorch + transformers.

Builds small random LlamaForCausalLM models (fixed seed), saves them with
save_pretrained(safe_serialization=True) and writes transformers' logits for fixed token ids:

  OUT/f32/          untied head, float32 weights
  OUT/bf16-tied/    tied head (tie_word_embeddings), bfloat16 weights
  OUT/reference.json  the token id sequences, the shape, the versions used

Each variant gets logits of transformers' float32 forward of exactly the weights saved:
  logits_fp16kv.f32  with attention that rounds q, K, V and the softmax weights to fp16, as
                     llama.cpp and Nibble do with their fp16 KV cache (kernels/attention.hpp)
  logits.f32         plain float32 attention (f32 variant only): the model as transformers runs it

Both are little-endian float32 [sum of the sequence lengths, vocab_size], one row per position,
sequences one after the other, each run from position 0 on its own.

--extra-variants: four more float32 variants, written next to the others and added to
reference.json without touching them (--only NAME: that one alone):
  OUT/llama3-rope/  rope_scaling {"rope_type": "llama3", factor 8, low / high frequency factors 1 and 4,
                    original_max_position_embeddings 64}: with heads of 16 the pairs are kept, smoothed
                    and slowed 8 times, all within the sequences' 33 positions
  OUT/linear-rope/  rope_scaling {"rope_type": "linear", "factor": 4}
  OUT/head-dim-32/  head_dim 32 (4 heads of 32 over hidden_size 64, as Mistral Nemo's heads of 128 over
                    5120 / 32)
  OUT/yarn-rope/    rope_scaling {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings":
                    2048}, max_position_embeddings 8192: of the 8 pairs of a head of 16, pairs 0-2 keep their angle, 6-7 are slowed 4
                    times, 3-5 mixed, and q.k grows by YaRN's (1 + 0.1 ln 4)^2

Needs `pip install torch transformers`. Usage:
  python3 tools/hf_reference.py --out tests/data/hf-tiny-llama [--extra-variants [--only NAME]]
"""
import argparse
import json
import os

import numpy as np
import torch
import transformers
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=88,  # not a multiple of 32: no block alignment is assumed anywhere
    vocab_size=192,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
# Lengths chosen to cross Nibble's 16-token KV blocks.
SEQUENCE_LENGTHS = [1, 9, 33]


def fp16_kv_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Causal attention of one unpadded sequence with fp16 q, K, V and softmax weights.

    query: [1, n_head, tokens, head_dim]; key, value: [1, n_head_kv, tokens, head_dim]."""
    r16 = lambda t: t.to(torch.float16).to(torch.float32)
    n_rep = query.shape[1] // key.shape[1]
    k = r16(key).repeat_interleave(n_rep, dim=1)
    v = r16(value).repeat_interleave(n_rep, dim=1)
    scores = (r16(query) @ k.transpose(2, 3)) * scaling
    n = scores.shape[-1]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    weights = r16(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1))
    return (weights @ v).transpose(1, 2).contiguous(), weights


AttentionInterface.register("nibble_fp16_kv", fp16_kv_attention)


# Each extra variant's config.json keys beyond SHAPE.
EXTRA_VARIANTS = {
    "llama3-rope": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                     "rope_theta": SHAPE["rope_theta"]}},
    "linear-rope": {"rope_scaling": {"rope_type": "linear", "factor": 4.0, "rope_theta": SHAPE["rope_theta"]}},
    "head-dim-32": {"head_dim": 32},
    "yarn-rope": {"max_position_embeddings": 8192,
                  "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                                   "rope_theta": SHAPE["rope_theta"]}},
}


def build(seed, tied, extra=None):
    torch.manual_seed(seed)
    config = LlamaConfig(**{**SHAPE, **(extra or {})}, tie_word_embeddings=tied, attn_implementation="eager")
    model = LlamaForCausalLM(config).float().eval()
    # transformers' default init (std 0.02, norms at 1) gives near-uniform attention and tiny logits,
    # which would hide binding mistakes: use larger weights and random norm gains. At std 0.15 pairing
    # RoPE dims wrongly moves the logits by ~100%, while attention is not so sharp that it amplifies
    # the fp16 rounding of the KV cache much (see logits_fp16kv above).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def logits_of(model, sequences, attention):
    model.config._attn_implementation = attention
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = attention
    rows = []
    with torch.no_grad():
        for ids in sequences:
            out = model(torch.tensor([ids], dtype=torch.long), use_cache=False)
            rows.append(out.logits[0].float().numpy())
    return np.concatenate(rows, axis=0).astype("<f4")


def save(model, directory, dtype, sequences, plain):
    os.makedirs(directory, exist_ok=True)
    # Float32 forward of exactly the weights saved. Only the parameters are rounded: model.to(dtype)
    # would also round the rotary inv_freq buffer, which is not saved (Nibble computes it in float).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    logits_of(model, sequences, "nibble_fp16_kv").tofile(os.path.join(directory, "logits_fp16kv.f32"))
    if plain:
        logits_of(model, sequences, "eager").tofile(os.path.join(directory, "logits.f32"))
    shape = logits_of(model, sequences, "eager").shape
    model.config._attn_implementation = "eager"
    model.to(dtype).save_pretrained(directory, safe_serialization=True)
    for extra in ("generation_config.json",):  # not read by Nibble; keeps the test data small
        path = os.path.join(directory, extra)
        if os.path.exists(path):
            os.remove(path)
    return shape


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--extra-variants", action="store_true",
                        help="write the extra variants only, adding them to an existing reference.json")
    parser.add_argument("--only", help="with --extra-variants: this variant alone")
    args = parser.parse_args()

    rng = np.random.default_rng(7)
    sequences = [rng.integers(0, SHAPE["vocab_size"], size=n).tolist() for n in SEQUENCE_LENGTHS]
    if args.extra_variants:
        path = os.path.join(args.out, "reference.json")
        with open(path) as f:
            reference = json.load(f)
        assert reference["sequences"] == sequences and reference["shape"] == SHAPE
        for seed, (name, extra) in enumerate(EXTRA_VARIANTS.items(), start=3):
            if args.only and name != args.only:
                continue
            model = build(seed=seed, tied=False, extra=extra)
            shape = save(model, os.path.join(args.out, name), torch.float32, sequences, True)
            reference["variants"][name] = dict(extra, dtype="F32", tied=False, logits_shape=list(shape),
                                               torch=torch.__version__, transformers=transformers.__version__)
        with open(path, "w") as f:
            json.dump(reference, f, indent=1)
            f.write("\n")
        return
    variants = {}
    shape = save(build(seed=1, tied=False), os.path.join(args.out, "f32"), torch.float32, sequences, True)
    variants["f32"] = {"dtype": "F32", "tied": False, "logits_shape": list(shape)}
    shape = save(build(seed=2, tied=True), os.path.join(args.out, "bf16-tied"), torch.bfloat16, sequences, False)
    variants["bf16-tied"] = {"dtype": "BF16", "tied": True, "logits_shape": list(shape)}
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(
            {
                "generator": "tools/hf_reference.py",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "shape": SHAPE,
                "sequences": sequences,
                "variants": variants,
            },
            f,
            indent=1,
        )
        f.write("\n")


if __name__ == "__main__":
    main()
