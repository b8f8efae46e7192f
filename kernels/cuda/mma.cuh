#pragma once
// Tensor-core and asynchronous-copy building blocks shared by the mma.sync kernels (w4a16_gemm's
// GEMM, w4a16_gemv_mma's decode GEMV); internal: included by .cu files only. The asm statements that
// touch memory carry "memory" clobbers, so the compiler neither caches shared memory across a copy or
// a wait nor moves a plain shared-memory access past one.
#include <cuda_runtime.h>

#include <cstdint>

namespace nibble::kernels::cuda::detail {

// 16 bytes global -> shared without going through registers (cp.async.cg: L2 only, not L1). Both
// addresses 16-byte aligned. valid = false zero-fills the 16 bytes and reads nothing (src-size 0), so
// ragged tile edges need no branch around the copy.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const auto dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes)
               : "memory");
}
// Closes the group of copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N committed groups are still in flight (the newest ones). The copies become
// visible to other threads only after a barrier that follows the wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// d += a · b on one m16n8k16 tile: fp16 A (row-major, 4 registers) and B (column-major, 2 registers)
// fragments, fp32 accumulators, in PTX's fragment layout (lane = 4g + t): a = {rows g, g + 8} x
// {inputs 2t, 2t + 1} then the same rows x {2t + 8, 2t + 9}; b = inputs {2t, 2t + 1}, {2t + 8, 2t + 9}
// of column g; d = rows g (d[0], d[1]) and g + 8 (d[2], d[3]), columns 2t and 2t + 1.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8 x 8 matrices of 16-bit values from shared memory in one instruction (ldmatrix.x4): lane 8q + r
// gives the 16-byte aligned address of row r of matrix q; register q of lane l receives row l / 4,
// columns 2 (l % 4) and 2 (l % 4) + 1 of matrix q. With matrices {rows 0-7, 8-15} x {inputs 0-7,
// 8-15} of a 16 x 16 tile that is exactly mma_16816's A fragment. No "memory" clobber (as CUTLASS's):
// the barrier that publishes the tile already orders it, and a clobber would stop the compiler from
// moving the weight words' plain shared-memory loads across it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const auto addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The same four matrices transposed (ldmatrix.x4.trans): register q of lane l receives column l / 4,
// rows 2 (l % 4) and 2 (l % 4) + 1 of matrix q. With matrices {inputs 0-7, 8-15} x {columns 0-7} of a
// [inputs][columns] row-major tile that is mma_16816's B fragment of columns 0-7 (registers 0, 1),
// then of columns 8-15 (registers 2, 3) from the next two matrices: attention's P V, V as cached.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const auto addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// A hint: start bringing the cache line holding p (a valid global address) into L2. No register waits
// for it, so a later load of the line finds it there instead of stalling on device memory.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

}  // namespace nibble::kernels::cuda::detail
