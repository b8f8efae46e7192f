// `nibble quantize -m HF_DIR`: a Hugging Face checkpoint directory as the input. Converted at F32 or
// F16 it gives the checkpoint's own logits; quantized it gives the same tensors as quantizing the
// GGUF the checkpoint was made from (RTN, GPTQ with calibration, a GPTQ directory, mixed precision);
// its vocabulary is tokenizer.json's; a missing tokenizer.json or a corrupt .safetensors file is
// refused naming the file.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "kernels/thread_pool.hpp"
#include "model/calibration.hpp"
#include "model/gguf.hpp"
#include "model/hf_tokenizer.hpp"
#include "model/random_model.hpp"
#include "model/safetensors.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {
namespace {

namespace fs = std::filesystem;
using kernels::DType;
using nlohmann::json;

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A copy of a committed tiny checkpoint (tests/data/hf-tiny-llama/<variant>, 192 tokens, no
// tokenizer) with a small Llama-2 style tokenizer.json.
fs::path committed_checkpoint_with_tokenizer(const std::string& variant, const fs::path& into) {
  const fs::path dir = into / variant;
  fs::copy(test::test_data_dir() / "hf-tiny-llama" / variant, dir);
  write_text(dir / "tokenizer.json", test::tiny_llama_tokenizer_json(192));
  write_text(dir / "tokenizer_config.json", R"({"bos_token": "<s>", "eos_token": "</s>"})");
  return dir;
}

// The HF checkpoint a GGUF Llama model was converted from: HF tensor names, the GGUF's float dtype,
// q/k rows put back into HF's rotate-halves order (written out here, independently of the loader's
// permutation, so that a wrong permutation in either direction fails), tokenizer.json of its
// vocabulary.
void write_hf_checkpoint_of(const model::GgufFile& gguf, const fs::path& dir, bool with_tokenizer = true) {
  fs::create_directories(dir);
  const model::LlamaConfig c = model::LlamaConfig::from_gguf(gguf);
  const auto hf_dtype = [](DType t) {
    if (t == DType::F16) return model::SafetensorsDType::F16;
    if (t == DType::BF16) return model::SafetensorsDType::BF16;
    EXPECT_EQ(t, DType::F32);
    return model::SafetensorsDType::F32;
  };
  std::vector<model::SafetensorsTensorData> tensors;
  const auto add = [&](const std::string& gguf_name, const std::string& hf_name, int64_t rope_heads) {
    const model::GgufTensorInfo* t = gguf.find_tensor(gguf_name);
    ASSERT_NE(t, nullptr) << gguf_name;
    const uint8_t* data = gguf.tensor_data(*t);
    std::vector<uint8_t> bytes(data, data + t->size_bytes);
    if (rope_heads > 0) {  // HF row h·d + side·d/2 + i is GGUF row h·d + 2i + side
      const auto row = static_cast<size_t>(kernels::row_bytes(t->type, t->row_elements()));
      const int64_t d = c.head_dim, half = d / 2;
      for (int64_t h = 0; h < rope_heads; ++h)
        for (int64_t side = 0; side < 2; ++side)
          for (int64_t i = 0; i < half; ++i)
            std::memcpy(bytes.data() + static_cast<size_t>(h * d + side * half + i) * row,
                        data + static_cast<size_t>(h * d + 2 * i + side) * row, row);
    }
    std::vector<int64_t> shape(t->dims.rbegin(), t->dims.rend());
    tensors.push_back({hf_name, hf_dtype(t->type), shape, std::move(bytes)});
  };
  add("token_embd.weight", "model.embed_tokens.weight", 0);
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string blk = "blk." + std::to_string(l) + ".", hf = "model.layers." + std::to_string(l) + ".";
    add(blk + "attn_norm.weight", hf + "input_layernorm.weight", 0);
    add(blk + "attn_q.weight", hf + "self_attn.q_proj.weight", c.n_head);
    add(blk + "attn_k.weight", hf + "self_attn.k_proj.weight", c.n_head_kv);
    add(blk + "attn_v.weight", hf + "self_attn.v_proj.weight", 0);
    add(blk + "attn_output.weight", hf + "self_attn.o_proj.weight", 0);
    add(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", 0);
    add(blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight", 0);
    add(blk + "ffn_up.weight", hf + "mlp.up_proj.weight", 0);
    add(blk + "ffn_down.weight", hf + "mlp.down_proj.weight", 0);
  }
  add("output_norm.weight", "model.norm.weight", 0);
  add("output.weight", "lm_head.weight", 0);
  model::write_safetensors((dir / "model.safetensors").string(), tensors);
  const json config = {{"architectures", {"LlamaForCausalLM"}},
                       {"hidden_size", c.n_embd},
                       {"num_hidden_layers", c.n_layer},
                       {"num_attention_heads", c.n_head},
                       {"num_key_value_heads", c.n_head_kv},
                       {"intermediate_size", c.n_ff},
                       {"vocab_size", c.n_vocab},
                       {"max_position_embeddings", c.n_ctx_train},
                       {"rms_norm_eps", static_cast<double>(c.rms_eps)},
                       {"rope_theta", static_cast<double>(c.rope_base)},
                       {"hidden_act", "silu"},
                       {"tie_word_embeddings", false},
                       {"bos_token_id", 1},
                       {"eos_token_id", 2}};
  write_text(dir / "config.json", config.dump(2));
  if (with_tokenizer) write_text(dir / "tokenizer.json", test::tokenizer_json_of(gguf));
}

// The project's random tiny model (embd 128, ffn 256: every quantized type fits) as `type`, and the
// HF checkpoint made from it.
struct RandomPair {
  fs::path gguf, hf;
};
RandomPair random_pair(const fs::path& into, DType type, bool with_tokenizer = true) {
  RandomPair p{into / "source.gguf", into / "hf"};
  model::write_random_llama(p.gguf.string(), model::llama_shape_by_name("tiny"), type, 3);
  write_hf_checkpoint_of(*model::GgufFile::open(p.gguf.string()), p.hf, with_tokenizer);
  return p;
}

test::CommandResult quantize(const fs::path& in, const fs::path& out, const std::string& options) {
  return test::run_command(test::nibble_bin() + " quantize -m " + in.string() + " -o " + out.string() + " " +
                           options + " 2>&1");
}

// Every sequence from position 0 in its own cache; all positions' logits, one after the other.
std::vector<float> logits_of(const fs::path& model_path, const std::vector<std::vector<int32_t>>& sequences) {
  const auto m = LlamaModel::load(model_path.string());
  kernels::ThreadPool pool(2);
  std::vector<float> all, logits;
  for (const auto& seq : sequences) {
    const int64_t blocks = (static_cast<int64_t>(seq.size()) + 15) / 16;
    KvCache cache(m->config(), blocks, 16);
    std::vector<int32_t> table(static_cast<size_t>(blocks));
    for (int64_t b = 0; b < blocks; ++b) table[static_cast<size_t>(b)] = static_cast<int32_t>(b);
    m->forward(ForwardBatch::single(seq, 0, table, true), cache, pool, logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  return all;
}

double relative_rms(const std::vector<float>& got, const std::vector<float>& want) {
  EXPECT_EQ(got.size(), want.size());
  double err = 0, norm = 0;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    err += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    norm += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(err / norm);
}

// Mean KL(softmax(want) || softmax(got)) per row of n_vocab.
double mean_kl(const std::vector<float>& want, const std::vector<float>& got, int64_t n_vocab) {
  const int64_t rows = static_cast<int64_t>(want.size()) / n_vocab;
  double kl = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = want.data() + r * n_vocab;
    const float* q = got.data() + r * n_vocab;
    const double max_p = *std::max_element(p, p + n_vocab), max_q = *std::max_element(q, q + n_vocab);
    double sum_p = 0, sum_q = 0;
    for (int64_t v = 0; v < n_vocab; ++v) {
      sum_p += std::exp(p[v] - max_p);
      sum_q += std::exp(q[v] - max_q);
    }
    for (int64_t v = 0; v < n_vocab; ++v) {
      const double lp = p[v] - max_p - std::log(sum_p), lq = q[v] - max_q - std::log(sum_q);
      kl += std::exp(lp) * (lp - lq);
    }
  }
  return kl / static_cast<double>(rows);
}

// Same tensor names, order, shapes, types and bytes.
void expect_same_tensors(const fs::path& got_path, const fs::path& want_path) {
  const auto got = model::GgufFile::open(got_path.string());
  const auto want = model::GgufFile::open(want_path.string());
  ASSERT_EQ(got->tensors().size(), want->tensors().size());
  for (size_t i = 0; i < want->tensors().size(); ++i) {
    const model::GgufTensorInfo& g = got->tensors()[i];
    const model::GgufTensorInfo& w = want->tensors()[i];
    EXPECT_EQ(g.name, w.name);
    EXPECT_EQ(g.dims, w.dims) << w.name;
    EXPECT_EQ(g.type, w.type) << w.name;
    ASSERT_EQ(g.size_bytes, w.size_bytes) << w.name;
    EXPECT_EQ(std::memcmp(got->tensor_data(g), want->tensor_data(w), w.size_bytes), 0) << w.name;
  }
}

// The llama.* hyperparameters and the file type agree.
void expect_same_llama_metadata(const fs::path& got_path, const fs::path& want_path) {
  const auto got = model::GgufFile::open(got_path.string());
  const auto want = model::GgufFile::open(want_path.string());
  int compared = 0;
  for (const auto& [key, value] : want->metadata()) {
    if (key.rfind("llama.", 0) != 0 && key != "general.file_type" && key != "general.architecture") continue;
    const model::GgufValue* g = got->find(key);
    ASSERT_NE(g, nullptr) << key;
    EXPECT_EQ(g->type, value.type) << key;
    EXPECT_EQ(g->u, value.u) << key;
    EXPECT_EQ(g->f, value.f) << key;
    EXPECT_EQ(g->s, value.s) << key;
    ++compared;
  }
  EXPECT_GE(compared, 12);
}

std::vector<std::vector<int32_t>> reference_sequences() {
  const json j = json::parse(std::ifstream(test::test_data_dir() / "hf-tiny-llama" / "reference.json"));
  return j["sequences"].get<std::vector<std::vector<int32_t>>>();
}

// (a) The committed checkpoints converted at F32 / F16: the same logits as the checkpoint run
// directly. F32 is the same numbers, so the logits are equal; F16 rounds every weight once. A q/k
// row order other than the loader's would move the logits by tens of percent.
TEST(QuantizeHf, F32AndF16GiveTheCheckpointsLogits) {
  test::TempDir tmp;
  const auto sequences = reference_sequences();
  struct Case {
    const char* variant;
    const char* type;
    double tolerance;  // relative RMS of the logits
  };
  for (const Case& c : {Case{"f32", "f32", 0.0}, Case{"f32", "f16", 2e-3}, Case{"bf16-tied", "f32", 0.0},
                        Case{"bf16-tied", "f16", 2e-3}}) {
    SCOPED_TRACE(std::string(c.variant) + " -> " + c.type);
    const fs::path case_dir = tmp.path() / (std::string(c.variant) + "-" + c.type);
    fs::create_directories(case_dir);
    const fs::path dir = committed_checkpoint_with_tokenizer(c.variant, case_dir);
    const fs::path out = case_dir / "out.gguf";
    const test::CommandResult r = quantize(dir, out, std::string("--type ") + c.type);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_FALSE(fs::exists(out.string() + ".hf-source.gguf")) << "the scratch conversion is left behind";

    const double err = relative_rms(logits_of(out, sequences), logits_of(dir, sequences));
    std::printf("%s -> %s: logits relative RMS %.3g\n", c.variant, c.type, err);
    EXPECT_LE(err, c.tolerance);

    const auto file = model::GgufFile::open(out.string());
    EXPECT_EQ(file->find_tensor("output.weight") == nullptr, std::string(c.variant) == "bf16-tied");
    EXPECT_EQ(file->find_tensor("blk.1.attn_q.weight")->type,
              std::string(c.type) == "f16" ? DType::F16 : DType::F32);
    EXPECT_EQ(file->get_uint("llama.embedding_length"), 64u);
    EXPECT_EQ(file->get_uint("llama.attention.head_count_kv"), 2u);
    EXPECT_EQ(file->get_uint("llama.feed_forward_length"), 88u);
    EXPECT_EQ(file->get_uint("llama.context_length"), 128u);
    // The vocabulary is tokenizer.json's: the same ids for text.
    const auto from_gguf = model::Tokenizer::from_gguf(*file);
    const auto from_json = model::load_hf_tokenizer(dir.string(), 192);
    const std::string text = test::calibration_part().substr(0, 2000);
    EXPECT_EQ(from_gguf->encode(text, true), from_json->encode(text, true));
    EXPECT_EQ(from_gguf->n_vocab(), 192);
  }

  // End to end through `nibble logits` with a prompt (tokenized by each file's own tokenizer).
  const fs::path dir = tmp.path() / "f32-f32" / "f32";
  const fs::path out = tmp.path() / "f32-f32" / "out.gguf";
  const std::string logits = test::nibble_bin() + " logits --prompt 'the road is here' -t 2 -m ";
  ASSERT_EQ(test::run_command(logits + dir.string() + " -o " + (tmp.path() / "a.f32").string()).exit_code, 0);
  ASSERT_EQ(test::run_command(logits + out.string() + " -o " + (tmp.path() / "b.f32").string()).exit_code, 0);
  const auto a = test::read_file_bytes(tmp.path() / "a.f32");
  EXPECT_GT(a.size(), 192u * 4 * 5);
  EXPECT_EQ(a, test::read_file_bytes(tmp.path() / "b.f32"));
}

// (b) Q8_0 / Q4_0 (and F16) from an HF checkpoint: the very tensors, hyperparameters and token ids
// that quantizing the GGUF it was made from gives, for F32, F16 and BF16 weights.
TEST(QuantizeHf, RtnMatchesQuantizingTheSameGguf) {
  for (const DType source : {DType::F32, DType::F16, DType::BF16}) {
    SCOPED_TRACE(kernels::type_name(source));
    test::TempDir tmp;
    const RandomPair p = random_pair(tmp.path(), source);
    for (const char* type : {"q8_0", "q4_0", "f16"}) {
      SCOPED_TRACE(type);
      const fs::path from_hf = tmp.path() / "hf.gguf", from_gguf = tmp.path() / "gguf.gguf";
      const test::CommandResult a = quantize(p.hf, from_hf, std::string("--type ") + type);
      ASSERT_EQ(a.exit_code, 0) << a.output;
      const test::CommandResult b = quantize(p.gguf, from_gguf, std::string("--type ") + type);
      ASSERT_EQ(b.exit_code, 0) << b.output;
      expect_same_tensors(from_hf, from_gguf);
      expect_same_llama_metadata(from_hf, from_gguf);
    }
    const auto hf_tokenizer =
        model::Tokenizer::from_gguf(*model::GgufFile::open((tmp.path() / "hf.gguf").string()));
    const auto source_tokenizer = model::Tokenizer::from_gguf(*model::GgufFile::open(p.gguf.string()));
    const std::string text = test::calibration_part();
    EXPECT_EQ(hf_tokenizer->encode(text, true), source_tokenizer->encode(text, true));
  }
}

// (c) GPTQ (and AWQ) from an HF checkpoint. Calibration tokenizes the text with tokenizer.json's vocabulary
// and runs the converted model, so the result must be the GGUF path's byte for byte: a wrong
// tokenizer (other windows) or a wrong q/k order (other activations) would change the GPTQ
// solution. It is also closer to the float model than RTN on held-out text, as GPTQ is on this
// random model from GGUF (CalibratedQuantizeModel.GptqOnRandomModelIsCloserToFloatThanRtn).
TEST(QuantizeHf, GptqMatchesTheGgufPathAndBeatsRtn) {
  test::TempDir tmp;
  const RandomPair p = random_pair(tmp.path(), DType::F32);
  const fs::path calib = tmp.path() / "calib.txt";
  write_text(calib, test::calibration_part());
  const std::string gptq = "--type q4_0 --method gptq --calib " + calib.string() +
                           " --calib-samples 16 --calib-len 128 --seed 5 -t 2";
  const fs::path from_hf = tmp.path() / "gptq-hf.gguf", from_gguf = tmp.path() / "gptq-gguf.gguf";
  const fs::path rtn = tmp.path() / "rtn-hf.gguf";
  const test::CommandResult a = quantize(p.hf, from_hf, gptq);
  ASSERT_EQ(a.exit_code, 0) << a.output;
  EXPECT_NE(a.output.find("layer 2/2"), std::string::npos) << a.output;
  const test::CommandResult b = quantize(p.gguf, from_gguf, gptq);
  ASSERT_EQ(b.exit_code, 0) << b.output;
  expect_same_tensors(from_hf, from_gguf);
  EXPECT_EQ(model::GgufFile::open(from_hf.string())->get_string("nibble.quantization.method"), "gptq");
  // AWQ takes the same path (calibrated on the converted model's activations).
  const std::string awq = "--type q4_0 --method awq --calib " + calib.string() +
                          " --calib-samples 4 --calib-len 64 --seed 5 -t 2";
  const test::CommandResult awq_hf = quantize(p.hf, tmp.path() / "awq-hf.gguf", awq);
  ASSERT_EQ(awq_hf.exit_code, 0) << awq_hf.output;
  const test::CommandResult awq_gguf = quantize(p.gguf, tmp.path() / "awq-gguf.gguf", awq);
  ASSERT_EQ(awq_gguf.exit_code, 0) << awq_gguf.output;
  expect_same_tensors(tmp.path() / "awq-hf.gguf", tmp.path() / "awq-gguf.gguf");

  const test::CommandResult r = quantize(p.hf, rtn, "--type q4_0");
  ASSERT_EQ(r.exit_code, 0) << r.output;

  const auto tokenizer = model::load_hf_tokenizer(p.hf.string(), 4096);
  const auto windows = model::calibration_windows(*tokenizer, test::held_out_part(), 8, 96, 1234);
  const std::vector<float> want = logits_of(p.hf, windows);
  const std::vector<float> got_gptq = logits_of(from_hf, windows), got_rtn = logits_of(rtn, windows);
  const double gptq_err = relative_rms(got_gptq, want), rtn_err = relative_rms(got_rtn, want);
  const double gptq_kl = mean_kl(want, got_gptq, 4096), rtn_kl = mean_kl(want, got_rtn, 4096);
  std::printf("from HF: GPTQ logits rel. RMS %.4f (RTN %.4f), KL %.5f (RTN %.5f)\n", gptq_err, rtn_err,
              gptq_kl, rtn_kl);
  EXPECT_LT(gptq_err, 0.9 * rtn_err);
  EXPECT_LT(gptq_kl, 0.9 * rtn_kl);
}

// --format gptq and --size-budget take an HF checkpoint too. A GPTQ directory by RTN needs no
// tokenizer (it reads no text and holds no vocabulary); one made from a directory with
// tokenizer.json keeps it.
TEST(QuantizeHf, GptqDirectoryAndSizeBudget) {
  test::TempDir tmp;
  const RandomPair p = random_pair(tmp.path(), DType::F32);
  const fs::path from_hf = tmp.path() / "gptq-hf", from_gguf = tmp.path() / "gptq-gguf";
  const test::CommandResult a =
      quantize(p.hf, fs::path(from_hf.string() + "/"), "--format gptq --group-size 64");
  ASSERT_EQ(a.exit_code, 0) << a.output;
  const test::CommandResult b = quantize(p.gguf, from_gguf, "--format gptq --group-size 64");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_EQ(test::read_file_bytes(from_hf / "model.safetensors"),
            test::read_file_bytes(from_gguf / "model.safetensors"));
  EXPECT_EQ(test::read_file_bytes(from_hf / "tokenizer.json"),
            test::read_file_bytes(p.hf / "tokenizer.json"));
  EXPECT_FALSE(fs::exists(tmp.path() / "gptq-hf.hf-source.gguf"));

  test::TempDir bare;
  const RandomPair no_tokenizer = random_pair(bare.path(), DType::F32, /*with_tokenizer=*/false);
  const test::CommandResult c =
      quantize(no_tokenizer.hf, bare.path() / "gptq", "--format gptq --group-size 64");
  ASSERT_EQ(c.exit_code, 0) << c.output;
  EXPECT_EQ(test::read_file_bytes(bare.path() / "gptq" / "model.safetensors"),
            test::read_file_bytes(from_gguf / "model.safetensors"));
  EXPECT_FALSE(fs::exists(bare.path() / "gptq" / "tokenizer.json"));

  const fs::path calib = tmp.path() / "calib.txt";
  write_text(calib, test::calibration_part());
  const std::string budget = "--type q4_0 --size-budget 1MB --calib " + calib.string() +
                             " --calib-samples 4 --calib-len 64 --sensitivity-samples 2 -t 2";
  const test::CommandResult m1 = quantize(p.hf, tmp.path() / "mixed-hf.gguf", budget);
  ASSERT_EQ(m1.exit_code, 0) << m1.output;
  const test::CommandResult m2 = quantize(p.gguf, tmp.path() / "mixed-gguf.gguf", budget);
  ASSERT_EQ(m2.exit_code, 0) << m2.output;
  expect_same_tensors(tmp.path() / "mixed-hf.gguf", tmp.path() / "mixed-gguf.gguf");
  const auto mixed = model::GgufFile::open((tmp.path() / "mixed-hf.gguf").string());
  // All 4-bit is 0.85 MB and both embedding matrices at Q8_0 would pass 1 MB: a real choice.
  EXPECT_LE(fs::file_size(tmp.path() / "mixed-hf.gguf"), 1000000u);
  const auto raised = mixed->get_string_array("nibble.quantization.high_precision_tensors");
  EXPECT_GT(raised.size(), 0u);
  EXPECT_LT(raised.size(), 16u);
}

// (d) What cannot be quantized is refused naming the file, and nothing is left behind.
TEST(QuantizeHf, MissingTokenizerOrCorruptWeightsNameTheFile) {
  test::TempDir tmp;
  const fs::path bare = tmp.path() / "bare";
  fs::copy(test::test_data_dir() / "hf-tiny-llama" / "f32", bare);
  const std::string missing = (bare / "tokenizer.json").string() + " is missing";
  const fs::path calib = tmp.path() / "calib.txt";
  write_text(calib, test::calibration_part());
  for (const std::string& options :
       {std::string("--type f32"), "--type q4_0 --method gptq --calib " + calib.string(),
        "--format gptq --method gptq --calib " + calib.string()}) {
    SCOPED_TRACE(options);
    const test::CommandResult r = quantize(bare, tmp.path() / "out.gguf", options);
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.output.find(missing), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(tmp.path() / "out.gguf"));
    EXPECT_FALSE(fs::exists(tmp.path() / "out.gguf.hf-source.gguf"));
  }

  // A truncated model.safetensors, and one whose header is not JSON.
  const fs::path dir = committed_checkpoint_with_tokenizer("f32", tmp.path());
  const fs::path weights = dir / "model.safetensors";
  std::vector<uint8_t> bytes = test::read_file_bytes(weights);
  const std::vector<uint8_t> whole = bytes;
  bytes.resize(bytes.size() - 100);
  test::write_file_bytes(weights, bytes);
  test::CommandResult r = quantize(dir, tmp.path() / "out.gguf", "--type f32");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(weights.string()), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("truncated"), std::string::npos) << r.output;
  bytes = whole;
  bytes[8] = '[';  // the header's opening brace
  bytes[12] = '#';
  test::write_file_bytes(weights, bytes);
  r = quantize(dir, tmp.path() / "out.gguf", "--type f32");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find(weights.string()), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(tmp.path() / "out.gguf"));
  EXPECT_FALSE(fs::exists(tmp.path() / "out.gguf.hf-source.gguf"));

  // A head size the tensors cannot back (config.json's head_dim 32 over 4 heads: q of 128 rows, where the
  // checkpoint's has 64; a head_dim they back converts,
  // HfLlama.HeadDimOtherThanHiddenOverHeadsMatchesTransformers).
  test::write_file_bytes(weights, whole);
  json config = json::parse(std::ifstream(dir / "config.json"));
  config["head_dim"] = 32;
  write_text(dir / "config.json", config.dump());
  r = quantize(dir, tmp.path() / "out.gguf", "--type f32");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(
      r.output.find("tensor 'model.layers.0.self_attn.q_proj.weight' has shape [64, 64], expected [128, 64]"),
      std::string::npos)
      << r.output;
  EXPECT_FALSE(fs::exists(tmp.path() / "out.gguf"));
}

}  // namespace
}  // namespace nibble::worker
