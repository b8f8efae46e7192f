#include "tests/support/test_support.hpp"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <unordered_map>

#include "kernels/quantize.hpp"

namespace nibble::test {

namespace {

using nlohmann::json;

constexpr const char* kSpace = "\xE2\x96\x81";  // U+2581, SentencePiece's space

std::vector<std::string> gguf_strings(const model::GgufFile& file, const std::string& key) {
  std::vector<std::string> out;
  for (const model::GgufValue& v : file.find(key)->array) out.push_back(v.s);
  return out;
}

json tokenizer_json_object(const model::GgufFile& file) {
  const std::string kind = file.find("tokenizer.ggml.model")->s;
  const std::vector<std::string> tokens = gguf_strings(file, "tokenizer.ggml.tokens");
  std::vector<int64_t> types(tokens.size(), 1);
  if (const model::GgufValue* t = file.find("tokenizer.ggml.token_type")) {
    for (size_t i = 0; i < tokens.size(); ++i) types[i] = t->array[i].i != 0 ? t->array[i].i : t->array[i].u;
  }
  json vocab = json::object();
  json added = json::array();
  std::unordered_map<std::string, int32_t> id_of;
  for (size_t i = 0; i < tokens.size(); ++i) {
    vocab[tokens[i]] = i;
    id_of[tokens[i]] = static_cast<int32_t>(i);
    if (types[i] == 3) added.push_back({{"id", i}, {"content", tokens[i]}, {"special", true}});
  }
  json model = {{"type", "BPE"}, {"vocab", vocab}};
  json root = {{"version", "1.0"}, {"added_tokens", added}, {"model", nullptr}};
  if (kind == "llama") {
    const model::GgufValue* scores = file.find("tokenizer.ggml.scores");
    std::vector<std::tuple<float, int32_t, int32_t, int32_t>> merges;  // -score, piece, left, right
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (types[i] != 1) continue;
      const std::string& piece = tokens[i];
      for (size_t cut = 1; cut < piece.size(); ++cut) {
        const auto l = id_of.find(piece.substr(0, cut));
        const auto r = id_of.find(piece.substr(cut));
        if (l == id_of.end() || r == id_of.end() || types[l->second] != 1 || types[r->second] != 1) continue;
        merges.emplace_back(-static_cast<float>(scores->array[i].f), static_cast<int32_t>(i), l->second,
                            r->second);
      }
    }
    std::sort(merges.begin(), merges.end());
    json merge_list = json::array();
    for (const auto& [score, piece, l, r] : merges) merge_list.push_back(tokens[l] + " " + tokens[r]);
    model["merges"] = merge_list;
    model["byte_fallback"] = true;
    model["unk_token"] = "<unk>";
    root["normalizer"] = {{"type", "Sequence"},
                          {"normalizers",
                           {{{"type", "Prepend"}, {"prepend", kSpace}},
                            {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpace}}}}};
    root["pre_tokenizer"] = nullptr;
  } else {
    model["merges"] = gguf_strings(file, "tokenizer.ggml.merges");
    model["byte_fallback"] = false;
    root["normalizer"] = nullptr;
    root["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  }
  root["model"] = model;
  return root;
}

json tiny_llama_tokenizer_object(int n) {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", kSpace};
  for (char c = 0x21; c < 0x7F && static_cast<int>(tokens.size()) < n; ++c) tokens.emplace_back(1, c);
  json merges = json::array();
  const std::vector<std::string> letters = {kSpace, "e", "t", "a", "o", "i", "n", "s", "h", "r", "l", "d"};
  for (const std::string& a : letters) {
    for (const std::string& b : letters) {
      if (static_cast<int>(tokens.size()) >= n || b == kSpace) continue;
      merges.push_back(a + " " + b);
      tokens.push_back(a + b);
    }
  }
  json vocab = json::object();
  for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
  json added = json::array();
  for (int i = 0; i < 3; ++i) added.push_back({{"id", i}, {"content", tokens[i]}, {"special", true}});
  return {{"added_tokens", added},
          {"normalizer",
           {{"type", "Sequence"},
            {"normalizers",
             {{{"type", "Prepend"}, {"prepend", kSpace}},
              {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpace}}}}}},
          {"pre_tokenizer", nullptr},
          {"model",
           {{"type", "BPE"},
            {"vocab", vocab},
            {"merges", merges},
            {"byte_fallback", true},
            {"unk_token", "<unk>"}}}};
}

}  // namespace

std::string tokenizer_json_of(const model::GgufFile& file) { return tokenizer_json_object(file).dump(); }

std::string tiny_llama_tokenizer_json(int n) { return tiny_llama_tokenizer_object(n).dump(); }

namespace {
std::string read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "cannot open " << path;
  return std::string(std::istreambuf_iterator<char>(in), {});
}
}  // namespace

// Reads `<vocab>.inp` / `<vocab>.out` exactly as llama.cpp's test-tokenizer-0 does: inputs are the
// stretches between "\n__ggml_vocab_test__\n" separators (the file ends with one, which leaves no
// final empty input); outputs are one stripped line of space-separated ids per input.
std::vector<VectorCase> read_tokenizer_vectors(const std::filesystem::path& vocab_path) {
  const std::string raw = read_whole_file(vocab_path.string() + ".inp");
  const std::string separator = "\n__ggml_vocab_test__\n";
  std::vector<std::string> inputs;
  for (size_t pos = 0; pos < raw.size();) {
    const size_t next = raw.find(separator, pos);
    if (next == std::string::npos) {
      inputs.push_back(raw.substr(pos));
      break;
    }
    inputs.push_back(raw.substr(pos, next - pos));
    pos = next + separator.size();
  }

  std::ifstream out(vocab_path.string() + ".out");
  std::vector<std::vector<int32_t>> outputs;
  for (std::string line; std::getline(out, line);) {
    std::istringstream ids(line);
    std::vector<int32_t> expected;
    for (int32_t id = 0; ids >> id;) expected.push_back(id);
    outputs.push_back(expected);
  }
  EXPECT_EQ(inputs.size(), outputs.size()) << "input and output files disagree on the number of tests";

  std::vector<VectorCase> cases;
  for (size_t i = 0; i < std::min(inputs.size(), outputs.size()); ++i)
    cases.push_back({inputs[i], outputs[i]});
  return cases;
}

std::optional<std::filesystem::path> fixtures_dir() {
  const char* env = std::getenv("NIBBLE_FIXTURES");
  std::filesystem::path path(env != nullptr && *env != '\0' ? env : NIBBLE_DEFAULT_FIXTURES);
  if (!std::filesystem::is_directory(path / "models")) return std::nullopt;
  return path;
}

std::filesystem::path test_data_dir() {
  // Overridable for test binaries run from another checkout (tools/gpu-bundle.sh's run.sh).
  const char* env = std::getenv("NIBBLE_TEST_DATA_DIR");
  return env != nullptr && *env != '\0' ? std::filesystem::path(env)
                                        : std::filesystem::path(NIBBLE_TEST_DATA_DIR);
}

std::string nibble_bin() {
  const char* env = std::getenv("NIBBLE_BIN");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(NIBBLE_DEFAULT_BIN);
}

std::filesystem::path source_dir() { return std::filesystem::path(NIBBLE_SOURCE_DIR); }

std::string python() {
  const char* env = std::getenv("NIBBLE_PYTHON");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string("python3");
}

CommandResult run_command(const std::string& command) {
  CommandResult result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) throw std::runtime_error("popen failed for: " + command);
  std::array<char, 4096> buffer{};
  size_t n = 0;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) result.output.append(buffer.data(), n);
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

model::LlamaShape layered_shape(int64_t n_layer) {
  model::LlamaShape shape = model::llama_shape_by_name("small");
  shape.n_embd = 512;
  shape.n_head = 8;
  shape.n_head_kv = 4;
  shape.n_ff = 1024;
  shape.n_vocab = 512;
  shape.n_layer = n_layer;
  return shape;
}

long reported_peak_bytes(const std::string& output) {
  const std::string marker = "peak resident memory ";
  const size_t at = output.rfind(marker);
  if (at == std::string::npos) return -1;
  return static_cast<long>(std::strtod(output.c_str() + at + marker.size(), nullptr) * 1048576.0);
}

TempDir::TempDir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "nibble-test-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::vector<uint8_t> random_quant_blocks(kernels::DType type, int64_t n_out, int64_t k, uint64_t seed) {
  using namespace nibble::kernels;
  std::vector<uint8_t> w(static_cast<size_t>(n_out * row_bytes(type, k)));
  std::mt19937_64 rng(seed);
  for (uint8_t& byte : w) byte = static_cast<uint8_t>(rng());
  std::uniform_real_distribution<float> scale(0.001f, 0.01f);
  for (int64_t b = 0; b < n_out * k / type_info(type).block_elems; ++b) {
    if (type == DType::Q8_0) {
      reinterpret_cast<BlockQ8_0*>(w.data())[b].d = fp32_to_fp16(scale(rng));
    } else if (type == DType::Q4_K) {
      auto* block = reinterpret_cast<BlockQ4_K*>(w.data()) + b;
      block->d = fp32_to_fp16(scale(rng));
      block->dmin = fp32_to_fp16(scale(rng));
    } else if (type == DType::Q2_K) {
      auto* block = reinterpret_cast<BlockQ2_K*>(w.data()) + b;
      block->d = fp32_to_fp16(scale(rng) * 2.0f);
      block->dmin = fp32_to_fp16(scale(rng));
    } else if (type == DType::Q3_K) {
      reinterpret_cast<BlockQ3_K*>(w.data())[b].d = fp32_to_fp16(scale(rng) * 0.5f);
    } else if (type == DType::Q5_K) {
      auto* block = reinterpret_cast<BlockQ5_K*>(w.data()) + b;
      block->d = fp32_to_fp16(scale(rng) * 0.5f);
      block->dmin = fp32_to_fp16(scale(rng));
    } else if (type == DType::IQ4_XS) {
      reinterpret_cast<BlockIQ4_XS*>(w.data())[b].d = fp32_to_fp16(scale(rng) * 0.01f);
    } else if (type == DType::IQ4_NL) {
      reinterpret_cast<BlockIQ4_NL*>(w.data())[b].d = fp32_to_fp16(scale(rng) * 0.1f);
    } else if (type == DType::Q6_K) {
      reinterpret_cast<BlockQ6_K*>(w.data())[b].d = fp32_to_fp16(scale(rng) * 0.1f);
    } else if (type == DType::Q5_0) {
      reinterpret_cast<BlockQ5_0*>(w.data())[b].d = fp32_to_fp16(scale(rng));
    } else if (type == DType::Q4_1 || type == DType::Q5_1) {
      // d and m lead both blocks; m below 0 as a quantizer's minimum usually is.
      const f16_bits d_m[2] = {fp32_to_fp16(scale(rng)), fp32_to_fp16(-8.0f * scale(rng))};
      std::memcpy(w.data() + b * type_info(type).block_bytes, d_m, sizeof d_m);
    } else if (type == DType::IQ1_M) {
      // The fp16 scale lives in the top nibbles of the four scale words (iq1_m_scale).
      auto* block = reinterpret_cast<BlockIQ1_M*>(w.data()) + b;
      const f16_bits d = fp32_to_fp16(scale(rng) * 0.1f);
      for (int word = 0; word < 4; ++word)
        block->scales[2 * word + 1] =
            static_cast<uint8_t>((block->scales[2 * word + 1] & 0x0F) | ((d >> (4 * word)) & 0xF) << 4);
    } else if (type == DType::MXFP4) {
      reinterpret_cast<BlockMXFP4*>(w.data())[b].e = static_cast<uint8_t>(118 + rng() % 6);  // 2^-10 .. 2^-5
    } else if (type == DType::TQ1_0 || type == DType::TQ2_0) {
      // d is the block's last two bytes.
      const f16_bits d = fp32_to_fp16(scale(rng));
      std::memcpy(w.data() + (b + 1) * type_info(type).block_bytes - sizeof d, &d, sizeof d);
    } else if (type == DType::IQ2_XXS || type == DType::IQ2_XS || type == DType::IQ2_S ||
               type == DType::IQ3_XXS || type == DType::IQ3_S || type == DType::IQ1_S) {
      // d leads the block; every byte pattern after it is a valid block.
      const f16_bits d = fp32_to_fp16(scale(rng) * 0.1f);
      std::memcpy(w.data() + b * type_info(type).block_bytes, &d, sizeof d);
    } else {
      ADD_FAILURE() << "random_quant_blocks: no rule for " << type_name(type);
    }
  }
  return w;
}

std::vector<float> random_floats(size_t n, uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

std::vector<uint8_t> read_file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path.string());
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

void FileReader::take(void* out, size_t n) {
  if (n > data_.size() - at_) throw std::runtime_error(path_.string() + ": truncated");
  std::memcpy(out, data_.data() + at_, n);
  at_ += n;
}

void write_file_bytes(const std::filesystem::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

std::vector<float> dequantize_tensor(const model::GgufFile& file, const model::GgufTensorInfo& tensor) {
  std::vector<float> out(static_cast<size_t>(tensor.n_elements));
  const int64_t n = tensor.row_elements();
  const int64_t row_bytes = kernels::row_bytes(tensor.type, n);
  for (int64_t r = 0; r < tensor.rows(); ++r) {
    EXPECT_EQ(
        kernels::dequantize_row(tensor.type, file.tensor_data(tensor) + r * row_bytes, out.data() + r * n, n),
        kernels::Status::ok)
        << tensor.name << " row " << r;
  }
  return out;
}

double max_relative_rms(const std::vector<float>& a, const std::vector<float>& b, int64_t row) {
  double worst = 0.0;
  for (size_t r = 0; (r + 1) * row <= b.size() && (r + 1) * row <= a.size(); ++r) {
    double err = 0.0, norm = 0.0;
    for (int64_t i = 0; i < row; ++i) {
      const double d = a[r * row + i] - b[r * row + i];
      err += d * d;
      norm += static_cast<double>(b[r * row + i]) * b[r * row + i];
    }
    worst = std::max(worst, std::sqrt(err / norm));
  }
  return worst;
}

}  // namespace nibble::test

namespace nibble::test {

namespace {
std::string calibration_text() {
  std::ifstream in(test_data_dir() / "calibration-text.txt", std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}
}  // namespace

std::string calibration_part() {
  const std::string t = calibration_text();
  return t.substr(0, t.size() * 7 / 10);
}

std::string held_out_part() {
  const std::string t = calibration_text();
  return t.substr(t.size() * 7 / 10);
}

}  // namespace nibble::test
