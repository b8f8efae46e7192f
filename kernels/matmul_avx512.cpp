// The x86 kernels compiled for AVX512 (see kernels/CMakeLists.txt for the flags); selected at run
// time only when the CPU supports them.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "kernels/matmul_internal.hpp"
#include "kernels/quant_internal.hpp"
#include "kernels/quant_types.hpp"

// clang-format off
#include "kernels/matmul_x86_impl.hpp"
// clang-format on

namespace nibble::kernels::detail {
namespace {

const IsaKernels kAvx512Kernels{
    "avx512",
    matmul_range<FloatFamily<FloatWeight::f32>>,
    matmul_range<FloatFamily<FloatWeight::f16>>,
    matmul_range<FloatFamily<FloatWeight::bf16>>,
    matmul_range<Q8_0Family<true>>,
    matmul_range<Q8_0Family<false>>,
    kquant_range<KQuantFamily<true>>,
    kquant_range<KQuantFamily<false>>,
    q4_0_packed_range,
    quantize_q8_0,
    quantize_q8_k,
    q8_0_block_info,
};

}  // namespace

const IsaKernels& avx512_kernels() { return kAvx512Kernels; }

}  // namespace nibble::kernels::detail

#endif  // x86
