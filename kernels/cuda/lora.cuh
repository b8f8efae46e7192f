#pragma once
// LoRA's two products on the device, y += scale * B (A x), for a batch whose rows name adapters (Punica's
// and vLLM's "shrink" and "expand"; kernels/lora.hpp is the CPU's): the factors fp16 and transposed as
// worker::LoraProduct holds them, the activations fp16 as the GPU forward pass feeds its products, sums
// in fp32. One call serves every adapter of the batch (Punica's BGMV): each row gathers its own adapter's
// factors from a table of the product's factors per adapter slot (LoraSlots), so a step's launches depend
// neither on how many adapters it holds nor on which rows name which, and a CUDA graph of a step holds
// them. One call also updates up to three products that read the same input (a layer's q, k and v, its
// gate and up, as vLLM's stacked LoRA layers do): two launches for the group, where a launch pair a product
// made a llama-70b step of LoRA rows 1,680 launches (now 640).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

constexpr int64_t kLoraMaxRank = 1024;
// Inputs a block of the shrink sums (the inputs are cut into such splits whatever the batch).
constexpr int64_t kLoraInputsPerSplit = 256;
constexpr int64_t kLoraMaxOutputs = int64_t{256} * 65535;        // a group's 256-output expand blocks a row
constexpr int64_t kLoraMaxInputs = kLoraInputsPerSplit * 65535;  // the shrink grid's splits a row
constexpr int kLoraMaxProducts = 3;                              // a group's products (q, k and v)

// One adapted product (a k-input, n_out-output matrix) for every adapter slot: device arrays of `slots`
// entries, entry a - 1 for adapter a. A row takes its adapter's update where row_adapter names a slot
// 1 .. slots whose a_t and b_t are not null and whose rank is 1 .. max_rank; any other row (0: the base
// alone, an adapter that leaves this matrix as it is) is left as it is.
struct LoraSlots {
  const __half* const* a_t = nullptr;  // [slots]: adapter a's Aᵀ, [k, rank[a - 1]] __half
  const __half* const* b_t = nullptr;  // [slots]: its Bᵀ, [rank[a - 1], n_out] __half
  const int32_t* rank = nullptr;       // [slots]
  const float* scale = nullptr;        // [slots]
  int32_t slots = 0;
  int64_t max_rank = 0;  // 1 .. kLoraMaxRank, at least every slot's rank: sizes the grids
};

// A product the update goes onto: its factors per slot and its outputs.
struct LoraTarget {
  LoraSlots slots;
  int64_t n_out = 0;   // 1 .. kLoraMaxOutputs
  float* y = nullptr;  // [n, ldy] float: row r's n_out outputs at y + r * ldy (a column range of a
                       // stacked product's output); the group's products' outputs must not overlap
  int64_t ldy = 0;     // >= n_out
};

// Products that read the same k inputs: targets[0 .. count).
struct LoraGroup {
  LoraTarget targets[kLoraMaxProducts];
  int count = 0;  // 1 .. kLoraMaxProducts
};

// Scratch lora_add_f16 needs for n rows of a group of `products` k-input products whose ranks are at most
// max_rank: [n, products, ceil(k / 256), max_rank] floats (each split's partial sums). 0 for a bad argument.
size_t lora_workspace_bytes(int64_t n, int64_t k, int64_t max_rank, int products);

// y[r] += scale * B (A x[r]) for each product of the group, with row r's adapter's scale and factors, for
// the rows r < n that take that product's update; every other row and output is left as it is. Sums in a
// fixed order (the same bits whatever the batch, its other adapters and the group's other products): A x
// over each split of 256 inputs in one block (a decode step's row spreads over k / 256 blocks), the
// splits in order, times the scale; then each output over the rank, added to y once.
// x: [n, ldx] __half (row r's k inputs at x + r * ldx, ldx >= k); row_adapter: [n] int32 (a device array
// of n entries, given even where n is 0); workspace: lora_workspace_bytes(n, k, the targets' largest
// max_rank, group.count) bytes, 4-byte aligned. k <= kLoraMaxInputs; the group's products' outputs
// rounded up to 256 each, together at most kLoraMaxOutputs (65535 expand blocks a row). Two kernels on
// `stream`. Returns invalid_argument (nothing launched) for a bad argument, device_error if a launch fails.
Status lora_add_f16(const LoraGroup& group, int64_t k, const __half* x, int64_t ldx,
                    const int32_t* row_adapter, int64_t n, void* workspace, size_t workspace_bytes,
                    cudaStream_t stream);

}  // namespace nibble::kernels::cuda
