#include "tests/support/test_support.hpp"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "kernels/quantize.hpp"

namespace nibble::test {

std::optional<std::filesystem::path> fixtures_dir() {
  const char* env = std::getenv("NIBBLE_FIXTURES");
  std::filesystem::path path(env != nullptr && *env != '\0' ? env : NIBBLE_DEFAULT_FIXTURES);
  if (!std::filesystem::is_directory(path / "models")) return std::nullopt;
  return path;
}

std::filesystem::path test_data_dir() { return NIBBLE_TEST_DATA_DIR; }

std::string nibble_bin() {
  const char* env = std::getenv("NIBBLE_BIN");
  return env != nullptr && *env != '\0' ? std::string(env) : std::string(NIBBLE_DEFAULT_BIN);
}

std::filesystem::path source_dir() { return std::filesystem::path(NIBBLE_SOURCE_DIR); }

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

TempDir::TempDir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "nibble-test-XXXXXX").string();
  if (mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = pattern;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
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
