// `nibble bench`: prompt processing (one batched forward of N tokens) and generation (N single-token
// forwards) in tokens per second, as llama-bench measures them, plus peak memory.
#include <sys/resource.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/model_session.hpp"
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

double peak_rss_mib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;  // ru_maxrss is in KiB on Linux
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
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model,-m", a->model_path, "GGUF model file")->required();
  app.add_option("--threads,-t", a->threads, "CPU threads")->check(CLI::PositiveNumber);
  app.add_option("--prompt-tokens", a->prompt_tokens, "Prompt length for the prefill test")->check(CLI::PositiveNumber);
  app.add_option("--gen-tokens", a->gen_tokens, "Tokens for the generation test")->check(CLI::PositiveNumber);
  app.add_option("--repetitions,-r", a->repetitions, "Runs of each test")->check(CLI::PositiveNumber);
  app.add_flag("--json", a->json, "Print one JSON object");

  return [a]() {
    ModelSession s = ModelSession::open(a->model_path, a->threads);
    const auto& config = s.model->config();
    const int64_t block = 16;
    const int64_t positions = std::max(a->prompt_tokens, a->gen_tokens);
    const int64_t blocks = (positions + block - 1) / block;
    worker::KvCache cache(config, blocks, block);
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
    const double file_mib = static_cast<double>(std::filesystem::file_size(a->model_path)) / (1024.0 * 1024.0);

    if (a->json) {
      nlohmann::json out = {
          {"model", a->model_path},
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
          {"peak_rss_mib", peak_rss_mib()},
      };
      std::cout << out.dump() << "\n";
    } else {
      std::printf("model %s (%.1f MiB), %d threads, %s kernels\n", a->model_path.c_str(), file_mib, a->threads,
                  kernels::matmul_isa());
      std::printf("pp%-5d %9.2f ± %.2f tokens/s\n", a->prompt_tokens, pp_stats.mean, pp_stats.stddev);
      std::printf("tg%-5d %9.2f ± %.2f tokens/s\n", a->gen_tokens, tg_stats.mean, tg_stats.stddev);
      std::printf("peak RSS %.1f MiB\n", peak_rss_mib());
    }
    return 0;
  };
}

}  // namespace nibble::cli
