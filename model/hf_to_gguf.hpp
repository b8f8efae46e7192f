#pragma once
// A Hugging Face Llama checkpoint directory written as a GGUF file, as llama.cpp's
// convert_hf_to_gguf.py writes one: llama.* hyperparameters from config.json, tokenizer.ggml.* from
// tokenizer.json (model/hf_tokenizer), and the tensors under GGUF's names with the q/k rows in
// GGUF's RoPE order (permuted by LlamaWeights::bind, as for inference). `nibble quantize` converts an
// HF directory this way first, so that every GGUF quantizer takes it unchanged.
#include <string>

namespace nibble::model {

// Writes `out_path` from the checkpoint in `dir`: matrices in the checkpoint's own dtype (F32, F16 or
// BF16; a GPTQ/AWQ layer in the type it loads as), norms as F32, no output.weight when the head is
// tied to the embedding. Without tokenizer.json the call fails naming that file when
// `require_tokenizer`; otherwise the GGUF has no vocabulary (enough for outputs that carry none, such
// as a GPTQ directory, but not servable). Throws HfCheckpointError / SafetensorsError naming the file
// and the problem, GgufError when the output cannot be written. A head_dim other than hidden_size /
// num_attention_heads is written as llama.attention.key_length / value_length.
void convert_hf_to_gguf(const std::string& dir, const std::string& out_path, bool require_tokenizer = true);

}  // namespace nibble::model
