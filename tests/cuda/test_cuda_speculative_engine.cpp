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
#include "model/random_model.hpp"
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

EngineRun run(worker::ForwardModel& target, const model::Tokenizer& tokenizer, worker::ForwardModel* draft,
              int k) {
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
    r.sampling.temperature = 0.0f;
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
  worker::CudaLlamaModel target_gpu(target_ckpt), other_gpu(model::LlamaCheckpoint::open(other_path));
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

}  // namespace
}  // namespace nibble::cluster
