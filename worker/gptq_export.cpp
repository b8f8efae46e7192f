#include "worker/gptq_export.hpp"

#include <stdexcept>
#include <vector>

#include "kernels/quantize.hpp"
#include "model/gptq_writer.hpp"
#include "model/llama_config.hpp"
#include "model/llama_weights.hpp"

namespace nibble::worker {

namespace {

// A GGUF matrix as floats [rows, row length].
std::vector<float> read_floats(const model::GgufFile& file, const model::GgufTensorInfo& t) {
  const int64_t n = t.row_elements();
  std::vector<float> out(static_cast<size_t>(n * t.rows()));
  const int64_t bytes = kernels::row_bytes(t.type, n);
  for (int64_t r = 0; r < t.rows(); ++r) {
    if (kernels::dequantize_row(t.type, file.tensor_data(t) + r * bytes, out.data() + r * n, n) !=
        kernels::Status::ok)
      throw model::GgufError(file.path() + ": cannot read tensor '" + t.name + "' as floats");
  }
  return out;
}

}  // namespace

std::string export_gptq_checkpoint(
    std::shared_ptr<const model::GgufFile> in, std::string_view calibration_text, const std::string& out_dir,
    const model::QuantGrid& grid, const CalibratedQuantizeOptions& options,
    const std::function<void(const std::string& tensor, const model::QuantizedMatrix& matrix)>& on_matrix) {
  if (grid.k_quant())
    throw std::invalid_argument("a GPTQ checkpoint holds the q4_0 or an int4_asym grid, not " + grid.name());
  if (options.method == QuantMethod::awq)
    throw std::invalid_argument(
        "--format gptq takes --method gptq or rtn (AWQ's folded scales are not exported)");
  if (options.grid || options.matrix_sink)
    throw std::invalid_argument("export_gptq_checkpoint sets the grid and the matrix sink itself");
  const model::GgufFile& file = *in;
  const model::LlamaConfig config = model::LlamaConfig::from_gguf(file);
  // Every matrix must fit the grid (and the writer's packing) before any work is done.
  for (int64_t l = 0; l < config.n_layer; ++l) {
    for (model::LayerMatrix m : model::kLayerMatrices) {
      const std::string name = model::layer_tensor_name(l, m);
      const model::GgufTensorInfo* t = file.find_tensor(name);
      if (t == nullptr) throw model::GgufError(file.path() + ": tensor '" + name + "' is missing");
      model::check_grid_shape(grid, t->rows(), t->row_elements(), file.path() + ": tensor '" + name + "'");
      if (t->rows() % 8 != 0) {
        throw std::invalid_argument(file.path() + ": tensor '" + name + "' has " + std::to_string(t->rows()) +
                                    " rows, not a multiple of 8 (GPTQ packs 8 outputs to an int32)");
      }
    }
  }
  // Begun now (an unwritable directory fails before any work); each matrix is written as it is quantized.
  model::GptqCheckpointWriter writer(file, grid, {options.gptq.act_order, options.gptq.percdamp}, out_dir);
  auto take = [&](const std::string& name, const model::QuantizedMatrix& q) {
    if (on_matrix) on_matrix(name, q);
    writer.add(name, q);
  };
  if (options.method == QuantMethod::rtn) {
    for (int64_t l = 0; l < config.n_layer; ++l) {
      for (model::LayerMatrix m : model::kLayerMatrices) {
        const model::GgufTensorInfo& t = *file.find_tensor(model::layer_tensor_name(l, m));
        const std::vector<float> w = read_floats(file, t);
        take(t.name, model::rtn_quantize(w.data(), t.rows(), t.row_elements(), grid));
        file.release_pages(t);  // as a calibrated run does: the input need not fit in memory
      }
    }
  } else {
    CalibratedQuantizeOptions o = options;
    o.grid = grid;
    o.matrix_sink = [&](const std::string& name, model::QuantizedMatrix&& q) {
      q.dequantized = {};  // the writer needs the levels only; keep memory at about the packed size
      take(name, q);
    };
    if (on_matrix)
      o.matrix_sink = [&](const std::string& name, model::QuantizedMatrix&& q) { take(name, q); };
    calibrated_quantize_gguf(in, calibration_text, out_dir, o);
  }
  writer.finish();
  return writer.checkpoint_format();
}

}  // namespace nibble::worker
