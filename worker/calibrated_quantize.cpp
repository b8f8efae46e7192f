#include "worker/calibrated_quantize.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <vector>

#include "kernels/quantize.hpp"
#include "kernels/thread_pool.hpp"
#include "model/calibration.hpp"
#include "model/llama_config.hpp"
#include "model/quant_grid.hpp"
#include "model/random_model.hpp"
#include "model/requantize.hpp"
#include "model/tokenizer.hpp"
#include "worker/kv_cache.hpp"
#include "worker/llama_model.hpp"

namespace nibble::worker {

namespace {

using model::LayerMatrix;
using model::QuantizedMatrix;

// A float copy of a tensor: [rows, row length].
std::vector<float> read_floats(const model::GgufFile& file, const std::string& name) {
  const model::GgufTensorInfo* t = file.find_tensor(name);
  if (t == nullptr) throw model::GgufError(file.path() + ": tensor '" + name + "' is missing");
  const int64_t n = t->row_elements();
  std::vector<float> out(static_cast<size_t>(n * t->rows()));
  const int64_t bytes = kernels::row_bytes(t->type, n);
  for (int64_t r = 0; r < t->rows(); ++r) {
    if (kernels::dequantize_row(t->type, file.tensor_data(*t) + r * bytes, out.data() + r * n, n) !=
        kernels::Status::ok) {
      throw model::GgufError(file.path() + ": cannot read tensor '" + name + "' as floats");
    }
  }
  return out;
}

std::vector<uint8_t> float_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * sizeof(float));
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// w: [n_out, k] rounded to nearest at `type` (GGML's quantizers).
std::vector<uint8_t> round_rows(const std::vector<float>& w, int64_t n_out, int64_t k, kernels::DType type,
                                const std::string& name) {
  const int64_t bytes = kernels::row_bytes(type, k);
  std::vector<uint8_t> out(static_cast<size_t>(bytes * n_out));
  for (int64_t r = 0; r < n_out; ++r) {
    if (kernels::quantize_row(type, w.data() + r * k, out.data() + r * bytes, k) != kernels::Status::ok) {
      throw std::invalid_argument("cannot store tensor '" + name + "' as " + kernels::type_name(type));
    }
  }
  return out;
}

// Rows [begin, begin + count) of a quantized matrix's blocks.
std::vector<uint8_t> block_rows(const QuantizedMatrix& q, int64_t begin, int64_t count) {
  const int64_t bytes = kernels::row_bytes(q.grid.gguf_type(), q.k);
  return std::vector<uint8_t>(q.blocks.begin() + begin * bytes, q.blocks.begin() + (begin + count) * bytes);
}

// w: [n_out, k] scaled in place: row r by 1 / row_div[r] (when given), column j by col_mul[j].
void scale_matrix(std::vector<float>& w, int64_t n_out, int64_t k, const std::vector<float>* row_div,
                  const std::vector<float>& col_mul) {
  for (int64_t r = 0; r < n_out; ++r) {
    const float rd = row_div != nullptr ? (*row_div)[static_cast<size_t>(r)] : 1.0f;
    for (int64_t j = 0; j < k; ++j) w[static_cast<size_t>(r * k + j)] *= col_mul[static_cast<size_t>(j)] / rd;
  }
}

std::vector<float> concat(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<float> out(a);
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

// Runs every calibration window through a one-layer model.
class LayerRunner {
 public:
  LayerRunner(const std::shared_ptr<const model::GgufFile>& file, int64_t layer, int64_t length,
              kernels::ThreadPool& pool)
      : model_(file, {}, nullptr, {layer, layer + 1}),
        cache_(model_.shard_config(), (length + kBlock - 1) / kBlock, kBlock),
        pool_(pool) {
    for (int32_t b = 0; b < static_cast<int32_t>((length + kBlock - 1) / kBlock); ++b) table_.push_back(b);
  }
  LlamaModel& model() { return model_; }

  // hidden: per window, [length, n_embd] inputs (ignored on layer 0, which embeds the tokens);
  // replaced by the layer's outputs when keep_outputs.
  void run(const std::vector<std::vector<int32_t>>& windows, std::vector<std::vector<float>>& hidden,
           bool keep_outputs) {
    hidden.resize(windows.size());
    std::vector<float> out;
    for (size_t w = 0; w < windows.size(); ++w) {
      ForwardBatch batch;
      batch.add_sequence(windows[w], 0, 0, 0);
      batch.block_tables = table_;
      batch.max_blocks_per_seq = static_cast<int64_t>(table_.size());
      model_.forward_stage(batch, cache_, pool_, model_.is_first_stage() ? nullptr : hidden[w].data(), out);
      if (keep_outputs) hidden[w] = out;
    }
  }

 private:
  static constexpr int64_t kBlock = 16;
  LlamaModel model_;
  KvCache cache_;
  kernels::ThreadPool& pool_;
  std::vector<int32_t> table_;
};

struct MatrixGroup {
  MatrixInput input;
  std::vector<LayerMatrix> matrices;
};
const MatrixGroup kForwardOrder[] = {
    {MatrixInput::attn_qkv, {LayerMatrix::attn_q, LayerMatrix::attn_k, LayerMatrix::attn_v}},
    {MatrixInput::attn_output, {LayerMatrix::attn_output}},
    {MatrixInput::ffn_gate_up, {LayerMatrix::ffn_gate, LayerMatrix::ffn_up}},
    {MatrixInput::ffn_down, {LayerMatrix::ffn_down}},
};

// Where a layer's quantization puts what it produces, tensor by tensor as it is done: a tensor's name
// and its stored bytes (blocks, or an AWQ-folded norm as F32).
using StoreTensor = std::function<void(const std::string& name, std::vector<uint8_t> bytes)>;

void gptq_layer(const model::GgufFile& file, LayerRunner& runner, int64_t layer,
                const std::vector<std::vector<int32_t>>& windows, std::vector<std::vector<float>>& hidden,
                const model::QuantGrid& grid, const CalibratedQuantizeOptions& options,
                const StoreTensor& store) {
  for (const MatrixGroup& group : kForwardOrder) {
    std::unique_ptr<model::HessianAccumulator> acc;
    runner.model().set_input_observer(
        [&](int64_t, MatrixInput input, const float* x, int64_t rows, int64_t k) {
          if (input != group.input) return;
          if (acc == nullptr) acc = std::make_unique<model::HessianAccumulator>(k);
          acc->add(x, rows);
        });
    runner.run(windows, hidden, false);
    runner.model().set_input_observer({});
    const std::vector<double> h = acc->hessian();
    for (LayerMatrix m : group.matrices) {
      const std::string name = model::layer_tensor_name(layer, m);
      const std::vector<float> w = read_floats(file, name);
      const int64_t k = acc->k();
      const int64_t n_out = static_cast<int64_t>(w.size()) / k;
      // A matrix of another type than options.type is calibrated on that type's grid where it has one (a
      // mix's Q2_K ... Q6_K matrices), else rounded to nearest (Q8_0).
      const auto high = options.tensor_types.find(name);
      const std::optional<model::QuantGrid> matrix_grid =
          high != options.tensor_types.end() ? model::QuantGrid::for_gguf_type(high->second) : grid;
      if (!matrix_grid) {
        std::vector<uint8_t> rounded = round_rows(w, n_out, k, high->second, name);
        std::vector<float> values(w.size());
        for (int64_t r = 0; r < n_out; ++r) {
          const int64_t bytes = kernels::row_bytes(high->second, k);
          if (kernels::dequantize_row(high->second, rounded.data() + r * bytes, values.data() + r * k, k) !=
              kernels::Status::ok) {
            throw std::invalid_argument("cannot read tensor '" + name + "' back");
          }
        }
        runner.model().set_layer_matrix(layer, m, values);
        store(name, std::move(rounded));
        continue;
      }
      QuantizedMatrix q = model::gptq_quantize(w.data(), n_out, k, h, *matrix_grid, options.gptq);
      runner.model().set_layer_matrix(layer, m, q.dequantized);
      if (options.matrix_sink) {
        options.matrix_sink(name, std::move(q));
      } else {
        store(name, std::move(q.blocks));
      }
    }
  }
}

// Rows of one matrix input kept for AWQ's search: every stride-th row seen.
struct CapturedInput {
  int64_t k = 0, seen = 0, stride = 1;
  std::vector<float> rows;
  int64_t n_rows() const { return k > 0 ? static_cast<int64_t>(rows.size()) / k : 0; }
};

void awq_layer(const model::GgufFile& file, const model::LlamaConfig& config, LayerRunner& runner,
               int64_t layer, const std::vector<std::vector<int32_t>>& windows,
               std::vector<std::vector<float>>& hidden, bool keep_outputs, const model::QuantGrid& grid,
               const CalibratedQuantizeOptions& options, const StoreTensor& store) {
  int64_t total = 0;
  for (const auto& w : windows) total += static_cast<int64_t>(w.size());
  std::map<MatrixInput, CapturedInput> captured;
  const int64_t stride =
      options.awq.max_samples > 0 ? std::max<int64_t>(1, total / options.awq.max_samples) : 1;
  runner.model().set_input_observer([&](int64_t, MatrixInput input, const float* x, int64_t rows, int64_t k) {
    CapturedInput& c = captured[input];
    c.k = k;
    c.stride = stride;
    for (int64_t r = 0; r < rows; ++r, ++c.seen) {
      if (c.seen % c.stride == 0) c.rows.insert(c.rows.end(), x + r * k, x + (r + 1) * k);
    }
  });
  runner.run(windows, hidden, keep_outputs);  // the float layer: the next layer's inputs, as llm-awq
  runner.model().set_input_observer({});

  auto search = [&](const std::vector<float>& w, MatrixInput input) {
    const CapturedInput& c = captured.at(input);
    return model::awq_search(w.data(), static_cast<int64_t>(w.size()) / c.k, c.k, c.rows.data(), c.n_rows(),
                             grid, options.awq);
  };
  auto name = [&](LayerMatrix m) { return model::layer_tensor_name(layer, m); };
  const std::string prefix = "blk." + std::to_string(layer) + ".";
  const int64_t n_embd = config.n_embd, q_dim = config.q_dim(), kv_dim = config.kv_dim(), n_ff = config.n_ff;

  // q, k, v share attn_norm's output: one search over their stacked rows; 1/s into attn_norm.
  const std::vector<float> wq = read_floats(file, name(LayerMatrix::attn_q));
  const std::vector<float> wk = read_floats(file, name(LayerMatrix::attn_k));
  std::vector<float> wv = read_floats(file, name(LayerMatrix::attn_v));
  const model::AwqResult qkv = search(concat(concat(wq, wk), wv), MatrixInput::attn_qkv);
  std::vector<float> attn_norm = read_floats(file, prefix + "attn_norm.weight");
  for (int64_t j = 0; j < n_embd; ++j)
    attn_norm[static_cast<size_t>(j)] /= qkv.scales[static_cast<size_t>(j)];
  store(prefix + "attn_norm.weight", float_bytes(attn_norm));
  store(name(LayerMatrix::attn_q), block_rows(qkv.quantized, 0, q_dim));
  store(name(LayerMatrix::attn_k), block_rows(qkv.quantized, q_dim, kv_dim));
  const std::vector<float> wo = read_floats(file, name(LayerMatrix::attn_output));
  if (config.n_head == config.n_head_kv) {
    // attn_output's input channel i is v's output i: 1/s goes into v's rows, before v is rounded.
    const model::AwqResult o = search(wo, MatrixInput::attn_output);
    scale_matrix(wv, kv_dim, n_embd, &o.scales, qkv.scales);
    store(name(LayerMatrix::attn_v), model::rtn_quantize(wv.data(), kv_dim, n_embd, grid).blocks);
    store(name(LayerMatrix::attn_output), o.quantized.blocks);
  } else {
    store(name(LayerMatrix::attn_v), block_rows(qkv.quantized, q_dim + kv_dim, kv_dim));
    store(name(LayerMatrix::attn_output), model::rtn_quantize(wo.data(), n_embd, q_dim, grid).blocks);
  }

  // gate and up share ffn_norm's output; down's 1/s goes into up's rows.
  const std::vector<float> w_gate = read_floats(file, name(LayerMatrix::ffn_gate));
  std::vector<float> w_up = read_floats(file, name(LayerMatrix::ffn_up));
  const model::AwqResult ffn = search(concat(w_gate, w_up), MatrixInput::ffn_gate_up);
  std::vector<float> ffn_norm = read_floats(file, prefix + "ffn_norm.weight");
  for (int64_t j = 0; j < n_embd; ++j) ffn_norm[static_cast<size_t>(j)] /= ffn.scales[static_cast<size_t>(j)];
  store(prefix + "ffn_norm.weight", float_bytes(ffn_norm));
  store(name(LayerMatrix::ffn_gate), block_rows(ffn.quantized, 0, n_ff));
  const model::AwqResult down = search(read_floats(file, name(LayerMatrix::ffn_down)), MatrixInput::ffn_down);
  scale_matrix(w_up, n_ff, n_embd, &down.scales, ffn.scales);
  store(name(LayerMatrix::ffn_up), model::rtn_quantize(w_up.data(), n_ff, n_embd, grid).blocks);
  store(name(LayerMatrix::ffn_down), down.quantized.blocks);
}

// The output of a calibrated run, begun: `in`'s metadata with the run's, its tensors in order, the ones
// the run calibrates (every layer matrix, and AWQ's folded norms) left to be filled as their layer is
// done, the rest rounded to nearest as the writer reaches them.
model::PartialFile begin_output(const model::GgufFile& file, const std::string& out_path,
                                const CalibratedQuantizeOptions& options) {
  model::GgufWriter out;
  for (const auto& [key, value] : file.metadata()) out.set(key, value);
  set_calibration_metadata(out, options);
  const model::LlamaConfig config = model::LlamaConfig::from_gguf(file);
  std::set<std::string> calibrated, folded;
  for (int64_t l = 0; l < config.n_layer; ++l) {
    for (LayerMatrix m : model::kLayerMatrices) calibrated.insert(model::layer_tensor_name(l, m));
    if (options.method == QuantMethod::awq) {
      folded.insert("blk." + std::to_string(l) + ".attn_norm.weight");
      folded.insert("blk." + std::to_string(l) + ".ffn_norm.weight");
    }
  }
  for (const model::GgufTensorInfo& t : file.tensors()) {
    const auto own = options.tensor_types.find(t.name);
    if (folded.count(t.name) != 0) {
      out.add_tensor_later(t.name, t.dims, kernels::DType::F32);
    } else if (calibrated.count(t.name) != 0) {
      out.add_tensor_later(t.name, t.dims, own != options.tensor_types.end() ? own->second : options.type);
    } else {
      const kernels::DType target = own != options.tensor_types.end()
                                        ? own->second
                                        : model::requantized_type(t, options.type, options.pure);
      // (rounded to nearest as the writer reaches it: one at a time in memory)
      out.add_tensor_made(t.name, t.dims, target, [&file, &t, target] {
        std::vector<uint8_t> bytes = model::convert_tensor(file, t, target);
        file.release_pages(t);
        return bytes;
      });
    }
  }
  return out.start(out_path);
}

}  // namespace

QuantMethod parse_quant_method(const std::string& name) {
  if (name == "rtn") return QuantMethod::rtn;
  if (name == "gptq") return QuantMethod::gptq;
  if (name == "awq") return QuantMethod::awq;
  throw std::invalid_argument("unknown quantization method '" + name + "' (expected rtn, gptq or awq)");
}

const char* quant_method_name(QuantMethod method) {
  switch (method) {
    case QuantMethod::rtn:
      return "rtn";
    case QuantMethod::gptq:
      return "gptq";
    case QuantMethod::awq:
      return "awq";
  }
  return "?";
}

std::string progress_bar(int64_t done, int64_t total, int width) {
  const int64_t filled = total > 0 ? std::clamp<int64_t>(done * width / total, 0, width) : 0;
  std::string bar = "[";
  bar.append(static_cast<size_t>(filled), '#');
  bar.append(static_cast<size_t>(width - filled), '.');
  bar += ']';
  return bar;
}

std::vector<std::vector<int32_t>> calibration_windows(const model::Tokenizer& tokenizer,
                                                      std::string_view text,
                                                      const CalibratedQuantizeOptions& options) {
  if (!options.calibration_tokens.empty()) {
    return model::calibration_windows(tokenizer, options.calibration_tokens, options.samples, options.length,
                                      options.seed);
  }
  return model::calibration_windows(tokenizer, text, options.samples, options.length, options.seed);
}

void set_calibration_metadata(model::GgufWriter& out, const CalibratedQuantizeOptions& options) {
  out.set_uint32("general.file_type", model::llama_file_type(options.type));
  out.set_uint32("general.quantization_version", 2);
  out.set_string("nibble.quantization.method", quant_method_name(options.method));
  out.set_string("nibble.quantization.calibration_file", options.calibration_name);
  out.set_uint32("nibble.quantization.calibration_samples", static_cast<uint32_t>(options.samples));
  out.set_uint32("nibble.quantization.calibration_length", static_cast<uint32_t>(options.length));
  out.set_uint64("nibble.quantization.calibration_seed", options.seed);
  if (options.method == QuantMethod::gptq)
    out.set_bool("nibble.quantization.act_order", options.gptq.act_order);
  for (const auto& [key, value] : options.metadata) out.set(key, value);
}

void use_llama_cpp_mix(const model::GgufFile& in, model::LlamaCppMix mix,
                       CalibratedQuantizeOptions& options) {
  if (options.method != QuantMethod::gptq) {
    throw std::invalid_argument(std::string(quant_method_name(options.method)) +
                                " does not write llama-quantize's mixes (AWQ folds its scales across a "
                                "layer's matrices and takes no per-tensor types); use --method gptq or rtn");
  }
  options.type = model::llama_cpp_mix_default_type(mix);
  const std::vector<kernels::DType> types = model::llama_cpp_mix_types(in, mix);
  for (size_t i = 0; i < types.size(); ++i) {
    const model::GgufTensorInfo& t = in.tensors()[i];
    if (t.dims.size() != 2) continue;
    if (types[i] != options.type || t.name.rfind("blk.", 0) != 0) options.tensor_types[t.name] = types[i];
  }
  options.metadata.emplace_back(
      "general.file_type",
      model::GgufValue::make_uint(model::GgufValueType::UINT32, model::llama_cpp_mix_file_type(mix)));
}

void calibrated_quantize_gguf(std::shared_ptr<const model::GgufFile> in, std::string_view calibration_text,
                              const std::string& out_path, const CalibratedQuantizeOptions& options) {
  if (options.method == QuantMethod::rtn) {
    throw std::invalid_argument("calibrated quantization is gptq or awq; rtn is requantize_gguf");
  }
  if (options.matrix_sink && options.method != QuantMethod::gptq)
    throw std::invalid_argument("only GPTQ hands its matrices to a sink");
  const std::optional<model::QuantGrid> type_grid =
      options.grid ? options.grid : model::QuantGrid::for_gguf_type(options.type);
  if (!type_grid) {
    throw std::invalid_argument(std::string("calibrated quantization writes q4_0, q2_k ... q6_k, not ") +
                                kernels::type_name(options.type));
  }
  const model::QuantGrid grid = *type_grid;
  for (const auto& [name, type] : options.tensor_types) {
    if (options.method == QuantMethod::awq && name.rfind("blk.", 0) == 0) {
      throw std::invalid_argument(
          "AWQ folds scales across a layer's matrices and takes no per-tensor types (" + name +
          "); mixed precision works with rtn or gptq");
    }
  }
  const model::GgufFile& file = *in;
  const model::LlamaConfig config = model::LlamaConfig::from_gguf(file);
  // Every matrix must fit the grid before any work is done.
  for (int64_t l = 0; l < config.n_layer; ++l) {
    for (LayerMatrix m : model::kLayerMatrices) {
      const std::string name = model::layer_tensor_name(l, m);
      const model::GgufTensorInfo* t = file.find_tensor(name);
      if (t == nullptr) throw model::GgufError(file.path() + ": tensor '" + name + "' is missing");
      const auto own = options.tensor_types.find(name);
      const std::optional<model::QuantGrid> matrix_grid =
          own != options.tensor_types.end() ? model::QuantGrid::for_gguf_type(own->second) : grid;
      if (matrix_grid) {
        model::check_grid_shape(*matrix_grid, t->rows(), t->row_elements(),
                                file.path() + ": tensor '" + name + "'");
      }
    }
  }
  const auto tokenizer = model::Tokenizer::from_gguf(file);
  const auto windows = calibration_windows(*tokenizer, calibration_text, options);
  kernels::ThreadPool pool(options.threads);

  // The output is begun before the first layer (an unwritable path fails now, not after hours) with
  // every tensor but the calibrated ones, each layer's filled as it is done: the run holds one
  // layer's tensors, not the ~37 GB of a 70B model's at 4 bits, and lets the input's pages of layers
  // done go, so that it also fits a float model larger than memory.
  std::optional<model::PartialFile> output;
  if (!options.matrix_sink) output.emplace(begin_output(file, out_path, options));
  const StoreTensor store = [&output](const std::string& name, std::vector<uint8_t> bytes) {
    output->fill(name, bytes);
  };
  std::vector<std::vector<float>> hidden;  // per window: the current layer's inputs
  for (int64_t l = 0; l < config.n_layer; ++l) {
    const auto start = std::chrono::steady_clock::now();
    {
      LayerRunner runner(in, l, options.length, pool);
      const bool keep_outputs = l + 1 < config.n_layer;
      if (options.method == QuantMethod::gptq) {
        gptq_layer(file, runner, l, windows, hidden, grid, options, store);
        if (keep_outputs) runner.run(windows, hidden, true);  // the quantized layer's outputs
      } else {
        awq_layer(file, config, runner, l, windows, hidden, keep_outputs, grid, options, store);
      }
    }
    const std::string prefix = "blk." + std::to_string(l) + ".";
    for (const model::GgufTensorInfo& t : file.tensors()) {
      if (t.name.rfind(prefix, 0) == 0) file.release_pages(t);
    }
    if (options.progress) {
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::ostringstream line;
      line << quant_method_name(options.method) << ": " << progress_bar(l + 1, config.n_layer) << " layer "
           << l + 1 << "/" << config.n_layer << " done in " << seconds << " s";
      options.progress(line.str());
    }
  }
  if (output) output->finish();
}

}  // namespace nibble::worker
