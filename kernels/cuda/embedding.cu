// Grid: (tokens, blocks along the row). For Q4_0/Q8_0 each thread dequantizes one 32-element block
// (read as 2-byte words: blocks are 18 / 34 bytes, so only 2-byte aligned) and writes 16 half2; for
// F16 each thread copies one half2 (two elements).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/launch_status.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 128;

// Work items per row: 32-element blocks (quantized) or element pairs (F16).
template <DType T>
constexpr int kItemElems = (T == DType::F16) ? 2 : 32;

template <DType T>
__global__ void __launch_bounds__(kThreads)
    embedding_kernel(const uint8_t* __restrict__ table, int64_t n_rows, int64_t n_embd, int64_t row_bytes,
                     int64_t row_begin, const int32_t* __restrict__ ids, __half2* __restrict__ out,
                     int32_t* out_of_range) {
  const int64_t t = blockIdx.x;
  const int64_t item = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t n_items = n_embd / kItemElems<T>;
  if (item >= n_items) return;
  const int64_t row = static_cast<int64_t>(ids[t]) - row_begin;
  __half2* o = out + (t * n_embd + item * kItemElems<T>) / 2;
  if (row < 0 || row >= n_rows) {
    if (item == 0) detail::raise_flag(out_of_range);
#pragma unroll
    for (int j = 0; j < kItemElems<T> / 2; ++j) o[j] = __floats2half2_rn(0.0f, 0.0f);
    return;
  }
  const uint8_t* src = table + row * row_bytes;
  if constexpr (T == DType::F16) {
    const auto* s = reinterpret_cast<const __half*>(src) + item * 2;
    o[0] = __halves2half2(s[0], s[1]);
  } else if constexpr (T == DType::Q4_0) {
    const auto* blk = reinterpret_cast<const uint16_t*>(src + item * static_cast<int64_t>(sizeof(BlockQ4_0)));
    const float d = __half2float(__ushort_as_half(__ldg(blk)));
    float v[32];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const unsigned q2 = __ldg(blk + 1 + j);  // qs[2j] low byte, qs[2j+1] high byte
      v[2 * j] = static_cast<float>(static_cast<int>(q2 & 0xF) - 8) * d;
      v[2 * j + 1] = static_cast<float>(static_cast<int>((q2 >> 8) & 0xF) - 8) * d;
      v[2 * j + 16] = static_cast<float>(static_cast<int>((q2 >> 4) & 0xF) - 8) * d;
      v[2 * j + 17] = static_cast<float>(static_cast<int>((q2 >> 12) & 0xF) - 8) * d;
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) o[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
  } else {  // Q8_0
    const auto* blk = reinterpret_cast<const uint16_t*>(src + item * static_cast<int64_t>(sizeof(BlockQ8_0)));
    const float d = __half2float(__ushort_as_half(__ldg(blk)));
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const unsigned q2 = __ldg(blk + 1 + j);  // qs[2j] low byte, qs[2j+1] high byte (int8 each)
      const float a = static_cast<float>(static_cast<int8_t>(q2 & 0xFF)) * d;
      const float b = static_cast<float>(static_cast<int8_t>((q2 >> 8) & 0xFF)) * d;
      o[j] = __floats2half2_rn(a, b);
    }
  }
}

}  // namespace

Status embedding_lookup_f16(const void* table, DType type, int64_t n_rows, int64_t n_embd, int64_t row_begin,
                            const int32_t* ids, int64_t tokens, __half* out, int32_t* out_of_range,
                            cudaStream_t stream) {
  if (type != DType::Q4_0 && type != DType::Q8_0 && type != DType::F16) return Status::unsupported_type;
  if (table == nullptr || ids == nullptr || out == nullptr) return Status::invalid_argument;
  if (n_rows < 0 || n_embd < 2 || n_embd % 2 != 0 || tokens < 0) return Status::invalid_argument;
  if (type != DType::F16 && n_embd % 32 != 0) return Status::invalid_argument;
  if (reinterpret_cast<uintptr_t>(table) % 2 != 0 || reinterpret_cast<uintptr_t>(out) % 4 != 0) {
    return Status::invalid_argument;
  }
  const int64_t item_elems = type == DType::F16 ? 2 : 32;
  const int64_t blocks_y = (n_embd / item_elems + kThreads - 1) / kThreads;
  if (tokens > INT32_MAX || blocks_y > 65535) return Status::invalid_argument;  // grid limits
  if (tokens == 0) return Status::ok;
  const int64_t rb = type == DType::F16    ? n_embd * 2
                     : type == DType::Q4_0 ? n_embd / 32 * static_cast<int64_t>(sizeof(BlockQ4_0))
                                           : n_embd / 32 * static_cast<int64_t>(sizeof(BlockQ8_0));
  const dim3 grid(static_cast<unsigned>(tokens), static_cast<unsigned>(blocks_y));
  const auto* tb = static_cast<const uint8_t*>(table);
  auto* o = reinterpret_cast<__half2*>(out);
  switch (type) {
    case DType::Q4_0:
      embedding_kernel<DType::Q4_0>
          <<<grid, kThreads, 0, stream>>>(tb, n_rows, n_embd, rb, row_begin, ids, o, out_of_range);
      break;
    case DType::Q8_0:
      embedding_kernel<DType::Q8_0>
          <<<grid, kThreads, 0, stream>>>(tb, n_rows, n_embd, rb, row_begin, ids, o, out_of_range);
      break;
    default:
      embedding_kernel<DType::F16>
          <<<grid, kThreads, 0, stream>>>(tb, n_rows, n_embd, rb, row_begin, ids, o, out_of_range);
      break;
  }
  return launch_status();
}

}  // namespace nibble::kernels::cuda
