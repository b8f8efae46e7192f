// `nibble generate`: one prompt, one completion, on this process's CPU or (--device cuda) one GPU.
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/model_session.hpp"
#include "model/lora_adapter.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/generator.hpp"

namespace nibble::cli {

namespace {

struct GenerateArgs {
  std::string model_path;
  std::string prompt;
  int max_tokens = 128;
  float temperature = 0.8f;
  int top_k = 40;
  float top_p = 0.95f;
  float min_p = 0.05f;
  float repeat_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  int repeat_last_n = 64;
  std::vector<std::string> logit_bias;
  int64_t seed = -1;
  int threads = default_threads();
  int64_t context = 0;
  std::vector<std::string> stop;
  bool json = false;
  std::string device = "cpu";
  worker::Int4Kernels int4_kernels = worker::Int4Kernels::measured;
  worker::Int4Layout int4_layout = worker::Int4Layout::rows;
  bool cutlass_gemm = false;
  bool int8_activations = false;
  bool unfused_epilogues = false;
  std::string prefill_attention = "cuda-cores";
  int64_t decode_split_tokens = worker::CudaModelOptions{}.decode_split_tokens;
  LoraOption lora;
  KvCacheOption kv_cache;
};

}  // namespace

Runner add_generate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  app.add_option("--model,-m", a->model_path, "GGUF model file")->required();
  app.add_option("--prompt,-p", a->prompt, "Prompt text")->required();
  app.add_option("--max-tokens,-n", a->max_tokens, "Tokens to generate at most")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--temperature", a->temperature, "0 means greedy")->check(CLI::NonNegativeNumber);
  app.add_option("--top-k", a->top_k, "Keep the k most likely tokens (0: off)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--top-p", a->top_p, "Nucleus sampling mass (1: off)")->check(CLI::Range(0.0, 1.0));
  app.add_option("--min-p", a->min_p, "Drop tokens below min-p times the top probability (0: off)")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--repeat-penalty", a->repeat_penalty, "Repetition penalty (1: off)")
      ->check(CLI::PositiveNumber);
  app.add_option("--presence-penalty", a->presence_penalty,
                 "Subtracted from each token found in the last --repeat-last-n (0: off)");
  app.add_option("--frequency-penalty", a->frequency_penalty,
                 "Subtracted once per occurrence in the last --repeat-last-n (0: off)");
  app.add_option("--repeat-last-n", a->repeat_last_n, "Recent tokens the penalties look at")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--logit-bias", a->logit_bias,
                 "TOKEN_ID+BIAS or TOKEN_ID-BIAS, e.g. 15043+1.5 (repeatable)");
  app.add_option("--seed", a->seed, "Sampling seed (default: random, printed with --json)");
  app.add_option("--threads,-t", a->threads, "CPU threads")->check(CLI::PositiveNumber);
  app.add_option("--ctx", a->context, "Context length (default: the model's, at most 4096)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--stop", a->stop, "Stop string (repeatable)");
  add_lora_option(app, a->lora);
  add_kv_cache_option(app, a->kv_cache);
  app.add_flag("--json", a->json, "Print one JSON object instead of streaming text");
  app.add_option("--device", a->device, "cpu, or cuda (one GPU; greedy decoding returns only token ids)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  add_int4_kernels_option(
      app, a->int4_kernels,
      "With --device cuda: how group-wise INT4 matrices pick their kernels: measured (timed at "
      "load, the default), cuda-cores, tensor-cores or half2 (fixed: the same kernels as a `nibble "
      "serve` job with the same int4_kernels)");
  add_int4_layout_option(
      app, a->int4_layout,
      "With --device cuda: group-wise INT4 matrices as rows (the default), repacked into "
      "the tensor-core kernels' tiles, or only in CUTLASS's order for its Hopper GEMM (cutlass: one "
      "copy; needs a CUTLASS build and an H100 / H200), or measured: per matrix shape, the one of "
      "the three that decodes fastest when timed at load (needs --int4-kernels measured); tiles and "
      "cutlass are refused with --int4-kernels cuda-cores");
  app.add_flag("--unfused-epilogues", a->unfused_epilogues,
               "With --device cuda: the steps after a one-row half2 GEMV (RoPE + KV write, SwiGLU, residual "
               "add + RMSNorm) as kernels of their own (the same bits; CudaModelOptions::fused_epilogues)");
  app.add_option("--prefill-attention", a->prefill_attention,
                 "With --device cuda: prompt chunks' attention on cuda-cores (the default) or tensor-cores "
                 "(CudaModelOptions::mma_prefill_attention; a `nibble serve` job's prefill_attention)")
      ->check(CLI::IsMember({"cuda-cores", "tensor-cores"}));
  app.add_option("--decode-split-tokens", a->decode_split_tokens,
                 "With --device cuda: positions a decode attention block takes, a multiple of 32 "
                 "(CudaModelOptions::decode_split_tokens; a `nibble serve` job's decode_split_tokens)")
      ->check(CLI::PositiveNumber);
  app.add_flag("--int8-activations", a->int8_activations,
               "With --device cuda: one-row INT4 products (batch-1 decode) on the W4A8 GEMV, the activations "
               "rounded to 8 bits on the device as the CPU backend rounds them (needs --int4-layout rows)");
  app.add_flag("--cutlass-gemm", a->cutlass_gemm,
               "With --device cuda: also hold the INT4 weights in CUTLASS's order and use CUTLASS's Hopper "
               "GEMMs where they time faster at load (needs a CUTLASS build and an H100 / H200)");

  return [a]() {
    const bool cuda = a->device == "cuda";
    if (cuda) {
      const std::string why = worker::cuda_unavailable_reason();
      if (!why.empty()) throw std::runtime_error("--device cuda: " + why);
    }
    ModelSession s = ModelSession::open(a->model_path, a->threads, /*cpu_model=*/!cuda);
    apply_lora_option(a->lora, s);
    apply_kv_cache_option(a->kv_cache, s);
    const int64_t context =
        a->context > 0 ? a->context : std::min<int64_t>(s.checkpoint->config().n_ctx_train, 4096);
    worker::GenerateOptions options;
    options.max_tokens = a->max_tokens;
    options.stop = a->stop;
    options.sampling.temperature = a->temperature;
    options.sampling.top_k = a->top_k;
    options.sampling.top_p = a->top_p;
    options.sampling.min_p = a->min_p;
    options.sampling.repetition_penalty = a->repeat_penalty;
    options.sampling.presence_penalty = a->presence_penalty;
    options.sampling.frequency_penalty = a->frequency_penalty;
    options.sampling.repeat_last_n = a->repeat_last_n;
    for (const auto& [token, bias] : parse_logit_bias(a->logit_bias)) {
      if (token >= s.checkpoint->config().n_vocab)
        throw std::invalid_argument("--logit-bias: token " + std::to_string(token) +
                                    " is outside the vocabulary");
      options.sampling.logit_bias.push_back({token, bias});
    }
    options.sampling.seed = a->seed >= 0 ? static_cast<uint64_t>(a->seed) : std::random_device{}();

    const model::Tokenizer& tokenizer = s.require_tokenizer();
    const std::vector<int32_t> prompt = tokenizer.encode(a->prompt, tokenizer.add_bos_default());
    std::unique_ptr<worker::CudaLlamaModel> gpu;
    std::unique_ptr<worker::CudaKvCache> gpu_cache;
    std::unique_ptr<worker::Generator> generator_ptr;
    if (cuda) {
      worker::CudaModelOptions gpu_options;
      gpu_options.int4_kernels = a->int4_kernels;
      gpu_options.int4_layout = a->int4_layout;
      gpu_options.cutlass_gemm = a->cutlass_gemm;
      gpu_options.int8_activations = a->int8_activations;
      gpu_options.mma_prefill_attention = a->prefill_attention == "tensor-cores";
      gpu_options.fused_epilogues = !a->unfused_epilogues;
      gpu_options.decode_split_tokens = a->decode_split_tokens;
      gpu_options.kv_cache_rotation = !a->kv_cache.no_rotation;
      gpu = std::make_unique<worker::CudaLlamaModel>(s.checkpoint, gpu_options);
      if (!a->lora.path.empty()) {  // llama.cpp's --lora: every sequence on the adapter
        gpu->set_lora(1, model::LoraAdapter::read(a->lora.path, gpu->config()), a->lora.scale);
        gpu->set_default_lora(1);
      }
      gpu_cache = std::make_unique<worker::CudaKvCache>(gpu->config(), worker::Generator::blocks_for(context),
                                                        worker::Generator::kBlockSize, gpu_options.device,
                                                        a->kv_cache.types());
      worker::GeneratorModel m;
      m.n_vocab = gpu->config().n_vocab;
      m.forward = [&](const worker::ForwardBatch& b, std::vector<float>& logits) {
        gpu->forward(b, *gpu_cache, logits);
      };
      m.greedy = [&](const worker::ForwardBatch& b, std::vector<int32_t>& ids) {
        gpu->forward_greedy(b, *gpu_cache, ids);
      };
      m.sample = [&](const worker::ForwardBatch& b, const std::vector<worker::SamplingParams>& params,
                     const std::vector<double>& uniforms, const worker::TokenHistories& histories,
                     std::vector<int32_t>& ids) {
        gpu->forward_sample(b, *gpu_cache, params, uniforms, ids, histories);  // drawn on the device
      };
      generator_ptr = std::make_unique<worker::Generator>(std::move(m), tokenizer, context);
    } else {
      generator_ptr = std::make_unique<worker::Generator>(*s.model, tokenizer, *s.pool, context);
    }
    worker::Generator& generator = *generator_ptr;
    worker::TokenCallback stream;
    if (!a->json) {
      stream = [](const std::string& delta, int32_t) {
        std::fwrite(delta.data(), 1, delta.size(), stdout);
        std::fflush(stdout);
      };
    }
    const worker::GenerateResult r = generator.generate(prompt, options, stream);
    if (!a->json) {
      std::fputc('\n', stdout);
      return 0;
    }
    nlohmann::json out;
    out["prompt_tokens"] = r.prompt_tokens;
    out["tokens"] = r.tokens;
    out["text"] = r.text;
    out["finish_reason"] = worker::finish_reason_name(r.finish);
    out["seed"] = options.sampling.seed;
    out["device"] = a->device;
    const double n_generated = static_cast<double>(r.tokens.size());
    out["timings"] = {
        {"prompt_ms", r.prompt_seconds * 1e3},
        {"generate_ms", r.generate_seconds * 1e3},
        {"prompt_tokens_per_second", r.prompt_seconds > 0 ? r.prompt_tokens.size() / r.prompt_seconds : 0.0},
        {"tokens_per_second",
         r.generate_seconds > 0 && n_generated > 1 ? (n_generated - 1) / r.generate_seconds : 0.0},
    };
    // Invalid UTF-8 (a model may emit stray bytes) is replaced rather than aborting the dump.
    std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
    return 0;
  };
}

}  // namespace nibble::cli
