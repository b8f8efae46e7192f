// Tokenizer tests: llama.cpp's own test vectors for both tokenizer kinds (fixtures), the fixture
// models' prompt, round trips, streaming decode, and hand-computed encodings on tiny vocabularies
// written with GgufWriter (no fixtures needed).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "model/gguf.hpp"
#include "model/tokenizer.hpp"
#include "model/unicode_utf8.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::model {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Helpers

// Printable form of a test string for failure messages.
std::string escaped(const std::string& s) {
  std::string out;
  for (const char c : s) {
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\r') {
      out += "\\r";
    } else {
      out += c;
    }
  }
  return out;
}

std::string join(const std::vector<int32_t>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i > 0) out += ' ';
    out += std::to_string(ids[i]);
  }
  return out;
}

// True when `s` is entirely complete, well-formed UTF-8 characters.
bool is_complete_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t length = 0;
    if (c < 0x80) {
      length = 1;
    } else if (c >= 0xC2 && c < 0xE0) {
      length = 2;
    } else if (c >= 0xE0 && c < 0xF0) {
      length = 3;
    } else if (c >= 0xF0 && c < 0xF5) {
      length = 4;
    } else {
      return false;
    }
    if (i + length > s.size()) return false;
    for (size_t k = 1; k < length; ++k) {
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    }
    i += length;
  }
  return true;
}

// Feeds `ids` through a StreamingDecoder, checking that no chunk ends inside a character; returns
// the concatenated output including flush().
std::string stream_decode(const Tokenizer& tokenizer, const std::vector<int32_t>& ids,
                          int* empty_pushes = nullptr) {
  StreamingDecoder decoder(tokenizer);
  std::string text;
  for (const int32_t id : ids) {
    const std::string chunk = decoder.push(id);
    EXPECT_TRUE(is_complete_utf8(chunk)) << "chunk after token " << id << " ends inside a character";
    if (chunk.empty() && empty_pushes != nullptr) ++*empty_pushes;
    text += chunk;
  }
  text += decoder.flush();
  return text;
}

std::shared_ptr<const Tokenizer> load_fixture_tokenizer(const fs::path& path) {
  const auto file = GgufFile::open(path.string());
  return Tokenizer::from_gguf(*file);
}

// ---------------------------------------------------------------------------------------------
// llama.cpp test vectors

void check_vectors(const fs::path& vocab_path, TokenizerKind kind) {
  if (!fs::exists(vocab_path)) GTEST_SKIP() << vocab_path << " not found";
  const auto tokenizer = load_fixture_tokenizer(vocab_path);
  ASSERT_EQ(tokenizer->kind(), kind);
  const auto cases = test::read_tokenizer_vectors(vocab_path);
  ASSERT_FALSE(cases.empty());
  int passed = 0;
  for (const test::VectorCase& c : cases) {
    const std::vector<int32_t> got = tokenizer->encode(c.text, /*add_bos=*/false);
    if (got == c.expected) {
      ++passed;
    } else {
      ADD_FAILURE() << "'" << escaped(c.text) << "'\n  expected: " << join(c.expected)
                    << "\n  got:      " << join(got);
    }
  }
  std::printf("%s: %d/%zu vectors match\n", vocab_path.filename().c_str(), passed, cases.size());
}

TEST(TokenizerFixtures, LlamaSpmVectors) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  check_vectors(dir / "tokenizer" / "ggml-vocab-llama-spm.gguf", TokenizerKind::sentencepiece);
}

// Special tokens parsed (parse_special): llama.cpp's tokens for texts holding control tokens' texts
// ("<s>", "</s>", "<|endoftext|>") on both fixture vocabularies (tests/data/tokenizer-special, made by
// llama-cpp-python); without parse_special the same texts are ordinary text (no control token appears).
TEST(TokenizerFixtures, ParseSpecialMatchesLlamaCpp) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  std::ifstream in(test::test_data_dir() / "tokenizer-special" / "vectors.json");
  ASSERT_TRUE(in) << "tests/data/tokenizer-special/vectors.json";
  const auto data = nlohmann::json::parse(in);
  int compared = 0;
  std::map<std::string, std::shared_ptr<const Tokenizer>> tokenizers;
  for (const auto& c : data["cases"]) {
    auto& tok = tokenizers[c["vocab"].get<std::string>()];
    if (tok == nullptr) tok = load_fixture_tokenizer(dir / "tokenizer" / c["vocab"].get<std::string>());
    const std::string text = c["text"].get<std::string>();
    SCOPED_TRACE(c["vocab"].get<std::string>() + " '" + escaped(text) + "'");
    const bool add_bos = c["add_bos"].get<bool>() && tok->add_bos_default();  // llama.cpp's add_special
    EXPECT_EQ(tok->encode(text, add_bos, /*parse_special=*/true), c["ids"].get<std::vector<int32_t>>());
    for (const int32_t id : tok->encode(text, false, /*parse_special=*/false))
      EXPECT_TRUE(id != tok->bos_id() && id != tok->eos_id()) << "a control token from plain text";
    ++compared;
  }
  EXPECT_EQ(compared, 44);
}

TEST(TokenizerFixtures, Gpt2BpeVectors) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  check_vectors(dir / "tokenizer" / "ggml-vocab-gpt-2.gguf", TokenizerKind::byte_bpe);
}

TEST(TokenizerFixtures, SpmRoundTripsTestStrings) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  const fs::path path = dir / "tokenizer" / "ggml-vocab-llama-spm.gguf";
  if (!fs::exists(path)) GTEST_SKIP() << path << " not found";
  const auto tokenizer = load_fixture_tokenizer(path);
  for (const test::VectorCase& c : test::read_tokenizer_vectors(path)) {
    EXPECT_EQ(tokenizer->decode(tokenizer->encode(c.text, false)), c.text) << "'" << escaped(c.text) << "'";
    // BOS decodes to nothing and the space prefix is still removed after it.
    EXPECT_EQ(tokenizer->decode(tokenizer->encode(c.text, true)), c.text) << "'" << escaped(c.text) << "'";
  }
}

TEST(TokenizerFixtures, BpeRoundTripsTestStrings) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  const fs::path path = dir / "tokenizer" / "ggml-vocab-gpt-2.gguf";
  if (!fs::exists(path)) GTEST_SKIP() << path << " not found";
  const auto tokenizer = load_fixture_tokenizer(path);
  for (const test::VectorCase& c : test::read_tokenizer_vectors(path)) {
    EXPECT_EQ(tokenizer->decode(tokenizer->encode(c.text, false)), c.text) << "'" << escaped(c.text) << "'";
  }
}

TEST(TokenizerFixtures, FixtureModelPromptMatchesLlamaCpp) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  std::ifstream tokens_file(dir / "models" / "tiny-llama-f32.tokens");
  ASSERT_TRUE(tokens_file);
  std::string line1, line2, line3;
  std::getline(tokens_file, line1);
  std::getline(tokens_file, line2);
  std::getline(tokens_file, line3);
  ASSERT_EQ(line1, "n_prompt 17");
  std::istringstream ids_in(line3);
  std::vector<int32_t> expected;
  for (int32_t id = 0; expected.size() < 17 && ids_in >> id;) expected.push_back(id);

  const auto tokenizer = load_fixture_tokenizer(dir / "models" / "tiny-llama-f32.gguf");
  EXPECT_EQ(tokenizer->n_vocab(), 32000);
  EXPECT_EQ(tokenizer->bos_id(), 1);
  EXPECT_EQ(tokenizer->eos_id(), 2);
  EXPECT_TRUE(tokenizer->add_bos_default());
  EXPECT_TRUE(tokenizer->is_end_of_generation(2));
  EXPECT_FALSE(tokenizer->is_end_of_generation(1));
  const std::string prompt = "The quick brown fox jumps over the lazy dog. Once upon a time";
  const std::vector<int32_t> ids = tokenizer->encode(prompt, true);
  EXPECT_EQ(ids, expected) << "got " << join(ids) << "\nexpected " << join(expected);
  EXPECT_EQ(tokenizer->decode(ids), prompt);
}

TEST(TokenizerFixtures, StreamingDecoderHoldsBackPartialCharacters) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  const std::string text =
      "h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x99\x82 end";  // "héllo 世界 🙂 end"
  for (const char* name : {"ggml-vocab-llama-spm.gguf", "ggml-vocab-gpt-2.gguf"}) {
    const fs::path path = dir / "tokenizer" / name;
    if (!fs::exists(path)) continue;
    SCOPED_TRACE(name);
    const auto tokenizer = load_fixture_tokenizer(path);
    const std::vector<int32_t> ids = tokenizer->encode(text, tokenizer->add_bos_default());
    int empty_pushes = 0;
    EXPECT_EQ(stream_decode(*tokenizer, ids, &empty_pushes), text);
    EXPECT_EQ(tokenizer->decode(ids), text);
    // The emoji needs several tokens in both vocabularies, so something must have been held back.
    EXPECT_GT(empty_pushes, 0) << join(ids);
  }
}

TEST(TokenizerFixtures, SpmEncodesAFewKilobytesQuickly) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  const auto tokenizer = load_fixture_tokenizer(dir / "models" / "tiny-llama-f32.gguf");
  std::string prompt;
  while (prompt.size() < 8192)
    prompt += "The quick brown fox jumps over the lazy dog, naïvely. Once upon a time! ";
  const auto start = std::chrono::steady_clock::now();
  const auto ids = tokenizer->encode(prompt, true);
  const double ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  std::printf("encoded %zu bytes into %zu tokens in %.2f ms\n", prompt.size(), ids.size(), ms);
  EXPECT_GT(ids.size(), 1000u);
  EXPECT_LT(ms, 500.0) << "encoding 8 KB took " << ms << " ms";
  EXPECT_EQ(tokenizer->decode(ids), prompt);
}

// ---------------------------------------------------------------------------------------------
// Tiny vocabularies written with GgufWriter

constexpr int kSpmByteBase = 3;   // <0x00> is token 3
std::string spm(const char* s) {  // "▁" written as '_' for readability
  std::string out;
  for (const char* p = s; *p; ++p) out += (*p == '_') ? std::string("\xE2\x96\x81") : std::string(1, *p);
  return out;
}

struct TinySpm {
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  int32_t add(const std::string& text, float score, int32_t type = 1) {
    tokens.push_back(text);
    scores.push_back(score);
    types.push_back(type);
    return static_cast<int32_t>(tokens.size() - 1);
  }
};

// <unk> <s> </s>, the 256 byte tokens, then a handful of pieces with scores chosen so that the
// highest-score merge order differs from left-to-right or longest-match tokenization.
TinySpm tiny_spm_vocab() {
  TinySpm v;
  v.add("<unk>", 0, 2);
  v.add("<s>", 0, 3);
  v.add("</s>", 0, 3);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    v.add(name, 0, 6);
  }
  v.add(spm("_"), -5);   // 259
  v.add("a", -6);        // 260
  v.add("b", -6);        // 261
  v.add("c", -6);        // 262
  v.add("ab", -1);       // 263
  v.add("bc", -2);       // 264
  v.add(spm("_a"), -3);  // 265
  v.add("abc", -0.5f);   // 266
  v.add("aa", -1.5f);    // 267
  return v;
}

void write_spm(GgufWriter& w, const TinySpm& v) {
  w.set_string("general.architecture", "llama");
  w.set_string("tokenizer.ggml.model", "llama");
  w.set_string_array("tokenizer.ggml.tokens", v.tokens);
  w.set_float_array("tokenizer.ggml.scores", v.scores);
  w.set_int32_array("tokenizer.ggml.token_type", v.types);
  w.set_uint32("tokenizer.ggml.bos_token_id", 1);
  w.set_uint32("tokenizer.ggml.eos_token_id", 2);
  w.set_uint32("tokenizer.ggml.unknown_token_id", 0);
}

std::shared_ptr<const Tokenizer> open_written(const test::TempDir& tmp, const GgufWriter& w,
                                              const std::string& name = "vocab.gguf") {
  const std::string path = (tmp.path() / name).string();
  w.write(path);
  const auto file = GgufFile::open(path);
  return Tokenizer::from_gguf(*file);
}

TEST(TokenizerSpm, MergesHighestScoreFirst) {
  test::TempDir tmp;
  GgufWriter w;
  write_spm(w, tiny_spm_vocab());
  const auto tok = open_written(tmp, w);
  EXPECT_EQ(tok->kind(), TokenizerKind::sentencepiece);
  EXPECT_TRUE(tok->add_bos_default());
  // "▁abc": ab (-1) first, then abc (-0.5); "▁a" (-3) never gets its turn.
  EXPECT_EQ(tok->encode("abc", false), (std::vector<int32_t>{259, 266}));
  // Equal scores: the leftmost "aa" wins, leaving "▁ aa a".
  EXPECT_EQ(tok->encode("aaa", false), (std::vector<int32_t>{259, 267, 260}));
  // Spaces become "▁"; "▁b" is no token, so "▁" and "b" stay apart.
  EXPECT_EQ(tok->encode("a b", false), (std::vector<int32_t>{265, 259, 261}));
  EXPECT_EQ(tok->encode("", false), (std::vector<int32_t>{}));
  EXPECT_EQ(tok->encode("", true), (std::vector<int32_t>{1}));
}

TEST(TokenizerSpm, BosAndDecode) {
  test::TempDir tmp;
  GgufWriter w;
  write_spm(w, tiny_spm_vocab());
  const auto tok = open_written(tmp, w);
  EXPECT_EQ(tok->encode("abc", true), (std::vector<int32_t>{1, 259, 266}));
  EXPECT_EQ(tok->decode({1, 259, 266}), "abc");
  EXPECT_EQ(tok->decode({259, 266}), "abc");
  EXPECT_EQ(tok->decode({1, 265, 259, 261, 2}), "a b");
  EXPECT_EQ(tok->token_bytes(1), "");
  EXPECT_EQ(tok->token_bytes(265), " a");
  EXPECT_EQ(tok->token_text(265), spm("_a"));
  EXPECT_TRUE(tok->is_end_of_generation(2));
}

TEST(TokenizerSpm, ByteFallbackForUnknownCharacters) {
  test::TempDir tmp;
  GgufWriter w;
  write_spm(w, tiny_spm_vocab());
  const auto tok = open_written(tmp, w);
  // "é" (C3 A9) is no token: it goes out as two byte tokens.
  const std::vector<int32_t> ids = tok->encode("a\xC3\xA9", false);
  EXPECT_EQ(ids, (std::vector<int32_t>{265, kSpmByteBase + 0xC3, kSpmByteBase + 0xA9}));
  EXPECT_EQ(tok->token_bytes(kSpmByteBase + 0xC3), "\xC3");
  EXPECT_EQ(tok->decode(ids), "a\xC3\xA9");

  // Streaming: "€" (E2 82 AC) arrives in three byte tokens and comes out whole with the last one.
  StreamingDecoder stream(*tok);
  EXPECT_EQ(stream.push(1), "");
  EXPECT_EQ(stream.push(265), "a");
  EXPECT_EQ(stream.push(kSpmByteBase + 0xE2), "");
  EXPECT_EQ(stream.push(kSpmByteBase + 0x82), "");
  EXPECT_EQ(stream.push(kSpmByteBase + 0xAC), "\xE2\x82\xAC");
  EXPECT_EQ(stream.push(kSpmByteBase + 0xF0), "");
  EXPECT_EQ(stream.flush(), "\xEF\xBF\xBD");  // a truncated character ends as U+FFFD
  EXPECT_EQ(stream.flush(), "");
  // A byte that can never start a character (a lead byte followed by a non-continuation) is
  // replaced at once, so streamed text is always valid UTF-8.
  EXPECT_EQ(stream.push(kSpmByteBase + 0xC3), "");
  EXPECT_EQ(stream.push(265), "\xEF\xBF\xBD a");  // 265 is "▁a": mid-text, its space stays
}

TEST(TokenizerSpm, SpacePrefixCanBeTurnedOff) {
  test::TempDir tmp;
  GgufWriter w;
  write_spm(w, tiny_spm_vocab());
  w.set_bool("tokenizer.ggml.add_space_prefix", false);
  const auto tok = open_written(tmp, w);
  EXPECT_EQ(tok->encode("abc", false), (std::vector<int32_t>{266}));
  EXPECT_EQ(tok->decode({259, 266}), " abc");  // nothing to strip without the prefix
}

TEST(TokenizerSpm, UserDefinedTokensAreCutOutFirst) {
  test::TempDir tmp;
  TinySpm v = tiny_spm_vocab();
  const int32_t user = v.add("<tool>", 0, 4);
  GgufWriter w;
  write_spm(w, v);
  const auto tok = open_written(tmp, w);
  // The text after a user-defined token gets the space prefix again.
  EXPECT_EQ(tok->encode("abc<tool>abc", false), (std::vector<int32_t>{259, 266, user, 259, 266}));
  EXPECT_EQ(tok->token_bytes(user), "<tool>");
}

// Control tokens' texts are cut out only with parse_special; the text after one gets the space prefix,
// as after a user-defined token.
TEST(TokenizerSpm, ControlTokensAreParsedOnlyWhenAsked) {
  test::TempDir tmp;
  TinySpm v = tiny_spm_vocab();
  const int32_t end = v.add("<end>", 0, 3);
  GgufWriter w;
  write_spm(w, v);
  const auto tok = open_written(tmp, w);
  EXPECT_EQ(tok->encode("abc<end>abc", false, true), (std::vector<int32_t>{259, 266, end, 259, 266}));
  const std::vector<int32_t> plain = tok->encode("abc<end>abc", false);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), end), 0);
  EXPECT_GT(plain.size(), 5u);
}

// Byte-level BPE: tokens 0..255 are the byte characters in byte order, then merged pieces.
struct TinyBpe {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<std::string> merges = {"a b",
                                     "\xC4\xA0 a",
                                     "\xC4\xA0"
                                     "a b",
                                     "3 4",
                                     "1 2",
                                     "12 3"};
  int32_t eot = -1;
  TinyBpe() {
    for (int b = 0; b < 256; ++b) add(utf8::byte_to_unicode(static_cast<uint8_t>(b)));
    add("ab");  // 256
    add("\xC4\xA0"
        "a");  // 257 "Ġa"
    add("\xC4\xA0"
        "ab");                      // 258 "Ġab"
    add("34");                      // 259
    add("12");                      // 260
    add("123");                     // 261
    eot = add("<|endoftext|>", 3);  // 262
  }
  int32_t add(const std::string& text, int32_t type = 1) {
    tokens.push_back(text);
    types.push_back(type);
    return static_cast<int32_t>(tokens.size() - 1);
  }
};

void write_bpe(GgufWriter& w, const TinyBpe& v, const std::string& pre) {
  w.set_string("general.architecture", "gpt2");
  w.set_string("tokenizer.ggml.model", "gpt2");
  if (!pre.empty()) w.set_string("tokenizer.ggml.pre", pre);
  w.set_string_array("tokenizer.ggml.tokens", v.tokens);
  w.set_int32_array("tokenizer.ggml.token_type", v.types);
  w.set_string_array("tokenizer.ggml.merges", v.merges);
  w.set_uint32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(v.eot));
  w.set_uint32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(v.eot));
}

TEST(TokenizerBpe, MergesByRankWithGpt2PreTokenizer) {
  test::TempDir tmp;
  TinyBpe v;
  GgufWriter w;
  write_bpe(w, v, "gpt-2");
  const auto tok = open_written(tmp, w);
  EXPECT_EQ(tok->kind(), TokenizerKind::byte_bpe);
  EXPECT_FALSE(tok->add_bos_default());
  // Words "ab" and " ab" = "Ġab": "a b" (rank 0) beats "Ġ a" (rank 1), and "Ġ ab" is no merge,
  // so the "Ġab" token is never reached.
  EXPECT_EQ(tok->encode("ab ab", false), (std::vector<int32_t>{256, ' ', 256}));
  // One word "12345": "3 4" (rank 3) goes before "1 2" (rank 4), which blocks "12 3".
  EXPECT_EQ(tok->encode("12345", false), (std::vector<int32_t>{260, 259, '5'}));
  // A character without a token of its own is its byte characters: "é" = C3 A9.
  EXPECT_EQ(tok->encode("\xC3\xA9", false), (std::vector<int32_t>{0xC3, 0xA9}));
  EXPECT_EQ(tok->encode("ab", true), (std::vector<int32_t>{v.eot, 256}));
  EXPECT_EQ(tok->decode({v.eot, 256, ' ', 256, 0xC3, 0xA9}), "ab ab\xC3\xA9");
  EXPECT_EQ(tok->token_bytes(v.eot), "");
  EXPECT_EQ(tok->token_bytes(257), " a");
  EXPECT_TRUE(tok->is_end_of_generation(v.eot));
  // Special tokens in plain text are just text.
  const auto ids = tok->encode("<|endoftext|>", false);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), v.eot), 0);
  EXPECT_EQ(tok->decode(ids), "<|endoftext|>");
}

TEST(TokenizerBpe, Llama3PreTokenizerSplitsDigitsAndSkipsMergesForWholeTokens) {
  test::TempDir tmp;
  TinyBpe v;
  GgufWriter w;
  write_bpe(w, v, "llama-bpe");
  const auto tok = open_written(tmp, w);
  EXPECT_TRUE(tok->add_bos_default());  // llama3 pre-tokenizer: BOS by default
  // Digits go in groups of at most three: "123" and "45".
  EXPECT_EQ(tok->encode("12345", false), (std::vector<int32_t>{261, '4', '5'}));
  // " ab" is a token, so it is taken whole (ignore_merges).
  EXPECT_EQ(tok->encode("ab ab", false), (std::vector<int32_t>{256, 258}));
}

TEST(TokenizerBpe, StreamingDecoderOnByteLevelPieces) {
  test::TempDir tmp;
  TinyBpe v;
  GgufWriter w;
  write_bpe(w, v, "gpt-2");
  const auto tok = open_written(tmp, w);
  const std::string text = "h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C \xF0\x9F\x99\x82";
  const auto ids = tok->encode(text, false);
  int empty_pushes = 0;
  EXPECT_EQ(stream_decode(*tok, ids, &empty_pushes), text);
  EXPECT_GT(empty_pushes, 0);
}

// ---------------------------------------------------------------------------------------------
// Bad metadata

template <typename Edit>
std::string load_error(Edit edit) {
  test::TempDir tmp;
  GgufWriter w;
  edit(w);
  try {
    open_written(tmp, w);
  } catch (const GgufError& e) {
    return e.what();
  }
  return "(no GgufError)";
}

TEST(TokenizerErrors, BadVocabularyMetadataIsAGgufError) {
  const TinySpm spm_vocab = tiny_spm_vocab();
  EXPECT_NE(load_error([&](GgufWriter& w) {
              write_spm(w, spm_vocab);
              w.set_string("tokenizer.ggml.model", "wordpiece-9000");
            }).find("wordpiece-9000"),
            std::string::npos);
  EXPECT_NE(load_error([&](GgufWriter& w) {
              w.set_string("general.architecture", "llama");
              w.set_string("tokenizer.ggml.model", "llama");
            }).find("tokenizer.ggml.tokens"),
            std::string::npos);
  EXPECT_NE(load_error([&](GgufWriter& w) {
              write_spm(w, spm_vocab);
              w.set_float_array("tokenizer.ggml.scores", {0.0f, 1.0f});
            }).find("tokenizer.ggml.scores"),
            std::string::npos);
  EXPECT_NE(load_error([&](GgufWriter& w) {
              write_spm(w, spm_vocab);
              w.set_int32_array("tokenizer.ggml.token_type", {1, 1, 1});
            }).find("tokenizer.ggml.token_type"),
            std::string::npos);
  EXPECT_NE(load_error([&](GgufWriter& w) {
              write_spm(w, spm_vocab);
              w.set_uint32("tokenizer.ggml.bos_token_id", 100000);
            }).find("tokenizer.ggml.bos_token_id"),
            std::string::npos);
  EXPECT_NE(load_error([&](GgufWriter& w) {
              w.set_string("general.architecture", "llama");
            }).find("tokenizer.ggml.model"),
            std::string::npos);

  const TinyBpe bpe_vocab;
  EXPECT_NE(load_error([&](GgufWriter& w) { write_bpe(w, bpe_vocab, "klingon-bpe"); }).find("klingon-bpe"),
            std::string::npos);
  EXPECT_NE(load_error([&](GgufWriter& w) {
              TinyBpe no_merges = bpe_vocab;
              w.set_string("tokenizer.ggml.model", "gpt2");
              w.set_string_array("tokenizer.ggml.tokens", no_merges.tokens);
            }).find("tokenizer.ggml.merges"),
            std::string::npos);
}

TEST(TokenizerErrors, OutOfRangeIdsThrow) {
  test::TempDir tmp;
  GgufWriter w;
  write_spm(w, tiny_spm_vocab());
  const auto tok = open_written(tmp, w);
  EXPECT_THROW(tok->token_bytes(-1), std::out_of_range);
  EXPECT_THROW(tok->token_bytes(tok->n_vocab()), std::out_of_range);
  EXPECT_THROW(tok->token_text(tok->n_vocab()), std::out_of_range);
  EXPECT_FALSE(tok->is_end_of_generation(-5));
}

}  // namespace
}  // namespace nibble::model
