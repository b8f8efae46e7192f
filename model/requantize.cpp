#include "model/requantize.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

#include "kernels/quantize.hpp"
#include "model/llama_config.hpp"
#include "model/random_model.hpp"

namespace nibble::model {

namespace {

bool is_head_tensor(const std::string& name) {
  return name == "token_embd.weight" || name == "output.weight";
}

// llama-quantize's record of the importance matrix it used.
void set_imatrix_metadata(GgufWriter& out, const ImportanceMatrix& imatrix) {
  if (!imatrix.file.empty()) out.set_string("quantize.imatrix.file", imatrix.file);
  if (!imatrix.datasets.empty()) out.set_string("quantize.imatrix.dataset", imatrix.datasets.front());
  out.set_int32("quantize.imatrix.entries_count", static_cast<int32_t>(imatrix.entries.size()));
  out.set_int32("quantize.imatrix.chunks_count", static_cast<int32_t>(imatrix.chunk_count));
}

// Every core: rows quantize independently (llama-quantize also uses them all by default).
int quantize_threads() { return std::max(1, static_cast<int>(std::thread::hardware_concurrency())); }

// t converted to `target` on the pool, with its importance row when the matrix has an entry.
std::vector<uint8_t> convert_with_importance(const GgufFile& in, const GgufTensorInfo& t,
                                             kernels::DType target, const ImportanceMatrix* imatrix,
                                             kernels::ThreadPool& pool) {
  const std::optional<std::vector<float>> row =
      imatrix != nullptr && t.dims.size() == 2 && kernels::type_info(target).block_elems > 1
          ? imatrix->importance(t.name)
          : std::nullopt;
  std::vector<uint8_t> out = convert_tensor(in, t, target, row ? &*row : nullptr, &pool);
  in.release_pages(t);  // read once: a float input larger than memory passes through
  return out;
}

}  // namespace

kernels::DType requantized_type(const GgufTensorInfo& tensor, kernels::DType matrix_type, bool pure) {
  if (tensor.dims.size() == 1) return kernels::DType::F32;
  if (tensor.dims.size() != 2) return tensor.type;
  using kernels::DType;
  const bool low_bit = matrix_type == DType::Q4_0 || matrix_type == DType::Q4_1 ||
                       matrix_type == DType::Q5_0 || matrix_type == DType::Q5_1 ||
                       matrix_type == DType::Q2_K || matrix_type == DType::Q3_K ||
                       matrix_type == DType::Q4_K || matrix_type == DType::Q5_K;
  if (!pure && low_bit && is_head_tensor(tensor.name)) return DType::Q8_0;
  return matrix_type;
}

std::vector<uint8_t> convert_tensor(const GgufFile& in, const GgufTensorInfo& t, kernels::DType target,
                                    const std::vector<float>* importance, kernels::ThreadPool* pool) {
  const uint8_t* src = in.tensor_data(t);
  // Already of the target type: copied, importance or not, as llama-quantize copies such a tensor.
  if (target == t.type) return std::vector<uint8_t>(src, src + t.size_bytes);
  const int64_t n = t.row_elements();
  const int64_t block = kernels::type_info(target).block_elems;
  if (n % block != 0) {
    throw GgufError(in.path() + ": tensor '" + t.name + "' has row length " + std::to_string(n) +
                    ", not a multiple of the " + kernels::type_name(target) + " block size " +
                    std::to_string(block) + "; cannot convert it to " + kernels::type_name(target));
  }
  if (importance != nullptr && static_cast<int64_t>(importance->size()) != n) {
    throw std::invalid_argument("the importance matrix's entry for '" + t.name + "' has " +
                                std::to_string(importance->size()) + " values; the tensor's rows have " +
                                std::to_string(n));
  }
  const int64_t src_row = kernels::row_bytes(t.type, n);
  const int64_t dst_row = kernels::row_bytes(target, n);
  const int64_t rows = t.rows();
  std::vector<uint8_t> data(static_cast<size_t>(dst_row * rows));
  // Rows are independent: split across the pool; the first failing status is reported after the join.
  std::atomic<int> dequantize_failed{0};
  std::atomic<int> quantize_status{static_cast<int>(kernels::Status::ok)};
  auto convert_rows = [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) {
      if (kernels::dequantize_row(t.type, src + r * src_row, row.data(), n) != kernels::Status::ok) {
        dequantize_failed = 1;
        return;
      }
      const kernels::Status status = kernels::quantize_row_weighted(
          target, row.data(), importance != nullptr ? importance->data() : nullptr, data.data() + r * dst_row,
          n);
      if (status != kernels::Status::ok) {
        quantize_status = static_cast<int>(status);
        return;
      }
    }
  };
  if (pool != nullptr && pool->size() > 1 && rows > 1) {
    pool->parallel_for(rows, 1, convert_rows);
  } else {
    convert_rows(0, rows);
  }
  if (dequantize_failed != 0) {
    throw GgufError(in.path() + ": cannot dequantize tensor '" + t.name + "' of type " +
                    kernels::type_name(t.type));
  }
  const auto status = static_cast<kernels::Status>(quantize_status.load());
  if (status == kernels::Status::unsupported_type && importance != nullptr) {
    throw std::invalid_argument("cannot quantize tensor '" + t.name + "' to " + kernels::type_name(target) +
                                " with an importance matrix (Nibble has no weighted quantizer for it)");
  }
  if (status != kernels::Status::ok) {
    throw GgufError(in.path() + ": cannot quantize tensor '" + t.name + "' to " + kernels::type_name(target));
  }
  return data;
}

std::optional<LlamaCppMix> parse_llama_cpp_mix(const std::string& name) {
  if (name == "q3_k_s") return LlamaCppMix::q3_k_s;
  if (name == "q3_k_m") return LlamaCppMix::q3_k_m;
  if (name == "q3_k_l") return LlamaCppMix::q3_k_l;
  if (name == "q4_k_s") return LlamaCppMix::q4_k_s;
  if (name == "q4_k_m") return LlamaCppMix::q4_k_m;
  if (name == "q5_k_s") return LlamaCppMix::q5_k_s;
  if (name == "q5_k_m") return LlamaCppMix::q5_k_m;
  if (name == "q2_k") return LlamaCppMix::q2_k;
  if (name == "iq4_nl") return LlamaCppMix::iq4_nl;
  if (name == "iq4_xs") return LlamaCppMix::iq4_xs;
  return std::nullopt;
}

namespace {

// llama.cpp's use_more_bits: the first and last eighth of the layers and every third in between.
bool use_more_bits(int64_t i_layer, int64_t n_layers) {
  return i_layer < n_layers / 8 || i_layer >= 7 * n_layers / 8 || (i_layer - n_layers / 8) % 3 == 2;
}

}  // namespace

uint32_t llama_cpp_mix_file_type(LlamaCppMix mix) {
  switch (mix) {
    case LlamaCppMix::q2_k:
      return 10;  // LLAMA_FTYPE_MOSTLY_Q2_K
    case LlamaCppMix::iq4_nl:
      return 25;  // LLAMA_FTYPE_MOSTLY_IQ4_NL
    case LlamaCppMix::iq4_xs:
      return 30;  // LLAMA_FTYPE_MOSTLY_IQ4_XS
    case LlamaCppMix::q3_k_s:
      return 11;  // LLAMA_FTYPE_MOSTLY_Q3_K_S
    case LlamaCppMix::q3_k_m:
      return 12;
    case LlamaCppMix::q3_k_l:
      return 13;
    case LlamaCppMix::q4_k_s:
      return 14;  // LLAMA_FTYPE_MOSTLY_Q4_K_S
    case LlamaCppMix::q4_k_m:
      return 15;
    case LlamaCppMix::q5_k_s:
      return 16;
    case LlamaCppMix::q5_k_m:
      return 17;
  }
  return 15;
}

kernels::DType llama_cpp_mix_default_type(LlamaCppMix mix) {
  switch (mix) {
    case LlamaCppMix::q2_k:
      return kernels::DType::Q2_K;
    case LlamaCppMix::iq4_nl:
      return kernels::DType::IQ4_NL;
    case LlamaCppMix::iq4_xs:
      return kernels::DType::IQ4_XS;
    case LlamaCppMix::q3_k_s:
    case LlamaCppMix::q3_k_m:
    case LlamaCppMix::q3_k_l:
      return kernels::DType::Q3_K;
    case LlamaCppMix::q4_k_s:
    case LlamaCppMix::q4_k_m:
      return kernels::DType::Q4_K;
    case LlamaCppMix::q5_k_s:
    case LlamaCppMix::q5_k_m:
      return kernels::DType::Q5_K;
  }
  return kernels::DType::Q4_K;
}

std::vector<kernels::DType> llama_cpp_mix_types(const GgufFile& in, LlamaCppMix mix, bool has_imatrix) {
  using kernels::DType;
  using enum LlamaCppMix;
  const bool medium = mix == q4_k_m || mix == q5_k_m;
  const bool iq4 = mix == iq4_nl || mix == iq4_xs;
  const DType default_type = llama_cpp_mix_default_type(mix);
  const LlamaConfig config = LlamaConfig::from_gguf(in);
  // llama.cpp's LLM_TYPE_70B: 80 layers with grouped KV heads.
  const bool llama_70b = config.n_layer == 80 && config.n_head != config.n_head_kv;
  const bool gqa_4 =
      config.n_head_kv > 0 && config.n_head / config.n_head_kv >= 4;  // llama.cpp's n_gqa() >= 4
  const bool tied = in.find_tensor("output.weight") == nullptr;
  int64_t n_attn_v = 0, n_ffn_down = 0;
  for (const GgufTensorInfo& t : in.tensors()) {
    n_attn_v += t.name.ends_with("attn_v.weight");
    n_ffn_down += t.name.ends_with("ffn_down.weight");
  }
  int64_t i_attn_v = 0, i_ffn_down = 0;
  std::vector<DType> types;
  for (const GgufTensorInfo& t : in.tensors()) {
    if (t.dims.size() != 2) {
      types.push_back(t.dims.size() == 1 ? DType::F32 : t.type);
      continue;
    }
    DType type = default_type;
    const bool head = t.name == "output.weight" || (tied && t.name == "token_embd.weight");
    if (head) {
      type = t.row_elements() % kernels::kQK_K != 0 ? DType::Q8_0 : DType::Q6_K;
    } else if (t.name.ends_with("attn_v.weight")) {
      if (mix == q2_k) {
        type = gqa_4 ? DType::Q4_K : DType::Q3_K;
      } else if (iq4 && gqa_4) {
        type = DType::Q5_K;
      } else if (mix == q3_k_m) {
        type = i_attn_v < 2 ? DType::Q5_K : DType::Q4_K;
      } else if (mix == q3_k_l) {
        type = DType::Q5_K;
      } else if (medium && use_more_bits(i_attn_v, n_attn_v)) {
        type = DType::Q6_K;
      } else if (mix == q4_k_s && i_attn_v < 4) {
        type = DType::Q5_K;
      }
      if (llama_70b && (type == DType::Q3_K || type == DType::Q4_K)) type = DType::Q5_K;
      ++i_attn_v;
    } else if (t.name.ends_with("ffn_down.weight")) {
      if (mix == q2_k) {
        type = DType::Q3_K;
      } else if (iq4 && i_ffn_down < n_ffn_down / 8 && !has_imatrix) {
        type = DType::Q5_K;
      } else if (mix == q3_k_m) {
        type = i_ffn_down < n_ffn_down / 16 ? DType::Q5_K : DType::Q4_K;
      } else if (mix == q3_k_l) {
        type = DType::Q5_K;
      } else if (medium && use_more_bits(i_ffn_down, n_ffn_down)) {
        type = DType::Q6_K;
      } else if (mix == q4_k_s && i_ffn_down < n_ffn_down / 8) {
        type = DType::Q5_K;
      }
      ++i_ffn_down;
    } else if (t.name.ends_with("attn_output.weight")) {
      if (mix == q2_k) type = DType::Q3_K;
      if (mix == q3_k_m) type = DType::Q4_K;
      if (mix == q3_k_l) type = DType::Q5_K;
    }
    if (t.row_elements() % kernels::type_info(type).block_elems != 0) {
      // llama.cpp's fallbacks for rows that are not a multiple of 256 (its tensor_type_fallback), and
      // F16 where even a block of 32 does not fit.
      type = type == DType::Q2_K || type == DType::Q3_K ? DType::Q4_0
             : type == DType::Q4_K                      ? DType::Q5_0
             : type == DType::Q5_K                      ? DType::Q5_1
             : type == DType::IQ4_XS                    ? DType::IQ4_NL
                                                        : DType::Q8_0;
      if (t.row_elements() % kernels::type_info(type).block_elems != 0) type = DType::F16;
    }
    types.push_back(type);
  }
  return types;
}

void requantize_gguf(const GgufFile& in, const std::string& out_path, LlamaCppMix mix,
                     const ImportanceMatrix* imatrix) {
  const std::vector<kernels::DType> types = llama_cpp_mix_types(in, mix, imatrix != nullptr);
  GgufWriter out;
  for (const auto& [key, value] : in.metadata()) out.set(key, value);
  out.set_uint32("general.file_type", llama_cpp_mix_file_type(mix));
  out.set_uint32("general.quantization_version", 2);
  if (imatrix != nullptr) set_imatrix_metadata(out, *imatrix);
  kernels::ThreadPool pool(quantize_threads());
  // Each tensor converted as the writer reaches it: one in memory at a time, as llama-quantize streams.
  for (size_t i = 0; i < in.tensors().size(); ++i) {
    const GgufTensorInfo& t = in.tensors()[i];
    const kernels::DType type = types[i];
    out.add_tensor_made(t.name, t.dims, type, [&in, &t, type, imatrix, &pool] {
      return convert_with_importance(in, t, type, imatrix, pool);
    });
  }
  out.write(out_path);
}

void requantize_gguf(const GgufFile& in, const std::string& out_path, kernels::DType matrix_type, bool pure,
                     const ImportanceMatrix* imatrix) {
  using kernels::DType;
  const bool quantized =
      matrix_type == DType::Q4_0 || matrix_type == DType::Q4_1 || matrix_type == DType::Q5_0 ||
      matrix_type == DType::Q5_1 || matrix_type == DType::Q2_K || matrix_type == DType::Q3_K ||
      matrix_type == DType::Q4_K || matrix_type == DType::Q5_K || matrix_type == DType::Q8_0;
  if (!quantized && matrix_type != DType::F16 && matrix_type != DType::F32) {
    throw std::invalid_argument(
        std::string("cannot requantize to ") + kernels::type_name(matrix_type) +
        " (expected q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q8_0, f16 or f32)");
  }
  GgufWriter out;
  for (const auto& [key, value] : in.metadata()) out.set(key, value);
  out.set_uint32("general.file_type", llama_file_type(matrix_type));
  if (quantized) out.set_uint32("general.quantization_version", 2);
  if (imatrix != nullptr) set_imatrix_metadata(out, *imatrix);
  kernels::ThreadPool pool(quantize_threads());

  for (const GgufTensorInfo& t : in.tensors()) {
    const DType target = requantized_type(t, matrix_type, pure);
    out.add_tensor_made(t.name, t.dims, target, [&in, &t, target, imatrix, &pool] {
      return convert_with_importance(in, t, target, imatrix, pool);
    });
  }
  out.write(out_path);
}

}  // namespace nibble::model
