#pragma once
// Subcommands of the `nibble` binary. Each registers its options on a CLI11 subcommand and returns
// the function that runs it (exit code), so main() stays a dispatcher.
#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "worker/cuda_llama_model.hpp"

namespace nibble::cli {

using Runner = std::function<int()>;

Runner add_generate(CLI::App& app);
Runner add_tokenize(CLI::App& app);
Runner add_logits(CLI::App& app);
Runner add_bench(CLI::App& app);
Runner add_make_model(CLI::App& app);
Runner add_make_lora(CLI::App& app);
Runner add_export_lora(CLI::App& app);
Runner add_quantize(CLI::App& app);
Runner add_gguf_split(CLI::App& app);
Runner add_serve(CLI::App& app);
Runner add_bench_speculative(CLI::App& app);
Runner add_client(CLI::App& app);
Runner add_bench_serve(CLI::App& app);
Runner add_eval(CLI::App& app);
Runner add_bench_gpu(CLI::App& app);
Runner add_openai(CLI::App& app);

// Thread count default: every core the machine has.
int default_threads();

// This process's peak resident memory, MiB (the kernel's high-water mark for this program image: unlike
// getrusage's, it leaves out what a parent that forked it held).
double peak_resident_mib();

// --int4-kernels (bench-gpu, generate): measured, cuda-cores, tensor-cores or half2 (worker::Int4Kernels).
void add_int4_kernels_option(CLI::App& app, worker::Int4Kernels& value, const std::string& what);
// --int4-layout (bench-gpu, generate): rows or tiles (worker::Int4Layout).
void add_int4_layout_option(CLI::App& app, worker::Int4Layout& value, const std::string& what);

// --tokens: "1 2 3" or "1,2,3" -> ids; anything else (or no ids) is a usage error.
std::vector<int32_t> parse_token_list(const std::string& text);

// --logit-bias (generate, client), llama.cpp's form: "TOKEN_ID+BIAS" or "TOKEN_ID-BIAS", e.g. "15043+1.5";
// each item once per token. Anything else is a usage error (std::invalid_argument naming the item).
std::vector<std::pair<int32_t, float>> parse_logit_bias(const std::vector<std::string>& items);

}  // namespace nibble::cli
