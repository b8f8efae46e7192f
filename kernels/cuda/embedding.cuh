#pragma once
// CUDA token-embedding lookup: rows of a Q4_0, Q8_0 or F16 table (the GGUF layout, as memory-mapped;
// no repacking) gathered by token id and converted to fp16. Every dequantized value ((q - 8) · d for
// Q4_0, q · d for Q8_0) is exact in fp32, so the output equals fp16(kernels::dequantize_row(...))
// bit for bit.
//
// Ids outside the table: the output row is filled with zeros, and *out_of_range (when given) is set
// to 1. Zeros are what the vocabulary-parallel CPU path uses for tokens another shard owns (pass
// row_begin = the shard's first vocabulary row and ignore the flag there); for an unsharded table an
// out-of-range id is a caller bug, which the flag reports without a device-side assertion (that
// would poison the context). The flag is only ever set, never cleared: zero it before the call.
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/quant_types.hpp"
#include "kernels/status.hpp"

namespace nibble::kernels::cuda {

// All pointers are device pointers.
// table:        [n_rows, n_embd] of `type` (Q4_0: rows n_embd / 32 * 18 bytes, Q8_0: n_embd / 32 * 34
//               bytes, F16: n_embd * 2 bytes); 2-byte aligned
// ids:          [tokens] int32 token ids; row id - row_begin of the table is gathered
// out:          [tokens, n_embd] __half, 4-byte aligned
// out_of_range: [1] int32 or nullptr; set to 1 when some id - row_begin is outside [0, n_rows)
// n_embd: even, a multiple of 32 for Q4_0/Q8_0, at most 65535 * 128 * (2 for F16, 32 otherwise). tokens >= 0
// (0: nothing to do), n_rows >= 0. Enqueues one kernel on `stream` (asynchronous). Returns unsupported_type
// for other types, invalid_argument (nothing launched) for a bad argument, device_error if the launch fails.
Status embedding_lookup_f16(const void* table, DType type, int64_t n_rows, int64_t n_embd, int64_t row_begin,
                            const int32_t* ids, int64_t tokens, __half* out, int32_t* out_of_range,
                            cudaStream_t stream);

}  // namespace nibble::kernels::cuda
