#include "cluster/cli/model_session.hpp"

#include <filesystem>
#include <stdexcept>
#include <thread>

#include "cluster/cli/commands.hpp"
#include "model/hf_tokenizer.hpp"

namespace nibble::cli {

int default_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

ModelSession ModelSession::open(const std::string& path, int threads, bool cpu_model) {
  if (!std::filesystem::exists(path)) throw std::runtime_error("model file not found: " + path);
  if (threads < 1) throw std::invalid_argument("--threads must be at least 1");
  ModelSession s;
  s.checkpoint = model::LlamaCheckpoint::open(path);
  if (cpu_model) s.model = std::make_unique<worker::LlamaModel>(s.checkpoint);
  s.pool = std::make_unique<kernels::ThreadPool>(threads);
  if (s.checkpoint->gguf() != nullptr) {
    s.tokenizer = model::Tokenizer::from_gguf(*s.checkpoint->gguf());
  } else {
    s.tokenizer = model::load_hf_tokenizer(
        path, s.checkpoint->config().n_vocab);  // null without tokenizer.json: token ids only
    if (s.tokenizer == nullptr) return s;
  }
  if (s.tokenizer->n_vocab() != s.checkpoint->config().n_vocab) {
    throw std::runtime_error(path + ": vocabulary has " + std::to_string(s.tokenizer->n_vocab()) +
                             " tokens but token_embd.weight has " +
                             std::to_string(s.checkpoint->config().n_vocab));
  }
  return s;
}

const model::Tokenizer& ModelSession::require_tokenizer() const {
  if (tokenizer == nullptr) {
    throw std::runtime_error("no tokenizer: " + checkpoint->path() +
                             " is a Hugging Face checkpoint without tokenizer.json; "
                             "pass token ids (e.g. nibble logits --tokens \"1 2 3\")");
  }
  return *tokenizer;
}

}  // namespace nibble::cli
