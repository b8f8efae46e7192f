#pragma once
// llama.cpp's lattice tables for its sub-4-bit i-quants (ggml-common.h), generated into iq_grids.inc by
// tools/gen_iq_grids.py. Entry i holds grid point i's coordinates as bytes, coordinate j in byte j.
#include <cstdint>

namespace nibble::kernels {

extern const uint64_t kIQ2XXSGrid[256];  // IQ2_XXS: coordinates 8, 25, 43
extern const uint64_t kIQ2XSGrid[512];   // IQ2_XS: the same values
extern const uint64_t kIQ2SGrid[1024];   // IQ2_S: the same values
extern const uint32_t kIQ3XXSGrid[256];  // IQ3_XXS: 4, 12, ..., 52, 62
extern const uint32_t kIQ3SGrid[512];    // IQ3_S: odd values 1..15
extern const uint64_t kIQ1SGrid[2048];   // IQ1_S / IQ1_M: int8 coordinates -1, 0, 1

}  // namespace nibble::kernels
