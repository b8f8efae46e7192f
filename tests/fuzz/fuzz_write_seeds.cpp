// Writes each fuzz target's seeds into <dir>/<target>/seed-N, the corpus tools/fuzz.sh starts from.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "tests/fuzz/fuzz_targets.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir>\n", argv[0]);
    return 2;
  }
  for (const nibble::fuzz::Target& target : nibble::fuzz::targets()) {
    const std::filesystem::path dir = std::filesystem::path(argv[1]) / target.name;
    std::filesystem::create_directories(dir);
    int index = 0;
    for (const std::vector<uint8_t>& seed : target.seeds()) {
      std::ofstream out(dir / ("seed-" + std::to_string(index++)), std::ios::binary);
      out.write(reinterpret_cast<const char*>(seed.data()), static_cast<std::streamsize>(seed.size()));
    }
    std::printf("%s: %d seeds\n", target.name, index);
  }
  return 0;
}
