// `nibble bench-gpu`: the CUDA W4A16 kernel on Llama-70B's matrix shapes against fp16 cuBLAS in the
// same run, as achieved bandwidth and as a fraction of the device's measured copy bandwidth; with
// --tinygemm, also against PyTorch's int4 kernel timed by tools/bench_tinygemm.py on the same shapes.
//
// Then the decode attention on llama-70b's heads per batch, context and split size (attention_bench.cuh).
//
// With --model (e.g. dummy:llama-70b, random weights made on the GPU), the whole model instead:
// load time and device memory, prefill tokens/s, and per batch size the decode step time against
// the floor of reading every weight byte once at copy bandwidth; with --draft, the draft's step time
// at the same batch sizes (the cost side of speculative decoding); with --lora-rank, the same steps with
// random LoRA adapters on every layer against the base's (vLLM's multi-LoRA serving cost).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <tuple>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/model_session.hpp"
#include "kernels/cuda/attention_bench.cuh"  // plain C++: the attention tables' shapes and limits
#include "model/llama_checkpoint.hpp"
#include "model/lora_adapter.hpp"
#include "worker/cuda_llama_model.hpp"
#ifdef NIBBLE_WITH_CUDA
#include "kernels/cuda/lora.cuh"
#include "kernels/cuda/matmul_bench.cuh"
#include "kernels/cuda/w4a16_gemv_half2.cuh"
#endif

namespace nibble::cli {

namespace {

struct Args {
  std::string rows = "1,4,16,32,64,256";
  std::string shapes = "8192x8192,8192x1024,8192x28672,28672x8192";
  std::string tinygemm;
  int iterations = 20, repetitions = 5;
  bool json = false;
  // The decode attention table (kernel mode): empty contexts leave it out.
  std::string attention_batches = "1,8,64", attention_contexts = "128,1024,4096", attention_queries = "1,5",
              attention_splits = "64,128,256,512";
  std::string attention_prompts = "512,2048,8192";  // the prefill attention table: empty leaves it out
  std::string torch_attention;  // tools/bench_torch_attention.py's JSON: the attention tables' peer
  // End-to-end mode (--model).
  std::string model, draft;
  std::string batch = "1,8,32,64";
  int prompt_tokens = 512, gen_tokens = 64, prefill_batch = 8;
  int long_prompt_tokens = 0;  // > 0: one long prompt's prefill, attention both ways
  int lora_rank = 0;           // > 0: the target again with random adapters of this rank (time_with_lora)
  int lora_adapters = 1;       // how many; sequence s names adapter s % lora_adapters + 1
  worker::Int4Kernels int4_kernels = worker::Int4Kernels::measured;
  worker::Int4Layout int4_layout = worker::Int4Layout::rows;
  bool cutlass_gemm = false;
  bool int8_activations = false;
  bool unfused_epilogues = false;
  int64_t decode_split_tokens = worker::CudaModelOptions{}.decode_split_tokens;
  KvCacheOption kv_cache;  // the target's KV cache (a draft's stays fp16)
  worker::CudaModelOptions model_options() const {
    worker::CudaModelOptions options;
    options.decode_split_tokens = decode_split_tokens;
    options.kv_cache_rotation = !kv_cache.no_rotation;
    options.int4_kernels = int4_kernels;
    options.int4_layout = int4_layout;
    options.cutlass_gemm = cutlass_gemm;
    options.int8_activations = int8_activations;
    options.fused_epilogues = !unfused_epilogues;
    return options;
  }
};

std::vector<int64_t> parse_list(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    try {
      size_t used = 0;
      out.push_back(std::stoll(item, &used));
      if (used != item.size()) throw std::invalid_argument(item);
    } catch (const std::logic_error&) {
      throw std::invalid_argument("'" + item + "' in '" + text + "' is not a whole number");
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// End to end (--model)

using Clock = std::chrono::steady_clock;
constexpr int64_t kBlockSize = 16;
constexpr int kMaxLoraRank = 1024;  // --lora-rank's bound: the LoRA kernels'
#ifdef NIBBLE_WITH_CUDA
static_assert(kMaxLoraRank == kernels::cuda::kLoraMaxRank);
#endif
// kernels::cuda::kAttentionMaxRowsPerKvHead (the decode attention's rows a KV head), here without CUDA.
constexpr int kAttentionMaxRowsPerKvHeadTokens = 64;
constexpr int kShortPrompt =
    16;  // each decoding sequence's prompt: decode steps then attend over a short context

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// A model on the GPU with a KV cache of `max_seqs` rows of `mbps` blocks (row s: blocks s * mbps..).
struct GpuModel {
  std::unique_ptr<worker::CudaLlamaModel> model;
  std::unique_ptr<worker::CudaKvCache> cache;
  int64_t mbps = 0;
  double load_seconds = 0.0;
  int64_t model_device_bytes = 0;  // device memory the model took (weights, buffers, cuBLAS workspace)
  int64_t cache_device_bytes = 0;
  int32_t lora_adapters = 0;  // > 0: sequence s names LoRA adapter s % lora_adapters + 1 (make_batch)
};

// options: the kernel choices of the command line (graphs are turned on here); kv_types: the cache's.
GpuModel load_gpu_model(const std::string& path, int64_t max_seqs, int64_t max_seq_tokens,
                        worker::CudaModelOptions options, const worker::KvCacheTypes& kv_types = {}) {
  GpuModel g;
  const auto checkpoint = model::LlamaCheckpoint::open(path);  // a bad path or dummy spec fails here
  const int64_t free_before = worker::cuda_memory_info().free;
  options.graphs = true;  // decode steps as served: one graph launch each
  const auto start = Clock::now();
  g.model = std::make_unique<worker::CudaLlamaModel>(checkpoint, options);
  g.load_seconds = seconds_since(start);
  const int64_t free_model = worker::cuda_memory_info().free;
  g.model_device_bytes = free_before - free_model;
  g.mbps = (max_seq_tokens + kBlockSize - 1) / kBlockSize;
  g.model->set_kv_cache_types(kv_types);  // refuses types the model's heads cannot take
  g.cache = std::make_unique<worker::CudaKvCache>(g.model->config(), max_seqs * g.mbps, kBlockSize,
                                                  options.device, kv_types);
  g.cache_device_bytes = free_model - worker::cuda_memory_info().free;
  return g;
}

// Sequence s of g's cache brings tokens[s] at positions start..; the ids of each sequence's last token come
// back.
worker::ForwardBatch make_batch(const std::vector<std::vector<int32_t>>& tokens, int32_t start,
                                const GpuModel& g) {
  worker::ForwardBatch b;
  b.max_blocks_per_seq = g.mbps;
  for (size_t s = 0; s < tokens.size(); ++s) {
    b.add_sequence(tokens[s], start, static_cast<int32_t>(s), 1);
    for (int64_t i = 0; i < g.mbps; ++i)
      b.block_tables.push_back(static_cast<int32_t>(static_cast<int64_t>(s) * g.mbps + i));
    if (g.lora_adapters > 0) b.seq_adapters.push_back(static_cast<int32_t>(s) % g.lora_adapters + 1);
  }
  return b;
}

// Random non-special tokens: content does not change the work done.
std::vector<std::vector<int32_t>> random_prompts(int64_t seqs, int tokens, int64_t n_vocab,
                                                 std::mt19937& rng) {
  std::uniform_int_distribution<int32_t> pick(3, static_cast<int32_t>(n_vocab - 1));
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(seqs),
                                        std::vector<int32_t>(static_cast<size_t>(tokens)));
  for (auto& seq : out)
    for (auto& t : seq) t = pick(rng);
  return out;
}

// Tokens per second of the prompt pass `batch` into `cache` (median of repetitions, after one untimed
// pass that sizes the buffers).
double time_prompt_pass(GpuModel& g, worker::CudaKvCache& cache, const worker::ForwardBatch& batch,
                        int repetitions) {
  std::vector<int32_t> ids;
  g.model->forward_greedy(batch, cache, ids);
  std::vector<double> runs;
  for (int r = 0; r < repetitions; ++r) {
    const auto start = Clock::now();
    g.model->forward_greedy(batch, cache, ids);
    runs.push_back(seconds_since(start));
  }
  return static_cast<double>(batch.tokens.size()) / median(runs);
}

// Prompt tokens per second of `seqs` prompts of `tokens` in one forward pass.
double time_prefill(GpuModel& g, int64_t seqs, int tokens, int repetitions, std::mt19937& rng) {
  return time_prompt_pass(g, *g.cache,
                          make_batch(random_prompts(seqs, tokens, g.model->config().n_vocab, rng), 0, g),
                          repetitions);
}

// Prompt tokens per second of one prompt of `tokens` in `cache` (blocks 0..).
double time_long_prefill(GpuModel& g, worker::CudaKvCache& cache, int tokens, int repetitions,
                         std::mt19937& rng) {
  worker::ForwardBatch b;
  b.add_sequence(random_prompts(1, tokens, g.model->config().n_vocab, rng)[0], 0, 0, 1);
  b.max_blocks_per_seq = (tokens + kBlockSize - 1) / kBlockSize;
  for (int64_t i = 0; i < b.max_blocks_per_seq; ++i) b.block_tables.push_back(static_cast<int32_t>(i));
  return time_prompt_pass(g, cache, b, repetitions);
}

// Seconds per decode step of `seqs` sequences: each prefills a short prompt, then decodes gen_tokens
// greedy tokens, one step for all of them; only the decode steps are timed. Median over repetitions,
// after an untimed one of two steps (it captures the step's graph).
double time_decode_step(GpuModel& g, int64_t seqs, int gen_tokens, int repetitions, std::mt19937& rng) {
  std::vector<double> runs;
  for (int r = -1; r < repetitions; ++r) {
    const int steps = r < 0 ? 2 : gen_tokens;
    std::vector<int32_t> ids;
    g.model->forward_greedy(
        make_batch(random_prompts(seqs, kShortPrompt, g.model->config().n_vocab, rng), 0, g), *g.cache, ids);
    const auto start = Clock::now();
    for (int i = 0; i < steps; ++i) {
      std::vector<std::vector<int32_t>> next(static_cast<size_t>(seqs));
      for (size_t s = 0; s < next.size(); ++s) next[s] = {ids[s]};
      g.model->forward_greedy(make_batch(next, kShortPrompt + i, g), *g.cache, ids);
    }
    if (r >= 0) runs.push_back(seconds_since(start) / steps);
  }
  return median(runs);
}

// One speculative verification pass of one sequence: the target on k + 1 tokens after a short prompt
// (the last accepted token and k proposals), every row's argmax back, as a round of speculative decoding
// runs it; each pass at the same positions (a rejected round's are written again). Median of the
// repetitions, after an untimed pass (a graph is captured the second time a shape is seen).
double time_verify_pass(GpuModel& g, int k, int passes, int repetitions, std::mt19937& rng) {
  const int64_t n_vocab = g.model->config().n_vocab;
  std::vector<double> runs;
  for (int r = -1; r < repetitions; ++r) {
    std::vector<int32_t> ids;
    g.model->forward_greedy(make_batch(random_prompts(1, kShortPrompt, n_vocab, rng), 0, g), *g.cache, ids);
    worker::ForwardBatch verify = make_batch(random_prompts(1, k + 1, n_vocab, rng), kShortPrompt, g);
    verify.logit_rows.clear();
    for (int32_t i = 0; i <= k; ++i) verify.logit_rows.push_back(i);
    const int steps = r < 0 ? 2 : passes;
    const auto start = Clock::now();
    for (int i = 0; i < steps; ++i) g.model->forward_greedy(verify, *g.cache, ids);
    if (r >= 0) runs.push_back(seconds_since(start) / steps);
  }
  return median(runs);
}

// Speculative decoding's expected gain from step times (Leviathan et al., 2023): a round runs k draft
// steps, then one target pass verifies the k proposals; with each proposal accepted with probability
// a (independently), a round yields (1 - a^(k+1)) / (1 - a) tokens, where plain decoding yields one
// per target step.
double projected_speedup(double a, int k, double target_step_s, double draft_step_s, double verify_s) {
  const double tokens = (1.0 - std::pow(a, k + 1)) / (1.0 - a);
  return tokens * target_step_s / (k * draft_step_s + verify_s);
}
constexpr double kProjectedAcceptance[] = {0.6, 0.7, 0.8, 0.9, 0.95};

// One decode step of `seqs` sequences (after a short prompt and two untimed steps) with its sections
// timed (CudaLlamaModel::profile_greedy).
worker::CudaStepProfile profile_decode_step(GpuModel& g, int64_t seqs, std::mt19937& rng) {
  std::vector<int32_t> ids;
  g.model->forward_greedy(
      make_batch(random_prompts(seqs, kShortPrompt, g.model->config().n_vocab, rng), 0, g), *g.cache, ids);
  const auto next_batch = [&](int step) {
    std::vector<std::vector<int32_t>> next(static_cast<size_t>(seqs));
    for (size_t s = 0; s < next.size(); ++s) next[s] = {ids[s]};
    return make_batch(next, kShortPrompt + step, g);
  };
  for (int i = 0; i < 2; ++i) g.model->forward_greedy(next_batch(i), *g.cache, ids);
  return g.model->profile_greedy(next_batch(2), *g.cache, ids);
}

// The INT4 kernels the model chose at load, per matrix shape and row range, with the times behind
// each choice and the chosen kernel's fraction of the copy bandwidth.
void print_int4_choices(const worker::CudaLlamaModel& model, double copy_gbps) {
  using Choice = worker::CudaInt4KernelChoice;
  const auto& choices = model.int4_kernel_choices();
  if (choices.empty()) return;
  std::printf(
      "\nINT4 kernels per matrix shape and row range (device us per product, timed at load on the model's "
      "weights; *: chosen for the range; %%copy: the chosen kernel's bytes moved over copy bandwidth):\n");
  std::printf("%-26s %5s |", "n_out x k (matrices, group)", "rows");
  for (const char* name : Choice::kernel_names) std::printf(" %17s", name);
  std::printf(" | %6s\n", "%copy");
  for (const Choice& ch : choices) {
    char shape[64];
    std::snprintf(shape, sizeof shape, "%lldx%lld (%lld, g%lld)", static_cast<long long>(ch.n_out),
                  static_cast<long long>(ch.k), static_cast<long long>(ch.matrices),
                  static_cast<long long>(ch.group));
    bool first = true;
    for (int r = 0; r < Choice::kRanges; ++r) {
      for (int c = 0; c < 2; ++c) {
        const int64_t m = Choice::range_timed_rows[r][c];
        if (m == 0) continue;
        std::printf("%-26s %5lld |", first ? shape : "", static_cast<long long>(m));
        first = false;
        for (int kernel = 0; kernel < Choice::kKernels; ++kernel) {
          const double us = ch.us[r][kernel][c];
          if (us > 0)
            std::printf(" %16.1f%s", us, kernel == ch.chosen[r] ? "*" : " ");
          else
            std::printf(" %16s%s", "-", kernel == ch.chosen[r] ? "*" : " ");
        }
        // Bytes one product moves: nibbles, a scale and a zero per group, x (fp16) and y (fp32).
        const double bytes =
            static_cast<double>(ch.n_out) * static_cast<double>(ch.k) *
                (0.5 + 3.0 / static_cast<double>(ch.group)) +
            static_cast<double>(m) * (2.0 * static_cast<double>(ch.k) + 4.0 * static_cast<double>(ch.n_out));
        const double chosen_us = ch.us[r][ch.chosen[r]][c];
        if (chosen_us > 0)
          std::printf(" | %5.0f%%\n", 100.0 * bytes / (chosen_us * 1e-6) / 1e9 / copy_gbps);
        else
          std::printf(" | %6s\n", "-");
      }
    }
    if (!ch.skipped.empty()) std::printf("  skipped: %s\n", ch.skipped.c_str());
    if (std::any_of(ch.half2_variant_us + 1, ch.half2_variant_us + Choice::kHalf2Variants,
                    [](double us) { return us > 0; })) {  // the half2 GEMV's block shapes, timed at one row
      std::printf("  half2 GEMV shapes at 1 row (us; kept: %s):", ch.half2_variant.c_str());
      for (int v = 0; v < Choice::kHalf2Variants; ++v) std::printf(" %.1f", ch.half2_variant_us[v]);
      std::printf("\n");
    }
    if (ch.layout_us[0] > 0) {  // int4_layout measured
      std::printf("  layouts (decode us: geometric mean at 1, 4 and 16 rows; taken: %s):",
                  worker::int4_layout_name(ch.layout));
      for (int l = 0; l < Choice::kLayouts; ++l) {
        if (ch.layout_us[l] > 0)
          std::printf(" %s %.1f", Choice::layout_names[l], ch.layout_us[l]);
        else
          std::printf(" %s -", Choice::layout_names[l]);
      }
      std::printf("\n");
    }
  }
}

// The GGUF Q4_K matrices' one-row GEMV per shape (more rows take the Q4_K tensor-core kernels), and the
// Q6_K ones' (no tensor-core kernel). int8_activations: a Q4_K row runs on the W4A8 GEMV whatever the
// timing says (none is marked).
void print_q4_k_choices(const worker::CudaLlamaModel& model, bool int8_activations) {
  const auto& choices = model.q4_k_choices();
  if (choices.empty()) return;
  std::printf("\nQ4_K and Q6_K matrices, one row (device us per product, timed at load; *: chosen%s):\n",
              int8_activations ? "; every Q4_K one runs on the W4A8 GEMV (--int8-activations)" : "");
  std::printf("%-29s | %14s %14s %14s\n", "type n_out x k (matrices)", "CUDA cores", "tensor cores", "half2");
  for (const worker::CudaQ4KChoice& ch : choices) {
    char shape[64];
    std::snprintf(shape, sizeof shape, "%s %lldx%lld (%lld)", ch.q6_k ? "Q6_K" : "Q4_K",
                  static_cast<long long>(ch.n_out), static_cast<long long>(ch.k),
                  static_cast<long long>(ch.matrices));
    const bool w4a8 = int8_activations && !ch.q6_k;
    const bool cuda_cores = !ch.tensor_cores && !ch.half2 && !w4a8;
    const bool tensor_cores = ch.tensor_cores && !w4a8, half2 = ch.half2 && !w4a8;
    std::printf("%-29s | %13.1f%s %13.1f%s %13.1f%s\n", shape, ch.cuda_cores_us, cuda_cores ? "*" : " ",
                ch.tensor_cores_us, tensor_cores ? "*" : " ", ch.half2_us, half2 ? "*" : " ");
  }
}

// Batch-1 decode's fused epilogues per site and shape, timed at load against the shape's chosen
// one-row kernel plus the kernel the fusion saves (int4_kernels measured, fused epilogues on).
void print_fusion_choices(const worker::CudaLlamaModel& model) {
  const auto& choices = model.one_row_fusions();
  if (choices.empty()) return;
  std::printf("\nFused epilogues at one row (device us a call, timed at load; *: runs):\n");
  std::printf("%-34s %-24s | %-22s %9s %9s %-12s\n", "site", "n_out x k (matrices)", "chosen product",
              "+ kernel", "fused", "fused shape");
  for (const worker::CudaFusionChoice& ch : choices) {
    char shape[64];
    std::snprintf(shape, sizeof shape, "%lldx%lld (%lld%s)", static_cast<long long>(ch.n_out),
                  static_cast<long long>(ch.k), static_cast<long long>(ch.matrices),
                  ch.q4_k   ? ", Q4_K"
                  : ch.q6_k ? ", Q6_K"
                            : "");
    std::printf("%-34s %-24s | %-22s %8.1f%s %8.1f%s %-12s\n", worker::CudaFusionChoice::site_names[ch.site],
                shape, ch.unfused_kernel.c_str(), ch.unfused_us, ch.fused ? " " : "*", ch.fused_us,
                ch.fused ? "*" : " ", ch.fused_shape.c_str());
  }
}

double copy_bandwidth_gbps() {
#ifdef NIBBLE_WITH_CUDA
  double gbps = 0.0;
  std::string error;
  if (kernels::cuda::measure_copy_bandwidth(gbps, error) != kernels::Status::ok)
    throw std::runtime_error("measuring the copy bandwidth failed: " + error);
  return gbps;
#else
  throw std::runtime_error("bench-gpu: " + worker::cuda_unavailable_reason());
#endif
}

// One line to stderr, flushed: "bench-gpu: ...".
template <typename... Values>
void progress(const char* format, Values... values) {
  std::fprintf(stderr, "bench-gpu: ");
  std::fprintf(stderr, format, values...);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

// One step profile as the JSON's step_profile entries hold it.
nlohmann::json profile_json(int64_t batch, const worker::CudaStepProfile& profile) {
  nlohmann::json sections = nlohmann::json::object();
  for (const auto& [name, ms] : profile.sections) sections[name] = ms;
  return {{"batch", batch}, {"total_ms", profile.total_ms}, {"sections", sections}};
}

// A random adapter of `rank` on the seven matrices of every layer of `config` (PEFT's all-linear target;
// not the head): one layer made and copied to the others, as its values do not change the work done.
model::LoraAdapter bench_lora(const model::LlamaConfig& config, int64_t rank, uint64_t seed) {
  model::LlamaConfig one_layer = config;
  one_layer.n_layer = 1;
  model::LoraAdapter adapter =
      model::make_random_lora(one_layer, rank, 0.0f, 0.1f, seed,
                              {std::begin(model::kLayerMatrices), std::end(model::kLayerMatrices)});
  adapter.layers.resize(static_cast<size_t>(config.n_layer), adapter.layers.front());
  return adapter;
}

// The target with LoRA adapters, sequence s naming adapter s % adapters + 1 (vLLM's multi-LoRA serving;
// with one, a fine-tune served on the INT4 base): the products' updates after them (kernels/cuda/lora:
// one call for every adapter of the batch and a layer's products of one input).
struct LoraTimes {
  int64_t rank = 0, adapters = 0;
  double upload_seconds = 0.0;
  int64_t factor_bytes = 0;                // the factors as the GPU holds them (fp16)
  std::vector<double> step_s;              // per batch size, as the base's
  double prefill_tokens_per_second = 0.0;  // one prompt
  worker::CudaStepProfile profile;         // one step at the first batch size
  std::string error;                       // a failure (the LoRA kernels have not run on a GPU yet)
};

LoraTimes time_with_lora(GpuModel& g, const Args& a, const std::vector<int64_t>& batches, std::mt19937& rng) {
  LoraTimes t;
  t.rank = a.lora_rank;
  t.adapters = a.lora_adapters;
  try {
    for (int32_t slot = 1; slot <= a.lora_adapters; ++slot) {
      const model::LoraAdapter adapter = bench_lora(g.model->config(), a.lora_rank, 10 + slot);
      for (const auto& layer : adapter.layers)
        for (const auto& m : layer)
          if (m) t.factor_bytes += static_cast<int64_t>(m->a.size() + m->b.size()) * 2;
      const auto start = Clock::now();
      g.model->set_lora(slot, adapter);
      t.upload_seconds += seconds_since(start);
    }
    g.lora_adapters = a.lora_adapters;
    for (const int64_t b : batches) {
      t.step_s.push_back(time_decode_step(g, b, a.gen_tokens, a.repetitions, rng));
      if (!a.json)
        progress("LoRA rank %lld x %lld batch %lld: %.2f ms/step", static_cast<long long>(t.rank),
                 static_cast<long long>(t.adapters), static_cast<long long>(b), t.step_s.back() * 1e3);
    }
    t.prefill_tokens_per_second = time_prefill(g, 1, a.prompt_tokens, a.repetitions, rng);
    t.profile = profile_decode_step(g, batches.front(), rng);
  } catch (const std::exception& e) {
    t.error = e.what();
  }
  g.lora_adapters = 0;
  try {  // (a kernel fault above stays on the device: the removal's synchronize throws it again)
    for (int32_t slot = 1; slot <= a.lora_adapters; ++slot) g.model->remove_lora(slot);
  } catch (const std::exception& e) {
    t.error += (t.error.empty() ? "" : "; ") + std::string("removing the adapters: ") + e.what();
  }
  return t;
}

int run_model(const Args& a) {
  const auto report = [&a](const char* format, auto... values) {
    if (!a.json) progress(format, values...);
  };
  const std::vector<int64_t> batches = parse_list(a.batch);
  if (batches.empty() || *std::min_element(batches.begin(), batches.end()) < 1)
    throw std::invalid_argument("--batch needs positive sizes, e.g. 1,8,32,64");
  // A prompt of at most 64 tokens can take the decode attention (its rows a KV head fit 64).
  if (a.long_prompt_tokens > 0 && a.long_prompt_tokens <= kAttentionMaxRowsPerKvHeadTokens)
    throw std::invalid_argument(
        "--long-prompt-tokens needs more than 64 tokens (shorter prompts can take the "
        "decode attention), e.g. 2048");
  // Checked first, so that a bad spec is named even without a GPU.
  model::LlamaCheckpoint::open(a.model);
  if (!a.draft.empty()) model::LlamaCheckpoint::open(a.draft);
  const std::string why = worker::cuda_unavailable_reason();
  if (!why.empty()) throw std::runtime_error("bench-gpu: " + why);

  const int64_t max_batch = *std::max_element(batches.begin(), batches.end());
  const int64_t decode_tokens = kShortPrompt + a.gen_tokens;
  GpuModel target = load_gpu_model(a.model, std::max<int64_t>(max_batch, a.prefill_batch),
                                   std::max<int64_t>(a.prompt_tokens, decode_tokens), a.model_options(),
                                   a.kv_cache.types());
  const double copy_gbps = copy_bandwidth_gbps();
  const int64_t weight_bytes = target.model->weight_bytes();
  // A decode step reads every weight byte at least once (the embedding table too: counted, though a
  // step reads one row of it, ~1.5% of llama-70b).
  const double floor_s = static_cast<double>(weight_bytes) / (copy_gbps * 1e9);
  // Each figure also goes to stderr as soon as it is measured (text mode): a run cut short by a time
  // limit (a device session's) keeps what it measured, though the tables come at the end.
  report("%s loaded in %.1f s, decode floor %.2f ms/step", a.model.c_str(), target.load_seconds,
         floor_s * 1e3);
  for (const worker::CudaInt4KernelChoice& ch : target.model->int4_kernel_choices()) {
    if (ch.layout_us[0] > 0) {
      report(
          "INT4 %lldx%lld layouts, decode us: rows %.1f, tiles %.1f, cutlass %.1f (0: not timed): %s taken",
          static_cast<long long>(ch.n_out), static_cast<long long>(ch.k), ch.layout_us[0], ch.layout_us[1],
          ch.layout_us[2], worker::int4_layout_name(ch.layout));
    }
    report("INT4 %lldx%lld (%s): rows 1 %s, 2-16 %s, 17-32 %s, 33-64 %s, over 64 %s",
           static_cast<long long>(ch.n_out), static_cast<long long>(ch.k),
           worker::int4_layout_name(ch.layout), worker::CudaInt4KernelChoice::kernel_names[ch.chosen[0]],
           worker::CudaInt4KernelChoice::kernel_names[ch.chosen[1]],
           worker::CudaInt4KernelChoice::kernel_names[ch.chosen[2]],
           worker::CudaInt4KernelChoice::kernel_names[ch.chosen[3]],
           worker::CudaInt4KernelChoice::kernel_names[ch.chosen[4]]);
  }
  for (const worker::CudaFusionChoice& ch : target.model->one_row_fusions()) {
    report("fusion %s %lldx%lld: %s + kernel %.1f us, fused %.1f us: %s",
           worker::CudaFusionChoice::site_names[ch.site], static_cast<long long>(ch.n_out),
           static_cast<long long>(ch.k), ch.unfused_kernel.c_str(), ch.unfused_us, ch.fused_us,
           ch.fused ? "fused" : "apart");
  }
  std::mt19937 rng(42);
  const double pp_one = time_prefill(target, 1, a.prompt_tokens, a.repetitions, rng);
  report("prefill %d tokens, 1 prompt: %.0f tokens/s", a.prompt_tokens, pp_one);
  const double pp_batch = time_prefill(target, a.prefill_batch, a.prompt_tokens, a.repetitions, rng);
  report("prefill %d tokens, %d prompts: %.0f tokens/s", a.prompt_tokens, a.prefill_batch, pp_batch);
  std::vector<double> step_s;
  for (const int64_t b : batches) {
    step_s.push_back(time_decode_step(target, b, a.gen_tokens, a.repetitions, rng));
    report("batch %lld: %.2f ms/step, %.0f%% of the floor", static_cast<long long>(b), step_s.back() * 1e3,
           100.0 * floor_s / step_s.back());
  }

  // Where a step's time goes, per batch size.
  std::vector<worker::CudaStepProfile> profiles;
  for (const int64_t b : batches) {
    profiles.push_back(profile_decode_step(target, b, rng));
    std::string line;
    for (const auto& [name, ms] : profiles.back().sections) {
      if (ms <= 0.0) continue;
      char part[64];
      std::snprintf(part, sizeof part, "%s%s %.2f", line.empty() ? "" : ", ", name.c_str(), ms);
      line += part;
    }
    report("batch %lld step profile (ms): total %.2f: %s", static_cast<long long>(b),
           profiles.back().total_ms, line.c_str());
  }

  std::vector<double> draft_step_s;
  GpuModel draft;
  if (!a.draft.empty()) {
    draft = load_gpu_model(a.draft, max_batch, decode_tokens, a.model_options());
    for (const int64_t b : batches) {
      draft_step_s.push_back(time_decode_step(draft, b, a.gen_tokens, a.repetitions, rng));
      report("draft batch %lld: %.2f ms/step", static_cast<long long>(b), draft_step_s.back() * 1e3);
    }
  }
  // With a draft at batch 1: the target's verification pass for k proposals (k + 1 tokens of one
  // sequence), for speculative decoding's projected speedup (projected_speedup) at a few acceptance
  // rates: dummy weights have no real acceptance rate, the step times are real.
  struct Verify {
    int k;
    double seconds;
  };
  std::vector<Verify> verify_s;
  const auto batch1 = std::find(batches.begin(), batches.end(), 1);
  if (!a.draft.empty() && batch1 != batches.end()) {
    // (k + 1 <= 8 tokens: decode attention's limit at llama-70b's 8 query heads a KV head)
    for (const int k : {2, 4, 6}) {
      if (kShortPrompt + k + 1 > target.mbps * kBlockSize) continue;  // past the sequence's KV blocks
      verify_s.push_back({k, time_verify_pass(target, k, a.gen_tokens, a.repetitions, rng)});
      report("verify %d proposals (%d tokens, one sequence): %.2f ms", k, k + 1,
             verify_s.back().seconds * 1e3);
    }
  }
  // Batch 1 again with the half2 GEMV's fused epilogues off (CudaModelOptions::fused_epilogues): what
  // doing RoPE / the KV write and SwiGLU in the products saves where they were fused at load (the step
  // profile's "rope + KV write" and "SwiGLU" are then 0 at batch 1 where every site fused); the same
  // kernels elsewhere. The
  // products stay as chosen at load: on the half2 GEMV where a fusion took it (one_row_fusions says
  // what the best plain product plus the separate kernel took instead).
  double unfused_step_s = 0.0, unfused_norms_step_s = 0.0;
  if (!a.unfused_epilogues && std::find(batches.begin(), batches.end(), 1) != batches.end()) {
    target.model->set_fused_norms(false);  // RoPE / KV write and SwiGLU fused, the norms not
    unfused_norms_step_s = time_decode_step(target, 1, a.gen_tokens, a.repetitions, rng);
    target.model->set_fused_norms(true);
    report("unfused norms batch 1: %.2f ms/step", unfused_norms_step_s * 1e3);
    target.model->set_fused_epilogues(false);
    unfused_step_s = time_decode_step(target, 1, a.gen_tokens, a.repetitions, rng);
    target.model->set_fused_epilogues(true);
    report("unfused epilogues batch 1: %.2f ms/step", unfused_step_s * 1e3);
  }
  // The target again with its matrix products launched programmatically (PDL): last, so that a
  // failure there (the feature has not run on a GPU yet) costs none of the figures above.
  std::vector<double> pdl_step_s;
  std::string pdl_error;
  try {
    target.model->set_programmatic_launch(true);
    for (const int64_t b : batches) {
      pdl_step_s.push_back(time_decode_step(target, b, a.gen_tokens, a.repetitions, rng));
      report("PDL batch %lld: %.2f ms/step", static_cast<long long>(b), pdl_step_s.back() * 1e3);
    }
  } catch (const std::exception& e) {
    pdl_step_s.clear();
    pdl_error = e.what();
  }
  // A long prompt, where attention grows with the square of its length: its prefill with the attention
  // on the CUDA cores and on the tensor cores (CudaModelOptions::mma_prefill_attention) in this run, in a
  // KV cache of its own, launched plainly (the PDL run above leaves programmatic launches on); last and
  // caught too, as the tensor-core kernel has not run on a GPU yet (a failure there keeps the CUDA-core
  // figure).
  double long_cuda_cores = 0.0, long_tensor_cores = 0.0;
  std::string long_error;
  const bool long_mma_applies = target.model->mma_prefill_attention_applies();
  if (a.long_prompt_tokens > 0) {
    const int reps = std::min(a.repetitions, 2);  // a 70B pass over 2048 tokens takes about a second
    try {
      target.model->set_programmatic_launch(false);
      target.model->set_mma_prefill_attention(false);
      worker::CudaKvCache long_cache(target.model->config(),
                                     (a.long_prompt_tokens + kBlockSize - 1) / kBlockSize, kBlockSize,
                                     target.model->options().device, target.model->kv_cache_types());
      long_cuda_cores = time_long_prefill(target, long_cache, a.long_prompt_tokens, reps, rng);
      if (long_mma_applies) {
        target.model->set_mma_prefill_attention(true);
        long_tensor_cores = time_long_prefill(target, long_cache, a.long_prompt_tokens, reps, rng);
      }
    } catch (const std::exception& e) {
      long_error = e.what();
    }
    target.model->set_mma_prefill_attention(false);
    if (long_tensor_cores > 0.0) {
      report(
          "prefill %d tokens, 1 prompt: %.0f tokens/s (attention on CUDA cores), %.0f (tensor cores, %.2fx)",
          a.long_prompt_tokens, long_cuda_cores, long_tensor_cores, long_tensor_cores / long_cuda_cores);
    } else if (long_cuda_cores > 0.0) {
      report("prefill %d tokens, 1 prompt: %.0f tokens/s (%s)", a.long_prompt_tokens, long_cuda_cores,
             long_mma_applies ? "the tensor-core attention failed"
                              : "the tensor-core attention does not take "
                                "this model's heads");
    }
  }

  // With --lora-rank, last (its kernels have not run on a GPU yet: a fault there costs no figure above),
  // launched as the base's decode steps were (the PDL run left programmatic launches on).
  LoraTimes lora;
  if (a.lora_rank > 0) {
    target.model->set_programmatic_launch(false);
    lora = time_with_lora(target, a, batches, rng);
    if (!lora.error.empty()) report("LoRA run failed: %s", lora.error.c_str());
  }

  const auto gib = [](int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0); };
  // Batch 1's target and draft steps, for the speculative projection (verify_s is empty without them).
  const size_t b1 = batch1 == batches.end() ? 0 : static_cast<size_t>(batch1 - batches.begin());
  nlohmann::json projection = nlohmann::json::array();
  for (const Verify& v : verify_s) {
    nlohmann::json speedup = nlohmann::json::object();
    for (const double acceptance : kProjectedAcceptance) {
      char key[16];
      std::snprintf(key, sizeof key, "%g", acceptance);
      speedup[key] = projected_speedup(acceptance, v.k, step_s[b1], draft_step_s[b1], v.seconds);
    }
    projection.push_back({{"k", v.k},
                          {"verify_ms", v.seconds * 1e3},
                          {"verify_target_step_ratio", v.seconds / step_s[b1]},
                          {"speedup_by_acceptance", speedup}});
  }
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < batches.size(); ++i) {
    nlohmann::json row{{"batch", batches[i]},
                       {"decode_tokens_per_second", static_cast<double>(batches[i]) / step_s[i]},
                       {"ms_per_step", step_s[i] * 1e3},
                       {"floor_fraction", floor_s / step_s[i]}};
    if (!draft_step_s.empty()) {
      row["draft_ms_per_step"] = draft_step_s[i] * 1e3;
      row["draft_target_step_ratio"] = draft_step_s[i] / step_s[i];
    }
    if (batches[i] == 1 && unfused_step_s > 0.0) {
      row["unfused_epilogues_ms_per_step"] = unfused_step_s * 1e3;
      row["unfused_norms_ms_per_step"] = unfused_norms_step_s * 1e3;
    }
    if (!pdl_step_s.empty()) {
      row["pdl_ms_per_step"] = pdl_step_s[i] * 1e3;
      row["pdl_floor_fraction"] = floor_s / pdl_step_s[i];
    }
    rows.push_back(row);
  }
  nlohmann::json int4 = nlohmann::json::array();
  for (const worker::CudaInt4KernelChoice& ch : target.model->int4_kernel_choices()) {
    nlohmann::json ranges = nlohmann::json::array();
    for (int r = 0; r < worker::CudaInt4KernelChoice::kRanges; ++r) {
      nlohmann::json timed = nlohmann::json::array();
      for (int c = 0; c < 2; ++c) {
        const int64_t m = worker::CudaInt4KernelChoice::range_timed_rows[r][c];
        if (m == 0) continue;
        nlohmann::json us = nlohmann::json::object();
        for (int kernel = 0; kernel < worker::CudaInt4KernelChoice::kKernels; ++kernel)
          if (ch.us[r][kernel][c] > 0)
            us[worker::CudaInt4KernelChoice::kernel_names[kernel]] = ch.us[r][kernel][c];
        timed.push_back({{"rows", m}, {"us", us}});
      }
      ranges.push_back({{"max_rows", worker::CudaInt4KernelChoice::range_max_rows[r]},
                        {"chosen", worker::CudaInt4KernelChoice::kernel_names[ch.chosen[r]]},
                        {"timed", timed}});
    }
    nlohmann::json layout_us = nlohmann::json::object();  // int4_layout measured: each layout's decode us
    for (int l = 0; l < worker::CudaInt4KernelChoice::kLayouts; ++l)
      if (ch.layout_us[l] > 0) layout_us[worker::CudaInt4KernelChoice::layout_names[l]] = ch.layout_us[l];
    int4.push_back({{"n_out", ch.n_out},
                    {"k", ch.k},
                    {"group", ch.group},
                    {"layout", worker::int4_layout_name(ch.layout)},
                    {"layout_decode_us", layout_us},
                    {"matrices", ch.matrices},
                    {"ranges", ranges},
                    {"half2_variant", ch.half2_variant},
                    {"half2_variant_us", ch.half2_variant_us},
                    {"skipped", ch.skipped}});
  }
  nlohmann::json q4k = nlohmann::json::array();
  for (const worker::CudaQ4KChoice& ch : target.model->q4_k_choices()) {
    q4k.push_back({{"type", ch.q6_k ? "Q6_K" : "Q4_K"},
                   {"n_out", ch.n_out},
                   {"k", ch.k},
                   {"matrices", ch.matrices},
                   {"one_row_cuda_cores_us", ch.cuda_cores_us},
                   {"one_row_tensor_cores_us", ch.tensor_cores_us},
                   {"one_row_half2_us", ch.half2_us},
                   {"one_row_chosen", a.int8_activations && !ch.q6_k ? "W4A8"
                                      : ch.tensor_cores              ? "tensor cores"
                                      : ch.half2                     ? "half2"
                                                                     : "CUDA cores"},
                   {"layout", ch.tiles ? "tiles" : "rows"}});
  }
  nlohmann::json fusions = nlohmann::json::array();
  for (const worker::CudaFusionChoice& ch : target.model->one_row_fusions()) {
    fusions.push_back({{"site", worker::CudaFusionChoice::site_names[ch.site]},
                       {"n_out", ch.n_out},
                       {"k", ch.k},
                       {"q4_k", ch.q4_k},
                       {"q6_k", ch.q6_k},
                       {"matrices", ch.matrices},
                       {"unfused_kernel", ch.unfused_kernel},
                       {"half2_alone", ch.half2_alone},
                       {"unfused_us", ch.unfused_us},
                       {"fused_us", ch.fused_us},
                       {"fused_shape", ch.fused_shape},
                       {"fused", ch.fused}});
  }
  if (a.json) {
    nlohmann::json out{{"model", a.model},
                       {"int4_kernels", int4},
                       {"q4_k_kernels", q4k},
                       {"one_row_fusions", fusions},
                       {"load_seconds", target.load_seconds},
                       {"weight_bytes", weight_bytes},
                       {"model_device_bytes", target.model_device_bytes},
                       {"kv_cache_device_bytes", target.cache_device_bytes},
                       {"kv_cache", target.model->kv_cache_types().name()},
                       {"copy_gbps", copy_gbps},
                       {"decode_floor_ms", floor_s * 1e3},
                       {"decode_split_tokens", target.model->options().decode_split_tokens},
                       {"prompt_tokens", a.prompt_tokens},
                       {"gen_tokens", a.gen_tokens},
                       {"repetitions", a.repetitions},
                       {"prefill_tokens_per_second", pp_one},
                       {"prefill_batch", a.prefill_batch},
                       {"prefill_batch_tokens_per_second", pp_batch},
                       {"decode", rows}};
    if (long_cuda_cores > 0.0) {
      out["long_prefill"] = {{"prompt_tokens", a.long_prompt_tokens},
                             {"cuda_core_attention_tokens_per_second", long_cuda_cores},
                             {"tensor_core_attention_applies", long_mma_applies}};
      if (long_tensor_cores > 0.0)
        out["long_prefill"]["tensor_core_attention_tokens_per_second"] = long_tensor_cores;
    }
    if (!long_error.empty()) out["long_prefill_error"] = long_error;
    if (!pdl_error.empty()) out["pdl_error"] = pdl_error;
    nlohmann::json step_profiles = nlohmann::json::array();
    for (size_t i = 0; i < batches.size(); ++i)
      step_profiles.push_back(profile_json(batches[i], profiles[i]));
    out["step_profile"] = step_profiles;
    if (!a.draft.empty()) {
      out["draft"] = {{"model", a.draft},
                      {"load_seconds", draft.load_seconds},
                      {"weight_bytes", draft.model->weight_bytes()},
                      {"model_device_bytes", draft.model_device_bytes}};
    }
    if (!projection.empty()) out["speculative_projection"] = projection;
    if (a.lora_rank > 0) {
      nlohmann::json l{{"rank", lora.rank},
                       {"adapters", lora.adapters},
                       {"upload_seconds", lora.upload_seconds},
                       {"factor_bytes", lora.factor_bytes}};
      if (!lora.error.empty()) l["error"] = lora.error;
      if (lora.step_s.size() == batches.size()) {
        nlohmann::json decode = nlohmann::json::array();
        for (size_t i = 0; i < batches.size(); ++i)
          decode.push_back({{"batch", batches[i]},
                            {"ms_per_step", lora.step_s[i] * 1e3},
                            {"base_ratio", lora.step_s[i] / step_s[i]}});
        l["decode"] = decode;
      }
      if (lora.prefill_tokens_per_second > 0.0) {
        l["prefill_tokens_per_second"] = lora.prefill_tokens_per_second;
        l["prefill_base_ratio"] = lora.prefill_tokens_per_second / pp_one;
      }
      if (lora.profile.total_ms > 0.0) l["step_profile"] = profile_json(batches.front(), lora.profile);
      out["lora"] = l;
    }
    std::cout << out.dump() << "\n";
    return 0;
  }
  std::printf(
      "model %s: loaded in %.1f s; weights %.2f GiB on the device; device memory used %.2f GiB "
      "(+ %.2f GiB KV cache, %s)\n",
      a.model.c_str(), target.load_seconds, gib(weight_bytes), gib(target.model_device_bytes),
      gib(target.cache_device_bytes), target.model->kv_cache_types().name().c_str());
  if (!a.draft.empty()) {
    std::printf("draft %s: loaded in %.1f s; weights %.2f GiB; device memory used %.2f GiB\n",
                a.draft.c_str(), draft.load_seconds, gib(draft.model->weight_bytes()),
                gib(draft.model_device_bytes));
  }
  std::printf("copy bandwidth (read + write) %.0f GB/s: decode floor %.2f ms per step (weights read once)\n",
              copy_gbps, floor_s * 1e3);
  std::printf("decode attention: sequences cut every %lld positions (--decode-split-tokens)\n",
              static_cast<long long>(target.model->options().decode_split_tokens));
  print_int4_choices(*target.model, copy_gbps);
  print_q4_k_choices(*target.model, a.int8_activations);
  print_fusion_choices(*target.model);
  std::printf("prefill %d tokens: %.0f tokens/s (1 prompt), %.0f tokens/s (%d prompts in one pass)\n",
              a.prompt_tokens, pp_one, pp_batch, a.prefill_batch);
  if (long_tensor_cores > 0.0) {
    std::printf(
        "prefill %d tokens, 1 prompt: %.0f tokens/s with the attention on CUDA cores, %.0f on tensor "
        "cores (%.2fx)\n",
        a.long_prompt_tokens, long_cuda_cores, long_tensor_cores, long_tensor_cores / long_cuda_cores);
  } else if (long_cuda_cores > 0.0) {
    std::printf("prefill %d tokens, 1 prompt: %.0f tokens/s (%s)\n", a.long_prompt_tokens, long_cuda_cores,
                long_mma_applies ? "the tensor-core attention failed"
                                 : "the tensor-core attention does not take this model's heads");
  }
  if (!long_error.empty()) std::printf("long-prompt prefill failed: %s\n", long_error.c_str());
  std::printf("\n");
  std::printf("%5s | %12s %9s %7s", "batch", "decode tok/s", "ms/step", "%floor");
  if (!draft_step_s.empty()) std::printf(" | %13s %12s", "draft ms/step", "draft/target");
  if (!pdl_step_s.empty()) std::printf(" | %11s %9s", "PDL ms/step", "PDL %floor");
  std::printf("\n");
  for (size_t i = 0; i < batches.size(); ++i) {
    std::printf("%5lld | %12.1f %9.2f %6.0f%%", static_cast<long long>(batches[i]),
                static_cast<double>(batches[i]) / step_s[i], step_s[i] * 1e3, 100.0 * floor_s / step_s[i]);
    if (!draft_step_s.empty())
      std::printf(" | %13.2f %12.3f", draft_step_s[i] * 1e3, draft_step_s[i] / step_s[i]);
    if (!pdl_step_s.empty())
      std::printf(" | %11.2f %8.0f%%", pdl_step_s[i] * 1e3, 100.0 * floor_s / pdl_step_s[i]);
    std::printf("\n");
  }
  std::printf(
      "\nDecode: B sequences after a %d-token prompt each, %d greedy steps timed (median of %d), CUDA "
      "graphs on. %%floor: the floor over the step time. PDL: the same with the matrix products launched "
      "programmatically (CudaModelOptions::programmatic_launch).\n",
      kShortPrompt, a.gen_tokens, a.repetitions);
  if (!pdl_error.empty()) std::printf("PDL run failed: %s\n", pdl_error.c_str());
  if (!verify_s.empty()) {
    std::printf(
        "\nSpeculative decoding at batch 1, projected from these step times: a round runs k draft steps "
        "(%.2f ms each), then the target verifies the k proposals in one pass of k + 1 tokens; with each "
        "proposal accepted with probability a a round yields (1 - a^(k+1)) / (1 - a) tokens (Leviathan et "
        "al.). Speedup over plain decoding (%.2f ms/token); dummy weights have no acceptance rate of their "
        "own (the fixtures' trained pair: 4.38 tokens a round at k = 4, a ~= 0.93; "
        "docs/perf/speculative.md).\n%3s | %9s %11s |",
        draft_step_s[b1] * 1e3, step_s[b1] * 1e3, "k", "verify ms", "verify/step");
    for (const double acceptance : kProjectedAcceptance) {
      char label[16];
      std::snprintf(label, sizeof label, "a=%g", acceptance);
      std::printf(" %6s", label);
    }
    std::printf("\n");
    for (const Verify& v : verify_s) {
      std::printf("%3d | %9.2f %11.2f |", v.k, v.seconds * 1e3, v.seconds / step_s[b1]);
      for (const double acceptance : kProjectedAcceptance)
        std::printf(" %5.2fx", projected_speedup(acceptance, v.k, step_s[b1], draft_step_s[b1], v.seconds));
      std::printf("\n");
    }
  }
  if (unfused_step_s > 0.0) {
    const double fused_s =
        step_s[static_cast<size_t>(std::find(batches.begin(), batches.end(), 1) - batches.begin())];
    std::printf(
        "Batch 1 with the half2 GEMV's epilogues: all fused %.2f ms/step; the norms as kernels of their own "
        "%.2f; none fused (RoPE / KV write, SwiGLU and the norms separate) %.2f; fused / unfused %.3f "
        "(1.000 where no one-row product runs on the half2 GEMV).\n",
        fused_s * 1e3, unfused_norms_step_s * 1e3, unfused_step_s * 1e3, fused_s / unfused_step_s);
  }
  if (a.lora_rank > 0) {
    std::printf(
        "\nLoRA: %lld random rank-%lld adapters on every layer's seven matrices (not the head), sequence s "
        "naming adapter s %% %lld + 1, against the base above (same run); their factors %.2f GiB on the "
        "device, set in %.2f s.\n",
        static_cast<long long>(lora.adapters), static_cast<long long>(lora.rank),
        static_cast<long long>(lora.adapters), gib(lora.factor_bytes), lora.upload_seconds);
    if (!lora.error.empty()) std::printf("LoRA run failed: %s\n", lora.error.c_str());
    if (lora.step_s.size() == batches.size()) {
      std::printf("%5s | %12s %9s %14s\n", "batch", "decode tok/s", "ms/step", "time / base's");
      for (size_t i = 0; i < batches.size(); ++i)
        std::printf("%5lld | %12.1f %9.2f %13.3fx\n", static_cast<long long>(batches[i]),
                    static_cast<double>(batches[i]) / lora.step_s[i], lora.step_s[i] * 1e3,
                    lora.step_s[i] / step_s[i]);
    }
    if (lora.prefill_tokens_per_second > 0.0)
      std::printf("prefill %d tokens, 1 prompt: %.0f tokens/s, %.3fx the base's tokens/s\n", a.prompt_tokens,
                  lora.prefill_tokens_per_second, lora.prefill_tokens_per_second / pp_one);
  }
  // The step profile: one decode step per batch size, each section's device ms (summed over layers);
  // with an adapter, its step at the first batch size last (each product's section holds its update).
  std::vector<std::string> labels;
  for (const int64_t b : batches) labels.push_back("batch " + std::to_string(b));
  if (lora.profile.total_ms > 0.0) {
    profiles.push_back(lora.profile);
    labels.push_back("LoRA b" + std::to_string(batches.front()));
  }
  std::printf(
      "\nOne decode step, by section (device ms, summed over the layers; run directly with the whole step "
      "queued first, so `gaps` is the launch gaps a graph replay would mostly hide):\n%-18s",
      "section");
  for (const std::string& label : labels) std::printf(" %13s", label.c_str());
  std::printf("\n");
  for (size_t si = 0; si < profiles.front().sections.size(); ++si) {
    std::printf("%-18s", profiles.front().sections[si].first.c_str());
    for (const auto& pr : profiles)
      std::printf(" %8.2f %3.0f%%", pr.sections[si].second, 100.0 * pr.sections[si].second / pr.total_ms);
    std::printf("\n");
  }
  std::printf("%-18s", "gaps");
  for (const auto& pr : profiles) {
    double sum = 0.0;
    for (const auto& [name, ms] : pr.sections) sum += ms;
    std::printf(" %8.2f %3.0f%%", pr.total_ms - sum, 100.0 * (pr.total_ms - sum) / pr.total_ms);
  }
  std::printf("\n%-18s", "total");
  for (const auto& pr : profiles) std::printf(" %8.2f %4s", pr.total_ms, "");
  std::printf("\n");
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Kernels (without --model)

// (k, n_out, m) -> microseconds, from tools/bench_tinygemm.py's JSON.
std::map<std::tuple<int64_t, int64_t, int64_t>, double> read_tinygemm(const std::string& path) {
  std::map<std::tuple<int64_t, int64_t, int64_t>, double> out;
  if (path.empty()) return out;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("tinygemm figures: cannot read " + path);
  try {
    const auto j = nlohmann::json::parse(in);
    for (const auto& r : j.at("rows")) out[{r.at("k"), r.at("n_out"), r.at("m")}] = r.at("us").get<double>();
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("tinygemm figures: " + path + " is not bench_tinygemm.py's JSON: " + e.what());
  }
  return out;
}

// bench-gpu's exit status when only an attention table failed (the W4A16 tables are whole).
constexpr int kAttentionTableFailed = 3;

// The longest prompt the prefill attention table times: its CUDA-core kernel takes about a second a call
// there on an H100 (~2e13 flops), and the table makes some 30 calls a prompt.
constexpr int64_t kMaxAttentionPromptTokens = 32768;

struct AttentionLists {
  std::vector<int64_t> batches, contexts, queries, splits;  // contexts empty: no decode attention table
  std::vector<int64_t> prompts;                             // empty: no prefill attention table
};

AttentionLists parse_attention_lists(const Args& a) {
  // "none" (or nothing) leaves a table out: a word a device session's flags can carry.
  const auto list_or_none = [](const std::string& text) {
    return text == "none" ? std::vector<int64_t>{} : parse_list(text);
  };
  AttentionLists l{parse_list(a.attention_batches), list_or_none(a.attention_contexts),
                   parse_list(a.attention_queries), parse_list(a.attention_splits),
                   list_or_none(a.attention_prompts)};
  const auto positive = [](const std::vector<int64_t>& v, const char* what) {
    if (v.empty() || std::any_of(v.begin(), v.end(), [](int64_t x) { return x < 1; }))
      throw std::invalid_argument(std::string("--attention-") + what + " needs positive whole numbers");
  };
  if (!l.prompts.empty()) {
    positive(l.prompts, "prompts");
    for (const int64_t tokens : l.prompts)
      if (tokens > kMaxAttentionPromptTokens)
        throw std::invalid_argument("--attention-prompts: " + std::to_string(tokens) +
                                    " tokens is past what the table times (at most " +
                                    std::to_string(kMaxAttentionPromptTokens) + ")");
  }
  if (l.contexts.empty()) return l;
  positive(l.batches, "batches");
  for (const int64_t batch : l.batches)
    if (batch > kernels::cuda::kAttentionBenchMaxBatch)
      throw std::invalid_argument(
          "--attention-batches: " + std::to_string(batch) + " sequences, more than the " +
          std::to_string(kernels::cuda::kAttentionBenchMaxBatch) + " the decode attention takes in one call");
  positive(l.contexts, "contexts");
  positive(l.queries, "queries");
  positive(l.splits, "splits");
  for (const int64_t split : l.splits)
    if (split % 32 != 0)
      throw std::invalid_argument("--attention-splits: " + std::to_string(split) +
                                  " is not a multiple of 32 (the decode attention's tile)");
  const int64_t most_queries = *std::max_element(l.queries.begin(), l.queries.end());
  for (const int64_t context : l.contexts)
    if (context < most_queries)
      throw std::invalid_argument("--attention-contexts: " + std::to_string(context) +
                                  " positions cannot hold " + std::to_string(most_queries) + " queries");
  return l;
}

// PyTorch's attention on the same cases (tools/bench_torch_attention.py), read before anything is
// measured like tinygemm's figures: decode by (batch, context, queries), prefill by prompt tokens.
struct TorchAttention {
  std::map<std::tuple<int64_t, int64_t, int64_t>, double> decode_us;
  std::map<int64_t, double> prefill_us;
};

TorchAttention read_torch_attention(const std::string& path,
                                    const kernels::cuda::AttentionBenchHeads& heads) {
  TorchAttention out;
  if (path.empty()) return out;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("torch attention figures: cannot read " + path);
  try {
    const auto j = nlohmann::json::parse(in);
    if (j.at("heads").get<int64_t>() != heads.n_head || j.at("kv_heads").get<int64_t>() != heads.n_head_kv ||
        j.at("head_dim").get<int64_t>() != heads.head_dim) {
      throw std::runtime_error("torch attention figures: " + path + " times other heads than the tables'");
    }
    for (const auto& r : j.at("decode"))
      out.decode_us[{r.at("batch"), r.at("context"), r.at("queries")}] = r.at("us").get<double>();
    for (const auto& r : j.at("prefill"))
      out.prefill_us[r.at("tokens").get<int64_t>()] = r.at("us").get<double>();
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error("torch attention figures: " + path +
                             " is not bench_torch_attention.py's JSON: " + e.what());
  }
  return out;
}

// What the kernel table reads before it measures anything (in every build, so that bad input is named
// the same way with or without CUDA): the peers' figures and the attention tables' lists.
struct KernelTableInputs {
  std::map<std::tuple<int64_t, int64_t, int64_t>, double> tinygemm;
  AttentionLists attention_lists;
  kernels::cuda::AttentionBenchHeads heads;  // llama-70b's
  TorchAttention torch_attention;
};

KernelTableInputs read_kernel_table_inputs(const Args& a) {
  KernelTableInputs in;
  in.tinygemm = read_tinygemm(a.tinygemm);
  in.attention_lists = parse_attention_lists(a);
  in.torch_attention = read_torch_attention(a.torch_attention, in.heads);
  return in;
}

#ifdef NIBBLE_WITH_CUDA

// "KxN" items: input features x output features.
std::vector<kernels::cuda::MatmulShape> parse_shapes(const std::string& text) {
  std::vector<kernels::cuda::MatmulShape> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    const size_t x = item.find('x');
    if (x == std::string::npos) throw std::invalid_argument("--shapes item '" + item + "' is not KxN");
    out.push_back({std::stoll(item.substr(0, x)), std::stoll(item.substr(x + 1))});
  }
  return out;
}

// The decode attention table (kernels/cuda/attention_bench.cuh): per batch, context and queries a
// sequence, each split size's time and %copy of the K and V bytes, the fastest split and the model's
// split against it, and PyTorch's time where given (contiguous K / V, not paged: the peer). Rows arrive
// case by case, the splits of a case together.
nlohmann::json report_attention(const std::vector<kernels::cuda::AttentionBenchRow>& rows,
                                const kernels::cuda::AttentionBenchHeads& heads, int64_t model_split,
                                double copy_gbps, const TorchAttention& torch, bool print) {
  nlohmann::json cases = nlohmann::json::array();
  if (print && !rows.empty()) {
    std::printf(
        "\nDecode attention (attention_decode, one kernel; %lld query and %lld KV heads of %lld, blocks of "
        "%lld positions), us (%%copy of the K and V bytes a call reads) by split size (positions a block "
        "takes); the model splits at %lld (CudaModelOptions::decode_split_tokens); q8_0: the call at the "
        "best "
        "split on a Q8_0 cache read as stored (a quantized cache's decode step) and its ratio to fp16's; "
        "k q8_0: K alone in Q8_0, V fp16 (llama.cpp's -ctk q8_0); q8_0 copy: the Q8_0 blocks dequantized "
        "into an fp16 working copy (what prompt steps add before the call)\n%5s %7s %7s |",
        static_cast<long long>(heads.n_head), static_cast<long long>(heads.n_head_kv),
        static_cast<long long>(heads.head_dim), static_cast<long long>(heads.block_size),
        static_cast<long long>(model_split), "batch", "context", "queries");
  }
  size_t first = 0;
  bool header_done = false;
  while (first < rows.size()) {
    size_t end = first;
    while (end < rows.size() && rows[end].batch == rows[first].batch &&
           rows[end].context == rows[first].context && rows[end].queries == rows[first].queries)
      ++end;
    if (print && !header_done) {
      for (size_t i = first; i < end; ++i)
        std::printf(" %14lld", static_cast<long long>(rows[i].split_tokens));
      std::printf(" | %5s %10s | %9s %10s | %9s %9s | %9s %9s | %12s\n", "best", "model/best", "torch us",
                  "best/torch", "q8_0 us", "q8_0/f16", "k q8_0 us", "k q8/f16", "q8_0 copy us");
      header_done = true;
    }
    const kernels::cuda::AttentionBenchRow* best = &rows[first];
    double model_us = 0.0;
    nlohmann::json split_us = nlohmann::json::object(), q8_0_split_us = nlohmann::json::object(),
                   k_q8_0_split_us = nlohmann::json::object();
    for (size_t i = first; i < end; ++i) {
      if (rows[i].us < best->us) best = &rows[i];
      if (rows[i].split_tokens == model_split) model_us = rows[i].us;
      split_us[std::to_string(rows[i].split_tokens)] = rows[i].us;
      q8_0_split_us[std::to_string(rows[i].split_tokens)] = rows[i].q8_0_us;  // -1: failed
      k_q8_0_split_us[std::to_string(rows[i].split_tokens)] = rows[i].k_q8_0_us;
    }
    const auto& r = rows[first];
    nlohmann::json c{
        {"batch", r.batch},     {"context", r.context},
        {"queries", r.queries}, {"kv_bytes", r.kv_bytes},
        {"split_us", split_us}, {"best_split", best->split_tokens},
        {"best_us", best->us},  {"best_copy_fraction", r.kv_bytes / (best->us * 1e-6) / 1e9 / copy_gbps}};
    if (model_us > 0) c["model_split_over_best"] = model_us / best->us;
    c["q8_0_copy_us"] = r.q8_0_copy_us;  // a Q8_0 cache's dequantization into the working copy (-1: failed)
    c["q8_0_split_us"] = q8_0_split_us;  // the call on a Q8_0 cache read as stored, per split
    c["k_q8_0_split_us"] = k_q8_0_split_us;  // K alone in Q8_0 (V fp16), per split
    const auto peer = torch.decode_us.find({r.batch, r.context, r.queries});
    const double torch_us = peer == torch.decode_us.end() ? 0.0 : peer->second;
    if (torch_us > 0) {
      c["torch_us"] = torch_us;
      c["best_speedup_vs_torch"] = torch_us / best->us;
    }
    cases.push_back(c);
    if (print) {
      std::printf("%5lld %7lld %7lld |", static_cast<long long>(r.batch), static_cast<long long>(r.context),
                  static_cast<long long>(r.queries));
      for (size_t i = first; i < end; ++i)
        std::printf(" %7.1f (%3.0f%%)", rows[i].us,
                    100.0 * r.kv_bytes / (rows[i].us * 1e-6) / 1e9 / copy_gbps);
      if (model_us > 0)
        std::printf(" | %5lld %9.2fx", static_cast<long long>(best->split_tokens), model_us / best->us);
      else
        std::printf(" | %5lld %10s", static_cast<long long>(best->split_tokens), "-");
      if (torch_us > 0)
        std::printf(" | %9.1f %9.2fx", torch_us, torch_us / best->us);
      else
        std::printf(" | %9s %10s", "-", "-");
      if (best->q8_0_us > 0)
        std::printf(" | %9.1f %8.2fx", best->q8_0_us, best->q8_0_us / best->us);
      else
        std::printf(" | %9s %9s", "failed", "-");
      if (best->k_q8_0_us > 0)
        std::printf(" | %9.1f %8.2fx", best->k_q8_0_us, best->k_q8_0_us / best->us);
      else
        std::printf(" | %9s %9s", "failed", "-");
      if (r.q8_0_copy_us >= 0)
        std::printf(" | %12.1f\n", r.q8_0_copy_us);
      else
        std::printf(" | %12s\n", "failed");
    }
    first = end;
  }
  return nlohmann::json{
      {"n_head", heads.n_head},         {"n_head_kv", heads.n_head_kv},      {"head_dim", heads.head_dim},
      {"block_size", heads.block_size}, {"model_split_tokens", model_split}, {"cases", cases}};
}

// The prefill attention table: per prompt length, each kernel's time and causal TFLOP/s, and the tensor
// cores' speedup.
nlohmann::json report_prefill_attention(const std::vector<kernels::cuda::PrefillAttentionBenchRow>& rows,
                                        const kernels::cuda::AttentionBenchHeads& heads,
                                        const TorchAttention& torch, bool print) {
  if (print && !rows.empty()) {
    std::printf(
        "\nPrefill attention (one prompt, causal, its keys in the cache; %lld query and %lld KV heads of "
        "%lld): "
        "us and TFLOP/s (2 n_head head_dim t (t + 1) flops) on the CUDA cores (prefill_attention_f16) and "
        "the "
        "tensor cores (prefill_attention_mma_f16, CudaModelOptions::mma_prefill_attention), and PyTorch's "
        "scaled_dot_product_attention where given\n%7s | %10s %7s | %10s %7s | %8s | %9s %10s\n",
        static_cast<long long>(heads.n_head), static_cast<long long>(heads.n_head_kv),
        static_cast<long long>(heads.head_dim), "tokens", "CUDA cores", "TFLOP/s", "tensor", "TFLOP/s",
        "tc/cc", "torch us", "ours/torch");
  }
  nlohmann::json cases = nlohmann::json::array();
  for (const auto& r : rows) {
    const double cc_tflops = r.flops / (r.cuda_core_us * 1e-6) / 1e12;
    nlohmann::json c{{"tokens", r.tokens},
                     {"flops", r.flops},
                     {"cuda_core_us", r.cuda_core_us},
                     {"cuda_core_tflops", cc_tflops}};
    if (r.tensor_core_us > 0) {
      c["tensor_core_us"] = r.tensor_core_us;
      c["tensor_core_tflops"] = r.flops / (r.tensor_core_us * 1e-6) / 1e12;
      c["tensor_core_speedup"] = r.cuda_core_us / r.tensor_core_us;
    }
    // The faster of ours against PyTorch's.
    const double ours = r.tensor_core_us > 0 ? std::min(r.cuda_core_us, r.tensor_core_us) : r.cuda_core_us;
    const auto peer = torch.prefill_us.find(r.tokens);
    const double torch_us = peer == torch.prefill_us.end() ? 0.0 : peer->second;
    if (torch_us > 0) {
      c["torch_us"] = torch_us;
      c["best_speedup_vs_torch"] = torch_us / ours;
    }
    cases.push_back(c);
    if (!print) continue;
    std::printf("%7lld | %10.1f %7.1f |", static_cast<long long>(r.tokens), r.cuda_core_us, cc_tflops);
    if (r.tensor_core_us > 0)
      std::printf(" %10.1f %7.1f | %7.2fx |", r.tensor_core_us, r.flops / (r.tensor_core_us * 1e-6) / 1e12,
                  r.cuda_core_us / r.tensor_core_us);
    else
      std::printf(" %10s %7s | %8s |", "-", "-", "-");
    if (torch_us > 0)
      std::printf(" %9.1f %9.2fx\n", torch_us, torch_us / ours);
    else
      std::printf(" %9s %10s\n", "-", "-");
  }
  return nlohmann::json{{"n_head", heads.n_head},
                        {"n_head_kv", heads.n_head_kv},
                        {"head_dim", heads.head_dim},
                        {"cases", cases}};
}

int run_kernels(const Args& a, const KernelTableInputs& inputs) {
  const auto& tinygemm = inputs.tinygemm;
  const AttentionLists& attention_lists = inputs.attention_lists;
  const kernels::cuda::AttentionBenchHeads& heads = inputs.heads;
  const TorchAttention& torch_attention = inputs.torch_attention;
  kernels::cuda::MatmulBenchResult result;
  std::string error;
  // Each row to stderr as soon as its shape is measured (a run cut short keeps them); the tables follow.
  const auto measured = [](const kernels::cuda::MatmulBenchRow& r) {
    progress(
        "%lldx%lld m=%lld: g128 %.1f tc %.1f staged %.1f half2 %.1f w4a8 %.1f tc32 %.1f tc64 %.1f deq %.1f "
        "cutlass %.1f "
        "/ "
        "%.1f / %.1f | "
        "tiles: tc %.1f tc32 %.1f tc64 %.1f deq %.1f | Q4_K %.1f Q4_K tc %.1f Q4_K half2 %.1f cuBLAS %.1f us",
        static_cast<long long>(r.shape.k), static_cast<long long>(r.shape.n_out), static_cast<long long>(r.m),
        r.g128_us, r.g128_tc_us, r.g128_staged_us, r.g128_half2_us, r.g128_w4a8_us, r.g128_tc32_us,
        r.g128_tc64_us, r.g128_deq_us, r.g128_cutlass_us, r.g128_cutlass_pp_us, r.g128_cutlass16_us,
        r.g128_tiles_tc_us, r.g128_tiles_tc32_us, r.g128_tiles_tc64_us, r.g128_tiles_deq_us, r.q4k_us,
        r.q4k_tc_us, r.q4k_half2_us, r.cublas_us);
  };
  const kernels::Status st = kernels::cuda::run_matmul_bench(
      parse_shapes(a.shapes), parse_list(a.rows), a.iterations, a.repetitions, result, error, measured);
  if (st != kernels::Status::ok && (result.rows.empty() || st != kernels::Status::device_error))
    throw std::runtime_error(std::string("GPU benchmark failed: ") + kernels::status_name(st) + " " + error);
  // A device failure part way: the tables of the shapes finished before it, then the error (exit 1).
  nlohmann::json rows = nlohmann::json::array();
  if (!a.json) {
    std::printf("device: %s\ncopy bandwidth (read + write): %.0f GB/s\n\n", result.device.c_str(),
                result.copy_gbps);
    std::printf(
        "%-12s %4s | %10s %8s %6s | %8s %6s | %8s %6s | %10s %6s | %9s %6s | %9s %6s | %8s %6s | %8s %6s | "
        "%8s %6s | "
        "%8s %6s | %10s %6s | %10s %6s | %10s %6s | %8s %6s | %9s %6s | %9s %6s | %10s %8s | %8s %9s | %11s "
        "%8s "
        "%8s\n",
        "k x n_out", "m", "W4A16 us", "GB/s", "%copy", "split us", "%copy", "g128 us", "%copy", "g128 tc us",
        "%copy", "staged us", "%copy", "half2 us", "%copy", "tc32 us", "%copy", "tc64 us", "%copy", "mma us",
        "%copy", "deq us", "%copy", "cutlass us", "%copy", "cutl pp us", "%copy", "cutl 16 us", "%copy",
        "Q4_K us", "%copy", "Q4_K tc", "%copy", "Q4_K h2", "%copy", "cuBLAS us", "GB/s", "vs fp16",
        "best/fp16", "tinygemm us", "vs tg", "best/tg");
  }
  for (const auto& r : result.rows) {
    const double ours_gbps = r.ours_bytes / (r.ours_us * 1e-6) / 1e9;
    const double cublas_gbps = r.cublas_bytes / (r.cublas_us * 1e-6) / 1e9;
    const auto tg = tinygemm.find({r.shape.k, r.shape.n_out, r.m});
    const double tg_us = tg == tinygemm.end() ? 0.0 : tg->second;
    // The fastest group-128 kernel at this m (the one the model's load-time timing would pick).
    double best_g128_us = 0.0;
    for (const double us :
         {r.g128_us, r.g128_tc_us, r.g128_staged_us, r.g128_half2_us, r.g128_tc32_us, r.g128_tc64_us,
          r.g128_mma_us, r.g128_deq_us, r.g128_cutlass_us, r.g128_cutlass_pp_us, r.g128_cutlass16_us,
          r.g128_tiles_tc_us, r.g128_tiles_tc32_us, r.g128_tiles_tc64_us, r.g128_tiles_deq_us})
      if (us > 0 && (best_g128_us == 0.0 || us < best_g128_us)) best_g128_us = us;
    nlohmann::json row{{"k", r.shape.k},
                       {"n_out", r.shape.n_out},
                       {"m", r.m},
                       {"w4a16_us", r.ours_us},
                       {"w4a16_kernel", r.ours_kernel},
                       {"w4a16_gbps", ours_gbps},
                       {"copy_fraction", ours_gbps / result.copy_gbps},
                       {"cublas_fp16_us", r.cublas_us},
                       {"cublas_gbps", cublas_gbps},
                       {"speedup_vs_cublas", r.cublas_us / r.ours_us}};
    if (r.split_us > 0) {
      row["w4a16_split_us"] = r.split_us;
      row["split_gbps"] = r.ours_bytes / (r.split_us * 1e-6) / 1e9;
    }
    if (r.g128_us > 0) {
      row["w4a16_g128_us"] = r.g128_us;
      row["g128_gbps"] = r.g128_bytes / (r.g128_us * 1e-6) / 1e9;
      row["g128_speedup_vs_cublas"] = r.cublas_us / r.g128_us;
    }
    if (r.g128_tc_us > 0) {
      row["w4a16_g128_tc_us"] = r.g128_tc_us;
      row["g128_tc_gbps"] = r.g128_bytes / (r.g128_tc_us * 1e-6) / 1e9;
      row["g128_tc_speedup_vs_cublas"] = r.cublas_us / r.g128_tc_us;
    }
    if (r.g128_mma_us > 0) {
      row["w4a16_g128_mma_us"] = r.g128_mma_us;
      row["g128_mma_gbps"] = r.g128_bytes / (r.g128_mma_us * 1e-6) / 1e9;
      row["g128_mma_speedup_vs_cublas"] = r.cublas_us / r.g128_mma_us;
    }
    if (r.g128_staged_us > 0) {
      row["w4a16_g128_staged_us"] = r.g128_staged_us;
      row["g128_staged_gbps"] = r.g128_bytes / (r.g128_staged_us * 1e-6) / 1e9;
      row["g128_staged_speedup_vs_cublas"] = r.cublas_us / r.g128_staged_us;
    }
    if (r.g128_half2_us > 0) {
      row["w4a16_g128_half2_us"] = r.g128_half2_us;
      row["g128_half2_gbps"] = r.g128_bytes / (r.g128_half2_us * 1e-6) / 1e9;
      row["g128_half2_speedup_vs_cublas"] = r.cublas_us / r.g128_half2_us;
    }
    if (!r.g128_half2_variant_us.empty()) {
      nlohmann::json variants = nlohmann::json::object();
      for (size_t v = 0; v < r.g128_half2_variant_us.size(); ++v)
        variants[kernels::cuda::half2_gemv_variant_name(kernels::cuda::kHalf2GemvVariants[v])] =
            r.g128_half2_variant_us[v];
      row["g128_half2_variants_us"] = variants;
    }
    if (r.q4k_w4a8_us > 0) row["w4a8_q4k_us"] = r.q4k_w4a8_us;
    if (r.g128_w4a8_us > 0) {  // 8-bit activations: not among the W4A16 kernels' best
      row["w4a8_g128_us"] = r.g128_w4a8_us;
      row["g128_w4a8_gbps"] = r.g128_bytes / (r.g128_w4a8_us * 1e-6) / 1e9;
      row["g128_w4a8_speedup_vs_cublas"] = r.cublas_us / r.g128_w4a8_us;
    }
    if (r.g128_tc32_us > 0) {
      row["w4a16_g128_tc32_us"] = r.g128_tc32_us;
      row["g128_tc32_speedup_vs_cublas"] = r.cublas_us / r.g128_tc32_us;
    }
    if (r.g128_tc64_us > 0) {
      row["w4a16_g128_tc64_us"] = r.g128_tc64_us;
      row["g128_tc64_speedup_vs_cublas"] = r.cublas_us / r.g128_tc64_us;
    }
    if (r.g128_tc_loads_us > 0) {
      row["g128_tc_loads_only_us"] = r.g128_tc_loads_us;
      row["g128_tc_compute_only_us"] = r.g128_tc_compute_us;
    }
    if (r.g128_tiles_tc64_us > 0) {  // timed at every m where the rows' kernels are
      nlohmann::json tiles{{"tc64_us", r.g128_tiles_tc64_us}};
      if (r.g128_tiles_tc_us > 0) {
        tiles["tc_us"] = r.g128_tiles_tc_us;
        tiles["tc_shape"] = r.g128_tiles_tc_shape;
        tiles["loads_only_us"] = r.g128_tiles_loads_us;
      }
      if (r.g128_tiles_tc32_us > 0) tiles["tc32_us"] = r.g128_tiles_tc32_us;
      if (r.g128_tiles_deq_us > 0) tiles["dequant_cublas_us"] = r.g128_tiles_deq_us;
      row["g128_tiles"] = tiles;
    }
    if (r.g128_deq_us > 0) {
      row["w4a16_g128_dequant_cublas_us"] = r.g128_deq_us;
      row["g128_dequant_cublas_speedup_vs_cublas"] = r.cublas_us / r.g128_deq_us;
    }
    if (r.g128_cutlass_us > 0) {
      row["w4a16_g128_cutlass_us"] = r.g128_cutlass_us;
      row["g128_cutlass_speedup_vs_cublas"] = r.cublas_us / r.g128_cutlass_us;
      row["w4a16_g128_cutlass_pingpong_us"] = r.g128_cutlass_pp_us;
      row["g128_cutlass_pingpong_speedup_vs_cublas"] = r.cublas_us / r.g128_cutlass_pp_us;
    }
    if (r.g128_cutlass16_us > 0) {
      row["w4a16_g128_cutlass16_us"] = r.g128_cutlass16_us;
      row["g128_cutlass16_speedup_vs_cublas"] = r.cublas_us / r.g128_cutlass16_us;
    }
    if (best_g128_us > 0) {
      row["g128_best_us"] = best_g128_us;
      row["g128_best_copy_fraction"] = r.g128_bytes / (best_g128_us * 1e-6) / 1e9 / result.copy_gbps;
      row["g128_best_speedup_vs_cublas"] = r.cublas_us / best_g128_us;
    }
    if (r.q4k_us > 0) {
      row["w4a16_q4k_us"] = r.q4k_us;
      row["q4k_gbps"] = r.q4k_bytes / (r.q4k_us * 1e-6) / 1e9;
      row["w4a16_q4k_tc_us"] = r.q4k_tc_us;
      if (r.q4k_half2_us > 0) row["w4a16_q4k_half2_us"] = r.q4k_half2_us;
      row["w4a16_q4k_tiles_tc_us"] = r.q4k_tiles_tc_us;
    }
    if (r.q6k_us > 0) {
      row["w6a16_q6k_us"] = r.q6k_us;
      row["q6k_copy_fraction"] = r.q6k_bytes / (r.q6k_us * 1e-6) / 1e9 / result.copy_gbps;
      if (r.q6k_half2_us > 0) {
        row["w6a16_q6k_half2_us"] = r.q6k_half2_us;
        row["q6k_half2_copy_fraction"] = r.q6k_bytes / (r.q6k_half2_us * 1e-6) / 1e9 / result.copy_gbps;
      }
    }
    // The other GGUF types as stored: {"Q5_K": {"us": ..., "copy_fraction": ...}, ...} (m <= 32).
    for (const auto& g : r.gguf_blocks) {
      if (!(g.us > 0)) continue;
      row["gguf_blocks"][kernels::type_name(g.type)] = {
          {"us", g.us}, {"copy_fraction", g.bytes / (g.us * 1e-6) / 1e9 / result.copy_gbps}};
    }
    if (tg_us > 0) {
      row["tinygemm_us"] = tg_us;
      row["speedup_vs_tinygemm"] = tg_us / r.ours_us;
      if (r.g128_us > 0) row["g128_speedup_vs_tinygemm"] = tg_us / r.g128_us;
      if (best_g128_us > 0) row["g128_best_speedup_vs_tinygemm"] = tg_us / best_g128_us;
    }
    rows.push_back(row);
    if (!a.json) {
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(r.shape.k),
                    static_cast<long long>(r.shape.n_out));
      std::printf("%-12s %4lld | %10.1f %8.0f %5.0f%% |", shape, static_cast<long long>(r.m), r.ours_us,
                  ours_gbps, 100.0 * ours_gbps / result.copy_gbps);
      const auto timed = [&](double us, double bytes, int width = 8) {
        if (us > 0)
          std::printf(" %*.1f %5.0f%% |", width, us, 100.0 * bytes / (us * 1e-6) / 1e9 / result.copy_gbps);
        else
          std::printf(" %*s %6s |", width, "-", "-");
      };
      timed(r.split_us, r.ours_bytes);
      timed(r.g128_us, r.g128_bytes);
      timed(r.g128_tc_us, r.g128_bytes, 10);
      timed(r.g128_staged_us, r.g128_bytes, 9);
      timed(r.g128_half2_us, r.g128_bytes, 9);
      timed(r.g128_tc32_us, r.g128_bytes);
      timed(r.g128_tc64_us, r.g128_bytes);
      timed(r.g128_mma_us, r.g128_bytes);
      timed(r.g128_deq_us, r.g128_bytes);
      timed(r.g128_cutlass_us, r.g128_bytes, 10);
      timed(r.g128_cutlass_pp_us, r.g128_bytes, 10);
      timed(r.g128_cutlass16_us, r.g128_bytes, 10);
      timed(r.q4k_us, r.q4k_bytes);
      timed(r.q4k_tc_us, r.q4k_bytes, 9);
      timed(r.q4k_half2_us, r.q4k_bytes, 9);
      std::printf(" %10.1f %8.0f | %7.2fx %8.2fx |", r.cublas_us, cublas_gbps, r.cublas_us / r.ours_us,
                  best_g128_us > 0 ? r.cublas_us / best_g128_us : 0.0);
      if (tg_us > 0)
        std::printf(" %11.1f %7.2fx %7.2fx\n", tg_us, tg_us / r.ours_us,
                    best_g128_us > 0 ? tg_us / best_g128_us : 0.0);
      else
        std::printf(" %11s %8s %8s\n", "-", "-", "-");
    }
  }
  if (!a.json) {
    // The tensor-core GEMV cut in two: whichever part alone takes nearly the whole kernel's time sets
    // its pace (both well below it: latency, the pipeline's barriers and hand-offs).
    std::printf(
        "\nTensor-core GEMV (256 threads) by part, us: whole = g128 tc; loads = its pipeline streaming the "
        "weights without computing; compute = its dequantize-and-mma work on staged data without loading\n");
    std::printf("%-12s %4s | %8s %8s %6s %8s %6s\n", "k x n_out", "m", "whole", "loads", "%copy", "compute",
                "%whole");
    for (const auto& r : result.rows) {
      if (!(r.g128_tc_loads_us > 0)) continue;
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(r.shape.k),
                    static_cast<long long>(r.shape.n_out));
      std::printf("%-12s %4lld | %8.1f %8.1f %5.0f%% %8.1f %5.0f%%\n", shape, static_cast<long long>(r.m),
                  r.g128_tc_us, r.g128_tc_loads_us,
                  100.0 * r.g128_bytes / (r.g128_tc_loads_us * 1e-6) / 1e9 / result.copy_gbps,
                  r.g128_tc_compute_us, 100.0 * r.g128_tc_compute_us / r.g128_tc_us);
    }
    // The half2 GEMV's shapes at one row: which block size, batch and persistence streams best.
    std::printf(
        "\nhalf2 GEMV shapes at one row, us (%%copy of the group-128 bytes): Nw = warps a block, bK = "
        "16-byte "
        "units a lane loads at once per row, pers = persistent blocks (as many as the SMs hold, each staging "
        "the activations once); the same bits in every shape\n%-12s |",
        "k x n_out");
    for (const auto& v : kernels::cuda::kHalf2GemvVariants)
      std::printf(" %15s", kernels::cuda::half2_gemv_variant_name(v).c_str());
    std::printf("\n");
    for (const auto& r : result.rows) {
      if (r.g128_half2_variant_us.empty()) continue;
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(r.shape.k),
                    static_cast<long long>(r.shape.n_out));
      std::printf("%-12s |", shape);
      for (const double us : r.g128_half2_variant_us) {
        if (us > 0)
          std::printf(" %8.1f %5.0f%%", us, 100.0 * r.g128_bytes / (us * 1e-6) / 1e9 / result.copy_gbps);
        else
          std::printf(" %15s", "-");
      }
      std::printf("\n");
    }
    // The tensor-core kernels on rows and on tiles (kernels/int4_tiles.hpp), side by side: the same
    // arithmetic, so any difference is the layout's.
    std::printf(
        "\nTensor-core kernels on rows and on tiles, us (%%copy of the group-128 bytes): tc = the GEMV "
        "(rows: 256 threads; tiles: the fastest of 256 threads, 512 threads, 2 blocks an SM), tc32 = two m16 "
        "tiles, tc64 = 64-row slabs, deq = dequant + cuBLAS, loads = the 256-thread GEMV's loads-only "
        "probe; Q4_K tc = the Q4_K tensor-core kernels on the blocks as stored and on Q4_K chunks (%%copy of "
        "Q4_K's bytes)\n");
    std::printf("%-12s %4s | %15s %15s | %15s %15s | %15s %15s | %15s %15s | %15s %15s | %15s %15s | %8s\n",
                "k x n_out", "m", "tc rows", "tc tiles", "tc32 rows", "tc32 tiles", "tc64 rows", "tc64 tiles",
                "deq rows", "deq tiles", "loads rows", "loads tiles", "Q4_K tc", "Q4_K tc tiles", "tc shape");
    for (const auto& r : result.rows) {
      if (!(r.g128_tiles_tc64_us > 0)) continue;
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(r.shape.k),
                    static_cast<long long>(r.shape.n_out));
      std::printf("%-12s %4lld |", shape, static_cast<long long>(r.m));
      const auto cell = [&](double us, double bytes) {
        if (us > 0)
          std::printf(" %8.1f (%3.0f%%)", us, 100.0 * bytes / (us * 1e-6) / 1e9 / result.copy_gbps);
        else
          std::printf(" %15s", "-");
      };
      for (const auto& [on_rows, on_tiles] :
           {std::pair{r.g128_tc_us, r.g128_tiles_tc_us}, std::pair{r.g128_tc32_us, r.g128_tiles_tc32_us},
            std::pair{r.g128_tc64_us, r.g128_tiles_tc64_us}, std::pair{r.g128_deq_us, r.g128_tiles_deq_us},
            std::pair{r.g128_tc_loads_us, r.g128_tiles_loads_us}}) {
        cell(on_rows, r.g128_bytes);
        cell(on_tiles, r.g128_bytes);
        std::printf(" |");
      }
      cell(r.q4k_tc_us, r.q4k_bytes);
      cell(r.q4k_tiles_tc_us, r.q4k_bytes);
      std::printf(" |");
      std::printf(" %8s\n", r.g128_tiles_tc_shape);
    }
    // W4A8: the same group-128 weights times activations rounded to 8 bits on the device, on dp4a
    // (w4a8_gemv_int4_groups): another arithmetic, so beside the W4A16 kernels rather than among them.
    std::printf(
        "\nW4A8 (8-bit activations, dp4a; m <= 4), us (%%copy of the weights' bytes): group-128 INT4 against "
        "the fastest W4A16 group-128 kernel and fp16 cuBLAS; Q4_K as stored against the Q4_K kernels\n");
    std::printf("%-12s %4s | %15s | %10s %8s | %9s %8s | %15s | %10s %8s\n", "k x n_out", "m", "w4a8",
                "best W4A16", "w4a8/it", "cuBLAS us", "vs fp16", "w4a8 Q4_K", "best Q4_K", "w4a8/it");
    for (const auto& r : result.rows) {
      if (!(r.g128_w4a8_us > 0)) continue;
      double best = 0.0;
      for (const double us :
           {r.g128_us, r.g128_tc_us, r.g128_staged_us, r.g128_half2_us, r.g128_tc32_us, r.g128_tc64_us,
            r.g128_tiles_tc_us, r.g128_tiles_tc32_us, r.g128_tiles_tc64_us, r.g128_cutlass16_us})
        if (us > 0 && (best == 0.0 || us < best)) best = us;
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(r.shape.k),
                    static_cast<long long>(r.shape.n_out));
      std::printf("%-12s %4lld | %8.1f (%3.0f%%) | %10.1f %7.2fx | %9.1f %7.2fx |", shape,
                  static_cast<long long>(r.m), r.g128_w4a8_us,
                  100.0 * r.g128_bytes / (r.g128_w4a8_us * 1e-6) / 1e9 / result.copy_gbps, best,
                  best > 0 ? best / r.g128_w4a8_us : 0.0, r.cublas_us, r.cublas_us / r.g128_w4a8_us);
      double best_q4k = 0.0;
      for (const double us : {r.q4k_us, r.q4k_tc_us, r.q4k_half2_us, r.q4k_tiles_tc_us})
        if (us > 0 && (best_q4k == 0.0 || us < best_q4k)) best_q4k = us;
      if (r.q4k_w4a8_us > 0)
        std::printf(" %8.1f (%3.0f%%) | %10.1f %7.2fx\n", r.q4k_w4a8_us,
                    100.0 * r.q4k_bytes / (r.q4k_w4a8_us * 1e-6) / 1e9 / result.copy_gbps, best_q4k,
                    best_q4k > 0 ? best_q4k / r.q4k_w4a8_us : 0.0);
      else
        std::printf(" %15s | %10s %8s\n", "-", "-", "-");
    }
    // GGUF Q6_K in planes (a Q4_K_M file's 6-bit matrices): the CUDA-core GEMV and, at one row, the half2
    // one.
    std::printf(
        "\nQ6_K in planes (kernels/q6_k_planes.hpp; m <= 32), us (%%copy of Q6_K's 210 bytes per 256 "
        "weights): "
        "the CUDA-core GEMV (w4a16_gemv_q6_k) and, at one row, the half2 GEMV (w4a16_gemv_q6_k_half2)\n");
    std::printf("%-12s %4s | %20s | %20s\n", "k x n_out", "m", "Q6_K CUDA cores us", "Q6_K half2 us");
    for (const auto& r : result.rows) {
      if (!(r.q6k_us > 0)) continue;
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(r.shape.k),
                    static_cast<long long>(r.shape.n_out));
      const auto cell = [&](double us) {
        if (us > 0)
          std::printf(" %12.1f (%3.0f%%) |", us, 100.0 * r.q6k_bytes / (us * 1e-6) / 1e9 / result.copy_gbps);
        else
          std::printf(" %20s |", "-");
      };
      std::printf("%-12s %4lld |", shape, static_cast<long long>(r.m));
      cell(r.q6k_us);
      cell(r.q6k_half2_us);
      std::printf("\n");
    }
    // The other GGUF types as stored (a Q5_K_M, Q3_K_M, Q2_K or IQ4_XS file's matrices, and the read-only
    // i-quants, TQ1_0 / TQ2_0 and MXFP4), the CUDA-core GEMV.
    std::printf(
        "\nThe other GGUF types as stored (w4a16_gemv_gguf_blocks, the CUDA-core GEMV; m <= 32), us (%%copy "
        "of each type's own bytes)\n");
    std::printf("%-12s %4s |", "k x n_out", "m");
    for (const kernels::DType type : kernels::cuda::kW4A16GgufBlockTypes)
      std::printf(" %15s |", kernels::type_name(type));
    std::printf("\n");
    for (const auto& r : result.rows) {
      if (r.gguf_blocks.empty()) continue;
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(r.shape.k),
                    static_cast<long long>(r.shape.n_out));
      std::printf("%-12s %4lld |", shape, static_cast<long long>(r.m));
      for (const kernels::DType type : kernels::cuda::kW4A16GgufBlockTypes) {
        const auto it = std::find_if(r.gguf_blocks.begin(), r.gguf_blocks.end(),
                                     [type](const auto& g) { return g.type == type; });
        if (it != r.gguf_blocks.end() && it->us > 0)
          std::printf(" %7.1f (%3.0f%%) |", it->us,
                      100.0 * it->bytes / (it->us * 1e-6) / 1e9 / result.copy_gbps);
        else
          std::printf(" %15s |", "-");
      }
      std::printf("\n");
    }
  }
  if (!a.json) {
    std::printf(
        "\nW4A16 = GGUF Q4_0 weights x fp16 activations, fp32 accumulation (m <= 32: w4a16_gemv, above: the "
        "tensor-core w4a16_gemm). split = the same GEMV on the split layout (16-byte nibble loads, "
        "kernels/q4_0_split.hpp). g128 = group-wise INT4, one fp16 scale and zero per 128 weights (GPTQ / "
        "AWQ, "
        "kernels/int4_groups.hpp; tinygemm's grouping); g128 tc = the same weights on the tensor-core GEMV "
        "(w4a16_gemv_int4_groups_mma, m <= 16); staged = the same weights on the staged GEMV (m = 1; "
        "w4a16_gemv_int4_groups_staged: scale factored out, fp32 activations in shared memory); half2 = the "
        "same on the half2 GEMV (m = 1; w4a16_gemv_int4_groups_half2: fp16 pairs, each unit's products "
        "summed in fp16); tc32 = the "
        "tensor-core GEMV on two m16 tiles (m <= 32); tc64 = the tensor-core GEMM on 64-row slabs "
        "(w4a16_gemm_int4_groups_mma_64rows, any m); best also counts the tensor-core kernels on tiles "
        "(table above); mma = the "
        "same weights on the mma.sync GEMM (m > 32); deq = the same weights dequantized to fp16 in 64 MiB "
        "chunks for cuBLAS (m >= 17; "
        "w4a16_int4_groups_dequant_cublas). best = the fastest of the group-128 kernels at that m (what the "
        "model's load-time timing picks "
        "from), against fp16 cuBLAS and tinygemm. Q4_K = GGUF Q4_K super-blocks as stored (CUDA-core GEMV up "
        "to 32 rows, WMMA GEMM above); Q4_K tc = "
        "the same on the tensor-core kernels (w4a16_gemv_q4_k_mma up to 16 rows, _32rows, _64rows above); "
        "Q4_K h2 = the same on the half2 GEMV (m = 1; w4a16_gemv_q4_k_half2). %%copy and "
        "GB/s "
        "count the bytes each product must move.\n");
    std::fflush(stdout);  // the W4A16 part is whole in the output whatever happens to the attention part
  }
  for (const std::string& column : result.skipped) progress("column left out ('-'): %s", column.c_str());
  nlohmann::json out{{"device", result.device},
                     {"copy_gbps", result.copy_gbps},
                     {"rows", rows},
                     {"skipped", result.skipped}};
  if (st != kernels::Status::ok) {
    if (a.json) std::cout << out.dump() << "\n";
    progress("GPU benchmark failed after %zu rows: %s %s", result.rows.size(), kernels::status_name(st),
             error.c_str());
    return 1;
  }
  // The attention tables, after the products and their footer: a failure there (exit 3) leaves their
  // tables whole, and tools/gpu-bundle.sh's run.sh does not take it for a broken device.
  std::vector<kernels::cuda::AttentionBenchRow> attention_rows;
  std::string attention_error;
  kernels::Status attention_st = kernels::Status::ok;
  const int64_t model_split = a.decode_split_tokens;  // the model's default unless told
  if (!attention_lists.contexts.empty()) {
    attention_st = kernels::cuda::run_attention_decode_bench(
        heads, attention_lists.batches, attention_lists.contexts, attention_lists.queries,
        attention_lists.splits, a.iterations, a.repetitions, attention_rows, attention_error,
        [](const kernels::cuda::AttentionBenchRow& r) {
          progress("attention batch %lld context %lld queries %lld split %lld: %.1f us",
                   static_cast<long long>(r.batch), static_cast<long long>(r.context),
                   static_cast<long long>(r.queries), static_cast<long long>(r.split_tokens), r.us);
        });
    out["decode_attention"] =
        report_attention(attention_rows, heads, model_split, result.copy_gbps, torch_attention, !a.json);
    if (attention_st != kernels::Status::ok)
      out["decode_attention_error"] = std::string(kernels::status_name(attention_st)) + " " + attention_error;
  }
  // The prompt side, after the decode side (even where that failed: other kernels).
  std::vector<kernels::cuda::PrefillAttentionBenchRow> prefill_rows;
  std::string prefill_error;
  kernels::Status prefill_st = kernels::Status::ok;
  if (!attention_lists.prompts.empty()) {
    // Long prompts take milliseconds a call: fewer calls a timed loop than the products'.
    prefill_st = kernels::cuda::run_prefill_attention_bench(
        heads, attention_lists.prompts, std::max(1, a.iterations / 4), a.repetitions, prefill_rows,
        prefill_error, [](const kernels::cuda::PrefillAttentionBenchRow& r) {
          progress("prefill attention %lld tokens: CUDA cores %.1f us, tensor cores %.1f us",
                   static_cast<long long>(r.tokens), r.cuda_core_us, r.tensor_core_us);
        });
    out["prefill_attention"] = report_prefill_attention(prefill_rows, heads, torch_attention, !a.json);
    if (prefill_st != kernels::Status::ok)
      out["prefill_attention_error"] = std::string(kernels::status_name(prefill_st)) + " " + prefill_error;
  }
  if (a.json) std::cout << out.dump() << "\n";
  if (attention_st != kernels::Status::ok) {
    progress("decode attention table failed after %zu timings: %s %s", attention_rows.size(),
             kernels::status_name(attention_st), attention_error.c_str());
  }
  if (prefill_st != kernels::Status::ok) {
    progress("prefill attention table failed after %zu prompts: %s %s", prefill_rows.size(),
             kernels::status_name(prefill_st), prefill_error.c_str());
  }
  return attention_st == kernels::Status::ok && prefill_st == kernels::Status::ok ? 0 : kAttentionTableFailed;
}
#else
int run_kernels(const Args&, const KernelTableInputs&) {
  throw std::runtime_error(
      "this nibble was built without CUDA (configure with -DNIBBLE_CUDA=ON where nvcc exists)");
}
#endif

// The kernel table's inputs are read first: bad input must not cost a measured table.
int run(const Args& a) {
  return a.model.empty() ? run_kernels(a, read_kernel_table_inputs(a)) : run_model(a);
}

}  // namespace

Runner add_bench_gpu(CLI::App& app) {
  auto a = std::make_shared<Args>();
  app.add_option("--rows", a->rows, "Activation row counts, comma-separated");
  app.add_option("--shapes", a->shapes, "Matrix shapes KxN (input x output features), comma-separated");
  app.add_option("--iterations", a->iterations, "Products per timed loop")->check(CLI::PositiveNumber);
  app.add_option("--repetitions", a->repetitions, "Timed loops (the median is reported)")
      ->check(CLI::PositiveNumber);
  app.add_option("--tinygemm", a->tinygemm, "JSON from tools/bench_tinygemm.py (same shapes, same machine)");
  app.add_flag("--json", a->json, "Print one JSON object");
  app.add_option("--attention-batches", a->attention_batches,
                 "Decode attention table: sequences a call, comma-separated");
  app.add_option("--attention-contexts", a->attention_contexts,
                 "Decode attention table: positions of each sequence, comma-separated (none: no table)");
  app.add_option("--attention-queries", a->attention_queries,
                 "Decode attention table: query tokens a sequence (1: decode, k + 1: speculative "
                 "verification), comma-separated");
  app.add_option(
      "--attention-splits", a->attention_splits,
      "Decode attention table: split sizes (positions a block takes, multiples of 32), comma-separated");
  app.add_option(
      "--torch-attention", a->torch_attention,
      "JSON from tools/bench_torch_attention.py (PyTorch's attention on the attention tables' cases, "
      "same machine)");
  app.add_option("--attention-prompts", a->attention_prompts,
                 "Prefill attention table: prompt lengths, comma-separated (none: no table)");
  app.add_option(
         "--decode-split-tokens", a->decode_split_tokens,
         "Positions a decode attention block takes (CudaModelOptions::decode_split_tokens, a multiple of "
         "32): with --model, the model's; without, the split the decode attention table compares the others "
         "with")
      ->check(CLI::PositiveNumber);
  app.add_option("--model,-m", a->model,
                 "End to end instead of the kernel table: a model (GGUF, HF directory or dummy:<shape>, "
                 "e.g. dummy:llama-70b) on the GPU");
  app.add_option("--draft", a->draft, "With --model: also time this draft model's decode steps");
  app.add_option("--batch", a->batch, "With --model: decode batch sizes, comma-separated");
  app.add_option("--prompt-tokens", a->prompt_tokens, "With --model: prompt length for the prefill test")
      ->check(CLI::PositiveNumber);
  app.add_option("--gen-tokens", a->gen_tokens, "With --model: decode steps timed per repetition")
      ->check(CLI::PositiveNumber);
  app.add_option("--prefill-batch", a->prefill_batch, "With --model: prompts in the batched prefill test")
      ->check(CLI::PositiveNumber);
  app.add_option("--long-prompt-tokens", a->long_prompt_tokens,
                 "With --model: also one prompt of this many tokens, its prefill timed with the attention on "
                 "the CUDA cores and on the tensor cores, in a KV cache of its own (more than 64, e.g. 2048)")
      ->check(CLI::NonNegativeNumber);
  CLI::Option* lora_rank =
      app.add_option("--lora-rank", a->lora_rank,
                     "With --model: last, the target again with random LoRA adapters of this rank on every "
                     "layer's seven matrices (--lora-adapters of them), sequence s naming adapter s % N + 1: "
                     "decode steps, the one-prompt prefill and a step profile against the base's (0: none)")
          ->check(CLI::Range(0, kMaxLoraRank));
  app.add_option(
         "--lora-adapters", a->lora_adapters,
         "With --lora-rank: that many adapters, sequence s naming adapter s % N + 1 (one call a layer's "
         "products of one input serves them all)")
      ->check(CLI::Range(1, 64))
      ->needs(lora_rank);
  add_int4_kernels_option(
      app, a->int4_kernels,
      "With --model: how group-wise INT4 matrices pick their kernels: measured (timed at load, "
      "the default), cuda-cores, tensor-cores or half2 (one row on the half2 GEMV, the tensor cores above)");
  add_int4_layout_option(app, a->int4_layout,
                         "With --model: group-wise INT4 matrices as rows (the default), repacked into the "
                         "tensor-core kernels' tiles, or only in CUTLASS's order (cutlass: every product "
                         "of them on CUTLASS's Hopper GEMM, one copy of the weights), or measured: per "
                         "matrix shape, the one of the three that decodes fastest when timed at load");
  app.add_flag(
      "--unfused-epilogues", a->unfused_epilogues,
      "With --model: the steps after a one-row half2 GEMV (RoPE + KV write, SwiGLU, residual add + "
      "RMSNorm) as kernels of their own, not in the GEMV's epilogue (CudaModelOptions::fused_epilogues; "
      "the same bits)");
  app.add_flag(
      "--int8-activations", a->int8_activations,
      "With --model: one-row INT4 products (batch-1 decode) on the W4A8 GEMV, the activations rounded "
      "to 8 bits on the device (llama.cpp's way; needs --int4-layout rows)");
  app.add_flag("--cutlass-gemm", a->cutlass_gemm,
               "With --model: also hold the INT4 weights in CUTLASS's order and time CUTLASS's Hopper GEMMs "
               "at load as candidates (128-row tiles from 17 rows, 16-row tiles up to 32; needs a CUTLASS "
               "build and an H100 / H200; twice the INT4 memory)");
  add_kv_cache_option(app, a->kv_cache);
  return [a]() { return run(*a); };
}

}  // namespace nibble::cli
