// Speculative decoding on the GPU end to end (LocalEngine + Speculator over worker::CudaForwardModel,
// target and draft on one device): at temperature 0 the output with a draft equals the output
// without one, and the target as its own draft accepts every token. Both need the GPU forward pass
// to be batch-invariant for a row: a verification scores k + 1 rows of a sequence where plain
// decoding scores one, and the W4A16 GEMV, attention_decode (its split grid depends on the tables'
// capacity, not on the batch) and the elementwise kernels compute each row the same way at any row
// count, so the tokens must be identical, not merely close. Skips without a CUDA device.
#include <gtest/gtest.h>

#include <map>
#include <memory>
#include <vector>

#include "cluster/local_engine.hpp"
#include "model/gguf.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "speculative/speculator.hpp"
#include "tests/cuda/cuda_test_util.hpp"
#include "tests/support/test_support.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/forward_model.hpp"

namespace nibble::cluster {
namespace {

struct EngineRun {
  std::map<uint64_t, std::vector<int32_t>> tokens;
  speculative::SpeculatorStats stats;
};

// sampling: every request's settings (seeded per request); greedy when null.
EngineRun run(worker::ForwardModel& target, const model::Tokenizer& tokenizer, worker::ForwardModel* draft,
              int k, const worker::SamplingParams* sampling = nullptr) {
  SchedulerConfig config;
  config.num_blocks = 256;
  config.block_size = 16;
  config.max_batch_tokens = 128;
  config.prefill_chunk = 32;
  config.context = 512;
  std::unique_ptr<speculative::Speculator> speculator;
  if (draft != nullptr) {
    speculative::SpeculatorSettings settings;
    settings.max_draft_tokens = k;
    settings.num_blocks = 256;
    settings.adaptive = false;
    settings.max_batch = 1000;
    speculator = std::make_unique<speculative::Speculator>(*draft, settings);
  }
  LocalEngine engine(target, tokenizer, config, speculator.get());
  const int64_t n_vocab = target.config().n_vocab;
  for (int i = 0; i < 5; ++i) {
    EngineRequest r;
    r.id = 10 + i;
    r.prompt.push_back(1);
    for (int t = 0; t < 3 + (i * 7) % 29; ++t)
      r.prompt.push_back(static_cast<int32_t>(3 + (i * 131 + t * 17) % (n_vocab - 3)));
    if (sampling != nullptr) {
      r.sampling = *sampling;
      r.sampling.seed = 1000 + static_cast<uint64_t>(i);
    }
    r.limits.max_tokens = 24 - i % 5;
    r.limits.ignore_eos = true;
    EXPECT_EQ(engine.submit(r), Admission::accepted);
  }
  EngineRun out;
  for (int steps = 0; !engine.idle() && steps < 20000; ++steps) {
    for (EngineResult& result : engine.step()) out.tokens[result.id] = result.tokens;
  }
  EXPECT_TRUE(engine.idle());
  if (speculator) out.stats = speculator->stats();
  return out;
}

TEST(CudaSpeculativeEngine, GreedyOutputWithADraftEqualsPlainAndTheTargetAcceptsItself) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  test::TempDir tmp;
  const auto shape = model::llama_shape_by_name("tiny");
  const std::string target_path = (tmp.path() / "target.gguf").string();
  const std::string other_path = (tmp.path() / "other.gguf").string();
  model::write_random_llama(target_path, shape, kernels::DType::Q4_0, 5);
  model::write_random_llama(other_path, shape, kernels::DType::Q4_0, 6);  // an unrelated draft
  const auto target_ckpt = model::LlamaCheckpoint::open(target_path);
  const auto tokenizer = model::Tokenizer::from_gguf(*target_ckpt->gguf());
  // One kernel, the tensor-core GEMV, from 1 to 16 rows (a row's bits do not depend on the other rows
  // of its product): the plain run (batches shrinking to one row) and the verification (k + 1 rows a
  // sequence) differ in kernel only above 16 rows, where the two-tile shape of the same GEMV runs.
  // Timed at load, one row could take another kernel (the half2 GEMV's fp16 sums) than four.
  worker::CudaModelOptions options;
  options.int4_kernels = worker::Int4Kernels::tensor_cores;
  worker::CudaLlamaModel target_gpu(target_ckpt, options),
      other_gpu(model::LlamaCheckpoint::open(other_path), options);
  worker::CudaForwardModel target(target_gpu, 0), other(other_gpu, 0);

  const EngineRun plain = run(target, *tokenizer, nullptr, 0);
  ASSERT_EQ(plain.tokens.size(), 5u);
  for (const int k : {1, 3, 5}) {
    SCOPED_TRACE("k=" + std::to_string(k));
    const EngineRun self = run(target, *tokenizer, &target, k);
    EXPECT_EQ(self.tokens, plain.tokens);
    EXPECT_GT(self.stats.proposed, 0u);
    EXPECT_EQ(self.stats.accepted, self.stats.proposed);  // the target agrees with itself
    const EngineRun unrelated = run(target, *tokenizer, &other, k);
    EXPECT_EQ(unrelated.tokens, plain.tokens);
    EXPECT_LT(unrelated.stats.accepted,
              unrelated.stats.proposed);  // rejections happened and were rolled back
  }
}

// The GPU model without its device sampler: the engine's sampled rows then bring their logits to the
// host (ForwardModel's default forward_stage_sample).
class HostSampled final : public worker::ForwardModel {
 public:
  explicit HostSampled(worker::ForwardModel& inner) : inner_(inner) {}
  const model::LlamaConfig& config() const override { return inner_.config(); }
  const model::LlamaConfig& shard_config() const override { return inner_.shard_config(); }
  bool is_first_stage() const override { return inner_.is_first_stage(); }
  bool is_last_stage() const override { return inner_.is_last_stage(); }
  std::unique_ptr<worker::ForwardCache> make_cache(int64_t num_blocks, int64_t block_size) const override {
    return inner_.make_cache(num_blocks, block_size);
  }
  void forward_stage(const worker::ForwardBatch& batch, worker::ForwardCache& cache, const float* hidden_in,
                     std::vector<float>& out) override {
    inner_.forward_stage(batch, cache, hidden_in, out);
  }

 private:
  worker::ForwardModel& inner_;
};

// Sampled decoding draws each row's id on the device (only ids cross to the host) and gives the
// tokens that sampling the same logits on the host with the same per-request streams gives.
TEST(CudaSpeculativeEngine, SampledDecodingOnTheDeviceEqualsSamplingTheLogitsOnTheHost) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  test::TempDir tmp;
  const std::string path = (tmp.path() / "target.gguf").string();
  model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
  const auto ckpt = model::LlamaCheckpoint::open(path);
  const auto tokenizer = model::Tokenizer::from_gguf(*ckpt->gguf());
  worker::CudaLlamaModel gpu(ckpt);
  worker::CudaForwardModel on_device(gpu, 0);
  HostSampled on_host(on_device);
  worker::SamplingParams sampling;
  sampling.temperature = 0.8f;
  sampling.top_k = 50;
  sampling.top_p = 0.95f;
  const EngineRun device = run(on_device, *tokenizer, nullptr, 0, &sampling);
  const EngineRun host = run(on_host, *tokenizer, nullptr, 0, &sampling);
  ASSERT_EQ(device.tokens.size(), 5u);
  EXPECT_EQ(device.tokens, host.tokens);
  // Sampling, not the argmax: greedy decoding gives other tokens for some request.
  EXPECT_NE(device.tokens, run(on_device, *tokenizer, nullptr, 0).tokens);
}

// Sampled speculation verified on the device (CudaLlamaModel::forward_verify: the target's
// distributions and the acceptance rule there, only ids back) gives the tokens of verifying the same
// logits on the host with the same uniforms; the draft (the target's Q4_0) is accepted often but not
// always, so acceptances, residual draws and bonus draws all run. On the device the draft also keeps
// its distributions there (forward_draft_sample: drawn and kept on the GPU, verified from there),
// where the host run's draft hands them over as host rows. Then the call's argument checks.
TEST(CudaSpeculativeEngine, SampledSpeculationVerifiedOnTheDeviceEqualsVerifyingOnTheHost) {
  NIBBLE_REQUIRE_CUDA_DEVICE();
  test::TempDir tmp;
  const std::string target_path = (tmp.path() / "target.gguf").string();
  const std::string draft_path = (tmp.path() / "draft.gguf").string();
  model::write_random_llama(target_path, model::llama_shape_by_name("tiny"), kernels::DType::Q8_0, 5);
  model::requantize_gguf(*model::GgufFile::open(target_path), draft_path, kernels::DType::Q4_0,
                         /*pure=*/true);
  const auto ckpt = model::LlamaCheckpoint::open(target_path);
  const auto tokenizer = model::Tokenizer::from_gguf(*ckpt->gguf());
  worker::CudaLlamaModel gpu(ckpt);
  worker::CudaLlamaModel draft_gpu(model::LlamaCheckpoint::open(draft_path));
  worker::CudaForwardModel on_device(gpu, 0), draft(draft_gpu, 0);
  HostSampled on_host(on_device);
  ASSERT_TRUE(on_device.verifies_drafts());
  ASSERT_FALSE(on_host.verifies_drafts());
  worker::SamplingParams sampling;
  sampling.temperature = 0.9f;
  sampling.top_p = 0.95f;
  const EngineRun device = run(on_device, *tokenizer, &draft, 3, &sampling);
  const EngineRun host = run(on_host, *tokenizer, &draft, 3, &sampling);
  ASSERT_EQ(device.tokens.size(), 5u);
  EXPECT_EQ(device.tokens, host.tokens);
  EXPECT_EQ(device.stats.accepted, host.stats.accepted);
  EXPECT_GT(device.stats.accepted, 0u);
  EXPECT_LT(device.stats.accepted, device.stats.proposed);

  // Argument checks: rows that do not match the sequences' positions, a greedy row, too few uniforms.
  worker::CudaKvCache cache(gpu.config(), 8, 16);
  const auto batch = worker::ForwardBatch::single({5, 6, 7}, 0, {0, 1}, /*all_logits=*/true);  // 3 rows
  const int64_t n_vocab = gpu.config().n_vocab;
  const std::vector<int32_t> drafts = {6, 7};
  const std::vector<float> q(static_cast<size_t>(2 * n_vocab), 1.0f / static_cast<float>(n_vocab));
  const std::vector<double> us = {0.5, 0.25, 0.75};
  std::vector<int32_t> accepted;
  std::vector<std::vector<int32_t>> tokens;
  worker::VerifySequence seq{sampling, drafts, q, us};
  std::vector<worker::VerifySequence> seqs = {seq};
  gpu.forward_verify(batch, cache, seqs, accepted, tokens);  // well-formed: 2 drafts, 3 rows
  ASSERT_EQ(accepted.size(), 1u);
  ASSERT_EQ(tokens.size(), 1u);
  EXPECT_EQ(tokens[0].size(), static_cast<size_t>(accepted[0] + 1));
  seqs[0].drafts = std::span<const int32_t>(drafts.data(), 1);
  seqs[0].draft_probs = std::span<const float>(q.data(), static_cast<size_t>(n_vocab));
  seqs[0].uniforms = std::span<const double>(us.data(), 2);
  EXPECT_THROW(gpu.forward_verify(batch, cache, seqs, accepted, tokens),
               std::invalid_argument);  // 2 of 3 rows
  seqs[0] = seq;
  seqs[0].params.temperature = 0.0f;
  EXPECT_THROW(gpu.forward_verify(batch, cache, seqs, accepted, tokens), std::invalid_argument);
  seqs[0] = seq;
  seqs[0].uniforms = std::span<const double>(us.data(), 2);
  EXPECT_THROW(gpu.forward_verify(batch, cache, seqs, accepted, tokens), std::invalid_argument);
}

}  // namespace
}  // namespace nibble::cluster
