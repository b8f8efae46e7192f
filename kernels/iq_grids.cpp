#include "kernels/iq_grids.hpp"

namespace nibble::kernels {

// The tables' entries are generated (tools/gen_iq_grids.py); the GPU readers include the same file as device
// arrays (kernels/cuda/w4a16_weights.cuh).
#define NIBBLE_IQ_GRID(type, name, count) const type name[count] =
#include "kernels/iq_grids.inc"
#undef NIBBLE_IQ_GRID

}  // namespace nibble::kernels
