#include "model/requantize.hpp"

#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels/quantize.hpp"
#include "model/random_model.hpp"

namespace nibble::model {

namespace {

bool is_head_tensor(const std::string& name) {
  return name == "token_embd.weight" || name == "output.weight";
}

}  // namespace

kernels::DType requantized_type(const GgufTensorInfo& tensor, kernels::DType matrix_type, bool pure) {
  if (tensor.dims.size() == 1) return kernels::DType::F32;
  if (tensor.dims.size() != 2) return tensor.type;
  const bool low_bit = matrix_type == kernels::DType::Q4_0 || matrix_type == kernels::DType::Q4_K ||
                       matrix_type == kernels::DType::Q5_K;
  if (!pure && low_bit && is_head_tensor(tensor.name)) return kernels::DType::Q8_0;
  return matrix_type;
}

std::vector<uint8_t> convert_tensor(const GgufFile& in, const GgufTensorInfo& t, kernels::DType target) {
  const uint8_t* src = in.tensor_data(t);
  if (target == t.type) return std::vector<uint8_t>(src, src + t.size_bytes);
  const int64_t n = t.row_elements();
  const int64_t block = kernels::type_info(target).block_elems;
  if (n % block != 0) {
    throw GgufError(in.path() + ": tensor '" + t.name + "' has row length " + std::to_string(n) +
                    ", not a multiple of the " + kernels::type_name(target) + " block size " +
                    std::to_string(block) + "; cannot convert it to " + kernels::type_name(target));
  }
  const int64_t src_row = kernels::row_bytes(t.type, n);
  const int64_t dst_row = kernels::row_bytes(target, n);
  const int64_t rows = t.rows();
  std::vector<uint8_t> data(static_cast<size_t>(dst_row * rows));
  std::vector<float> row(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    if (kernels::dequantize_row(t.type, src + r * src_row, row.data(), n) != kernels::Status::ok) {
      throw GgufError(in.path() + ": cannot dequantize tensor '" + t.name + "' of type " +
                      kernels::type_name(t.type));
    }
    if (kernels::quantize_row(target, row.data(), data.data() + r * dst_row, n) != kernels::Status::ok) {
      throw GgufError(in.path() + ": cannot quantize tensor '" + t.name + "' to " +
                      kernels::type_name(target));
    }
  }
  return data;
}

void requantize_gguf(const GgufFile& in, const std::string& out_path, kernels::DType matrix_type, bool pure) {
  using kernels::DType;
  if (matrix_type != DType::Q4_0 && matrix_type != DType::Q4_K && matrix_type != DType::Q5_K &&
      matrix_type != DType::Q8_0 && matrix_type != DType::F16 && matrix_type != DType::F32) {
    throw std::invalid_argument(std::string("cannot requantize to ") + kernels::type_name(matrix_type) +
                                " (expected q4_0, q4_k, q5_k, q8_0, f16 or f32)");
  }
  GgufWriter out;
  for (const auto& [key, value] : in.metadata()) out.set(key, value);
  out.set_uint32("general.file_type", llama_file_type(matrix_type));
  if (matrix_type == DType::Q4_0 || matrix_type == DType::Q4_K || matrix_type == DType::Q5_K ||
      matrix_type == DType::Q8_0)
    out.set_uint32("general.quantization_version", 2);

  for (const GgufTensorInfo& t : in.tensors()) {
    const DType target = requantized_type(t, matrix_type, pure);
    out.add_tensor(t.name, t.dims, target, convert_tensor(in, t, target));
  }
  out.write(out_path);
}

}  // namespace nibble::model
