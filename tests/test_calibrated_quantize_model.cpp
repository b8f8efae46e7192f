// Calibrated quantization of whole models (`nibble quantize --method gptq|awq`): on held-out token
// windows the GPTQ model's logits are closer to the float model's than RTN's, on a project-made
// random model and on the fortune fixture; AWQ's folded scales keep the model's function; the
// output's metadata and types; the CLI keeps RTN as it was and explains bad options.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "model/calibration.hpp"
#include "model/gguf.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"
#include "worker/calibrated_quantize.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {
namespace {

namespace fs = std::filesystem;
using kernels::DType;

using test::calibration_part;
using test::held_out_part;

// Logits [windows * length, n_vocab] of a model over token windows.
std::vector<float> window_logits(const std::string& path, const std::vector<std::vector<int32_t>>& windows) {
  const auto m = LlamaModel::load(path);
  const int64_t length = static_cast<int64_t>(windows.at(0).size());
  const int64_t blocks = (length + 15) / 16;
  KvCache cache(m->config(), blocks, 16);
  std::vector<int32_t> table(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
  kernels::ThreadPool pool(2);
  std::vector<float> all, logits;
  for (const auto& w : windows) {
    m->forward(ForwardBatch::single(w, 0, table, true), cache, pool, logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

struct Closeness {
  double rel_rms = 0;  // ||got − want|| / ||want|| over all logits
  double kl = 0;       // mean KL(softmax(want) || softmax(got)) per position
};
Closeness closeness(const std::vector<float>& want, const std::vector<float>& got, int64_t n_vocab) {
  Closeness c;
  double err = 0, norm = 0;
  const int64_t rows = static_cast<int64_t>(want.size()) / n_vocab;
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = want.data() + r * n_vocab;
    const float* q = got.data() + r * n_vocab;
    double max_p = p[0], max_q = q[0];
    for (int64_t v = 0; v < n_vocab; ++v) {
      err += (static_cast<double>(q[v]) - p[v]) * (static_cast<double>(q[v]) - p[v]);
      norm += static_cast<double>(p[v]) * p[v];
      max_p = std::max(max_p, static_cast<double>(p[v]));
      max_q = std::max(max_q, static_cast<double>(q[v]));
    }
    double sum_p = 0, sum_q = 0;
    for (int64_t v = 0; v < n_vocab; ++v) {
      sum_p += std::exp(p[v] - max_p);
      sum_q += std::exp(q[v] - max_q);
    }
    const double log_zp = max_p + std::log(sum_p), log_zq = max_q + std::log(sum_q);
    for (int64_t v = 0; v < n_vocab; ++v) {
      const double lp = p[v] - log_zp, lq = q[v] - log_zq;
      c.kl += std::exp(lp) * (lp - lq);
    }
  }
  c.rel_rms = std::sqrt(err / norm);
  c.kl /= static_cast<double>(rows);
  return c;
}

struct Comparison {
  Closeness rtn, calibrated;
};

// Quantizes `source` with RTN and with `options`, and compares both with the source's logits on
// held-out windows.
Comparison compare_with_rtn(const fs::path& source, const fs::path& dir, CalibratedQuantizeOptions options,
                            int64_t held_out_windows, int64_t held_out_length) {
  const auto file = model::GgufFile::open(source.string());
  const fs::path rtn = dir / "rtn.gguf", calibrated = dir / "calibrated.gguf";
  model::requantize_gguf(*file, rtn.string(), options.type, false);
  options.calibration_name = "ARCHITECTURE.md[:70%]";
  calibrated_quantize_gguf(file, calibration_part(), calibrated.string(), options);

  const auto tokenizer = model::Tokenizer::from_gguf(*file);
  const auto windows =
      model::calibration_windows(*tokenizer, held_out_part(), held_out_windows, held_out_length, 1234);
  const std::vector<float> want = window_logits(source.string(), windows);
  const int64_t n_vocab = static_cast<int64_t>(file->get_uint("llama.vocab_size"));
  Comparison c;
  c.rtn = closeness(want, window_logits(rtn.string(), windows), n_vocab);
  c.calibrated = closeness(want, window_logits(calibrated.string(), windows), n_vocab);
  std::printf("%s %s: logits rel. RMS %.4f (RTN %.4f, ratio %.2f), KL %.5f (RTN %.5f, ratio %.2f)\n",
              quant_method_name(options.method), kernels::type_name(options.type), c.calibrated.rel_rms,
              c.rtn.rel_rms, c.calibrated.rel_rms / c.rtn.rel_rms, c.calibrated.kl, c.rtn.kl,
              c.calibrated.kl / c.rtn.kl);
  return c;
}

CalibratedQuantizeOptions small_calibration(QuantMethod method, DType type) {
  CalibratedQuantizeOptions o;
  o.method = method;
  o.type = type;
  o.samples = 16;
  o.length = 128;
  o.seed = 5;
  o.threads = 2;
  return o;
}

// A 2-layer random model whose rows are 256 or 512 long, as the K-quant grids need (4 query heads).
model::LlamaShape rows_of_256(int64_t n_head_kv) {
  model::LlamaShape shape;
  shape.n_embd = 256;
  shape.n_layer = 2;
  shape.n_head = 4;
  shape.n_head_kv = n_head_kv;
  shape.n_ff = 512;
  shape.n_vocab = 1024;
  shape.n_ctx = 256;
  return shape;
}

TEST(CalibratedQuantizeModel, GptqOnRandomModelIsCloserToFloatThanRtn) {
  test::TempDir dir;
  const fs::path source = dir.path() / "tiny-f32.gguf";
  model::write_random_llama(source.string(), model::llama_shape_by_name("tiny"), DType::F32, 3);
  const Comparison c =
      compare_with_rtn(source, dir.path(), small_calibration(QuantMethod::gptq, DType::Q4_0), 8, 96);
  EXPECT_LT(c.calibrated.rel_rms, 0.9 * c.rtn.rel_rms);
  EXPECT_LT(c.calibrated.kl, 0.9 * c.rtn.kl);

  // The file says how it was made, and only the layer matrices changed type.
  const auto out = model::GgufFile::open((dir.path() / "calibrated.gguf").string());
  EXPECT_EQ(out->get_string("nibble.quantization.method"), "gptq");
  EXPECT_EQ(out->get_string("nibble.quantization.calibration_file"), "ARCHITECTURE.md[:70%]");
  EXPECT_EQ(out->get_uint("nibble.quantization.calibration_samples"), 16u);
  EXPECT_EQ(out->get_uint("nibble.quantization.calibration_length"), 128u);
  EXPECT_EQ(out->get_uint("general.file_type"), 2u);
  const auto rtn = model::GgufFile::open((dir.path() / "rtn.gguf").string());
  for (const model::GgufTensorInfo& t : out->tensors()) {
    EXPECT_EQ(t.type, rtn->find_tensor(t.name)->type) << t.name;
    if (t.name.rfind("blk.", 0) != 0) {  // embedding, head, output norm: byte for byte RTN's
      ASSERT_EQ(t.size_bytes, rtn->find_tensor(t.name)->size_bytes);
      EXPECT_EQ(std::memcmp(out->tensor_data(t), rtn->tensor_data(*rtn->find_tensor(t.name)), t.size_bytes),
                0)
          << t.name;
    }
  }
}

TEST(CalibratedQuantizeModel, AwqFoldsScalesWithoutChangingTheModel) {
  // Multi-head attention (n_head == n_head_kv), so attn_output's scales are folded into attn_v too,
  // and rows of 256 so that Q4_K applies. A wrong fold would wreck the logits; a right one keeps the
  // AWQ model about as close to the float model as RTN or closer (random weights and activations
  // have no outlier channels for AWQ to exploit, so it need not gain much here).
  test::TempDir dir;
  const model::LlamaShape shape = rows_of_256(/*n_head_kv=*/4);
  const fs::path source = dir.path() / "mha-f32.gguf";
  model::write_random_llama(source.string(), shape, DType::F32, 4);
  for (const DType type : {DType::Q4_0, DType::Q4_K}) {
    const Comparison c =
        compare_with_rtn(source, dir.path(), small_calibration(QuantMethod::awq, type), 6, 96);
    EXPECT_LT(c.calibrated.rel_rms, c.rtn.rel_rms) << kernels::type_name(type);
    const auto out = model::GgufFile::open((dir.path() / "calibrated.gguf").string());
    EXPECT_EQ(out->find_tensor("blk.1.attn_v.weight")->type, type);
    EXPECT_EQ(out->find_tensor("blk.1.attn_norm.weight")->type, DType::F32);
  }
}

// GPTQ into llama-quantize's Q2_K, Q3_K_M, Q4_K_M and Q5_K_M mixes: the mix's type for every tensor, every
// layer matrix calibrated on its type's grid (Q2_K ... Q6_K; closer to the float model than the RTN mix on
// held-out windows), the embedding and the Q6_K head rounded to nearest, byte for byte llama.cpp's (the
// RTN mix).
TEST(CalibratedQuantizeModel, GptqIntoTheLlamaCppQ3_K_MQ4_K_MAndQ5_K_MMixes) {
  test::TempDir dir;
  const model::LlamaShape shape = rows_of_256(/*n_head_kv=*/2);
  const fs::path source = dir.path() / "f32.gguf";
  model::write_random_llama(source.string(), shape, DType::F32, 4);
  const auto file = model::GgufFile::open(source.string());
  const auto tokenizer = model::Tokenizer::from_gguf(*file);
  const auto windows = model::calibration_windows(*tokenizer, held_out_part(), 6, 96, 1234);
  const std::vector<float> want = window_logits(source.string(), windows);

  struct Mix {
    model::LlamaCppMix mix;
    const char* name;
    DType calibrated_type;
    uint32_t file_type;
    int calibrated, q6_k;  // layer matrices GPTQ changes; Q6_K tensors (rounded to nearest)
  };
  // Q4_K_M / Q5_K_M: 2 layers x 7 matrices, layer 1's Q6_K attn_v and ffn_down on the Q6_K grid (those two
  // and the head Q6_K, which stays rounded to nearest). Q3_K_M: every layer matrix has a grid (Q3_K; attn_v
  // Q5_K, attn_output and ffn_down Q4_K); Q2_K too (Q2_K; attn_output, ffn_down and, with 2 query heads a KV
  // head, attn_v Q3_K).
  for (const Mix& m : {Mix{model::LlamaCppMix::q4_k_m, "q4_k_m", DType::Q4_K, 15, 14, 3},
                       Mix{model::LlamaCppMix::q5_k_m, "q5_k_m", DType::Q5_K, 17, 14, 3},
                       Mix{model::LlamaCppMix::q3_k_m, "q3_k_m", DType::Q3_K, 12, 14, 1},
                       Mix{model::LlamaCppMix::q2_k, "q2_k", DType::Q2_K, 10, 14, 1}}) {
    SCOPED_TRACE(m.name);
    const fs::path rtn = dir.path() / (std::string("rtn-") + m.name + ".gguf");
    const fs::path gptq = dir.path() / (std::string("gptq-") + m.name + ".gguf");
    model::requantize_gguf(*file, rtn.string(), m.mix);
    CalibratedQuantizeOptions options = small_calibration(QuantMethod::gptq, DType::Q4_0);
    use_llama_cpp_mix(*file, m.mix, options);
    EXPECT_EQ(options.type, m.calibrated_type);
    options.calibration_name = "ARCHITECTURE.md[:70%]";
    calibrated_quantize_gguf(file, calibration_part(), gptq.string(), options);

    const auto r = model::GgufFile::open(rtn.string());
    const auto g = model::GgufFile::open(gptq.string());
    EXPECT_EQ(g->get_uint("general.file_type"), m.file_type);  // LLAMA_FTYPE_MOSTLY_Q4_K_M / Q5_K_M
    int calibrated = 0, q6_k = 0;
    for (const model::GgufTensorInfo& t : g->tensors()) {
      const model::GgufTensorInfo& same_tensor = *r->find_tensor(t.name);
      ASSERT_EQ(t.type, same_tensor.type) << t.name;
      ASSERT_EQ(t.size_bytes, same_tensor.size_bytes) << t.name;
      const bool same = std::memcmp(g->tensor_data(t), r->tensor_data(same_tensor), t.size_bytes) == 0;
      q6_k += t.type == DType::Q6_K;
      if (model::QuantGrid::for_gguf_type(t.type) && t.name.rfind("blk.", 0) == 0) {
        calibrated += !same;
      } else {
        EXPECT_TRUE(same) << t.name << " should be the RTN mix's bytes";
      }
    }
    EXPECT_EQ(calibrated, m.calibrated);
    EXPECT_EQ(q6_k, m.q6_k);

    const Closeness c_rtn = closeness(want, window_logits(rtn.string(), windows), shape.n_vocab);
    const Closeness c_gptq = closeness(want, window_logits(gptq.string(), windows), shape.n_vocab);
    std::printf("gptq %s: logits rel. RMS %.4f (RTN mix %.4f), KL %.5f (RTN mix %.5f)\n", m.name,
                c_gptq.rel_rms, c_rtn.rel_rms, c_gptq.kl, c_rtn.kl);
    EXPECT_LT(c_gptq.rel_rms, 0.9 * c_rtn.rel_rms);
    EXPECT_LT(c_gptq.kl, 0.9 * c_rtn.kl);
  }

  // AWQ takes no per-tensor types: refused by name.
  CalibratedQuantizeOptions awq = small_calibration(QuantMethod::awq, DType::Q4_K);
  try {
    use_llama_cpp_mix(*file, model::LlamaCppMix::q4_k_m, awq);
    ADD_FAILURE() << "AWQ accepted a mix";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("awq does not write llama-quantize's mixes"), std::string::npos)
        << e.what();
  }
}

TEST(CalibratedQuantizeModel, FortuneTargetGptqIsCloserToF16ThanRtn) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const fs::path source = fixtures / "models" / "fortune-target-f16.gguf";
  if (!fs::exists(source)) GTEST_SKIP() << "fixture " << source << " not found";
  test::TempDir dir;
  for (const DType type : {DType::Q4_0, DType::Q4_K}) {
    const Comparison c =
        compare_with_rtn(source, dir.path(), small_calibration(QuantMethod::gptq, type), 6, 128);
    EXPECT_LT(c.calibrated.rel_rms, 0.8 * c.rtn.rel_rms) << kernels::type_name(type);
    EXPECT_LT(c.calibrated.kl, 0.8 * c.rtn.kl) << kernels::type_name(type);
  }
}

TEST(CalibratedQuantizeModel, CalibrationWindowsAreReproducible) {
  test::TempDir dir;
  const fs::path source = dir.path() / "tiny.gguf";
  model::write_random_llama(source.string(), model::llama_shape_by_name("tiny"), DType::F32, 3);
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(source.string()));
  const auto a = model::calibration_windows(*tokenizer, calibration_part(), 5, 40, 9);
  EXPECT_EQ(a, model::calibration_windows(*tokenizer, calibration_part(), 5, 40, 9));
  EXPECT_NE(a, model::calibration_windows(*tokenizer, calibration_part(), 5, 40, 10));
  ASSERT_EQ(a.size(), 5u);
  for (const auto& w : a) {
    ASSERT_EQ(w.size(), 40u);
    EXPECT_EQ(w[0], tokenizer->bos_id());
  }
  EXPECT_THROW(model::calibration_windows(*tokenizer, "too short", 1, 64, 0), std::invalid_argument);
  EXPECT_THROW(model::calibration_windows(*tokenizer, calibration_part(), 0, 64, 0), std::invalid_argument);
  // A token file's stream gives the windows of the text it was tokenized from.
  std::vector<int32_t> ids = tokenizer->encode(calibration_part(), false);
  EXPECT_EQ(model::calibration_windows(*tokenizer, ids, 5, 40, 9), a);
  ids[17] = static_cast<int32_t>(tokenizer->n_vocab());
  try {
    model::calibration_windows(*tokenizer, ids, 5, 40, 9);
    ADD_FAILURE() << "an out-of-vocabulary id was taken";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("calibration token 17"), std::string::npos) << e.what();
  }
}

// A calibrated run holds one layer, not its output (a 70B model's ~37 GB at 4 bits), and lets the input's
// pages of the layers done go (a float model may be larger than memory): the peak resident memory of
// `nibble quantize --method gptq|awq` (as it reports it) is about the same for 4 and for 20 layers of one
// shape (F16), where holding the 16 more layers' output, or their input, would add 20 MiB or 72 MiB. The
// small model's file is the one the library writes.
TEST(CalibratedQuantizeModel, RunsHoldOneLayerNotTheOutputOrTheInput) {
  test::TempDir dir;
  const fs::path few = dir.path() / "few-f16.gguf", many = dir.path() / "many-f16.gguf";
  model::write_random_llama(few.string(), test::layered_shape(4), DType::F16, 3);
  model::write_random_llama(many.string(), test::layered_shape(20), DType::F16, 3);
  const fs::path calib = dir.path() / "calib.txt";
  std::ofstream(calib) << calibration_part();
  for (const char* method : {"gptq", "awq"}) {
    SCOPED_TRACE(method);
    const std::string name = method;
    const auto quantize = [&](const fs::path& from, const fs::path& to) {
      const test::CommandResult run =
          test::run_command(test::nibble_bin() + " quantize -m " + from.string() + " -o " + to.string() +
                            " --type q4_0 --method " + name + " --calib " + calib.string() +
                            " --calib-samples 4 --calib-len 32 --seed 1 -t 2");
      EXPECT_EQ(run.exit_code, 0) << run.output;
      return test::reported_peak_bytes(run.output);
    };
    const fs::path few_out = dir.path() / (name + "-few.gguf"), many_out = dir.path() / (name + "-many.gguf");
    const long few_peak = quantize(few, few_out);
    const long many_peak = quantize(many, many_out);
    ASSERT_GT(few_peak, 0) << "nibble quantize reported no peak memory";
    ASSERT_GT(many_peak, 0) << "nibble quantize reported no peak memory";
    // The 16 more layers' matrices, as written.
    long more_out = 0;
    const auto written = model::GgufFile::open(many_out.string());
    for (const model::GgufTensorInfo& t : written->tensors()) {
      if (t.name.rfind("blk.", 0) == 0 && t.dims.size() == 2 && std::stoi(t.name.substr(4)) >= 4)
        more_out += static_cast<long>(t.size_bytes);
    }
    ASSERT_GT(more_out, 20'000'000);
    EXPECT_LT(many_peak - few_peak, more_out / 2)
        << "peak " << many_peak / 1048576 << " MiB for 20 layers, " << few_peak / 1048576 << " MiB for 4 ("
        << more_out / 1048576 << " MiB of matrices in the 16 more layers' output)";
    std::printf("[ info ] %s: peak %ld MiB for 20 layers, %ld MiB for 4 (%ld MiB of output in the 16 more)\n",
                method, many_peak / 1048576, few_peak / 1048576, more_out / 1048576);
    CalibratedQuantizeOptions options;
    options.method = parse_quant_method(name);
    options.calibration_name = "calib.txt";
    options.samples = 4;
    options.length = 32;
    options.seed = 1;
    options.threads = 2;
    const fs::path lib = dir.path() / (name + "-lib.gguf");
    calibrated_quantize_gguf(model::GgufFile::open(few.string()), calibration_part(), lib.string(), options);
    EXPECT_EQ(test::read_file_bytes(few_out), test::read_file_bytes(lib));
  }
}

TEST(CalibratedQuantizeModel, CommandLine) {
  test::TempDir dir;
  const std::string bin = test::nibble_bin();
  const fs::path source = dir.path() / "tiny.gguf";
  model::write_random_llama(source.string(), model::llama_shape_by_name("tiny"), DType::F32, 3);
  const fs::path calib = dir.path() / "calib.txt";
  std::ofstream(calib) << calibration_part();
  const std::string base = bin + " quantize -m " + source.string() + " --type q4_0 -o ";

  // --method rtn is the default and the same bytes as before.
  ASSERT_EQ(test::run_command(base + (dir.path() / "a.gguf").string()).exit_code, 0);
  ASSERT_EQ(test::run_command(base + (dir.path() / "b.gguf").string() + " --method rtn").exit_code, 0);
  EXPECT_EQ(test::read_file_bytes(dir.path() / "a.gguf"), test::read_file_bytes(dir.path() / "b.gguf"));

  const test::CommandResult gptq =
      test::run_command(base + (dir.path() / "g.gguf").string() + " --method gptq --calib " + calib.string() +
                        " --calib-samples 4 --calib-len 32 --seed 3 -t 2 2>&1");
  ASSERT_EQ(gptq.exit_code, 0) << gptq.output;
  EXPECT_NE(gptq.output.find("layer 2/2"), std::string::npos) << gptq.output;
  const auto g = model::GgufFile::open((dir.path() / "g.gguf").string());
  EXPECT_EQ(g->get_string("nibble.quantization.calibration_file"), "calib.txt");
  EXPECT_EQ(g->get_uint("nibble.quantization.calibration_seed"), 3u);

  // The same calibration as a token file (the text's ids): the same file, byte for byte (the
  // metadata records the file name, so both are called calib.txt).
  const auto tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(source.string()));
  std::string ids;
  for (int32_t id : tokenizer->encode(calibration_part(), false))
    ids += std::to_string(id) + (id % 7 ? " " : "\n");
  fs::create_directory(dir.path() / "ids");
  std::ofstream(dir.path() / "ids" / "calib.txt") << ids;
  const test::CommandResult from_ids = test::run_command(
      base + (dir.path() / "t.gguf").string() + " --method gptq --calib-format tokens --calib " +
      (dir.path() / "ids" / "calib.txt").string() + " --calib-samples 4 --calib-len 32 --seed 3 -t 2 2>&1");
  ASSERT_EQ(from_ids.exit_code, 0) << from_ids.output;
  EXPECT_EQ(test::read_file_bytes(dir.path() / "t.gguf"), test::read_file_bytes(dir.path() / "g.gguf"));
  std::ofstream(dir.path() / "ids" / "bad.txt") << "1 2 3 x4 5";
  const test::CommandResult bad_ids = test::run_command(base + (dir.path() / "x.gguf").string() +
                                                        " --method gptq --calib-format tokens --calib " +
                                                        (dir.path() / "ids" / "bad.txt").string() + " 2>&1");
  EXPECT_NE(bad_ids.exit_code, 0);
  EXPECT_NE(bad_ids.output.find("bad.txt: token 3 is 'x4'"), std::string::npos) << bad_ids.output;

  const test::CommandResult no_calib =
      test::run_command(base + (dir.path() / "x.gguf").string() + " --method gptq 2>&1");
  EXPECT_NE(no_calib.exit_code, 0);
  EXPECT_NE(no_calib.output.find("needs --calib"), std::string::npos) << no_calib.output;
  const test::CommandResult bad =
      test::run_command(base + (dir.path() / "x.gguf").string() + " --method foo 2>&1");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("expected rtn, gptq or awq"), std::string::npos) << bad.output;
  // Q4_K needs rows of 256: the tiny model's 128 is refused before any work, naming the tensor.
  const test::CommandResult k =
      test::run_command(bin + " quantize -m " + source.string() + " -o " + (dir.path() / "x.gguf").string() +
                        " --type q4_k --method gptq --calib " + calib.string() + " 2>&1");
  EXPECT_NE(k.exit_code, 0);
  EXPECT_NE(k.output.find("blk.0.attn_q.weight"), std::string::npos) << k.output;
  // llama-quantize's mixes take rtn or gptq.
  const std::string mix_base = bin + " quantize -m " + source.string() + " -o " +
                               (dir.path() / "x.gguf").string() + " --calib " + calib.string();
  const test::CommandResult awq_mix = test::run_command(mix_base + " --type q4_k_m --method awq 2>&1");
  EXPECT_NE(awq_mix.exit_code, 0);
  EXPECT_NE(awq_mix.output.find("rtn or gptq into a GGUF only"), std::string::npos) << awq_mix.output;
}

}  // namespace
}  // namespace nibble::worker
