#pragma once
// 4-bit Hugging Face checkpoints as model hubs ship them: GPTQ (AutoGPTQ / GPTQModel / optimum) and
// AWQ (AutoAWQ, "gemm" layout). config.json names the scheme in `quantization_config`; every
// quantized linear layer `<prefix>` (e.g. model.layers.0.self_attn.q_proj, weight [n, k] as
// y = x · Wᵀ) is stored as packed integers instead of `<prefix>.weight`:
//
//   GPTQ  <prefix>.qweight  I32 [k/8, n]        q of input j, output c in row j/8, bits 4(j%8)..+3
//         <prefix>.qzeros   I32 [groups, n/8]   zero of output c in column c/8, bits 4(c%8)..+3;
//                                               checkpoint_format "gptq" (v1) stores zero − 1,
//                                               "gptq_v2" the zero itself
//         <prefix>.scales   F16 [groups, n]
//         <prefix>.g_idx    I32 [k]             the group of each input column (optional: j / group
//                                               when absent); with act-order (desc_act) the groups
//                                               are runs of a permutation, so not monotonic
//   AWQ   <prefix>.qweight  I32 [k, n/8]        outputs 8c + [0, 2, 4, 6, 1, 3, 5, 7][i] of input j
//                                               in bits 4i..4i+3 of column c (AWQ's interleave)
//         <prefix>.qzeros   I32 [groups, n/8]   same order, zeros as they are
//         <prefix>.scales   F16 [groups, n]     (groups of consecutive inputs; no g_idx)
//
// with groups = ceil(k / group_size) (group_size -1: one group, per-channel), and the weight
//   w[c][j] = (q[j][c] − z[g(j)][c]) · s[g(j)][c].
//
// Nibble's CPU matmul reads no group-wise INT4 type, so at load each matrix becomes the cheapest
// type that its kernels read and that holds these values (see to_matmul_type):
//   Q4_0  bit-exact: when k is a multiple of 32, every aligned run of 32 inputs lies in one group,
//         every zero is 8 and every scale is an fp16 value (symmetric GPTQ without act-order):
//         Q4_0 decodes (q − 8) · d with fp16 d, the same float products.
//   Q8_0  bit-exact, 8.5 bits a weight: the same layout with any zeros (asymmetric GPTQ, AWQ):
//         q − z in [−16, 15] fits the int8 and d = s.
//   Act-order (g_idx that mixes groups inside a run of 32): the columns are stored sorted by group,
//         which makes each group a run of whole blocks, and then as above (Q4_0 or Q8_0, exact);
//         MatmulMatrix::input_order says how to gather the input.
//   F16   otherwise (k not a multiple of 32, groups that are not multiples of 32 columns, scales
//         fp16 cannot hold): (q − z) · s rounded to fp16, a relative error of at most 2⁻¹¹ per
//         weight.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"
#include "model/hf_checkpoint.hpp"
#include "model/safetensors.hpp"

namespace nibble::model {

enum class HfQuantMethod { gptq, awq };

// config.json's quantization_config, checked.
struct HfQuantization {
  HfQuantMethod method = HfQuantMethod::gptq;
  int64_t bits = 4;
  int64_t group_size = 128;     // -1: per-channel (one group per output)
  bool desc_act = false;        // GPTQ act-order (g_idx may permute the groups)
  bool sym = true;              // as declared; the loader checks the zeros themselves
  bool zeros_minus_one = true;  // GPTQ v1 (checkpoint_format "gptq"): qzeros hold zero − 1

  // The number of groups of a row of k inputs: ceil(k / group_size), 1 per-channel.
  int64_t groups(int64_t k) const;
  const char* method_name() const { return method == HfQuantMethod::gptq ? "gptq" : "awq"; }
};

// Reads `quantization_config` of the checkpoint's config.json: nullopt when absent (a float
// checkpoint). Throws HfCheckpointError naming the key for an unknown quant_method, bits other than
// 4, a group size that is neither -1 nor positive, an unknown checkpoint_format (GPTQ) or version
// (AWQ: only "gemm"), or AWQ without zero points.
std::optional<HfQuantization> read_hf_quantization(const HfCheckpoint& checkpoint);

// One quantized linear layer unpacked (row-major by output, the layout of the weight it stands for).
struct Int4Linear {
  int64_t n_out = 0, k = 0, groups = 0;
  std::vector<uint8_t> levels;  // [n_out, k] q, 0..15
  std::vector<int32_t> group;   // [k] group of each input column, 0..groups-1
  std::vector<uint8_t> zeros;   // [n_out, groups] z, 0..16 (GPTQ v1 can say 16)
  std::vector<float> scales;    // [n_out, groups] s

  // w[r][j] = (q − z) · s in float.
  float value(int64_t r, int64_t j) const {
    const size_t g = static_cast<size_t>(r * groups + group[static_cast<size_t>(j)]);
    return static_cast<float>(static_cast<int>(levels[static_cast<size_t>(r * k + j)]) - zeros[g]) *
           scales[g];
  }
};

// Unpacks and validates `<prefix>.{qweight,qzeros,scales[,g_idx]}` for a [n_out, k] weight: dtypes
// (I32; scales F16, BF16 or F32), shapes against n_out and k (which must be multiples of 8 where
// they are packed), g_idx entries inside the groups. Throws HfCheckpointError naming the file, the
// tensor and the problem.
Int4Linear read_quantized_linear(const HfCheckpoint& checkpoint, const HfQuantization& quantization,
                                 const std::string& prefix, int64_t n_out, int64_t k);

// The matrix in a type the CPU matmul reads (see the header comment): data is [n_out,
// row_bytes(type, k)] bytes.
struct MatmulMatrix {
  kernels::DType type = kernels::DType::F16;
  std::vector<uint8_t> data;
  // Empty, or for act-order layers whose groups are not runs of 32: the columns sorted by group, so
  // column c of data multiplies input input_order[c]: [k].
  std::vector<int32_t> input_order;
};
MatmulMatrix to_matmul_type(const Int4Linear& linear);

// The GPTQ tensors of one linear layer (qweight, qzeros, scales, g_idx; named `<prefix>.…`), in
// the v1 layout (zeros − 1) when zeros_minus_one, else v2. Throws std::invalid_argument when n_out
// or k is not a multiple of 8, or a zero cannot be stored (0 in v1, 16 in v2).
std::vector<SafetensorsTensorData> pack_gptq(const Int4Linear& linear, const std::string& prefix,
                                             bool zeros_minus_one);

}  // namespace nibble::model
