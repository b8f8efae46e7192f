// Hugging Face checkpoints end to end: Nibble's logits for the committed tiny LlamaForCausalLM
// checkpoints (tests/data/hf-tiny-llama, made by tools/hf_reference.py) against transformers' own,
// through every way of loading them (single file, index + shards, pipeline stages, `nibble logits`).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "kernels/matmul.hpp"
#include "kernels/thread_pool.hpp"
#include "model/gguf.hpp"
#include "model/hf_to_gguf.hpp"
#include "model/llama_checkpoint.hpp"
#include "model/safetensors.hpp"
#include "tests/support/test_support.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

fs::path reference_root() { return test::test_data_dir() / "hf-tiny-llama"; }

struct Reference {
  std::vector<std::vector<int32_t>> sequences;
  std::vector<float> logits;  // [sum of the sequence lengths, n_vocab], sequences one after the other
};

// logits_file: "logits_fp16kv.f32" (transformers with attention rounded to fp16 as Nibble's KV cache
// does) or "logits.f32" (transformers' plain float32 attention); see tools/hf_reference.py.
Reference load_reference(const std::string& variant, const std::string& logits_file = "logits_fp16kv.f32") {
  Reference r;
  const json j = json::parse(std::ifstream(reference_root() / "reference.json"));
  r.sequences = j["sequences"].get<std::vector<std::vector<int32_t>>>();
  const std::vector<uint8_t> bytes = test::read_file_bytes(reference_root() / variant / logits_file);
  r.logits.resize(bytes.size() / sizeof(float));
  std::memcpy(r.logits.data(), bytes.data(), bytes.size());
  return r;
}

// Each sequence from position 0 in its own cache; all positions' logits, concatenated.
std::vector<std::vector<float>> run_sequences(LlamaModel& model, const Reference& ref) {
  kernels::ThreadPool pool(2);
  std::vector<std::vector<float>> out;
  for (const auto& seq : ref.sequences) {
    const int64_t blocks = (static_cast<int64_t>(seq.size()) + 15) / 16;
    KvCache cache(model.shard_config(), blocks, 16);
    std::vector<int32_t> table(static_cast<size_t>(blocks));
    for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(blocks - 1 - b);
    std::vector<float> logits;
    model.forward(ForwardBatch::single(seq, 0, table, true), cache, pool, logits);
    out.push_back(std::move(logits));
  }
  return out;
}

// The largest per-sequence relative RMS error against the reference rows.
double worst_sequence_error(const std::vector<std::vector<float>>& got, const Reference& ref,
                            int64_t n_vocab) {
  double worst = 0.0;
  size_t row = 0;
  for (size_t s = 0; s < ref.sequences.size(); ++s) {
    const size_t n = ref.sequences[s].size() * static_cast<size_t>(n_vocab);
    EXPECT_EQ(got[s].size(), n) << "sequence " << s;
    const std::vector<float> expected(ref.logits.begin() + static_cast<int64_t>(row),
                                      ref.logits.begin() + static_cast<int64_t>(row + n));
    double err = 0.0, norm = 0.0;
    for (size_t i = 0; i < n && i < got[s].size(); ++i) {
      err += (got[s][i] - expected[i]) * static_cast<double>(got[s][i] - expected[i]);
      norm += expected[i] * static_cast<double>(expected[i]);
    }
    const double rel = std::sqrt(err / norm);
    std::cout << "  sequence " << s << " (" << ref.sequences[s].size() << " tokens): relative RMS " << rel
              << ", worst row " << test::max_relative_rms(got[s], expected, n_vocab) << "\n";
    worst = std::max(worst, rel);
    row += n;
  }
  return worst;
}

// Every matmul ISA this CPU has, so that a summation order that happens to suit the reference on
// one machine cannot hide a problem on another.
std::vector<const char*> available_isas() {
  std::vector<const char*> isas;
  const std::string original = kernels::matmul_isa();
  for (const char* isa : {"scalar", "avx2", "avx512"})
    if (kernels::matmul_force_isa(isa)) isas.push_back(isa);
  kernels::matmul_force_isa(original.c_str());
  return isas;
}

// F32: the weights are transformers' exactly, and the reference rounds q, K, V and the softmax
// weights to fp16 as Nibble's attention does (kernels/attention.hpp); what remains is float
// summation order, which now and then moves a value across an fp16 rounding boundary.
TEST(HfLlama, F32LogitsMatchTransformers) {
  const Reference ref = load_reference("f32");
  const std::string original = kernels::matmul_isa();
  for (const char* isa : available_isas()) {
    SCOPED_TRACE(isa);
    std::cout << "matmul " << isa << ":\n";
    ASSERT_TRUE(kernels::matmul_force_isa(isa));
    auto model = LlamaModel::load((reference_root() / "f32").string());
    EXPECT_FALSE(model->config().tied_output);
    EXPECT_LT(worst_sequence_error(run_sequences(*model, ref), ref, model->config().n_vocab), 1e-4);
  }
  kernels::matmul_force_isa(original.c_str());
}

// Against transformers' own float32 attention the fp16 KV cache costs about one fp16 rounding
// (2^-11 relative) per element of q, K and V: measured ~1.3e-3. A RoPE or binding mistake gives
// errors of order 1.
TEST(HfLlama, F32LogitsMatchTransformersPlainAttention) {
  auto model = LlamaModel::load((reference_root() / "f32").string());
  EXPECT_EQ(model->file_ptr(), nullptr);
  EXPECT_THROW(model->file(), std::logic_error);
  const Reference ref = load_reference("f32", "logits.f32");
  EXPECT_LT(worst_sequence_error(run_sequences(*model, ref), ref, model->config().n_vocab), 3e-3);
}

// BF16 weights, tied head. The reference is transformers' float32 forward of the same bfloat16
// weights, and Nibble's BF16 matmul widens them to float exactly, so what is left is float
// summation order and the fp16 KV cache: measured 9e-5 with the AVX2 kernels, 1.06e-4 with the
// AVX-512 ones, hence 2e-4. A bound for rounding the weights themselves to 16 bits would be ~1e-2
// and hide binding mistakes.
TEST(HfLlama, Bf16TiedLogitsMatchTransformers) {
  auto model = LlamaModel::load((reference_root() / "bf16-tied").string());
  EXPECT_TRUE(model->config().tied_output);
  const Reference ref = load_reference("bf16-tied");
  EXPECT_LT(worst_sequence_error(run_sequences(*model, ref), ref, model->config().n_vocab), 2e-4);
}

// Rounding the F32 model's weights to 16 bits (what a user's F16/BF16 copy of a checkpoint does):
// the logits move by the rounding only, well within this bound.
TEST(HfLlama, SixteenBitCopyStaysCloseToF32) {
  for (const auto dtype : {model::SafetensorsDType::F16, model::SafetensorsDType::BF16}) {
    SCOPED_TRACE(model::safetensors_dtype_name(dtype));
    test::TempDir tmp;
    auto file = model::SafetensorsFile::open((reference_root() / "f32" / "model.safetensors").string());
    std::vector<model::SafetensorsTensorData> tensors;
    for (const auto& t : file->tensors()) {
      std::vector<float> values(static_cast<size_t>(t.n_elements));
      std::memcpy(values.data(), file->tensor_data(t), t.size_bytes);
      std::vector<uint8_t> bytes(values.size() * 2);
      auto* out = reinterpret_cast<uint16_t*>(bytes.data());
      for (size_t i = 0; i < values.size(); ++i)
        out[i] = dtype == model::SafetensorsDType::F16 ? kernels::fp32_to_fp16(values[i])
                                                       : kernels::fp32_to_bf16(values[i]);
      tensors.push_back({t.name, dtype, t.shape, std::move(bytes)});
    }
    model::write_safetensors((tmp.path() / "model.safetensors").string(), tensors);
    fs::copy_file(reference_root() / "f32" / "config.json", tmp.path() / "config.json");
    auto model = LlamaModel::load(tmp.path().string());
    const Reference ref = load_reference("f32");
    // Measured ~1e-3 (F16) and ~6e-3 (BF16): 11- and 8-bit mantissas.
    const double bound = dtype == model::SafetensorsDType::F16 ? 5e-3 : 3e-2;
    EXPECT_LT(worst_sequence_error(run_sequences(*model, ref), ref, model->config().n_vocab), bound);
  }
}

// RoPE scaling from config.json (tools/hf_reference.py --rope-scaling): "llama3" (Llama 3.1's; Nibble
// computes the frequency factors as convert_hf_to_gguf.py computes rope_freqs.weight, transformers its
// inverse frequencies its own way) and "linear", against transformers' logits with fp16 attention, as
// F32LogitsMatchTransformers; converted to GGUF (the factors as rope_freqs.weight, the linear factor as
// llama.rope.scaling.*), the same. The same weights with the scaling taken out of config.json are far
// from them, so the comparison can tell.
TEST(HfLlama, RopeScaledCheckpointsMatchTransformers) {
  for (const char* variant : {"llama3-rope", "linear-rope", "yarn-rope"}) {
    SCOPED_TRACE(variant);
    const fs::path dir = reference_root() / variant;
    const Reference ref = load_reference(variant);
    auto model = LlamaModel::load(dir.string());
    const model::LlamaConfig& c = model->config();
    const bool llama3 = std::string(variant) == "llama3-rope";
    const bool yarn = std::string(variant) == "yarn-rope";
    EXPECT_EQ(c.rope_freq_factors.size(), llama3 ? 8u : 0u);
    EXPECT_EQ(c.rope_freq_scale(), llama3 ? 1.0f : 0.25f);
    EXPECT_EQ(c.rope_yarn_original_context, yarn ? 2048 : 0);
    // Measured 1.3e-5 (llama3) and 7e-5 (linear): fp16 roundings that summation order tipped, as for
    // the unscaled F32 model; a RoPE mistake gives 1e-2 or more.
    EXPECT_LT(worst_sequence_error(run_sequences(*model, ref), ref, c.n_vocab), 2e-4);

    test::TempDir tmp;
    const fs::path gguf = tmp.path() / "converted.gguf";
    model::convert_hf_to_gguf(dir.string(), gguf.string(), /*require_tokenizer=*/false);
    auto converted = LlamaModel::load(gguf.string());
    EXPECT_EQ(converted->config().rope_freq_factors, c.rope_freq_factors);
    EXPECT_EQ(converted->config().rope_freq_scale(), c.rope_freq_scale());
    EXPECT_EQ(converted->config().rope_yarn_original_context, c.rope_yarn_original_context);
    EXPECT_LT(worst_sequence_error(run_sequences(*converted, ref), ref, c.n_vocab), 2e-4);

    json config = json::parse(std::ifstream(dir / "config.json"));
    for (const char* key : {"rope_scaling", "rope_parameters"}) {
      if (config.contains(key) && config[key].is_object()) {
        config[key]["rope_type"] = "default";
        config[key].erase("type");
      }
    }
    const fs::path plain = tmp.path() / "plain";
    fs::create_directory(plain);
    std::ofstream(plain / "config.json") << config.dump();
    fs::copy_file(dir / "model.safetensors", plain / "model.safetensors");
    auto unscaled = LlamaModel::load(plain.string());
    EXPECT_TRUE(unscaled->config().rope_freq_factors.empty());
    EXPECT_GT(worst_sequence_error(run_sequences(*unscaled, ref), ref, c.n_vocab), 1e-2);

    if (yarn) {
      // Without a factor, transformers' YaRN takes max_position_embeddings / original (8192 / 2048 = 4).
      json no_factor = json::parse(std::ifstream(dir / "config.json"));
      for (const char* key : {"rope_scaling", "rope_parameters"}) {
        if (no_factor.contains(key) && no_factor[key].is_object()) no_factor[key].erase("factor");
      }
      const fs::path implied = tmp.path() / "implied";
      fs::create_directory(implied);
      std::ofstream(implied / "config.json") << no_factor.dump();
      fs::copy_file(dir / "model.safetensors", implied / "model.safetensors");
      auto same = LlamaModel::load(implied.string());
      EXPECT_EQ(same->config().rope_freq_scale(), 0.25f);
      EXPECT_EQ(run_sequences(*same, ref), run_sequences(*model, ref));
    }
  }
}

// config.json's head_dim other than hidden_size / num_attention_heads (Mistral Nemo's heads of 128 over
// 5120 / 32; here 4 heads of 32 over 64): q and the attention output sized by it, against transformers;
// converted to GGUF (llama.attention.key_length / value_length, as convert_hf_to_gguf.py writes it), the
// same.
TEST(HfLlama, HeadDimOtherThanHiddenOverHeadsMatchesTransformers) {
  const fs::path dir = reference_root() / "head-dim-32";
  const Reference ref = load_reference("head-dim-32");
  auto model = LlamaModel::load(dir.string());
  EXPECT_EQ(model->config().head_dim, 32);
  EXPECT_EQ(model->config().q_dim(), 128);
  EXPECT_EQ(model->config().n_embd, 64);
  EXPECT_LT(worst_sequence_error(run_sequences(*model, ref), ref, model->config().n_vocab), 2e-4);

  test::TempDir tmp;
  const fs::path gguf = tmp.path() / "converted.gguf";
  model::convert_hf_to_gguf(dir.string(), gguf.string(), /*require_tokenizer=*/false);
  EXPECT_EQ(model::GgufFile::open(gguf.string())->get_uint("llama.attention.key_length"), 32u);
  auto converted = LlamaModel::load(gguf.string());
  EXPECT_EQ(converted->config().head_dim, 32);
  EXPECT_LT(worst_sequence_error(run_sequences(*converted, ref), ref, model->config().n_vocab), 2e-4);
}

// config.json's scalings that Nibble does not run are refused by name, not run as plain RoPE.
TEST(HfLlama, UnsupportedRopeScalingIsRefusedByName) {
  const fs::path dir = reference_root() / "llama3-rope";
  const json original = json::parse(std::ifstream(dir / "config.json"));
  const std::string key = original.contains("rope_scaling") ? "rope_scaling" : "rope_parameters";
  struct Case {
    const char* field;
    json value;
    const char* words;
  };
  const Case cases[] = {
      {"rope_type", "dynamic",
       "is not supported (only rope_type \"default\", \"linear\", \"llama3\" and \"yarn\")"},
      {"rope_type", "longrope", "is not supported"},
      {"factor", 0.5, ".factor' must be a number of at least 1"},
      {"factor", "eight", ".factor' must be a number"},
      {"low_freq_factor", 4.0, "needs 0 < low_freq_factor < high_freq_factor"},
      {"original_max_position_embeddings", -1, ".original_max_position_embeddings' must be positive"},
  };
  const auto expect_refused = [&](const fs::path& from, const json& original_config,
                                  const std::string& rope_key, const Case& bad) {
    SCOPED_TRACE(std::string(bad.field) + " = " + bad.value.dump());
    test::TempDir tmp;
    json config = original_config;
    ASSERT_TRUE(config.contains(rope_key));
    if (bad.value.is_null()) {
      config[rope_key].erase(bad.field);
    } else {
      config[rope_key][bad.field] = bad.value;
    }
    std::ofstream(tmp.path() / "config.json") << config.dump();
    fs::copy_file(from / "model.safetensors", tmp.path() / "model.safetensors");
    try {
      (void)LlamaModel::load(tmp.path().string());
      ADD_FAILURE() << "accepted";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(bad.words), std::string::npos) << e.what();
    }
  };
  for (const Case& bad : cases) expect_refused(dir, original, key, bad);

  // YaRN as llama.cpp runs it for Llama: the factor and the original context, transformers' defaults
  // for the rest; parameters llama.cpp would not honour are refused by name (null: the key removed).
  const fs::path yarn_dir = reference_root() / "yarn-rope";
  const json yarn = json::parse(std::ifstream(yarn_dir / "config.json"));
  const std::string yarn_key = yarn.contains("rope_scaling") ? "rope_scaling" : "rope_parameters";
  const Case yarn_cases[] = {
      {"original_max_position_embeddings", nullptr, ".original_max_position_embeddings' is missing"},
      {"original_max_position_embeddings", 100.5, "must be a positive integer"},
      {"beta_fast", 16.0, ".beta_fast' other than 32 is not supported"},
      {"beta_slow", 2.0, ".beta_slow' other than 1 is not supported"},
      {"attention_factor", 1.5, ".attention_factor' is not supported"},
      {"mscale", 0.707, ".mscale' is not supported"},
      {"mscale_all_dim", 0.707, ".mscale_all_dim' is not supported"},
      {"truncate", false, ".truncate' other than true is not supported"},
      {"factor", 0.5, ".factor' must be a number of at least 1"},
  };
  for (const Case& bad : yarn_cases) expect_refused(yarn_dir, yarn, yarn_key, bad);
}

TEST(HfLlama, PipelineStagesMatchTheWholeModel) {
  const std::string dir = (reference_root() / "f32").string();
  auto whole = LlamaModel::load(dir);
  auto first = LlamaModel::load(dir, {}, nullptr, LayerRange{0, 1});
  auto second = LlamaModel::load(dir, {}, nullptr, LayerRange{1, 2});
  const std::vector<int32_t> tokens = {5, 17, 150, 3, 99};
  const std::vector<int32_t> table = {0};
  kernels::ThreadPool pool(1);
  KvCache whole_cache(whole->shard_config(), 1, 16), first_cache(first->shard_config(), 1, 16),
      second_cache(second->shard_config(), 1, 16);
  std::vector<float> expected, hidden, got;
  const ForwardBatch batch = ForwardBatch::single(tokens, 0, table, true);
  whole->forward(batch, whole_cache, pool, expected);
  first->forward_stage(batch, first_cache, pool, nullptr, hidden);
  second->forward_stage(batch, second_cache, pool, hidden.data(), got);
  EXPECT_EQ(got, expected);
}

TEST(HfLlama, NibbleLogitsCommandTakesTokenIds) {
  const Reference ref = load_reference("f32");
  test::TempDir tmp;
  const fs::path out = tmp.path() / "logits.f32";
  std::string ids;
  for (int32_t id : ref.sequences[1]) {
    if (!ids.empty()) ids += ',';  // (not "," + to_string: GCC 12's -Wrestrict false positive)
    ids += std::to_string(id);
  }
  const std::string dir = (reference_root() / "f32").string();
  const auto r = test::run_command(test::nibble_bin() + " logits --model " + dir + " --tokens " + ids +
                                   " --threads 1 --out " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::vector<uint8_t> bytes = test::read_file_bytes(out);
  std::vector<float> got(bytes.size() / sizeof(float));
  std::memcpy(got.data(), bytes.data(), bytes.size());
  const int64_t n_vocab = 192;
  const auto first = ref.logits.begin() + static_cast<int64_t>(ref.sequences[0].size()) * n_vocab;
  const std::vector<float> expected(first, first + static_cast<int64_t>(ref.sequences[1].size()) * n_vocab);
  EXPECT_LT(test::max_relative_rms(got, expected, n_vocab), 1e-4);

  // Text needs a tokenizer, which an HF directory does not give Nibble yet: a clear error.
  const auto text = test::run_command(test::nibble_bin() + " logits --model " + dir +
                                      " --prompt hello --out " + out.string());
  EXPECT_NE(text.exit_code, 0);
  EXPECT_NE(text.output.find("no tokenizer"), std::string::npos) << text.output;
  EXPECT_NE(text.output.find("--tokens"), std::string::npos) << text.output;
  const auto gen = test::run_command(test::nibble_bin() + " generate --model " + dir + " --prompt hello");
  EXPECT_NE(gen.exit_code, 0);
  EXPECT_NE(gen.output.find("no tokenizer"), std::string::npos) << gen.output;
}

}  // namespace
}  // namespace nibble::worker
