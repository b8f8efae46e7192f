// Project-made random Llama models: shapes, metadata, tensor types, weight statistics, determinism,
// file size, the synthetic vocabulary, and that the engine loads, tokenizes and runs them.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <set>
#include <unordered_set>

#include "kernels/quantize.hpp"
#include "model/gguf.hpp"
#include "model/llama_config.hpp"
#include "model/random_model.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::model {
namespace {

namespace fs = std::filesystem;
using kernels::DType;

std::vector<std::string> expected_tensor_names(int64_t n_layer) {
  std::vector<std::string> names = {"token_embd.weight"};
  for (int64_t i = 0; i < n_layer; ++i) {
    for (const char* t : {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
                          "ffn_up", "ffn_down"}) {
      names.push_back("blk." + std::to_string(i) + "." + t + ".weight");
    }
  }
  names.push_back("output_norm.weight");
  names.push_back("output.weight");
  return names;
}

TEST(RandomModel, NamedShapes) {
  const LlamaShape tiny = llama_shape_by_name("tiny");
  EXPECT_EQ(tiny.n_embd, 128);
  EXPECT_EQ(tiny.n_layer, 2);
  EXPECT_EQ(tiny.n_head, 4);
  EXPECT_EQ(tiny.n_head_kv, 2);
  EXPECT_EQ(tiny.n_ff, 256);
  EXPECT_EQ(tiny.n_vocab, 4096);
  const LlamaShape small = llama_shape_by_name("small");
  EXPECT_EQ(small.n_embd, 256);
  EXPECT_EQ(small.n_layer, 2);
  EXPECT_EQ(small.n_head, 4);
  EXPECT_EQ(small.n_head_kv, 1);
  EXPECT_EQ(small.n_ff, 768);
  EXPECT_EQ(small.n_vocab, 4096);
  EXPECT_EQ(small.n_ctx, 2048);
  EXPECT_EQ(small.rope_base, 10000.0f);
  const LlamaShape big = llama_shape_by_name("llama-1b");
  EXPECT_EQ(big.n_embd, 2048);
  EXPECT_EQ(big.n_layer, 16);
  EXPECT_EQ(big.n_head, 32);
  EXPECT_EQ(big.n_head_kv, 8);
  EXPECT_EQ(big.n_ff, 8192);
  EXPECT_EQ(big.n_vocab, 128256);
  EXPECT_EQ(big.n_ctx, 8192);
  EXPECT_EQ(big.rope_base, 500000.0f);
  // Per layer: norms 2 x 2048 + q/o 2 x 2048^2 + k/v 2 x 2048 x 512 + ffn 3 x 2048 x 8192
  // = 60821504; x 16 = 973144064, plus embedding and head 2 x 128256 x 2048 = 525336576 and the
  // output norm 2048.
  EXPECT_EQ(big.n_params(), 1498482688);
  const LlamaShape b8 = llama_shape_by_name("llama-8b");
  EXPECT_EQ(b8.n_embd, 4096);
  EXPECT_EQ(b8.n_layer, 32);
  EXPECT_EQ(b8.n_head, 32);
  EXPECT_EQ(b8.n_head_kv, 8);
  EXPECT_EQ(b8.n_ff, 14336);
  EXPECT_EQ(b8.n_vocab, 128256);
  // Per layer: 2 x 4096 + 2 x 4096^2 + 2 x 4096 x 1024 + 3 x 4096 x 14336 = 218112000; x 32 =
  // 6979584000, plus 2 x 128256 x 4096 = 1050673152 and 4096: Llama 3.1 8B's 8.03B.
  EXPECT_EQ(b8.n_params(), 8030261248);
  const LlamaShape b70 = llama_shape_by_name("llama-70b");
  EXPECT_EQ(b70.n_embd, 8192);
  EXPECT_EQ(b70.n_layer, 80);
  EXPECT_EQ(b70.n_head, 64);
  EXPECT_EQ(b70.n_head_kv, 8);
  EXPECT_EQ(b70.n_ff, 28672);
  EXPECT_EQ(b70.n_vocab, 128256);
  EXPECT_EQ(b70.n_ctx, 8192);
  // Per layer: 2 x 8192 + 2 x 8192^2 + 2 x 8192 x 1024 + 3 x 8192 x 28672 = 855654400; x 80 =
  // 68452352000, plus 2 x 128256 x 8192 = 2101346304 and 8192: Llama 3.1 70B's 70.55B.
  EXPECT_EQ(b70.n_params(), 70553706496);
  EXPECT_THROW(llama_shape_by_name("huge"), std::invalid_argument);
}

TEST(RandomModel, TinyReadsBackWithLlamaCppNamesAndMetadata) {
  test::TempDir dir;
  const fs::path path = dir.path() / "tiny.gguf";
  const LlamaShape shape = llama_shape_by_name("tiny");
  write_random_llama(path.string(), shape, DType::Q4_0, 1);
  const auto f = GgufFile::open(path.string());

  EXPECT_EQ(f->get_string("general.architecture"), "llama");
  EXPECT_FALSE(f->get_string("general.name").empty());
  EXPECT_EQ(f->get_uint("general.file_type"), 2u);  // LLAMA_FTYPE_MOSTLY_Q4_0
  EXPECT_EQ(f->get_uint("llama.context_length"), 2048u);
  EXPECT_EQ(f->get_uint("llama.embedding_length"), 128u);
  EXPECT_EQ(f->get_uint("llama.block_count"), 2u);
  EXPECT_EQ(f->get_uint("llama.feed_forward_length"), 256u);
  EXPECT_EQ(f->get_uint("llama.attention.head_count"), 4u);
  EXPECT_EQ(f->get_uint("llama.attention.head_count_kv"), 2u);
  EXPECT_EQ(f->get_uint("llama.rope.dimension_count"), 32u);
  EXPECT_FLOAT_EQ(static_cast<float>(f->get_float("llama.rope.freq_base")), 10000.0f);
  EXPECT_FLOAT_EQ(static_cast<float>(f->get_float("llama.attention.layer_norm_rms_epsilon")), 1e-5f);
  EXPECT_EQ(f->get_string("tokenizer.ggml.model"), "llama");
  EXPECT_EQ(f->get_uint("tokenizer.ggml.bos_token_id"), 1u);
  EXPECT_EQ(f->get_uint("tokenizer.ggml.eos_token_id"), 2u);
  EXPECT_EQ(f->get_uint("tokenizer.ggml.unknown_token_id"), 0u);
  EXPECT_EQ(f->find_bool("tokenizer.ggml.add_bos_token"), true);
  EXPECT_EQ(f->find_bool("tokenizer.ggml.add_space_prefix"), true);
  EXPECT_EQ(f->get_string_array("tokenizer.ggml.tokens").size(), 4096u);
  EXPECT_EQ(f->get_float_array("tokenizer.ggml.scores").size(), 4096u);
  EXPECT_EQ(f->get_int_array("tokenizer.ggml.token_type").size(), 4096u);

  const auto names = expected_tensor_names(2);
  ASSERT_EQ(f->tensors().size(), names.size());
  for (const std::string& name : names) {
    const GgufTensorInfo* t = f->find_tensor(name);
    ASSERT_NE(t, nullptr) << name;
    const bool is_norm = name.find("norm") != std::string::npos;
    EXPECT_EQ(t->type, is_norm ? DType::F32 : DType::Q4_0) << name;
    EXPECT_EQ(t->dims.size(), is_norm ? 1u : 2u) << name;
  }
  EXPECT_EQ(f->find_tensor("token_embd.weight")->dims, (std::vector<int64_t>{128, 4096}));
  EXPECT_EQ(f->find_tensor("output.weight")->dims, (std::vector<int64_t>{128, 4096}));
  EXPECT_EQ(f->find_tensor("blk.1.attn_q.weight")->dims, (std::vector<int64_t>{128, 128}));
  EXPECT_EQ(f->find_tensor("blk.1.attn_k.weight")->dims,
            (std::vector<int64_t>{128, 64}));  // 2 KV heads of 32
  EXPECT_EQ(f->find_tensor("blk.0.attn_output.weight")->dims, (std::vector<int64_t>{128, 128}));
  EXPECT_EQ(f->find_tensor("blk.0.ffn_gate.weight")->dims, (std::vector<int64_t>{128, 256}));
  EXPECT_EQ(f->find_tensor("blk.0.ffn_down.weight")->dims, (std::vector<int64_t>{256, 128}));
  EXPECT_EQ(f->find_tensor("blk.0.ffn_norm.weight")->dims, (std::vector<int64_t>{128}));

  // The project's own config reader accepts it.
  const LlamaConfig c = LlamaConfig::from_gguf(*f);
  EXPECT_EQ(c.n_vocab, 4096);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.kv_dim(), 64);
}

TEST(RandomModel, WeightStatistics) {
  test::TempDir dir;
  const fs::path path = dir.path() / "f32.gguf";
  write_random_llama(path.string(), llama_shape_by_name("tiny"), DType::F32, 3);
  const auto f = GgufFile::open(path.string());
  std::set<float> distinct_norm_values;
  for (const GgufTensorInfo& t : f->tensors()) {
    SCOPED_TRACE(t.name);
    const auto w = test::dequantize_tensor(*f, t);
    double sum = 0, sum_sq = 0;
    for (float v : w) {
      ASSERT_TRUE(std::isfinite(v));
      sum += v;
      sum_sq += static_cast<double>(v) * v;
    }
    const double mean = sum / static_cast<double>(w.size());
    const double stddev = std::sqrt(sum_sq / static_cast<double>(w.size()) - mean * mean);
    if (t.dims.size() == 1) {
      for (float v : w) {
        EXPECT_GE(v, 0.8f);
        EXPECT_LE(v, 1.2f);
        distinct_norm_values.insert(v);
      }
      EXPECT_NEAR(mean, 1.0, 0.05);
    } else {
      const double want = 1.0 / std::sqrt(static_cast<double>(t.row_elements()));
      EXPECT_NEAR(stddev, want, want * 0.05);
      EXPECT_NEAR(mean, 0.0, want * 0.05);
    }
  }
  EXPECT_GT(distinct_norm_values.size(), 500u);  // norms are random, not all ones
  // Different tensors get different weights.
  const auto q0 = test::dequantize_tensor(*f, *f->find_tensor("blk.0.attn_q.weight"));
  const auto q1 = test::dequantize_tensor(*f, *f->find_tensor("blk.1.attn_q.weight"));
  EXPECT_NE(q0, q1);
}

TEST(RandomModel, DeterministicFromSeed) {
  test::TempDir dir;
  const LlamaShape shape = llama_shape_by_name("tiny");
  write_random_llama((dir.path() / "a.gguf").string(), shape, DType::Q4_0, 42);
  write_random_llama((dir.path() / "b.gguf").string(), shape, DType::Q4_0, 42);
  write_random_llama((dir.path() / "c.gguf").string(), shape, DType::Q4_0, 43);
  const auto a = test::read_file_bytes(dir.path() / "a.gguf");
  const auto b = test::read_file_bytes(dir.path() / "b.gguf");
  const auto c = test::read_file_bytes(dir.path() / "c.gguf");
  EXPECT_EQ(a, b);
  ASSERT_EQ(a.size(), c.size());
  EXPECT_NE(a, c);
  // Only the weights differ, not the metadata.
  const auto fa = GgufFile::open((dir.path() / "a.gguf").string());
  EXPECT_TRUE(std::equal(a.begin(), a.begin() + static_cast<std::ptrdiff_t>(fa->data_offset()), c.begin()));
}

TEST(RandomModel, MatrixTypesHoldTheSameWeights) {
  // The same seed gives the same underlying floats whatever the storage type.
  test::TempDir dir;
  const LlamaShape shape = llama_shape_by_name("tiny");
  write_random_llama((dir.path() / "f32.gguf").string(), shape, DType::F32, 5);
  const auto ref = GgufFile::open((dir.path() / "f32.gguf").string());
  const std::pair<DType, double> types[] = {{DType::F16, 1e-3}, {DType::Q8_0, 1e-2}, {DType::Q4_0, 0.2},
                                            {DType::Q4_1, 0.2}, {DType::Q5_0, 0.1},  {DType::Q5_1, 0.1}};
  for (const auto& [type, max_rel_rms] : types) {
    SCOPED_TRACE(kernels::type_name(type));
    const fs::path path = dir.path() / (std::string(kernels::type_name(type)) + ".gguf");
    write_random_llama(path.string(), shape, type, 5);
    const auto f = GgufFile::open(path.string());
    ASSERT_EQ(f->tensors().size(), ref->tensors().size());
    for (const GgufTensorInfo& t : f->tensors()) {
      const GgufTensorInfo& r = *ref->find_tensor(t.name);
      EXPECT_EQ(t.dims, r.dims);
      EXPECT_EQ(t.type, t.dims.size() == 1 ? DType::F32 : type) << t.name;
      const auto got = test::dequantize_tensor(*f, t);
      const auto want = test::dequantize_tensor(*ref, r);
      double err = 0, norm = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        err += (got[i] - want[i]) * static_cast<double>(got[i] - want[i]);
        norm += static_cast<double>(want[i]) * want[i];
      }
      EXPECT_LT(std::sqrt(err / norm), max_rel_rms) << t.name;
    }
  }
}

TEST(RandomModel, FileSizeMatchesParameterCount) {
  test::TempDir dir;
  const LlamaShape shape = llama_shape_by_name("tiny");
  const fs::path path = dir.path() / "q4.gguf";
  write_random_llama(path.string(), shape, DType::Q4_0, 1);
  const auto f = GgufFile::open(path.string());
  int64_t norm_params = 0, matrix_params = 0, data_bytes = 0;
  for (const GgufTensorInfo& t : f->tensors()) {
    (t.dims.size() == 1 ? norm_params : matrix_params) += t.n_elements;
    data_bytes += static_cast<int64_t>(t.size_bytes);
  }
  EXPECT_EQ(norm_params + matrix_params, shape.n_params());
  EXPECT_EQ(data_bytes, matrix_params * 18 / 32 + norm_params * 4);
  // Data plus at most one alignment pad per tensor; the rest is metadata (mostly the vocabulary).
  const auto file_size = static_cast<int64_t>(fs::file_size(path));
  EXPECT_GE(file_size - static_cast<int64_t>(f->data_offset()), data_bytes);
  EXPECT_LE(file_size - static_cast<int64_t>(f->data_offset()),
            data_bytes + 32 * static_cast<int64_t>(f->tensors().size()));
  EXPECT_LT(f->data_offset(), 200u * 1024);
  // For the 1.5B llama-1b shape that means about 18/32 bytes per weight: ~843 MB.
  const LlamaShape big = llama_shape_by_name("llama-1b");
  EXPECT_NEAR(static_cast<double>(big.n_params()) * 18 / 32 / 1e6, 842.9, 0.5);
}

TEST(RandomModel, RejectsBadArguments) {
  test::TempDir dir;
  const std::string path = (dir.path() / "x.gguf").string();
  LlamaShape shape = llama_shape_by_name("tiny");
  EXPECT_THROW(write_random_llama(path, shape, DType::Q4_K, 1), std::invalid_argument);  // rows of 128
  EXPECT_THROW(write_random_llama(path, shape, DType::Q8_K, 1), std::invalid_argument);  // activations only
  LlamaShape odd = shape;
  odd.n_embd = 100;  // not a multiple of the Q4_0 block
  EXPECT_THROW(write_random_llama(path, odd, DType::Q4_0, 1), std::invalid_argument);
  LlamaShape heads = shape;
  heads.n_head_kv = 3;
  EXPECT_THROW(write_random_llama(path, heads, DType::F32, 1), std::invalid_argument);
  LlamaShape vocab = shape;
  vocab.n_vocab = 300;
  EXPECT_THROW(write_random_llama(path, vocab, DType::F32, 1), std::invalid_argument);
  EXPECT_FALSE(fs::exists(path));
}

TEST(SyntheticVocab, LayoutAndMergeability) {
  const SyntheticVocab v = make_synthetic_vocab(32000);
  ASSERT_EQ(v.tokens.size(), 32000u);
  ASSERT_EQ(v.scores.size(), 32000u);
  ASSERT_EQ(v.token_types.size(), 32000u);
  EXPECT_EQ(v.tokens[0], "<unk>");
  EXPECT_EQ(v.token_types[0], 2);
  EXPECT_EQ(v.tokens[1], "<s>");
  EXPECT_EQ(v.token_types[1], 3);
  EXPECT_EQ(v.tokens[2], "</s>");
  EXPECT_EQ(v.token_types[2], 3);
  EXPECT_EQ(v.tokens[3], "<0x00>");
  EXPECT_EQ(v.tokens[3 + 0x41], "<0x41>");
  EXPECT_EQ(v.tokens[258], "<0xFF>");
  for (int i = 3; i <= 258; ++i) EXPECT_EQ(v.token_types[i], 6);

  const std::unordered_set<std::string> all(v.tokens.begin(), v.tokens.end());
  EXPECT_EQ(all.size(), v.tokens.size()) << "duplicate pieces";
  const std::string space = "\xE2\x96\x81";
  EXPECT_TRUE(all.count(space));
  for (int c = 0x21; c < 0x7f; ++c) EXPECT_TRUE(all.count(std::string(1, static_cast<char>(c)))) << c;
  for (const char* word : {"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "upon", "time"}) {
    EXPECT_TRUE(all.count(space + word)) << word;
  }
  EXPECT_TRUE(all.count(space + "The"));

  for (size_t i = 259; i < v.tokens.size(); ++i) {
    const std::string& piece = v.tokens[i];
    EXPECT_EQ(v.token_types[i], 1);
    if (i > 259) {
      EXPECT_LT(v.scores[i], v.scores[i - 1]) << "scores must decrease";
    }
    if (piece.size() == 1 || piece == space) continue;
    // Reachable by one merge: some split gives two pieces that come earlier.
    bool mergeable = false;
    for (size_t cut = 1; cut < piece.size() && !mergeable; ++cut) {
      mergeable = all.count(piece.substr(0, cut)) && all.count(piece.substr(cut));
    }
    EXPECT_TRUE(mergeable) << "piece " << i << " '" << piece << "' is not a merge of two pieces";
  }
  // Deterministic and a prefix of a larger vocabulary's ordering.
  EXPECT_EQ(make_synthetic_vocab(32000).tokens, v.tokens);
  EXPECT_THROW(make_synthetic_vocab(300), std::invalid_argument);
}

TEST(RandomModel, TokenizerAndForwardPassWork) {
  test::TempDir dir;
  const fs::path path = dir.path() / "tiny.gguf";
  write_random_llama(path.string(), llama_shape_by_name("tiny"), DType::Q4_0, 9);
  const auto f = GgufFile::open(path.string());
  const auto tok = Tokenizer::from_gguf(*f);
  const std::string text = "The quick brown fox jumps over the lazy dog. Once upon a time";
  const auto ids = tok->encode(text, true);
  ASSERT_FALSE(ids.empty());
  EXPECT_EQ(ids[0], 1);
  EXPECT_LT(ids.size(), 20u) << "common words should be single pieces";
  for (int32_t id : ids) EXPECT_NE(id, 0) << "no <unk>";
  EXPECT_EQ(tok->decode(ids), text);

  // Logits from the real binary vary across positions and vocabulary (not constant, not NaN).
  const fs::path logits = dir.path() / "logits.bin";
  const auto result = test::run_command(test::nibble_bin() + " logits -t 1 -m " + path.string() + " -p '" +
                                        text + "' -o " + logits.string());
  ASSERT_EQ(result.exit_code, 0) << result.output;
  const auto bytes = test::read_file_bytes(logits);
  const size_t n_vocab = 4096;
  ASSERT_EQ(bytes.size(), ids.size() * n_vocab * sizeof(float));
  std::vector<float> l(bytes.size() / sizeof(float));
  std::memcpy(l.data(), bytes.data(), bytes.size());
  std::set<size_t> argmaxes;
  for (size_t row = 0; row < ids.size(); ++row) {
    const float* r = l.data() + row * n_vocab;
    double sum = 0, sum_sq = 0;
    for (size_t j = 0; j < n_vocab; ++j) {
      ASSERT_TRUE(std::isfinite(r[j]));
      sum += r[j];
      sum_sq += static_cast<double>(r[j]) * r[j];
    }
    const double mean = sum / n_vocab;
    const double stddev = std::sqrt(sum_sq / n_vocab - mean * mean);
    EXPECT_GT(stddev, 0.3) << "row " << row;
    EXPECT_LT(stddev, 10.0) << "row " << row;
    argmaxes.insert(static_cast<size_t>(std::max_element(r, r + n_vocab) - r));
  }
  EXPECT_GT(argmaxes.size(), ids.size() / 2) << "the prediction barely depends on the input";
}

}  // namespace
}  // namespace nibble::model
