// Requantizing GGUF models: which type every tensor gets (pure and not), that weights stay close
// to the originals within 4- and 8-bit error bounds, and that metadata is carried over.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>

#include "kernels/quantize.hpp"
#include "model/gguf.hpp"
#include "model/llama_config.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::model {
namespace {

namespace fs = std::filesystem;
using kernels::DType;

bool same_value(const GgufValue& a, const GgufValue& b) {
  if (a.type != b.type || a.u != b.u || a.i != b.i || a.s != b.s || a.array.size() != b.array.size())
    return false;
  if (!(a.f == b.f || (std::isnan(a.f) && std::isnan(b.f)))) return false;
  if (a.type == GgufValueType::ARRAY && a.array_type != b.array_type) return false;
  for (size_t k = 0; k < a.array.size(); ++k) {
    if (!same_value(a.array[k], b.array[k])) return false;
  }
  return true;
}

// Every element's error stays within what the block's quantization step allows: Q4_0 maps the
// block's largest magnitude to -8 steps, so the step is amax/8 and values near +amax clip by up to
// one step; Q8_0 rounds to amax/127 steps (half a step of error). Both add fp16 scale rounding.
void expect_within_block_bounds(const std::vector<float>& original, const std::vector<float>& got, DType type,
                                const std::string& name) {
  ASSERT_EQ(original.size(), got.size());
  const size_t block = 32;
  int reported = 0;
  for (size_t b = 0; b < original.size(); b += block) {
    float amax = 0;
    for (size_t j = b; j < b + block; ++j) amax = std::max(amax, std::fabs(original[j]));
    const float bound = type == DType::Q4_0 ? amax / 8 * 1.01f : amax / 127 * 0.5f + amax * 1e-3f;
    for (size_t j = b; j < b + block; ++j) {
      if (std::fabs(got[j] - original[j]) > bound + 1e-7f && reported++ < 5) {
        ADD_FAILURE() << name << "[" << j << "]: " << got[j] << " vs " << original[j] << " (bound " << bound
                      << ")";
      }
    }
  }
}

double relative_rms(const std::vector<float>& want, const std::vector<float>& got) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(err / norm);
}

// `nibble make-model --shape small --vocab 354 --type TYPE --seed SEED` (with more layers where asked):
// seed 7 at F16 is the model the committed llama.cpp files in tests/data were quantized from.
std::string write_small_model(const fs::path& dir, const std::string& name, DType type, uint64_t seed,
                              int64_t n_layer = 0) {
  LlamaShape shape = llama_shape_by_name("small");
  shape.n_vocab = 354;
  if (n_layer > 0) shape.n_layer = n_layer;
  const std::string path = (dir / name).string();
  write_random_llama(path, shape, type, seed);
  return path;
}

// The same with shape "tiny" (rows of 128 and 256): the model of the tiny llama.cpp files in tests/data.
std::string write_tiny_model(const fs::path& dir, const std::string& name, DType type, uint64_t seed) {
  LlamaShape shape = llama_shape_by_name("tiny");
  shape.n_vocab = 354;
  const std::string path = (dir / name).string();
  write_random_llama(path, shape, type, seed);
  return path;
}

// Every tensor of `theirs` (a llama.cpp file) is in `ours` with the same type, size and bytes. Returns how
// many tensors of each type were compared.
std::map<DType, int> expect_same_tensors(const GgufFile& ours, const GgufFile& theirs) {
  EXPECT_EQ(ours.tensors().size(), theirs.tensors().size());
  std::map<DType, int> count;
  for (const GgufTensorInfo& t : theirs.tensors()) {
    const GgufTensorInfo* o = ours.find_tensor(t.name);
    if (o == nullptr) {
      ADD_FAILURE() << t.name << " missing";
      continue;
    }
    EXPECT_EQ(o->type, t.type) << t.name;
    if (o->size_bytes != t.size_bytes) {
      ADD_FAILURE() << t.name << ": " << o->size_bytes << " bytes against " << t.size_bytes;
      continue;
    }
    EXPECT_EQ(std::memcmp(ours.tensor_data(*o), theirs.tensor_data(t), t.size_bytes), 0) << t.name;
    ++count[t.type];
  }
  return count;
}

class Requantize : public ::testing::Test {
 protected:
  void SetUp() override {
    source_path_ = dir_.path() / "f32.gguf";
    write_random_llama(source_path_.string(), llama_shape_by_name("tiny"), DType::F32, 21);
    source_ = GgufFile::open(source_path_.string());
  }
  std::shared_ptr<const GgufFile> convert(const GgufFile& in, DType type, bool pure,
                                          const std::string& name) {
    const fs::path out = dir_.path() / name;
    requantize_gguf(in, out.string(), type, pure);
    return GgufFile::open(out.string());
  }
  test::TempDir dir_;
  fs::path source_path_;
  std::shared_ptr<const GgufFile> source_;
};

TEST_F(Requantize, F32ToQ4_0KeepsHeadsAtQ8_0) {
  const auto out = convert(*source_, DType::Q4_0, false, "q4.gguf");
  ASSERT_EQ(out->tensors().size(), source_->tensors().size());
  for (size_t k = 0; k < out->tensors().size(); ++k) {
    const GgufTensorInfo& t = out->tensors()[k];
    const GgufTensorInfo& s = source_->tensors()[k];
    SCOPED_TRACE(t.name);
    EXPECT_EQ(t.name, s.name);  // same order and shapes
    EXPECT_EQ(t.dims, s.dims);
    DType want = DType::Q4_0;
    if (t.dims.size() == 1) want = DType::F32;
    if (t.name == "token_embd.weight" || t.name == "output.weight") want = DType::Q8_0;
    EXPECT_EQ(t.type, want);
    EXPECT_EQ(requantized_type(s, DType::Q4_0, false), want);
    const auto original = test::dequantize_tensor(*source_, s);
    const auto got = test::dequantize_tensor(*out, t);
    if (want == DType::F32) {
      EXPECT_EQ(got, original);
    } else {
      expect_within_block_bounds(original, got, want, t.name);
      EXPECT_LT(relative_rms(original, got), want == DType::Q4_0 ? 0.15 : 0.01);
      EXPECT_GT(relative_rms(original, got), want == DType::Q4_0 ? 0.02 : 0.0);  // really 4-bit
    }
  }
  EXPECT_EQ(out->get_uint("general.file_type"), 2u);
  EXPECT_EQ(out->get_uint("general.quantization_version"), 2u);
  // Everything else is carried over unchanged.
  for (const auto& [key, value] : source_->metadata()) {
    if (key == "general.file_type") continue;
    const GgufValue* copy = out->find(key);
    ASSERT_NE(copy, nullptr) << key;
    EXPECT_TRUE(same_value(value, *copy)) << key;
  }
  // And the engine's config reader sees the same model.
  const LlamaConfig a = LlamaConfig::from_gguf(*source_);
  const LlamaConfig b = LlamaConfig::from_gguf(*out);
  EXPECT_EQ(a.n_embd, b.n_embd);
  EXPECT_EQ(a.n_vocab, b.n_vocab);
  EXPECT_EQ(a.n_head_kv, b.n_head_kv);
}

// RoPE scaling travels with the model: the linear factor's and YaRN's keys as metadata, Llama 3.1's
// factors as the F32 tensor rope_freqs.weight, which stays F32 (a vector, like the norms).
TEST_F(Requantize, RopeScalingIsCarriedOver) {
  LlamaShape shape = llama_shape_by_name("tiny");
  shape.rope_linear_factor = 2.0f;
  shape.rope_freq_factors = llama3_rope_freq_factors({8.0, 1.0, 4.0, 32.0}, shape.rope_base, 32);
  const fs::path scaled = dir_.path() / "scaled-f32.gguf";
  write_random_llama(scaled.string(), shape, DType::F32, 21);
  const auto out = convert(*GgufFile::open(scaled.string()), DType::Q4_0, false, "scaled-q4.gguf");
  const GgufTensorInfo* freqs = out->find_tensor("rope_freqs.weight");
  ASSERT_NE(freqs, nullptr);
  EXPECT_EQ(freqs->type, DType::F32);
  const LlamaConfig c = LlamaConfig::from_gguf(*out);
  EXPECT_EQ(c.rope_freq_factors, shape.rope_freq_factors);
  EXPECT_EQ(c.rope_freq_scale(), 0.5f);
  EXPECT_EQ(c.rope_yarn_original_context, 0);

  // And YaRN's type and original context.
  shape.rope_yarn_original_context = 128;
  const fs::path yarn = dir_.path() / "yarn-f32.gguf";
  write_random_llama(yarn.string(), shape, DType::F32, 21);
  const LlamaConfig y =
      LlamaConfig::from_gguf(*convert(*GgufFile::open(yarn.string()), DType::Q4_0, false, "yarn-q4.gguf"));
  EXPECT_EQ(y.rope_yarn_original_context, 128);
  EXPECT_EQ(y.rope_freq_scale(), 0.5f);
  EXPECT_EQ(y.rope_freq_factors, shape.rope_freq_factors);
}

TEST_F(Requantize, PureQ4_0QuantizesEveryMatrix) {
  const auto out = convert(*source_, DType::Q4_0, true, "q4pure.gguf");
  for (const GgufTensorInfo& t : out->tensors()) {
    EXPECT_EQ(t.type, t.dims.size() == 1 ? DType::F32 : DType::Q4_0) << t.name;
  }
  const auto& head = *out->find_tensor("output.weight");
  expect_within_block_bounds(test::dequantize_tensor(*source_, *source_->find_tensor("output.weight")),
                             test::dequantize_tensor(*out, head), DType::Q4_0, head.name);
  // The pure file is smaller than the mixed one.
  const auto mixed = convert(*source_, DType::Q4_0, false, "q4mixed.gguf");
  EXPECT_LT(out->file_size(), mixed->file_size());
}

TEST_F(Requantize, Q8_0AndF16Targets) {
  for (const auto& [type, file_type] : {std::pair{DType::Q8_0, 7u}, std::pair{DType::F16, 1u}}) {
    SCOPED_TRACE(kernels::type_name(type));
    const auto out = convert(*source_, type, false, std::string(kernels::type_name(type)) + ".gguf");
    EXPECT_EQ(out->get_uint("general.file_type"), file_type);
    for (const GgufTensorInfo& t : out->tensors()) {
      EXPECT_EQ(t.type, t.dims.size() == 1 ? DType::F32 : type)
          << t.name;  // heads too: only Q4_0 spares them
      const auto original = test::dequantize_tensor(*source_, *source_->find_tensor(t.name));
      const auto got = test::dequantize_tensor(*out, t);
      if (type == DType::Q8_0 && t.dims.size() == 2) expect_within_block_bounds(original, got, type, t.name);
      if (type == DType::F16) {
        EXPECT_LT(relative_rms(original, got), 1e-3) << t.name;
      }
    }
  }
}

TEST_F(Requantize, BackToF32IsExactDequantization) {
  const auto q4 = convert(*source_, DType::Q4_0, true, "q4.gguf");
  const auto f32 = convert(*q4, DType::F32, false, "back.gguf");
  EXPECT_EQ(f32->get_uint("general.file_type"), 0u);
  for (const GgufTensorInfo& t : f32->tensors()) {
    EXPECT_EQ(t.type, DType::F32);
    EXPECT_EQ(test::dequantize_tensor(*f32, t), test::dequantize_tensor(*q4, *q4->find_tensor(t.name)))
        << t.name;
  }
  // Requantizing to the type a tensor already has copies it bit for bit.
  const auto again = convert(*q4, DType::Q4_0, true, "again.gguf");
  for (const GgufTensorInfo& t : again->tensors()) {
    const GgufTensorInfo& s = *q4->find_tensor(t.name);
    ASSERT_EQ(t.size_bytes, s.size_bytes);
    EXPECT_EQ(std::memcmp(again->tensor_data(t), q4->tensor_data(s), t.size_bytes), 0) << t.name;
  }
}

// A copy of the source model without output.weight: token_embd is the tied output head.
std::shared_ptr<const GgufFile> tied_copy(const GgufFile& in, const fs::path& path) {
  GgufWriter w;
  for (const auto& [key, value] : in.metadata()) w.set(key, value);
  for (const GgufTensorInfo& t : in.tensors()) {
    if (t.name == "output.weight") continue;
    const uint8_t* data = in.tensor_data(t);
    w.add_tensor(t.name, t.dims, t.type, std::vector<uint8_t>(data, data + t.size_bytes));
  }
  w.write(path.string());
  return GgufFile::open(path.string());
}

TEST_F(Requantize, TiedHeadStaysQ8_0UnlessPure) {
  const auto tied = tied_copy(*source_, dir_.path() / "tied.gguf");
  ASSERT_EQ(tied->find_tensor("output.weight"), nullptr);
  const auto mixed = convert(*tied, DType::Q4_0, false, "tied-q4.gguf");
  EXPECT_EQ(mixed->find_tensor("output.weight"), nullptr);
  EXPECT_EQ(mixed->find_tensor("token_embd.weight")->type, DType::Q8_0);
  EXPECT_EQ(mixed->find_tensor("blk.0.ffn_up.weight")->type, DType::Q4_0);
  const auto pure = convert(*tied, DType::Q4_0, true, "tied-q4-pure.gguf");
  EXPECT_EQ(pure->find_tensor("token_embd.weight")->type, DType::Q4_0);
}

TEST_F(Requantize, RowLengthNotMultipleOfBlockIsAClearError) {
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.add_tensor("blk.0.odd.weight", {48, 2}, DType::F32, std::vector<uint8_t>(48 * 2 * 4, 0));
  const fs::path path = dir_.path() / "odd.gguf";
  w.write(path.string());
  const auto f = GgufFile::open(path.string());
  const fs::path out = dir_.path() / "odd-q4.gguf";
  try {
    requantize_gguf(*f, out.string(), DType::Q4_0, false);
    ADD_FAILURE() << "expected a GgufError";
  } catch (const GgufError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("blk.0.odd.weight"), std::string::npos) << msg;
    EXPECT_NE(msg.find("48"), std::string::npos) << msg;
    EXPECT_NE(msg.find("block size 32"), std::string::npos) << msg;
  }
  EXPECT_FALSE(fs::exists(out));
  // F16 has no blocks, so the same tensor converts.
  requantize_gguf(*f, out.string(), DType::F16, false);
  EXPECT_EQ(GgufFile::open(out.string())->tensors()[0].type, DType::F16);
  EXPECT_THROW(requantize_gguf(*f, out.string(), DType::Q6_K, false), std::invalid_argument);
}

TEST(RequantizeFixtures, KQuantAndTiedFixtures) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  test::TempDir dir;
  // Q4_K / Q6_K source: dequantize and requantize to Q8_0 stays close to the source.
  const auto kq = GgufFile::open((fixtures / "models" / "small-llama-q4_k_m.gguf").string());
  requantize_gguf(*kq, (dir.path() / "q8.gguf").string(), DType::Q8_0, false);
  const auto q8 = GgufFile::open((dir.path() / "q8.gguf").string());
  for (const GgufTensorInfo& t : q8->tensors()) {
    const GgufTensorInfo& s = *kq->find_tensor(t.name);
    EXPECT_EQ(t.type, t.dims.size() == 1 ? DType::F32 : DType::Q8_0) << t.name;
    if (t.dims.size() == 2) {
      expect_within_block_bounds(test::dequantize_tensor(*kq, s), test::dequantize_tensor(*q8, t),
                                 DType::Q8_0, t.name);
    }
  }
  EXPECT_EQ(q8->get_string_array("tokenizer.ggml.tokens"), kq->get_string_array("tokenizer.ggml.tokens"));
  // The fortune target ties its output head to the embedding: that one stays 8-bit.
  const auto fortune = GgufFile::open((fixtures / "models" / "fortune-target-f16.gguf").string());
  ASSERT_EQ(fortune->find_tensor("output.weight"), nullptr);
  requantize_gguf(*fortune, (dir.path() / "fortune-q4.gguf").string(), DType::Q4_0, false);
  const auto fq4 = GgufFile::open((dir.path() / "fortune-q4.gguf").string());
  EXPECT_EQ(fq4->find_tensor("token_embd.weight")->type, DType::Q8_0);
  EXPECT_EQ(fq4->find_tensor("blk.0.attn_q.weight")->type, DType::Q4_0);
  EXPECT_LT(fq4->file_size(), fortune->file_size() / 2);
}

TEST(RequantizeFixtures, Q4_KOfLlamaCppQ4_KIsNearlyUnchanged) {
  // Re-quantizing values that llama.cpp's Q4_K already rounded lands on (nearly) the same grid.
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  test::TempDir dir;
  const auto kq = GgufFile::open((fixtures / "models" / "small-llama-q4_k_m.gguf").string());
  requantize_gguf(*kq, (dir.path() / "q4k.gguf").string(), DType::Q4_K, false);
  const auto out = GgufFile::open((dir.path() / "q4k.gguf").string());
  int checked = 0;
  for (const GgufTensorInfo& t : out->tensors()) {
    const GgufTensorInfo& s = *kq->find_tensor(t.name);
    if (s.type != DType::Q4_K || t.type != DType::Q4_K) continue;
    const double err = relative_rms(test::dequantize_tensor(*kq, s), test::dequantize_tensor(*out, t));
    EXPECT_LT(err, 0.005) << t.name;
    if (checked++ == 0) std::printf("%s: relative RMS change %.4f\n", t.name.c_str(), err);
  }
  EXPECT_GT(checked, 0);
}

// `nibble quantize --type q5_k`: every matrix Q5_K but the heads (Q8_0 unless pure), llama.cpp's file
// type for the mix, and a model that runs.
TEST_F(Requantize, F32ToQ5_KKeepsHeadsAtQ8_0) {
  test::TempDir dir;
  const auto source = GgufFile::open(write_small_model(dir.path(), "small-f32.gguf", DType::F32, 3));
  const auto out = convert(*source, DType::Q5_K, false, "q5k.gguf");
  for (const GgufTensorInfo& t : out->tensors()) {
    SCOPED_TRACE(t.name);
    const bool head = t.name == "token_embd.weight" || t.name == "output.weight";
    EXPECT_EQ(t.type, t.dims.size() == 1 ? DType::F32 : head ? DType::Q8_0 : DType::Q5_K);
    if (t.type != DType::Q5_K) continue;
    const double err = relative_rms(test::dequantize_tensor(*source, *source->find_tensor(t.name)),
                                    test::dequantize_tensor(*out, t));
    EXPECT_LT(err, 0.06);   // 5 bits: about half of Q4_0's error
    EXPECT_GT(err, 0.005);  // and really quantized
  }
  EXPECT_EQ(out->get_uint("general.file_type"), 17u);  // LLAMA_FTYPE_MOSTLY_Q5_K_M
  const auto pure = convert(*source, DType::Q5_K, true, "q5k-pure.gguf");
  EXPECT_EQ(pure->find_tensor("output.weight")->type, DType::Q5_K);
}

// The committed llama.cpp Q5_K_M model (tests/data/llama-cpp-q5_k_m) was quantized by llama.cpp from
// `nibble make-model --shape small --vocab 354 --type f16 --seed 7`, without an importance matrix, so
// with quantize_row_q5_K_ref and quantize_row_q6_K_ref: Nibble's quantizers, given the same F16
// weights, must write the same bytes for every Q5_K and Q6_K tensor of that file.
TEST(RequantizeTestData, Q5_KAndQ6_KEqualLlamaCppByteForByte) {
  test::TempDir dir;
  const auto source = GgufFile::open(write_small_model(dir.path(), "small-f16.gguf", DType::F16, 7));
  const auto llama_cpp =
      GgufFile::open((test::test_data_dir() / "llama-cpp-q5_k_m" / "small-llama-q5_k_m.gguf").string());
  int checked[2] = {0, 0};
  for (const GgufTensorInfo& t : llama_cpp->tensors()) {
    if (t.type != DType::Q5_K && t.type != DType::Q6_K) continue;
    const GgufTensorInfo* s = source->find_tensor(t.name);
    ASSERT_NE(s, nullptr) << t.name;
    ASSERT_EQ(s->type, DType::F16) << t.name;
    const std::vector<uint8_t> ours = convert_tensor(*source, *s, t.type);
    ASSERT_EQ(ours.size(), t.size_bytes) << t.name;
    EXPECT_EQ(std::memcmp(ours.data(), llama_cpp->tensor_data(t), ours.size()), 0) << t.name;
    ++checked[t.type == DType::Q5_K ? 0 : 1];
  }
  EXPECT_EQ(checked[0], 13);  // token_embd and 12 layer matrices (README of the test data)
  EXPECT_EQ(checked[1], 3);   // output, blk.1.attn_v, blk.1.ffn_down
}

// llama-quantize's Q5_K_M mix of the same F16 model: every tensor's type and every matrix's bytes.
TEST(RequantizeTestData, Q5_K_MEqualsLlamaCppByteForByte) {
  test::TempDir dir;
  const std::string f16 = write_small_model(dir.path(), "small-f16.gguf", DType::F16, 7);
  const std::string ours_path = (dir.path() / "q5_k_m.gguf").string();
  requantize_gguf(*GgufFile::open(f16), ours_path, LlamaCppMix::q5_k_m);
  const auto ours = GgufFile::open(ours_path);
  const auto theirs =
      GgufFile::open((test::test_data_dir() / "llama-cpp-q5_k_m" / "small-llama-q5_k_m.gguf").string());
  const std::map<DType, int> count = expect_same_tensors(*ours, *theirs);
  EXPECT_EQ(count.at(DType::Q5_K), 13);
  EXPECT_EQ(ours->get_uint("general.file_type"), 17u);
}

// The mixes' rules on llama-1b's 16 layers and on a tied head, and llama.cpp's own Q4_K_M file's types.
TEST(RequantizeTestData, LlamaCppMixTypes) {
  test::TempDir dir;
  const auto file = GgufFile::open(write_small_model(dir.path(), "deep.gguf", DType::F16, 1, 16));
  auto layer_type = [&](LlamaCppMix mix, const std::string& name) {
    const std::vector<DType> types = llama_cpp_mix_types(*file, mix);
    for (size_t i = 0; i < types.size(); ++i)
      if (file->tensors()[i].name == name) return types[i];
    ADD_FAILURE() << name << " missing";
    return DType::F32;
  };
  // use_more_bits(i, 16): layers 0, 1, 4, 7, 10, 13, 14, 15.
  for (int layer = 0; layer < 16; ++layer) {
    const bool more = layer < 2 || layer >= 14 || (layer - 2) % 3 == 2;
    const std::string p = "blk." + std::to_string(layer) + ".";
    SCOPED_TRACE(p);
    EXPECT_EQ(layer_type(LlamaCppMix::q4_k_m, p + "attn_v.weight"), more ? DType::Q6_K : DType::Q4_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q4_k_m, p + "ffn_down.weight"), more ? DType::Q6_K : DType::Q4_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q5_k_m, p + "ffn_down.weight"), more ? DType::Q6_K : DType::Q5_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q4_k_s, p + "attn_v.weight"), layer < 4 ? DType::Q5_K : DType::Q4_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q4_k_s, p + "ffn_down.weight"), layer < 2 ? DType::Q5_K : DType::Q4_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q5_k_s, p + "ffn_down.weight"), DType::Q5_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q4_k_m, p + "attn_q.weight"), DType::Q4_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q4_k_m, p + "attn_norm.weight"), DType::F32);
    // Q3_K_M: attn_v Q5_K in the first 2 layers, ffn_down Q5_K in the first sixteenth (layer 0), Q4_K after.
    EXPECT_EQ(layer_type(LlamaCppMix::q3_k_m, p + "attn_v.weight"), layer < 2 ? DType::Q5_K : DType::Q4_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q3_k_m, p + "ffn_down.weight"), layer < 1 ? DType::Q5_K : DType::Q4_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q3_k_m, p + "attn_output.weight"), DType::Q4_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q3_k_m, p + "ffn_up.weight"), DType::Q3_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q3_k_l, p + "ffn_down.weight"), DType::Q5_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q3_k_s, p + "attn_v.weight"), DType::Q3_K);
    // Q2_K: attn_output and ffn_down Q3_K; this model's 4 query heads a KV head raise attn_v to Q4_K.
    EXPECT_EQ(layer_type(LlamaCppMix::q2_k, p + "attn_output.weight"), DType::Q3_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q2_k, p + "ffn_down.weight"), DType::Q3_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q2_k, p + "attn_v.weight"), DType::Q4_K);
    EXPECT_EQ(layer_type(LlamaCppMix::q2_k, p + "ffn_gate.weight"), DType::Q2_K);
    // IQ4_XS: attn_v Q5_K (4 query heads a KV head), ffn_down Q5_K in the first eighth unless an importance
    // matrix was given.
    EXPECT_EQ(layer_type(LlamaCppMix::iq4_xs, p + "attn_v.weight"), DType::Q5_K);
    EXPECT_EQ(layer_type(LlamaCppMix::iq4_xs, p + "ffn_down.weight"),
              layer < 2 ? DType::Q5_K : DType::IQ4_XS);
    const std::vector<DType> with_imatrix = llama_cpp_mix_types(*file, LlamaCppMix::iq4_nl, true);
    for (size_t i = 0; i < with_imatrix.size(); ++i) {
      if (file->tensors()[i].name == p + "ffn_down.weight") {
        EXPECT_EQ(with_imatrix[i], DType::IQ4_NL);
      }
    }
  }
  EXPECT_EQ(layer_type(LlamaCppMix::q4_k_s, "output.weight"), DType::Q6_K);
  EXPECT_EQ(layer_type(LlamaCppMix::q4_k_s, "token_embd.weight"), DType::Q4_K);
  EXPECT_EQ(parse_llama_cpp_mix("q4_k_m"), LlamaCppMix::q4_k_m);
  EXPECT_EQ(parse_llama_cpp_mix("q3_k_l"), LlamaCppMix::q3_k_l);
  EXPECT_EQ(parse_llama_cpp_mix("q3_k"), std::nullopt);
  EXPECT_EQ(parse_llama_cpp_mix("q4_k"), std::nullopt);

  // A tied head: token_embd is the head, Q6_K.
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const auto tied = GgufFile::open((fixtures / "models" / "fortune-target-f16.gguf").string());
  const std::vector<DType> tied_types = llama_cpp_mix_types(*tied, LlamaCppMix::q4_k_m);
  for (size_t i = 0; i < tied_types.size(); ++i) {
    if (tied->tensors()[i].name == "token_embd.weight") {
      EXPECT_EQ(tied_types[i], DType::Q6_K);
    }
  }
  // llama.cpp's own Q4_K_M of the small fixture: the same type for every tensor.
  const auto q4_k_m = GgufFile::open((fixtures / "models" / "small-llama-q4_k_m.gguf").string());
  const std::vector<DType> fixture_types = llama_cpp_mix_types(*q4_k_m, LlamaCppMix::q4_k_m);
  for (size_t i = 0; i < fixture_types.size(); ++i)
    EXPECT_EQ(fixture_types[i], q4_k_m->tensors()[i].type) << q4_k_m->tensors()[i].name;
}

// llama.cpp's Q2_K mix of the same small F16 model (tests/data/llama-cpp-q2_k), quantized by
// quantize_row_q2_K_ref, _q3_K_ref, _q4_K_ref and _q6_K_ref: Nibble's quantizers write the same bytes for
// every one of its matrices.
TEST(RequantizeTestData, Q2_KAndQ3_KEqualLlamaCppByteForByte) {
  test::TempDir dir;
  const auto source = GgufFile::open(write_small_model(dir.path(), "small-f16.gguf", DType::F16, 7));
  const auto llama_cpp =
      GgufFile::open((test::test_data_dir() / "llama-cpp-q2_k" / "small-llama-q2_k.gguf").string());
  std::map<DType, int> checked;
  for (const GgufTensorInfo& t : llama_cpp->tensors()) {
    if (t.dims.size() != 2) continue;
    const GgufTensorInfo* s = source->find_tensor(t.name);
    ASSERT_NE(s, nullptr) << t.name;
    const std::vector<uint8_t> ours = convert_tensor(*source, *s, t.type);
    ASSERT_EQ(ours.size(), t.size_bytes) << t.name;
    EXPECT_EQ(std::memcmp(ours.data(), llama_cpp->tensor_data(t), ours.size()), 0) << t.name;
    ++checked[t.type];
  }
  // The README's table.
  EXPECT_EQ(checked[DType::Q2_K], 9);
  EXPECT_EQ(checked[DType::Q3_K], 4);
  EXPECT_EQ(checked[DType::Q4_K], 2);
  EXPECT_EQ(checked[DType::Q6_K], 1);
}

// llama-quantize's Q2_K, IQ4_NL and IQ4_XS mixes of the committed llama.cpp files' F16 models (Q2_K and
// IQ4_XS on the small shape, IQ4_NL on the tiny one): every tensor's type and bytes are llama.cpp's.
TEST(RequantizeTestData, Q2_KIQ4_NLAndIQ4_XSMixesEqualLlamaCppByteForByte) {
  test::TempDir dir;
  const auto small = GgufFile::open(write_small_model(dir.path(), "small-f16.gguf", DType::F16, 7));
  const auto tiny = GgufFile::open(write_tiny_model(dir.path(), "tiny-f16.gguf", DType::F16, 7));
  struct Case {
    LlamaCppMix mix;
    const GgufFile* source;
    const char* file;
    uint32_t file_type;
  };
  for (const Case& c :
       {Case{LlamaCppMix::q2_k, small.get(), "llama-cpp-q2_k/small-llama-q2_k.gguf", 10},
        Case{LlamaCppMix::iq4_xs, small.get(), "llama-cpp-iq4_xs/small-llama-iq4_xs.gguf", 30},
        Case{LlamaCppMix::iq4_nl, tiny.get(), "llama-cpp-iq4_nl/tiny-llama-iq4_nl.gguf", 25}}) {
    SCOPED_TRACE(c.file);
    const std::string ours_path = (dir.path() / "mix.gguf").string();
    requantize_gguf(*c.source, ours_path, c.mix);
    const auto ours = GgufFile::open(ours_path);
    const auto theirs = GgufFile::open((test::test_data_dir() / c.file).string());
    const std::map<DType, int> count = expect_same_tensors(*ours, *theirs);
    EXPECT_EQ(ours->get_uint("general.file_type"), c.file_type);
    EXPECT_GT(count.at(llama_cpp_mix_default_type(c.mix)), 8);
  }
}

// llama-quantize's Q3_K_S / Q3_K_M / Q3_K_L mixes: on the small model every layer matrix is Q3_K but
// Q3_K_M's attn_v (Q5_K in the first two layers), ffn_down (Q5_K in the first sixteenth of the layers,
// none of 2, so Q4_K) and attn_output (Q4_K), Q3_K_L's three (Q5_K), and the Q6_K head; the bytes are
// those of the committed Q2_K file's Q3_K / Q4_K / Q6_K matrices where the types meet.
TEST(RequantizeTestData, Q3_KMixesOnTheSmallModel) {
  test::TempDir dir;
  const std::string f16 = write_small_model(dir.path(), "small-f16.gguf", DType::F16, 7);
  const auto source = GgufFile::open(f16);
  const auto llama_cpp =
      GgufFile::open((test::test_data_dir() / "llama-cpp-q2_k" / "small-llama-q2_k.gguf").string());
  const std::string ours_path = (dir.path() / "q3_k_m.gguf").string();
  requantize_gguf(*source, ours_path, LlamaCppMix::q3_k_m);
  const auto ours = GgufFile::open(ours_path);
  EXPECT_EQ(ours->get_uint("general.file_type"), 12u);  // LLAMA_FTYPE_MOSTLY_Q3_K_M
  std::map<DType, int> count;
  for (const GgufTensorInfo& t : ours->tensors()) {
    if (t.dims.size() != 2) continue;
    ++count[t.type];
    const GgufTensorInfo* theirs = llama_cpp->find_tensor(t.name);
    ASSERT_NE(theirs, nullptr);
    if (theirs->type == t.type) {
      EXPECT_EQ(std::memcmp(ours->tensor_data(t), llama_cpp->tensor_data(*theirs), t.size_bytes), 0)
          << t.name;
    }
  }
  EXPECT_EQ(ours->find_tensor("blk.0.attn_v.weight")->type, DType::Q5_K);
  EXPECT_EQ(ours->find_tensor("blk.1.attn_v.weight")->type, DType::Q5_K);
  EXPECT_EQ(ours->find_tensor("blk.0.ffn_down.weight")->type, DType::Q4_K);
  EXPECT_EQ(ours->find_tensor("blk.1.attn_output.weight")->type, DType::Q4_K);
  EXPECT_EQ(ours->find_tensor("output.weight")->type, DType::Q6_K);
  EXPECT_EQ(count[DType::Q3_K], 9);  // token_embd and attn_q / attn_k / ffn_gate / ffn_up of both layers
  auto types_of = [&](LlamaCppMix mix) {
    std::map<std::string, DType> types;
    const std::vector<DType> list = llama_cpp_mix_types(*source, mix);
    for (size_t i = 0; i < list.size(); ++i) types[source->tensors()[i].name] = list[i];
    return types;
  };
  const auto s = types_of(LlamaCppMix::q3_k_s);
  const auto l = types_of(LlamaCppMix::q3_k_l);
  for (const std::string name :
       {"blk.0.attn_v.weight", "blk.1.ffn_down.weight", "blk.1.attn_output.weight"}) {
    EXPECT_EQ(s.at(name), DType::Q3_K) << name;
    EXPECT_EQ(l.at(name), DType::Q5_K) << name;
  }
  EXPECT_EQ(l.at("blk.1.attn_q.weight"), DType::Q3_K);
  EXPECT_EQ(s.at("output.weight"), DType::Q6_K);
  EXPECT_EQ(llama_cpp_mix_file_type(LlamaCppMix::q3_k_s), 11u);
  EXPECT_EQ(llama_cpp_mix_file_type(LlamaCppMix::q3_k_l), 13u);
}

// llama-quantize's Q4_K_S mix of the tiny F16 model (tests/data/llama-cpp-q4_k_s): its rows of 128 are
// not a multiple of 256, so llama.cpp falls back to Q5_0 for Q4_K, Q5_1 for Q5_K and Q8_0 for the Q6_K
// head. Every tensor's type and every matrix's bytes must be llama.cpp's.
TEST(RequantizeTestData, TinyQ4_K_SFallsBackAsLlamaCppByteForByte) {
  test::TempDir dir;
  const std::string f16 = write_tiny_model(dir.path(), "tiny-f16.gguf", DType::F16, 7);
  const std::string ours_path = (dir.path() / "q4_k_s.gguf").string();
  requantize_gguf(*GgufFile::open(f16), ours_path, LlamaCppMix::q4_k_s);
  const auto ours = GgufFile::open(ours_path);
  const auto theirs =
      GgufFile::open((test::test_data_dir() / "llama-cpp-q4_k_s" / "tiny-llama-q4_k_s.gguf").string());
  std::map<DType, int> count = expect_same_tensors(*ours, *theirs);
  // The README's table: 11 Q5_0, the two attn_v Q5_1, the two ffn_down (rows of 256) Q4_K, a Q8_0 head.
  EXPECT_EQ(count[DType::Q5_0], 11);
  EXPECT_EQ(count[DType::Q5_1], 2);
  EXPECT_EQ(count[DType::Q4_K], 2);
  EXPECT_EQ(count[DType::Q8_0], 1);
  EXPECT_EQ(ours->get_uint("general.file_type"), 14u);
}

// llama.cpp's Q4_1 of the same model (tests/data/llama-cpp-q4_1), quantized by quantize_row_q4_1_ref:
// Nibble's Q4_1 quantizer writes the same bytes for all 15 Q4_1 matrices, and `--type q4_1` stores the
// 14 layer matrices as Q4_1 (the embedding and head as Q8_0, unless pure).
TEST(RequantizeTestData, Q4_1EqualsLlamaCppByteForByte) {
  test::TempDir dir;
  const auto source = GgufFile::open(write_tiny_model(dir.path(), "tiny-f16.gguf", DType::F16, 7));
  const auto llama_cpp =
      GgufFile::open((test::test_data_dir() / "llama-cpp-q4_1" / "tiny-llama-q4_1.gguf").string());
  int checked = 0;
  for (const GgufTensorInfo& t : llama_cpp->tensors()) {
    if (t.type != DType::Q4_1) continue;
    const GgufTensorInfo* s = source->find_tensor(t.name);
    ASSERT_NE(s, nullptr) << t.name;
    const std::vector<uint8_t> ours = convert_tensor(*source, *s, DType::Q4_1);
    ASSERT_EQ(ours.size(), t.size_bytes) << t.name;
    EXPECT_EQ(std::memcmp(ours.data(), llama_cpp->tensor_data(t), ours.size()), 0) << t.name;
    ++checked;
  }
  EXPECT_EQ(checked, 15);
  const std::string ours_path = (dir.path() / "q4_1.gguf").string();
  requantize_gguf(*source, ours_path, DType::Q4_1, false);
  const auto ours = GgufFile::open(ours_path);
  EXPECT_EQ(ours->get_uint("general.file_type"), 3u);
  EXPECT_EQ(ours->find_tensor("token_embd.weight")->type, DType::Q8_0);
  EXPECT_EQ(ours->find_tensor("output.weight")->type, DType::Q8_0);
  const GgufTensorInfo* up = ours->find_tensor("blk.1.ffn_up.weight");
  ASSERT_EQ(up->type, DType::Q4_1);
  EXPECT_EQ(std::memcmp(ours->tensor_data(*up), llama_cpp->tensor_data(*llama_cpp->find_tensor(up->name)),
                        up->size_bytes),
            0);
}

// Rows of 48 fit no block of 256 and no fallback block of 32 either: llama.cpp then stores F16; rows of 96
// (ffn_down) take the 32-blocks.
TEST(RequantizeTestData, MixFallsBackToF16WhereNoBlockFits) {
  test::TempDir dir;
  LlamaShape shape = llama_shape_by_name("tiny");
  shape.n_vocab = 354;
  shape.n_embd = 48;
  shape.n_ff = 96;
  const std::string path = (dir.path() / "odd.gguf").string();
  write_random_llama(path, shape, DType::F32, 3);
  const auto file = GgufFile::open(path);
  const std::vector<DType> types = llama_cpp_mix_types(*file, LlamaCppMix::q4_k_m);
  for (size_t i = 0; i < types.size(); ++i) {
    const GgufTensorInfo& t = file->tensors()[i];
    SCOPED_TRACE(t.name);
    if (t.dims.size() == 1) {
      EXPECT_EQ(types[i], DType::F32);
    } else if (t.name == "blk.0.ffn_down.weight") {
      EXPECT_EQ(types[i], DType::Q5_0);  // Q4_K's fallback (layer 0 is not a "more bits" layer)
    } else if (t.name == "blk.1.ffn_down.weight") {
      EXPECT_EQ(types[i], DType::Q8_0);  // Q6_K's fallback
    } else {
      EXPECT_EQ(types[i], DType::F16);
    }
  }
  const std::string out = (dir.path() / "odd-q4_k_m.gguf").string();
  requantize_gguf(*file, out, LlamaCppMix::q4_k_m);
  EXPECT_EQ(GgufFile::open(out)->find_tensor("blk.0.attn_q.weight")->type, DType::F16);
}

// `nibble quantize` holds one converted tensor at a time, not its whole output (llama-quantize streams
// likewise), and lets each input tensor's pages go once converted (a float model may be larger than
// memory): a 151 MiB F16 model widened to F32 (302 MiB), its peak resident memory as it reports it, less
// that of doing the same to a tiny model (the process and its libraries: ~20 MiB in the CPU build), stays
// under half the input; holding the output it is input + output, keeping the input's pages the input.
// (In the CPU build: 467 MiB before either, 176 MiB keeping the input, 34 MiB now, the tiny model 18.)
TEST(RequantizeMemory, QuantizeHoldsOneConvertedTensorAtATimeNotTheOutput) {
  test::TempDir dir;
  LlamaShape shape = llama_shape_by_name("small");
  shape.n_embd = 1024;
  shape.n_layer = 6;
  shape.n_head = 8;
  shape.n_head_kv = 8;
  shape.n_ff = 2816;
  shape.n_vocab = 1024;
  const fs::path in = dir.path() / "big-f16.gguf", out = dir.path() / "big-f32.gguf";
  write_random_llama(in.string(), shape, DType::F16, 3);
  const fs::path tiny = dir.path() / "tiny-f16.gguf", tiny_out = dir.path() / "tiny-f32.gguf";
  write_random_llama(tiny.string(), llama_shape_by_name("tiny"), DType::F16, 3);
  const auto quantize = [](const fs::path& from, const fs::path& to) {
    const test::CommandResult run = test::run_command(
        test::nibble_bin() + " quantize --model " + from.string() + " --out " + to.string() + " --type f32");
    EXPECT_EQ(run.exit_code, 0) << run.output;
    return test::reported_peak_bytes(run.output);
  };
  const long baseline = quantize(tiny, tiny_out);
  const long peak = quantize(in, out);
  ASSERT_GT(baseline, 0) << "nibble quantize reported no peak memory on the tiny model";
  ASSERT_GT(peak, 0) << "nibble quantize reported no peak memory";
  const auto in_bytes = static_cast<long>(fs::file_size(in)),
             out_bytes = static_cast<long>(fs::file_size(out));
  ASSERT_GT(out_bytes, 300'000'000);
  EXPECT_LT(peak - baseline, in_bytes / 2)
      << "peak " << peak / 1048576 << " MiB (a tiny model's " << baseline / 1048576 << " MiB) for "
      << in_bytes / 1048576 << " MiB in, " << out_bytes / 1048576 << " MiB out";
  std::printf("[ info ] nibble quantize: peak %ld MiB, a tiny model's %ld MiB, for %ld MiB in, %ld MiB out\n",
              peak / 1048576, baseline / 1048576, in_bytes / 1048576, out_bytes / 1048576);
  // The file is the one the library writes.
  const fs::path lib = dir.path() / "lib-f32.gguf";
  requantize_gguf(*GgufFile::open(in.string()), lib.string(), DType::F32, false);
  EXPECT_EQ(test::read_file_bytes(out), test::read_file_bytes(lib));
}

}  // namespace
}  // namespace nibble::model
