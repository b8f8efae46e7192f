// Whole-model checks against llama.cpp's reference outputs in the fixtures: greedy tokens through the
// real `nibble generate`, prompt logits through the real `nibble logits`, and decode-step logits
// through the KV-cache path of the library.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/thread_pool.hpp"
#include "tests/support/test_support.hpp"
#include "worker/llama_model.hpp"

namespace nibble {
namespace {

const char* kPrompt = "The quick brown fox jumps over the lazy dog. Once upon a time";
constexpr int kGenerated = 24;
constexpr int64_t kVocab = 32000;

struct Reference {
  std::vector<int32_t> prompt;     // with BOS
  std::vector<int32_t> generated;  // 24 greedy ids
  std::vector<float> logits;       // [prompt + 24, vocab]
};

Reference load_reference(const std::filesystem::path& models, const std::string& name) {
  Reference ref;
  std::ifstream tokens(models / (name + ".tokens"));
  std::string key;
  int64_t n_prompt = 0, n_vocab = 0;
  tokens >> key >> n_prompt >> key >> n_vocab;
  EXPECT_EQ(n_vocab, kVocab);
  int32_t id = 0;
  std::vector<int32_t> all;
  while (tokens >> id) all.push_back(id);
  EXPECT_EQ(all.size(), static_cast<size_t>(n_prompt + kGenerated));
  ref.prompt.assign(all.begin(), all.begin() + n_prompt);
  ref.generated.assign(all.begin() + n_prompt, all.end());
  const auto bytes = test::read_file_bytes(models / (name + ".logits"));
  EXPECT_EQ(bytes.size(), (n_prompt + kGenerated) * kVocab * sizeof(float));
  ref.logits.resize(bytes.size() / sizeof(float));
  std::memcpy(ref.logits.data(), bytes.data(), bytes.size());
  return ref;
}

double relative_rms(const float* got, const float* want, int64_t n) {
  double err = 0.0, norm = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    err += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(err / norm);
}

int64_t argmax(const float* v, int64_t n) { return std::max_element(v, v + n) - v; }

struct Tolerance {
  double max_row_rel_rms;
  double min_argmax_agreement;  // fraction of rows
  bool exact_greedy;            // the 24 greedy tokens must match exactly
};

struct FixtureCase {
  std::string name;
  Tolerance tol;
};

// Why these bounds: F32 is the same function in the same precision (README: < 1e-4). Quantized models
// differ because llama.cpp rounds activations to 8 bits inside its dot products in its own order;
// the README expects ~1e-2, and a wrong dequantization, rope or attention gives ~1.
const FixtureCase kCases[] = {
    {"tiny-llama-f32", {1e-4, 1.0, true}},
    {"tiny-llama-q8_0", {1e-3, 1.0, true}},
    {"tiny-llama-q4_0", {2e-2, 0.95, false}},
    {"small-llama-q4_k_m", {3e-2, 0.9, false}},
};

void PrintTo(const FixtureCase& fc, std::ostream* os) { *os << fc.name; }

class FixtureModel : public ::testing::TestWithParam<FixtureCase> {};

void compare_rows(const std::string& what, const float* got, const float* want, int64_t rows,
                  const Tolerance& tol) {
  int agree = 0;
  double worst = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const double e = relative_rms(got + r * kVocab, want + r * kVocab, kVocab);
    worst = std::max(worst, e);
    EXPECT_LT(e, tol.max_row_rel_rms) << what << " row " << r;
    agree += argmax(got + r * kVocab, kVocab) == argmax(want + r * kVocab, kVocab);
  }
  EXPECT_GE(agree, static_cast<int>(std::ceil(tol.min_argmax_agreement * rows)))
      << what << ": argmax agrees on " << agree << " of " << rows << " rows";
  std::cout << "[ info ] " << what << ": worst row relative RMS " << worst << ", argmax agreement " << agree
            << "/" << rows << "\n";
}

TEST_P(FixtureModel, GreedyTokensThroughCli) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const FixtureCase& fc = GetParam();
  const Reference ref = load_reference(fixtures / "models", fc.name);
  const std::string model = (fixtures / "models" / (fc.name + ".gguf")).string();
  const auto r = test::run_command(test::nibble_bin() + " generate --model " + model + " --prompt '" +
                                   kPrompt + "' --max-tokens 24 --temperature 0 --threads 2 --json");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto json = nlohmann::json::parse(r.output);
  EXPECT_EQ(json["prompt_tokens"].get<std::vector<int32_t>>(), ref.prompt);
  const auto tokens = json["tokens"].get<std::vector<int32_t>>();
  if (fc.tol.exact_greedy) {
    EXPECT_EQ(tokens, ref.generated);
  } else {
    // Quantized rounding may flip a near-tie, after which the continuations legitimately diverge:
    // require the first tokens to agree.
    ASSERT_GE(tokens.size(), 4u);
    EXPECT_TRUE(std::equal(ref.generated.begin(), ref.generated.begin() + 4, tokens.begin()))
        << "first greedy tokens differ";
  }
}

TEST_P(FixtureModel, PromptLogitsThroughCli) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const FixtureCase& fc = GetParam();
  const Reference ref = load_reference(fixtures / "models", fc.name);
  test::TempDir tmp;
  const auto out = tmp.path() / "logits.bin";
  const auto r = test::run_command(test::nibble_bin() + " logits --model " +
                                   (fixtures / "models" / (fc.name + ".gguf")).string() + " --prompt '" +
                                   kPrompt + "' --threads 2 --out " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto bytes = test::read_file_bytes(out);
  ASSERT_EQ(bytes.size(), ref.prompt.size() * kVocab * sizeof(float));
  std::vector<float> got(bytes.size() / sizeof(float));
  std::memcpy(got.data(), bytes.data(), bytes.size());
  compare_rows(fc.name + " prompt", got.data(), ref.logits.data(), static_cast<int64_t>(ref.prompt.size()),
               fc.tol);
}

TEST_P(FixtureModel, DecodeLogitsThroughKvCache) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const FixtureCase& fc = GetParam();
  const Reference ref = load_reference(fixtures / "models", fc.name);
  auto model = worker::LlamaModel::load((fixtures / "models" / (fc.name + ".gguf")).string());
  kernels::ThreadPool pool(2);
  const int64_t n_prompt = static_cast<int64_t>(ref.prompt.size());
  worker::KvCache cache(model->config(), 4, 16);
  // Blocks deliberately out of order: the paged lookup must follow the table.
  const std::vector<int32_t> table = {2, 0, 3};
  std::vector<float> logits;
  model->forward(worker::ForwardBatch::single(ref.prompt, 0, table, false), cache, pool, logits);
  std::vector<float> decode_rows(kGenerated * kVocab);
  std::copy(logits.begin(), logits.end(), decode_rows.begin());
  // Feed llama.cpp's tokens back one at a time, as its reference run did.
  for (int g = 0; g + 1 < kGenerated; ++g) {
    model->forward(
        worker::ForwardBatch::single({ref.generated[g]}, static_cast<int32_t>(n_prompt + g), table, false),
        cache, pool, logits);
    std::copy(logits.begin(), logits.end(), decode_rows.begin() + (g + 1) * kVocab);
  }
  // Row n_prompt-1+g of the reference is the distribution generated token g was drawn from.
  compare_rows(fc.name + " decode", decode_rows.data(), ref.logits.data() + (n_prompt - 1) * kVocab,
               kGenerated, fc.tol);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FixtureModel, ::testing::ValuesIn(kCases), [](const auto& param_info) {
  std::string n = param_info.param.name;
  std::replace(n.begin(), n.end(), '-', '_');
  return n;
});

}  // namespace
}  // namespace nibble
