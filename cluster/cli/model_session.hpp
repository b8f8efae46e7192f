#pragma once
// What every model-using subcommand loads: the GGUF file, its tokenizer and the CPU model.
#include <memory>
#include <string>

#include "kernels/thread_pool.hpp"
#include "model/tokenizer.hpp"
#include "worker/llama_model.hpp"

namespace nibble::cli {

struct ModelSession {
  std::unique_ptr<worker::LlamaModel> model;
  std::shared_ptr<const model::Tokenizer> tokenizer;
  std::unique_ptr<kernels::ThreadPool> pool;

  // Throws with a message naming the file when it is missing or invalid.
  static ModelSession open(const std::string& path, int threads);
};

}  // namespace nibble::cli
