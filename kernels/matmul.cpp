// The matmul driver: argument checks, ISA dispatch, activation quantization and the split of
// output rows across the thread pool. The arithmetic lives in matmul_{scalar,avx2,avx512}.cpp.
#include "kernels/matmul.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <atomic>
#include <cstring>
#include <vector>

#include "kernels/matmul_internal.hpp"
#include "kernels/packed_weights.hpp"
#include "kernels/quantize.hpp"
#include "kernels/read_only_quants.hpp"

namespace nibble::kernels {
namespace {

using detail::IsaKernels;
using detail::MatmulOperands;
using detail::MatmulRangeFn;

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // F16C from CPUID itself: clang before 15 does not know the name "f16c" in __builtin_cpu_supports.
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool has_f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && has_f16c;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  // VNNI too (Cascade Lake, Ice Lake, Zen 4 and later): the packed Q4_0 kernel uses vpdpbusd.
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

const IsaKernels* best_isa() {
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_has_avx512()) return &detail::avx512_kernels();
  if (cpu_has_avx2()) return &detail::avx2_kernels();
#endif
  return &detail::scalar_kernels();
}

std::atomic<const IsaKernels*>& active_isa() {
  static std::atomic<const IsaKernels*> isa{best_isa()};
  return isa;
}

// Weight types the matmul accepts, and which activation format each one consumes.
enum class ActivationFormat { f32, q8_0, q8_1, q8_k, none };

ActivationFormat activation_format(DType w_type) {
  switch (w_type) {
    case DType::F32:
    case DType::F16:
    case DType::BF16:
      return ActivationFormat::f32;
    case DType::Q4_0:
    case DType::Q5_0:
    case DType::Q8_0:
    case DType::IQ4_NL:
      return ActivationFormat::q8_0;
    case DType::Q4_1:
    case DType::Q5_1:
      return ActivationFormat::q8_1;
    case DType::Q2_K:
    case DType::Q3_K:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
    case DType::IQ4_XS:
      return ActivationFormat::q8_k;
    default:
      // The read-only types (kernels/read_only_quants.hpp): MXFP4 blocks of 32, the others super-blocks.
      if (is_read_only_type(w_type))
        return w_type == DType::MXFP4 ? ActivationFormat::q8_0 : ActivationFormat::q8_k;
      return ActivationFormat::none;
  }
}

MatmulRangeFn range_fn(const IsaKernels& isa, DType w_type) {
  switch (w_type) {
    case DType::F32:
      return isa.f32;
    case DType::F16:
      return isa.f16;
    case DType::BF16:
      return isa.bf16;
    case DType::Q4_0:
      return isa.q4_0;
    case DType::Q4_1:
      return isa.q4_1;
    case DType::Q5_0:
      return isa.q5_0;
    case DType::Q5_1:
      return isa.q5_1;
    case DType::Q8_0:
      return isa.q8_0;
    case DType::Q2_K:
      return isa.q2_k;
    case DType::Q3_K:
      return isa.q3_k;
    case DType::Q4_K:
      return isa.q4_k;
    case DType::Q5_K:
      return isa.q5_k;
    case DType::Q6_K:
      return isa.q6_k;
    case DType::IQ4_NL:
      return isa.iq4_nl;
    case DType::IQ4_XS:
      return isa.iq4_xs;
    default:
      return isa.read_only(w_type);  // kernels/read_only_quants.hpp's types
  }
}

Status check_arguments(DType w_type, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m,
                       const float* y) {
  if (activation_format(w_type) == ActivationFormat::none) return Status::unsupported_type;
  if (w == nullptr || x == nullptr || y == nullptr) return Status::invalid_argument;
  if (n_out < 0 || k < 0 || m < 0) return Status::invalid_argument;
  if (k % type_info(w_type).block_elems != 0) return Status::invalid_argument;
  return Status::ok;
}

// Activation rows quantized for the current matmul (and their block infos for packed weights).
// Owned by the calling thread and only grown, so steady-state decoding does no allocation.
thread_local std::vector<uint8_t> tls_activation_scratch;
thread_local std::vector<detail::Q8_0BlockInfo> tls_block_info_scratch;

// Below this many multiply-adds a dispatch to the workers costs more than it saves: with AVX-512
// kernels 2^18 is a few microseconds of one core, about what waking and joining a worker costs
// (2^15 made a 12.9M-parameter F16 model decode 1.5x slower on 2 threads than this).
constexpr int64_t kMinParallelWork = 1 << 18;

}  // namespace

bool matmul_supports(DType type) { return activation_format(type) != ActivationFormat::none; }

const char* matmul_isa() { return active_isa().load(std::memory_order_relaxed)->name; }

const detail::IsaKernels& detail::active_kernels() { return *active_isa().load(std::memory_order_relaxed); }

bool matmul_force_isa(const char* isa) {
  if (isa == nullptr) return false;
  const IsaKernels* chosen = nullptr;
  if (std::strcmp(isa, "scalar") == 0) chosen = &detail::scalar_kernels();
#if defined(__x86_64__) || defined(__i386__)
  if (std::strcmp(isa, "avx2") == 0 && cpu_has_avx2()) chosen = &detail::avx2_kernels();
  if (std::strcmp(isa, "avx512") == 0 && cpu_has_avx512()) chosen = &detail::avx512_kernels();
#endif
  if (chosen == nullptr) return false;
  active_isa().store(chosen, std::memory_order_relaxed);
  return true;
}

namespace {

// Quantizes x: [m, k] into the thread's scratch as `format` and points op.x there (or at x itself
// for float activations). With `with_block_info`, also fills op.x_info (Q8_0 only).
void prepare_activations(const IsaKernels& isa, ActivationFormat format, const float* x, bool parallel,
                         bool with_block_info, ThreadPool& pool, MatmulOperands& op) {
  const int64_t m = op.m;
  const int64_t k = op.k;
  if (format == ActivationFormat::f32) {
    op.x = reinterpret_cast<const uint8_t*>(x);
    op.x_stride = k * static_cast<int64_t>(sizeof(float));
    return;
  }
  const DType act_type = format == ActivationFormat::q8_0   ? DType::Q8_0
                         : format == ActivationFormat::q8_1 ? DType::Q8_1
                                                            : DType::Q8_K;
  const detail::QuantizeActivationFn quantize = format == ActivationFormat::q8_0   ? isa.quantize_q8_0
                                                : format == ActivationFormat::q8_1 ? isa.quantize_q8_1
                                                                                   : isa.quantize_q8_k;
  op.x_stride = row_bytes(act_type, k);
  std::vector<uint8_t>& scratch = tls_activation_scratch;
  if (scratch.size() < static_cast<size_t>(m * op.x_stride))
    scratch.resize(static_cast<size_t>(m * op.x_stride));
  const int64_t n_blocks = k / kQK8_0;
  detail::Q8_0BlockInfo* info = nullptr;
  if (with_block_info) {
    std::vector<detail::Q8_0BlockInfo>& info_scratch = tls_block_info_scratch;
    if (info_scratch.size() < static_cast<size_t>(m * n_blocks))
      info_scratch.resize(static_cast<size_t>(m * n_blocks));
    info = info_scratch.data();
  }
  uint8_t* act = scratch.data();
  const int64_t stride = op.x_stride;
  auto quantize_rows = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      quantize(x + r * k, act + r * stride, k);
      if (info != nullptr) isa.q8_0_block_info(act + r * stride, info + r * n_blocks, n_blocks);
    }
  };
  if (parallel && m > 1) {
    pool.parallel_for(m, 1, quantize_rows);
  } else {
    quantize_rows(0, m);
  }
  op.x = act;
  op.x_info = info;
}

// Runs range over output rows [0, n_out), on the pool when `parallel`.
void run_output_rows(MatmulRangeFn range, const MatmulOperands& op, int64_t n_out, bool parallel,
                     ThreadPool& pool) {
  if (!parallel) {
    range(op, 0, n_out);
    return;
  }
  // Output rows are handed out in chunks from a shared counter, so a thread that loses its core
  // to another process does not hold everyone back. Chunks are multiples of 8 rows (the kernels'
  // widest weight-row tile and the packed panel height) and about 8 per thread.
  const int n_threads = pool.size();
  int64_t chunk = n_out / (static_cast<int64_t>(n_threads) * 8);
  chunk = chunk < 8 ? 8 : (chunk + 7) / 8 * 8;
  std::atomic<int64_t> next_chunk{0};
  pool.run([&](int, int) {
    for (;;) {
      const int64_t begin = next_chunk.fetch_add(1, std::memory_order_relaxed) * chunk;
      if (begin >= n_out) break;
      range(op, begin, begin + chunk < n_out ? begin + chunk : n_out);
    }
  });
}

}  // namespace

Status matmul(DType w_type, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m, float* y,
              ThreadPool& pool) {
  const Status status = check_arguments(w_type, w, n_out, k, x, m, y);
  if (status != Status::ok) return status;
  if (m == 0 || n_out == 0) return Status::ok;
  if (k == 0) {
    std::memset(y, 0, static_cast<size_t>(m * n_out) * sizeof(float));
    return Status::ok;
  }
  const IsaKernels& isa = *active_isa().load(std::memory_order_relaxed);
  const bool parallel = pool.size() > 1 && m * n_out * k >= kMinParallelWork;

  MatmulOperands op{};
  op.w = static_cast<const uint8_t*>(w);
  op.w_stride = row_bytes(w_type, k);
  op.y = y;
  op.y_stride = n_out;
  op.m = m;
  op.k = k;
  prepare_activations(isa, activation_format(w_type), x, parallel, /*with_block_info=*/false, pool, op);
  run_output_rows(range_fn(isa, w_type), op, n_out, parallel, pool);
  return Status::ok;
}

Status matmul_packed(const PackedMatrix& w, const float* x, int64_t m, float* y, ThreadPool& pool) {
  if (w.empty() || !can_pack_for_matmul(w.type())) return Status::invalid_argument;
  if (x == nullptr || y == nullptr || m < 0) return Status::invalid_argument;
  if (m == 0) return Status::ok;
  const IsaKernels& isa = *active_isa().load(std::memory_order_relaxed);
  const bool parallel = pool.size() > 1 && m * w.n_out() * w.k() >= kMinParallelWork;

  MatmulOperands op{};
  op.w = w.data();
  op.w_stride = w.panel_bytes();
  op.y = y;
  op.y_stride = w.n_out();
  op.m = m;
  op.k = w.k();
  const bool with_block_info =
      w.type() == DType::Q4_0 || w.type() == DType::Q5_0 || w.type() == DType::IQ4_NL;
  prepare_activations(isa, activation_format(w.type()), x, parallel, with_block_info, pool, op);
  MatmulRangeFn range = isa.q4_0_packed;
  if (w.type() == DType::Q4_1) range = isa.q4_1_packed;
  if (w.type() == DType::Q5_0) range = isa.q5_0_packed;
  if (w.type() == DType::Q5_1) range = isa.q5_1_packed;
  if (w.type() == DType::Q8_0) range = isa.q8_0_packed;
  if (w.type() == DType::Q2_K) range = isa.q2_k_packed;
  if (w.type() == DType::Q3_K) range = isa.q3_k_packed;
  if (w.type() == DType::Q4_K) range = isa.q4_k_packed;
  if (w.type() == DType::Q5_K) range = isa.q5_k_packed;
  if (w.type() == DType::Q6_K) range = isa.q6_k_packed;
  if (w.type() == DType::IQ4_XS) range = isa.iq4_xs_packed;
  if (w.type() == DType::IQ4_NL) range = isa.iq4_nl_packed;
  run_output_rows(range, op, w.n_out(), parallel, pool);
  return Status::ok;
}

Status matmul_reference(DType w_type, const void* w, int64_t n_out, int64_t k, const float* x, int64_t m,
                        float* y) {
  const Status status = check_arguments(w_type, w, n_out, k, x, m, y);
  if (status != Status::ok) return status;
  std::vector<float> w_row(static_cast<size_t>(k));
  const int64_t w_stride = row_bytes(w_type, k);
  for (int64_t o = 0; o < n_out; ++o) {
    const Status s = dequantize_row(w_type, static_cast<const uint8_t*>(w) + o * w_stride, w_row.data(), k);
    if (s != Status::ok) return s;
    for (int64_t r = 0; r < m; ++r) {
      double sum = 0.0;  // double so that the reference's own rounding is negligible in tests
      for (int64_t i = 0; i < k; ++i) sum += static_cast<double>(w_row[i]) * x[r * k + i];
      y[r * n_out + o] = static_cast<float>(sum);
    }
  }
  return Status::ok;
}

}  // namespace nibble::kernels
