#pragma once
// A Llama model in one of the forms Nibble reads: a GGUF file, a Hugging Face checkpoint directory
// (config.json + safetensors), or a dummy ("dummy:<shape>"): random Q4_0 weights of a named shape,
// made at load, so that benchmarks of any size need no files. What the worker needs from it: the
// config and the weights.
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "model/gguf.hpp"
#include "model/hf_checkpoint.hpp"
#include "model/llama_config.hpp"
#include "model/llama_weights.hpp"
#include "model/random_model.hpp"

namespace nibble::model {

// {n_out, k} of a layer's matrix under `config`.
std::pair<int64_t, int64_t> layer_matrix_shape(const LlamaConfig& config, LayerMatrix which);

// The tensors of a dummy checkpoint, for dummy_tensor_seed.
enum class DummyTensor { embedding, matrix, head, attn_norm, ffn_norm, output_norm };

class LlamaCheckpoint {
 public:
  // "dummy:..." is a dummy checkpoint (see open_dummy), a directory an HF checkpoint, anything else
  // a GGUF file. Validates the file(s) and the config. Throws GgufError, HfCheckpointError or
  // SafetensorsError naming the problem.
  static std::shared_ptr<const LlamaCheckpoint> open(const std::string& path);
  static std::shared_ptr<const LlamaCheckpoint> from_gguf(std::shared_ptr<const GgufFile> file);
  static std::shared_ptr<const LlamaCheckpoint> from_hf(std::shared_ptr<const HfCheckpoint> checkpoint);
  // "dummy:<shape>" or "dummy:<shape>:seed=<n>" (shape: a name of llama_shape_by_name; seed 0 when
  // absent): a checkpoint of that shape with an untied head, Q4_0 matrices (the embedding and head
  // too) and f32 norms, all drawn from the seed (kernels/random_weights.hpp) when bound. Throws
  // std::invalid_argument naming the problem (an unknown shape lists the known ones).
  static std::shared_ptr<const LlamaCheckpoint> open_dummy(const std::string& spec);
  // True for "dummy:..." (which needs no file).
  static bool is_dummy_spec(const std::string& path);

  // The GGUF file, the checkpoint directory or the dummy spec.
  const std::string& path() const { return path_; }
  const LlamaConfig& config() const { return config_; }
  // At most one of these is set; neither for a dummy. The GGUF file also holds the tokenizer; an HF
  // checkpoint has none that Nibble reads; a dummy uses make_synthetic_tokenizer(n_vocab).
  const std::shared_ptr<const GgufFile>& gguf() const { return gguf_; }
  const std::shared_ptr<const HfCheckpoint>& hf() const { return hf_; }
  bool is_dummy() const { return !gguf_ && !hf_; }
  uint64_t dummy_seed() const { return dummy_seed_; }
  // Bytes of the weight file(s), for cost estimates; for a dummy, of its weights as a GGUF would
  // hold them (Q4_0 matrices, f32 norms).
  uint64_t weight_bytes() const;

  // Binds the tensors of layers [layer_begin, layer_end) (-1: through the last) and the embedding,
  // norm and head; the other layers are left empty. A dummy generates them into owned memory (the
  // layers bound only; llama-1b takes seconds, llama-70b ~40 GB). Throws like open().
  LlamaWeights bind_weights(int64_t layer_begin = 0, int64_t layer_end = -1) const;

  // The seed of one tensor of a dummy checkpoint, the one rule that bind_weights (CPU) and
  // CudaLlamaModel (GPU) both follow, so that the two hold the same weights. Tensor index: the
  // embedding 0, layer L's matrix j (kLayerMatrices order: q k v o gate up down) 1 + 7 L + j, the
  // head 1 + 7 n_layer; norms after them: layer L's attn_norm 2 + 7 n_layer + 2 L, its ffn_norm
  // 3 + 7 n_layer + 2 L, output_norm 2 + 9 n_layer. Seed = dummy_seed() + index * 0x9e3779b97f4a7c15.
  // `layer` counts for matrix and the layer norms, `matrix` for matrix only.
  uint64_t dummy_tensor_seed(DummyTensor tensor, int64_t layer = 0,
                             LayerMatrix matrix = LayerMatrix::attn_q) const;
  // A dummy's norm weights: [n_embd] uniform in [0.9, 1.1] from dummy_tensor_seed(tensor, layer).
  std::vector<float> dummy_norm(DummyTensor tensor, int64_t layer = 0) const;

 private:
  LlamaCheckpoint() = default;
  std::string path_;
  LlamaConfig config_;
  std::shared_ptr<const GgufFile> gguf_;
  std::shared_ptr<const HfCheckpoint> hf_;
  uint64_t dummy_seed_ = 0;
};

}  // namespace nibble::model
