// Speculative decoding end to end in one process (LocalEngine + Speculator): at temperature 0 the
// output with a draft equals the output without one, for any draft and k; the target as its own
// draft accepts everything; a seeded request gives the same tokens alone and batched; rollback
// after rejections and preemption under KV pressure keep all of that true.
#include <gtest/gtest.h>

#include <map>
#include <memory>

#include "cluster/local_engine.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "speculative/rejection_sampler.hpp"
#include "speculative/speculator.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::cluster {
namespace {

struct EngineRun {
  std::map<uint64_t, std::vector<int32_t>> tokens;
  speculative::SpeculatorStats stats;
};

std::vector<EngineRequest> requests(int n, float temperature, int64_t n_vocab, int max_tokens = 24) {
  std::vector<EngineRequest> out;
  for (int i = 0; i < n; ++i) {
    EngineRequest r;
    r.id = 10 + i;
    r.prompt.push_back(1);
    for (int t = 0; t < 3 + (i * 7) % 29; ++t) r.prompt.push_back(3 + (i * 131 + t * 17) % (n_vocab - 3));
    r.sampling.temperature = temperature;
    r.sampling.seed = 1000 + i;
    r.limits.max_tokens = max_tokens - i % 5;
    r.limits.ignore_eos = true;
    out.push_back(r);
  }
  return out;
}

// Runs the requests through an engine; with a draft when `draft` (or `draft_backend`: the draft
// behind another ForwardModel) is set; on `backend` (the target behind another ForwardModel) when
// that is set.
EngineRun run(worker::LlamaModel& target, worker::LlamaModel* draft, const std::vector<EngineRequest>& reqs,
              int k, bool adaptive = false, int64_t num_blocks = 256, worker::ForwardModel* backend = nullptr,
              worker::ForwardModel* draft_backend = nullptr) {
  kernels::ThreadPool pool(2);
  auto tokenizer = model::Tokenizer::from_gguf(target.file());
  SchedulerConfig config;
  config.num_blocks = num_blocks;
  config.block_size = 16;
  config.max_batch_tokens = 128;
  config.prefill_chunk = 32;
  config.context = 512;
  std::unique_ptr<speculative::Speculator> speculator;
  if (draft != nullptr || draft_backend != nullptr) {
    speculative::SpeculatorSettings settings;
    settings.max_draft_tokens = k;
    settings.num_blocks = 256;
    settings.adaptive = adaptive;
    settings.max_batch = 1000;
    speculator = draft_backend != nullptr
                     ? std::make_unique<speculative::Speculator>(*draft_backend, settings)
                     : std::make_unique<speculative::Speculator>(*draft, pool, settings);
  }
  const auto engine = backend != nullptr
                          ? std::make_unique<LocalEngine>(*backend, *tokenizer, config, speculator.get())
                          : std::make_unique<LocalEngine>(target, *tokenizer, pool, config, speculator.get());
  for (const EngineRequest& r : reqs) EXPECT_EQ(engine->submit(r), Admission::accepted);
  EngineRun out;
  for (int steps = 0; !engine->idle() && steps < 20000; ++steps) {
    for (EngineResult& result : engine->step()) out.tokens[result.id] = result.tokens;
  }
  EXPECT_TRUE(engine->idle());
  if (speculator) out.stats = speculator->stats();
  return out;
}

class SpeculativeEngineTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    const auto shape = model::llama_shape_by_name("tiny");
    target_path_ = (tmp_.path() / "target.gguf").string();
    model::write_random_llama(target_path_, shape, kernels::DType::Q8_0, 5);
    other_path_ = (tmp_.path() / "other.gguf").string();
    model::write_random_llama(other_path_, shape, kernels::DType::Q4_0, 6);  // an unrelated draft
    target_ = worker::LlamaModel::load(target_path_);
  }
  test::TempDir tmp_;
  std::string target_path_, other_path_;
  std::unique_ptr<worker::LlamaModel> target_;
};

TEST_P(SpeculativeEngineTest, GreedyOutputIsUnchangedByAnyDraft) {
  const int k = GetParam();
  const auto reqs = requests(6, 0.0f, target_->config().n_vocab);
  const EngineRun plain = run(*target_, nullptr, reqs, 0);
  ASSERT_EQ(plain.tokens.size(), reqs.size());

  // The target as its own draft: every proposal is the target's argmax, so all are accepted.
  auto self = worker::LlamaModel::load(target_path_);
  const EngineRun self_run = run(*target_, self.get(), reqs, k);
  EXPECT_EQ(self_run.tokens, plain.tokens);
  EXPECT_GT(self_run.stats.proposed, 0u);
  EXPECT_EQ(self_run.stats.accepted, self_run.stats.proposed);

  // An unrelated draft: nearly everything rejected and rolled back, same output.
  auto other = worker::LlamaModel::load(other_path_);
  const EngineRun other_run = run(*target_, other.get(), reqs, k);
  EXPECT_EQ(other_run.tokens, plain.tokens);
  EXPECT_LT(other_run.stats.accepted, other_run.stats.proposed);
}

TEST_P(SpeculativeEngineTest, GreedyOutputIsUnchangedUnderPreemption) {
  const int k = GetParam();
  const auto reqs = requests(8, 0.0f, target_->config().n_vocab, 40);
  const EngineRun plain = run(*target_, nullptr, reqs, 0);
  auto draft = worker::LlamaModel::load(target_path_);
  // 12 blocks of 16 for 8 sequences of up to 72 tokens: preemption and recomputation happen.
  const EngineRun tight = run(*target_, draft.get(), reqs, k, false, 12);
  EXPECT_EQ(tight.tokens, plain.tokens);
}

INSTANTIATE_TEST_SUITE_P(DraftTokens, SpeculativeEngineTest, ::testing::Values(1, 3, 5));

// At temperature > 0 the tokens are a function of the seed and the sequence's own acceptance
// history, not of what else is in the batch.
TEST(SpeculativeEngine, SameSeedSameOutputAloneAndBatched) {
  test::TempDir tmp;
  const std::string path = (tmp.path() / "target.gguf").string();
  model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 7);
  auto target = worker::LlamaModel::load(path);
  auto draft = worker::LlamaModel::load(path);
  const auto reqs = requests(5, 0.9f, target->config().n_vocab);
  const EngineRun batched = run(*target, draft.get(), reqs, 4, /*adaptive=*/true);
  for (const EngineRequest& r : reqs) {
    const EngineRun alone = run(*target, draft.get(), {r}, 4, true);
    EXPECT_EQ(alone.tokens.at(r.id), batched.tokens.at(r.id)) << "request " << r.id;
  }
  // And a different seed gives a different sample (the test would be vacuous otherwise).
  std::vector<EngineRequest> reseeded = reqs;
  for (EngineRequest& r : reseeded) r.sampling.seed += 77;
  EXPECT_NE(run(*target, draft.get(), reseeded, 4, true).tokens, batched.tokens);
}

// The CPU model behind another ForwardModel, for the test backends below to add a GPU's abilities to.
class CpuBacked : public worker::ForwardModel {
 public:
  CpuBacked(worker::LlamaModel& model, kernels::ThreadPool& pool) : cpu_(model, pool) {}
  const model::LlamaConfig& config() const override { return cpu_.config(); }
  const model::LlamaConfig& shard_config() const override { return cpu_.shard_config(); }
  bool is_first_stage() const override { return true; }
  bool is_last_stage() const override { return true; }
  std::unique_ptr<worker::ForwardCache> make_cache(int64_t num_blocks, int64_t block_size) const override {
    return cpu_.make_cache(num_blocks, block_size);
  }
  void forward_stage(const worker::ForwardBatch& batch, worker::ForwardCache& cache, const float* hidden_in,
                     std::vector<float>& out) override {
    cpu_.forward_stage(batch, cache, hidden_in, out);
  }

 protected:
  worker::CpuForwardModel cpu_;
};

// A backend that verifies sampled drafts itself (as a GPU does, ForwardModel::forward_verify), here on
// the host: the CPU model's logits, the request's dense distributions and speculative::verify with
// the uniforms the engine drew. It counts the calls, so the test sees the engine take that path.
class SelfVerifyingCpuModel final : public CpuBacked {
 public:
  using CpuBacked::CpuBacked;
  bool verifies_drafts() const override { return true; }
  void forward_stage_verify(const worker::ForwardBatch& batch, worker::ForwardCache& cache,
                            const float* hidden_in, const std::vector<VerifySequence>& seqs,
                            std::vector<int32_t>& accepted,
                            std::vector<std::vector<int32_t>>& tokens) override {
    ++verify_calls;
    std::vector<float> logits;
    cpu_.forward_stage(batch, cache, hidden_in, logits);
    const int64_t n_vocab = config().n_vocab;
    accepted.clear();
    tokens.clear();
    size_t row = 0;
    for (const VerifySequence& seq : seqs) {
      const auto k = static_cast<int64_t>(seq.drafts.size());
      const worker::Sampler sampler(seq.params);
      const std::vector<float> p = speculative::dense_distributions(sampler, logits.data() + row * n_vocab,
                                                                    k + 1, n_vocab, {}, seq.drafts);
      // The draft's rows as the engine gives them: host rows, or rows kept where the draft made them.
      std::vector<float> kept;
      if (seq.kept_probs != nullptr) {
        EXPECT_TRUE(seq.draft_probs.empty());
        seq.kept_probs->copy_to_host(0, k, kept);
        ++kept_verifications;
      }
      const speculative::Verification v = speculative::verify(
          seq.drafts, seq.kept_probs != nullptr ? std::span<const float>(kept) : seq.draft_probs, p, n_vocab,
          seq.uniforms);
      accepted.push_back(v.accepted);
      tokens.push_back(v.tokens);
      row += static_cast<size_t>(k + 1);
    }
    EXPECT_EQ(row, batch.logit_rows.size());
  }
  int verify_calls = 0;
  int kept_verifications = 0;  // sequences verified against rows a draft kept
};

// Rows a host backend keeps, standing in for a GPU's device memory: no device pointer, copied only.
class HostKeptRows final : public worker::KeptRows {
 public:
  HostKeptRows(int64_t rows, int64_t row_size, int& copies)
      : KeptRows(rows, row_size), data(static_cast<size_t>(rows * row_size)), copies_(copies) {}
  const float* device_data() const override { return nullptr; }
  void copy_to_host(int64_t first, int64_t count, std::vector<float>& out) const override {
    if (first < 0 || count < 0 || first + count > rows()) throw std::out_of_range("HostKeptRows");
    ++copies_;
    out.assign(data.begin() + first * row_size(), data.begin() + (first + count) * row_size());
  }
  std::vector<float> data;

 private:
  int& copies_;
};

// A draft that keeps its proposals' distributions (as a GPU does, ForwardModel::forward_draft_sample),
// here on the host: the CPU model's logits, the request's dense distribution, and sample_dense with
// the uniform the engine's draft drew. It counts its passes and the copies of what it kept.
class KeepingCpuDraft final : public CpuBacked {
 public:
  using CpuBacked::CpuBacked;
  bool keeps_draft_distributions() const override { return true; }
  std::shared_ptr<worker::KeptRows> make_kept_rows(int64_t rows) override {
    return std::make_shared<HostKeptRows>(rows, config().n_vocab, copies);
  }
  void forward_draft_sample(const worker::ForwardBatch& batch, worker::ForwardCache& cache,
                            const std::vector<worker::SamplingParams>& params,
                            const std::vector<double>& uniforms, const std::vector<worker::KeptRowRef>& keep,
                            std::vector<int32_t>& ids) override {
    ++draft_passes;
    std::vector<float> logits;
    cpu_.forward(batch, cache, logits);
    const int64_t n_vocab = config().n_vocab;
    ids.clear();
    for (size_t r = 0; r < batch.logit_rows.size(); ++r) {
      EXPECT_EQ(params[r].repetition_penalty, 1.0f);
      const std::vector<float> q = speculative::dense_distribution(
          worker::Sampler(params[r]), logits.data() + static_cast<int64_t>(r) * n_vocab, n_vocab, {});
      ids.push_back(speculative::sample_dense(q.data(), n_vocab, uniforms[r]));
      if (keep[r].rows != nullptr) {
        auto& kept = dynamic_cast<HostKeptRows&>(*keep[r].rows);
        std::copy(q.begin(), q.end(), kept.data.begin() + keep[r].row * n_vocab);
      }
    }
  }
  int draft_passes = 0;
  int copies = 0;  // kept rows copied back to the host (verifications that ran there)
};

// A random tiny target (Q8_0) and its pure Q4_0 requantization as the draft: often accepted, not always.
std::pair<std::unique_ptr<worker::LlamaModel>, std::unique_ptr<worker::LlamaModel>> target_and_its_q4_0(
    const test::TempDir& tmp) {
  const std::string target_path = (tmp.path() / "target.gguf").string();
  const std::string draft_path = (tmp.path() / "draft.gguf").string();
  model::write_random_llama(target_path, model::llama_shape_by_name("tiny"), kernels::DType::Q8_0, 5);
  model::requantize_gguf(*model::GgufFile::open(target_path), draft_path, kernels::DType::Q4_0,
                         /*pure=*/true);
  return {worker::LlamaModel::load(target_path), worker::LlamaModel::load(draft_path)};
}

// The engine's path for a model that verifies drafts itself gives the tokens of its host
// verification (same uniforms, same order), batched, with a draft that is sometimes rejected.
TEST(SpeculativeEngine, AModelThatVerifiesDraftsItselfGivesTheHostVerificationsTokens) {
  test::TempDir tmp;
  const auto [target, draft] = target_and_its_q4_0(tmp);
  const auto reqs = requests(6, 0.8f, target->config().n_vocab);
  const EngineRun host = run(*target, draft.get(), reqs, 3);
  kernels::ThreadPool pool(2);
  SelfVerifyingCpuModel model(*target, pool);
  const EngineRun self = run(*target, draft.get(), reqs, 3, false, 256, &model);
  EXPECT_GT(model.verify_calls, 0);
  EXPECT_EQ(self.tokens, host.tokens);
  EXPECT_GT(self.stats.accepted, 0u);
  EXPECT_LT(self.stats.accepted, self.stats.proposed);  // some drafts were rejected: the residual draws ran
}

// A draft that keeps its distributions where it made them (a GPU draft) gives the proposals, and so
// the tokens, of the host draft: with a target that verifies on its own (it then gets the kept rows,
// not host rows) and with one that verifies on the host (which copies them back); sequences that
// join the batch at different steps make both paths run in one engine.
TEST(SpeculativeEngine, ADraftThatKeepsItsDistributionsGivesTheHostDraftsTokens) {
  test::TempDir tmp;
  const auto [target, draft] = target_and_its_q4_0(tmp);
  std::vector<EngineRequest> reqs = requests(6, 0.8f, target->config().n_vocab);
  // A short greedy request among them: its rows keep nothing, and while it runs the steps verify on
  // the host (the target verifies on its own only when every entry is sampled).
  reqs[1].sampling.temperature = 0.0f;
  reqs[1].limits.max_tokens = 6;
  kernels::ThreadPool pool(2);
  for (const bool target_verifies : {true, false}) {
    SCOPED_TRACE(target_verifies ? "the target verifies on its own" : "the target verifies on the host");
    SelfVerifyingCpuModel self(*target, pool);
    worker::CpuForwardModel plain(*target, pool);
    worker::ForwardModel* backend = target_verifies ? static_cast<worker::ForwardModel*>(&self) : &plain;
    const EngineRun host = run(*target, draft.get(), reqs, 3, false, 256, backend);
    const int host_kept = self.kept_verifications;
    KeepingCpuDraft keeping(*draft, pool);
    const EngineRun kept = run(*target, nullptr, reqs, 3, false, 256, backend, &keeping);
    EXPECT_EQ(kept.tokens, host.tokens);
    EXPECT_GT(kept.stats.accepted, 0u);
    EXPECT_LT(kept.stats.accepted, kept.stats.proposed);  // rejections: residual draws against the kept q
    EXPECT_EQ(host_kept, 0);
    if (target_verifies) {
      EXPECT_GT(keeping.draft_passes, 0);
      EXPECT_GT(self.kept_verifications, 0) << "the target never got the kept rows";
      EXPECT_GT(keeping.copies, 0) << "no step verified kept rows on the host (a step with a plain entry)";
    } else {
      EXPECT_EQ(keeping.draft_passes, 0) << "a host verifier asks for host rows";
      EXPECT_EQ(keeping.copies, 0);
    }
  }
}

// The trained fixture pair: fortune-target with fortune-draft and with its own Q4_0.
TEST(SpeculativeEngine, FortunePairGreedyOutputIsUnchanged) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const std::string target_path = (fixtures / "models" / "fortune-target-f16.gguf").string();
  test::TempDir tmp;
  const std::string q4_path = (tmp.path() / "fortune-target-q4_0.gguf").string();
  model::requantize_gguf(*model::GgufFile::open(target_path), q4_path, kernels::DType::Q4_0, /*pure=*/true);
  auto target = worker::LlamaModel::load(target_path);
  const auto reqs = requests(4, 0.0f, target->config().n_vocab, 32);
  const EngineRun plain = run(*target, nullptr, reqs, 0);
  for (const std::string& draft_path : {(fixtures / "models" / "fortune-draft-f16.gguf").string(), q4_path}) {
    SCOPED_TRACE(draft_path);
    auto draft = worker::LlamaModel::load(draft_path);
    for (int k : {1, 3, 5}) {
      const EngineRun spec = run(*target, draft.get(), reqs, k);
      EXPECT_EQ(spec.tokens, plain.tokens) << "k " << k;
      EXPECT_GT(spec.stats.accepted, 0u) << "a trained draft agrees with its target sometimes";
    }
  }
}

// The per-batch switch for greedy requests, driven by synthetic costs and step timings.
class SpeculationSwitchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = (tmp_.path() / "draft.gguf").string();
    model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 3);
    draft_ = worker::LlamaModel::load(path);
  }
  // A speculator whose cost model says a pass over n tokens costs `target(n)` (the draft a tenth).
  std::unique_ptr<speculative::Speculator> make(double (*target)(int64_t)) {
    speculative::SpeculatorSettings settings;
    settings.max_draft_tokens = 4;
    settings.num_blocks = 16;
    for (int64_t n = 1; n <= 256; n *= 2) {
      settings.costs.target.emplace_back(n, target(n));
      settings.costs.draft.emplace_back(n, 0.1 * target(n));
    }
    return std::make_unique<speculative::Speculator>(*draft_, pool_, settings);
  }
  test::TempDir tmp_;
  kernels::ThreadPool pool_{1};
  std::unique_ptr<worker::LlamaModel> draft_;
};

// Compute-bound (a CPU): a pass costs in proportion to its tokens, so verifying k + 1 tokens per
// sequence can never pay; memory-bound (a GPU): a pass costs the same for up to 64 tokens.
double linear_cost(int64_t n) { return 1e-3 * static_cast<double>(n); }
double flat_cost(int64_t n) { return 1e-3 * std::max<double>(1.0, static_cast<double>(n) / 64.0); }

TEST_F(SpeculationSwitchTest, StartsOffWhereTheCostModelSaysVerificationCannotPay) {
  auto spec = make(linear_cost);
  worker::SamplingParams greedy;
  greedy.temperature = 0.0f;
  // Never warmed up: plain decoding from the first step, speculation only re-tried now and then.
  int speculative_steps = 0;
  for (int step = 0; step < 1200; ++step) {
    const bool on = spec->enabled_for(8);
    speculative_steps += on ? 1 : 0;
    EXPECT_EQ(spec->choose_k(1, greedy, 8) > 0, on);
    // Speculative steps measure slower per token, as the model predicts.
    spec->observe_step(8, on, on ? 0.004 : 0.001, 8);
  }
  EXPECT_GE(speculative_steps, 1) << "a wrong cost model must still be caught by a re-try";
  EXPECT_LE(speculative_steps, 4) << "speculation was warmed up although it cannot pay";
}

TEST_F(SpeculationSwitchTest, ARetryThatMeasuresFasterTurnsSpeculationOn) {
  auto spec = make(linear_cost);
  // The cost model is wrong here: speculative steps are in fact faster per token.
  int speculative_steps = 0;
  for (int step = 0; step < 1600; ++step) {
    const bool on = spec->enabled_for(8);
    speculative_steps += on ? 1 : 0;
    spec->observe_step(8, on, on ? 0.0005 : 0.001, 8);
  }
  EXPECT_GT(speculative_steps, 900) << "the measured switch did not take over";
}

TEST_F(SpeculationSwitchTest, WarmsUpBothModesWhereVerificationIsCheap) {
  auto spec = make(flat_cost);
  worker::SamplingParams greedy;
  greedy.temperature = 0.0f;
  EXPECT_TRUE(spec->enabled_for(8));
  EXPECT_GT(spec->choose_k(1, greedy, 8), 0);
  // Measured slower anyway: after the warm-up of both modes plain decoding wins.
  int late_speculative = 0;
  for (int step = 0; step < 60; ++step) {
    const bool on = spec->enabled_for(8);
    if (step >= 20) late_speculative += on ? 1 : 0;
    spec->observe_step(8, on, on ? 0.004 : 0.001, 8);
  }
  EXPECT_EQ(late_speculative, 0);
}

}  // namespace
}  // namespace nibble::cluster
