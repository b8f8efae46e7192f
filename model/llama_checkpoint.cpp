#include "model/llama_checkpoint.hpp"

#include "model/hf_quantized.hpp"

namespace nibble::model {

std::shared_ptr<const LlamaCheckpoint> LlamaCheckpoint::open(const std::string& path) {
  if (HfCheckpoint::is_checkpoint_dir(path)) return from_hf(HfCheckpoint::open(path));
  return from_gguf(GgufFile::open(path));
}

std::shared_ptr<const LlamaCheckpoint> LlamaCheckpoint::from_gguf(std::shared_ptr<const GgufFile> file) {
  std::shared_ptr<LlamaCheckpoint> c(new LlamaCheckpoint());
  c->path_ = file->path();
  c->config_ = LlamaConfig::from_gguf(*file);
  c->gguf_ = std::move(file);
  return c;
}

std::shared_ptr<const LlamaCheckpoint> LlamaCheckpoint::from_hf(
    std::shared_ptr<const HfCheckpoint> checkpoint) {
  std::shared_ptr<LlamaCheckpoint> c(new LlamaCheckpoint());
  c->path_ = checkpoint->dir();
  c->config_ = LlamaConfig::from_hf(*checkpoint);
  read_hf_quantization(*checkpoint);  // an unsupported quantization_config fails here, before any binding
  c->hf_ = std::move(checkpoint);
  return c;
}

uint64_t LlamaCheckpoint::weight_bytes() const { return gguf_ ? gguf_->file_size() : hf_->weight_bytes(); }

LlamaWeights LlamaCheckpoint::bind_weights(int64_t layer_begin, int64_t layer_end) const {
  // GGUF binding only points into the mapping, so binding every layer costs nothing.
  if (gguf_) return LlamaWeights::bind(*gguf_, config_);
  return LlamaWeights::bind(*hf_, config_, layer_begin, layer_end);
}

}  // namespace nibble::model
