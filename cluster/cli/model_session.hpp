#pragma once
// What every model-using subcommand loads: the model (a GGUF file or a Hugging Face checkpoint
// directory), its tokenizer when it has one, and the CPU model.
#include <memory>
#include <string>

#include "kernels/thread_pool.hpp"
#include "model/tokenizer.hpp"
#include "worker/llama_model.hpp"

namespace nibble::cli {

struct ModelSession {
  std::unique_ptr<worker::LlamaModel> model;
  std::shared_ptr<const model::Tokenizer> tokenizer;  // null for an HF checkpoint (no tokenizer read)
  std::unique_ptr<kernels::ThreadPool> pool;

  // Throws with a message naming the file when it is missing or invalid.
  static ModelSession open(const std::string& path, int threads);
  // The tokenizer, for commands that take or print text. Throws for a checkpoint without one.
  const model::Tokenizer& require_tokenizer() const;
};

}  // namespace nibble::cli
