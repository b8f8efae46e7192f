#pragma once
// LoRA's two products on the device, y += scale * B (A x), for a batch whose rows name adapters (Punica's
// and vLLM's "shrink" and "expand"; kernels/lora.hpp is the CPU's): the factors fp16 and transposed as
// worker::LoraProduct holds them, the activations fp16 as the GPU forward pass feeds its products, sums
// in fp32. One call pair serves every adapter of the batch (Punica's BGMV): each row gathers its own
// adapter's factors from a table of the product's factors per adapter slot (LoraSlots), so a step's
// launches depend neither on how many adapters it holds nor on which rows name which, and a CUDA graph
// of a step holds them.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

constexpr int64_t kLoraMaxRank = 1024;
// Inputs a block of the shrink sums (the inputs are cut into such splits whatever the batch).
constexpr int64_t kLoraInputsPerSplit = 256;
constexpr int64_t kLoraMaxOutputs = int64_t{256} * 65535;        // the expand grid's 256-output blocks a row
constexpr int64_t kLoraMaxInputs = kLoraInputsPerSplit * 65535;  // the shrink grid's splits a row

// One adapted product (a k-input, n_out-output matrix) for every adapter slot: device arrays of `slots`
// entries, entry a - 1 for adapter a. A row takes its adapter's update where row_adapter names a slot
// 1 .. slots whose a_t is not null and whose rank is 1 .. max_rank; any other row (0: the base alone, an
// adapter that leaves this matrix as it is) is left as it is.
struct LoraSlots {
  const __half* const* a_t = nullptr;  // [slots]: adapter a's Aᵀ, [k, rank[a - 1]] __half
  const __half* const* b_t = nullptr;  // [slots]: its Bᵀ, [rank[a - 1], n_out] __half
  const int32_t* rank = nullptr;       // [slots]
  const float* scale = nullptr;        // [slots]
  int32_t slots = 0;
  int64_t max_rank = 0;  // 1 .. kLoraMaxRank, at least every slot's rank: sizes the grids and ax
};

// Scratch lora_shrink_f16 needs for n rows of a k-input product of ranks up to max_rank:
// [n, ceil(k / 256), max_rank] floats (each split's partial sums). 0 for a bad argument.
size_t lora_shrink_workspace_bytes(int64_t n, int64_t k, int64_t max_rank);

// ax[r] = scale * A x[r] (its adapter's scale and A) for the rows r < n that take an update; the other
// rows of ax, and each row's ranks past its adapter's, are not written. Sums over the inputs in a fixed
// order (the same bits whatever the batch and its other adapters): each split of 256 inputs in one block
// (a decode step's row spreads over k / 256 blocks), then the splits in order.
// x: [n, ldx] __half (row r's k inputs at x + r * ldx, ldx >= k); row_adapter: [n] int32 (a device
// array of n entries, given even where n is 0); ax: [n, slots.max_rank] float; workspace:
// lora_shrink_workspace_bytes(n, k, slots.max_rank) bytes, 4-byte aligned. k <= kLoraMaxInputs. Two
// kernels on `stream`. Returns invalid_argument (nothing launched) for a bad argument, device_error if a
// launch fails.
Status lora_shrink_f16(const LoraSlots& slots, int64_t k, const __half* x, int64_t ldx,
                       const int32_t* row_adapter, int64_t n, float* ax, void* workspace,
                       size_t workspace_bytes, cudaStream_t stream);

// y[r] += B ax[r] (its adapter's B) for the same rows (each output one fp32 add of its update, summed over
// the rank first). ax: [n, slots.max_rank] float; y: [n, ldy] float (row r's n_out outputs at
// y + r * ldy, ldy >= n_out: a column range of a stacked product's output). n_out <= kLoraMaxOutputs.
// One kernel.
Status lora_expand_f16(const LoraSlots& slots, int64_t n_out, const float* ax, const int32_t* row_adapter,
                       int64_t n, float* y, int64_t ldy, cudaStream_t stream);

}  // namespace nibble::kernels::cuda
