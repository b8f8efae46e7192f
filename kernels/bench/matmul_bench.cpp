// CPU matmul micro-benchmarks (Google Benchmark) on the matrix shapes of a 1.1B Llama: every weight
// type the matmul reads, as stored in the file and, where the type has one, in the packed layout the
// model uses (kernels/packed_weights.hpp); matrix-vector (decode, m = 1) and m = 64 (a prompt).
// Reports the weights streamed per second and the multiply-add rate (2 ops each), and at the end the
// packed layout's speed-up over the stored one, both measured in this run. Before timing, each
// packed case checks its outputs against the stored layout's and fails the case if they differ.
//
// Usage: nibble_matmul_bench [--pool-threads=N] [--isa=scalar|avx2|avx512] [Google Benchmark flags,
//        e.g. --benchmark_filter=q4_K]
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "kernels/matmul.hpp"
#include "kernels/packed_weights.hpp"
#include "kernels/quantize.hpp"

namespace {

using namespace nibble::kernels;

int g_pool_threads = 2;

ThreadPool& pool() {
  static ThreadPool instance(g_pool_threads);
  return instance;
}

struct Shape {
  const char* name;
  int64_t n_out, k;
};
constexpr Shape kShapes[] = {
    {"attn_2048x2048", 2048, 2048}, {"ffn_up_8192x2048", 8192, 2048}, {"ffn_down_2048x8192", 2048, 8192}};
constexpr DType kTypes[] = {DType::F16,     DType::Q4_0,   DType::Q4_1,   DType::Q5_0,    DType::Q5_1,
                            DType::Q8_0,    DType::Q2_K,   DType::Q3_K,   DType::Q4_K,    DType::Q5_K,
                            DType::Q6_K,    DType::IQ4_NL, DType::IQ4_XS, DType::IQ3_XXS, DType::IQ3_S,
                            DType::IQ2_XXS, DType::IQ2_XS, DType::IQ2_S,  DType::IQ1_S};

// The types Nibble reads but does not write whose blocks lead with their fp16 d: random bytes make a valid
// block of each once d is set.
bool is_written_as_random_blocks(DType type) {
  switch (type) {
    case DType::IQ4_NL:
    case DType::IQ4_XS:
    case DType::IQ3_XXS:
    case DType::IQ3_S:
    case DType::IQ2_XXS:
    case DType::IQ2_XS:
    case DType::IQ2_S:
    case DType::IQ1_S:
      return true;
    default:
      return false;
  }
}

// Random weights of `type` from uniform [-1, 1) floats, quantized as the file's rows (the IQ types, which
// Nibble does not write or writes only from a file: random index, sign and scale bytes with a small d).
const std::vector<uint8_t>& weights(DType type, const Shape& shape) {
  static std::map<std::pair<int, std::string>, std::vector<uint8_t>> cache;
  std::vector<uint8_t>& w = cache[{static_cast<int>(type), shape.name}];
  if (!w.empty()) return w;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> row_values(static_cast<size_t>(shape.k));
  const int64_t row = row_bytes(type, shape.k);
  w.resize(static_cast<size_t>(shape.n_out * row));
  if (is_written_as_random_blocks(type)) {
    for (uint8_t& byte : w) byte = static_cast<uint8_t>(rng());
    const int64_t block_elems = type_info(type).block_elems, block_bytes = type_info(type).block_bytes;
    for (int64_t b = 0; b < shape.n_out * shape.k / block_elems; ++b) {
      const f16_bits d = fp32_to_fp16(type == DType::IQ4_NL ? 1e-2f : 1e-4f);  // d leads each block
      std::memcpy(w.data() + b * block_bytes, &d, sizeof d);
    }
    return w;
  }
  for (int64_t o = 0; o < shape.n_out; ++o) {
    for (float& v : row_values) v = dist(rng);
    if (quantize_row(type, row_values.data(), w.data() + o * row, shape.k) != Status::ok) std::abort();
  }
  return w;
}

void bench_matmul(benchmark::State& state, DType type, Shape shape, bool packed_layout) {
  const int64_t m = state.range(0);
  const std::vector<uint8_t>& w = weights(type, shape);
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(m * shape.k));
  for (float& v : x) v = dist(rng);
  std::vector<float> y(static_cast<size_t>(m * shape.n_out));
  std::vector<float> y_stored(y.size());
  if (matmul(type, w.data(), shape.n_out, shape.k, x.data(), m, y_stored.data(), pool()) != Status::ok) {
    state.SkipWithError("matmul refused the operands");
    return;
  }
  PackedMatrix packed;
  if (packed_layout) {
    packed = pack_for_matmul(type, w.data(), shape.n_out, shape.k);
    if (matmul_packed(packed, x.data(), m, y.data(), pool()) != Status::ok) {
      state.SkipWithError("matmul_packed refused the operands");
      return;
    }
    // The stored layouts' SIMD kernels sum in another order (and fuse multiply-adds), so only to
    // float rounding; tests/test_kernels_packed.cpp holds the packed kernels to the scalar matmul.
    const double tolerance = 1e-4;
    for (size_t i = 0; i < y.size(); ++i) {
      if (std::fabs(y[i] - y_stored[i]) > tolerance * (1.0 + std::fabs(y_stored[i]))) {
        state.SkipWithError("the packed layout's outputs differ from the stored layout's");
        return;
      }
    }
  }
  for (auto _ : state) {
    if (packed_layout) {
      matmul_packed(packed, x.data(), m, y.data(), pool());
    } else {
      matmul(type, w.data(), shape.n_out, shape.k, x.data(), m, y.data(), pool());
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(w.size()));
  state.counters["ops"] = benchmark::Counter(2.0 * static_cast<double>(m * shape.n_out * shape.k),
                                             benchmark::Counter::kIsIterationInvariantRate);
}

// The console table, then each packed case's time against its stored twin's.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  // Colours only on a terminal (the --benchmark_color flag sets only the default reporter's).
  RatioReporter() : ConsoleReporter(isatty(fileno(stdout)) ? OO_Defaults : OO_Tabular) {}

  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (!run.error_occurred) seconds_[run.benchmark_name()] = run.GetAdjustedRealTime();
    }
  }
  void Finalize() override {
    ConsoleReporter::Finalize();
    bool header = false;
    for (const auto& [name, packed_time] : seconds_) {
      const size_t at = name.find("/packed/");
      if (at == std::string::npos) continue;
      const std::string stored = name.substr(0, at) + "/stored/" + name.substr(at + 8);
      const auto it = seconds_.find(stored);
      if (it == seconds_.end()) continue;
      if (!header) {
        std::printf("\npacked layout against stored (same run): speed-up\n");
        header = true;
      }
      std::printf("  %-48s %6.2fx\n", name.c_str(), it->second / packed_time);
    }
  }

 private:
  std::map<std::string, double> seconds_;
};

}  // namespace

int main(int argc, char** argv) {
  // Our own flags first; the rest go to Google Benchmark.
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--pool-threads=", 15) == 0) {
      g_pool_threads = std::atoi(argv[i] + 15);
      if (g_pool_threads < 1) {
        std::fprintf(stderr, "--pool-threads must be at least 1\n");
        return 2;
      }
    } else if (std::strncmp(argv[i], "--isa=", 6) == 0) {
      if (!matmul_force_isa(argv[i] + 6)) {
        std::fprintf(stderr, "this CPU (or build) has no %s kernels\n", argv[i] + 6);
        return 2;
      }
    } else {
      rest.push_back(argv[i]);
    }
  }
  int rest_argc = static_cast<int>(rest.size());
  benchmark::Initialize(&rest_argc, rest.data());
  if (benchmark::ReportUnrecognizedArguments(rest_argc, rest.data())) return 2;
  benchmark::AddCustomContext("isa", matmul_isa());
  benchmark::AddCustomContext("pool_threads", std::to_string(g_pool_threads));
  for (const DType type : kTypes) {
    for (const Shape& shape : kShapes) {
      for (const bool packed : {false, true}) {
        if (packed && !can_pack_for_matmul(type)) continue;
        const std::string name =
            std::string(type_name(type)) + (packed ? "/packed/" : "/stored/") + shape.name;
        benchmark::RegisterBenchmark(name.c_str(), bench_matmul, type, shape, packed)
            ->ArgName("m")
            ->Arg(1)
            ->Arg(64)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime();
      }
    }
  }
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  return 0;
}
