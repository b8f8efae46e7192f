// `nibble bench-spec`: speculative decoding against plain decoding, measured in the same run on
// the same engine (continuous batching, LocalEngine), at several batch sizes: end-to-end generated
// tokens per second with and without the draft, the speedup, the acceptance rate, tokens per target
// step, and the draft's cost per token relative to the target's (both measured decoding alone).
// --device cuda runs both models on one GPU (worker::CudaForwardModel) through the same engine.
// --peer also runs llama.cpp's own speculative decoding (llama-speculative, tools/build-llama-cpp.sh)
// at batch 1 on the same models, prompt, k and threads, alternating with Nibble's runs.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/model_session.hpp"
#include "cluster/cli/peer_process.hpp"
#include "cluster/local_engine.hpp"
#include "speculative/ngram_draft.hpp"
#include "speculative/speculator.hpp"
#include "speculative/vocab_match.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/forward_model.hpp"

namespace nibble::cli {
namespace {

struct Args {
  std::string model, draft;  // draft "ngram": prompt lookup (speculative/ngram_draft.hpp), no model
  int ngram_min = 1, ngram_max = 4;
  std::string prompts_file;  // one prompt a line; empty: kPrompts
  int draft_tokens = 4;
  std::string batches = "1,8,32";
  int gen_tokens = 128;
  int threads = default_threads();
  bool fixed_k = false;
  int max_batch = 16;
  int repetitions = 3;
  bool json = false;
  std::string device = "cpu";
  bool peer = false;
  std::string peer_bin = default_peer_bin();
  std::string peer_script = NIBBLE_SPEC_PEER_SCRIPT;

  // Where tools/build-llama-cpp.sh puts llama.cpp's programs: $NIBBLE_LLAMA_CPP_BIN, else its default.
  static std::string default_peer_bin() {
    if (const char* env = std::getenv("NIBBLE_LLAMA_CPP_BIN")) return env;
    const char* home = std::getenv("HOME");
    return std::string(home != nullptr ? home : ".") + "/.cache/nibble/llama.cpp/bin";
  }
};

// Prompts of ordinary English (the fixture pair was trained on fortune files); batches cycle them.
const char* const kPrompts[] = {
    "The best way to predict the future is",
    "A man who has never made a mistake",
    "It is a truth universally acknowledged that",
    "Never put off until tomorrow what",
    "The early bird gets the worm, but",
    "If at first you don't succeed,",
    "There is no such thing as a free",
    "All that glitters is not",
};

struct Measured {
  double seconds = 0;
  int64_t tokens = 0;
  speculative::SpeculatorStats stats;
  double tokens_per_second() const { return seconds > 0 ? static_cast<double>(tokens) / seconds : 0; }
};

// draft or lookup: what proposes (neither: plain decoding); batches cycle `prompts`.
Measured run_batch(worker::ForwardModel& target, const model::Tokenizer& tokenizer,
                   worker::ForwardModel* draft, const speculative::SpeculatorSettings& settings, int batch,
                   int gen_tokens, const std::vector<std::string>& prompts,
                   speculative::DraftProposer* lookup = nullptr) {
  cluster::SchedulerConfig config;
  config.max_running = batch;
  config.max_queue = batch;
  config.max_batch_tokens = std::max(512, batch * (settings.max_draft_tokens + 1));
  config.context = 1024;
  config.block_size = 16;
  config.num_blocks = batch * (1024 / 16);
  config.prefix_caching = false;  // every run computes its prompts: the runs time the same work
  std::unique_ptr<speculative::Speculator> speculator;
  if (draft != nullptr) speculator = std::make_unique<speculative::Speculator>(*draft, settings);
  if (lookup != nullptr) speculator = std::make_unique<speculative::Speculator>(*lookup, settings);
  cluster::LocalEngine engine(target, tokenizer, config, speculator.get());
  for (int i = 0; i < batch; ++i) {
    cluster::EngineRequest r;
    r.id = static_cast<uint64_t>(i);
    r.prompt =
        tokenizer.encode(prompts[static_cast<size_t>(i) % prompts.size()], tokenizer.add_bos_default());
    r.sampling.temperature = 0.0f;
    r.limits.max_tokens = gen_tokens;
    r.limits.ignore_eos = true;
    if (engine.submit(r) != cluster::Admission::accepted) throw std::runtime_error("bench request refused");
  }
  Measured m;
  const auto start = std::chrono::steady_clock::now();
  while (!engine.idle()) {
    for (const cluster::EngineResult& result : engine.step())
      m.tokens += static_cast<int64_t>(result.tokens.size());
  }
  m.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (speculator) m.stats = speculator->stats();
  return m;
}

// A model session's forward pass on the chosen device; the GPU model is owned here.
struct DeviceModel {
  std::unique_ptr<worker::CudaLlamaModel> gpu;
  std::unique_ptr<worker::ForwardModel> forward;
};

DeviceModel make_device_model(ModelSession& session, kernels::ThreadPool& pool, bool cuda) {
  DeviceModel r;
  if (cuda) {
    worker::CudaModelOptions options;
    options.graphs = true;  // decode steps as served: one graph launch each
    r.gpu = std::make_unique<worker::CudaLlamaModel>(session.checkpoint, options);
    r.forward = std::make_unique<worker::CudaForwardModel>(*r.gpu, /*device=*/0);
  } else {
    r.forward = std::make_unique<worker::CpuForwardModel>(*session.model, pool);
  }
  return r;
}

// llama.cpp's figures at batch 1: medians over the repetitions (each a one-run call of the driver),
// acceptance over all of them; {"error": ...} from the first run that failed.
nlohmann::json summarize_peer(const std::vector<nlohmann::json>& runs) {
  for (const nlohmann::json& r : runs)
    if (r.contains("error")) return r;
  auto median_of = [&](const char* key) {
    std::vector<double> v;
    for (const nlohmann::json& r : runs) v.push_back(r.at(key).get<double>());
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  int64_t drafted = 0, accepted = 0;
  for (const nlohmann::json& r : runs) {
    drafted += r.at("drafted").get<int64_t>();
    accepted += r.at("accepted").get<int64_t>();
  }
  const double plain = median_of("plain_tokens_per_second"),
               spec = median_of("speculative_tokens_per_second"),
               draft = median_of("draft_alone_tokens_per_second");
  return {
      {"name", "llama.cpp"},
      {"build_commit", runs.front().value("build_commit", std::string())},
      {"plain_tokens_per_second", plain},
      {"draft_alone_tokens_per_second", draft},
      {"speculative_tokens_per_second", spec},
      {"speedup", spec / plain},
      {"proposed", drafted},
      {"accepted", accepted},
      {"acceptance_rate", drafted > 0 ? static_cast<double>(accepted) / static_cast<double>(drafted) : 0.0},
      {"draft_cost_relative", plain / draft}};
}

int run(const Args& a) {
  const bool cuda = a.device == "cuda";
  if (cuda) {
    const std::string why = worker::cuda_unavailable_reason();
    if (!why.empty()) throw std::runtime_error("--device cuda: " + why);
  }
  const bool ngram = a.draft == "ngram";
  std::vector<std::string> prompts(std::begin(kPrompts), std::end(kPrompts));
  if (!a.prompts_file.empty()) {
    std::ifstream in(a.prompts_file);
    prompts.clear();
    for (std::string line; std::getline(in, line);)
      if (!line.empty()) prompts.push_back(line);
    if (prompts.empty()) throw std::runtime_error("--prompts: " + a.prompts_file + " holds no prompt");
  }
  if (a.peer && !a.prompts_file.empty()) throw std::runtime_error("--peer runs the built-in prompts only");
  if (ngram && a.peer)
    throw std::runtime_error("--peer: llama.cpp's peer runs a draft model, not --draft ngram");
  ModelSession target_session = ModelSession::open(a.model, a.threads, /*cpu_model=*/!cuda);
  std::optional<ModelSession> draft_session;
  if (!ngram) {
    draft_session.emplace(ModelSession::open(a.draft, 1, /*cpu_model=*/!cuda));
    speculative::check_vocab_match(target_session.require_tokenizer(), draft_session->require_tokenizer(),
                                   a.draft);
  }
  // Both models on the target's threads (the draft runs between the target's passes, not beside them).
  DeviceModel target = make_device_model(target_session, *target_session.pool, cuda);
  DeviceModel draft;
  if (!ngram) draft = make_device_model(*draft_session, *target_session.pool, cuda);
  const model::Tokenizer& target_tokenizer = *target_session.tokenizer;
  std::unique_ptr<speculative::NgramDraft> lookup;
  if (ngram)
    lookup =
        std::make_unique<speculative::NgramDraft>(target.forward->config().n_vocab, a.ngram_min, a.ngram_max);
  std::vector<int> batches;
  std::stringstream list(a.batches);
  for (std::string item; std::getline(list, item, ',');) batches.push_back(std::stoi(item));

  // What the adaptive mode decides with: measured pass times of both models (prompt lookup: none).
  speculative::CostModel costs;
  if (ngram) {
    costs.target = speculative::CostModel::measure_model(*target.forward, 256);
    for (const auto& [tokens, seconds] : costs.target) costs.draft.emplace_back(tokens, 0.0);
  } else {
    costs = speculative::CostModel::measure(*target.forward, *draft.forward, 256);
  }
  nlohmann::json rows = nlohmann::json::array();
  if (!a.json) {
    std::printf("target %s\ndraft  %s\n%s, %d tokens per request, temperature 0, k %s%d\n\n", a.model.c_str(),
                ngram ? ("ngram (prompt lookup, n " + std::to_string(a.ngram_min) + ".." +
                         std::to_string(a.ngram_max) + ")")
                            .c_str()
                      : a.draft.c_str(),
                cuda ? "device cuda" : ("threads " + std::to_string(a.threads)).c_str(), a.gen_tokens,
                a.fixed_k ? "" : "<= ", a.draft_tokens);
    // The cost model's view: what one forward pass of n tokens costs each model.
    std::printf("measured forward passes (ms):");
    for (size_t i = 0; i < costs.target.size(); ++i)
      std::printf(" %lld: %.2f/%.2f", static_cast<long long>(costs.target[i].first),
                  costs.target[i].second * 1e3, costs.draft[i].second * 1e3);
    std::printf("  (tokens: target/draft)\n\n");
    std::printf("%6s %12s %12s %12s %8s %10s %12s %11s\n", "batch", "plain tok/s", "draft tok/s",
                "spec tok/s", "speedup", "accepted", "tok/verify", "draft cost");
  }
  for (int batch : batches) {
    speculative::SpeculatorSettings settings;
    settings.max_draft_tokens = a.draft_tokens;
    settings.num_blocks = batch * (1024 / 16);
    settings.adaptive = !a.fixed_k;
    settings.max_batch = a.fixed_k ? 1 << 30 : a.max_batch;
    // Plain and speculative runs alternate, and each figure is the median of its runs: this
    // machine's speed drifts by 10-15% between back-to-back runs, as much as some of the effects.
    std::vector<Measured> plains, drafts, specs;
    std::vector<nlohmann::json> peer_runs;  // llama.cpp, batch 1 only: its programs decode one sequence
    const bool with_peer = a.peer && batch == 1;
    settings.costs = costs;
    for (int rep = 0; rep < a.repetitions; ++rep) {
      plains.push_back(
          run_batch(*target.forward, target_tokenizer, nullptr, settings, batch, a.gen_tokens, prompts));
      specs.push_back(run_batch(*target.forward, target_tokenizer, draft.forward.get(), settings, batch,
                                a.gen_tokens, prompts, lookup.get()));
      // The draft decoding alone, on the same threads: its cost per token relative to the target's.
      if (!ngram)
        drafts.push_back(run_batch(*draft.forward, *draft_session->tokenizer, nullptr, settings, batch,
                                   a.gen_tokens, prompts));
      if (with_peer)
        peer_runs.push_back(run_peer_script(
            a.peer_script,
            {"--bin", a.peer_bin, "--model", a.model, "--draft", a.draft, "--prompt", kPrompts[0],
             "--threads", std::to_string(a.threads), "--gen-tokens", std::to_string(a.gen_tokens),
             "--draft-tokens", std::to_string(a.draft_tokens), "--repetitions", "1"}));
    }
    auto median = [](std::vector<Measured> runs) {
      std::sort(runs.begin(), runs.end(), [](const Measured& x, const Measured& y) {
        return x.tokens_per_second() < y.tokens_per_second();
      });
      return runs[runs.size() / 2];
    };
    const Measured plain = median(plains), spec = median(specs);
    const Measured draft_alone = ngram ? Measured{} : median(drafts);
    const double draft_cost = ngram ? 0.0 : plain.tokens_per_second() / draft_alone.tokens_per_second();
    const double acceptance =
        spec.stats.proposed > 0 ? static_cast<double>(spec.stats.accepted) / spec.stats.proposed : 0.0;
    const double per_verify =
        spec.stats.steps > 0 ? static_cast<double>(spec.stats.accepted + spec.stats.steps) / spec.stats.steps
                             : 1.0;
    const double speedup = spec.tokens_per_second() / plain.tokens_per_second();
    rows.push_back({{"batch", batch},
                    {"plain_tokens_per_second", plain.tokens_per_second()},
                    {"draft_alone_tokens_per_second", draft_alone.tokens_per_second()},
                    {"speculative_tokens_per_second", spec.tokens_per_second()},
                    {"speedup", speedup},
                    {"proposed", spec.stats.proposed},
                    {"accepted", spec.stats.accepted},
                    {"acceptance_rate", acceptance},
                    {"verify_steps", spec.stats.steps},
                    {"tokens_per_verify_step", per_verify},
                    {"draft_cost_relative", draft_cost}});
    nlohmann::json peer;
    if (with_peer) {
      peer = summarize_peer(peer_runs);
      if (!peer.contains("error"))
        peer["nibble_speculative_ratio"] =
            spec.tokens_per_second() / peer["speculative_tokens_per_second"].get<double>();
      rows.back()["peer"] = peer;
    }
    if (!a.json) {
      std::printf("%6d %12.1f %12.1f %12.1f %7.2fx %9.1f%% %12.2f %11.2f\n", batch, plain.tokens_per_second(),
                  draft_alone.tokens_per_second(), spec.tokens_per_second(), speedup, 100.0 * acceptance,
                  per_verify, draft_cost);
      if (with_peer && peer.contains("error")) {
        std::printf("%6s peer: %s\n", "", peer["error"].get<std::string>().c_str());
      } else if (with_peer) {
        std::printf("%6s %12.1f %12.1f %12.1f %7.2fx %9.1f%% %12s %11.2f  llama.cpp %s (llama-speculative)\n",
                    "", peer["plain_tokens_per_second"].get<double>(),
                    peer["draft_alone_tokens_per_second"].get<double>(),
                    peer["speculative_tokens_per_second"].get<double>(), peer["speedup"].get<double>(),
                    100.0 * peer["acceptance_rate"].get<double>(), "",
                    peer["draft_cost_relative"].get<double>(),
                    peer["build_commit"].get<std::string>().c_str());
        std::printf("%6s nibble/llama.cpp: speculative %.2fx, plain %.2fx\n", "",
                    peer["nibble_speculative_ratio"].get<double>(),
                    plain.tokens_per_second() / peer["plain_tokens_per_second"].get<double>());
      }
      std::fflush(stdout);
    }
  }
  if (a.json) {
    std::cout << nlohmann::json{{"target", a.model},
                                {"draft", a.draft},
                                {"device", a.device},
                                {"threads", a.threads},
                                {"gen_tokens", a.gen_tokens},
                                {"max_draft_tokens", a.draft_tokens},
                                {"adaptive", !a.fixed_k},
                                {"repetitions", a.repetitions},
                                {"rows", rows}}
                     .dump(2)
              << "\n";
  }
  return 0;
}

}  // namespace

Runner add_bench_speculative(CLI::App& app) {
  auto a = std::make_shared<Args>();
  app.add_option("--model", a->model, "Target model (GGUF)")->required();
  app.add_option("--draft", a->draft,
                 "Draft model (GGUF) with the target's vocabulary, or ngram: prompt lookup, no draft model")
      ->required();
  app.add_option(
         "--prompts", a->prompts_file,
         "A file of prompts, one a line (batches cycle them; default: eight built-in English openings)")
      ->check(CLI::ExistingFile);
  app.add_option("--ngram-min", a->ngram_min, "--draft ngram: the shortest suffix looked up")
      ->check(CLI::Range(1, 64));
  app.add_option("--ngram-max", a->ngram_max, "--draft ngram: the longest suffix looked up")
      ->check(CLI::Range(1, 64));
  app.add_option("--draft-tokens", a->draft_tokens, "Most tokens proposed per step (k)")
      ->check(CLI::Range(1, 16));
  app.add_option("--batch", a->batches, "Comma-separated batch sizes")->default_val("1,8,32");
  app.add_option("--gen-tokens", a->gen_tokens, "Tokens generated per request")->check(CLI::Range(1, 900));
  app.add_option("--threads", a->threads, "CPU threads")->check(CLI::Range(1, 1024));
  app.add_flag("--fixed-k", a->fixed_k, "Always propose k tokens (no adaptive k, no batch off-switch)");
  app.add_option("--max-batch", a->max_batch, "Largest decode batch that still speculates (adaptive mode)");
  app.add_option("--repetitions", a->repetitions, "Runs of each mode; the median is reported")
      ->check(CLI::Range(1, 100));
  app.add_flag("--json", a->json, "Print one JSON object");
  app.add_option("--device", a->device, "cpu, or cuda (target and draft on one GPU)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--peer", a->peer,
               "At batch 1 also run llama.cpp's speculative decoding (llama-speculative) and plain decoding "
               "(llama-bench) on the same models, prompt, k and threads, and print the ratios");
  app.add_option("--peer-bin", a->peer_bin,
                 "Folder with llama-speculative and llama-bench (tools/build-llama-cpp.sh; default "
                 "$NIBBLE_LLAMA_CPP_BIN or ~/.cache/nibble/llama.cpp/bin)");
  app.add_option("--peer-script", a->peer_script, "The peer driver script");
  return [a] { return run(*a); };
}

}  // namespace nibble::cli
