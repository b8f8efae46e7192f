// libFuzzer's entry point for one target, chosen when the executable is built
// (NIBBLE_FUZZ_TARGET, e.g. "gguf_model"). A broken property or an undocumented exception aborts,
// which libFuzzer reports with the input that did it.
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "tests/fuzz/fuzz_targets.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const nibble::fuzz::Target& target = nibble::fuzz::target_by_name(NIBBLE_FUZZ_TARGET);
  try {
    target.run(std::span<const uint8_t>(data, size));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz target %s: %s\n", target.name, e.what());
    std::abort();
  }
  return 0;
}
