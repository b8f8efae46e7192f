// check_vocab_match on real GGUF files: random models and vocabulary-only files written here, and
// the llama.cpp fixtures (a trained target/draft pair sharing the Llama-2 vocabulary) when present.
#include <gtest/gtest.h>

#include <filesystem>
#include <memory>
#include <string>

#include "model/gguf.hpp"
#include "model/random_model.hpp"
#include "model/tokenizer.hpp"
#include "speculative/vocab_match.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::speculative {
namespace {

std::shared_ptr<const model::Tokenizer> load(const std::filesystem::path& path) {
  const auto file = model::GgufFile::open(path.string());
  return model::Tokenizer::from_gguf(*file);
}

// A small random Llama (the weights do not matter here, only the synthetic vocabulary).
std::filesystem::path write_model(const test::TempDir& dir, const std::string& name, int64_t n_vocab,
                                  uint64_t seed) {
  model::LlamaShape shape;
  shape.n_embd = 32;
  shape.n_layer = 1;
  shape.n_head = 2;
  shape.n_head_kv = 1;
  shape.n_ff = 64;
  shape.n_vocab = n_vocab;
  shape.n_ctx = 64;
  const auto path = dir.path() / name;
  model::write_random_llama(path.string(), shape, kernels::DType::F32, seed);
  return path;
}

// A vocabulary-only GGUF (all a tokenizer reads) with the given tokens and special ids, as
// write_random_llama writes them.
std::filesystem::path write_vocab(const test::TempDir& dir, const std::string& name,
                                  const model::SyntheticVocab& vocab, uint32_t bos = 1, uint32_t eos = 2) {
  model::GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_string("tokenizer.ggml.model", "llama");
  w.set_string_array("tokenizer.ggml.tokens", vocab.tokens);
  w.set_float_array("tokenizer.ggml.scores", vocab.scores);
  w.set_int32_array("tokenizer.ggml.token_type", vocab.token_types);
  w.set_uint32("tokenizer.ggml.bos_token_id", bos);
  w.set_uint32("tokenizer.ggml.eos_token_id", eos);
  w.set_uint32("tokenizer.ggml.unknown_token_id", 0);
  const auto path = dir.path() / name;
  w.write(path.string());
  return path;
}

// The message check_vocab_match throws for this pair ("" when they match).
std::string mismatch(const model::Tokenizer& target, const model::Tokenizer& draft,
                     const std::string& draft_name = "draft.gguf") {
  try {
    check_vocab_match(target, draft, draft_name);
  } catch (const VocabMismatch& e) {
    return e.what();
  }
  return "";
}

TEST(VocabMatch, RandomModelsWithTheSameVocabularyMatch) {
  test::TempDir dir;
  const auto target = load(write_model(dir, "target.gguf", 512, 1));
  const auto draft = load(write_model(dir, "draft.gguf", 512, 2));
  EXPECT_NO_THROW(check_vocab_match(*target, *draft, "draft.gguf"));
  // A vocabulary-only file with the same tokens matches a whole model too.
  const auto vocab_only = load(write_vocab(dir, "vocab.gguf", model::make_synthetic_vocab(512)));
  EXPECT_NO_THROW(check_vocab_match(*target, *vocab_only, "vocab.gguf"));
}

TEST(VocabMatch, DifferentSizeIsNamed) {
  test::TempDir dir;
  const auto target = load(write_model(dir, "target.gguf", 512, 1));
  const auto draft = load(write_model(dir, "draft.gguf", 400, 1));
  EXPECT_EQ(mismatch(*target, *draft, "small-draft.gguf"),
            "small-draft.gguf: vocabulary has 400 tokens but the target's has 512 "
            "(speculative decoding needs the target's vocabulary)");
  // It is an invalid_argument, for callers that validate configuration generically.
  EXPECT_THROW(check_vocab_match(*target, *draft, "d"), std::invalid_argument);
  // Either way round.
  EXPECT_NE(mismatch(*draft, *target).find("vocabulary has 512 tokens but the target's has 400"),
            std::string::npos);
}

TEST(VocabMatch, DifferentSpecialIdsAreNamed) {
  test::TempDir dir;
  const auto vocab = model::make_synthetic_vocab(400);
  const auto target = load(write_vocab(dir, "target.gguf", vocab));
  const auto bos = load(write_vocab(dir, "bos.gguf", vocab, /*bos=*/0, /*eos=*/2));
  const auto eos = load(write_vocab(dir, "eos.gguf", vocab, /*bos=*/1, /*eos=*/3));
  EXPECT_NE(mismatch(*target, *bos).find("draft.gguf: BOS id is 0 but the target's is 1"), std::string::npos)
      << mismatch(*target, *bos);
  EXPECT_NE(mismatch(*target, *eos).find("draft.gguf: EOS id is 3 but the target's is 2"), std::string::npos)
      << mismatch(*target, *eos);
}

TEST(VocabMatch, FirstDifferentTokenTextIsNamed) {
  test::TempDir dir;
  const auto vocab = model::make_synthetic_vocab(400);
  auto changed = vocab;
  changed.tokens[300] = "foo";
  changed.tokens[350] = "bar";  // a later difference is not the one reported
  const auto target = load(write_vocab(dir, "target.gguf", vocab));
  const auto draft = load(write_vocab(dir, "draft.gguf", changed));
  EXPECT_EQ(mismatch(*target, *draft), "draft.gguf: token 300 is 'foo' but the target's is '" +
                                           vocab.tokens[300] +
                                           "' (speculative decoding needs the target's vocabulary)");

  // Control bytes and quotes are escaped so the message stays one readable line.
  auto odd = vocab;
  odd.tokens[280] = "a\nb'c";
  const auto odd_draft = load(write_vocab(dir, "odd.gguf", odd));
  EXPECT_NE(mismatch(*target, *odd_draft).find("token 280 is 'a\\x0Ab\\x27c'"), std::string::npos)
      << mismatch(*target, *odd_draft);
}

TEST(VocabMatch, FixtureTargetAndDraftShareTheLlama2Vocabulary) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const auto target = load(fixtures / "models" / "fortune-target-f16.gguf");
  const auto draft = load(fixtures / "models" / "fortune-draft-f16.gguf");
  const auto tiny = load(fixtures / "models" / "tiny-llama-f32.gguf");
  ASSERT_EQ(target->n_vocab(), 32000);
  EXPECT_NO_THROW(check_vocab_match(*target, *draft, "fortune-draft-f16.gguf"));
  EXPECT_NO_THROW(check_vocab_match(*target, *tiny, "tiny-llama-f32.gguf"));

  // The synthetic 32000-token vocabulary shares Llama-2's specials and byte tokens (ids 0..258),
  // then differs: the first piece after the bytes is named.
  test::TempDir dir;
  const auto synthetic = load(write_vocab(dir, "synthetic.gguf", model::make_synthetic_vocab(32000)));
  const std::string message = mismatch(*target, *synthetic, "synthetic.gguf");
  EXPECT_EQ(message.rfind("synthetic.gguf: token 259 is '", 0), 0u) << message;

  // A byte-level BPE vocabulary (GPT-2's) is refused by kind before anything else.
  const auto gpt2 = load(fixtures / "tokenizer" / "ggml-vocab-gpt-2.gguf");
  EXPECT_EQ(mismatch(*target, *gpt2, "gpt2.gguf")
                .rfind("gpt2.gguf: tokenizer is byte-level BPE but the target's is SentencePiece", 0),
            0u)
      << mismatch(*target, *gpt2, "gpt2.gguf");
}

}  // namespace
}  // namespace nibble::speculative
