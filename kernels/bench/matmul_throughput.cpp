// Matmul throughput on the shapes of a 1.1B Llama: matrix-vector (decode, reported as GB/s of
// weights streamed) and m = 64 matrix-matrix (prompt, reported as GOP/s, 2 ops per multiply-add).
// Q4_0 and Q4_K are timed both as stored in the file and repacked (kernels/packed_weights.hpp).
// Usage: nibble_matmul_throughput [threads=2] [isa] [type=q4_0]
#include <strings.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/matmul.hpp"
#include "kernels/packed_weights.hpp"
#include "kernels/quantize.hpp"

using namespace nibble::kernels;

namespace {

template <typename Call>
double seconds_per_call(const Call& call) {
  using clock = std::chrono::steady_clock;
  call();  // warm-up
  int calls = 0;
  const auto start = clock::now();
  double elapsed = 0.0;
  while (elapsed < 1.0) {
    call();
    ++calls;
    elapsed = std::chrono::duration<double>(clock::now() - start).count();
  }
  return elapsed / calls;
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  if (argc > 2 && !matmul_force_isa(argv[2])) {
    std::fprintf(stderr, "ISA %s not available\n", argv[2]);
    return 1;
  }
  DType type = DType::Q4_0;
  if (argc > 3) {
    bool known = false;
    for (DType t :
         {DType::F32, DType::F16, DType::BF16, DType::Q4_0, DType::Q8_0, DType::Q4_K, DType::Q6_K}) {
      if (strcasecmp(argv[3], type_name(t)) == 0) {
        type = t;
        known = true;
      }
    }
    if (!known) {
      std::fprintf(stderr, "unknown type %s (f32, f16, bf16, q4_0, q8_0, q4_k, q6_k)\n", argv[3]);
      return 1;
    }
  }
  ThreadPool pool(threads);
  std::printf("isa=%s threads=%d type=%s\n", matmul_isa(), threads, type_name(type));
  struct Shape {
    const char* name;
    int64_t n_out, k;
  };
  const Shape shapes[] = {
      {"attn 2048x2048", 2048, 2048}, {"ffn up 8192x2048", 8192, 2048}, {"ffn down 2048x8192", 2048, 8192}};
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  for (const Shape& s : shapes) {
    std::vector<float> w_f(static_cast<size_t>(s.k));
    const int64_t row = row_bytes(type, s.k);
    std::vector<uint8_t> w(static_cast<size_t>(s.n_out * row));
    for (int64_t o = 0; o < s.n_out; ++o) {
      for (float& v : w_f) v = dist(rng);
      if (type == DType::Q4_K || type == DType::Q6_K) {
        for (int64_t i = 0; i < row; ++i) w[o * row + i] = static_cast<uint8_t>(rng());
      } else {
        quantize_row(type, w_f.data(), w.data() + o * row, s.k);
      }
    }
    for (int64_t m : {1, 64}) {
      std::vector<float> x(static_cast<size_t>(m * s.k));
      for (float& v : x) v = dist(rng);
      std::vector<float> y(static_cast<size_t>(m * s.n_out));
      auto report = [&](const char* layout, double t) {
        const double gops = 2.0 * m * s.n_out * s.k / t * 1e-9;
        std::printf("%-20s %-8s m=%-3lld %9.1f us  %7.2f GB/s weights  %7.1f GOP/s\n", s.name, layout,
                    static_cast<long long>(m), t * 1e6, static_cast<double>(w.size()) / t * 1e-9, gops);
      };
      report("",
             seconds_per_call([&] { matmul(type, w.data(), s.n_out, s.k, x.data(), m, y.data(), pool); }));
      if (can_pack_for_matmul(type)) {
        const PackedMatrix packed = pack_for_matmul(type, w.data(), s.n_out, s.k);
        report("packed", seconds_per_call([&] { matmul_packed(packed, x.data(), m, y.data(), pool); }));
      }
    }
  }
  return 0;
}
