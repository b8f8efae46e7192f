// `nibble quantize --format gptq` (worker/gptq_export, model/gptq_writer): the directory it writes
// loads back with exactly the quantized values the solver produced: on the q4_0 grid the very Q4_0
// blocks of the GGUF path, on the INT4 grid Q8_0 blocks decoding to the solver's values; the logits
// then match the GGUF path within the rounding of what the directory stores in fp16 (embedding,
// norms, head). The CLI writes what the library writes; zero points the v1 layout cannot hold are
// handled; bad options are refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "kernels/quantize.hpp"
#include "kernels/thread_pool.hpp"
#include "model/gptq_writer.hpp"
#include "model/hf_quantized.hpp"
#include "model/llama_checkpoint.hpp"
#include "model/random_model.hpp"
#include "model/safetensors.hpp"
#include "tests/support/test_support.hpp"
#include "worker/calibrated_quantize.hpp"
#include "worker/gptq_export.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {
namespace {

namespace fs = std::filesystem;
using kernels::DType;
using nlohmann::json;

std::string calibration_text() {
  std::ifstream in(test::test_data_dir() / "calibration-text.txt", std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

CalibratedQuantizeOptions small_gptq(bool act_order) {
  CalibratedQuantizeOptions o;
  o.method = QuantMethod::gptq;
  o.samples = 4;
  o.length = 64;
  o.threads = 1;
  o.gptq.act_order = act_order;
  o.calibration_name = "calibration-text.txt";
  return o;
}

// The tiny random float model (128 wide, 256 FFN, 2 layers), made once per test.
struct TinyModel {
  test::TempDir dir;
  fs::path gguf = dir.path() / "tiny-f32.gguf";
  std::shared_ptr<const model::GgufFile> file;
  TinyModel() {
    model::write_random_llama(gguf.string(), model::llama_shape_by_name("tiny"), DType::F32, 5);
    file = model::GgufFile::open(gguf.string());
  }
};

std::vector<float> logits_of(const std::string& path) {
  auto m = LlamaModel::load(path);
  const std::vector<int32_t> tokens = {1, 17,   400, 4000, 5,   23, 23, 99,  1200,
                                       7, 3000, 64,  2,    900, 41, 8,  310, 77};
  const std::vector<int32_t> table = {0, 1};
  KvCache cache(m->config(), 2, 16);
  kernels::ThreadPool pool(2);
  std::vector<float> logits;
  m->forward(ForwardBatch::single(tokens, 0, table, true), cache, pool, logits);
  return logits;
}

double relative_rms(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err += (got[i] - static_cast<double>(want[i])) * (got[i] - static_cast<double>(want[i]));
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(err / norm);
}

std::vector<float> matrix_floats(const model::WeightMatrix& w) {
  std::vector<float> out(static_cast<size_t>(w.n_out * w.k));
  for (int64_t r = 0; r < w.n_out; ++r)
    EXPECT_EQ(kernels::dequantize_row(w.type, w.data + r * w.row_bytes(), out.data() + r * w.k, w.k),
              kernels::Status::ok);
  return out;
}

// A copy of `source` with the given tensors replaced (type, bytes).
void write_gguf_with(const model::GgufFile& source,
                     const std::map<std::string, std::pair<DType, std::vector<uint8_t>>>& replaced,
                     const fs::path& out) {
  model::GgufWriter w;
  for (const auto& [key, value] : source.metadata()) w.set(key, value);
  for (const model::GgufTensorInfo& t : source.tensors()) {
    const auto it = replaced.find(t.name);
    if (it == replaced.end()) {
      const uint8_t* data = source.tensor_data(t);
      w.add_tensor(
          t.name, t.dims, t.type,
          std::vector<uint8_t>(data, data + t.rows() * kernels::row_bytes(t.type, t.row_elements())));
    } else {
      w.add_tensor(t.name, t.dims, it->second.first, it->second.second);
    }
  }
  w.write(out.string());
}

std::pair<DType, std::vector<uint8_t>> f32_bytes(const std::vector<float>& values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(float));
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return {DType::F32, std::move(bytes)};
}

// On the q4_0 grid the export is the GGUF path in another file format: the same GPTQ run gives the
// same Q4_0 blocks, byte for byte, once the directory is loaded (q/k rows go back to HF's order on
// export and are interleaved again at load), and a GGUF holding those blocks with the directory's
// F16 embedding, norms and head gives the very same logits.
TEST(GptqExport, Q4_0GridLoadsBackAsTheGgufPathsBlocks) {
  TinyModel tiny;
  const fs::path gguf = tiny.dir.path() / "gptq-q4_0.gguf", dir = tiny.dir.path() / "gptq-q4_0";
  CalibratedQuantizeOptions o = small_gptq(true);
  o.type = DType::Q4_0;
  calibrated_quantize_gguf(tiny.file, calibration_text(), gguf.string(), o);
  EXPECT_EQ(export_gptq_checkpoint(tiny.file, calibration_text(), dir.string(), model::QuantGrid::q4_0(), o),
            "gptq");

  const json config = json::parse(std::ifstream(dir / "config.json"));
  EXPECT_EQ(config["quantization_config"]["sym"], true);
  EXPECT_EQ(config["quantization_config"]["group_size"], 32);
  EXPECT_EQ(config["quantization_config"]["desc_act"], true);
  // The checkpoints stay open: bound GGUF matrices point into their mapping.
  const auto gguf_checkpoint = model::LlamaCheckpoint::open(gguf.string());
  const auto dir_checkpoint = model::LlamaCheckpoint::open(dir.string());
  const auto from_gguf = gguf_checkpoint->bind_weights();
  const auto from_dir = dir_checkpoint->bind_weights();
  for (size_t l = 0; l < from_gguf.layers.size(); ++l) {
    for (model::LayerMatrix m : model::kLayerMatrices) {
      const model::WeightMatrix& a = from_gguf.layers[l].matrix(m);
      const model::WeightMatrix& b = from_dir.layers[l].matrix(m);
      SCOPED_TRACE(model::layer_tensor_name(static_cast<int64_t>(l), m));
      ASSERT_EQ(a.type, DType::Q4_0);
      ASSERT_EQ(b.type, DType::Q4_0);
      EXPECT_EQ(std::memcmp(a.data, b.data, static_cast<size_t>(a.n_out * a.row_bytes())), 0);
    }
  }
  // `nibble quantize` stores the embedding and head as Q8_0 (and so rounds the head's input to 8
  // bits); the GGUF with the same values as the directory has its F16 embedding, norms and head.
  std::map<std::string, std::pair<DType, std::vector<uint8_t>>> blocks;
  for (const model::GgufTensorInfo& t : tiny.file->tensors()) {
    if (t.name.starts_with("blk.") && t.dims.size() == 2) continue;
    const std::vector<float> values = test::dequantize_tensor(*tiny.file, t);
    std::vector<uint8_t> half(values.size() * 2);
    for (size_t i = 0; i < values.size(); ++i) {
      const kernels::f16_bits h = kernels::fp32_to_fp16(values[i]);
      std::memcpy(half.data() + 2 * i, &h, 2);
    }
    blocks[t.name] = {DType::F16, std::move(half)};
  }
  for (size_t l = 0; l < from_gguf.layers.size(); ++l) {
    for (model::LayerMatrix m : model::kLayerMatrices) {
      const model::WeightMatrix& a = from_gguf.layers[l].matrix(m);
      blocks[model::layer_tensor_name(static_cast<int64_t>(l), m)] = {
          DType::Q4_0, std::vector<uint8_t>(a.data, a.data + a.n_out * a.row_bytes())};
    }
  }
  write_gguf_with(*tiny.file, blocks, tiny.dir.path() / "same-values.gguf");
  const double err =
      relative_rms(logits_of(dir.string()), logits_of((tiny.dir.path() / "same-values.gguf").string()));
  std::cout << "exported q4_0 directory vs the GGUF of the same values: relative RMS " << err << "\n";
  EXPECT_EQ(err, 0.0);
}

// On the INT4 grid (asymmetric, group 128 here) there is no GGUF type; the GGUF path with the same
// quantized values is the float model with every layer matrix replaced by the solver's dequantized
// values. The directory loads them as Q8_0 blocks that decode to exactly those floats; the logits
// differ by the Q8_0 rounding of the activations in the integer matmul plus the F16 embedding,
// norms and head: measured ~1.5e-2 on this random model (a wrong q/k row order or zero costs
// order 1).
TEST(GptqExport, Int4GridLoadsBackWithTheSolversValues) {
  TinyModel tiny;
  const fs::path dir = tiny.dir.path() / "gptq-g128";
  std::map<std::string, std::vector<float>> solved;
  const std::string format = export_gptq_checkpoint(
      tiny.file, calibration_text(), dir.string(), model::QuantGrid::int4_asym(128), small_gptq(true),
      [&](const std::string& name, const model::QuantizedMatrix& q) { solved[name] = q.dequantized; });
  EXPECT_EQ(format, "gptq");
  ASSERT_EQ(solved.size(), 14u);

  const json config = json::parse(std::ifstream(dir / "config.json"));
  const json quant = json::parse(std::ifstream(dir / "quantize_config.json"));
  EXPECT_EQ(config["architectures"], json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(config["hidden_size"], 128);
  EXPECT_EQ(config["intermediate_size"], 256);
  EXPECT_EQ(config["num_key_value_heads"], 2);
  EXPECT_EQ(config["vocab_size"], 4096);
  EXPECT_EQ(config["rms_norm_eps"], 1e-5);
  EXPECT_EQ(config["tie_word_embeddings"], false);
  EXPECT_EQ(config["quantization_config"], quant);
  EXPECT_EQ(quant["quant_method"], "gptq");
  EXPECT_EQ(quant["bits"], 4);
  EXPECT_EQ(quant["group_size"], 128);
  EXPECT_EQ(quant["sym"], false);
  EXPECT_EQ(quant["desc_act"], true);
  EXPECT_EQ(quant["static_groups"], true);
  EXPECT_EQ(quant["checkpoint_format"], "gptq");

  const auto st = model::SafetensorsFile::open((dir / "model.safetensors").string());
  EXPECT_EQ(st->find_tensor("model.embed_tokens.weight")->dtype, model::SafetensorsDType::F16);
  EXPECT_EQ(st->find_tensor("lm_head.weight")->shape, (std::vector<int64_t>{4096, 128}));
  EXPECT_EQ(st->find_tensor("model.layers.1.post_attention_layernorm.weight")->dtype,
            model::SafetensorsDType::F16);
  EXPECT_EQ(st->find_tensor("model.layers.1.mlp.down_proj.qweight")->shape, (std::vector<int64_t>{32, 128}));
  EXPECT_EQ(st->find_tensor("model.layers.1.mlp.down_proj.qzeros")->shape, (std::vector<int64_t>{2, 16}));
  EXPECT_EQ(st->find_tensor("model.layers.1.mlp.down_proj.scales")->shape, (std::vector<int64_t>{2, 128}));
  const auto* g_idx = st->find_tensor("model.layers.0.self_attn.k_proj.g_idx");
  ASSERT_EQ(g_idx->shape, (std::vector<int64_t>{128}));
  std::vector<int32_t> groups(128);
  std::memcpy(groups.data(), st->tensor_data(*g_idx), 128 * sizeof(int32_t));
  EXPECT_EQ(groups, std::vector<int32_t>(128, 0));  // static groups: consecutive inputs
  EXPECT_EQ(st->find_tensor("model.layers.0.self_attn.k_proj.weight"), nullptr);

  const auto checkpoint = model::LlamaCheckpoint::open(dir.string());
  const auto loaded = checkpoint->bind_weights();
  for (size_t l = 0; l < loaded.layers.size(); ++l) {
    for (model::LayerMatrix m : model::kLayerMatrices) {
      const std::string name = model::layer_tensor_name(static_cast<int64_t>(l), m);
      SCOPED_TRACE(name);
      const model::WeightMatrix& w = loaded.layers[l].matrix(m);
      EXPECT_EQ(w.type, DType::Q8_0);
      EXPECT_EQ(matrix_floats(w), solved.at(name));  // bit-exact, rows in GGUF order on both sides
    }
  }
  std::map<std::string, std::pair<DType, std::vector<uint8_t>>> floats;
  for (const auto& [name, values] : solved) floats[name] = f32_bytes(values);
  write_gguf_with(*tiny.file, floats, tiny.dir.path() / "dequantized.gguf");
  const double err =
      relative_rms(logits_of(dir.string()), logits_of((tiny.dir.path() / "dequantized.gguf").string()));
  std::cout << "exported int4 g128 directory vs the GGUF of its dequantized values: relative RMS " << err
            << "\n";
  EXPECT_LT(err, 4e-2);
}

// The CLI is the library call: the same settings give the same bytes (GPTQ is deterministic).
TEST(GptqExport, CliWritesWhatTheLibraryWrites) {
  TinyModel tiny;
  const fs::path calib = tiny.dir.path() / "calib.txt";
  std::ofstream(calib) << calibration_text();
  const fs::path cli = tiny.dir.path() / "cli", lib = tiny.dir.path() / "lib";
  const std::string base = test::nibble_bin() + " quantize --model " + tiny.gguf.string();
  const auto r = test::run_command(
      base + " --method gptq --calib " + calib.string() +
      " --calib-samples 4 --calib-len 64 --threads 1 --format gptq --group-size 64 --out " + cli.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("model.safetensors"), std::string::npos) << r.output;
  export_gptq_checkpoint(tiny.file, calibration_text(), lib.string(), model::QuantGrid::int4_asym(64),
                         small_gptq(false));
  EXPECT_EQ(test::read_file_bytes(cli / "model.safetensors"),
            test::read_file_bytes(lib / "model.safetensors"));
  EXPECT_EQ(test::read_file_bytes(cli / "config.json"), test::read_file_bytes(lib / "config.json"));

  // RTN needs no calibration text.
  const auto rtn =
      test::run_command(base + " --format gptq --group-size 32 --out " + (tiny.dir.path() / "rtn").string());
  ASSERT_EQ(rtn.exit_code, 0) << rtn.output;
  EXPECT_EQ(json::parse(
                std::ifstream(tiny.dir.path() / "rtn" / "config.json"))["quantization_config"]["group_size"],
            32);

  struct Bad {
    std::string args, message;
  };
  const Bad bad[] = {
      {" --format gptq --group-size 48 --out x", "group size 48"},
      {" --format gptqq --out x", "gptqq"},
      {" --format gptq --method awq --calib " + calib.string() + " --out x", "--method gptq or rtn"},
  };
  for (const Bad& b : bad) {
    const auto result = test::run_command(base + b.args);
    EXPECT_NE(result.exit_code, 0) << b.args;
    EXPECT_NE(result.output.find(b.message), std::string::npos) << b.args << ": " << result.output;
  }
}

// The export writes each matrix as it is quantized, so that a 70B model's checkpoint (~35 GB) is never
// held, and lets the input's pages go: the peak resident memory `nibble quantize --format gptq` reports
// is about the same for 4 and for 36 layers of one shape (F16), where holding the 32 more layers' packed
// matrices, or their input, would add 38 MiB or 144 MiB.
TEST(GptqExport, WritesEachMatrixAsItIsQuantized) {
  test::TempDir dir;
  long peaks[2] = {0, 0}, more_out = 0;
  for (int i = 0; i < 2; ++i) {
    const model::LlamaShape shape = test::layered_shape(i == 0 ? 4 : 36);
    const fs::path in = dir.path() / ("layers-" + std::to_string(shape.n_layer) + ".gguf"),
                   out = dir.path() / ("gptq-" + std::to_string(shape.n_layer));
    model::write_random_llama(in.string(), shape, DType::F16, 3);
    const test::CommandResult run =
        test::run_command(test::nibble_bin() + " quantize -m " + in.string() + " -o " + out.string() +
                          " --format gptq --group-size 128");
    ASSERT_EQ(run.exit_code, 0) << run.output;
    peaks[i] = test::reported_peak_bytes(run.output);
    ASSERT_GT(peaks[i], 0) << run.output;
    const auto checkpoint = model::SafetensorsFile::open((out / "model.safetensors").string());
    for (const model::SafetensorsTensorInfo& t : checkpoint->tensors()) {
      const bool more_layers = t.name.rfind("model.layers.", 0) == 0 && std::stoi(t.name.substr(13)) >= 4;
      if (i == 1 && more_layers && t.name.find("_proj.") != std::string::npos)
        more_out += static_cast<long>(t.size_bytes);
    }
  }
  ASSERT_GT(more_out, 38'000'000);
  EXPECT_LT(peaks[1] - peaks[0], more_out / 2)
      << "peak " << peaks[1] / 1048576 << " MiB for 36 layers, " << peaks[0] / 1048576 << " MiB for 4 ("
      << more_out / 1048576 << " MiB of packed matrices in the 32 more layers)";
  std::printf(
      "[ info ] --format gptq: peak %ld MiB for 36 layers, %ld MiB for 4 (%ld MiB packed in the 32 more)\n",
      peaks[1] / 1048576, peaks[0] / 1048576, more_out / 1048576);
}

// RoPE scaling travels into config.json as transformers names it: a linear factor, and YaRN's factor with
// its original context, which the checkpoint loads back with (what llama.cpp's converter would read).
TEST(GptqExport, RopeScalingIsWrittenAsConfigJsonNamesIt) {
  test::TempDir dir;
  for (const bool yarn : {false, true}) {
    SCOPED_TRACE(yarn ? "yarn" : "linear");
    model::LlamaShape shape = model::llama_shape_by_name("tiny");
    shape.rope_linear_factor = 4.0f;
    if (yarn) shape.rope_yarn_original_context = 512;
    const fs::path gguf = dir.path() / (yarn ? "yarn.gguf" : "linear.gguf");
    model::write_random_llama(gguf.string(), shape, DType::F16, 5);
    const fs::path out = dir.path() / (yarn ? "yarn" : "linear");
    const auto r = test::run_command(test::nibble_bin() + " quantize --model " + gguf.string() +
                                     " --format gptq --group-size 32 --out " + out.string());
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const json config = json::parse(std::ifstream(out / "config.json"));
    EXPECT_EQ(config["rope_scaling"]["rope_type"], yarn ? "yarn" : "linear");
    EXPECT_EQ(config["rope_scaling"]["factor"], 4.0);
    EXPECT_EQ(config["rope_scaling"].contains("original_max_position_embeddings"), yarn);
    const auto loaded = LlamaModel::load(out.string());
    EXPECT_EQ(loaded->config().rope_freq_scale(), 0.25f);
    EXPECT_EQ(loaded->config().rope_yarn_original_context, yarn ? 512 : 0);
  }
}

// Zero points: GPTQ v1 stores zero − 1, so a zero of 0 is rewritten as 1 with every level + 1 where
// the group's levels allow (same values, format "gptq"); where a level is already 15 the checkpoint
// falls back to "gptq_v2". Either way the values load back exactly.
TEST(GptqExport, ZeroPointsOfZeroKeepTheirValues) {
  TinyModel tiny;
  const model::LlamaConfig c = model::LlamaConfig::from_gguf(*tiny.file);
  std::map<std::string, model::QuantizedMatrix> rtn;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    for (model::LayerMatrix m : model::kLayerMatrices) {
      const std::string name = model::layer_tensor_name(l, m);
      const model::GgufTensorInfo& t = *tiny.file->find_tensor(name);
      const std::vector<float> w = test::dequantize_tensor(*tiny.file, t);
      rtn[name] = model::rtn_quantize(w.data(), t.rows(), t.row_elements(), model::QuantGrid::int4_asym(32));
    }
  }
  const std::string v = model::layer_tensor_name(1, model::LayerMatrix::attn_v);
  for (const bool top_level : {false, true}) {
    SCOPED_TRACE(top_level ? "a level of 15: gptq_v2" : "levels below 15: lifted");
    std::map<std::string, model::QuantizedMatrix> q = rtn;
    model::QuantizedMatrix& mv = q.at(v);
    const int64_t groups = mv.k / 32;
    mv.zeros[0] = 0;  // row 0, group 0
    for (int64_t j = 0; j < 32; ++j)
      mv.levels[static_cast<size_t>(j)] = static_cast<uint8_t>(j % (top_level ? 16 : 15));
    const fs::path dir = tiny.dir.path() / (top_level ? "v2" : "v1");
    model::GptqCheckpointWriter writer(*tiny.file, model::QuantGrid::int4_asym(32), {}, dir.string());
    for (const auto& [name, matrix] : q) writer.add(name, matrix);
    writer.finish();
    EXPECT_EQ(writer.checkpoint_format(), top_level ? "gptq_v2" : "gptq");
    const auto checkpoint = model::LlamaCheckpoint::open(dir.string());
    const auto loaded = checkpoint->bind_weights();
    const std::vector<float> got = matrix_floats(loaded.layers[1].wv);
    for (int64_t r = 0; r < mv.n_out; ++r) {
      for (int64_t j = 0; j < mv.k; ++j) {
        const size_t g = static_cast<size_t>(r * groups + j / 32);
        const float want =
            static_cast<float>(mv.levels[static_cast<size_t>(r * mv.k + j)] - mv.zeros[g]) * mv.scales[g];
        ASSERT_EQ(got[static_cast<size_t>(r * mv.k + j)], want) << r << ", " << j;
      }
    }
  }
  // A writer refuses what a GPTQ checkpoint cannot hold, and a checkpoint not finished leaves no
  // model.safetensors.
  const fs::path partial = tiny.dir.path() / "partial";
  EXPECT_THROW(model::GptqCheckpointWriter(*tiny.file, model::QuantGrid::for_gguf_type(DType::Q4_K).value(),
                                           {}, partial.string()),
               std::invalid_argument);
  {
    model::GptqCheckpointWriter writer(*tiny.file, model::QuantGrid::int4_asym(32), {}, partial.string());
    EXPECT_THROW(writer.add("blk.9.attn_v.weight", rtn.at(v)), std::invalid_argument);
    EXPECT_THROW(writer.add(model::layer_tensor_name(0, model::LayerMatrix::attn_q), rtn.at(v)),
                 std::invalid_argument);
    writer.add(v, rtn.at(v));
    EXPECT_THROW(writer.add(v, rtn.at(v)), std::invalid_argument);  // twice
    const std::vector<float> w = test::dequantize_tensor(*tiny.file, *tiny.file->find_tensor(v));
    EXPECT_THROW(writer.add(model::layer_tensor_name(0, model::LayerMatrix::attn_v),
                            model::rtn_quantize(w.data(), 64, 128, model::QuantGrid::int4_asym(64))),
                 std::invalid_argument);  // a second grid
    EXPECT_THROW(writer.finish(), std::invalid_argument);
  }
  EXPECT_FALSE(fs::exists(partial / "model.safetensors"));
  EXPECT_FALSE(fs::exists(partial / "model.safetensors.tmp"));
}

}  // namespace
}  // namespace nibble::worker
