#pragma once
// Shared helpers for tests: where the fixtures and the `nibble` binary are, running a command,
// random data.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "model/gguf.hpp"
#include "model/random_model.hpp"

namespace nibble::test {

// The fixtures directory (NIBBLE_FIXTURES, else CMake's NIBBLE_FIXTURES_DIR), or nullopt when it
// does not exist.
std::optional<std::filesystem::path> fixtures_dir();
// The test data committed in the repository (tests/data; NIBBLE_TEST_DATA_DIR in the environment
// overrides the path).
std::filesystem::path test_data_dir();
// The fixed English text the calibration tests use (tests/data/calibration-text.txt, a snapshot so
// that editing the docs cannot move their figures): its first 70 % for calibration, the rest for
// held-out evaluation windows.
std::string calibration_part();
std::string held_out_part();
// Path of the `nibble` binary (NIBBLE_BIN, else the one this build made).
std::string nibble_bin();
// The Python interpreter the tests run Python peers with (the openai package, lm-evaluation-harness):
// NIBBLE_PYTHON (deploy/test.sh sets it to a venv holding them), else python3.
std::string python();
// The repository's root (where deploy/, config/ and tests/ are), from CMake: __FILE__ is no
// guide, since compiler caches may rewrite it to a relative path.
std::filesystem::path source_dir();

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};
// Runs `command` through /bin/sh, capturing its output.
CommandResult run_command(const std::string& command);
// The peak resident memory a nibble model tool reports on its last line ("...; peak resident memory
// 12.3 MiB"), in bytes; -1 when the output has no such line. (getrusage's peak for a child would count
// what this test process held when it forked.)
long reported_peak_bytes(const std::string& output);
// Layers of one small shape (embd 512, 8 / 4 heads, ffn 1024, vocab 512), n_layer of them: a model
// whose size grows with its layers alone, for the memory tests of the model tools.
model::LlamaShape layered_shape(int64_t n_layer);

// A fresh temporary directory, removed by the destructor.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

std::vector<float> random_floats(size_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f);
// n_out rows of k elements of a block type (Q8_0, Q4_1, Q5_0, Q5_1, the K-quants, IQ4_NL, IQ4_XS) as random
// bytes (every quant, -128 included; every 6-bit scale and min up to 63, every signed Q6_K scale) with small
// positive block scales: any valid block, and the integer sums' extremes, which a quantizer rarely produces.
std::vector<uint8_t> random_quant_blocks(kernels::DType type, int64_t n_out, int64_t k, uint64_t seed);
std::vector<uint8_t> read_file_bytes(const std::filesystem::path& path);
// A binary reference file read front to back: take(out, n) copies the next n bytes (std::runtime_error naming
// the file when it is shorter), at_end() says whether all were taken.
class FileReader {
 public:
  explicit FileReader(std::filesystem::path path) : path_(std::move(path)), data_(read_file_bytes(path_)) {}
  void take(void* out, size_t n);
  bool at_end() const { return at_ == data_.size(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::vector<uint8_t> data_;
  size_t at_ = 0;
};
// A whole tensor of any type as floats (a failed row dequantization fails the current test).
std::vector<float> dequantize_tensor(const model::GgufFile& file, const model::GgufTensorInfo& tensor);
void write_file_bytes(const std::filesystem::path& path, const std::vector<uint8_t>& bytes);
// tokenizer.json (as transformers' converters would write it) of a GGUF vocabulary: token types 3
// (control) become special added tokens; for "llama" the merges are derived from the scores as
// transformers' SentencePieceExtractor does.
std::string tokenizer_json_of(const model::GgufFile& file);
// A small Llama-2 style tokenizer.json of `n` tokens: <unk> <s> </s>, "▁", printable ASCII (as much
// as fits), then merges of frequent letter pairs.
std::string tiny_llama_tokenizer_json(int n);
// One of llama.cpp's tokenizer test vectors: a text and the ids it must encode to (no BOS).
struct VectorCase {
  std::string text;
  std::vector<int32_t> expected;
};
std::vector<VectorCase> read_tokenizer_vectors(const std::filesystem::path& vocab_path);
// The largest relative RMS error of `a` against `b` over rows of `row` values ([rows, row] each).
double max_relative_rms(const std::vector<float>& a, const std::vector<float>& b, int64_t row);

}  // namespace nibble::test

// Skips the current test when fixtures are absent; binds `dir` to the fixtures path otherwise.
#define NIBBLE_REQUIRE_FIXTURES(dir)                                                                        \
  auto dir##_opt = ::nibble::test::fixtures_dir();                                                          \
  if (!dir##_opt) GTEST_SKIP() << "fixtures not found: set NIBBLE_FIXTURES_DIR (CMake) or NIBBLE_FIXTURES"; \
  const std::filesystem::path dir = *dir##_opt
