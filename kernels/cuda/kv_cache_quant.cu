// The quantized KV cache's three kernels. Each thread owns whole 32-value blocks (a block's scale
// needs all 32), so no step shares a block between threads; the rotation's butterflies run over a
// row staged in shared memory.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/kv_cache_blocks.cuh"
#include "kernels/cuda/kv_cache_quant.cuh"
#include "kernels/cuda/launch_status.cuh"

namespace nibble::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRotateChunk = 2048;  // values of a row one hadamard_rotate_f16 block stages
constexpr int64_t kMaxRotationBlock = 1024;

// The 32 values of unit `unit` of cache row `row` (nb units a row) of a quantized layer, through the
// W4A16 readers (the cache's blocks are GGUF's).
__device__ void load_unit(DType type, const uint8_t* layer, int64_t row, int64_t nb, int64_t unit,
                          float (&wv)[kQK4_0]) {
  switch (type) {
    case DType::Q8_0:
      w4a16::Q8_0Blocks{layer}.load(row, nb, unit, wv);
      break;
    case DType::Q4_0:
      w4a16::GgufQ4_0Blocks{layer}.load(row, nb, unit, wv);
      break;
    case DType::Q4_1:
      w4a16::Q4_1Blocks{layer}.load(row, nb, unit, wv);
      break;
    case DType::Q5_0:
      w4a16::Q5_0Blocks{layer}.load(row, nb, unit, wv);
      break;
    case DType::Q5_1:
      w4a16::Q5_1Blocks{layer}.load(row, nb, unit, wv);
      break;
    default:  // IQ4_NL (the launchers admit nothing else)
      w4a16::IQ4NLBlocks{layer}.load(row, nb, unit, wv);
      break;
  }
}

// 32 values as fp16 to 16-byte aligned `out` (each pair's bits taken by value: no aliased reads).
__device__ void store_half32(const float (&v)[kQK4_0], __half* out) {
  auto* out4 = reinterpret_cast<uint4*>(out);
  auto pair = [&](int i) { return w4a16::half2_bits(__floats2half2_rn(v[2 * i], v[2 * i + 1])); };
#pragma unroll
  for (int i = 0; i < 4; ++i)
    out4[i] = make_uint4(pair(4 * i), pair(4 * i + 1), pair(4 * i + 2), pair(4 * i + 3));
}

struct DequantParams {
  const int32_t* block_tables;
  const int32_t* last_block;
  const uint8_t* k_cache;
  const uint8_t* v_cache;
  __half* k_work;
  __half* v_work;
  int32_t* error_flag;
  int64_t kv_dim, block_size, num_blocks, max_blocks_per_seq;
  DType k_type, v_type;
};

// Block (b, r): block b of table row r, K and V.
__global__ void __launch_bounds__(kThreads) dequantize_blocks_kernel(DequantParams p) {
  const int64_t b = blockIdx.x, r = blockIdx.y;
  if (b > p.last_block[r]) return;
  const int32_t id = p.block_tables[r * p.max_blocks_per_seq + b];
  if (id < 0 || id >= p.num_blocks) {
    if (threadIdx.x == 0) detail::raise_flag(p.error_flag);
    return;
  }
  const int64_t nb = p.kv_dim / kQK4_0;
  const int64_t units = p.block_size * nb;
  for (int side = 0; side < 2; ++side) {
    const DType type = side == 0 ? p.k_type : p.v_type;
    if (type == DType::F16) continue;
    const uint8_t* cache = side == 0 ? p.k_cache : p.v_cache;
    __half* work = side == 0 ? p.k_work : p.v_work;
    for (int64_t u = threadIdx.x; u < units; u += kThreads) {
      const int64_t row = id * p.block_size + u / nb, unit = u % nb;
      float wv[kQK4_0];
      load_unit(type, cache, row, nb, unit, wv);
      store_half32(wv, work + row * p.kv_dim + unit * kQK4_0);
    }
  }
}

// Where staged value i lies in shared memory: one float of padding after every 32, so that the threads
// that each take a whole block of 32 (a thread's j-th value at 33 t + j) read distinct banks.
__device__ __forceinline__ int padded(int i) { return i + (i >> 5); }
__host__ __device__ constexpr int padded_count(int n) { return n + n / 32; }

// kernels::hadamard_rotate's butterflies over `n` staged values (padded), in runs of `block` (a power of
// two dividing n), then its scale (rotation_scale). Every thread of the block calls it.
__device__ void rotate_staged(float* x, int n, int block, float scale) {
  for (int half = 1; half < block; half *= 2) {
    __syncthreads();
    for (int pair = threadIdx.x; pair < n / 2; pair += blockDim.x) {
      // Pair `pair` of this stage: the a of the pair lies at (pair / half) * 2 half + pair % half.
      const int a = (pair / half) * 2 * half + pair % half;
      const float xa = x[padded(a)], xb = x[padded(a + half)];
      x[padded(a)] = xa + xb;
      x[padded(a + half)] = xa - xb;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) x[padded(i)] = __fmul_rn(x[padded(i)], scale);
  __syncthreads();
}

// One block's quantize, store and read back (as the cache now holds it) by one thread.
template <typename Block>
__device__ void store_unit(const float* x, uint8_t* cache_row, __half* work_row, int64_t unit) {
  Block q;
  kv_quant::quantize(x, q);
  // Every block type is 2-byte aligned (its fp16 scale first) and a whole number of 2-byte words.
  const auto* words = reinterpret_cast<const uint16_t*>(&q);
  auto* dst = reinterpret_cast<uint16_t*>(cache_row + unit * static_cast<int64_t>(sizeof(Block)));
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(Block) / 2); ++i) dst[i] = words[i];
  float back[kQK4_0];
  kv_quant::dequantize(q, back);
  store_half32(back, work_row + unit * kQK4_0);
}

__device__ void store_unit(DType type, const float* x, uint8_t* cache_row, __half* work_row, int64_t unit) {
  switch (type) {
    case DType::Q8_0:
      store_unit<BlockQ8_0>(x, cache_row, work_row, unit);
      break;
    case DType::Q4_0:
      store_unit<BlockQ4_0>(x, cache_row, work_row, unit);
      break;
    case DType::Q4_1:
      store_unit<BlockQ4_1>(x, cache_row, work_row, unit);
      break;
    case DType::Q5_0:
      store_unit<BlockQ5_0>(x, cache_row, work_row, unit);
      break;
    case DType::Q5_1:
      store_unit<BlockQ5_1>(x, cache_row, work_row, unit);
      break;
    default:
      store_unit<BlockIQ4_NL>(x, cache_row, work_row, unit);
      break;
  }
}

struct StoreParams {
  const int32_t* token_pos;
  const int32_t* token_seq;
  const int32_t* block_tables;
  __half* k_work;
  __half* v_work;
  uint8_t* k_cache;
  uint8_t* v_cache;
  int32_t* error_flag;
  int64_t kv_dim, block_size, num_blocks, max_blocks_per_seq;
  int64_t k_row_bytes, v_row_bytes;
  int k_rotation, v_rotation;
  float k_scale, v_scale;
  DType k_type, v_type;
};

// Block t: token t's K row, then its V row (dynamic shared memory: padded_count(kv_dim) floats).
__global__ void __launch_bounds__(kThreads) store_positions_kernel(StoreParams p) {
  extern __shared__ float row[];
  const int64_t t = blockIdx.x;
  const int64_t slot = detail::kv_write_slot(p.token_pos[t], p.token_seq[t], p.block_tables, p.block_size,
                                             p.num_blocks, p.max_blocks_per_seq);
  if (slot < 0) {
    if (threadIdx.x == 0) detail::raise_flag(p.error_flag);
    return;  // uniform over the block
  }
  const int n = static_cast<int>(p.kv_dim);
  for (int side = 0; side < 2; ++side) {
    const DType type = side == 0 ? p.k_type : p.v_type;
    if (type == DType::F16) continue;
    __half* work_row = (side == 0 ? p.k_work : p.v_work) + slot * p.kv_dim;
    uint8_t* cache_row =
        (side == 0 ? p.k_cache : p.v_cache) + slot * (side == 0 ? p.k_row_bytes : p.v_row_bytes);
    __syncthreads();  // the previous side's readers of `row` are done
    for (int i = threadIdx.x; i < n; i += kThreads) row[padded(i)] = __half2float(work_row[i]);
    const int rotation = side == 0 ? p.k_rotation : p.v_rotation;
    if (rotation > 0) {
      rotate_staged(row, n, rotation, side == 0 ? p.k_scale : p.v_scale);
    } else {
      __syncthreads();
    }
    for (int64_t unit = threadIdx.x; unit < n / kQK4_0; unit += kThreads)
      store_unit(type, row + padded(static_cast<int>(unit) * kQK4_0), cache_row, work_row, unit);
  }
}

// Block (r, c): chunk c of row r.
__global__ void __launch_bounds__(kThreads)
    hadamard_rotate_kernel(__half* x, int64_t width, int block, float scale) {
  __shared__ float chunk[padded_count(kRotateChunk)];
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kRotateChunk;
  const int n = static_cast<int>(width - begin < kRotateChunk ? width - begin : kRotateChunk);
  __half* src = x + static_cast<int64_t>(blockIdx.x) * width + begin;
  for (int i = threadIdx.x; i < n; i += kThreads) chunk[padded(i)] = __half2float(src[i]);
  rotate_staged(chunk, n, block, scale);
  for (int i = threadIdx.x; i < n; i += kThreads) src[i] = __float2half_rn(chunk[padded(i)]);
}

// kernels::hadamard_rotate's scale, computed as it computes it (1 / sqrtf(block) divided in double).
float rotation_scale(int64_t block) {
  return block == 0 ? 0.0f : static_cast<float>(1.0 / std::sqrt(static_cast<float>(block)));
}

bool shape_valid(const KvCacheQuantShape& s) {
  const bool types_ok = (s.k_type == DType::F16 || kv_cache_quant_type(s.k_type)) &&
                        (s.v_type == DType::F16 || kv_cache_quant_type(s.v_type));
  if (s.n_head_kv < 1 || s.head_dim < 1 || s.n_head_kv > kKvCacheQuantMaxKvDim ||
      s.head_dim > kKvCacheQuantMaxKvDim)
    return false;  // (and the product below cannot overflow)
  const int64_t kv_dim = s.n_head_kv * s.head_dim;
  return types_ok && kv_dim % kQK4_0 == 0 && kv_dim <= kKvCacheQuantMaxKvDim && s.block_size >= 1 &&
         s.num_blocks >= 1 && s.max_blocks_per_seq >= 1 && s.max_blocks_per_seq <= INT32_MAX;
}

// Quantized sides need their cache (8-byte aligned: the readers' widest load) and working copy (16-byte
// aligned: its stores are 16 bytes).
bool side_given(DType type, const void* cache, const void* work) {
  return type == DType::F16 ||
         (cache != nullptr && work != nullptr && reinterpret_cast<uintptr_t>(cache) % 8 == 0 &&
          reinterpret_cast<uintptr_t>(work) % 16 == 0);
}
bool sides_given(const KvCacheQuantShape& s, const void* k_cache, const void* v_cache, const void* k_work,
                 const void* v_work) {
  return side_given(s.k_type, k_cache, k_work) && side_given(s.v_type, v_cache, v_work);
}

// A quantized side's rotation block: 0, or a power of two from 2 to 1024 dividing head_dim (an F16 side's
// is ignored).
bool rotation_valid(DType type, int64_t block, int64_t head_dim) {
  if (type == DType::F16 || block == 0) return true;
  return block >= 2 && block <= kMaxRotationBlock && (block & (block - 1)) == 0 && head_dim % block == 0;
}

}  // namespace

Status kv_cache_dequantize_blocks(const KvCacheQuantShape& s, int64_t n_rows, const int32_t* block_tables,
                                  const int32_t* last_block, const uint8_t* k_cache, const uint8_t* v_cache,
                                  __half* k_work, __half* v_work, int32_t* error_flag, cudaStream_t stream) {
  if (!shape_valid(s) || n_rows < 0 || n_rows > 65535 || !sides_given(s, k_cache, v_cache, k_work, v_work))
    return Status::invalid_argument;
  if (n_rows > 0 && (block_tables == nullptr || last_block == nullptr)) return Status::invalid_argument;
  if (n_rows == 0 || (s.k_type == DType::F16 && s.v_type == DType::F16)) return Status::ok;
  DequantParams p{};
  p.block_tables = block_tables;
  p.last_block = last_block;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.k_work = k_work;
  p.v_work = v_work;
  p.error_flag = error_flag;
  p.kv_dim = s.n_head_kv * s.head_dim;
  p.block_size = s.block_size;
  p.num_blocks = s.num_blocks;
  p.max_blocks_per_seq = s.max_blocks_per_seq;
  p.k_type = s.k_type;
  p.v_type = s.v_type;
  const dim3 grid(static_cast<unsigned>(s.max_blocks_per_seq), static_cast<unsigned>(n_rows));
  dequantize_blocks_kernel<<<grid, kThreads, 0, stream>>>(p);
  return launch_status();
}

Status kv_cache_store_positions(const KvCacheQuantShape& s, int64_t tokens, int64_t k_rotation_block,
                                int64_t v_rotation_block, const int32_t* token_pos, const int32_t* token_seq,
                                const int32_t* block_tables, __half* k_work, __half* v_work, uint8_t* k_cache,
                                uint8_t* v_cache, int32_t* error_flag, cudaStream_t stream) {
  if (!shape_valid(s) || tokens < 0 || tokens > INT32_MAX ||
      !sides_given(s, k_cache, v_cache, k_work, v_work))
    return Status::invalid_argument;
  if (!rotation_valid(s.k_type, k_rotation_block, s.head_dim) ||
      !rotation_valid(s.v_type, v_rotation_block, s.head_dim))
    return Status::invalid_argument;
  if (tokens > 0 && (token_pos == nullptr || token_seq == nullptr || block_tables == nullptr))
    return Status::invalid_argument;
  if (tokens == 0 || (s.k_type == DType::F16 && s.v_type == DType::F16)) return Status::ok;
  StoreParams p{};
  p.token_pos = token_pos;
  p.token_seq = token_seq;
  p.block_tables = block_tables;
  p.k_work = k_work;
  p.v_work = v_work;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.error_flag = error_flag;
  p.kv_dim = s.n_head_kv * s.head_dim;
  p.block_size = s.block_size;
  p.num_blocks = s.num_blocks;
  p.max_blocks_per_seq = s.max_blocks_per_seq;
  p.k_row_bytes = s.k_type == DType::F16 ? 0 : row_bytes(s.k_type, p.kv_dim);
  p.v_row_bytes = s.v_type == DType::F16 ? 0 : row_bytes(s.v_type, p.kv_dim);
  p.k_rotation = static_cast<int>(s.k_type == DType::F16 ? 0 : k_rotation_block);
  p.v_rotation = static_cast<int>(s.v_type == DType::F16 ? 0 : v_rotation_block);
  p.k_scale = rotation_scale(p.k_rotation);
  p.v_scale = rotation_scale(p.v_rotation);
  p.k_type = s.k_type;
  p.v_type = s.v_type;
  const size_t shared =
      static_cast<size_t>(padded_count(static_cast<int>(p.kv_dim))) * sizeof(float);  // 33 KiB at most
  store_positions_kernel<<<static_cast<unsigned>(tokens), kThreads, shared, stream>>>(p);
  return launch_status();
}

Status hadamard_rotate_f16(__half* x, int64_t rows, int64_t width, int64_t block, cudaStream_t stream) {
  if (x == nullptr || rows < 0 || rows > INT32_MAX || width < 1 || block < 2 || block > kMaxRotationBlock ||
      (block & (block - 1)) != 0 || width % block != 0)
    return Status::invalid_argument;
  if (rows == 0) return Status::ok;
  const int64_t chunks = (width + kRotateChunk - 1) / kRotateChunk;  // kRotateChunk is a multiple of block
  if (chunks > 65535) return Status::invalid_argument;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
  hadamard_rotate_kernel<<<grid, kThreads, 0, stream>>>(x, width, static_cast<int>(block),
                                                        rotation_scale(block));
  return launch_status();
}

}  // namespace nibble::kernels::cuda
