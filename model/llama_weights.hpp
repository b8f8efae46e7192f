#pragma once
// The tensors of a Llama model, bound by llama.cpp's names (GGUF) or Hugging Face's (safetensors)
// and checked against the config. Matrices stay in the file's (possibly quantized) type and point
// into the mapping; only the small 1-D norm weights are converted to float, and an HF checkpoint's
// q/k projections are permuted into owned memory (see bind(HfCheckpoint)).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/packed_weights.hpp"
#include "kernels/quant_types.hpp"
#include "model/gguf.hpp"
#include "model/hf_checkpoint.hpp"
#include "model/llama_config.hpp"

namespace nibble::model {

// A weight matrix used as y = x · Wᵀ. data: [n_out, k] in `type`.
struct WeightMatrix {
  kernels::DType type = kernels::DType::F32;
  const uint8_t* data = nullptr;
  int64_t n_out = 0;  // rows (output features)
  int64_t k = 0;      // row length (input features)
  int64_t row_bytes() const { return kernels::row_bytes(type, k); }
  // The same matrix repacked for the CPU matmul (kernels/packed_weights.hpp), or null. Once it is
  // set, `data` may have been dropped from memory; it stays valid (touched pages are re-read).
  std::shared_ptr<const kernels::PackedMatrix> packed;
  // Set when `data` points into memory the matrix owns rather than into the file mapping (a
  // tensor-parallel column slice copied at load). pack_for_cpu(release_source) frees it (and sets
  // data to null) once the packed copy exists.
  std::shared_ptr<const std::vector<uint8_t>> owned;
  // Set for GPTQ act-order layers (model/hf_quantized.hpp): the columns are stored grouped, so that
  // each group is a run of whole blocks; column c then multiplies input (*input_order)[c]: [k].
  std::shared_ptr<const std::vector<int32_t>> input_order;
};

// The seven weight matrices of a layer, in forward order.
enum class LayerMatrix { attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down };
inline constexpr LayerMatrix kLayerMatrices[] = {
    LayerMatrix::attn_q,   LayerMatrix::attn_k, LayerMatrix::attn_v,  LayerMatrix::attn_output,
    LayerMatrix::ffn_gate, LayerMatrix::ffn_up, LayerMatrix::ffn_down};
// llama.cpp's tensor name, e.g. "blk.3.attn_q.weight".
std::string layer_tensor_name(int64_t layer, LayerMatrix which);

// HF's q_proj / k_proj rows into GGUF's RoPE order (llama.cpp's convert_hf_to_gguf.py permute): row
// h·d + side·d/2 + i of `from` becomes row h·d + 2i + side of `to`. from, to: [n_heads · head_dim rows,
// row_bytes each], not overlapping. Shared by the HF weights and PEFT adapters' B (model/lora_adapter).
void permute_rope_rows(const uint8_t* from, uint8_t* to, int64_t n_heads, int64_t head_dim,
                       int64_t row_bytes);

struct LlamaLayerWeights {
  std::vector<float> attn_norm;  // [n_embd]
  WeightMatrix wq, wk, wv, wo;
  std::vector<float> ffn_norm;  // [n_embd]
  WeightMatrix w_gate, w_up, w_down;

  WeightMatrix& matrix(LayerMatrix which);
  const WeightMatrix& matrix(LayerMatrix which) const;
};

struct LlamaWeights {
  WeightMatrix token_embd;  // [n_vocab, n_embd]
  std::vector<LlamaLayerWeights> layers;
  std::vector<float> output_norm;  // [n_embd]
  WeightMatrix output;             // [n_vocab, n_embd]; token_embd when the head is tied
  bool tied_output = false;

  // Throws GgufError naming a missing tensor or a shape that disagrees with the config.
  static LlamaWeights bind(const GgufFile& file, const LlamaConfig& config);
  // From an HF LlamaForCausalLM checkpoint: model.embed_tokens, model.layers.N.{self_attn.{q,k,v,o}_proj,
  // mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}, model.norm, lm_head (or the
  // embedding when config.tied_output). Matrices may be F32, F16 or BF16 (the matmul reads all
  // three); they stay mapped unless misaligned for their element type. With a quantization_config
  // (GPTQ, AWQ), a linear layer may instead be <name>.qweight/.qzeros/.scales[/.g_idx], converted at
  // load into owned Q4_0, Q8_0 or F16 (model/hf_quantized.hpp says which and why). Only the layers
  // [layer_begin, layer_end) are bound (layer_end -1: the last); the others are left empty, so a
  // pipeline stage copies only its own q/k. Throws HfCheckpointError naming a missing tensor, a shape
  // that disagrees with the config, a dtype that cannot be served or an inconsistent quantized layer.
  static LlamaWeights bind(const HfCheckpoint& checkpoint, const LlamaConfig& config, int64_t layer_begin = 0,
                           int64_t layer_end = -1);

  // Repacks every matrix the CPU matmul reads faster packed (the types kernels/can_pack_for_matmul
  // accepts) into `packed`, `threads` matrices at a time (0: one a hardware thread, at most 8). With
  // release_source, each source range of the (read-only) file mapping is then dropped from memory,
  // so that resident memory stays about the file's size plus a packed matrix a thread instead of
  // twice the file. Rethrows the first packing failure after every thread has stopped.
  void pack_for_cpu(bool release_source, int threads = 0);
};

}  // namespace nibble::model
