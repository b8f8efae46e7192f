// LoRA adapter subcommands: make-lora (a random adapter for a model, as make-model makes models) and
// export-lora (llama.cpp's llama-export-lora: the adapters merged into the model's weights).
#include <charconv>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>

#include "cluster/cli/commands.hpp"
#include "model/gguf.hpp"
#include "model/llama_config.hpp"
#include "model/lora_adapter.hpp"

namespace nibble::cli {

namespace {

model::LlamaConfig base_config(const std::string& path) {
  if (!std::filesystem::exists(path)) throw std::runtime_error("model file not found: " + path);
  return model::LlamaConfig::from_gguf(*model::GgufFile::open(path));
}

}  // namespace

Runner add_make_lora(CLI::App& app) {
  struct Args {
    std::string model, out, targets = "q,k,v,o,gate,up,down";
    int64_t rank = 8;
    float alpha = 16, b_scale = 0.3f;
    uint64_t seed = 1;
    kernels::DType type = kernels::DType::F16;
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model,-m", a->model, "The base model GGUF (the adapter takes its shapes)")->required();
  app.add_option("--rank,-r", a->rank, "The adapter's rank")->check(CLI::Range(int64_t{1}, int64_t{4096}));
  app.add_option("--alpha", a->alpha, "adapter.lora.alpha (the scale is alpha / rank; 0: 1)");
  app.add_option("--size", a->b_scale, "How large B A x is against W x, roughly");
  app.add_option("--targets", a->targets, "Matrices adapted, of q,k,v,o,gate,up,down,output");
  app.add_option("--seed", a->seed, "Weight seed");
  app.add_option("--type", a->type, "f16 (default), bf16 or f32")
      ->transform(CLI::CheckedTransformer(std::map<std::string, kernels::DType>{
          {"f16", kernels::DType::F16}, {"bf16", kernels::DType::BF16}, {"f32", kernels::DType::F32}}));
  app.add_option("--out,-o", a->out, "Output GGUF path")->required();
  return [a]() {
    const model::LlamaConfig config = base_config(a->model);
    const std::map<std::string, model::LayerMatrix> names = {
        {"q", model::LayerMatrix::attn_q},      {"k", model::LayerMatrix::attn_k},
        {"v", model::LayerMatrix::attn_v},      {"o", model::LayerMatrix::attn_output},
        {"gate", model::LayerMatrix::ffn_gate}, {"up", model::LayerMatrix::ffn_up},
        {"down", model::LayerMatrix::ffn_down}};
    std::vector<model::LayerMatrix> which;
    bool output = false;
    std::stringstream list(a->targets);
    for (std::string name; std::getline(list, name, ',');) {
      if (name == "output") {
        output = true;
      } else if (const auto it = names.find(name); it != names.end()) {
        which.push_back(it->second);
      } else {
        throw std::invalid_argument("--targets: '" + name + "' is not one of q,k,v,o,gate,up,down,output");
      }
    }
    const model::LoraAdapter adapter =
        model::make_random_lora(config, a->rank, a->alpha, a->b_scale, a->seed, which, output);
    adapter.write_gguf(a->out, config.architecture, a->type);
    std::cerr << "wrote " << a->out << " (" << adapter.n_matrices() << " matrices, rank " << a->rank << ", "
              << std::filesystem::file_size(a->out) << " bytes)\n";
    return 0;
  };
}

Runner add_export_lora(CLI::App& app) {
  struct Args {
    std::string model, out;
    std::vector<std::string> loras;
    std::vector<std::string> scaled;  // pairs: PATH SCALE
  };
  auto a = std::make_shared<Args>();
  app.add_option("--model,-m", a->model, "The base model GGUF")->required();
  app.add_option("--lora", a->loras, "LoRA adapter (GGUF, or a PEFT directory), scale 1 (repeatable)");
  app.add_option("--lora-scaled", a->scaled, "LoRA adapter (GGUF or PEFT) and its scale (repeatable)")
      ->type_size(2)
      ->expected(0, CLI::detail::expected_max_vector_size);
  app.add_option("--out,-o", a->out, "Output GGUF path: the adapted matrices in F32, the rest as they are")
      ->required();
  return [a]() {
    const auto file = model::GgufFile::open(a->model);
    const model::LlamaConfig config = model::LlamaConfig::from_gguf(*file);
    std::vector<std::unique_ptr<model::LoraAdapter>> adapters;
    std::vector<std::pair<const model::LoraAdapter*, float>> scaled;
    const auto read = [&](const std::string& path, float scale) {
      adapters.push_back(std::make_unique<model::LoraAdapter>(model::LoraAdapter::read(path, config)));
      scaled.emplace_back(adapters.back().get(), scale);
    };
    for (const std::string& path : a->loras) read(path, 1.0f);
    for (size_t i = 0; i + 1 < a->scaled.size(); i += 2) {
      float scale = 0;
      const std::string& text = a->scaled[i + 1];
      const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), scale);
      if (error != std::errc() || end != text.data() + text.size())
        throw std::invalid_argument("--lora-scaled " + a->scaled[i] + ": '" + text + "' is not a number");
      read(a->scaled[i], scale);
    }
    if (adapters.empty()) throw std::invalid_argument("export-lora: no adapter (--lora or --lora-scaled)");
    model::merge_lora(*file, scaled, a->out);
    std::cerr << "wrote " << a->out << " (" << std::filesystem::file_size(a->out) << " bytes)\n";
    return 0;
  };
}

}  // namespace nibble::cli
