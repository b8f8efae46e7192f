// The x86 kernels compiled for AVX512 (see kernels/CMakeLists.txt for the flags); selected at run
// time only when the CPU supports them.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/matmul_internal.hpp"
#include "kernels/packed_weights.hpp"
#include "kernels/quant_internal.hpp"
#include "kernels/quant_types.hpp"

// clang-format off
#include "kernels/read_only_quants_impl.hpp"
#include "kernels/matmul_x86_impl.hpp"
// clang-format on

namespace nibble::kernels::detail {

const IsaKernels& avx512_kernels() {
  static const IsaKernels kernels = make_x86_kernels("avx512");
  return kernels;
}

}  // namespace nibble::kernels::detail

#endif  // x86
