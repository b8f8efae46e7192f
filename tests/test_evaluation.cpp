// Quality evaluation (worker/evaluation, `nibble eval`): llama.cpp's windows and scoring, an exact
// perplexity for a model whose predictions are uniform, a reference computed token by token with
// the KV cache, and the ordering quantization must show (Q8_0 closer to F32 than Q4_0).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/gguf.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"
#include "worker/evaluation.hpp"

namespace nibble::worker {
namespace {

namespace fs = std::filesystem;

TEST(Evaluation, WindowsAreLlamaCppsChunksWithBosFirst) {
  std::vector<int32_t> tokens(23);
  for (int i = 0; i < 23; ++i) tokens[i] = 100 + i;
  const auto windows = evaluation_windows(tokens, 8, 1);
  ASSERT_EQ(windows.size(), 2u) << "floor(23 / 8) windows; the remainder is not scored";
  EXPECT_EQ(windows[0], (std::vector<int32_t>{1, 101, 102, 103, 104, 105, 106, 107}));
  EXPECT_EQ(windows[1], (std::vector<int32_t>{1, 109, 110, 111, 112, 113, 114, 115}));
  const auto no_bos = evaluation_windows(tokens, 8, std::nullopt);
  EXPECT_EQ(no_bos[1][0], 108);
  try {
    evaluation_windows(tokens, 24, 1);
    FAIL() << "a text shorter than one window was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("23 tokens, fewer than one window of 24"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(evaluation_windows(tokens, 1, 1), std::invalid_argument);
}

// A copy of `in` with every weight of the output head set to zero: every position's logits are
// all 0, so every prediction is uniform and the perplexity is exactly the vocabulary size.
void write_with_zero_head(const model::GgufFile& in, const std::string& out) {
  model::GgufWriter w;
  for (const auto& [key, value] : in.metadata()) w.set(key, value);
  for (const model::GgufTensorInfo& t : in.tensors()) {
    const uint8_t* data = in.tensor_data(t);
    std::vector<uint8_t> bytes(data, data + t.size_bytes);
    if (t.name == "output.weight") std::fill(bytes.begin(), bytes.end(), 0);
    w.add_tensor(t.name, t.dims, t.type, std::move(bytes));
  }
  w.write(out);
}

class EvaluationModels : public ::testing::Test {
 protected:
  void SetUp() override {
    f32_ = (tmp_.path() / "f32.gguf").string();
    model::write_random_llama(f32_, model::llama_shape_by_name("tiny"), kernels::DType::F32, 21);
    auto file = model::GgufFile::open(f32_);
    q8_ = (tmp_.path() / "q8_0.gguf").string();
    q4_ = (tmp_.path() / "q4_0.gguf").string();
    model::requantize_gguf(*file, q8_, kernels::DType::Q8_0, true);
    model::requantize_gguf(*file, q4_, kernels::DType::Q4_0, true);
    // Text-like token ids: a repeating pattern with variations, so the model sees structure.
    for (int i = 0; i < 200; ++i) tokens_.push_back(3 + (i * 37 + (i / 7) * 11) % 300);
  }
  test::TempDir tmp_;
  std::string f32_, q8_, q4_;
  std::vector<int32_t> tokens_;
  kernels::ThreadPool pool_{2};
};

TEST_F(EvaluationModels, UniformPredictionsGiveTheVocabularySizeAsPerplexity) {
  auto file = model::GgufFile::open(f32_);
  const std::string zero = (tmp_.path() / "zero-head.gguf").string();
  write_with_zero_head(*file, zero);
  auto model = LlamaModel::load(zero);
  const auto windows = evaluation_windows(tokens_, 64, 1);
  const PerplexityResult r = perplexity(*model, pool_, windows);
  EXPECT_EQ(r.windows, 3);
  EXPECT_EQ(r.scored, 3 * (64 - 32 - 1)) << "positions ctx/2 .. ctx-2 of each window";
  EXPECT_NEAR(r.perplexity() / static_cast<double>(model->config().n_vocab), 1.0, 1e-9);
}

TEST_F(EvaluationModels, PerplexityMatchesATokenByTokenReference) {
  auto model = LlamaModel::load(f32_);
  const auto windows = evaluation_windows(tokens_, 48, 1);
  const PerplexityResult r = perplexity(*model, pool_, windows);
  // The reference feeds each window one token at a time through the KV cache and scores the
  // second half with a plain double log-softmax.
  const int64_t n_vocab = model->config().n_vocab;
  double nll = 0.0;
  int64_t scored = 0;
  for (const auto& w : windows) {
    KvCache cache(model->shard_config(), 4, 16);
    const std::vector<int32_t> table{0, 1, 2, 3};
    std::vector<float> logits;
    for (int64_t pos = 0; pos + 1 < static_cast<int64_t>(w.size()); ++pos) {
      model->forward(ForwardBatch::single({w[pos]}, static_cast<int32_t>(pos), table, false), cache, pool_,
                     logits);
      if (pos < 24) continue;
      double max = logits[0], sum = 0.0;
      for (int64_t i = 0; i < n_vocab; ++i) max = std::max<double>(max, logits[i]);
      for (int64_t i = 0; i < n_vocab; ++i) sum += std::exp(logits[i] - max);
      nll -= logits[w[pos + 1]] - max - std::log(sum);
      ++scored;
    }
  }
  EXPECT_EQ(r.scored, scored);
  EXPECT_NEAR(r.nll_sum / nll, 1.0, 1e-4) << "batched all-position logits vs one token at a time";
}

TEST_F(EvaluationModels, QuantizationCostsShowInTheRightOrder) {
  auto f32 = LlamaModel::load(f32_);
  auto q8 = LlamaModel::load(q8_);
  auto q4 = LlamaModel::load(q4_);
  const auto windows = evaluation_windows(tokens_, 64, 1);
  const ComparisonResult self = compare_models(*f32, *f32, pool_, windows);
  EXPECT_EQ(self.mean_kl(), 0.0);
  EXPECT_EQ(self.top1_agreement(), 1.0);
  EXPECT_EQ(self.base.nll_sum, self.model.nll_sum);
  const ComparisonResult c8 = compare_models(*f32, *q8, pool_, windows);
  const ComparisonResult c4 = compare_models(*f32, *q4, pool_, windows);
  EXPECT_GT(c8.mean_kl(), 0.0);
  EXPECT_LT(c8.mean_kl() * 10, c4.mean_kl()) << "8-bit must be far closer than 4-bit";
  EXPECT_GE(c8.top1_agreement(), c4.top1_agreement());
  EXPECT_LT(c4.top1_agreement(), 1.0);
  EXPECT_GE(c4.kl_max, c4.mean_kl());
  // The comparison's own perplexities are the plain ones.
  EXPECT_DOUBLE_EQ(c4.model.perplexity(), perplexity(*q4, pool_, windows).perplexity());
  EXPECT_DOUBLE_EQ(c4.base.perplexity(), perplexity(*f32, pool_, windows).perplexity());
}

TEST_F(EvaluationModels, CommandLinePrintsFiguresAndNamesBadInput) {
  // Text the tiny model's synthetic vocabulary tokenizes into a few hundred tokens.
  const fs::path text = tmp_.path() / "text.txt";
  {
    std::ofstream out(text);
    for (int i = 0; i < 40; ++i) out << "the quick brown fox " << i << " jumps over the lazy dog\n";
  }
  const std::string bin = test::nibble_bin();
  const test::CommandResult ppl = test::run_command(bin + " eval ppl -m " + q4_ + " --text " + text.string() +
                                                    " --ctx 64 --threads 2 --json");
  ASSERT_EQ(ppl.exit_code, 0) << ppl.output;
  const auto p = nlohmann::json::parse(ppl.output);
  EXPECT_GT(p["windows"].get<int>(), 1) << p;
  EXPECT_EQ(p["scored"].get<int>(), p["windows"].get<int>() * 31) << p;
  EXPECT_GT(p["perplexity"].get<double>(), 1.0) << p;

  const test::CommandResult cmp =
      test::run_command(bin + " eval compare --base " + f32_ + " -m " + q4_ + " --text " + text.string() +
                        " --ctx 64 --chunks 2 --json");
  ASSERT_EQ(cmp.exit_code, 0) << cmp.output;
  const auto c = nlohmann::json::parse(cmp.output);
  EXPECT_EQ(c["base"]["windows"], 2) << c;
  EXPECT_GT(c["mean_kl"].get<double>(), 0.0) << c;
  EXPECT_LE(c["top1_agreement"].get<double>(), 1.0) << c;
  EXPECT_NEAR(c["perplexity_change"].get<double>(),
              c["model"]["perplexity"].get<double>() / c["base"]["perplexity"].get<double>() - 1.0, 1e-12);

  const test::CommandResult short_text =
      test::run_command(bin + " eval ppl -m " + q4_ + " --text " + text.string() + " --ctx 100000");
  EXPECT_NE(short_text.exit_code, 0);
  EXPECT_NE(short_text.output.find("fewer than one window of 100000"), std::string::npos)
      << short_text.output;
  const test::CommandResult missing =
      test::run_command(bin + " eval ppl -m " + q4_ + " --text " + (tmp_.path() / "nope.txt").string());
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("cannot read text file"), std::string::npos) << missing.output;
  // A model with another vocabulary cannot be compared.
  const std::string other = (tmp_.path() / "other-vocab.gguf").string();
  model::LlamaShape shape = model::llama_shape_by_name("tiny");
  shape.n_vocab += 64;
  model::write_random_llama(other, shape, kernels::DType::Q4_0, 2);
  const test::CommandResult mismatch = test::run_command(bin + " eval compare --base " + f32_ + " -m " +
                                                         other + " --text " + text.string() + " --ctx 64");
  EXPECT_NE(mismatch.exit_code, 0);
  EXPECT_NE(mismatch.output.find(
                "vocabulary has 4160 tokens but the target's has 4096 (comparing with the base model"),
            std::string::npos)
      << mismatch.output;
}

// The trained fixture target against its pure Q4_0 quantization (the project's quantizer).
TEST(EvaluationFixture, FortuneTargetQ4_0CostsShowAgainstF16) {
  const auto fixtures = test::fixtures_dir();
  if (!fixtures) GTEST_SKIP() << "fixtures not found (set NIBBLE_FIXTURES)";
  const fs::path f16 = *fixtures / "models" / "fortune-target-f16.gguf";
  if (!fs::exists(f16)) GTEST_SKIP() << f16 << " is missing";
  test::TempDir tmp;
  const std::string q4 = (tmp.path() / "q4_0.gguf").string();
  model::requantize_gguf(*model::GgufFile::open(f16.string()), q4, kernels::DType::Q4_0, true);
  auto base = LlamaModel::load(f16.string());
  auto quant = LlamaModel::load(q4);
  auto tokenizer = model::Tokenizer::from_gguf(base->file());
  const std::string text =
      "A journey of a thousand miles begins with a single step. The early bird catches the worm, but the "
      "second mouse gets the cheese. Never put off until tomorrow what you can do the day after tomorrow. "
      "You will meet a tall dark stranger. Your lucky number has been disconnected. Today is the first day "
      "of the rest of your life. He who laughs last thinks slowest. A fool and his money are soon parted.";
  kernels::ThreadPool pool(2);
  const auto windows = evaluation_windows(tokenizer->encode(text, true), 32, tokenizer->bos_id());
  const ComparisonResult r = compare_models(*base, *quant, pool, windows);
  EXPECT_GT(r.mean_kl(), 0.0);
  EXPECT_LT(r.mean_kl(), 1.0) << "a 4-bit copy of a trained model is not a different model";
  EXPECT_GT(r.top1_agreement(), 0.5);
  EXPECT_LT(r.base.perplexity(), 1000.0) << "the trained model predicts English fortunes";
}

}  // namespace
}  // namespace nibble::worker
