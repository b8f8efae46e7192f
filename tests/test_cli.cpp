// The real `nibble` binary on project-made models: subcommands work, and bad input gives a one-line
// error and a non-zero exit.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/gguf.hpp"
#include "model/tokenizer.hpp"
#include "tests/support/test_support.hpp"

namespace nibble {
namespace {

namespace fs = std::filesystem;

class CliTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    model_ = (dir_->path() / "tiny-q4_0.gguf").string();
    const auto r = run("make-model --shape tiny --type q4_0 --seed 3 --out " + model_);
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() { delete dir_; }
  static test::CommandResult run(const std::string& args) {
    return test::run_command(test::nibble_bin() + " " + args);
  }
  static nlohmann::json run_json(const std::string& args) {
    const auto r = run(args);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return nlohmann::json::parse(r.output);
  }
  static size_t line_count(const std::string& s) {
    size_t lines = 0;
    for (char c : s) lines += c == '\n';
    return lines;
  }
  static inline test::TempDir* dir_ = nullptr;
  static inline std::string model_;
};

// --device cuda runs on a GPU when this build has CUDA and the machine a device; otherwise it fails
// with one line saying which is missing (never a crash or a silent CPU run).
TEST_F(CliTest, DeviceCudaRunsOrSaysWhyNot) {
  const auto gen = run("generate -m " + model_ + " -p 'hello' -n 4 --temperature 0 --json --device cuda");
  if (gen.exit_code == 0) {
    EXPECT_EQ(nlohmann::json::parse(gen.output).at("device"), "cuda") << gen.output;
  } else {
    EXPECT_EQ(gen.exit_code, 1) << gen.output;
    EXPECT_NE(gen.output.find("--device cuda: "), std::string::npos) << gen.output;
    EXPECT_NE(gen.output.find("CUDA"), std::string::npos) << gen.output;
  }
  const auto logits = run("logits -m " + model_ + " --tokens '1 2 3' --device cuda -o " +
                          (dir_->path() / "cuda.logits").string());
  EXPECT_EQ(logits.exit_code, gen.exit_code) << logits.output;
  EXPECT_EQ(run("generate -m " + model_ + " -p 'hello' --device tpu").exit_code == 0, false);
}

// A dummy model needs no file: generate runs on the CPU with the synthetic vocabulary, the same
// tokens every time for a seed; bench-gpu on one runs on a GPU or says why it cannot.
TEST_F(CliTest, DummyModelGeneratesOnTheCpu) {
  const std::string args =
      "generate -m dummy:tiny -p 'Once upon a time' --max-tokens 8 --temperature 0 --json";
  const auto j = run_json(args);
  EXPECT_EQ(j["prompt_tokens"][0], 1) << "BOS first";
  EXPECT_EQ(j["tokens"].size(), 8u) << j.dump();
  EXPECT_EQ(run_json(args)["tokens"], j["tokens"]);
  EXPECT_NE(
      run_json("generate -m dummy:tiny:seed=9 -p 'Once upon a time' --max-tokens 8 --temperature 0 --json")
          ["tokens"],
      j["tokens"]);
  const auto text = run("generate -m dummy:tiny -p 'hello' -n 4 --temperature 0");
  EXPECT_EQ(text.exit_code, 0) << text.output;
  EXPECT_FALSE(text.output.empty());
  const auto unknown = run("generate -m dummy:llama-3b -p 'hello' -n 4");
  EXPECT_EQ(unknown.exit_code, 1) << unknown.output;
  EXPECT_NE(unknown.output.find("llama-70b"), std::string::npos)
      << "lists the known shapes: " << unknown.output;
}

TEST_F(CliTest, BenchGpuOnADummyModelRunsOrSaysWhyNot) {
  const auto r =
      run("bench-gpu --model dummy:tiny --batch 1,2 --prompt-tokens 32 --gen-tokens 4 --repetitions 1 "
          "--prefill-batch 2 --json");
  if (r.exit_code == 0) {
    const auto j = nlohmann::json::parse(r.output);
    EXPECT_EQ(j.at("decode").size(), 2u) << r.output;
    EXPECT_GT(j.at("decode")[0].at("decode_tokens_per_second").get<double>(), 0.0) << r.output;
  } else {
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_EQ(line_count(r.output), 1u) << r.output;
    EXPECT_NE(r.output.find("bench-gpu: "), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("CUDA"), std::string::npos) << r.output;
  }
  // A "long" prompt short enough for the decode attention is refused before anything is measured.
  const auto short_long = run("bench-gpu --model dummy:tiny --long-prompt-tokens 64");
  EXPECT_EQ(short_long.exit_code, 1) << short_long.output;
  EXPECT_NE(short_long.output.find("--long-prompt-tokens needs more than 64 tokens"), std::string::npos)
      << short_long.output;
  // So is an adapter rank past the LoRA kernels' 1024.
  const auto big_rank = run("bench-gpu --model dummy:tiny --lora-rank 1025");
  EXPECT_NE(big_rank.exit_code, 0) << big_rank.output;
  EXPECT_NE(big_rank.output.find("--lora-rank: Value 1025 not in range 0 to 1024"), std::string::npos)
      << big_rank.output;
  // And adapters without a rank (they would be ignored).
  const auto no_rank = run("bench-gpu --model dummy:tiny --lora-adapters 2");
  EXPECT_NE(no_rank.exit_code, 0) << no_rank.output;
  EXPECT_NE(no_rank.output.find("--lora-adapters requires --lora-rank"), std::string::npos) << no_rank.output;
}

// tinygemm's figures are read before anything is measured (a bad file must not cost a measured table),
// and a bad one is refused in one line naming it, so that the GPU session's script can tell it from a
// kernel that broke the device (tools/gpu-bundle.sh's run.sh reruns the table without the file).
TEST_F(CliTest, BenchGpuRefusesTinygemmFiguresItCannotReadBeforeMeasuring) {
  const std::string bad = (dir_->path() / "tinygemm-bad.json").string();
  const std::string missing_field = (dir_->path() / "tinygemm-no-us.json").string();
  std::ofstream(bad) << "{not json";
  std::ofstream(missing_field) << R"({"rows": [{"k": 8192, "n_out": 8192, "m": 1}]})";
  for (const std::string& path : {bad, missing_field, (dir_->path() / "absent.json").string()}) {
    SCOPED_TRACE(path);
    const auto r = run("bench-gpu --tinygemm " + path);
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_EQ(line_count(r.output), 1u) << r.output;
    EXPECT_NE(r.output.find("tinygemm figures: "), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(path), std::string::npos) << r.output;
  }
}

// PyTorch's attention figures (tools/bench_torch_attention.py) likewise: read before anything is
// measured, a bad file refused in one line naming it (a file of other heads too).
TEST_F(CliTest, BenchGpuRefusesTorchAttentionFiguresItCannotReadBeforeMeasuring) {
  const std::string bad = (dir_->path() / "torch-bad.json").string();
  const std::string missing_field = (dir_->path() / "torch-no-prefill.json").string();
  const std::string other_heads = (dir_->path() / "torch-other-heads.json").string();
  std::ofstream(bad) << "[1, 2";
  std::ofstream(missing_field) << R"({"heads": 64, "kv_heads": 8, "head_dim": 128, "decode": []})";
  std::ofstream(other_heads)
      << R"({"heads": 32, "kv_heads": 8, "head_dim": 128, "decode": [], "prefill": []})";
  for (const std::string& path : {bad, missing_field, other_heads, (dir_->path() / "absent.json").string()}) {
    SCOPED_TRACE(path);
    const auto r = run("bench-gpu --torch-attention " + path);
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_EQ(line_count(r.output), 1u) << r.output;
    EXPECT_NE(r.output.find("torch attention figures: "), std::string::npos) << r.output;
    EXPECT_NE(r.output.find(path), std::string::npos) << r.output;
  }
}

TEST_F(CliTest, TokenizeMatchesTheLibrary) {
  const auto r = run("tokenize --model " + model_ + " --text 'hello world'");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto file = model::GgufFile::open(model_);
  auto tokenizer = model::Tokenizer::from_gguf(*file);
  std::string want;
  for (int32_t id : tokenizer->encode("hello world", true)) {
    if (!want.empty()) want += ' ';
    want += std::to_string(id);
  }
  EXPECT_EQ(r.output, want + "\n");
  const auto no_bos = run("tokenize --model " + model_ + " --text 'hello world' --no-bos");
  EXPECT_EQ(no_bos.output.substr(0, 2), want.substr(2, 2)) << "--no-bos drops the leading BOS id";
}

TEST_F(CliTest, GenerateJsonHasTheDocumentedFields) {
  const auto j =
      run_json("generate --model " + model_ + " --prompt 'Once upon' --max-tokens 7 --temperature 0 --json");
  ASSERT_TRUE(j.contains("prompt_tokens") && j.contains("tokens") && j.contains("text") &&
              j.contains("timings"));
  EXPECT_EQ(j["prompt_tokens"][0], 1) << "BOS first";
  EXPECT_LE(j["tokens"].size(), 7u);
  if (j["tokens"].size() < 7u) {
    EXPECT_EQ(j["finish_reason"], "eos");
  }
  EXPECT_GT(j["timings"]["prompt_ms"].get<double>(), 0.0);
}

TEST_F(CliTest, SameSeedSameOutput) {
  const std::string args =
      "generate --model " + model_ + " --prompt 'The' --max-tokens 10 --temperature 1.2 --json ";
  const auto a = run_json(args + "--seed 5"), b = run_json(args + "--seed 5"),
             c = run_json(args + "--seed 6");
  EXPECT_EQ(a["tokens"], b["tokens"]);
  EXPECT_EQ(a["seed"], 5);
  EXPECT_NE(a["tokens"], c["tokens"]);
}

TEST_F(CliTest, LogitsWritesOneRowPerPromptToken) {
  const auto out = dir_->path() / "logits.bin";
  const auto r = run("logits --model " + model_ + " --prompt 'a b c' --out " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto ids = run("tokenize --model " + model_ + " --text 'a b c'").output;
  const size_t n_tokens = std::count(ids.begin(), ids.end(), ' ') + 1;
  auto file = model::GgufFile::open(model_);
  const int64_t n_vocab = file->find_tensor("token_embd.weight")->dims[1];
  EXPECT_EQ(std::filesystem::file_size(out), n_tokens * n_vocab * sizeof(float));
}

// make-lora writes an adapter, export-lora merges two into the weights (llama-export-lora), and the
// merged model's logits are the adapted model's (`logits --lora` only takes one: the second adapter at
// scale 0 changes nothing); a scale that is not a number is refused by name.
TEST_F(CliTest, ExportLoraMergesWhatLogitsLoraApplies) {
  const std::string f32 = (dir_->path() / "tiny-f32.gguf").string();
  // F32 weights: the merge changes only rounding.
  ASSERT_EQ(run("make-model --shape tiny --type f32 --seed 3 --out " + f32).exit_code, 0);
  const std::string a = (dir_->path() / "a.gguf").string(), b = (dir_->path() / "b.gguf").string();
  ASSERT_EQ(run("make-lora -m " + f32 + " --rank 4 --targets q,v,down,output --seed 2 -o " + a).exit_code, 0);
  ASSERT_EQ(run("make-lora -m " + f32 + " --rank 2 --type f32 --targets up --seed 3 -o " + b).exit_code, 0);
  const std::string merged = (dir_->path() / "merged.gguf").string();
  const auto m =
      run("export-lora -m " + f32 + " --lora-scaled " + a + " 0.5 --lora-scaled " + b + " 0 -o " + merged);
  ASSERT_EQ(m.exit_code, 0) << m.output;
  const auto read = [](const std::filesystem::path& path) {
    const std::vector<uint8_t> bytes = test::read_file_bytes(path);
    std::vector<float> v(bytes.size() / sizeof(float));
    std::memcpy(v.data(), bytes.data(), bytes.size());
    return v;
  };
  const auto logits = [&](const std::string& model, const std::string& extra, const std::string& name) {
    const auto out = dir_->path() / name;
    const auto r =
        run("logits --model " + model + " --prompt 'a b c d e f' --threads 1 --out " + out.string() + extra);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return read(out);
  };
  const int64_t n_vocab = model::GgufFile::open(f32)->find_tensor("token_embd.weight")->dims[1];
  const std::vector<float> adapted = logits(f32, " --lora " + a + " --lora-scale 0.5", "adapted.bin");
  const std::vector<float> from_merged = logits(merged, "", "merged.bin");
  const std::vector<float> base = logits(f32, "", "base.bin");
  ASSERT_EQ(adapted.size(), from_merged.size());
  // Measured 3e-7 (rounding); the second adapter at any scale but 0
  // would move the logits by ~0.1, the first at scale 1 instead of 0.5 by ~0.5.
  EXPECT_LT(test::max_relative_rms(adapted, from_merged, n_vocab), 1e-3);
  EXPECT_GT(test::max_relative_rms(adapted, base, n_vocab), 0.2);
  // Quality with an adapter: `eval ppl --lora` scores the adapted model, and `eval compare` of the
  // adapted model against its merge finds them the same predictions.
  const std::string text = (dir_->path() / "eval.txt").string();
  std::ofstream(text) << "The quick brown fox jumps over the lazy dog. Once upon a time there was a test.";
  const nlohmann::json plain = run_json("eval ppl -m " + f32 + " --text " + text + " --ctx 16 --json");
  const nlohmann::json with = run_json("eval ppl -m " + f32 + " --lora " + a + " --lora-scale 0.5 --text " +
                                       text + " --ctx 16 --json");
  EXPECT_NE(plain["perplexity"], with["perplexity"]);
  const nlohmann::json same = run_json("eval compare --base " + merged + " -m " + f32 + " --lora " + a +
                                       " --lora-scale 0.5 --text " + text + " --ctx 16 --json");
  EXPECT_NEAR(same["model"]["perplexity"].get<double>(), with["perplexity"].get<double>(), 1e-9);
  EXPECT_LT(same["mean_kl"].get<double>(), 1e-6);
  EXPECT_EQ(same["top1_agreement"], 1.0);
  const auto bad = run("export-lora -m " + f32 + " --lora-scaled " + a + " half -o " + merged);
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("'half' is not a number"), std::string::npos) << bad.output;
}

TEST_F(CliTest, BenchReportsPositiveRates) {
  const auto j =
      run_json("bench --model " + model_ + " --threads 1 --prompt-tokens 8 --gen-tokens 4 -r 1 --json");
  EXPECT_GT(j["prompt_tokens_per_second"].get<double>(), 0.0);
  EXPECT_GT(j["gen_tokens_per_second"].get<double>(), 0.0);
  EXPECT_GT(j["peak_rss_mib"].get<double>(), 0.0);
}

// A peer driver that dies (here by SIGILL, as llama.cpp built for instructions the CPU refuses does)
// is reported by signal, with what to do, and the bench's own figures still come out.
TEST_F(CliTest, BenchNamesAPeerKilledByASignal) {
  const auto script = dir_->path() / "dies_by_sigill.py";
  std::ofstream(script) << "import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n";
  const auto j = run_json("bench --model " + model_ +
                          " --threads 1 --prompt-tokens 8 --gen-tokens 4 -r 1 --json --peer --peer-script " +
                          script.string());
  EXPECT_GT(j["gen_tokens_per_second"].get<double>(), 0.0);
  const std::string error = j["peer"]["result"]["error"].get<std::string>();
  EXPECT_NE(error.find("killed by signal 4"), std::string::npos) << error;
  EXPECT_NE(error.find("GGML_NATIVE=OFF"), std::string::npos) << error;
  EXPECT_FALSE(j["peer"].contains("gen_ratio"));
}

// The target as its own draft at temperature 0 accepts every proposal; a peer that is not there is
// reported by path in its row and the bench's own figures still come out.
TEST_F(CliTest, BenchSpecReportsItsFiguresAndAMissingPeerByName) {
  const auto j = run_json("bench-spec --model " + model_ + " --draft " + model_ +
                          " --batch 1,2 --gen-tokens 8 --repetitions 1 --threads 1 --fixed-k --peer "
                          "--peer-bin /nonexistent-llama --json");
  ASSERT_EQ(j["rows"].size(), 2u);
  const auto& batch1 = j["rows"][0];
  EXPECT_GT(batch1["proposed"].get<int64_t>(), 0);
  EXPECT_EQ(batch1["accepted"], batch1["proposed"]);
  EXPECT_GT(batch1["speculative_tokens_per_second"].get<double>(), 0.0);
  EXPECT_NE(batch1["peer"]["error"].get<std::string>().find("/nonexistent-llama/llama-speculative"),
            std::string::npos)
      << batch1.dump();
  EXPECT_FALSE(j["rows"][1].contains("peer")) << "llama.cpp's programs decode one sequence: batch 1 only";
}

// llama.cpp's own speculative decoding, run beside Nibble's on the trained fixture pair. Needs the
// fixtures and llama.cpp's programs (tools/build-llama-cpp.sh; NIBBLE_LLAMA_CPP_BIN or its default
// folder). The target as its own draft: both engines accept (nearly) everything, and the printed
// ratio is Nibble's speculative rate over llama.cpp's.
TEST_F(CliTest, BenchSpecRunsLlamaCppSpeculativeDecodingAsItsPeer) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const char* env = std::getenv("NIBBLE_LLAMA_CPP_BIN");
  const char* home = std::getenv("HOME");
  const std::filesystem::path bin =
      env != nullptr ? std::filesystem::path(env)
                     : std::filesystem::path(home != nullptr ? home : ".") / ".cache/nibble/llama.cpp/bin";
  if (!std::filesystem::exists(bin / "llama-speculative") || !std::filesystem::exists(bin / "llama-bench"))
    GTEST_SKIP() << "llama.cpp's llama-speculative and llama-bench not in " << bin
                 << ": build them with tools/build-llama-cpp.sh";
  const std::string target = (fixtures / "models" / "fortune-target-f16.gguf").string();
  const auto j =
      run_json("bench-spec --model " + target + " --draft " + target +
               " --batch 1 --gen-tokens 32 --repetitions 1 --threads 2 --fixed-k --peer --peer-bin " +
               bin.string() + " --json");
  const auto& row = j["rows"][0];
  ASSERT_FALSE(row["peer"].contains("error")) << row.dump();
  const auto& peer = row["peer"];
  EXPECT_EQ(row["accepted"], row["proposed"]);
  EXPECT_GT(peer["proposed"].get<int64_t>(), 0);
  EXPECT_GT(peer["acceptance_rate"].get<double>(), 0.9) << peer.dump();
  EXPECT_LE(peer["accepted"].get<int64_t>(), peer["proposed"].get<int64_t>());
  EXPECT_GT(peer["plain_tokens_per_second"].get<double>(), 0.0);
  EXPECT_NEAR(
      peer["speedup"].get<double>(),
      peer["speculative_tokens_per_second"].get<double>() / peer["plain_tokens_per_second"].get<double>(),
      1e-9);
  EXPECT_NEAR(peer["nibble_speculative_ratio"].get<double>(),
              row["speculative_tokens_per_second"].get<double>() /
                  peer["speculative_tokens_per_second"].get<double>(),
              1e-9);
}

TEST_F(CliTest, QuantizedCopyLoadsAndGenerates) {
  const auto f32 = (dir_->path() / "f32.gguf").string(), q8 = (dir_->path() / "q8.gguf").string();
  ASSERT_EQ(run("make-model --shape tiny --type f32 --seed 3 --out " + f32).exit_code, 0);
  const auto r = run("quantize --model " + f32 + " --out " + q8 + " --type q8_0");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_LT(std::filesystem::file_size(q8), std::filesystem::file_size(f32) / 3);
  const auto g = run_json("generate --model " + q8 + " --prompt 'x' --max-tokens 3 --temperature 0 --json");
  EXPECT_EQ(g["prompt_tokens"][0], 1);
}

// gguf-split as llama.cpp's llama-gguf-split: a model split by tensor count or size runs from its first
// file with the same logits bit for bit, and merging the files gives the model back.
TEST_F(CliTest, GgufSplitAndMergeKeepTheModel) {
  const auto logits_of = [&](const std::string& model) {
    const auto out = dir_->path() / "split.logits";
    const auto r = run("logits -m " + model + " --tokens '1 7 42 3 5' -o " + out.string());
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return test::read_file_bytes(out);
  };
  const std::vector<uint8_t> want = logits_of(model_);
  const auto whole = model::GgufFile::open(model_);
  const std::string by_count = (dir_->path() / "by-count").string();
  auto r = run("gguf-split --split-max-tensors 10 " + model_ + " " + by_count);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const size_t files = (whole->tensors().size() + 9) / 10;
  ASSERT_GE(files, 2u);
  const std::string first = model::gguf_split_path(by_count, 0, static_cast<int>(files));
  EXPECT_EQ(model::GgufFile::open(first)->split_count(), static_cast<int>(files)) << r.output;
  EXPECT_EQ(logits_of(first), want);
  // The metadata alone in the first file (gguf-split --no-tensor-in-metadata): one file more.
  const std::string meta_alone = (dir_->path() / "meta-alone").string();
  r = run("gguf-split --split-max-tensors 10 --no-tensor-in-metadata " + model_ + " " + meta_alone);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string meta_first = model::gguf_split_path(meta_alone, 0, static_cast<int>(files) + 1);
  EXPECT_TRUE(model::GgufFile::open(meta_first)->tensors().front().split == 1) << r.output;
  EXPECT_EQ(logits_of(meta_first), want);

  const std::string by_size = (dir_->path() / "by-size").string();
  r = run("gguf-split --split-max-size 0.2M " + model_ + " " + by_size);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::string size_first;  // 847 KB, in 0.2 MB files but where one tensor alone is larger
  for (int n = 2; n <= 64 && size_first.empty(); ++n) {
    if (fs::exists(model::gguf_split_path(by_size, 0, n))) size_first = model::gguf_split_path(by_size, 0, n);
  }
  ASSERT_FALSE(size_first.empty()) << r.output;
  EXPECT_EQ(logits_of(size_first), want);

  const std::string merged = (dir_->path() / "gguf-split-merged.gguf").string();
  r = run("gguf-split --merge " + first + " " + merged);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto back = model::GgufFile::open(merged);
  EXPECT_EQ(back->split_count(), 1);
  EXPECT_FALSE(back->has("split.count"));
  EXPECT_EQ(back->metadata().size(), whole->metadata().size());
  ASSERT_EQ(back->tensors().size(), whole->tensors().size());
  for (size_t k = 0; k < whole->tensors().size(); ++k) {
    const auto& a = back->tensors()[k];
    const auto& b = whole->tensors()[k];
    EXPECT_EQ(a.name, b.name);
    ASSERT_EQ(a.size_bytes, b.size_bytes);
    EXPECT_EQ(std::memcmp(back->tensor_data(a), whole->tensor_data(b), a.size_bytes), 0) << a.name;
  }
  EXPECT_EQ(fs::file_size(merged), fs::file_size(model_));
  EXPECT_EQ(logits_of(merged), want);

  // Refusals, one line each: a file other than the first, an existing merge output, both limits.
  const std::string second = model::gguf_split_path(by_count, 1, static_cast<int>(files));
  for (const auto& [args, expect] : std::vector<std::pair<std::string, std::string>>{
           {"generate -m " + second + " -p hi -n 2", first},
           {"gguf-split --merge " + first + " " + merged, "exists"},
           {"gguf-split --split-max-tensors 3 --split-max-size 1G " + model_ + " x", "excludes"},
           {"gguf-split --split-max-size 12Q " + model_ + " x", "12Q"}}) {
    const auto bad = run(args);
    EXPECT_NE(bad.exit_code, 0) << args;
    EXPECT_EQ(line_count(bad.output), 1u) << args << "\n" << bad.output;
    EXPECT_NE(bad.output.find(expect), std::string::npos) << args << ": " << bad.output;
  }
}

TEST_F(CliTest, BadInputGivesOneLineErrors) {
  struct Case {
    std::string args, expect;
  };
  const auto truncated = dir_->path() / "truncated.gguf";
  auto bytes = test::read_file_bytes(model_);
  bytes.resize(bytes.size() / 2);
  test::write_file_bytes(truncated, bytes);
  const Case cases[] = {
      {"", "subcommand"},
      {"frobnicate", "frobnicate"},
      {"generate --prompt hi", "--model"},
      {"generate --model /nonexistent.gguf --prompt hi", "not found"},
      {"generate --model " + truncated.string() + " --prompt hi", "truncated.gguf"},
      {"generate --model " + model_ + " --prompt hi --max-tokens -3", "max-tokens"},
      {"generate --model " + model_ + " --prompt hi --top-p 2", "top-p"},
      {"generate --model " + model_ + " --prompt hi --bogus 1", "bogus"},
      {"generate --model " + model_ + " --prompt hi --max-tokens 100000", "context"},
      {"bench --model " + model_ + " --threads 0", "threads"},
      {"make-model --shape nonsense --out " + (dir_->path() / "x.gguf").string(), "nonsense"},
  };
  for (const Case& c : cases) {
    const auto r = run(c.args);
    EXPECT_NE(r.exit_code, 0) << c.args;
    EXPECT_EQ(line_count(r.output), 1u) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.expect), std::string::npos)
        << c.args << " should mention '" << c.expect << "': " << r.output;
    EXPECT_EQ(r.output.find("terminate"), std::string::npos) << c.args;
  }
}

}  // namespace
}  // namespace nibble
