// x86 SIMD kernels (AVX2 + FMA + F16C intrinsics), compiled once per x86 ISA translation unit:
// matmul_avx2.cpp compiles them with -mavx2, matmul_avx512.cpp with AVX-512 flags (the compiler
// then also gets 32 vector registers and EVEX encodings). Everything is in an anonymous namespace
// so that the two compilations never share a symbol.
//
// Tiling: a tile computes RM activation rows × RN weight rows. Each weight block is loaded and
// unpacked once per tile and reused for the RM activation rows (as llamafile's tinyBLAS does);
// each activation block is loaded once and reused for the RN weight rows. Per output pair the
// per-block integer dot product is scaled and accumulated into 8 float lanes, reduced at the end.
//
// Include only from a .cpp that has included <immintrin.h> and the kernels headers (packed_weights.hpp
// only for its layout constants, used at compile time: no inline function of it is called here, so no
// copy of one is compiled for this file's ISA).

// The tile loops must be fully unrolled so that the accumulator arrays live in registers.
#define NIBBLE_UNROLL _Pragma("GCC unroll 16")

namespace {

using nibble::kernels::BlockIQ4_NL;
using nibble::kernels::BlockIQ4_XS;
using nibble::kernels::BlockQ2_K;
using nibble::kernels::BlockQ3_K;
using nibble::kernels::BlockQ4_0;
using nibble::kernels::BlockQ4_1;
using nibble::kernels::BlockQ4_K;
using nibble::kernels::BlockQ5_0;
using nibble::kernels::BlockQ5_1;
using nibble::kernels::BlockQ5_K;
using nibble::kernels::BlockQ6_K;
using nibble::kernels::BlockQ8_0;
using nibble::kernels::BlockQ8_1;
using nibble::kernels::BlockQ8_K;
using nibble::kernels::DType;
using nibble::kernels::f16_bits;
using nibble::kernels::kQK4_0;
using nibble::kernels::kQK8_0;
using nibble::kernels::kQK_K;
using nibble::kernels::packed_group_bytes;
using nibble::kernels::detail::MatmulOperands;
using nibble::kernels::detail::Q8_0BlockInfo;

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

inline float half_to_float(f16_bits h) { return _cvtsh_ss(h); }

// A local copy of bf16_to_fp32: calling the shared inline one could link in a copy compiled for
// another ISA.
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float hmax_ps(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum_ps(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
  return _mm_cvtss_f32(sum);
}

// Sums of 2×16-bit lanes into 32-bit lanes.
inline __m256i pairwise_sum_i16(__m256i v) { return _mm256_madd_epi16(v, _mm256_set1_epi16(1)); }

// Σ_i a[i]·b[i] over 32 int8 lanes as 8 int32 partial sums. maddubs needs an unsigned left
// operand, so the sign of `a` is moved onto `b` (GGML's trick); |a|·|b| ≤ 128·127 never saturates
// the pairwise 16-bit sums.
inline __m256i dot_i8(__m256i a, __m256i b) {
  return pairwise_sum_i16(_mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)));
}

// The 32 nibbles of a Q4_0 block in element order (low nibbles are elements 0-15), as 0..15.
inline __m256i unpack_nibbles(const uint8_t* qs) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// The fifth bits of a Q5_0 / Q5_1 block (bit j of the little-endian qh: element j) as 0x10 in byte
// lane j: each lane gets the qh byte holding its bit, keeps that bit, and compares.
inline __m256i unpack_fifth_bits(const uint8_t (&qh)[4]) {
  uint32_t bits;
  std::memcpy(&bits, qh, sizeof bits);
  const __m256i byte_of_lane =
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), byte_of_lane);
  const __m256i bit_of_lane = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit_of_lane), bit_of_lane);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

inline __m256i load_i8x32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Walks [o_begin, o_end) × [0, m) in RM×RN tiles (weight tiles outermost, so a weight tile is read
// from memory once and stays in cache while every activation row passes over it), handing edge
// tiles to smaller instantiations.
template <typename Kernel, int RM, int RN>
inline void run_tile(int64_t rows, int64_t cols, const MatmulOperands& op, int64_t r0, int64_t o0) {
  if constexpr (RM > 1) {
    if (rows < RM) return run_tile<Kernel, RM - 1, RN>(rows, cols, op, r0, o0);
  }
  if constexpr (RN > 1) {
    if (cols < RN) return run_tile<Kernel, RM, RN - 1>(rows, cols, op, r0, o0);
  }
  Kernel::template tile<RM, RN>(op, r0, o0);
}

template <typename Kernel, int RM, int RN>
void tiled_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  for (int64_t o0 = o_begin; o0 < o_end; o0 += RN) {
    const int64_t cols = min_i64(RN, o_end - o0);
    for (int64_t r0 = 0; r0 < op.m; r0 += RM)
      run_tile<Kernel, RM, RN>(min_i64(RM, op.m - r0), cols, op, r0, o0);
  }
}

// Matrix-vector (decode) uses a 1×4 tile; with several activation rows a 4×2 tile.
template <typename Kernel>
void matmul_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  if (op.m == 1) {
    tiled_range<Kernel, 1, 4>(op, o_begin, o_end);
  } else {
    tiled_range<Kernel, 4, 2>(op, o_begin, o_end);
  }
}

template <int RM, int RN>
inline void store_tile(const MatmulOperands& op, int64_t r0, int64_t o0, __m256 (&acc)[RM][RN]) {
  NIBBLE_UNROLL
  for (int i = 0; i < RM; ++i) NIBBLE_UNROLL
  for (int j = 0; j < RN; ++j) op.y[(r0 + i) * op.y_stride + o0 + j] = hsum_ps(acc[i][j]);
}

// ---- Blocks of 32: Q4_0, Q5_0, Q8_0 and IQ4_NL × Q8_0 activations, Q4_1 and Q5_1 × Q8_1 ----
//
// Signed weights (Q4_0, Q5_0, Q8_0, IQ4_NL) go into maddubs by their absolute values, their signs moved
// onto the activations (GGML's trick). Q4_1's / Q5_1's levels (0..15 or 0..31) are unsigned and go in
// as they are; their minimum adds m · s per block, s the Q8_1 activation block's sum, summed apart
// from the lanes and added after them (as llama.cpp's ggml_vec_dot_q4_1_q8_1 does).

// llama.cpp's 16 IQ4 values in both 128-bit lanes, for _mm256_shuffle_epi8.
inline __m256i iq4_value_table() {
  return _mm256_broadcastsi128_si256(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(nibble::kernels::kIQ4Values)));
}

template <typename WeightBlock>
struct Block32Family {
  static constexpr bool kHasMin =
      std::is_same_v<WeightBlock, BlockQ4_1> || std::is_same_v<WeightBlock, BlockQ5_1>;
  using XBlock = std::conditional_t<kHasMin, BlockQ8_1, BlockQ8_0>;

  // Weight quants in element order: signed int8 values, or Q4_1's / Q5_1's unsigned levels.
  static __m256i load_weight(const WeightBlock& block) {
    if constexpr (std::is_same_v<WeightBlock, BlockQ4_0>) {
      return _mm256_sub_epi8(unpack_nibbles(block.qs), _mm256_set1_epi8(8));
    } else if constexpr (std::is_same_v<WeightBlock, BlockQ5_0>) {
      const __m256i levels = _mm256_or_si256(unpack_nibbles(block.qs), unpack_fifth_bits(block.qh));
      return _mm256_sub_epi8(levels, _mm256_set1_epi8(16));
    } else if constexpr (std::is_same_v<WeightBlock, BlockIQ4_NL>) {
      return _mm256_shuffle_epi8(iq4_value_table(), unpack_nibbles(block.qs));
    } else if constexpr (std::is_same_v<WeightBlock, BlockQ5_1>) {
      return _mm256_or_si256(unpack_nibbles(block.qs), unpack_fifth_bits(block.qh));
    } else if constexpr (std::is_same_v<WeightBlock, BlockQ4_1>) {
      return unpack_nibbles(block.qs);
    } else {
      return load_i8x32(block.qs);
    }
  }

  template <int RM, int RN>
  static void tile(const MatmulOperands& op, int64_t r0, int64_t o0) {
    const WeightBlock* w[RN];
    const XBlock* x[RM];
    NIBBLE_UNROLL
    for (int j = 0; j < RN; ++j) w[j] = reinterpret_cast<const WeightBlock*>(op.w + (o0 + j) * op.w_stride);
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) x[i] = reinterpret_cast<const XBlock*>(op.x + (r0 + i) * op.x_stride);
    __m256 acc[RM][RN];
    float min_terms[RM][RN];  // Q4_1 / Q5_1
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) NIBBLE_UNROLL
    for (int j = 0; j < RN; ++j) {
      acc[i][j] = _mm256_setzero_ps();
      min_terms[i][j] = 0.0f;
    }

    const int64_t n_blocks = op.k / kQK8_0;
    for (int64_t b = 0; b < n_blocks; ++b) {
      __m256i w_unsigned[RN];  // maddubs' unsigned operand: |value|, or the level
      __m256i w_q[RN];
      float w_d[RN], w_m[RN];
      NIBBLE_UNROLL
      for (int j = 0; j < RN; ++j) {
        w_q[j] = load_weight(w[j][b]);
        w_unsigned[j] = kHasMin ? w_q[j] : _mm256_sign_epi8(w_q[j], w_q[j]);
        w_d[j] = half_to_float(w[j][b].d);
        if constexpr (kHasMin) w_m[j] = half_to_float(w[j][b].m);
      }
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const __m256i x_q = load_i8x32(x[i][b].qs);
        const float x_d = half_to_float(x[i][b].d);
        float x_s = 0.0f;
        if constexpr (kHasMin) x_s = half_to_float(x[i][b].s);
        NIBBLE_UNROLL
        for (int j = 0; j < RN; ++j) {
          const __m256i x_signed = kHasMin ? x_q : _mm256_sign_epi8(x_q, w_q[j]);
          const __m256i dot = pairwise_sum_i16(_mm256_maddubs_epi16(w_unsigned[j], x_signed));
          acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(w_d[j] * x_d), _mm256_cvtepi32_ps(dot), acc[i][j]);
          if constexpr (kHasMin) min_terms[i][j] += w_m[j] * x_s;
        }
      }
    }
    if constexpr (kHasMin) {
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) NIBBLE_UNROLL
      for (int j = 0; j < RN; ++j)
        op.y[(r0 + i) * op.y_stride + o0 + j] = hsum_ps(acc[i][j]) + min_terms[i][j];
    } else {
      store_tile<RM, RN>(op, r0, o0, acc);
    }
  }
};

// ---- Q4_0 weights packed in 8-row panels × Q8_0 activations ----
//
// Panel layout in kernels/packed_weights.hpp: each 32-byte chunk holds 4 nibble bytes of each of
// the panel's 8 rows, so with the 4 matching activation bytes broadcast to every lane, maddubs +
// madd leave row j's partial dot product in 32-bit lane j: no horizontal sums, and one fmadd per
// block scales all 8 rows (their fp16 scales are one 128-bit load). The nibbles go into maddubs
// unsigned (0..15) and the −8 offset is applied per block as −8·Σx from the activation block info,
// which saves both sign instructions of the signed product. The 8 maddubs results of a block
// (|each| ≤ 2·15·127) are summed in 16 bits: 8·3810 = 30480 cannot overflow.

inline __m256i broadcast_4_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

// An empty asm that the compiler must assume changes v: placed after each chunk, it stops GCC from
// reassociating a tile's int16 sums into one tree over all its products (which needs more than
// 16 vector registers and spills).
inline void register_barrier(__m256i& v) { asm("# register barrier" : "+x"(v)); }

// An empty asm that the compiler must assume changes v: placed after a product, it keeps GCC from
// contracting the multiply and the following add into an FMA (whose single rounding the scalar
// matmul does not have).
inline void float_barrier(__m256& v) { asm("# float barrier" : "+x"(v)); }

// Calls f(std::integral_constant<int, i>{}) for i = 0 .. N-1 in order, so that f can use i as a
// compile-time constant (shift counts, offsets).
template <int N, typename F>
inline void for_each_constant(F&& f) {
  [&]<int... i>(std::integer_sequence<int, i...>) { (f(std::integral_constant<int, i>{}), ...); }
  (std::make_integer_sequence<int, N>{});
}

// Row i of acc (lane j: output o0 + j) to y[r0 + i, o0 .. o0 + n_valid): a panel's outputs.
template <int RM>
inline void store_panel_outputs(const MatmulOperands& op, const __m256 (&acc)[RM], int64_t r0, int64_t o0,
                                int64_t n_valid) {
  NIBBLE_UNROLL
  for (int i = 0; i < RM; ++i) {
    float* y = op.y + (r0 + i) * op.y_stride + o0;
    if (n_valid == 8) {
      _mm256_storeu_ps(y, acc[i]);
    } else {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc[i]);
      for (int64_t j = 0; j < n_valid; ++j) y[j] = lanes[j];
    }
  }
}

// The tile of a packed type whose block gives each output row one float term (Q8_0, Q4_K, Q6_K):
// Packed::block_terms<RM>(group, x, b, terms) computes block b's term for every row of the tile
// (lane j: output o0 + j), which is added to the row's sum unfused, in block order, as the scalar
// dot functions add theirs.
// The packed kernels read their panels in one pass, a 4 KB page at a time as the hardware
// prefetchers see it: they stop at each page boundary and the stream stalls until they restart. A
// software prefetch of the group kPrefetchGroups ahead (it runs on into the thread's next panel,
// which follows in memory) keeps the loads in flight across pages: llama-1b Q4_K_M decode went from
// ~23 to ~32 tokens/s on 2 threads, about the VM's read bandwidth (docs/perf/cpu.md). Only the first
// tile of rows over a panel prefetches; the later ones find it in cache.
inline constexpr int64_t kPrefetchGroups = 4;

template <int64_t kGroupBytes>
inline void prefetch_group_ahead(const uint8_t* group) {
  const uint8_t* ahead = group + kPrefetchGroups * kGroupBytes;
  for (int64_t offset = 0; offset < kGroupBytes; offset += 64)
    _mm_prefetch(reinterpret_cast<const char*>(ahead + offset), _MM_HINT_T0);
}

template <typename Packed, int RM>
void panel_tile(const MatmulOperands& op, const uint8_t* panel, int64_t r0, int64_t o0, int64_t n_valid) {
  using XBlock = typename Packed::XBlock;
  const int64_t n_blocks = op.k / Packed::kBlockElems;
  const XBlock* x[RM];
  const Q8_0BlockInfo* info[RM] = {};  // only for Packed::kUsesBlockInfo (op.x_info is null otherwise)
  __m256 acc[RM];
  NIBBLE_UNROLL
  for (int i = 0; i < RM; ++i) {
    x[i] = reinterpret_cast<const XBlock*>(op.x + (r0 + i) * op.x_stride);
    if constexpr (Packed::kUsesBlockInfo) info[i] = op.x_info + (r0 + i) * n_blocks;
    acc[i] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (r0 == 0) prefetch_group_ahead<Packed::kGroupBytes>(panel + b * Packed::kGroupBytes);
    __m256 terms[RM];
    if constexpr (Packed::kUsesBlockInfo) {
      Packed::template block_terms<RM>(panel + b * Packed::kGroupBytes, x, info, b, terms);
    } else {
      Packed::template block_terms<RM>(panel + b * Packed::kGroupBytes, x, b, terms);
    }
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      float_barrier(terms[i]);
      acc[i] = _mm256_add_ps(acc[i], terms[i]);
    }
  }
  store_panel_outputs<RM>(op, acc, r0, o0, n_valid);
}

// What every packed type's kernel shares: its panel geometry, its activation blocks, and a tile of
// RM rows made of its block_terms (panel_tile). Derived is the kernel itself.
template <typename Derived, DType kType, typename XBlockType>
struct PanelKernel {
  using XBlock = XBlockType;
  static constexpr int64_t kPanelRows = nibble::kernels::kPanelRows;
  static constexpr int64_t kGroupBytes = packed_group_bytes(kType);
  static constexpr int64_t kBlockElems = std::is_same_v<XBlockType, BlockQ8_K> ? kQK_K : kQK8_0;
  // Whether block_terms also takes the activation blocks' Q8_0BlockInfo (op.x_info).
  static constexpr bool kUsesBlockInfo = false;

  template <int RM>
  static void tile(const MatmulOperands& op, const uint8_t* panel, int64_t r0, int64_t o0, int64_t n_valid) {
    panel_tile<Derived, RM>(op, panel, r0, o0, n_valid);
  }
};

struct PackedQ4_0 {
  static constexpr int64_t kPanelRows = nibble::kernels::kPanelRows;
  static constexpr int64_t kGroupBytes = packed_group_bytes(DType::Q4_0);

  // Outputs [o0, o0 + n_valid) of activation rows [r0, r0 + RM) from one panel.
  template <int RM>
  static void tile(const MatmulOperands& op, const uint8_t* panel, int64_t r0, int64_t o0, int64_t n_valid) {
    const int64_t n_blocks = op.k / kQK4_0;
    const BlockQ8_0* x[RM];
    const Q8_0BlockInfo* info[RM];
    __m256 acc[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      x[i] = reinterpret_cast<const BlockQ8_0*>(op.x + (r0 + i) * op.x_stride);
      info[i] = op.x_info + (r0 + i) * n_blocks;
      acc[i] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int64_t b = 0; b < n_blocks; ++b) {
      const uint8_t* group = panel + b * kGroupBytes;
      if (r0 == 0) prefetch_group_ahead<kGroupBytes>(group);
#ifdef __AVX512VNNI__
      // VNNI: vpdpbusd adds the four u8 x s8 products of each lane straight into 32 bits, the same
      // integer sum as maddubs + pairwise_sum_i16 in one instruction per chunk half.
      __m256i sum32[RM];
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) sum32[i] = _mm256_setzero_si256();
      NIBBLE_UNROLL
      for (int c = 0; c < 4; ++c) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + 16 + 32 * c));
        const __m256i low = _mm256_and_si256(packed, low4);
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
        NIBBLE_UNROLL
        for (int i = 0; i < RM; ++i) {
          const int8_t* xq = x[i][b].qs;
          sum32[i] = _mm256_dpbusd_epi32(sum32[i], low, broadcast_4_bytes(xq + 4 * c));
          sum32[i] = _mm256_dpbusd_epi32(sum32[i], high, broadcast_4_bytes(xq + 16 + 4 * c));
        }
      }
#else
      __m256i sum16[RM];
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) sum16[i] = _mm256_setzero_si256();
      NIBBLE_UNROLL
      for (int c = 0; c < 4; ++c) {
        const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + 16 + 32 * c));
        const __m256i low = _mm256_and_si256(packed, low4);                         // elements 4c..4c+3
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);  // 16+4c..16+4c+3
        NIBBLE_UNROLL
        for (int i = 0; i < RM; ++i) {
          const int8_t* xq = x[i][b].qs;
          sum16[i] = _mm256_add_epi16(sum16[i], _mm256_maddubs_epi16(low, broadcast_4_bytes(xq + 4 * c)));
          sum16[i] =
              _mm256_add_epi16(sum16[i], _mm256_maddubs_epi16(high, broadcast_4_bytes(xq + 16 + 4 * c)));
          register_barrier(sum16[i]);
        }
      }
#endif
      const __m256 w_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
#ifdef __AVX512VNNI__
        const __m256i dot = _mm256_sub_epi32(sum32[i], _mm256_set1_epi32(info[i][b].sum_times_8));
#else
        const __m256i dot =
            _mm256_sub_epi32(pairwise_sum_i16(sum16[i]), _mm256_set1_epi32(info[i][b].sum_times_8));
#endif
        acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(w_d, _mm256_set1_ps(info[i][b].d)), _mm256_cvtepi32_ps(dot),
                                 acc[i]);
      }
    }
    store_panel_outputs<RM>(op, acc, r0, o0, n_valid);
  }
};

// ---- Q8_0 weights packed in 8-row panels × Q8_0 activations ----
//
// As packed Q4_0, without the nibbles: chunk c gives row j's quants 4c..4c+3 lane j. The quants are
// signed on both sides, so |w| goes in as the unsigned operand and w's sign moves onto the
// activation bytes (GGML's trick; Q8_0 activations stay within ±127, so negating one cannot
// overflow). VNNI sums a block in 32 bits; AVX2's maddubs pairs (up to 2 · 128 · 127) are widened
// by madd in each chunk. The float operations are dot_block32's, unfused: bit for bit the scalar
// matmul's results.
struct PackedQ8_0 : PanelKernel<PackedQ8_0, DType::Q8_0, BlockQ8_0> {
  // (w_d · x_d) · Σ w · x for each row of the tile.
  template <int RM>
  static void block_terms(const uint8_t* group, const BlockQ8_0* const (&x)[RM], int64_t b,
                          __m256 (&terms)[RM]) {
    __m256i sum32[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) sum32[i] = _mm256_setzero_si256();
    NIBBLE_UNROLL
    for (int c = 0; c < 8; ++c) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + 16 + 32 * c));
      const __m256i w_abs = _mm256_sign_epi8(w, w);
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const __m256i x_signed = _mm256_sign_epi8(broadcast_4_bytes(x[i][b].qs + 4 * c), w);
#ifdef __AVX512VNNI__
        sum32[i] = _mm256_dpbusd_epi32(sum32[i], w_abs, x_signed);
#else
        sum32[i] = _mm256_add_epi32(sum32[i], pairwise_sum_i16(_mm256_maddubs_epi16(w_abs, x_signed)));
#endif
      }
    }
    const __m256 w_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i)
      terms[i] = _mm256_mul_ps(_mm256_mul_ps(w_d, _mm256_set1_ps(half_to_float(x[i][b].d))),
                               _mm256_cvtepi32_ps(sum32[i]));
  }
};

// ---- IQ4_NL weights packed in 8-row panels (Q4_0's layout) × Q8_0 activations ----
//
// As packed Q4_0, a 32-byte chunk gives row j's 4 index bytes lane j, and a byte shuffle turns the
// indices into llama.cpp's values. VNNI looks up the values + 128 (unsigned, as vpdpbusd needs) and
// takes 128 · Σx back off per block from the activation block info (16 · its 8 · Σx), as packed Q5_0
// takes its offset; AVX2 moves the signed values' signs onto the activation bytes (GGML's trick: |value|
// <= 127, so maddubs' pairs stay within 2 · 127 · 127; values + 128 would overflow them) and widens each
// chunk's products by madd. The float operation per block is dot_block32's, so the results are the
// scalar matmul's bit for bit.
struct PackedIQ4_NL : PanelKernel<PackedIQ4_NL, DType::IQ4_NL, BlockQ8_0> {
  static constexpr bool kUsesBlockInfo = true;

  // (w_d · x_d) · Σ value · x for each row of the tile.
  template <int RM>
  static void block_terms(const uint8_t* group, const BlockQ8_0* const (&x)[RM],
                          const Q8_0BlockInfo* const (&info)[RM], int64_t b, __m256 (&terms)[RM]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
#ifdef __AVX512VNNI__
    const __m256i table = _mm256_xor_si256(iq4_value_table(), _mm256_set1_epi8(static_cast<char>(0x80)));
#else
    const __m256i table = iq4_value_table();
#endif
    __m256i sum32[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) sum32[i] = _mm256_setzero_si256();
    NIBBLE_UNROLL
    for (int c = 0; c < 4; ++c) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + 16 + 32 * c));
      const __m256i first = _mm256_shuffle_epi8(table, _mm256_and_si256(packed, low4));
      const __m256i second = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4));
#ifdef __AVX512VNNI__
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const int8_t* xq = x[i][b].qs + 4 * c;
        sum32[i] = _mm256_dpbusd_epi32(sum32[i], first, broadcast_4_bytes(xq));
        sum32[i] = _mm256_dpbusd_epi32(sum32[i], second, broadcast_4_bytes(xq + 16));
      }
#else
      const __m256i first_abs = _mm256_sign_epi8(first, first);
      const __m256i second_abs = _mm256_sign_epi8(second, second);
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const int8_t* xq = x[i][b].qs + 4 * c;
        const __m256i x_first = _mm256_sign_epi8(broadcast_4_bytes(xq), first);
        const __m256i x_second = _mm256_sign_epi8(broadcast_4_bytes(xq + 16), second);
        sum32[i] = _mm256_add_epi32(sum32[i], pairwise_sum_i16(_mm256_maddubs_epi16(first_abs, x_first)));
        sum32[i] = _mm256_add_epi32(sum32[i], pairwise_sum_i16(_mm256_maddubs_epi16(second_abs, x_second)));
      }
#endif
    }
    const __m256 w_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
#ifdef __AVX512VNNI__
      const __m256i dot = _mm256_sub_epi32(sum32[i], _mm256_set1_epi32(16 * info[i][b].sum_times_8));
#else
      const __m256i dot = sum32[i];
#endif
      terms[i] = _mm256_mul_ps(_mm256_mul_ps(w_d, _mm256_set1_ps(info[i][b].d)), _mm256_cvtepi32_ps(dot));
    }
  }
};

// ---- Q4_1, Q5_0 and Q5_1 weights packed in 8-row panels × Q8_1 / Q8_0 activations ----
//
// Q4_0's chunks (kernels/packed_weights.hpp): the levels (nibbles, with Q5's fifth bits moved in from
// the group's reordered qh bytes) go into the products unsigned, 0..31. Q4_1 / Q5_1 add the minimum's
// term m · s in float, s the Q8_1 activation block's sum; Q5_0 subtracts 16 · Σx in integers, Σx from
// the Q8_0 activation block's Q8_0BlockInfo. VNNI sums in 32 bits; AVX2's maddubs pairs (at most
// 2 · 31 · 127) are summed over a chunk's two halves in 16 bits and widened each chunk. The float
// operations per block are dot_block32's / dot_q4_1_or_q5_1's, unfused, so the results are the scalar
// matmul's bit for bit.
template <DType kType>
struct PackedQ4_1OrQ5 : PanelKernel<PackedQ4_1OrQ5<kType>, kType,
                                    std::conditional_t<kType == DType::Q5_0, BlockQ8_0, BlockQ8_1>> {
  using XBlock = std::conditional_t<kType == DType::Q5_0, BlockQ8_0, BlockQ8_1>;
  static constexpr bool kHasMin = kType != DType::Q5_0;
  static constexpr bool kUsesBlockInfo = !kHasMin;
  static constexpr bool kHasFifthBit = kType != DType::Q4_1;
  static constexpr int64_t kChunksOffset = kHasMin ? 32 : 16;  // after the scales (and minimums)
  static constexpr int64_t kFifthBitsOffset = kChunksOffset + 128;

  // Chunk c's fifth bits at bit 4 of each level byte: byte c of each row's reordered qh word, spread
  // over the lane's 4 bytes, bit t (low nibbles) or 4 + t (high nibbles) tested in byte t.
  template <int c>
  static void add_fifth_bits(__m256i fifth_bits, __m256i& low, __m256i& high) {
    constexpr int32_t kSpread = c * 0x01010101;
    const __m256i byte_c =
        _mm256_shuffle_epi8(fifth_bits, _mm256_setr_epi32(kSpread, kSpread + 0x04040404, kSpread + 0x08080808,
                                                          kSpread + 0x0C0C0C0C, kSpread, kSpread + 0x04040404,
                                                          kSpread + 0x08080808, kSpread + 0x0C0C0C0C));
    const __m256i low_mask = _mm256_set1_epi32(0x08040201);
    const __m256i high_mask = _mm256_set1_epi32(static_cast<int32_t>(0x80402010u));
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    low = _mm256_or_si256(
        low, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(byte_c, low_mask), low_mask), bit4));
    high = _mm256_or_si256(
        high, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(byte_c, high_mask), high_mask), bit4));
  }

  // Σ level · x of block b for every row of the tile (lane j: output o0 + j).
  template <int RM>
  static void level_dots(const uint8_t* group, const XBlock* const (&x)[RM], int64_t b,
                         __m256i (&sum32)[RM]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256i fifth_bits = _mm256_setzero_si256();
    if constexpr (kHasFifthBit)
      fifth_bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + kFifthBitsOffset));
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) sum32[i] = _mm256_setzero_si256();
    for_each_constant<4>([&](auto c) {
      const __m256i packed =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + kChunksOffset + 32 * c));
      __m256i low = _mm256_and_si256(packed, low4);                         // elements 4c..4c+3
      __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);  // 16+4c..16+4c+3
      if constexpr (kHasFifthBit) add_fifth_bits<c>(fifth_bits, low, high);
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const int8_t* xq = x[i][b].qs + 4 * c;
#ifdef __AVX512VNNI__
        sum32[i] = _mm256_dpbusd_epi32(sum32[i], low, broadcast_4_bytes(xq));
        sum32[i] = _mm256_dpbusd_epi32(sum32[i], high, broadcast_4_bytes(xq + 16));
#else
        const __m256i sum16 = _mm256_add_epi16(_mm256_maddubs_epi16(low, broadcast_4_bytes(xq)),
                                               _mm256_maddubs_epi16(high, broadcast_4_bytes(xq + 16)));
        sum32[i] = _mm256_add_epi32(sum32[i], pairwise_sum_i16(sum16));
#endif
      }
    });
  }

  // Q4_1 / Q5_1: (w_d · x_d) · Σ level · x + m · s.
  template <int RM>
  static void block_terms(const uint8_t* group, const XBlock* const (&x)[RM], int64_t b,
                          __m256 (&terms)[RM]) requires kHasMin {
    __m256i sum32[RM];
    level_dots<RM>(group, x, b, sum32);
    const __m256 w_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    const __m256 w_m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group + 16)));
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      __m256 scaled = _mm256_mul_ps(_mm256_mul_ps(w_d, _mm256_set1_ps(half_to_float(x[i][b].d))),
                                    _mm256_cvtepi32_ps(sum32[i]));
      __m256 offset = _mm256_mul_ps(w_m, _mm256_set1_ps(half_to_float(x[i][b].s)));
      float_barrier(scaled);
      float_barrier(offset);
      terms[i] = _mm256_add_ps(scaled, offset);
    }
  }

  // Q5_0: (w_d · x_d) · (Σ level · x − 16 · Σx).
  template <int RM>
  static void block_terms(const uint8_t* group, const XBlock* const (&x)[RM],
                          const Q8_0BlockInfo* const (&info)[RM], int64_t b,
                          __m256 (&terms)[RM]) requires(!kHasMin) {
    __m256i sum32[RM];
    level_dots<RM>(group, x, b, sum32);
    const __m256 w_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      const Q8_0BlockInfo& xb = info[i][b];
      const __m256i dot = _mm256_sub_epi32(sum32[i], _mm256_set1_epi32(2 * xb.sum_times_8));
      terms[i] = _mm256_mul_ps(_mm256_mul_ps(w_d, _mm256_set1_ps(xb.d)), _mm256_cvtepi32_ps(dot));
    }
  }
};

// ---- Q4_K and Q5_K weights packed in 8-row panels × Q8_K activations ----
//
// Panel layout in kernels/packed_weights.hpp. As for packed Q4_0, a 32-byte chunk gives row j's 4
// nibble bytes lane j: its low nibbles are 4 elements of sub-block 2r, its high ones the same 4 of
// sub-block 2r + 1, each dotted with 4 activation bytes broadcast to every lane. Q5_K adds each
// value's fifth bit from the matching chunk of qh bytes (bit s for sub-block s, moved to bit 4). A
// sub-block's 8 chunks sum into one 32-bit lane a row (VNNI: vpdpbusd; AVX2: maddubs into 16 bits,
// then madd with the scale in both halves: a 16-bit half sums 2 products a chunk, each at most
// 15 · 128 for Q4_K, 31 · 128 for Q5_K, so Q4_K's 8 chunks (30720) fit and Q5_K widens every 4
// (31744)), which is multiplied by the row's 6-bit scale; the mins term Σ min · Σx takes the
// activation block's 16-element sums. The integer sums are dot_q4_k's / dot_q5_k's, and so are the
// float operations per block and output, in the same order and unfused (float_barrier), so the packed
// kernels give the scalar matmul's results bit for bit on every ISA.

// Lane j: the 8 bytes at p[0..8) as int32 (row j's scale or min of one sub-block).
inline __m256i bytes_to_i32x8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// sum += the four u8 · s8 products of each 32-bit lane of u and s: VNNI sums them into the lane's
// 32 bits; AVX2 into its two 16-bit halves (maddubs pairs), whose bound is the caller's to keep.
inline void add_lane_products(__m256i& sum, __m256i u, __m256i s) {
#ifdef __AVX512VNNI__
  sum = _mm256_dpbusd_epi32(sum, u, s);
#else
  sum = _mm256_add_epi16(sum, _mm256_maddubs_epi16(u, s));
  register_barrier(sum);
#endif
}

// total + scale · (the lane's sum of add_lane_products), per 32-bit lane (scale: int32 lanes that
// fit 16 bits). AVX2's madd takes the scale in both 16-bit halves and adds the two half sums.
inline __m256i add_scaled_lane_products(__m256i total, __m256i sum, __m256i scale) {
#ifdef __AVX512VNNI__
  return _mm256_add_epi32(total, _mm256_mullo_epi32(sum, scale));
#else
  return _mm256_add_epi32(total,
                          _mm256_madd_epi16(sum, _mm256_or_si256(scale, _mm256_slli_epi32(scale, 16))));
#endif
}

// How a panel's per-sub-block byte holds its value: signed (Q3_K, Q6_K, IQ4_XS scales), unsigned (Q4_K
// mins), or in its high nibble (Q2_K mins).
enum class SubBlockByte { signed_value, unsigned_value, high_nibble };

// A panel's per-sub-block bytes ([sub-block][row 0..7], 8 bytes a sub-block, at p) as int16 pairs:
// pairs[t], lane j, holds (sub-block 2t, sub-block 2t + 1) of row j, for _mm256_madd_epi16 with pairs
// of activation sums.
template <SubBlockByte kByte, int N>
inline void sub_block_pairs(const uint8_t* p, __m256i (&pairs)[N]) {
  NIBBLE_UNROLL
  for (int t = 0; t < N; ++t) {
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * t));
    if constexpr (kByte == SubBlockByte::high_nibble)
      bytes = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
    const __m128i interleaved = _mm_unpacklo_epi8(bytes, _mm_srli_si128(bytes, 8));
    pairs[t] = kByte == SubBlockByte::signed_value ? _mm256_cvtepi8_epi16(interleaved)
                                                   : _mm256_cvtepu8_epi16(interleaved);
  }
}

template <bool kFifthBit>
struct PackedQ4_KFamily
    : PanelKernel<PackedQ4_KFamily<kFifthBit>, kFifthBit ? DType::Q5_K : DType::Q4_K, BlockQ8_K> {
  static constexpr int64_t kQhOffset =
      packed_group_bytes(DType::Q4_K);  // Q5_K's qh chunks follow Q4_K's bytes
#ifdef __AVX512VNNI__
  static constexpr int kChunksPerWidening = 8;  // 32-bit sums: a sub-block at a time
#else
  static constexpr int kChunksPerWidening = kFifthBit ? 4 : 8;  // 16-bit sums: the bound above
#endif

  // Σ_sub min[sub] · (bsums[2 sub] + bsums[2 sub + 1]), lane j for row j; mins_pairs[t] holds
  // (min[2t], min[2t + 1]) as int16 in lane j.
  static __m256i mins_term(const __m256i (&mins_pairs)[4], const BlockQ8_K& xb) {
    // Lane s of sub_sums: bsums[2s] + bsums[2s + 1] (|sum| <= 32 · 128 fits 16 bits); packed back
    // to 16 bits, 32-bit element t of the low half then holds the pair (2t, 2t + 1) for t < 2 and
    // element 4 + (t - 2) of the high half for t >= 2.
    const __m256i sub_sums = pairwise_sum_i16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.bsums)));
    const __m256i pairs = _mm256_packs_epi32(sub_sums, sub_sums);
    __m256i sum = _mm256_setzero_si256();
    NIBBLE_UNROLL
    for (int t = 0; t < 4; ++t) {
      const __m256i pair = _mm256_permutevar8x32_epi32(pairs, _mm256_set1_epi32(t < 2 ? t : t + 2));
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(mins_pairs[t], pair));
    }
    return sum;
  }

  // Bit `bit` of each byte of qh moved to bit 4 (masked in place first, so that the 16-bit shift
  // moves no bit across bytes).
  template <int bit>
  static __m256i fifth_bit(__m256i qh) {
    const __m256i masked = _mm256_and_si256(qh, _mm256_set1_epi8(static_cast<char>(1 << bit)));
    if constexpr (bit < 4) return _mm256_slli_epi16(masked, 4 - bit);
    if constexpr (bit > 4) return _mm256_srli_epi16(masked, bit - 4);
    return masked;
  }

  // sum_scaled += Σ scale · (q · x) over sub-blocks 2 run and 2 run + 1 (the run's 32 qs bytes).
  template <int run, int RM>
  static void add_run(const uint8_t* group, const BlockQ8_K* const (&x)[RM], int64_t b,
                      __m256i (&sum_scaled)[RM]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const uint8_t* chunks = group + 160 + 256 * run;
    const __m256i scale_low = bytes_to_i32x8(group + 32 + 16 * run);
    const __m256i scale_high = bytes_to_i32x8(group + 32 + 16 * run + 8);
    __m256i dot_low[RM], dot_high[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) dot_low[i] = dot_high[i] = _mm256_setzero_si256();
    NIBBLE_UNROLL
    for (int c = 0; c < 8; ++c) {
      const __m256i packed = _mm256_load_si256(reinterpret_cast<const __m256i*>(chunks + 32 * c));
      __m256i low = _mm256_and_si256(packed, low4);
      __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
      if constexpr (kFifthBit) {
        const __m256i qh = _mm256_load_si256(reinterpret_cast<const __m256i*>(group + kQhOffset + 32 * c));
        low = _mm256_or_si256(low, fifth_bit<2 * run>(qh));
        high = _mm256_or_si256(high, fifth_bit<2 * run + 1>(qh));
      }
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const int8_t* xq = x[i][b].qs + 64 * run + 4 * c;
        add_lane_products(dot_low[i], low, broadcast_4_bytes(xq));
        add_lane_products(dot_high[i], high, broadcast_4_bytes(xq + 32));
      }
      if ((c + 1) % kChunksPerWidening == 0) {
        NIBBLE_UNROLL
        for (int i = 0; i < RM; ++i) {
          sum_scaled[i] = add_scaled_lane_products(sum_scaled[i], dot_low[i], scale_low);
          sum_scaled[i] = add_scaled_lane_products(sum_scaled[i], dot_high[i], scale_high);
          dot_low[i] = dot_high[i] = _mm256_setzero_si256();
        }
      }
    }
  }

  // (d · x_d) · Σ_sub scale · (q · x) − (dmin · x_d) · Σ_sub min · Σx for each row of the tile.
  template <int RM>
  static void block_terms(const uint8_t* group, const BlockQ8_K* const (&x)[RM], int64_t b,
                          __m256 (&terms)[RM]) {
    __m256i sum_scaled[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) sum_scaled[i] = _mm256_setzero_si256();
    for_each_constant<4>([&](auto run) { add_run<run.value, RM>(group, x, b, sum_scaled); });
    __m256i mins_pairs[4];
    sub_block_pairs<SubBlockByte::unsigned_value>(group + 96, mins_pairs);
    const __m256 w_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    const __m256 w_dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group + 16)));
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      const __m256 x_d = _mm256_set1_ps(x[i][b].d);
      __m256 scaled = _mm256_mul_ps(_mm256_mul_ps(w_d, x_d), _mm256_cvtepi32_ps(sum_scaled[i]));
      __m256 mins =
          _mm256_mul_ps(_mm256_mul_ps(w_dmin, x_d), _mm256_cvtepi32_ps(mins_term(mins_pairs, x[i][b])));
      float_barrier(scaled);
      float_barrier(mins);
      terms[i] = _mm256_sub_ps(scaled, mins);
    }
  }
};
using PackedQ4_K = PackedQ4_KFamily<false>;
using PackedQ5_K = PackedQ4_KFamily<true>;

// ---- Q6_K weights packed in 8-row panels × Q8_K activations ----
//
// Panel layout in kernels/packed_weights.hpp. A 16-element group g (half h = g / 8, run
// (g / 2) % 4 of that half, first or second 16 of the run) takes 4 chunks of ql bytes and 4 of qh
// bytes; each 6-bit value is rebuilt in its byte (nibble | 2 bits << 4, shifts fixed at compile
// time) and dotted with 4 activation bytes broadcast to every lane: VNNI sums the group in 32 bits
// and multiplies by the row's scale once; AVX2's maddubs pair sums (at most 2 · 63 · 128) are
// multiplied by the scale in each chunk by madd. The −32 offset is −32 · Σ_g scale · Σx, from the
// activation block's 16-element sums. As for Q4_K, the integer sums and float operations are
// dot_q6_k's, so the results equal the scalar matmul's bit for bit.

// sum_scaled[i] += scale · Σ q · x over one 16-element group of activation row i (lane j: row j of the
// panel): levels(c4), c4 = 0..3, gives the group's chunk c4 (4 unsigned levels a lane), x_offset the
// group's first activation. VNNI sums the group in 32 bits and multiplies once; AVX2 multiplies each
// chunk's maddubs pairs (at most 2 · 63 · 128) by the scale with madd (the scale, int32 lanes that fit
// 16 bits, in both halves).
template <int RM, typename Levels>
inline void add_scaled_group16(__m256i scale, Levels&& levels, const BlockQ8_K* const (&x)[RM], int64_t b,
                               int x_offset, __m256i (&sum_scaled)[RM]) {
#ifdef __AVX512VNNI__
  __m256i dot[RM];
  NIBBLE_UNROLL
  for (int i = 0; i < RM; ++i) dot[i] = _mm256_setzero_si256();
  NIBBLE_UNROLL
  for (int c4 = 0; c4 < 4; ++c4) {
    const __m256i q = levels(c4);
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i)
      dot[i] = _mm256_dpbusd_epi32(dot[i], q, broadcast_4_bytes(x[i][b].qs + x_offset + 4 * c4));
  }
  NIBBLE_UNROLL
  for (int i = 0; i < RM; ++i)
    sum_scaled[i] = _mm256_add_epi32(sum_scaled[i], _mm256_mullo_epi32(dot[i], scale));
#else
  const __m256i scale2 =
      _mm256_or_si256(_mm256_and_si256(scale, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(scale, 16));
  NIBBLE_UNROLL
  for (int c4 = 0; c4 < 4; ++c4) {
    const __m256i q = levels(c4);
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      const __m256i pairs = _mm256_maddubs_epi16(q, broadcast_4_bytes(x[i][b].qs + x_offset + 4 * c4));
      sum_scaled[i] = _mm256_add_epi32(sum_scaled[i], _mm256_madd_epi16(pairs, scale2));
    }
  }
#endif
}

struct PackedQ6_K : PanelKernel<PackedQ6_K, DType::Q6_K, BlockQ8_K> {
  // Group g's 6-bit values for chunk c4 (0..3) of the group: lane j, byte t is the value of
  // element 16 g + 4 c4 + t of row j.
  template <int g>
  static __m256i values(const uint8_t* group, int c4) {
    constexpr int half = g / 8, run = (g / 2) % 4;
    const int c = 4 * (g % 2) + c4;  // chunk within the run: elements l = 4c..4c+3
    const __m256i ql = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(group + 144 + 32 * (16 * half + 8 * (run % 2) + c)));
    const __m256i qh =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + 1168 + 32 * (8 * half + c)));
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i low =
        run < 2 ? _mm256_and_si256(ql, low4) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), low4);
    // The run's two bits, masked in place first so that the 16-bit shifts move no bit across bytes.
    const __m256i bits = _mm256_and_si256(qh, _mm256_set1_epi8(static_cast<char>(3 << (2 * run))));
    __m256i high;
    if constexpr (2 * run < 4) {
      high = _mm256_slli_epi16(bits, 4 - 2 * run);
    } else if constexpr (2 * run > 4) {
      high = _mm256_srli_epi16(bits, 2 * run - 4);
    } else {
      high = bits;
    }
    return _mm256_or_si256(low, high);
  }

  // Σ_g scale[g] · bsums[g], lane j for row j; scale_pairs[t] holds (scale[2t], scale[2t + 1]) as
  // int16 in lane j.
  static __m256i offset_term(const __m256i (&scale_pairs)[8], const BlockQ8_K& xb) {
    __m256i sum = _mm256_setzero_si256();
    NIBBLE_UNROLL
    for (int t = 0; t < 8; ++t) {
      int32_t pair;  // bsums[2t] and bsums[2t + 1] as one 32-bit lane
      std::memcpy(&pair, xb.bsums + 2 * t, sizeof pair);
      sum = _mm256_add_epi32(sum, _mm256_madd_epi16(scale_pairs[t], _mm256_set1_epi32(pair)));
    }
    return sum;
  }

  template <int g, int RM>
  static void add_group(const uint8_t* group, const BlockQ8_K* const (&x)[RM], int64_t b,
                        __m256i (&sum_scaled)[RM]) {
    const __m256i scale =
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(group + 16 + 8 * g)));
    add_scaled_group16<RM>(
        scale, [&](int c4) { return values<g>(group, c4); }, x, b, 16 * g, sum_scaled);
  }

  // (d · x_d) · (Σ_g scale · (q · x) − 32 · Σ_g scale · Σx) for each row of the tile.
  template <int RM>
  static void block_terms(const uint8_t* group, const BlockQ8_K* const (&x)[RM], int64_t b,
                          __m256 (&terms)[RM]) {
    __m256i sum_scaled[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) sum_scaled[i] = _mm256_setzero_si256();
    for_each_constant<16>([&](auto g) { add_group<g.value, RM>(group, x, b, sum_scaled); });
    __m256i scale_pairs[8];
    sub_block_pairs<SubBlockByte::signed_value>(group + 16, scale_pairs);
    const __m256 w_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      const __m256i total =
          _mm256_sub_epi32(sum_scaled[i], _mm256_slli_epi32(offset_term(scale_pairs, x[i][b]), 5));
      terms[i] = _mm256_mul_ps(_mm256_mul_ps(w_d, _mm256_set1_ps(x[i][b].d)), _mm256_cvtepi32_ps(total));
    }
  }
};

// ---- Q2_K and Q3_K weights packed in 8-row panels × Q8_K activations ----
//
// Panel layout in kernels/packed_weights.hpp. As for Q6_K, a 16-element group g (half h = g / 8, shift
// j = (g % 8) / 2, first or second 16 of the 32-element run) takes 4 chunks of level bytes: row j's 4
// bytes in lane j hold 4 elements of each of the half's four runs, 2 bits each; the group's are shifted
// down and masked (Q3_K ors in each third bit from the matching hmask chunk, bit 4h + j, moved to bit 2),
// and dotted with 4 activation bytes broadcast to every lane: VNNI sums the group in 32 bits and
// multiplies by the row's scale once; AVX2's maddubs pairs (at most 2 · 7 · 128) are multiplied by the
// scale in each chunk by madd. Q2_K's levels are 0..3 with 4-bit scales and a mins term Σ min · Σx
// (dmin); Q3_K's 0..7 with signed 6-bit scales and −4 · Σ scale · Σx for the offset, both from the
// activation block's 16-element sums. The integer sums and float operations are dot_q2_k's / dot_q3_k's,
// so the results equal the scalar matmul's bit for bit.
template <bool kThirdBit>
struct PackedQ2_KFamily
    : PanelKernel<PackedQ2_KFamily<kThirdBit>, kThirdBit ? DType::Q3_K : DType::Q2_K, BlockQ8_K> {
  static constexpr int64_t kScales = kThirdBit ? 16 : 32;    // [group][row] bytes
  static constexpr int64_t kLevels = kThirdBit ? 144 : 160;  // 16 chunks of 2-bit level bytes
  static constexpr int64_t kHmask = 656;                     // Q3_K's 8 chunks of third bits

  // Group g's levels for chunk c4 (0..3) of the group: lane j, byte t is the level of element
  // 16 g + 4 c4 + t of row j.
  template <int g>
  static __m256i levels(const uint8_t* group, int c4) {
    constexpr int half = g / 8, shift = (g % 8) / 2;
    const int c = 4 * (g % 2) + c4;  // chunk within the half: elements l = 4c..4c+3 of each run
    const __m256i packed =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + kLevels + 32 * (8 * half + c)));
    __m256i level = _mm256_and_si256(_mm256_srli_epi16(packed, 2 * shift), _mm256_set1_epi8(0x03));
    if constexpr (kThirdBit) {
      constexpr int bit = 4 * half + shift;
      const __m256i hmask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + kHmask + 32 * c));
      // Masked in place first, so that the 16-bit shift moves no bit across bytes.
      const __m256i masked = _mm256_and_si256(hmask, _mm256_set1_epi8(static_cast<char>(1 << bit)));
      __m256i third;
      if constexpr (bit < 2) {
        third = _mm256_slli_epi16(masked, 2 - bit);
      } else if constexpr (bit > 2) {
        third = _mm256_srli_epi16(masked, bit - 2);
      } else {
        third = masked;
      }
      level = _mm256_or_si256(level, third);
    }
    return level;
  }

  // Group g's scale of each row (lane j): Q2_K's low nibble, Q3_K's signed byte.
  template <int g>
  static __m256i scale(const uint8_t* group) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(group + kScales + 8 * g));
    if constexpr (kThirdBit) return _mm256_cvtepi8_epi32(bytes);
    return _mm256_cvtepu8_epi32(_mm_and_si128(bytes, _mm_set1_epi8(0x0F)));
  }

  template <int g, int RM>
  static void add_group(const uint8_t* group, const BlockQ8_K* const (&x)[RM], int64_t b,
                        __m256i (&sum_scaled)[RM]) {
    add_scaled_group16<RM>(
        scale<g>(group), [&](int c4) { return levels<g>(group, c4); }, x, b, 16 * g, sum_scaled);
  }

  // Q2_K: (d · x_d) · Σ_g scale · (q · x) − (dmin · x_d) · Σ_g min · Σx; Q3_K: (d · x_d) · (Σ_g scale ·
  // (q · x) − 4 · Σ_g scale · Σx), for each row of the tile.
  template <int RM>
  static void block_terms(const uint8_t* group, const BlockQ8_K* const (&x)[RM], int64_t b,
                          __m256 (&terms)[RM]) {
    __m256i sum_scaled[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) sum_scaled[i] = _mm256_setzero_si256();
    for_each_constant<16>([&](auto g) { add_group<g.value, RM>(group, x, b, sum_scaled); });
    __m256i pairs[8];  // Q2_K: the mins; Q3_K: the scales
    sub_block_pairs<kThirdBit ? SubBlockByte::signed_value : SubBlockByte::high_nibble>(group + kScales,
                                                                                        pairs);
    const __m256 w_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      const __m256 x_d = _mm256_set1_ps(x[i][b].d);
      const __m256i group_sums = PackedQ6_K::offset_term(pairs, x[i][b]);
      if constexpr (kThirdBit) {
        const __m256i total = _mm256_sub_epi32(sum_scaled[i], _mm256_slli_epi32(group_sums, 2));
        terms[i] = _mm256_mul_ps(_mm256_mul_ps(w_d, x_d), _mm256_cvtepi32_ps(total));
      } else {
        const __m256 w_dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group + 16)));
        __m256 scaled = _mm256_mul_ps(_mm256_mul_ps(w_d, x_d), _mm256_cvtepi32_ps(sum_scaled[i]));
        __m256 mins = _mm256_mul_ps(_mm256_mul_ps(w_dmin, x_d), _mm256_cvtepi32_ps(group_sums));
        float_barrier(scaled);
        float_barrier(mins);
        terms[i] = _mm256_sub_ps(scaled, mins);
      }
    }
  }
};
using PackedQ2_K = PackedQ2_KFamily<false>;
using PackedQ3_K = PackedQ2_KFamily<true>;

// ---- IQ4_XS weights packed in 8-row panels × Q8_K activations ----
//
// Panel layout in kernels/packed_weights.hpp. As for packed Q4_0, a 32-byte chunk gives row j's 4
// index bytes lane j (low nibbles: 4 elements of a sub-block's first 16, high: the same 4 of its last
// 16); a byte shuffle turns each index into its value from llama.cpp's table. VNNI multiplies the
// values + 128 (unsigned, as vpdpbusd needs) and takes 128 · Σx of the sub-block back off, from the
// activation block's 16-element sums; AVX2 moves the values' signs onto the activations (maddubs'
// pairs at most 2 · 127 · 127) and widens each chunk by madd with the scale. Either way the integer
// sums are dot_iq4_xs's, and so is the float operation per block and output, so the packed kernels
// give the scalar matmul's results bit for bit.
struct PackedIQ4_XS : PanelKernel<PackedIQ4_XS, DType::IQ4_XS, BlockQ8_K> {
  // (d · x_d) · Σ_sub scale · Σ value · x for each row of the tile.
  template <int RM>
  static void block_terms(const uint8_t* group, const BlockQ8_K* const (&x)[RM], int64_t b,
                          __m256 (&terms)[RM]) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i values = iq4_value_table();
#ifdef __AVX512VNNI__
    const __m256i table = _mm256_xor_si256(values, _mm256_set1_epi8(static_cast<char>(0x80)));  // value + 128
#else
    const __m256i table = values;
#endif
    __m256i sum_scaled[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) sum_scaled[i] = _mm256_setzero_si256();
    for (int sub = 0; sub < 8; ++sub) {
      const __m256i scale =
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(group + 16 + 8 * sub)));
#ifdef __AVX512VNNI__
      __m256i dot[RM];
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) dot[i] = _mm256_setzero_si256();
#else
      // The scale in both 16-bit halves (two's complement), for madd.
      const __m256i scale2 =
          _mm256_or_si256(_mm256_and_si256(scale, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(scale, 16));
#endif
      NIBBLE_UNROLL
      for (int c = 0; c < 4; ++c) {
        // Unaligned: a group is 1104 bytes, so chunks sit 16 bytes off 32 in every other group.
        const __m256i packed =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group + 80 + 32 * (4 * sub + c)));
        const __m256i first = _mm256_shuffle_epi8(table, _mm256_and_si256(packed, low4));
        const __m256i second =
            _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4));
        NIBBLE_UNROLL
        for (int i = 0; i < RM; ++i) {
          const int8_t* xq = x[i][b].qs + 32 * sub + 4 * c;
#ifdef __AVX512VNNI__
          dot[i] = _mm256_dpbusd_epi32(dot[i], first, broadcast_4_bytes(xq));
          dot[i] = _mm256_dpbusd_epi32(dot[i], second, broadcast_4_bytes(xq + 16));
#else
          const __m256i pairs_first = _mm256_maddubs_epi16(_mm256_sign_epi8(first, first),
                                                           _mm256_sign_epi8(broadcast_4_bytes(xq), first));
          const __m256i pairs_second = _mm256_maddubs_epi16(
              _mm256_sign_epi8(second, second), _mm256_sign_epi8(broadcast_4_bytes(xq + 16), second));
          sum_scaled[i] = _mm256_add_epi32(sum_scaled[i], _mm256_madd_epi16(pairs_first, scale2));
          sum_scaled[i] = _mm256_add_epi32(sum_scaled[i], _mm256_madd_epi16(pairs_second, scale2));
#endif
        }
      }
#ifdef __AVX512VNNI__
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i)
        sum_scaled[i] = _mm256_add_epi32(sum_scaled[i], _mm256_mullo_epi32(dot[i], scale));
#endif
    }
#ifdef __AVX512VNNI__
    // The + 128 back off: 128 · Σ_sub scale · Σx, Q4_K's mins term with the scales for mins.
    __m256i scale_pairs[4];
    sub_block_pairs<SubBlockByte::signed_value>(group + 16, scale_pairs);
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i)
      sum_scaled[i] =
          _mm256_sub_epi32(sum_scaled[i], _mm256_slli_epi32(PackedQ4_K::mins_term(scale_pairs, x[i][b]), 7));
#endif
    const __m256 w_d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group)));
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i)
      terms[i] =
          _mm256_mul_ps(_mm256_mul_ps(w_d, _mm256_set1_ps(x[i][b].d)), _mm256_cvtepi32_ps(sum_scaled[i]));
  }
};

// The last rows (fewer than a full tile) of a panel: the widest tile that fits, then the rest.
template <typename Packed, int RM>
void packed_tail(const MatmulOperands& op, const uint8_t* panel, int64_t r0, int64_t rows, int64_t o0,
                 int64_t n_valid) {
  if constexpr (RM > 0) {
    if (rows >= RM) {
      Packed::template tile<RM>(op, panel, r0, o0, n_valid);
      r0 += RM;
      rows -= RM;
    }
    packed_tail<Packed, RM - 1>(op, panel, r0, rows, o0, n_valid);
  }
}

// Panels outermost (a panel stays in cache while every activation row passes over it), kTileRows
// activation rows a tile: with AVX-512's 32 vector registers, 8 (each panel's unpacking serves more
// rows), else 4. A row's arithmetic does not depend on the tile it is in.
template <typename Packed>
void packed_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
#ifdef __AVX512F__
  constexpr int kTileRows = 8;
#else
  constexpr int kTileRows = 4;
#endif
  for (int64_t o0 = o_begin; o0 < o_end; o0 += Packed::kPanelRows) {
    const uint8_t* panel = op.w + (o0 / Packed::kPanelRows) * op.w_stride;
    const int64_t n_valid = min_i64(Packed::kPanelRows, o_end - o0);
    int64_t r0 = 0;
    for (; r0 + kTileRows <= op.m; r0 += kTileRows)
      Packed::template tile<kTileRows>(op, panel, r0, o0, n_valid);
    packed_tail<Packed, kTileRows - 1>(op, panel, r0, op.m - r0, o0, n_valid);
  }
}

// ---- F32 / F16 / BF16 weights × float activations ----

enum class FloatWeight { f32, f16, bf16 };

template <FloatWeight kType>
struct FloatFamily {
  using Element = std::conditional_t<kType == FloatWeight::f32, float, uint16_t>;

  static __m256 load8(const Element* p) {
    if constexpr (kType == FloatWeight::f32) {
      return _mm256_loadu_ps(p);
    } else if constexpr (kType == FloatWeight::f16) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {
      const __m256i widened = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(widened, 16));
    }
  }

  static float load1(const Element* p) {
    if constexpr (kType == FloatWeight::f32) {
      return *p;
    } else if constexpr (kType == FloatWeight::f16) {
      return half_to_float(*p);
    } else {
      return bf16_bits_to_float(*p);
    }
  }

  template <int RM, int RN>
  static void tile(const MatmulOperands& op, int64_t r0, int64_t o0) {
    const Element* w[RN];
    const float* x[RM];
    NIBBLE_UNROLL
    for (int j = 0; j < RN; ++j) w[j] = reinterpret_cast<const Element*>(op.w + (o0 + j) * op.w_stride);
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) x[i] = reinterpret_cast<const float*>(op.x + (r0 + i) * op.x_stride);
    __m256 acc[RM][RN];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) NIBBLE_UNROLL
    for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_setzero_ps();
    const int64_t k_vec = op.k / 8 * 8;
    for (int64_t e = 0; e < k_vec; e += 8) {
      __m256 w_v[RN];
      NIBBLE_UNROLL
      for (int j = 0; j < RN; ++j) w_v[j] = load8(w[j] + e);
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const __m256 x_v = _mm256_loadu_ps(x[i] + e);
        NIBBLE_UNROLL
        for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_fmadd_ps(w_v[j], x_v, acc[i][j]);
      }
    }
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      NIBBLE_UNROLL
      for (int j = 0; j < RN; ++j) {
        float sum = hsum_ps(acc[i][j]);
        for (int64_t e = k_vec; e < op.k; ++e) sum += load1(w[j] + e) * x[i][e];
        op.y[(r0 + i) * op.y_stride + o0 + j] = sum;
      }
    }
  }
};

#ifdef __AVX512F__
// GCC 12's AVX-512 extract/cast intrinsics pass an "undefined" vector that -Wuninitialized flags
// (GCC bug 105593, fixed in 13).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 512-bit float weights (the AVX-512 compilation only). With 32 vector registers a tile holds up
// to 6 activation rows × 4 weight rows of accumulators, so a speculative verification (k + 1 <= 6
// rows) converts each weight once, and a matrix-vector product converts 16 weights per
// instruction instead of 8. Every tile shape sums a (row, output) pair in the same order (16 lanes
// over k, the tail masked into the same lanes, then reduce4), so results do not depend on how
// many rows a call has: a verification pass reproduces plain decoding bit for bit.
template <FloatWeight kType>
struct FloatFamily512 {
  using Element = std::conditional_t<kType == FloatWeight::f32, float, uint16_t>;
  static constexpr int kMaxRows = 6;
  static constexpr int kMaxCols = 4;

  static __m512 widen16(__m256i bits) {
    if constexpr (kType == FloatWeight::f16) {
      return _mm512_cvtph_ps(bits);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
  }
  static __m512 load16(const Element* p) {
    if constexpr (kType == FloatWeight::f32) {
      return _mm512_loadu_ps(p);
    } else {
      return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  // The first n < 16 elements, zeros above (masked loads never touch memory past n).
  static __m512 load16_masked(const Element* p, __mmask16 mask) {
    if constexpr (kType == FloatWeight::f32) {
      return _mm512_maskz_loadu_ps(mask, p);
    } else {
      return widen16(_mm256_maskz_loadu_epi16(mask, p));
    }
  }

  // The four sums of a0..a3 as one vector: fold 16 lanes to 8, then one hadd tree. Missing
  // columns pass zeros, which leave the other sums' order unchanged.
  static __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    auto fold = [](__m512 a) {
      return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    };
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(fold(a0), fold(a1)), _mm256_hadd_ps(fold(a2), fold(a3)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  }

  template <int RM, int RN>
  static void tile(const MatmulOperands& op, int64_t r0, int64_t o0) {
    const Element* w[RN];
    const float* x[RM];
    NIBBLE_UNROLL
    for (int j = 0; j < RN; ++j) w[j] = reinterpret_cast<const Element*>(op.w + (o0 + j) * op.w_stride);
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) x[i] = reinterpret_cast<const float*>(op.x + (r0 + i) * op.x_stride);
    __m512 acc[RM][RN];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) NIBBLE_UNROLL
    for (int j = 0; j < RN; ++j) acc[i][j] = _mm512_setzero_ps();
    const int64_t k_vec = op.k / 16 * 16;
    for (int64_t e = 0; e < k_vec; e += 16) {
      __m512 w_v[RN];
      NIBBLE_UNROLL
      for (int j = 0; j < RN; ++j) w_v[j] = load16(w[j] + e);
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const __m512 x_v = _mm512_loadu_ps(x[i] + e);
        NIBBLE_UNROLL
        for (int j = 0; j < RN; ++j) acc[i][j] = _mm512_fmadd_ps(w_v[j], x_v, acc[i][j]);
      }
    }
    if (k_vec < op.k) {
      const auto mask = static_cast<__mmask16>((1u << (op.k - k_vec)) - 1);
      __m512 w_v[RN];
      NIBBLE_UNROLL
      for (int j = 0; j < RN; ++j) w_v[j] = load16_masked(w[j] + k_vec, mask);
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const __m512 x_v = _mm512_maskz_loadu_ps(mask, x[i] + k_vec);
        NIBBLE_UNROLL
        for (int j = 0; j < RN; ++j) acc[i][j] = _mm512_fmadd_ps(w_v[j], x_v, acc[i][j]);
      }
    }
    const __m512 zero = _mm512_setzero_ps();
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) {
      const __m128 sums =
          reduce4(acc[i][0], RN > 1 ? acc[i][RN > 1 ? 1 : 0] : zero, RN > 2 ? acc[i][RN > 2 ? 2 : 0] : zero,
                  RN > 3 ? acc[i][RN > 3 ? 3 : 0] : zero);
      float* y = op.y + (r0 + i) * op.y_stride + o0;
      if constexpr (RN == 4) {
        _mm_storeu_ps(y, sums);
      } else {
        alignas(16) float lanes[4];
        _mm_store_ps(lanes, sums);
        for (int j = 0; j < RN; ++j) y[j] = lanes[j];
      }
    }
  }
};

// Up to 6 activation rows per tile, 4 weight rows.
template <typename Kernel>
void matmul_range_512(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  tiled_range<Kernel, Kernel::kMaxRows, Kernel::kMaxCols>(op, o_begin, o_end);
}
#pragma GCC diagnostic pop
#endif  // __AVX512F__

// ---- Q2_K / Q3_K / Q4_K / Q5_K / Q6_K weights × Q8_K activations ----
//
// A weight super-block is first unpacked into unsigned quants plus 16-bit scale vectors laid out
// for _mm256_madd_epi16, then dotted with each activation row of the tile:
//   row_sum += dx · (d · Σ_chunks madd(maddubs(q, x), scales) − dmin · Σ_groups mins·bsums)
// Q6_K folds its −32 offset into the first sum as −32·scale·bsum (dmin = 0).
struct alignas(32) UnpackedKBlock {
  uint8_t q[kQK_K];                   // unsigned quants in element order (0..15, 0..31 or 0..63)
  int16_t chunk_scales[8][16];        // chunk c (32 elements): lanes 0-7 scale of group 2c, 8-15 of 2c+1
  int16_t group_offsets[kQK_K / 16];  // per 16-element group, multiplies the activation bsums
  int16_t group_mins[kQK_K / 16];
  float d;
  float dmin;
};

inline void store_i8x32(uint8_t* p, __m256i v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }

inline void set_chunk_scales(UnpackedKBlock& out, int chunk, int16_t first, int16_t second) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(out.chunk_scales[chunk]),
                     _mm256_set_m128i(_mm_set1_epi16(second), _mm_set1_epi16(first)));
}

// Q4_K, and Q5_K with qh: the fifth bit of element l of sub-block s is bit s of qh[l].
template <typename Block>
inline void unpack_q4_k_or_q5_k(const Block& block, const uint8_t* qh, UnpackedKBlock& out) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i bit4 = _mm256_set1_epi8(0x10);
  const __m256i high = qh != nullptr ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh)) : __m256i{};
  for (int pair = 0; pair < 4; ++pair) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.qs + 32 * pair));
    __m256i first = _mm256_and_si256(packed, low4);
    __m256i second = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
    if (qh != nullptr) {
      // Bits 2 pair and 2 pair + 1 of each qh byte to bit 4 (a 16-bit shift, so mask afterwards).
      const __m256i shifted = _mm256_srl_epi16(high, _mm_cvtsi32_si128(2 * pair));
      first = _mm256_or_si256(first, _mm256_and_si256(_mm256_slli_epi16(shifted, 4), bit4));
      second = _mm256_or_si256(second, _mm256_and_si256(_mm256_slli_epi16(shifted, 3), bit4));
    }
    store_i8x32(out.q + 64 * pair, first);
    store_i8x32(out.q + 64 * pair + 32, second);
  }
  for (int sub = 0; sub < 8; ++sub) {
    uint8_t scale, min;
    nibble::kernels::detail::q4_k_scale_min(sub, block.scales, &scale, &min);
    set_chunk_scales(out, sub, scale, scale);
    out.group_mins[2 * sub] = out.group_mins[2 * sub + 1] = min;
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(out.group_offsets), _mm256_setzero_si256());
  out.d = half_to_float(block.d);
  out.dmin = half_to_float(block.dmin);
}

inline void unpack(const BlockQ4_K& block, UnpackedKBlock& out) { unpack_q4_k_or_q5_k(block, nullptr, out); }
inline void unpack(const BlockQ5_K& block, UnpackedKBlock& out) { unpack_q4_k_or_q5_k(block, block.qh, out); }

inline void unpack(const BlockQ6_K& block, UnpackedKBlock& out) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i low2 = _mm256_set1_epi8(0x03);
  // The top two bits of each value, already shifted to bit 4 (masking first keeps 16-bit shifts
  // from leaking across bytes).
  auto high_bits = [&](__m256i qh, int shift) {
    return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, shift), low2), 4);
  };
  for (int half = 0; half < 2; ++half) {
    const auto* ql = reinterpret_cast<const __m256i*>(block.ql + 64 * half);
    const __m256i ql0 = _mm256_loadu_si256(ql);
    const __m256i ql1 = _mm256_loadu_si256(ql + 1);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.qh + 32 * half));
    uint8_t* q = out.q + 128 * half;
    store_i8x32(q, _mm256_or_si256(_mm256_and_si256(ql0, low4), high_bits(qh, 0)));
    store_i8x32(q + 32, _mm256_or_si256(_mm256_and_si256(ql1, low4), high_bits(qh, 2)));
    store_i8x32(q + 64, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4), high_bits(qh, 4)));
    store_i8x32(q + 96, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4), high_bits(qh, 6)));
  }
  for (int chunk = 0; chunk < 8; ++chunk)
    set_chunk_scales(out, chunk, block.scales[2 * chunk], block.scales[2 * chunk + 1]);
  const __m256i scales16 =
      _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block.scales)));
  _mm256_store_si256(reinterpret_cast<__m256i*>(out.group_offsets),
                     _mm256_mullo_epi16(scales16, _mm256_set1_epi16(-32)));
  _mm256_store_si256(reinterpret_cast<__m256i*>(out.group_mins), _mm256_setzero_si256());
  out.d = half_to_float(block.d);
  out.dmin = 0.0f;
}

// Q2_K: levels 0..3 in element order (the 2-bit runs of qs shifted down), sub-block scales and mins
// from the scale nibbles.
inline void unpack(const BlockQ2_K& block, UnpackedKBlock& out) {
  const __m256i low2 = _mm256_set1_epi8(0x03);
  for (int half = 0; half < 2; ++half) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.qs + 32 * half));
    for (int j = 0; j < 4; ++j) {
      const __m256i levels = _mm256_and_si256(_mm256_srl_epi16(packed, _mm_cvtsi32_si128(2 * j)), low2);
      store_i8x32(out.q + 128 * half + 32 * j, levels);
    }
  }
  for (int chunk = 0; chunk < 8; ++chunk)
    set_chunk_scales(out, chunk, block.scales[2 * chunk] & 0xF, block.scales[2 * chunk + 1] & 0xF);
  const __m256i scales16 =
      _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block.scales)));
  _mm256_store_si256(reinterpret_cast<__m256i*>(out.group_mins), _mm256_srli_epi16(scales16, 4));
  _mm256_store_si256(reinterpret_cast<__m256i*>(out.group_offsets), _mm256_setzero_si256());
  out.d = half_to_float(block.d);
  out.dmin = half_to_float(block.dmin);
}

// Q3_K: unsigned levels 0..7 (the low 2 bits as Q2_K's, the third from hmask: element 32r + l has it
// in bit r of hmask[l]), signed sub-block scales, the −4 offset folded in as −4·scale·bsum (dmin = 0).
inline void unpack(const BlockQ3_K& block, UnpackedKBlock& out) {
  const __m256i low2 = _mm256_set1_epi8(0x03);
  const __m256i hmask = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.hmask));
  for (int half = 0; half < 2; ++half) {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block.qs + 32 * half));
    for (int j = 0; j < 4; ++j) {
      const __m256i low = _mm256_and_si256(_mm256_srl_epi16(packed, _mm_cvtsi32_si128(2 * j)), low2);
      const __m128i run = _mm_cvtsi32_si128(4 * half + j);
      const __m256i high =
          _mm256_slli_epi16(_mm256_and_si256(_mm256_srl_epi16(hmask, run), _mm256_set1_epi8(1)), 2);
      store_i8x32(out.q + 128 * half + 32 * j, _mm256_or_si256(low, high));
    }
  }
  alignas(32) int16_t scales[kQK_K / 16];
  for (int g = 0; g < kQK_K / 16; ++g)
    scales[g] = static_cast<int16_t>(nibble::kernels::q3_k_scale(block, g));
  for (int chunk = 0; chunk < 8; ++chunk)
    set_chunk_scales(out, chunk, scales[2 * chunk], scales[2 * chunk + 1]);
  _mm256_store_si256(
      reinterpret_cast<__m256i*>(out.group_offsets),
      _mm256_mullo_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(scales)), _mm256_set1_epi16(-4)));
  _mm256_store_si256(reinterpret_cast<__m256i*>(out.group_mins), _mm256_setzero_si256());
  out.d = half_to_float(block.d);
  out.dmin = 0.0f;
}

template <typename WeightBlock>
struct KQuantFamily {
  static constexpr bool kHasMins =
      !std::is_same_v<WeightBlock, BlockQ6_K> && !std::is_same_v<WeightBlock, BlockQ3_K>;

  // Only RN = 1: the unpacked block is the reuse unit.
  template <int RM, int RN>
  static void tile(const MatmulOperands& op, int64_t r0, int64_t o0) {
    static_assert(RN == 1);
    const auto* w = reinterpret_cast<const WeightBlock*>(op.w + o0 * op.w_stride);
    const BlockQ8_K* x[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) x[i] = reinterpret_cast<const BlockQ8_K*>(op.x + (r0 + i) * op.x_stride);
    __m256 acc[RM][1];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) acc[i][0] = _mm256_setzero_ps();
    UnpackedKBlock unpacked;
    const int64_t n_blocks = op.k / kQK_K;
    for (int64_t b = 0; b < n_blocks; ++b) {
      unpack(w[b], unpacked);
      const auto* offsets = reinterpret_cast<const __m256i*>(unpacked.group_offsets);
      const auto* mins = reinterpret_cast<const __m256i*>(unpacked.group_mins);
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) {
        const BlockQ8_K& xb = x[i][b];
        const __m256i bsums = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.bsums));
        __m256i scaled = _mm256_madd_epi16(bsums, _mm256_load_si256(offsets));
        NIBBLE_UNROLL
        for (int c = 0; c < 8; ++c) {
          const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(unpacked.q + 32 * c));
          const __m256i products = _mm256_maddubs_epi16(q, load_i8x32(xb.qs + 32 * c));
          const __m256i scales =
              _mm256_load_si256(reinterpret_cast<const __m256i*>(unpacked.chunk_scales[c]));
          scaled = _mm256_add_epi32(scaled, _mm256_madd_epi16(products, scales));
        }
        acc[i][0] = _mm256_fmadd_ps(_mm256_set1_ps(unpacked.d * xb.d), _mm256_cvtepi32_ps(scaled), acc[i][0]);
        if constexpr (kHasMins) {
          const __m256i min_sums = _mm256_madd_epi16(bsums, _mm256_load_si256(mins));
          acc[i][0] =
              _mm256_fnmadd_ps(_mm256_set1_ps(unpacked.dmin * xb.d), _mm256_cvtepi32_ps(min_sums), acc[i][0]);
        }
      }
    }
    store_tile<RM, 1>(op, r0, o0, acc);
  }
};

// ---- IQ4_XS weights as stored × Q8_K activations ----
//
// Each sub-block's 32 indices become signed values by a byte shuffle of llama.cpp's table (in element
// order, as unpack_nibbles gives them), dotted with the activations (dot_i8: at most 2 · 127 · 127 a
// 16-bit pair), scaled by the sub-block's scale in 32 bits; one fmadd a super-block and row.
struct IQ4_XSFamily {
  template <int RM, int RN>
  static void tile(const MatmulOperands& op, int64_t r0, int64_t o0) {
    static_assert(RN == 1);
    const auto* w = reinterpret_cast<const BlockIQ4_XS*>(op.w + o0 * op.w_stride);
    const BlockQ8_K* x[RM];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) x[i] = reinterpret_cast<const BlockQ8_K*>(op.x + (r0 + i) * op.x_stride);
    __m256 acc[RM][1];
    NIBBLE_UNROLL
    for (int i = 0; i < RM; ++i) acc[i][0] = _mm256_setzero_ps();
    const __m256i table = iq4_value_table();
    const int64_t n_blocks = op.k / kQK_K;
    for (int64_t b = 0; b < n_blocks; ++b) {
      __m256i sum[RM];
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i) sum[i] = _mm256_setzero_si256();
      for (int sub = 0; sub < 8; ++sub) {
        const __m256i values = _mm256_shuffle_epi8(table, unpack_nibbles(w[b].qs + 16 * sub));
        const __m256i scale = _mm256_set1_epi32(nibble::kernels::iq4_xs_scale(w[b], sub));
        NIBBLE_UNROLL
        for (int i = 0; i < RM; ++i) {
          const __m256i dot = dot_i8(values, load_i8x32(x[i][b].qs + 32 * sub));
          sum[i] = _mm256_add_epi32(sum[i], _mm256_mullo_epi32(dot, scale));
        }
      }
      const float w_d = half_to_float(w[b].d);
      NIBBLE_UNROLL
      for (int i = 0; i < RM; ++i)
        acc[i][0] = _mm256_fmadd_ps(_mm256_set1_ps(w_d * x[i][b].d), _mm256_cvtepi32_ps(sum[i]), acc[i][0]);
    }
    store_tile<RM, 1>(op, r0, o0, acc);
  }
};

template <typename Kernel>
void kquant_range(const MatmulOperands& op, int64_t o_begin, int64_t o_end) {
  tiled_range<Kernel, 4, 1>(op, o_begin, o_end);
}

// ---- activation quantization ----

// One block of 32 activations as llama.cpp's x86 quantize_row_q8_0 / _q8_1 convert them
// (quantize_activations: q = x · (127 / amax) rounded half to even) into qs; returns the float scale
// d = amax / 127 (before its rounding to fp16), and with kWithSum (Q8_1) stores the quants' sum in *sum.
template <bool kWithSum>
inline float quantize_block_q8(const float* xb, int8_t* qs, int32_t* sum) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps();
  NIBBLE_UNROLL
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xb + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
  }
  __m128 max4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
  max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
  const float max_scalar = _mm_cvtss_f32(max4);
  const __m256 inv_d = _mm256_set1_ps(max_scalar != 0.0f ? 127.0f / max_scalar : 0.0f);
  __m256i q[4];
  NIBBLE_UNROLL
  for (int i = 0; i < 4; ++i)
    q[i] = _mm256_cvtps_epi32(
        _mm256_round_ps(_mm256_mul_ps(v[i], inv_d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  if constexpr (kWithSum) {
    const __m256i lanes = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(lanes), _mm256_extracti128_si256(lanes, 1));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4E));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xB1));
    *sum = _mm_cvtsi128_si32(sum4);
  }
  // Pack 4×8 int32 to 32 int8; the packs work per 128-bit lane, the permute restores order.
  const __m256i packed16_lo = _mm256_packs_epi32(q[0], q[1]);
  const __m256i packed16_hi = _mm256_packs_epi32(q[2], q[3]);
  const __m256i packed8 = _mm256_packs_epi16(packed16_lo, packed16_hi);
  const __m256i ordered = _mm256_permutevar8x32_epi32(packed8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs), ordered);
  return max_scalar / 127.0f;
}

void quantize_q8_0(const float* x, void* out, int64_t k) {
  auto* blocks = static_cast<BlockQ8_0*>(out);
  for (int64_t b = 0; b < k / kQK8_0; ++b) {
    blocks[b].d =
        _cvtss_sh(quantize_block_q8<false>(x + b * kQK8_0, blocks[b].qs, nullptr), _MM_FROUND_TO_NEAREST_INT);
  }
}

// Q8_0's quants and d, and s = d · Σq rounded to fp16 from the float d (llama.cpp's quantize_row_q8_1).
void quantize_q8_1(const float* x, void* out, int64_t k) {
  auto* blocks = static_cast<BlockQ8_1*>(out);
  for (int64_t b = 0; b < k / kQK8_0; ++b) {
    int32_t sum;
    const float d = quantize_block_q8<true>(x + b * kQK8_0, blocks[b].qs, &sum);
    blocks[b].d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
    blocks[b].s = _cvtss_sh(static_cast<float>(sum) * d, _MM_FROUND_TO_NEAREST_INT);
  }
}

void q8_0_block_info(const void* x_row, Q8_0BlockInfo* info, int64_t n_blocks) {
  const auto* x = static_cast<const BlockQ8_0*>(x_row);
  const __m256i ones8 = _mm256_set1_epi8(1);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const __m256i sums = pairwise_sum_i16(_mm256_maddubs_epi16(ones8, load_i8x32(x[b].qs)));
    __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, _MM_SHUFFLE(1, 0, 3, 2)));
    sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, _MM_SHUFFLE(2, 3, 0, 1)));
    info[b] = {half_to_float(x[b].d), 8 * _mm_cvtsi128_si32(sum4)};
  }
}

void quantize_q8_k(const float* x, void* out, int64_t k) {
  auto* blocks = static_cast<BlockQ8_K*>(out);
  for (int64_t b = 0; b < k / kQK_K; ++b)
    nibble::kernels::detail::quantize_block_q8_k(x + b * kQK_K, blocks + b);
}

inline __m256 load_f16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

void f16_dot_rows(const float* q, const uint16_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                  float scale, float* scores) {
  for (int64_t r = 0; r < n_rows; ++r) {
    const uint16_t* row = rows + r * row_stride;
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load_f16x8(row + d), acc);
    float sum = hsum_ps(acc);
    for (; d < dim; ++d) sum += q[d] * _cvtsh_ss(row[d]);
    scores[r] = sum * scale;
  }
}

void f16_axpy_rows(const float* w, const uint16_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                   float* out) {
  int64_t d = 0;
  for (; d + 8 <= dim; d += 8) {  // out stays in a register across the rows
    __m256 acc = _mm256_loadu_ps(out + d);
    for (int64_t r = 0; r < n_rows; ++r)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(w[r]), load_f16x8(rows + r * row_stride + d), acc);
    _mm256_storeu_ps(out + d, acc);
  }
  for (; d < dim; ++d) {
    float sum = out[d];
    for (int64_t r = 0; r < n_rows; ++r) sum += w[r] * _cvtsh_ss(rows[r * row_stride + d]);
    out[d] = sum;
  }
}

void q8_0_axpy_rows(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                    float* out) {
  for (int64_t b = 0; b < dim / kQK8_0; ++b) {  // a block's 32 outputs stay in registers across the rows
    float* o = out + b * kQK8_0;
    __m256 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_loadu_ps(o + 8 * j);
    for (int64_t r = 0; r < n_rows; ++r) {
      const auto& block = reinterpret_cast<const BlockQ8_0*>(rows + r * row_stride)[b];
      const __m256 scale = _mm256_set1_ps(_cvtsh_ss(block.d));
      const __m256 weight = _mm256_set1_ps(w[r]);
      for (int j = 0; j < 4; ++j) {
        const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(block.qs + 8 * j));
        const __m256 values = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
        acc[j] = _mm256_fmadd_ps(weight, values, acc[j]);
      }
    }
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + 8 * j, acc[j]);
  }
}

// A block of 32's levels as bytes: *first elements 0..15 (the low nibbles of qs), *second 16..31 (the
// high nibbles); a fifth bit j of qh (Q5_0 / Q5_1) adds 16 to element j.
template <typename Block>
inline void block32_level_bytes(const Block& block, __m128i* first, __m128i* second) {
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block.qs));
  *first = _mm_and_si128(qs, low_nibbles);
  *second = _mm_and_si128(_mm_srli_epi16(qs, 4), low_nibbles);
  if constexpr (requires { block.qh; }) {
    const __m128i bit_of_byte = _mm_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
    uint32_t qh;
    std::memcpy(&qh, block.qh, sizeof(qh));
    const __m128i bytes = _mm_cvtsi32_si128(static_cast<int>(qh));
    const auto fifth = [&](int byte0, int byte1) {  // byte k of the result: bit k of qh's bytes
      const __m128i spread =
          _mm_shuffle_epi8(bytes, _mm_set_epi8(byte1, byte1, byte1, byte1, byte1, byte1, byte1, byte1, byte0,
                                               byte0, byte0, byte0, byte0, byte0, byte0, byte0));
      return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(spread, bit_of_byte), bit_of_byte),
                           _mm_set1_epi8(16));
    };
    *first = _mm_or_si128(*first, fifth(0, 1));
    *second = _mm_or_si128(*second, fifth(2, 3));
  }
}

// Q4_0 / Q5_0 / IQ4_NL / Q4_1 / Q5_1 rows. The symmetric types' levels made signed values (level - 8,
// level - 16, or the IQ4 table's by a byte shuffle): out += w · (d · value), d · value exact in float. With
// a minimum (Q4_1 / Q5_1): out += (w · d) · level + w · m.
template <typename Block>
void block32_axpy_rows(const float* w, const uint8_t* rows, int64_t row_stride, int64_t n_rows, int64_t dim,
                       float* out) {
  constexpr bool kMin = requires(const Block& b) { b.m; };
  const __m128i iq4_values = _mm_loadu_si128(reinterpret_cast<const __m128i*>(nibble::kernels::kIQ4Values));
  const __m128i zero_level = _mm_set1_epi8(std::is_same_v<Block, BlockQ5_0> ? 16 : 8);
  for (int64_t b = 0; b < dim / kQK4_0; ++b) {
    float* o = out + b * kQK4_0;
    __m256 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = _mm256_loadu_ps(o + 8 * j);
    for (int64_t r = 0; r < n_rows; ++r) {
      const Block& block = reinterpret_cast<const Block*>(rows + r * row_stride)[b];
      __m128i first, second;
      block32_level_bytes(block, &first, &second);
      if constexpr (std::is_same_v<Block, BlockIQ4_NL>) {
        first = _mm_shuffle_epi8(iq4_values, first);
        second = _mm_shuffle_epi8(iq4_values, second);
      } else if constexpr (!kMin) {
        first = _mm_sub_epi8(first, zero_level);
        second = _mm_sub_epi8(second, zero_level);
      }
      const __m128i parts[4] = {first, _mm_srli_si128(first, 8), second, _mm_srli_si128(second, 8)};
      if constexpr (kMin) {
        const __m256 scale = _mm256_set1_ps(w[r] * _cvtsh_ss(block.d));
        const __m256 offset = _mm256_set1_ps(w[r] * _cvtsh_ss(block.m));
        for (int j = 0; j < 4; ++j) {
          const __m256 levels = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]));
          acc[j] = _mm256_fmadd_ps(scale, levels, _mm256_add_ps(acc[j], offset));
        }
      } else {
        const __m256 scale = _mm256_set1_ps(_cvtsh_ss(block.d));
        const __m256 weight = _mm256_set1_ps(w[r]);
        for (int j = 0; j < 4; ++j) {
          const __m256 values = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[j])));
          acc[j] = _mm256_fmadd_ps(weight, values, acc[j]);
        }
      }
    }
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + 8 * j, acc[j]);
  }
}

void round_to_f16(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(x + i,
                     _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT)));
  for (; i < n; ++i) x[i] = _cvtsh_ss(_cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT));
}

// e^x for x <= 0 (softmax arguments), 8 lanes: Cephes' expf (range reduction by ln 2 in two parts,
// degree-6 polynomial, about 1 ulp); below -87.3 the result is 0.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i scale =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(y, _mm256_castsi256_ps(scale)));
}

template <bool kRoundToF16>
void softmax_rows(float* scores, int64_t n) {
  int64_t i = 0;
  __m256 max_v = _mm256_set1_ps(scores[0]);
  for (; i + 8 <= n; i += 8) max_v = _mm256_max_ps(max_v, _mm256_loadu_ps(scores + i));
  float max_score = hmax_ps(max_v);
  for (; i < n; ++i) max_score = scores[i] > max_score ? scores[i] : max_score;
  const __m256 max_b = _mm256_set1_ps(max_score);
  __m256 sum_v = _mm256_setzero_ps();
  const int64_t n_vec = n / 8 * 8;
  for (i = 0; i < n_vec; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + i), max_b));
    _mm256_storeu_ps(scores + i, e);
    sum_v = _mm256_add_ps(sum_v, e);
  }
  if (i < n) {  // the tail through a padded vector, so that it sees the same exp
    alignas(32) float tail[8];
    for (int64_t j = 0; j < 8; ++j) tail[j] = i + j < n ? scores[i + j] - max_score : -100.0f;
    const __m256 e = exp_nonpositive(_mm256_load_ps(tail));
    _mm256_store_ps(tail, e);
    for (int64_t j = 0; i + j < n; ++j) scores[i + j] = tail[j];
    sum_v = _mm256_add_ps(sum_v, e);  // padded lanes add exactly 0 (below the underflow bound)
  }
  const __m256 inv = _mm256_set1_ps(1.0f / hsum_ps(sum_v));
  for (i = 0; i < n_vec; i += 8) {
    const __m256 prob = _mm256_mul_ps(_mm256_loadu_ps(scores + i), inv);
    _mm256_storeu_ps(scores + i,
                     kRoundToF16 ? _mm256_cvtph_ps(_mm256_cvtps_ph(prob, _MM_FROUND_TO_NEAREST_INT)) : prob);
  }
  for (; i < n; ++i) {
    const float prob = scores[i] * _mm_cvtss_f32(_mm256_castps256_ps128(inv));
    scores[i] = kRoundToF16 ? _cvtsh_ss(_cvtss_sh(prob, _MM_FROUND_TO_NEAREST_INT)) : prob;
  }
}

void softmax_to_f16(float* scores, int64_t n) { softmax_rows<true>(scores, n); }
void softmax_f32(float* scores, int64_t n) { softmax_rows<false>(scores, n); }

// The table every x86 ISA file registers: the same kernels, compiled with that file's flags.
nibble::kernels::detail::IsaKernels make_x86_kernels(const char* isa_name) {
  return nibble::kernels::detail::IsaKernels{
      .name = isa_name,
#ifdef __AVX512F__
      .f32 = matmul_range_512<FloatFamily512<FloatWeight::f32>>,
      .f16 = matmul_range_512<FloatFamily512<FloatWeight::f16>>,
      .bf16 = matmul_range_512<FloatFamily512<FloatWeight::bf16>>,
#else
      .f32 = matmul_range<FloatFamily<FloatWeight::f32>>,
      .f16 = matmul_range<FloatFamily<FloatWeight::f16>>,
      .bf16 = matmul_range<FloatFamily<FloatWeight::bf16>>,
#endif
      .q4_0 = matmul_range<Block32Family<BlockQ4_0>>,
      .q4_1 = matmul_range<Block32Family<BlockQ4_1>>,
      .q5_0 = matmul_range<Block32Family<BlockQ5_0>>,
      .q5_1 = matmul_range<Block32Family<BlockQ5_1>>,
      .q8_0 = matmul_range<Block32Family<BlockQ8_0>>,
      .q2_k = kquant_range<KQuantFamily<BlockQ2_K>>,
      .q3_k = kquant_range<KQuantFamily<BlockQ3_K>>,
      .q4_k = kquant_range<KQuantFamily<BlockQ4_K>>,
      .q5_k = kquant_range<KQuantFamily<BlockQ5_K>>,
      .q6_k = kquant_range<KQuantFamily<BlockQ6_K>>,
      .iq4_nl = matmul_range<Block32Family<BlockIQ4_NL>>,
      .iq4_xs = kquant_range<IQ4_XSFamily>,
      .q4_0_packed = packed_range<PackedQ4_0>,
      .q8_0_packed = packed_range<PackedQ8_0>,
      .q4_1_packed = packed_range<PackedQ4_1OrQ5<DType::Q4_1>>,
      .q5_0_packed = packed_range<PackedQ4_1OrQ5<DType::Q5_0>>,
      .q5_1_packed = packed_range<PackedQ4_1OrQ5<DType::Q5_1>>,
      .q2_k_packed = packed_range<PackedQ2_K>,
      .q3_k_packed = packed_range<PackedQ3_K>,
      .q4_k_packed = packed_range<PackedQ4_K>,
      .q5_k_packed = packed_range<PackedQ5_K>,
      .q6_k_packed = packed_range<PackedQ6_K>,
      .iq4_nl_packed = packed_range<PackedIQ4_NL>,
      .iq4_xs_packed = packed_range<PackedIQ4_XS>,
      .read_only = nibble::kernels::detail::read_only_range,
      .quantize_q8_0 = quantize_q8_0,
      .quantize_q8_1 = quantize_q8_1,
      .quantize_q8_k = quantize_q8_k,
      .q8_0_block_info = q8_0_block_info,
      .f16_dot_rows = f16_dot_rows,
      .f16_axpy_rows = f16_axpy_rows,
      .q8_0_axpy_rows = q8_0_axpy_rows,
      .q4_1_axpy_rows = block32_axpy_rows<BlockQ4_1>,
      .q5_1_axpy_rows = block32_axpy_rows<BlockQ5_1>,
      .q4_0_axpy_rows = block32_axpy_rows<BlockQ4_0>,
      .q5_0_axpy_rows = block32_axpy_rows<BlockQ5_0>,
      .iq4_nl_axpy_rows = block32_axpy_rows<BlockIQ4_NL>,
      .round_to_f16 = round_to_f16,
      .softmax_to_f16 = softmax_to_f16,
      .softmax = softmax_f32,
  };
}

}  // namespace
