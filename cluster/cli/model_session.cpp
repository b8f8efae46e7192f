#include "cluster/cli/model_session.hpp"

#include <filesystem>
#include <stdexcept>
#include <thread>

#include "cluster/cli/commands.hpp"

namespace nibble::cli {

int default_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

ModelSession ModelSession::open(const std::string& path, int threads) {
  if (!std::filesystem::exists(path)) throw std::runtime_error("model file not found: " + path);
  if (threads < 1) throw std::invalid_argument("--threads must be at least 1");
  ModelSession s;
  s.model = worker::LlamaModel::load(path);
  s.pool = std::make_unique<kernels::ThreadPool>(threads);
  if (s.model->file_ptr() == nullptr) return s;  // HF checkpoint: token ids only
  s.tokenizer = model::Tokenizer::from_gguf(s.model->file());
  if (s.tokenizer->n_vocab() != s.model->config().n_vocab) {
    throw std::runtime_error(path + ": vocabulary has " + std::to_string(s.tokenizer->n_vocab()) +
                             " tokens but token_embd.weight has " +
                             std::to_string(s.model->config().n_vocab));
  }
  return s;
}

const model::Tokenizer& ModelSession::require_tokenizer() const {
  if (tokenizer == nullptr) {
    throw std::runtime_error("no tokenizer: " + model->checkpoint().path() +
                             " is a Hugging Face checkpoint and Nibble does not read tokenizer.json yet; "
                             "pass token ids (e.g. nibble logits --tokens \"1 2 3\")");
  }
  return *tokenizer;
}

}  // namespace nibble::cli
