// `nibble`: one binary, many subcommands. Errors print one line and exit non-zero.
#include <cstdio>
#include <exception>
#include <map>
#include <string>

#include "cluster/cli/commands.hpp"

int main(int argc, char** argv) {
  CLI::App app{"Nibble: INT4 Llama inference"};
  app.require_subcommand(1);
  std::map<CLI::App*, nibble::cli::Runner> runners;
  auto add = [&](const char* name, const char* help, nibble::cli::Runner (*add_fn)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, help);
    runners[sub] = add_fn(*sub);
  };
  add("generate", "Generate text from a prompt", nibble::cli::add_generate);
  add("tokenize", "Print the token ids of a text", nibble::cli::add_tokenize);
  add("logits", "Write float32 logits for every prompt position", nibble::cli::add_logits);
  add("bench", "Measure prompt-processing and generation speed", nibble::cli::add_bench);
  add("bench-spec", "Measure speculative decoding against plain decoding (batch 1, 8, 32)",
      nibble::cli::add_bench_speculative);
  add("bench-gpu", "Time the CUDA W4A16 kernel against fp16 cuBLAS on Llama-70B shapes",
      nibble::cli::add_bench_gpu);
  add("make-model", "Write a random-weight Llama GGUF of a named shape", nibble::cli::add_make_model);
  add("make-lora", "Write a random LoRA adapter GGUF for a model", nibble::cli::add_make_lora);
  add("export-lora", "Merge LoRA adapters into a model's weights (llama.cpp's llama-export-lora)",
      nibble::cli::add_export_lora);
  add("serve", "Run the distributed service (under mpirun: 1 coordinator + T*P workers)",
      nibble::cli::add_serve);
  add("quantize", "Quantize a GGUF model (round to nearest, or GPTQ / AWQ with calibration text)",
      nibble::cli::add_quantize);
  add("gguf-split", "Split a GGUF model into several files, or merge them (llama.cpp's llama-gguf-split)",
      nibble::cli::add_gguf_split);
  add("eval", "Measure quality: perplexity (ppl), or a model against its base (compare)",
      nibble::cli::add_eval);
  add("client", "Send one request to a running `nibble serve`", nibble::cli::add_client);
  add("bench-serve", "Load-test a running `nibble serve` (throughput, TTFT, TPOT)",
      nibble::cli::add_bench_serve);
  add("openai", "OpenAI-compatible HTTP server in front of a running `nibble serve`",
      nibble::cli::add_openai);

  auto is_subcommand = [&](const std::string& name) {
    for (const auto& [sub, run] : runners) {
      if (sub->get_name() == name) return true;
    }
    return false;
  };
  if (argc > 1 && argv[1][0] != '-' && !is_subcommand(argv[1])) {
    std::string known;
    for (const auto& [sub, run] : runners) {
      if (!known.empty()) known += ", ";
      known += sub->get_name();
    }
    std::fprintf(stderr, "nibble: error: unknown subcommand '%s' (expected one of: %s)\n", argv[1],
                 known.c_str());
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "nibble: error: %s\n", e.what());
    return 2;
  }
  try {
    for (auto& [sub, run] : runners) {
      if (sub->parsed()) return run();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nibble: error: %s\n", e.what());
    return 1;
  }
  return 2;
}
