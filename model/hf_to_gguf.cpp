#include "model/hf_to_gguf.hpp"

#include <filesystem>
#include <vector>

#include "model/gguf.hpp"
#include "model/hf_tokenizer.hpp"
#include "model/llama_checkpoint.hpp"
#include "model/llama_config.hpp"
#include "model/random_model.hpp"

namespace nibble::model {

namespace fs = std::filesystem;

namespace {

// The matrix's bytes as they lie in the checkpoint's mapping (or the permuted copy the checkpoint holds),
// which outlive the write: a 70B checkpoint converts without a second copy of itself in memory.
void add_matrix(GgufWriter& out, const std::string& name, const WeightMatrix& w) {
  out.add_tensor_view(name, {w.k, w.n_out}, w.type, w.data, static_cast<uint64_t>(w.n_out * w.row_bytes()));
}

void add_vector(GgufWriter& out, const std::string& name, const std::vector<float>& v) {
  const auto* bytes = reinterpret_cast<const uint8_t*>(v.data());
  out.add_tensor(name, {static_cast<int64_t>(v.size())}, kernels::DType::F32,
                 std::vector<uint8_t>(bytes, bytes + v.size() * sizeof(float)));
}

std::string model_name(const std::string& dir) {
  fs::path p = fs::path(dir).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // "dir/"
  return p.filename().string();
}

}  // namespace

void convert_hf_to_gguf(const std::string& dir, const std::string& out_path, bool require_tokenizer) {
  const auto checkpoint = LlamaCheckpoint::from_hf(HfCheckpoint::open(dir));
  const LlamaConfig& c = checkpoint->config();
  const std::string tokenizer_path = (fs::path(dir) / "tokenizer.json").string();
  const auto tokenizer = hf_tokenizer_gguf_metadata(dir, c.n_vocab);
  if (tokenizer.empty() && require_tokenizer) {
    throw HfCheckpointError(tokenizer_path +
                            " is missing: a GGUF model carries its vocabulary, and calibration tokenizes "
                            "text with it");
  }
  for (const auto& [key, value] : tokenizer) {
    if (key == "tokenizer.ggml.tokens" && static_cast<int64_t>(value.array.size()) != c.n_vocab) {
      throw HfCheckpointError(tokenizer_path + ": " + std::to_string(value.array.size()) +
                              " tokens, but the model's vocab_size is " + std::to_string(c.n_vocab));
    }
  }

  const LlamaWeights w = checkpoint->bind_weights();
  GgufWriter out;
  out.set_string("general.architecture", "llama");
  out.set_string("general.name", model_name(dir));
  out.set_uint32("general.file_type", llama_file_type(w.layers.at(0).wq.type));
  out.set_uint32("llama.context_length", static_cast<uint32_t>(c.n_ctx_train));
  out.set_uint32("llama.embedding_length", static_cast<uint32_t>(c.n_embd));
  out.set_uint32("llama.block_count", static_cast<uint32_t>(c.n_layer));
  out.set_uint32("llama.feed_forward_length", static_cast<uint32_t>(c.n_ff));
  out.set_uint32("llama.attention.head_count", static_cast<uint32_t>(c.n_head));
  out.set_uint32("llama.attention.head_count_kv", static_cast<uint32_t>(c.n_head_kv));
  out.set_float32("llama.rope.freq_base", c.rope_base);
  out.set_float32("llama.attention.layer_norm_rms_epsilon", c.rms_eps);
  out.set_uint32("llama.rope.dimension_count", static_cast<uint32_t>(c.rope_dims));
  // A head size other than embedding_length / head_count, as convert_hf_to_gguf.py writes config.json's
  // head_dim (Mistral Nemo / Small).
  if (c.head_dim * c.n_head != c.n_embd) {
    out.set_uint32("llama.attention.key_length", static_cast<uint32_t>(c.head_dim));
    out.set_uint32("llama.attention.value_length", static_cast<uint32_t>(c.head_dim));
  }
  out.set_uint32("llama.vocab_size", static_cast<uint32_t>(c.n_vocab));
  // RoPE scaling as convert_hf_to_gguf.py writes it: linear as two keys, YaRN as three, llama3 as a
  // tensor of factors.
  set_gguf_rope_scaling(out, c.rope_linear_factor, c.rope_yarn_original_context);
  for (const auto& [key, value] : tokenizer) out.set(key, value);

  if (!c.rope_freq_factors.empty()) add_vector(out, "rope_freqs.weight", c.rope_freq_factors);
  add_matrix(out, "token_embd.weight", w.token_embd);
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const LlamaLayerWeights& layer = w.layers[static_cast<size_t>(l)];
    const std::string blk = "blk." + std::to_string(l) + ".";
    add_vector(out, blk + "attn_norm.weight", layer.attn_norm);
    for (LayerMatrix m : kLayerMatrices) {
      if (m == LayerMatrix::ffn_gate) add_vector(out, blk + "ffn_norm.weight", layer.ffn_norm);
      add_matrix(out, layer_tensor_name(l, m), layer.matrix(m));
    }
  }
  add_vector(out, "output_norm.weight", w.output_norm);
  if (!w.tied_output) add_matrix(out, "output.weight", w.output);  // absent: the head is the embedding
  out.write(out_path);
}

}  // namespace nibble::model
