#include "cluster/cli/model_session.hpp"

#include <sys/resource.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <thread>

#include "cluster/cli/commands.hpp"
#include "model/hf_tokenizer.hpp"
#include "model/random_model.hpp"

namespace nibble::cli {

void add_int4_kernels_option(CLI::App& app, worker::Int4Kernels& value, const std::string& what) {
  app.add_option("--int4-kernels", value, what)
      ->transform(CLI::CheckedTransformer(
          std::map<std::string, worker::Int4Kernels>{{"measured", worker::Int4Kernels::measured},
                                                     {"cuda-cores", worker::Int4Kernels::cuda_cores},
                                                     {"tensor-cores", worker::Int4Kernels::tensor_cores},
                                                     {"half2", worker::Int4Kernels::half2}}));
}

void add_int4_layout_option(CLI::App& app, worker::Int4Layout& value, const std::string& what) {
  app.add_option("--int4-layout", value, what)
      ->transform(CLI::CheckedTransformer(
          std::map<std::string, worker::Int4Layout>{{"rows", worker::Int4Layout::rows},
                                                    {"tiles", worker::Int4Layout::tiles},
                                                    {"cutlass", worker::Int4Layout::cutlass},
                                                    {"measured", worker::Int4Layout::measured}}));
}

int default_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : static_cast<int>(n);
}

double peak_resident_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;  // in kB
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

std::function<std::string(int32_t)> logprob_token_text(std::shared_ptr<const model::Tokenizer> tokenizer) {
  return [tokenizer](int32_t id) {
    if (id < 0 || id >= tokenizer->n_vocab()) return "token_id:" + std::to_string(id);
    std::string bytes = tokenizer->token_bytes(id);
    return bytes.empty() ? tokenizer->token_text(id) : bytes;
  };
}

std::shared_ptr<const model::Tokenizer> open_tokenizer(const model::LlamaCheckpoint& checkpoint) {
  std::shared_ptr<const model::Tokenizer> tokenizer =
      checkpoint.gguf() != nullptr ? model::Tokenizer::from_gguf(*checkpoint.gguf())
      : checkpoint.is_dummy()      ? model::make_synthetic_tokenizer(checkpoint.config().n_vocab)
                                   : model::load_hf_tokenizer(checkpoint.path(), checkpoint.config().n_vocab);
  if (tokenizer != nullptr && tokenizer->n_vocab() != checkpoint.config().n_vocab) {
    throw std::runtime_error(checkpoint.path() + ": vocabulary has " + std::to_string(tokenizer->n_vocab()) +
                             " tokens but token_embd.weight has " +
                             std::to_string(checkpoint.config().n_vocab));
  }
  return tokenizer;
}

ModelSession ModelSession::open(const std::string& path, int threads, bool cpu_model) {
  if (!model::LlamaCheckpoint::is_dummy_spec(path) && !std::filesystem::exists(path))
    throw std::runtime_error("model file not found: " + path);
  if (threads < 1) throw std::invalid_argument("--threads must be at least 1");
  ModelSession s;
  s.checkpoint = model::LlamaCheckpoint::open(path);
  if (cpu_model) s.model = std::make_unique<worker::LlamaModel>(s.checkpoint);
  s.pool = std::make_unique<kernels::ThreadPool>(threads);
  s.tokenizer = open_tokenizer(*s.checkpoint);
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

void add_lora_option(CLI::App& app, LoraOption& value) {
  app.add_option("--lora", value.path,
                 "LoRA adapter (llama.cpp's GGUF, or a PEFT directory) applied to every sequence");
  app.add_option("--lora-scale", value.scale, "The adapter's scale (llama.cpp's --lora-scaled; default 1)");
}

void apply_lora_option(const LoraOption& lora, ModelSession& session) {
  if (lora.path.empty()) return;
  if (session.model == nullptr) {  // --device cuda: read here (a bad file is named before the GPU loads)
    model::LoraAdapter::read(lora.path, session.checkpoint->config());
    return;
  }
  const model::LoraAdapter adapter = model::LoraAdapter::read(lora.path, session.model->config());
  session.model->set_default_lora(session.model->add_lora(adapter, lora.scale));
}

namespace {

constexpr kernels::DType kKvCacheTypes[] = {kernels::DType::F16,   kernels::DType::Q8_0, kernels::DType::Q5_1,
                                            kernels::DType::Q5_0,  kernels::DType::Q4_1, kernels::DType::Q4_0,
                                            kernels::DType::IQ4_NL};

}  // namespace

const std::vector<std::string>& kv_cache_dtypes() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> all;
    for (const kernels::DType type : kKvCacheTypes) all.emplace_back(kernels::type_name(type));
    return all;
  }();
  return names;
}

kernels::DType kv_cache_dtype(const std::string& name) {
  for (const kernels::DType type : kKvCacheTypes)
    if (name == kernels::type_name(type)) return type;
  throw std::invalid_argument("KV cache type '" + name + "': f16, q8_0, q5_1, q5_0, q4_1, q4_0 or iq4_nl");
}

worker::KvCacheTypes KvCacheOption::types() const {
  return {kv_cache_dtype(k_dtype.empty() ? dtype : k_dtype),
          kv_cache_dtype(v_dtype.empty() ? dtype : v_dtype)};
}

worker::KvCacheTypes kv_cache_types(const cluster::KvCacheConfig& config) {
  return KvCacheOption{config.dtype, config.k_dtype, config.v_dtype, false}.types();
}

void add_kv_cache_option(CLI::App& app, KvCacheOption& value) {
  app.add_option("--kv-cache-dtype", value.dtype,
                 "KV cache storage: f16, or as llama.cpp's --cache-type-k/-v: q8_0 (8-bit, 17/32 of the "
                 "bytes), q5_1 (12/32), q5_0 (11/32), q4_1 (10/32), q4_0 or iq4_nl (9/32)")
      ->check(CLI::IsMember(kv_cache_dtypes()))
      ->capture_default_str();
  app.add_option("--cache-type-k", value.k_dtype,
                 "The K cache's type alone (llama.cpp's; default --kv-cache-dtype)")
      ->check(CLI::IsMember(kv_cache_dtypes()));
  app.add_option("--cache-type-v", value.v_dtype,
                 "The V cache's type alone (llama.cpp's; default --kv-cache-dtype)")
      ->check(CLI::IsMember(kv_cache_dtypes()));
  app.add_flag(
      "--no-kv-rotation", value.no_rotation,
      "Store a quantized cache's Q, K and V unrotated (llama.cpp's LLAMA_ATTN_ROT_DISABLE=1; by default "
      "they are rotated by a Walsh-Hadamard transform, as llama.cpp does, for heads of 64 or more)");
}

void apply_kv_cache_option(const KvCacheOption& option, ModelSession& session) {
  const worker::KvCacheTypes types = option.types();
  if (!types.quantized()) return;
  if (session.model == nullptr) {  // --device cuda: the command makes its CudaKvCache with the types
    if (const std::string why = worker::KvCache::unsupported(session.checkpoint->config(), types);
        !why.empty())
      throw std::invalid_argument("this model cannot have " + why);
    return;
  }
  session.model->set_kv_cache_types(types);
  session.model->set_kv_cache_rotation(!option.no_rotation);
}

}  // namespace nibble::cli
