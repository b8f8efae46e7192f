#pragma once
// What every model-using subcommand loads: the model (a GGUF file, a Hugging Face checkpoint
// directory or a dummy "dummy:<shape>"), its tokenizer when it has one, and the CPU model (unless a GPU model
// runs instead).
#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cluster/config/cluster_config.hpp"
#include "kernels/thread_pool.hpp"
#include "model/tokenizer.hpp"
#include "worker/llama_model.hpp"

namespace nibble::cli {

// The tokenizer of a checkpoint: the GGUF vocabulary, an HF directory's tokenizer.json (null when
// it has none), or for a dummy the synthetic vocabulary of its size (model/random_model.hpp). Throws when its
// size disagrees with the model's vocabulary.
std::shared_ptr<const model::Tokenizer> open_tokenizer(const model::LlamaCheckpoint& checkpoint);

// How the OpenAI API names a token in logprobs (openai::ApiSettings::token_text): its bytes, or for a
// control token (BOS, EOS, <|eot_id|>: no bytes) its text; "token_id:N" for an id outside the vocabulary.
std::function<std::string(int32_t)> logprob_token_text(std::shared_ptr<const model::Tokenizer> tokenizer);

struct ModelSession {
  std::shared_ptr<const model::LlamaCheckpoint> checkpoint;
  std::unique_ptr<worker::LlamaModel> model;          // null when opened with cpu_model = false
  std::shared_ptr<const model::Tokenizer> tokenizer;  // null for an HF checkpoint without tokenizer.json
  std::unique_ptr<kernels::ThreadPool> pool;

  // Throws with a message naming the file when it is missing or invalid. cpu_model = false opens
  // only the checkpoint and tokenizer (for --device cuda: the CPU model's packed weights would be
  // wasted).
  static ModelSession open(const std::string& path, int threads, bool cpu_model = true);
  // The tokenizer, for commands that take or print text. Throws for a checkpoint without one.
  const model::Tokenizer& require_tokenizer() const;
};

// --lora PATH and --lora-scale S (llama.cpp's --lora / --lora-scaled: one LoRA adapter applied to
// every sequence of a CPU model).
struct LoraOption {
  std::string path;  // empty: none
  float scale = 1.0f;
};
void add_lora_option(CLI::App& app, LoraOption& value);
// Reads the adapter and makes it the model's default (worker::LlamaModel::set_default_lora); in a session
// without a CPU model (--device cuda) only reads it: the command gives it to its GPU model.
// Throws naming the file for a bad one.
void apply_lora_option(const LoraOption& lora, ModelSession& session);

// --kv-cache-dtype f16|q8_0|q5_1|q5_0|q4_1|q4_0|iq4_nl (vLLM's name; llama.cpp's --cache-type-k and -v
// with the same type): the type of the model's KV caches (CPU or GPU); --cache-type-k / --cache-type-v
// (llama.cpp's) set one side's.
struct KvCacheOption {
  std::string dtype = "f16";
  std::string k_dtype, v_dtype;  // empty: dtype
  bool no_rotation = false;      // --no-kv-rotation: llama.cpp's LLAMA_ATTN_ROT_DISABLE=1
  worker::KvCacheTypes types() const;
  bool quantized() const { return types().quantized(); }
};
void add_kv_cache_option(CLI::App& app, KvCacheOption& value);
// Sets the model's KV cache types (worker::LlamaModel::set_kv_cache_types); in a session without a CPU
// model (--device cuda) only checks them, for the command's CudaKvCache. Throws for a model whose heads
// cannot take them.
void apply_kv_cache_option(const KvCacheOption& option, ModelSession& session);
kernels::DType kv_cache_dtype(const std::string& name);  // one of kv_cache_dtypes()
// A config's kv_cache types (dtype, or k_dtype / v_dtype where given).
worker::KvCacheTypes kv_cache_types(const cluster::KvCacheConfig& config);
const std::vector<std::string>& kv_cache_dtypes();

}  // namespace nibble::cli
