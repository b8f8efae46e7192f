// `nibble eval ppl` and `nibble eval compare`: a model's perplexity on a text, and what quantizing
// it cost against the base model (KL divergence, top-1 agreement, both perplexities), computed
// the way llama.cpp's llama-perplexity does (worker/evaluation.hpp). `nibble eval imatrix`: the
// importance matrix of a text, as llama-imatrix computes and writes it (worker/importance.hpp).
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/model_session.hpp"
#include "model/imatrix.hpp"
#include "speculative/vocab_match.hpp"
#include "worker/evaluation.hpp"
#include "worker/importance.hpp"

namespace nibble::cli {

namespace {

struct EvalArgs {
  std::string model_path, base_path, text_path, out_path;
  int64_t ctx = 512;
  int64_t max_windows = 0;  // 0: all
  int threads = default_threads();
  bool json = false;
  LoraOption lora, base_lora;  // adapters on --model and --base
  KvCacheOption kv_cache;      // --model's KV cache
};

void add_common_options(CLI::App& sub, EvalArgs& a) {
  sub.add_option("--text", a.text_path, "Text file to evaluate on")->required();
  sub.add_option("--ctx,-c", a.ctx, "Tokens per window (scored on its second half)")
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 20));
  sub.add_option("--chunks", a.max_windows, "Evaluate at most this many windows (0: all)")
      ->check(CLI::NonNegativeNumber);
  sub.add_option("--threads,-t", a.threads, "CPU threads")->check(CLI::PositiveNumber);
  sub.add_flag("--json", a.json, "Print one JSON object");
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read text file: " + path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

std::vector<std::vector<int32_t>> windows_for(const ModelSession& s, const EvalArgs& a) {
  const bool bos = s.tokenizer->add_bos_default();
  const auto tokens = s.tokenizer->encode(read_text_file(a.text_path), bos);
  auto windows = worker::evaluation_windows(
      tokens, a.ctx, bos ? std::optional<int32_t>(s.tokenizer->bos_id()) : std::nullopt);
  if (a.max_windows > 0 && static_cast<int64_t>(windows.size()) > a.max_windows)
    windows.resize(static_cast<size_t>(a.max_windows));
  return windows;
}

// Progress on a terminal only: one line rewritten in place.
worker::EvaluationProgress progress_line() {
  if (!isatty(STDERR_FILENO)) return {};
  return [](int64_t done, int64_t all) {
    std::fprintf(stderr, "\reval: window %lld/%lld", static_cast<long long>(done),
                 static_cast<long long>(all));
    if (done == all) std::fprintf(stderr, "\n");
  };
}

nlohmann::json ppl_json(const worker::PerplexityResult& r) {
  return {
      {"perplexity", r.perplexity()}, {"nll_sum", r.nll_sum}, {"scored", r.scored}, {"windows", r.windows}};
}

int run_ppl(const EvalArgs& a) {
  ModelSession s = ModelSession::open(a.model_path, a.threads);
  apply_lora_option(a.lora, s);
  apply_kv_cache_option(a.kv_cache, s);
  const auto windows = windows_for(s, a);
  const worker::PerplexityResult r = worker::perplexity(*s.model, *s.pool, windows, progress_line());
  if (a.json) {
    nlohmann::json j = ppl_json(r);
    j["model"] = a.model_path;
    j["ctx"] = a.ctx;
    std::cout << j.dump() << "\n";
  } else {
    std::printf("%s\nperplexity %.4f over %lld windows of %lld tokens (%lld tokens scored)\n",
                a.model_path.c_str(), r.perplexity(), static_cast<long long>(r.windows),
                static_cast<long long>(a.ctx), static_cast<long long>(r.scored));
  }
  return 0;
}

int run_compare(const EvalArgs& a) {
  ModelSession base = ModelSession::open(a.base_path, a.threads);
  ModelSession model = ModelSession::open(a.model_path, 1);
  apply_lora_option(a.base_lora, base);
  apply_lora_option(a.lora, model);
  apply_kv_cache_option(a.kv_cache, model);
  // One tokenization for both: the same windows are scored, so the vocabularies must agree (the
  // base model plays the target).
  speculative::check_vocab_match(*base.tokenizer, *model.tokenizer, a.model_path,
                                 "comparing with the base model");
  const auto windows = windows_for(base, a);
  const worker::ComparisonResult r =
      worker::compare_models(*base.model, *model.model, *base.pool, windows, progress_line());
  const double change = r.model.perplexity() / r.base.perplexity() - 1.0;
  if (a.json) {
    nlohmann::json j{{"base", ppl_json(r.base)},    {"model", ppl_json(r.model)},
                     {"perplexity_change", change}, {"mean_kl", r.mean_kl()},
                     {"max_kl", r.kl_max},          {"top1_agreement", r.top1_agreement()},
                     {"scored", r.scored},          {"ctx", a.ctx}};
    j["base"]["path"] = a.base_path;
    j["model"]["path"] = a.model_path;
    std::cout << j.dump() << "\n";
  } else {
    std::printf("%lld windows of %lld tokens, %lld tokens scored\n", static_cast<long long>(r.base.windows),
                static_cast<long long>(a.ctx), static_cast<long long>(r.scored));
    std::printf("perplexity  base %.4f  model %.4f  (%+.2f%%)\n", r.base.perplexity(), r.model.perplexity(),
                100.0 * change);
    std::printf("KL(base || model)  mean %.6f nats  max %.6f\n", r.mean_kl(), r.kl_max);
    std::printf("top-1 agreement  %.2f%%\n", 100.0 * r.top1_agreement());
  }
  return 0;
}

int run_imatrix(const EvalArgs& a) {
  ModelSession s = ModelSession::open(a.model_path, a.threads);
  const auto windows = windows_for(s, a);
  model::ImportanceMatrix imatrix = worker::collect_importance(*s.model, *s.pool, windows, progress_line());
  imatrix.datasets = {std::filesystem::path(a.text_path).filename().string()};
  model::write_imatrix(imatrix, a.out_path);
  std::fprintf(stderr, "wrote %s: %zu matrices, %lld windows of %lld tokens from %s\n", a.out_path.c_str(),
               imatrix.entries.size(), static_cast<long long>(imatrix.chunk_count),
               static_cast<long long>(imatrix.chunk_size), a.text_path.c_str());
  return 0;
}

}  // namespace

Runner add_eval(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  app.require_subcommand(1);
  CLI::App* ppl = app.add_subcommand("ppl", "Perplexity of a model on a text (llama.cpp's method)");
  ppl->add_option("--model,-m", a->model_path, "GGUF model")->required();
  add_lora_option(*ppl, a->lora);
  add_kv_cache_option(*ppl, a->kv_cache);
  add_common_options(*ppl, *a);
  CLI::App* compare = app.add_subcommand(
      "compare", "How far a model's predictions are from a base model's: KL divergence, top-1, perplexities");
  compare->add_option("--base", a->base_path, "The reference model (e.g. F16)")->required();
  compare->add_option("--model,-m", a->model_path, "The model to judge (e.g. its 4-bit quantization)")
      ->required();
  add_lora_option(*compare, a->lora);          // on --model; the base's: --base-lora / --base-lora-scale
  add_kv_cache_option(*compare, a->kv_cache);  // on --model (the base keeps f16)
  compare->add_option("--base-lora", a->base_lora.path, "LoRA adapter applied to every sequence of --base");
  compare->add_option("--base-lora-scale", a->base_lora.scale, "--base-lora's scale (default 1)");
  add_common_options(*compare, *a);
  CLI::App* imatrix = app.add_subcommand(
      "imatrix",
      "The importance matrix of a text (llama-imatrix's statistics and GGUF file): for nibble quantize "
      "--imatrix and llama-quantize --imatrix");
  imatrix->add_option("--model,-m", a->model_path, "GGUF model (F16 or F32, as llama-imatrix takes)")
      ->required();
  imatrix->add_option("--out,-o", a->out_path, "Output imatrix GGUF")->required();
  add_common_options(*imatrix, *a);
  return [a, ppl, imatrix]() {
    if (imatrix->parsed()) return run_imatrix(*a);
    return ppl->parsed() ? run_ppl(*a) : run_compare(*a);
  };
}

}  // namespace nibble::cli
