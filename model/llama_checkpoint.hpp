#pragma once
// A Llama model on disk in either format Nibble reads: a GGUF file, or a Hugging Face checkpoint
// directory (config.json + safetensors). What the worker needs from it: the config and the weights.
#include <cstdint>
#include <memory>
#include <string>

#include "model/gguf.hpp"
#include "model/hf_checkpoint.hpp"
#include "model/llama_config.hpp"
#include "model/llama_weights.hpp"

namespace nibble::model {

class LlamaCheckpoint {
 public:
  // A directory is read as an HF checkpoint, anything else as a GGUF file. Validates the file(s) and
  // the config. Throws GgufError, HfCheckpointError or SafetensorsError naming the problem.
  static std::shared_ptr<const LlamaCheckpoint> open(const std::string& path);
  static std::shared_ptr<const LlamaCheckpoint> from_gguf(std::shared_ptr<const GgufFile> file);
  static std::shared_ptr<const LlamaCheckpoint> from_hf(std::shared_ptr<const HfCheckpoint> checkpoint);

  const std::string& path() const { return path_; }  // the GGUF file or the checkpoint directory
  const LlamaConfig& config() const { return config_; }
  // Exactly one of these is set. The GGUF file also holds the tokenizer; an HF checkpoint has none
  // that Nibble reads.
  const std::shared_ptr<const GgufFile>& gguf() const { return gguf_; }
  const std::shared_ptr<const HfCheckpoint>& hf() const { return hf_; }
  uint64_t weight_bytes() const;  // bytes of the weight file(s), for cost estimates

  // Binds the tensors of layers [layer_begin, layer_end) (-1: through the last) and the embedding,
  // norm and head; the other layers are left empty. Throws like open().
  LlamaWeights bind_weights(int64_t layer_begin = 0, int64_t layer_end = -1) const;

 private:
  LlamaCheckpoint() = default;
  std::string path_;
  LlamaConfig config_;
  std::shared_ptr<const GgufFile> gguf_;
  std::shared_ptr<const HfCheckpoint> hf_;
};

}  // namespace nibble::model
