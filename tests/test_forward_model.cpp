// ForwardModel's sampled pass (forward_sample) on the CPU, and the one-uniform-per-call contract of
// Sampler::sample that lets a device sampler reproduce the host's streams.
#include <gtest/gtest.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/random_model.hpp"
#include "tests/support/test_support.hpp"
#include "worker/forward_model.hpp"
#include "worker/generator.hpp"
#include "worker/sampler.hpp"

namespace nibble::worker {
namespace {

TEST(Sampler, SampleDrawsExactlyOneUniformPerCallAndPicksAsSampleWithUniform) {
  const auto logits = test::random_floats(301, 4, -3.0f, 3.0f);
  for (const SamplingParams& params :
       {SamplingParams{.temperature = 0.7f, .top_k = 20, .seed = 3},
        SamplingParams{.temperature = 1.0f, .top_k = 1, .seed = 3},  // one left
        SamplingParams{.temperature = 0.0f, .seed = 3}}) {           // greedy
    Sampler sampler(params), stream(params);
    for (int i = 0; i < 20; ++i) {
      const double u = stream.uniform();
      EXPECT_EQ(sampler.sample(logits.data(), 301, {}),
                sampler.sample_with_uniform(logits.data(), 301, {}, u));
    }
    EXPECT_EQ(sampler.uniform(), stream.uniform()) << "the streams stay in step";
  }
}

class ForwardModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string path = (tmp_.path() / "model.gguf").string();
    model::write_random_llama(path, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
    model_ = LlamaModel::load(path);
  }
  // Two sequences: a 5-token prompt with logits for its last 2 tokens, a 3-token one with 1.
  ForwardBatch batch() const {
    ForwardBatch b;
    const std::vector<int32_t> first = {3, 17, 29, 101, 7}, second = {9, 250, 4};
    b.add_sequence(first, 0, 0, 2);
    b.add_sequence(second, 0, 1, 1);
    b.block_tables = {0, 1, 2, 3};
    b.max_blocks_per_seq = 2;
    return b;
  }
  test::TempDir tmp_;
  std::unique_ptr<LlamaModel> model_;
  kernels::ThreadPool pool_{2};
};

TEST_F(ForwardModelTest, ForwardSampleDrawsEachRowFromItsLogitsWithItsUniform) {
  CpuForwardModel cpu(*model_, pool_);
  const int64_t n_vocab = cpu.config().n_vocab;
  std::vector<float> logits;
  auto cache = cpu.make_cache(4, 4);
  cpu.forward(batch(), *cache, logits);
  const std::vector<SamplingParams> params = {{.temperature = 0.9f, .top_p = 0.9f, .seed = 1},
                                              {.temperature = 0.0f},
                                              {.temperature = 1.5f, .top_k = 40, .min_p = 0.01f}};
  for (const double base : {0.05, 0.5, 0.95}) {
    const std::vector<double> uniforms = {base, 1.0 - base, base * 0.5};
    std::vector<int32_t> ids;
    auto fresh = cpu.make_cache(4, 4);
    cpu.forward_sample(batch(), *fresh, params, uniforms, ids);
    ASSERT_EQ(ids.size(), 3u);
    for (size_t r = 0; r < ids.size(); ++r) {
      EXPECT_EQ(ids[r],
                Sampler(params[r]).sample_with_uniform(logits.data() + r * n_vocab, n_vocab, {}, uniforms[r]))
          << "row " << r << ", u " << uniforms[r];
    }
    const float* greedy_row = logits.data() + n_vocab;
    EXPECT_EQ(ids[1], std::max_element(greedy_row, greedy_row + n_vocab) - greedy_row);
  }
}

// With a repetition penalty the rows' histories go along: each id is what the host sampler picks from
// the row's logits with that history and uniform. The histories hold each row's unpenalized choice,
// so the penalty must change some of them (it did nothing if it were dropped).
TEST_F(ForwardModelTest, ForwardSampleAppliesTheRepetitionPenaltyWithTheRowsHistories) {
  CpuForwardModel cpu(*model_, pool_);
  const int64_t n_vocab = cpu.config().n_vocab;
  std::vector<float> logits;
  auto cache = cpu.make_cache(4, 4);
  cpu.forward(batch(), *cache, logits);
  std::vector<SamplingParams> params = {{.temperature = 0.0f, .repetition_penalty = 3.0f},
                                        {.temperature = 0.7f, .repetition_penalty = 1.5f, .seed = 2},
                                        {.temperature = 0.0f}};
  const std::vector<double> uniforms = {0.3, 0.6, 0.9};
  std::vector<std::vector<int32_t>> rows_history(3);
  for (int64_t r = 0; r < 3; ++r) {
    const float* row = logits.data() + r * n_vocab;
    const auto top = static_cast<int32_t>(std::max_element(row, row + n_vocab) - row);
    rows_history[static_cast<size_t>(r)] = {5, top, 7, top};  // the top token, twice (penalized once)
  }
  const TokenHistories histories(rows_history.begin(), rows_history.end());
  std::vector<int32_t> ids, plain;
  auto fresh = cpu.make_cache(4, 4);
  cpu.forward_sample(batch(), *fresh, params, uniforms, ids, histories);
  ASSERT_EQ(ids.size(), 3u);
  for (size_t r = 0; r < ids.size(); ++r) {
    EXPECT_EQ(ids[r], Sampler(params[r]).sample_with_uniform(logits.data() + r * n_vocab, n_vocab,
                                                             histories[r], uniforms[r]))
        << "row " << r;
  }
  EXPECT_NE(ids[0], rows_history[0][1]) << "a penalty of 3 on the top logit moves greedy off it";
  EXPECT_EQ(ids[2], rows_history[2][1]) << "no penalty: the history changes nothing";
}

TEST(RepetitionPenalty, PenalizesEachDistinctRecentTokenOnceByTheLlamaCppRule) {
  const SamplingParams p{.repetition_penalty = 2.0f, .repeat_last_n = 4};
  const std::vector<int32_t> history = {1, 2, 9, 3, 3, -1, 9, 50};  // last 4: 3, -1, 9, 50
  const auto ids = [&](const SamplingParams& sp) {
    std::vector<int32_t> out;
    for (const LogitAdjustment& a : logit_adjustments(sp, history, 10)) out.push_back(a.id);
    return out;
  };
  EXPECT_EQ(ids(p), (std::vector<int32_t>{3, 9})) << "window, range, dedup, order";
  EXPECT_TRUE(ids(SamplingParams{.repeat_last_n = 4}).empty()) << "penalty 1";
  EXPECT_TRUE(ids(SamplingParams{.repetition_penalty = 2.0f, .repeat_last_n = 0}).empty());
  EXPECT_FALSE(adjusts_logits(SamplingParams{.repeat_last_n = 4}));
  EXPECT_TRUE(adjusts_logits(p));
  std::vector<float> logits = {0, 1, 2, 4.0f, 4, 5, 6, 7, 8, -3.0f};
  std::vector<float> want = logits;
  want[3] = 2.0f;   // positive: divided
  want[9] = -6.0f;  // negative: multiplied
  apply_logit_adjustments(p, history, logits.data(), 10);
  EXPECT_EQ(logits, want);
}

// llama.cpp's llama_sampler_penalties and logit_bias: bias first, then the repetition penalty, then
// count * frequency + presence subtracted, over the same window; a biased token outside the window
// keeps only its bias; one beyond the vocabulary is skipped.
TEST(LogitAdjustments, BiasThenPenaltiesAsLlamaCpp) {
  const SamplingParams p{.repetition_penalty = 2.0f,
                         .presence_penalty = 0.5f,
                         .frequency_penalty = 0.25f,
                         .repeat_last_n = 5,
                         .logit_bias = {{7, 1.5f}, {3, -4.0f}, {12, 9.0f}}};
  const std::vector<int32_t> history = {7, 7, 3, 3, 3, 1, 1};  // last 5: 3, 3, 3, 1, 1
  const std::vector<LogitAdjustment> got = logit_adjustments(p, history, 10);
  const std::vector<LogitAdjustment> want = {
      {1, 0.0f, 2.0f, 2 * 0.25f + 0.5f}, {3, -4.0f, 2.0f, 3 * 0.25f + 0.5f}, {7, 1.5f, 1.0f, 0.0f}};
  EXPECT_EQ(got, want);
  std::vector<float> logits = {0, 3.0f, 0, 1.0f, 0, 0, 0, 2.0f, 0, 0};
  apply_logit_adjustments(p, history, logits.data(), 10);
  EXPECT_FLOAT_EQ(logits[1], 3.0f / 2 - 1.0f);            // penalized: divided, then 2 x 0.25 + 0.5
  EXPECT_FLOAT_EQ(logits[3], (1.0f - 4.0f) * 2 - 1.25f);  // biased negative first, so multiplied
  EXPECT_FLOAT_EQ(logits[7], 3.5f);                       // outside the window: only its bias
  EXPECT_EQ(logits[0], 0.0f);
  // Presence alone still changes logits; the sampler's distribution is that of the adjusted row.
  const SamplingParams presence{.presence_penalty = 100.0f, .repeat_last_n = 2};
  EXPECT_TRUE(adjusts_logits(presence));
  const std::vector<float> row = {5.0f, 4.0f, 0.0f};
  EXPECT_EQ(Sampler(presence).distribution(row.data(), 3, std::vector<int32_t>{0}).front().id, 1);
  EXPECT_EQ(Sampler(SamplingParams{.logit_bias = {{2, 10.0f}}}).distribution(row.data(), 3, {}).front().id,
            2);
  EXPECT_THROW(validate(SamplingParams{.logit_bias = {{2, 1.0f}, {2, 2.0f}}}), std::invalid_argument);
  EXPECT_THROW(validate(SamplingParams{.logit_bias = {{-1, 1.0f}}}), std::invalid_argument);
  EXPECT_THROW(validate(SamplingParams{.presence_penalty = NAN}), std::invalid_argument);
}

TEST_F(ForwardModelTest, ForwardSampleRejectsWhatItCannotSample) {
  CpuForwardModel cpu(*model_, pool_);
  auto cache = cpu.make_cache(4, 4);
  std::vector<int32_t> ids;
  const std::vector<SamplingParams> three(3, SamplingParams{.temperature = 1.0f});
  const auto message = [&](const std::vector<SamplingParams>& params, const std::vector<double>& uniforms) {
    try {
      cpu.forward_sample(batch(), *cache, params, uniforms, ids);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(three, {0.5, 0.5}).find("2 uniforms for 3 logit rows"), std::string::npos);
  EXPECT_NE(message(three, {0.5, 1.0, 0.5}).find("outside [0, 1)"), std::string::npos);
  std::vector<SamplingParams> penalized = three;
  penalized[2].repetition_penalty = 1.2f;
  EXPECT_NE(message(penalized, {0.5, 0.5, 0.5}).find("logit bias or penalty"), std::string::npos);
  const std::vector<int32_t> history = {3, 17};
  try {
    cpu.forward_sample(batch(), *cache, penalized, {0.5, 0.5, 0.5}, ids, TokenHistories{history, history});
    ADD_FAILURE() << "two histories for three rows were taken";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("2 histories for 3 logit rows"), std::string::npos) << e.what();
  }
  std::vector<SamplingParams> bad = three;
  bad[0].top_p = 0.0f;
  EXPECT_NE(message(bad, {0.5, 0.5, 0.5}).find("top_p"), std::string::npos);
}

// A Generator over a GeneratorModel that returns only ids (as the GPU one does) gives the tokens of
// the host Generator, which samples the logits: greedy, sampled (one uniform per token, none for
// prompt chunks that only fill the cache) and with a repetition penalty (the history goes along),
// greedy or sampled.
TEST_F(ForwardModelTest, GeneratorOnAnIdsOnlyModelGivesTheHostGeneratorsTokens) {
  const auto tokenizer = model::Tokenizer::from_gguf(model_->file());
  const int64_t context = 64;
  CpuForwardModel cpu(*model_, pool_);
  auto cache = cpu.make_cache(Generator::blocks_for(context), Generator::kBlockSize);
  int sample_calls = 0, forward_calls = 0;
  GeneratorModel ids_model;
  ids_model.n_vocab = cpu.config().n_vocab;
  ids_model.forward = [&](const ForwardBatch& b, std::vector<float>& logits) {
    ++forward_calls;
    cpu.forward(b, *cache, logits);
  };
  ids_model.greedy = [&](const ForwardBatch& b, std::vector<int32_t>& ids) {
    cpu.forward_argmax(b, *cache, ids);
  };
  ids_model.sample = [&](const ForwardBatch& b, const std::vector<SamplingParams>& params,
                         const std::vector<double>& uniforms, const TokenHistories& histories,
                         std::vector<int32_t>& ids) {
    ++sample_calls;
    cpu.forward_sample(b, *cache, params, uniforms, ids, histories);
  };
  Generator on_ids(std::move(ids_model), *tokenizer, context);
  Generator on_host(*model_, *tokenizer, pool_, context);
  const std::vector<int32_t> prompt = {1, 45, 99, 3, 120, 7, 2000, 31, 8, 77};
  for (const SamplingParams& sampling :
       {SamplingParams{.temperature = 0.0f}, SamplingParams{.temperature = 0.8f, .top_k = 40, .seed = 11},
        SamplingParams{.temperature = 1.1f, .top_p = 0.9f, .seed = 12},
        SamplingParams{.temperature = 0.8f, .repetition_penalty = 1.2f, .seed = 13},
        SamplingParams{.temperature = 0.0f, .repetition_penalty = 1.5f}}) {
    SCOPED_TRACE("temperature " + std::to_string(sampling.temperature) + ", penalty " +
                 std::to_string(sampling.repetition_penalty));
    GenerateOptions options;
    options.max_tokens = 24;
    options.ignore_eos = true;
    options.prefill_chunk = 4;  // three prompt chunks: only the last one's pass gives a token
    options.sampling = sampling;
    sample_calls = forward_calls = 0;
    EXPECT_EQ(on_ids.generate(prompt, options).tokens, on_host.generate(prompt, options).tokens);
    const bool sampled = sampling.temperature > 0.0f || sampling.repetition_penalty != 1.0f;
    EXPECT_EQ(sample_calls, sampled ? 3 + 23 : 0);  // prompt chunks, then one pass per token but the last
    EXPECT_EQ(forward_calls, 0) << "no logits cross";
  }
}

}  // namespace
}  // namespace nibble::worker
