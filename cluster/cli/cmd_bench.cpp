// `nibble bench`: prompt processing (one batched forward of N tokens) and generation (N single-token
// forwards) in tokens per second, as llama-bench measures them, plus peak memory.

#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/model_session.hpp"
#include "cluster/cli/peer_process.hpp"
#include "kernels/matmul.hpp"

namespace nibble::cli {

namespace {

struct Stats {
  double mean = 0.0, stddev = 0.0;
};

Stats stats_of(const std::vector<double>& v) {
  Stats s;
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  for (double x : v) s.stddev += (x - s.mean) * (x - s.mean);
  s.stddev = v.size() > 1 ? std::sqrt(s.stddev / static_cast<double>(v.size() - 1)) : 0.0;
  return s;
}

// Runs the llama.cpp driver on the same model and token ids; its JSON, or {"error": ...}.
nlohmann::json run_peer(const std::string& script, const std::string& model, int threads,
                        const std::vector<int32_t>& prompt, int gen_tokens, int repetitions,
                        const LoraOption& lora, const KvCacheOption& kv_cache) {
  std::string tokens;
  for (int32_t t : prompt) {
    if (!tokens.empty()) tokens += ',';
    tokens += std::to_string(t);
  }
  std::vector<std::string> args = {"--model",       model,
                                   "--threads",     std::to_string(threads),
                                   "--tokens",      tokens,
                                   "--gen-tokens",  std::to_string(gen_tokens),
                                   "--repetitions", std::to_string(repetitions)};
  if (!lora.path.empty()) {
    args.insert(args.end(), {"--lora", lora.path, "--lora-scale", std::to_string(lora.scale)});
  }
  const worker::KvCacheTypes types = kv_cache.types();
  if (types.quantized()) {
    args.insert(args.end(), {"--cache-type-k", kernels::type_name(types.k), "--cache-type-v",
                             kernels::type_name(types.v)});
    if (kv_cache.no_rotation) args.emplace_back("--no-kv-rotation");
  }
  return run_peer_script(script, args);
}

}  // namespace

Runner add_bench(CLI::App& app) {
  struct Args {
    std::string model_path;
    int threads = default_threads();
    int prompt_tokens = 64;
    int gen_tokens = 32;
    int repetitions = 3;
    bool json = false;
    bool peer = false;
    std::string peer_script = NIBBLE_PEER_SCRIPT;
    LoraOption lora;
    KvCacheOption kv_cache;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model,-m", a->model_path, "GGUF model file")->required();
  app.add_option("--threads,-t", a->threads, "CPU threads")->check(CLI::PositiveNumber);
  app.add_option("--prompt-tokens", a->prompt_tokens, "Prompt length for the prefill test")
      ->check(CLI::PositiveNumber);
  app.add_option("--gen-tokens", a->gen_tokens, "Tokens for the generation test")->check(CLI::PositiveNumber);
  app.add_option("--repetitions,-r", a->repetitions, "Runs of each test")->check(CLI::PositiveNumber);
  app.add_flag("--json", a->json, "Print one JSON object");
  app.add_flag("--peer", a->peer,
               "Also time llama.cpp (llama-cpp-python) on the same model and tokens, and print the ratio");
  app.add_option("--peer-script", a->peer_script, "The peer driver script");
  add_lora_option(app, a->lora);          // the peer applies it too
  add_kv_cache_option(app, a->kv_cache);  // and this

  return [a]() {
    ModelSession s = ModelSession::open(a->model_path, a->threads);
    apply_lora_option(a->lora, s);
    apply_kv_cache_option(a->kv_cache, s);
    const auto& config = s.model->config();
    const int64_t block = 16;
    const int64_t positions = std::max(a->prompt_tokens, a->gen_tokens);
    const int64_t blocks = (positions + block - 1) / block;
    worker::KvCache cache(config, blocks, block, s.model->kv_cache_types());
    std::vector<int32_t> table(blocks);
    for (int64_t b = 0; b < blocks; ++b) table[b] = static_cast<int32_t>(b);

    // Random non-special tokens: content does not change the work done.
    std::mt19937 rng(42);
    std::uniform_int_distribution<int32_t> pick(3, static_cast<int32_t>(config.n_vocab - 1));
    std::vector<int32_t> prompt(a->prompt_tokens);
    for (auto& t : prompt) t = pick(rng);
    std::vector<float> logits;
    using clock = std::chrono::steady_clock;

    // Warm-up: touches every weight page once so the first timed run is not a disk read.
    s.model->forward(worker::ForwardBatch::single({prompt[0]}, 0, table, false), cache, *s.pool, logits);

    std::vector<double> pp, tg;
    for (int r = 0; r < a->repetitions; ++r) {
      auto start = clock::now();
      s.model->forward(worker::ForwardBatch::single(prompt, 0, table, false), cache, *s.pool, logits);
      pp.push_back(a->prompt_tokens / std::chrono::duration<double>(clock::now() - start).count());

      start = clock::now();
      int32_t token = prompt[0];
      for (int i = 0; i < a->gen_tokens; ++i) {
        s.model->forward(worker::ForwardBatch::single({token}, i, table, false), cache, *s.pool, logits);
        token = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      }
      tg.push_back(a->gen_tokens / std::chrono::duration<double>(clock::now() - start).count());
    }
    const Stats pp_stats = stats_of(pp), tg_stats = stats_of(tg);
    const double rss = peak_resident_mib();
    std::optional<nlohmann::json> peer;
    if (a->peer) {
      s.model.reset();  // give the memory back before the peer loads its own copy
      peer = run_peer(a->peer_script, a->model_path, a->threads, prompt, a->gen_tokens, a->repetitions,
                      a->lora, a->kv_cache);
    }
    // The file's size; a dummy model's weights as a file would hold them.
    const double file_mib = static_cast<double>(s.checkpoint->weight_bytes()) / (1024.0 * 1024.0);

    if (a->json) {
      nlohmann::json out = {
          {"model", a->model_path},
          {"lora", a->lora.path},
          {"kv_cache_dtype", a->kv_cache.types().name()},
          {"kv_cache_rotation", !a->kv_cache.no_rotation},
          {"threads", a->threads},
          {"isa", kernels::matmul_isa()},
          {"prompt_tokens", a->prompt_tokens},
          {"gen_tokens", a->gen_tokens},
          {"repetitions", a->repetitions},
          {"prompt_tokens_per_second", pp_stats.mean},
          {"prompt_tokens_per_second_stddev", pp_stats.stddev},
          {"gen_tokens_per_second", tg_stats.mean},
          {"gen_tokens_per_second_stddev", tg_stats.stddev},
          {"model_file_mib", file_mib},
          {"peak_rss_mib", rss},
      };
      if (peer) {
        out["peer"] = {{"name", "llama.cpp"}, {"result", *peer}};
        if (peer->contains("prompt_tokens_per_second")) {
          out["peer"]["prompt_ratio"] = pp_stats.mean / (*peer)["prompt_tokens_per_second"].get<double>();
          out["peer"]["gen_ratio"] = tg_stats.mean / (*peer)["gen_tokens_per_second"].get<double>();
        }
      }
      std::cout << out.dump() << "\n";
    } else {
      std::printf("model %s (%.1f MiB), %d threads, %s kernels\n", a->model_path.c_str(), file_mib,
                  a->threads, kernels::matmul_isa());
      if (!a->lora.path.empty())
        std::printf("LoRA adapter %s, scale %g\n", a->lora.path.c_str(), a->lora.scale);
      if (a->kv_cache.quantized())
        std::printf("KV cache %s%s\n", a->kv_cache.types().name().c_str(),
                    a->kv_cache.no_rotation ? ", unrotated" : "");
      std::printf("pp%-5d %9.2f ± %.2f tokens/s\n", a->prompt_tokens, pp_stats.mean, pp_stats.stddev);
      std::printf("tg%-5d %9.2f ± %.2f tokens/s\n", a->gen_tokens, tg_stats.mean, tg_stats.stddev);
      std::printf("peak RSS %.1f MiB\n", rss);
      if (peer && peer->contains("prompt_tokens_per_second")) {
        const double peer_pp = (*peer)["prompt_tokens_per_second"],
                     peer_tg = (*peer)["gen_tokens_per_second"];
        std::printf("llama.cpp pp%-5d %9.2f tokens/s   nibble/llama.cpp %.2fx\n", a->prompt_tokens, peer_pp,
                    pp_stats.mean / peer_pp);
        std::printf("llama.cpp tg%-5d %9.2f tokens/s   nibble/llama.cpp %.2fx\n", a->gen_tokens, peer_tg,
                    tg_stats.mean / peer_tg);
      } else if (peer) {
        std::printf("peer: %s\n", peer->value("error", std::string("no result")).c_str());
      }
    }
    return 0;
  };
}

}  // namespace nibble::cli
