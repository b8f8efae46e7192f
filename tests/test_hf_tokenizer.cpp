// tokenizer.json: a Hugging Face tokenizer written here from each GGUF vocabulary fixture (as
// transformers' converters would write it) encodes llama.cpp's test vectors to the same ids;
// unsupported or malformed files are refused naming the problem; `nibble generate` runs on an HF
// directory once it has a tokenizer.json.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "model/gguf.hpp"
#include "model/hf_checkpoint.hpp"
#include "model/hf_tokenizer.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::model {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kSpace = "\xE2\x96\x81";

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// The tokenizer of `dir`/tokenizer.json written as GGUF metadata (as `nibble quantize` writes it for an
// HF checkpoint) and read back from that file.
std::shared_ptr<const Tokenizer> tokenizer_through_gguf(const fs::path& dir) {
  GgufWriter writer;
  for (const auto& [key, value] : hf_tokenizer_gguf_metadata(dir.string())) writer.set(key, value);
  const fs::path path = dir / "vocab.gguf";
  writer.write(path.string());
  return Tokenizer::from_gguf(*GgufFile::open(path.string()));
}

void check_vectors_through_json(const fs::path& vocab_path, TokenizerKind kind) {
  if (!fs::exists(vocab_path)) GTEST_SKIP() << vocab_path << " not found";
  const auto file = GgufFile::open(vocab_path.string());
  const auto reference = Tokenizer::from_gguf(*file);
  test::TempDir tmp;
  write_text(tmp.path() / "tokenizer.json", test::tokenizer_json_of(*file));
  // BOS / EOS by text, as tokenizer_config.json names them.
  json config = json::object();
  if (reference->bos_id() >= 0) config["bos_token"] = reference->token_text(reference->bos_id());
  if (reference->eos_id() >= 0)
    config["eos_token"] = {{"content", reference->token_text(reference->eos_id())}};
  write_text(tmp.path() / "tokenizer_config.json", config.dump());
  const auto tokenizer = load_hf_tokenizer(tmp.path().string());
  ASSERT_NE(tokenizer, nullptr);
  ASSERT_EQ(tokenizer->kind(), kind);
  ASSERT_EQ(tokenizer->n_vocab(), reference->n_vocab());
  EXPECT_EQ(tokenizer->bos_id(), reference->bos_id());
  EXPECT_EQ(tokenizer->eos_id(), reference->eos_id());
  EXPECT_EQ(tokenizer->add_bos_default(), reference->add_bos_default());
  // The same tokenizer as GGUF metadata.
  const auto via_gguf = tokenizer_through_gguf(tmp.path());
  ASSERT_EQ(via_gguf->kind(), kind);
  ASSERT_EQ(via_gguf->n_vocab(), reference->n_vocab());
  EXPECT_EQ(via_gguf->bos_id(), reference->bos_id());
  EXPECT_EQ(via_gguf->eos_id(), reference->eos_id());
  EXPECT_EQ(via_gguf->add_bos_default(), reference->add_bos_default());
  EXPECT_EQ(via_gguf->add_space_prefix(), reference->add_space_prefix());
  const auto cases = test::read_tokenizer_vectors(vocab_path);
  ASSERT_FALSE(cases.empty());
  int passed = 0;
  for (const test::VectorCase& c : cases) {
    const std::vector<int32_t> got = tokenizer->encode(c.text, /*add_bos=*/false);
    EXPECT_EQ(got, c.expected) << "'" << c.text << "'";
    passed += got == c.expected;
    EXPECT_EQ(tokenizer->decode(got), reference->decode(c.expected)) << "'" << c.text << "'";
    EXPECT_EQ(via_gguf->encode(c.text, false), c.expected) << "GGUF metadata: '" << c.text << "'";
  }
  std::printf("%s via tokenizer.json: %d/%zu vectors match\n", vocab_path.filename().c_str(), passed,
              cases.size());
}

TEST(HfTokenizer, LlamaSpmVectorsThroughTokenizerJson) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  check_vectors_through_json(dir / "tokenizer" / "ggml-vocab-llama-spm.gguf", TokenizerKind::sentencepiece);
}

TEST(HfTokenizer, Gpt2VectorsThroughTokenizerJson) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  check_vectors_through_json(dir / "tokenizer" / "ggml-vocab-gpt-2.gguf", TokenizerKind::byte_bpe);
}

// Llama 3's shape: Split with Llama 3's regex, then ByteLevel without its own regex. On the GPT-2
// vocabulary the regex shows itself: digits are cut in threes, and BOS is added by default.
TEST(HfTokenizer, Llama3StyleSplitThenByteLevel) {
  NIBBLE_REQUIRE_FIXTURES(dir);
  const fs::path path = dir / "tokenizer" / "ggml-vocab-gpt-2.gguf";
  if (!fs::exists(path)) GTEST_SKIP() << path << " not found";
  const auto file = GgufFile::open(path.string());
  json root = json::parse(test::tokenizer_json_of(*file));
  root["pre_tokenizer"] = {{"type", "Sequence"},
                           {"pretokenizers",
                            {{{"type", "Split"},
                              {"pattern",
                               {{"Regex",
                                 "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                 "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                                 "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}},
                              {"behavior", "Isolated"}},
                             {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  test::TempDir tmp;
  write_text(tmp.path() / "tokenizer.json", root.dump());
  write_text(tmp.path() / "tokenizer_config.json", R"({"bos_token": "<|endoftext|>"})");
  const auto tok = load_hf_tokenizer(tmp.path().string());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->kind(), TokenizerKind::byte_bpe);
  EXPECT_TRUE(tok->add_bos_default());
  const std::vector<int32_t> ids = tok->encode("1234567", false);
  std::vector<std::string> pieces;
  for (const int32_t id : ids) pieces.push_back(tok->token_bytes(id));
  EXPECT_EQ(pieces, (std::vector<std::string>{"123", "456", "7"}));
  // As GGUF metadata: the Llama 3 pre-tokenizer and its default BOS survive.
  const auto via_gguf = tokenizer_through_gguf(tmp.path());
  EXPECT_TRUE(via_gguf->add_bos_default());
  EXPECT_EQ(via_gguf->encode("1234567", false), ids);
}

TEST(HfTokenizer, TinyLlamaStyleEncodesWithMerges) {
  test::TempDir tmp;
  write_text(tmp.path() / "tokenizer.json", test::tiny_llama_tokenizer_json(192));
  write_text(tmp.path() / "tokenizer_config.json", R"({"add_bos_token": true, "bos_token": "<s>",
      "eos_token": {"content": "</s>"}})");
  const auto tok = load_hf_tokenizer(tmp.path().string());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->kind(), TokenizerKind::sentencepiece);
  EXPECT_EQ(tok->n_vocab(), 192);
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_TRUE(tok->add_bos_default());
  EXPECT_TRUE(tok->is_end_of_generation(2));
  const std::vector<int32_t> ids = tok->encode("the road", true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids.front(), 1);
  EXPECT_EQ(tok->token_text(ids[1]), std::string(kSpace) + "t");  // "▁t" is merged before "th"
  EXPECT_EQ(tok->decode(ids), "the road");
  // Padded to the model's vocabulary size.
  EXPECT_EQ(load_hf_tokenizer(tmp.path().string(), 200)->n_vocab(), 200);
}

// tokenizer_config.json's chat_template: a string, the list entry named "default", or none; a file that
// is not JSON is an error naming it.
TEST(HfTokenizer, ChatTemplateFromTokenizerConfig) {
  test::TempDir dir;
  EXPECT_FALSE(hf_chat_template(dir.path().string()).has_value());  // no tokenizer_config.json
  const auto write = [&](const std::string& text) {
    std::ofstream(dir.path() / "tokenizer_config.json") << text;
  };
  write(R"({"bos_token": "<s>"})");
  EXPECT_FALSE(hf_chat_template(dir.path().string()).has_value());
  write(R"({"chat_template": "{{ '<|im_start|>' }}"})");
  EXPECT_EQ(hf_chat_template(dir.path().string()).value_or(""), "{{ '<|im_start|>' }}");
  write(R"({"chat_template": [{"name": "rag", "template": "r"}, {"name": "default", "template": "d"}]})");
  EXPECT_EQ(hf_chat_template(dir.path().string()).value_or(""), "d");
  write(R"({"chat_template": [{"name": "rag", "template": "r"}]})");
  EXPECT_FALSE(hf_chat_template(dir.path().string()).has_value());
  write("{not json");
  EXPECT_THROW(hf_chat_template(dir.path().string()), HfCheckpointError);
}

TEST(HfTokenizer, NoTokenizerJsonGivesNull) {
  test::TempDir tmp;
  EXPECT_EQ(load_hf_tokenizer(tmp.path().string()), nullptr);
}

// Loading `text` as tokenizer.json fails with a message containing `expected`.
void expect_refused(const std::string& text, const std::string& expected) {
  test::TempDir tmp;
  write_text(tmp.path() / "tokenizer.json", text);
  try {
    load_hf_tokenizer(tmp.path().string());
    ADD_FAILURE() << "accepted; expected an error containing '" << expected << "'";
  } catch (const HfCheckpointError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("tokenizer.json"), std::string::npos) << what;
    EXPECT_NE(what.find(expected), std::string::npos) << what;
  }
}

TEST(HfTokenizer, RefusesMalformedAndUnsupportedFiles) {
  expect_refused("{not json", "not valid JSON");
  expect_refused(R"({"model": 3})", "'model' is missing");
  expect_refused(R"({"model": {"type": "Unigram", "vocab": []}})", "model type 'Unigram' is not supported");
  expect_refused(R"({"model": {"type": "WordPiece", "vocab": {}}})", "model type 'WordPiece'");
  expect_refused(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                    "pre_tokenizer": {"type": "Whitespace"}})",
                 "pre_tokenizer 'Whitespace' is not supported");
  expect_refused(R"({"model": {"type": "BPE", "vocab": {"a": "x"}, "merges": [], "byte_fallback": true}})",
                 "model.vocab entry 'a' is not an integer id");
  expect_refused(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [7], "byte_fallback": true}})",
                 "model.merges entry 7");
  expect_refused(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": true},
                    "normalizer": {"type": "NFKC"}})",
                 "normalizer 'NFKC' is not supported");
  expect_refused(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
                    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                      {"type": "Split", "pattern": {"Regex": "\\w+"}}, {"type": "ByteLevel"}]}})",
                 "Split regex");
  expect_refused(
      R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 0}, "merges": [], "byte_fallback": true}})",
      "gives id 0 to both");
}

TEST(HfTokenizer, GenerateRunsOnAnHfDirectoryWithTokenizerJson) {
  const fs::path source = test::test_data_dir() / "hf-tiny-llama" / "f32";
  test::TempDir tmp;
  for (const char* name : {"config.json", "model.safetensors"})
    fs::copy_file(source / name, tmp.path() / name);
  write_text(tmp.path() / "tokenizer.json", test::tiny_llama_tokenizer_json(192));
  const auto r = test::run_command(test::nibble_bin() + " generate --model " + tmp.path().string() +
                                   " --prompt \"the road\" --max-tokens 4 --threads 1");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output.find("no tokenizer"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace nibble::model
