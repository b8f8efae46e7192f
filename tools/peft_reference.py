#!/usr/bin/env python3
"""Reference logits for Nibble's PEFT LoRA reader, from PyTorch + transformers + peft.

Takes the tiny f32 LlamaForCausalLM of tests/data/hf-tiny-llama (tools/hf_reference.py), puts LoRA
adapters on it with peft (random A and B: init_lora_weights=False, then rescaled so that each update is
a sizable share of its matrix, and rounded to values fp16 holds exactly, saved as F32), saves each adapter with save_pretrained (adapter_config.json +
adapter_model.safetensors) and writes transformers' logits of the adapted model for the sequences of
hf-tiny-llama/reference.json, with attention rounded to fp16 as Nibble's KV cache does
(hf_reference.fp16_kv_attention):

  OUT/all/     r 4, lora_alpha 8: every layer projection and lm_head
  OUT/rslora/  r 8, lora_alpha 4, use_rslora (scale alpha / sqrt(r)), q_proj, k_proj and down_proj;
               rank_pattern gives down_proj r 2
  each with logits_fp16kv.f32: little-endian float32 [sum of the sequence lengths, vocab_size]
  OUT/reference.json  the variants, the versions used

Needs `pip install torch transformers peft`. Usage:
  python3 tools/peft_reference.py --base tests/data/hf-tiny-llama --out tests/data/hf-tiny-llama-lora
"""
import argparse
import json
import os
import sys

import torch
import transformers
import peft
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_reference import logits_of  # noqa: E402  (registers the fp16-KV attention too)

VARIANTS = {
    "all": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj", "lm_head"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"],
                   rank_pattern={"down_proj": 2}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="tests/data/hf-tiny-llama")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(os.path.join(args.base, "reference.json")) as f:
        sequences = json.load(f)["sequences"]
    variants = {}
    for seed, (name, settings) in enumerate(VARIANTS.items()):
        torch.manual_seed(100 + seed)
        base = LlamaForCausalLM.from_pretrained(os.path.join(args.base, "f32"), torch_dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **settings)).eval()
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if "lora_A" in param_name or "lora_B" in param_name:
                    # unit-scale products, of values fp16 holds exactly (Nibble keeps the factors as fp16,
                    # as vLLM keeps them in the model's 16-bit type)
                    p.copy_((torch.randn_like(p) / (p.shape[1] ** 0.5)).half().float())
        directory = os.path.join(args.out, name)
        model.save_pretrained(directory, safe_serialization=True)
        for extra in ("README.md",):  # peft's model card: not read by Nibble
            path = os.path.join(directory, extra)
            if os.path.exists(path):
                os.remove(path)
        logits = logits_of(model.base_model.model, sequences, "nibble_fp16_kv")
        logits.tofile(os.path.join(directory, "logits_fp16kv.f32"))
        plain = logits_of(base.__class__.from_pretrained(os.path.join(args.base, "f32")), sequences, "nibble_fp16_kv")
        effect = float(((logits - plain) ** 2).mean() ** 0.5 / (plain ** 2).mean() ** 0.5)
        variants[name] = {"settings": settings, "logits_shape": list(logits.shape), "relative_effect": effect}
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump({"generator": "tools/peft_reference.py", "torch": torch.__version__,
                   "transformers": transformers.__version__, "peft": peft.__version__,
                   "base": "hf-tiny-llama/f32", "variants": variants}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
