#pragma once
// `nibble quantize --format gptq`: a float GGUF Llama model quantized onto a 4-bit grid (GPTQ with
// calibration, as worker/calibrated_quantize does for GGUF output, or RTN) and written as a GPTQ
// checkpoint directory (model/gptq_writer.hpp: config.json, quantize_config.json,
// model.safetensors) that GPTQ loaders and Nibble itself read.
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "model/gguf.hpp"
#include "model/quant_grid.hpp"
#include "worker/calibrated_quantize.hpp"

namespace nibble::worker {

// grid: int4_asym with the user's group size (asymmetric GPTQ), or q4_0 (symmetric, groups of 32:
// the same blocks `nibble quantize --method gptq --type q4_0` writes to a GGUF). options: method gptq
// (calibration_text used, options.grid / matrix_sink must be unset) or rtn (no calibration); the
// GPTQ settings, windows and threads as for calibrated_quantize_gguf. on_matrix (optional) sees every
// layer matrix as written, by GGUF name, rows in GGUF order. Returns the checkpoint_format written
// ("gptq", or "gptq_v2" in the rare case a zero point of 0 cannot be stored as zero − 1). Throws
// std::invalid_argument for a bad option or a matrix that does not fit the grid, GgufError /
// SafetensorsError / HfCheckpointError for file problems.
std::string export_gptq_checkpoint(
    std::shared_ptr<const model::GgufFile> in, std::string_view calibration_text, const std::string& out_dir,
    const model::QuantGrid& grid, const CalibratedQuantizeOptions& options,
    const std::function<void(const std::string& tensor, const model::QuantizedMatrix& matrix)>& on_matrix =
        {});

}  // namespace nibble::worker
