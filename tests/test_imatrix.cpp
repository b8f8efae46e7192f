// Importance matrices (llama.cpp's imatrix): the file formats (model/imatrix), the statistics Nibble's
// forward pass collects (worker/importance), and quantization weighted by them (`nibble quantize
// --imatrix`), through the real binary too.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "kernels/quantize.hpp"
#include "model/gguf.hpp"
#include "model/imatrix.hpp"
#include "model/llama_config.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"
#include "worker/evaluation.hpp"
#include "worker/importance.hpp"
#include "worker/llama_model.hpp"

namespace nibble {
namespace {

namespace fs = std::filesystem;
using kernels::DType;

model::ImportanceMatrix sample_imatrix() {
  model::ImportanceMatrix m;
  m.entries["blk.0.attn_q.weight"] = {{1.0f, 4.0f, 9.0f, 0.5f}, 2};
  m.entries["blk.0.ffn_down.weight"] = {{3.0f, 6.0f}, 0};
  m.datasets = {"calibration.txt"};
  m.chunk_count = 7;
  m.chunk_size = 512;
  return m;
}

TEST(Imatrix, GgufRoundTripAndImportanceRows) {
  test::TempDir dir;
  const std::string path = (dir.path() / "imatrix.gguf").string();
  model::write_imatrix(sample_imatrix(), path);
  // llama.cpp's layout: general.type, the three imatrix keys, <name>.in_sum2 and <name>.counts in F32.
  const auto file = model::GgufFile::open(path);
  EXPECT_EQ(file->get_string("general.type"), "imatrix");
  EXPECT_EQ(file->get_uint("imatrix.chunk_count"), 7u);
  EXPECT_EQ(file->get_uint("imatrix.chunk_size"), 512u);
  ASSERT_NE(file->find_tensor("blk.0.attn_q.weight.in_sum2"), nullptr);
  EXPECT_EQ(file->find_tensor("blk.0.attn_q.weight.counts")->type, DType::F32);
  const model::ImportanceMatrix back = model::read_imatrix(path);
  EXPECT_EQ(back.datasets, std::vector<std::string>{"calibration.txt"});
  EXPECT_EQ(back.entries.at("blk.0.attn_q.weight").count, 2);
  EXPECT_EQ(back.importance("blk.0.attn_q.weight"), (std::vector<float>{0.5f, 2.0f, 4.5f, 0.25f}));
  EXPECT_EQ(back.importance("blk.0.ffn_down.weight"), (std::vector<float>{1.0f, 1.0f}));  // nothing counted
  EXPECT_EQ(back.importance("output.weight"), std::nullopt);
}

// llama.cpp's legacy .dat: int32 entries; per entry name length, name, ncall, nval, the values (averages
// times ncall); then the chunk count and the dataset name.
TEST(Imatrix, ReadsTheLegacyDatFormat) {
  test::TempDir dir;
  const fs::path path = dir.path() / "imatrix.dat";
  {
    std::ofstream out(path, std::ios::binary);
    auto i32 = [&](int32_t v) { out.write(reinterpret_cast<const char*>(&v), 4); };
    i32(1);
    const std::string name = "blk.3.ffn_up.weight";
    i32(static_cast<int32_t>(name.size()));
    out.write(name.data(), static_cast<std::streamsize>(name.size()));
    i32(4);  // ncall
    i32(3);  // nval
    const float values[3] = {8.0f, 2.0f, 0.0f};
    out.write(reinterpret_cast<const char*>(values), sizeof values);
    i32(10);
    const std::string dataset = "wiki.train.raw";
    i32(static_cast<int32_t>(dataset.size()));
    out.write(dataset.data(), static_cast<std::streamsize>(dataset.size()));
  }
  const model::ImportanceMatrix m = model::read_imatrix(path.string());
  EXPECT_EQ(m.importance("blk.3.ffn_up.weight"), (std::vector<float>{2.0f, 0.5f, 0.0f}));
  EXPECT_EQ(m.chunk_count, 10);
  EXPECT_EQ(m.datasets, std::vector<std::string>{"wiki.train.raw"});
}

void expect_read_error(const fs::path& path, const std::string& needle) {
  try {
    model::read_imatrix(path.string());
    ADD_FAILURE() << "read " << path << " without an error";
  } catch (const model::GgufError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Imatrix, BadFilesAreClearErrors) {
  test::TempDir dir;
  // A model, not an imatrix.
  model::LlamaShape shape = model::llama_shape_by_name("tiny");
  shape.n_vocab = 354;
  const fs::path model_path = dir.path() / "model.gguf";
  model::write_random_llama(model_path.string(), shape, DType::F16, 1);
  expect_read_error(model_path, "no '<tensor>.in_sum2' tensors");
  // Sums without counts; expert entries (several counts).
  model::GgufWriter sums_only;
  std::vector<uint8_t> four_floats(16, 0);
  sums_only.add_tensor("blk.0.attn_q.weight.in_sum2", {4, 1}, DType::F32, four_floats);
  sums_only.write((dir.path() / "sums.gguf").string());
  expect_read_error(dir.path() / "sums.gguf", "has sums but no counts");
  model::GgufWriter experts;
  experts.add_tensor("blk.0.ffn_up_exps.weight.in_sum2", {2, 2}, DType::F32, four_floats);
  experts.add_tensor("blk.0.ffn_up_exps.weight.counts", {1, 2}, DType::F32, std::vector<uint8_t>(8, 0));
  experts.write((dir.path() / "experts.gguf").string());
  expect_read_error(dir.path() / "experts.gguf", "mixture of experts");
  // Not GGUF, and not a legacy file either.
  std::ofstream(dir.path() / "text.dat") << "hello";
  expect_read_error(dir.path() / "text.dat", "not an imatrix");
  // A legacy file cut short.
  {
    std::ofstream out(dir.path() / "cut.dat", std::ios::binary);
    const int32_t header[4] = {1, 4, 0, 0};
    out.write(reinterpret_cast<const char*>(header), 8);
    out.write("blk.", 4);
  }
  expect_read_error(dir.path() / "cut.dat", "truncated");
}

// Layer 0's attention projections read RMSNorm(embedding) · attn_norm: their entries must be the sum of
// its squares over the window's tokens, computed here from the file's F32 tensors alone; q, k and v share
// it; every layer matrix has an entry counted over every token.
TEST(ImatrixCollect, Layer0EntriesAreTheNormedEmbeddingsSquares) {
  test::TempDir dir;
  model::LlamaShape shape = model::llama_shape_by_name("tiny");
  shape.n_vocab = 354;
  const std::string path = (dir.path() / "f32.gguf").string();
  model::write_random_llama(path, shape, DType::F32, 5);
  auto llama = worker::LlamaModel::load(path);
  kernels::ThreadPool pool(2);
  std::vector<std::vector<int32_t>> windows = {
      {1, 40, 41, 42, 300, 7, 7, 9, 100, 101, 102, 103, 104, 105, 106, 107, 200, 201},
      {1, 2, 3}};  // too short: skipped, as llama-imatrix does
  const model::ImportanceMatrix m = worker::collect_importance(*llama, pool, windows);
  EXPECT_EQ(m.chunk_count, 1);
  EXPECT_EQ(m.entries.size(), static_cast<size_t>(7 * shape.n_layer));
  for (const auto& [name, e] : m.entries) EXPECT_EQ(e.count, 18) << name;

  const auto file = model::GgufFile::open(path);
  const std::vector<float> embd = test::dequantize_tensor(*file, *file->find_tensor("token_embd.weight"));
  const std::vector<float> norm =
      test::dequantize_tensor(*file, *file->find_tensor("blk.0.attn_norm.weight"));
  const int64_t n = shape.n_embd;
  std::vector<double> want(static_cast<size_t>(n), 0.0);
  for (int32_t token : windows[0]) {
    const float* x = embd.data() + token * n;
    double ss = 0;
    for (int64_t j = 0; j < n; ++j) ss += static_cast<double>(x[j]) * x[j];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(n) + 1e-5);
    for (int64_t j = 0; j < n; ++j)
      want[static_cast<size_t>(j)] += std::pow(x[j] * inv * norm[static_cast<size_t>(j)], 2);
  }
  const auto& q = m.entries.at("blk.0.attn_q.weight").sums;
  ASSERT_EQ(q.size(), static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j)
    EXPECT_NEAR(q[static_cast<size_t>(j)], want[static_cast<size_t>(j)], 1e-4 * want[static_cast<size_t>(j)])
        << j;
  EXPECT_EQ(m.entries.at("blk.0.attn_k.weight").sums, q);
  EXPECT_EQ(m.entries.at("blk.0.attn_v.weight").sums, q);
  EXPECT_EQ(m.entries.at("blk.1.ffn_gate.weight").sums, m.entries.at("blk.1.ffn_up.weight").sums);
  EXPECT_EQ(m.entries.at("blk.1.ffn_down.weight").sums.size(), static_cast<size_t>(shape.n_ff));
}

// Quantizing with the importance moves the error where the inputs are large: on the calibration text's
// own windows the weighted Q4_K file's layer outputs are closer to the float model's (measured as the
// importance-weighted squared error of every layer matrix, the quantity the weights stand for).
TEST(ImatrixQuantize, WeightedMatricesHaveLessImportanceWeightedError) {
  test::TempDir dir;
  model::LlamaShape shape = model::llama_shape_by_name("small");
  shape.n_vocab = 354;
  const std::string f16 = (dir.path() / "f16.gguf").string();
  model::write_random_llama(f16, shape, DType::F16, 7);
  model::ImportanceMatrix m;
  auto llama = worker::LlamaModel::load(f16);
  kernels::ThreadPool pool(2);
  std::vector<std::vector<int32_t>> windows;
  for (int w = 0; w < 4; ++w) {
    std::vector<int32_t> window{1};
    for (int t = 1; t < 64; ++t) window.push_back(3 + (w * 61 + t * 37) % 350);
    windows.push_back(window);
  }
  m = worker::collect_importance(*llama, pool, windows);
  const auto source = model::GgufFile::open(f16);
  const std::string plain = (dir.path() / "plain.gguf").string(),
                    weighted = (dir.path() / "weighted.gguf").string();
  model::requantize_gguf(*source, plain, DType::Q4_K, false);
  model::requantize_gguf(*source, weighted, DType::Q4_K, false, &m);
  const auto p = model::GgufFile::open(plain), w = model::GgufFile::open(weighted);
  EXPECT_EQ(w->get_uint("quantize.imatrix.entries_count"), 14u);
  int better = 0, checked = 0;
  for (const auto& [name, e] : m.entries) {
    const std::vector<float> importance = *m.importance(name);
    const std::vector<float> exact = test::dequantize_tensor(*source, *source->find_tensor(name));
    const std::vector<float> a = test::dequantize_tensor(*p, *p->find_tensor(name));
    const std::vector<float> b = test::dequantize_tensor(*w, *w->find_tensor(name));
    double err_a = 0, err_b = 0;
    for (size_t i = 0; i < exact.size(); ++i) {
      const double imp = importance[i % importance.size()];
      err_a += imp * std::pow(a[i] - exact[i], 2);
      err_b += imp * std::pow(b[i] - exact[i], 2);
    }
    better += err_b < err_a;
    ++checked;
  }
  EXPECT_EQ(checked, 14);
  EXPECT_EQ(better, checked);
  // The head and embedding have no entry: the same bytes either way.
  const model::GgufTensorInfo* head = w->find_tensor("output.weight");
  EXPECT_EQ(
      std::memcmp(w->tensor_data(*head), p->tensor_data(*p->find_tensor("output.weight")), head->size_bytes),
      0);
}

TEST(ImatrixQuantize, MismatchedEntriesAreRefusedAndQ4_0IsWeighed) {
  test::TempDir dir;
  model::LlamaShape shape = model::llama_shape_by_name("small");
  shape.n_vocab = 354;
  const std::string f16 = (dir.path() / "f16.gguf").string();
  model::write_random_llama(f16, shape, DType::F16, 7);
  const auto source = model::GgufFile::open(f16);
  model::ImportanceMatrix m;
  m.entries["blk.0.attn_q.weight"] = {std::vector<float>(256, 1.0f), 1};
  // Q4_0 with an entry for attn_q: that matrix alone differs from the unweighted file (llama.cpp's
  // quantize_row_q4_0_impl keeps the fitted levels where the reference re-rounds them).
  const std::string weighted = (dir.path() / "q4_0-imatrix.gguf").string();
  const std::string plain = (dir.path() / "q4_0.gguf").string();
  model::requantize_gguf(*source, weighted, DType::Q4_0, false, &m);
  model::requantize_gguf(*source, plain, DType::Q4_0, false);
  const auto w = model::GgufFile::open(weighted), p = model::GgufFile::open(plain);
  for (const model::GgufTensorInfo& t : w->tensors()) {
    const bool same =
        std::memcmp(w->tensor_data(t), p->tensor_data(*p->find_tensor(t.name)), t.size_bytes) == 0;
    EXPECT_EQ(same, t.name != "blk.0.attn_q.weight") << t.name;
  }
  m.entries["blk.0.attn_q.weight"] = {std::vector<float>(100, 1.0f), 1};
  try {
    model::requantize_gguf(*source, (dir.path() / "q4_k.gguf").string(), DType::Q4_K, false, &m);
    ADD_FAILURE() << "an entry of the wrong length was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("has 100 values"), std::string::npos) << e.what();
  }
}

// Through the binary: `nibble eval imatrix` writes a file `nibble quantize --imatrix` reads; --imatrix with
// gptq is refused.
TEST(ImatrixCli, EvalImatrixThenQuantize) {
  test::TempDir dir;
  model::LlamaShape shape = model::llama_shape_by_name("small");
  shape.n_vocab = 354;
  const std::string f16 = (dir.path() / "f16.gguf").string();
  model::write_random_llama(f16, shape, DType::F16, 7);
  const std::string text = (test::test_data_dir() / "calibration-text.txt").string();
  const std::string imatrix = (dir.path() / "imatrix.gguf").string();
  auto r = test::run_command(test::nibble_bin() + " eval imatrix -m " + f16 + " --text " + text +
                             " --ctx 64 --chunks 5 -t 2 -o " + imatrix);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const model::ImportanceMatrix m = model::read_imatrix(imatrix);
  EXPECT_EQ(m.entries.size(), 14u);
  EXPECT_EQ(m.chunk_count, 5);
  EXPECT_EQ(m.chunk_size, 64);
  EXPECT_EQ(m.datasets, std::vector<std::string>{"calibration-text.txt"});
  EXPECT_EQ(m.entries.at("blk.1.ffn_down.weight").count, 5 * 64);
  const std::string out = (dir.path() / "q4_k_m.gguf").string();
  r = test::run_command(test::nibble_bin() + " quantize -m " + f16 + " -o " + out +
                        " --type q4_k_m --imatrix " + imatrix);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto file = model::GgufFile::open(out);
  EXPECT_EQ(file->get_uint("quantize.imatrix.entries_count"), 14u);
  EXPECT_EQ(file->get_string("quantize.imatrix.dataset"), "calibration-text.txt");
  r = test::run_command(test::nibble_bin() + " quantize -m " + f16 + " -o " + out +
                        " --type q4_k --method gptq --calib " + text + " --imatrix " + imatrix);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("--imatrix weighs round-to-nearest"), std::string::npos) << r.output;
}

// llama.cpp's own files (tests/data/llama-cpp-imatrix): llama-imatrix's statistics of the small F16
// model on the calibration text (128-token chunks, 40 of them) and llama-quantize's Q3_K_M made with
// them. Nibble reads the imatrix, computes the same statistics itself, and quantizes the same file.
class LlamaCppImatrix : public ::testing::Test {
 protected:
  void SetUp() override {
    model::LlamaShape shape = model::llama_shape_by_name("small");
    shape.n_vocab = 354;
    f16_ = (dir_.path() / "small-f16.gguf").string();
    model::write_random_llama(f16_, shape, DType::F16, 7);
  }
  static fs::path data(const std::string& name) { return test::test_data_dir() / "llama-cpp-imatrix" / name; }
  test::TempDir dir_;
  std::string f16_;
};

TEST_F(LlamaCppImatrix, ReadsLlamaImatrixsFile) {
  const model::ImportanceMatrix m = model::read_imatrix(data("small-llama.imatrix.gguf").string());
  EXPECT_EQ(m.entries.size(), 14u);  // 2 layers x 7 matrices: llama-imatrix skips the head by default
  EXPECT_EQ(m.chunk_count, 40);
  EXPECT_EQ(m.chunk_size, 128);
  EXPECT_EQ(m.datasets, std::vector<std::string>{"tests/data/calibration-text.txt"});
  for (const auto& [name, e] : m.entries) {
    EXPECT_EQ(e.count, 40 * 128) << name;
    EXPECT_EQ(e.sums.size(), name.find("ffn_down") != std::string::npos ? 768u : 256u) << name;
  }
}

// The same windows through Nibble's forward pass: the same entries and counts, sums within float
// summation order (llama.cpp's activations take another path through its F16 products).
TEST_F(LlamaCppImatrix, NibblesStatisticsEqualLlamaImatrixs) {
  const model::ImportanceMatrix theirs = model::read_imatrix(data("small-llama.imatrix.gguf").string());
  auto llama = worker::LlamaModel::load(f16_);
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(f16_));
  std::ifstream in(test::test_data_dir() / "calibration-text.txt", std::ios::binary);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto windows = worker::evaluation_windows(tokenizer->encode(text, true), 128, tokenizer->bos_id());
  windows.resize(40);
  kernels::ThreadPool pool(2);
  const model::ImportanceMatrix ours = worker::collect_importance(*llama, pool, windows);
  ASSERT_EQ(ours.entries.size(), theirs.entries.size());
  for (const auto& [name, e] : theirs.entries) {
    const model::ImatrixEntry& mine = ours.entries.at(name);
    EXPECT_EQ(mine.count, e.count) << name;
    ASSERT_EQ(mine.sums.size(), e.sums.size()) << name;
    double err = 0, norm = 0;
    for (size_t i = 0; i < e.sums.size(); ++i) {
      err += std::pow(static_cast<double>(mine.sums[i]) - e.sums[i], 2);
      norm += static_cast<double>(e.sums[i]) * e.sums[i];
    }
    EXPECT_LT(std::sqrt(err / norm), 1e-3) << name;
  }
}

// llama-quantize --imatrix small-llama.imatrix.gguf ... Q3_K_M: Nibble's --imatrix gives every tensor's
// bytes (Q3_K, Q4_K and Q5_K matrices weighted, the head and embedding, which have no entry, not).
TEST_F(LlamaCppImatrix, QuantizeEqualsLlamaQuantizeByteForByte) {
  const model::ImportanceMatrix m = model::read_imatrix(data("small-llama.imatrix.gguf").string());
  const std::string ours_path = (dir_.path() / "q3_k_m.gguf").string();
  model::requantize_gguf(*model::GgufFile::open(f16_), ours_path, model::LlamaCppMix::q3_k_m, &m);
  const auto ours = model::GgufFile::open(ours_path);
  const auto theirs = model::GgufFile::open(data("small-llama-q3_k_m-imatrix.gguf").string());
  std::map<DType, int> count;
  for (const model::GgufTensorInfo& t : theirs->tensors()) {
    const model::GgufTensorInfo* mine = ours->find_tensor(t.name);
    ASSERT_NE(mine, nullptr) << t.name;
    ASSERT_EQ(mine->type, t.type) << t.name;
    ASSERT_EQ(mine->size_bytes, t.size_bytes) << t.name;
    EXPECT_EQ(std::memcmp(ours->tensor_data(*mine), theirs->tensor_data(t), t.size_bytes), 0) << t.name;
    ++count[t.type];
  }
  EXPECT_EQ(count[DType::Q3_K], 9);
  EXPECT_EQ(count[DType::Q4_K], 4);
  EXPECT_EQ(count[DType::Q5_K], 2);
  EXPECT_EQ(ours->get_uint("quantize.imatrix.entries_count"),
            theirs->get_uint("quantize.imatrix.entries_count"));
  EXPECT_EQ(ours->get_uint("quantize.imatrix.chunks_count"), 40u);
  EXPECT_EQ(ours->get_string("quantize.imatrix.dataset"), theirs->get_string("quantize.imatrix.dataset"));
}

}  // namespace
}  // namespace nibble
