#pragma once
// LoRA's two products on the device, y += scale * B (A x), for the rows of a batch that name one adapter
// (Punica's and vLLM's "shrink" and "expand"; kernels/lora.hpp is the CPU's): the factors fp16 and
// transposed as worker::LoraProduct holds them, the activations fp16 as the GPU forward pass feeds its
// products, sums in fp32. A batch of several adapters takes one call pair per adapter: each call passes
// over every row and keeps those whose row_adapter entry is its adapter (decode batches are small, and
// the factors are read once a call whatever the rows), so the launches do not depend on which rows
// name which adapter and a CUDA graph of a step holds them. row_adapter must be given (a device array of
// n entries) even where n is 0.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// Inputs a block of the shrink sums (the inputs are cut into such splits whatever the batch).
constexpr int64_t kLoraInputsPerSplit = 256;

// Scratch lora_shrink_f16 needs for n rows of a k-input, rank-r product: [n, ceil(k / 256), rank] floats
// (each split's partial sums). 0 for a bad argument.
size_t lora_shrink_workspace_bytes(int64_t n, int64_t k, int64_t rank);

// ax[r] = scale * A x[r] for the rows r < n with row_adapter[r] == adapter; the other rows of ax are not
// written. Sums over the inputs in a fixed order (the same bits whatever the batch): each split of 256
// inputs in one block (a decode step's row spreads over k / 256 blocks), then the splits in order.
// a_t: [k, rank] __half (Aᵀ); x: [n, ldx] __half (row r's k inputs at x + r * ldx, ldx >= k);
// row_adapter: [n] int32; ax: [n, rank] float; workspace: lora_shrink_workspace_bytes(n, k, rank) bytes,
// 4-byte aligned. rank <= kLoraMaxRank, k <= kLoraMaxInputs. Two kernels on `stream`.
// Returns invalid_argument (nothing launched) for a bad argument, device_error if a launch fails.
Status lora_shrink_f16(const __half* a_t, int64_t k, int64_t rank, float scale, const __half* x, int64_t ldx,
                       const int32_t* row_adapter, int32_t adapter, int64_t n, float* ax, void* workspace,
                       size_t workspace_bytes, cudaStream_t stream);

// y[r] += B ax[r] for the same rows (each output one fp32 add of its update, summed over the rank first).
// b_t: [rank, n_out] __half (Bᵀ); ax: [n, rank] float; y: [n, ldy] float (row r's n_out outputs at
// y + r * ldy, ldy >= n_out: a column range of a stacked product's output). rank <= kLoraMaxRank,
// n_out <= kLoraMaxOutputs. One kernel.
Status lora_expand_f16(const __half* b_t, int64_t rank, int64_t n_out, const float* ax,
                       const int32_t* row_adapter, int32_t adapter, int64_t n, float* y, int64_t ldy,
                       cudaStream_t stream);

constexpr int64_t kLoraMaxRank = 1024;
constexpr int64_t kLoraMaxOutputs = int64_t{256} * 65535;        // the expand grid's 256-output blocks a row
constexpr int64_t kLoraMaxInputs = kLoraInputsPerSplit * 65535;  // the shrink grid's splits a row

}  // namespace nibble::kernels::cuda
