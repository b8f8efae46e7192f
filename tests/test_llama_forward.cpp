// The forward pass and the generator on project-made models: batching must not change results, and
// generation options (stop strings, seeds, limits) must do what they say.
#include <gtest/gtest.h>

#include <cmath>

#include "kernels/thread_pool.hpp"
#include "model/random_model.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"
#include "worker/generator.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {
namespace {

class ForwardTest : public ::testing::TestWithParam<kernels::DType> {
 protected:
  void SetUp() override {
    path_ = (tmp_.path() / "model.gguf").string();
    model::write_random_llama(path_, model::llama_shape_by_name("tiny"), GetParam(), 7);
    model_ = LlamaModel::load(path_);
  }
  std::vector<int32_t> prompt(int n, int seed) const {
    std::vector<int32_t> ids;
    for (int i = 0; i < n; ++i)
      ids.push_back(3 + (i * 131 + seed * 17) % static_cast<int>(model_->config().n_vocab - 3));
    return ids;
  }
  test::TempDir tmp_;
  std::string path_;
  std::unique_ptr<LlamaModel> model_;
  kernels::ThreadPool pool_{2};
};

TEST_P(ForwardTest, BatchedPrefillEqualsTokenByToken) {
  const auto ids = prompt(21, 1);
  const std::vector<int32_t> table = {0, 1};
  KvCache batched_cache(model_->config(), 2, 16), stepped_cache(model_->config(), 2, 16);
  std::vector<float> batched, stepped, row;
  model_->forward(ForwardBatch::single(ids, 0, table, true), batched_cache, pool_, batched);
  for (size_t i = 0; i < ids.size(); ++i) {
    model_->forward(ForwardBatch::single({ids[i]}, static_cast<int32_t>(i), table, false), stepped_cache,
                    pool_, row);
    stepped.insert(stepped.end(), row.begin(), row.end());
  }
  ASSERT_EQ(batched.size(), stepped.size());
  EXPECT_LT(test::max_relative_rms(stepped, batched, model_->config().n_vocab), 1e-4);
}

TEST_P(ForwardTest, SequencesBatchedTogetherEqualEachAlone) {
  const auto a = prompt(9, 2), b = prompt(23, 3);
  std::vector<float> alone_a, alone_b, together;
  {
    KvCache cache(model_->config(), 4, 16);
    model_->forward(ForwardBatch::single(a, 0, {3}, false), cache, pool_, alone_a);
    model_->forward(ForwardBatch::single(b, 0, {0, 2}, false), cache, pool_, alone_b);
  }
  // One batch, two sequences with their own block tables, both prompts at once.
  ForwardBatch batch;
  batch.max_blocks_per_seq = 2;
  batch.block_tables = {3, 1, 0, 2};
  for (size_t i = 0; i < a.size(); ++i) {
    batch.tokens.push_back(a[i]);
    batch.positions.push_back(static_cast<int32_t>(i));
    batch.seq_index.push_back(0);
  }
  for (size_t i = 0; i < b.size(); ++i) {
    batch.tokens.push_back(b[i]);
    batch.positions.push_back(static_cast<int32_t>(i));
    batch.seq_index.push_back(1);
  }
  batch.logit_rows = {static_cast<int32_t>(a.size() - 1), static_cast<int32_t>(a.size() + b.size() - 1)};
  KvCache cache(model_->config(), 4, 16);
  model_->forward(batch, cache, pool_, together);
  const int64_t v = model_->config().n_vocab;
  EXPECT_LT(test::max_relative_rms(std::vector<float>(together.begin(), together.begin() + v), alone_a, v),
            1e-4);
  EXPECT_LT(test::max_relative_rms(std::vector<float>(together.begin() + v, together.end()), alone_b, v),
            1e-4);
}

TEST_P(ForwardTest, LogitsAreVariedAndFinite) {
  KvCache cache(model_->config(), 2, 16);
  std::vector<float> logits;
  model_->forward(ForwardBatch::single(prompt(5, 4), 0, {0}, true), cache, pool_, logits);
  float lo = logits[0], hi = logits[0];
  for (float x : logits) {
    ASSERT_TRUE(std::isfinite(x));
    lo = std::min(lo, x);
    hi = std::max(hi, x);
  }
  EXPECT_GT(hi - lo, 1e-2f) << "a random model should not produce flat logits";
}

TEST_P(ForwardTest, BadTokensAndPositionsAreRejected) {
  KvCache cache(model_->config(), 1, 16);
  std::vector<float> logits;
  EXPECT_THROW(model_->forward(ForwardBatch::single({-1}, 0, {0}, false), cache, pool_, logits),
               std::invalid_argument);
  const auto too_big = static_cast<int32_t>(model_->config().n_vocab);
  EXPECT_THROW(model_->forward(ForwardBatch::single({too_big}, 0, {0}, false), cache, pool_, logits),
               std::invalid_argument);
  // Position 16 needs a second block the table does not have.
  EXPECT_THROW(model_->forward(ForwardBatch::single({5}, 16, {0}, false), cache, pool_, logits),
               std::invalid_argument);
}

INSTANTIATE_TEST_SUITE_P(Types, ForwardTest,
                         ::testing::Values(kernels::DType::F32, kernels::DType::Q8_0, kernels::DType::Q4_0),
                         [](const auto& param_info) {
                           return std::string(kernels::type_name(param_info.param));
                         });

class GeneratorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = (tmp_.path() / "model.gguf").string();
    model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 11);
    model_ = LlamaModel::load(path);
    tokenizer_ = model::Tokenizer::from_gguf(model_->file());
    generator_ = std::make_unique<Generator>(*model_, *tokenizer_, pool_, 256);
    prompt_ = tokenizer_->encode("Once upon a time there was", true);
  }
  test::TempDir tmp_;
  std::unique_ptr<LlamaModel> model_;
  std::shared_ptr<const model::Tokenizer> tokenizer_;
  kernels::ThreadPool pool_{2};
  std::unique_ptr<Generator> generator_;
  std::vector<int32_t> prompt_;
};

TEST_F(GeneratorTest, MaxTokensIsHonouredAndStreamingAddsUpToTheText) {
  GenerateOptions options;
  options.max_tokens = 12;
  options.ignore_eos = true;
  std::string streamed;
  int calls = 0;
  const auto r = generator_->generate(prompt_, options, [&](const std::string& delta, int32_t) {
    streamed += delta;
    ++calls;
  });
  EXPECT_EQ(r.tokens.size(), 12u);
  EXPECT_EQ(r.finish, FinishReason::length);
  EXPECT_EQ(streamed, r.text);
  EXPECT_GE(calls, 12);
  EXPECT_EQ(r.text, tokenizer_->decode(r.tokens));
}

TEST_F(GeneratorTest, GreedyIsDeterministicAndSeedsReproduce) {
  GenerateOptions greedy;
  greedy.max_tokens = 10;
  greedy.ignore_eos = true;
  EXPECT_EQ(generator_->generate(prompt_, greedy).tokens, generator_->generate(prompt_, greedy).tokens);

  GenerateOptions sampled = greedy;
  sampled.sampling.temperature = 1.5f;
  sampled.sampling.seed = 1;
  const auto first = generator_->generate(prompt_, sampled).tokens;
  EXPECT_EQ(first, generator_->generate(prompt_, sampled).tokens);
  sampled.sampling.seed = 2;
  EXPECT_NE(first, generator_->generate(prompt_, sampled).tokens);
}

TEST_F(GeneratorTest, StopStringEndsGenerationBeforeIt) {
  GenerateOptions options;
  options.max_tokens = 24;
  options.ignore_eos = true;
  const auto full = generator_->generate(prompt_, options);
  ASSERT_GE(full.text.size(), 8u);
  // A stop string taken from the middle of the unconstrained output must cut it there.
  const size_t at = full.text.size() / 2;
  const std::string stop = full.text.substr(at, 3);
  options.stop = {stop};
  std::string streamed;
  const auto r =
      generator_->generate(prompt_, options, [&](const std::string& d, int32_t) { streamed += d; });
  EXPECT_EQ(r.finish, FinishReason::stop);
  EXPECT_EQ(r.text, full.text.substr(0, full.text.find(stop)));
  EXPECT_EQ(streamed, r.text) << "text streamed before the stop matched must not include any of it";
  EXPECT_LT(r.tokens.size(), full.tokens.size());
}

TEST_F(GeneratorTest, OverlongPromptsAndBadOptionsAreRejected) {
  GenerateOptions options;
  options.max_tokens = 8;
  std::vector<int32_t> long_prompt(250, 100);
  EXPECT_THROW(generator_->generate(long_prompt, options), std::invalid_argument);
  EXPECT_THROW(generator_->generate({}, options), std::invalid_argument);
  options.sampling.top_p = 0.0f;
  EXPECT_THROW(generator_->generate(prompt_, options), std::invalid_argument);
  options.sampling.top_p = 1.0f;
  options.stop = {""};
  EXPECT_THROW(generator_->generate(prompt_, options), std::invalid_argument);
}

}  // namespace
}  // namespace nibble::worker
