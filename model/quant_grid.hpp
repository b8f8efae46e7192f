#pragma once
// The grids calibrated quantizers (GPTQ, AWQ) round a weight matrix onto, and the RTN baseline
// on the same grids. A grid fixes which columns of a row share parameters (a group) and how those
// parameters are fitted and stored:
//   q4_0       GGUF Q4_0: groups of 32, symmetric, fp16 scale d = (signed max) / -8, levels 0..15
//              meaning (q - 8) * d; rounding as GGML's quantize_row_q4_0_ref.
//   q4_k       GGUF Q4_K: super-blocks of 256 with fp16 d and dmin; 8 sub-blocks (groups) of 32 with
//              6-bit scale sc and offset m; levels 0..15 meaning d * sc * q - dmin * m. The
//              super-block's d and dmin are fitted first (from all 8 sub-blocks, llama.cpp's rule);
//              each sub-block's sc and m can then be refitted on other values against that fixed
//              d and dmin, which is how GPTQ fits each group on the error-updated weights.
//   q5_k       GGUF Q5_K: q4_k with levels 0..31 (and llama.cpp's Q5_K sub-block fit).
//   q2_k       GGUF Q2_K: q4_k's scheme on 16 sub-blocks (groups) of 16 with 4-bit scales and offsets
//              and levels 0..3 (llama.cpp's Q2_K sub-block fit).
//   q6_k       GGUF Q6_K: super-blocks of 256 with fp16 d; 16 sub-blocks (groups) of 16 with an int8 scale
//              s; levels 0..63 meaning d * s * (q - 32) (llama.cpp's make_qx_quants fit; d maps the
//              largest-magnitude sub-block scale to -128).
//   q3_k       GGUF Q3_K: super-blocks of 256 with fp16 d; 16 sub-blocks (groups) of 16 with a signed
//              6-bit scale s; levels 0..7 meaning d * s * (q - 4). d comes from all 16 sub-blocks'
//              fits (llama.cpp's make_q3_quants rule), each sub-block's s is then refitted against it.
//   int4_asym  GPTQ checkpoints' asymmetric INT4: groups of 32, 64 or 128, fp16 scale and a 4-bit
//              zero point, levels 0..15 meaning (q - zero) * scale (the reference Quantizer with
//              sym=False, the range always including 0).
// Dequantized values are computed with the same float expressions as kernels/quantize.cpp, so a
// matrix's stored blocks decode bit-exactly to the values the quantizer worked with.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"

namespace nibble::model {

enum class GridType { q4_0, q2_k, q3_k, q4_k, q5_k, q6_k, int4_asym };

struct QuantGrid {
  GridType type = GridType::q4_0;
  int64_t group_size = 32;  // columns sharing one scale: 32 for q4_0 and q4_k (a sub-block)

  static QuantGrid q4_0() { return {GridType::q4_0, kernels::kQK4_0}; }
  static QuantGrid q4_k() { return {GridType::q4_k, 32}; }
  static QuantGrid q5_k() { return {GridType::q5_k, 32}; }
  static QuantGrid q3_k() { return {GridType::q3_k, 16}; }
  static QuantGrid q2_k() { return {GridType::q2_k, 16}; }
  static QuantGrid q6_k() { return {GridType::q6_k, 16}; }
  // group_size: 32, 64 or 128 (std::invalid_argument otherwise).
  static QuantGrid int4_asym(int64_t group_size);

  // q2_k ... q5_k: super-blocks of 256 with 4- or 6-bit sub-block scales (and offsets).
  bool k_quant() const {
    return type == GridType::q2_k || type == GridType::q3_k || type == GridType::q4_k ||
           type == GridType::q5_k || type == GridType::q6_k;
  }
  // Columns whose parameters are fitted together first: 256 for a K-quant's super-block, else the group.
  int64_t super_block() const { return k_quant() ? kernels::kQK_K : group_size; }
  // The GGUF tensor type of the blocks (Q4_0, Q2_K ... Q6_K); int4_asym has none and throws.
  kernels::DType gguf_type() const;
  // The grid whose blocks are GGUF `type` (Q4_0, Q2_K ... Q6_K), or nullopt.
  static std::optional<QuantGrid> for_gguf_type(kernels::DType type);
  std::string name() const;  // "q4_0", "q4_k", "int4_asym/g128"
};

// Throws std::invalid_argument unless a [n_out, k] matrix fits the grid (k a positive multiple of
// super_block(), n_out positive), naming `what`.
void check_grid_shape(const QuantGrid& grid, int64_t n_out, int64_t k, const std::string& what);

// A matrix rounded onto a grid.
struct QuantizedMatrix {
  QuantGrid grid;
  int64_t n_out = 0, k = 0;
  std::vector<float> dequantized;  // [n_out, k]: exactly what the stored form decodes to
  // q4_0 / q4_k: GGUF blocks, [n_out, row_bytes(gguf_type, k)] bytes.
  std::vector<uint8_t> blocks;
  // int4_asym: levels [n_out, k] (0..15), scales [n_out, k / group] (fp16-representable),
  // zeros [n_out, k / group] (0..15).
  std::vector<uint8_t> levels;
  std::vector<float> scales;
  std::vector<uint8_t> zeros;
};

// Rounds one row of a matrix onto a grid, column by column, with group parameters fitted on demand:
// fit_super_block, then fit_group for each group, then quantize each of the group's columns (in any
// order). RTN fits on the original values; GPTQ fits on the error-updated ones.
class RowQuantizer {
 public:
  RowQuantizer(QuantGrid grid, int64_t k);
  // values: [super_block()] the row's values at the super-block containing column `col`.
  void fit_super_block(int64_t col, const float* values);
  // values: [group_size] the row's values at the group containing column `col`. For q4_k and q5_k the
  // super-block must have been fitted.
  void fit_group(int64_t col, const float* values);
  // Rounds w at column col with its group's parameters; returns the dequantized value.
  float quantize(int64_t col, float w);
  // Writes the row (every column quantized) into row `row` of out (sized by the caller).
  void store(QuantizedMatrix& out, int64_t row) const;

 private:
  struct Group {
    float scale = 0;        // q4_0: d as stored (fp16); int4: scale (fp16); q4_k / q5_k: d * sc; q3_k: d * s
    float rounding = 0;     // q4_0: 1 / unrounded d (GGML rounds with it); int4: 1 / scale
    float offset = 0;       // q4_k / q5_k: dmin * m
    uint8_t zero = 0;       // int4: zero point
    uint8_t sc = 0, m = 0;  // q4_k / q5_k: 6-bit scale and offset; q3_k: s + 32 in sc; q6_k: s's bits
  };
  // The grid's sub-block fit (llama.cpp's Q2_K, Q4_K or Q5_K rule) and its largest level (3, 15 or 31).
  float fit_sub_block(const float* values, float* offset) const;
  int max_level() const;
  int max_scale_level() const;  // the sub-block scales' and offsets' largest level: 15 (Q2_K) or 63
  template <typename Block>
  void store_k_quant(QuantizedMatrix& out, int64_t row) const;
  void store_q3_k(QuantizedMatrix& out, int64_t row) const;
  void store_q2_k(QuantizedMatrix& out, int64_t row) const;
  void store_q6_k(QuantizedMatrix& out, int64_t row) const;

  QuantGrid grid_;
  int64_t k_;
  std::vector<Group> groups_;         // [k / group_size]
  std::vector<uint16_t> super_d_;     // q4_k / q5_k: [k / 256] fp16 d
  std::vector<uint16_t> super_dmin_;  // q4_k / q5_k: [k / 256] fp16 dmin
  std::vector<float> super_scale_;    // K-quants: [k / 256] inverse steps of the 6-bit scales
  std::vector<float> super_offset_;   // q4_k / q5_k: [k / 256] and of the 6-bit offsets
  std::vector<uint8_t> levels_;       // [k]
};

// Round-to-nearest on the grid. w: [n_out, k]. For q4_0, q3_k, q4_k and q5_k the blocks equal
// kernels::quantize_row's (GGML's reference quantizers), sub-blocks with a zero scale aside.
QuantizedMatrix rtn_quantize(const float* w, int64_t n_out, int64_t k, const QuantGrid& grid);

// Allocates out's storage for a [n_out, k] matrix on grid.
void size_quantized(QuantizedMatrix& out, const QuantGrid& grid, int64_t n_out, int64_t k);

}  // namespace nibble::model
