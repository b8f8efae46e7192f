// The fuzz targets (tests/fuzz/fuzz_targets.hpp) in every build, without libFuzzer: each target on
// its seeds and on deterministic mutations of them, and the inputs libFuzzer found that were then
// fixed (tests/fuzz/found/<target>/). Under libFuzzer the same targets run with coverage guidance
// and sanitizers: tools/fuzz.sh.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <random>

#include "tests/fuzz/fuzz_targets.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::fuzz {
namespace {

namespace fs = std::filesystem;

// Bit flips, bytes set to boundary values, 32-bit fields set to boundary values, truncation,
// a chunk repeated, a chunk removed: what corrupt files and frames look like.
std::vector<uint8_t> mutate(const std::vector<uint8_t>& seed, std::mt19937_64& rng) {
  std::vector<uint8_t> out = seed;
  const auto pick = [&](size_t n) { return n == 0 ? size_t{0} : static_cast<size_t>(rng() % n); };
  const int edits = 1 + static_cast<int>(rng() % 3);
  for (int e = 0; e < edits; ++e) {
    switch (rng() % 6) {
      case 0:
        if (!out.empty()) out[pick(out.size())] ^= static_cast<uint8_t>(1u << (rng() % 8));
        break;
      case 1: {
        static constexpr uint8_t kBoundary[] = {0x00, 0x01, 0x7f, 0x80, 0xff, 0x20, 0x0a, '"', ':'};
        if (!out.empty()) out[pick(out.size())] = kBoundary[rng() % sizeof(kBoundary)];
        break;
      }
      case 2: {
        static constexpr uint32_t kBoundary[] = {0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 0xffff, 0x10000};
        if (out.size() >= 4) {
          const uint32_t value = kBoundary[rng() % std::size(kBoundary)];
          std::memcpy(out.data() + pick(out.size() - 3), &value, 4);
        }
        break;
      }
      case 3:
        out.resize(pick(out.size() + 1));
        break;
      case 4: {
        const size_t begin = pick(out.size());
        const size_t length = std::min<size_t>(pick(64) + 1, out.size() - begin);
        const std::vector<uint8_t> chunk(out.begin() + static_cast<std::ptrdiff_t>(begin),
                                         out.begin() + static_cast<std::ptrdiff_t>(begin + length));
        out.insert(out.begin() + static_cast<std::ptrdiff_t>(pick(out.size() + 1)), chunk.begin(),
                   chunk.end());
        break;
      }
      default: {
        const size_t begin = pick(out.size());
        const size_t length = std::min<size_t>(pick(64) + 1, out.size() - begin);
        out.erase(out.begin() + static_cast<std::ptrdiff_t>(begin),
                  out.begin() + static_cast<std::ptrdiff_t>(begin + length));
        break;
      }
    }
  }
  return out;
}

std::string describe(const std::vector<uint8_t>& input) { return std::to_string(input.size()) + " bytes"; }

class FuzzTargets : public ::testing::TestWithParam<std::string> {
 protected:
  const Target& target() const { return target_by_name(GetParam()); }
};

// Seeds that a target refused would leave the fuzzer starting from refusals only.
TEST_P(FuzzTargets, AcceptsEverySeed) {
  const auto seeds = target().seeds();
  ASSERT_FALSE(seeds.empty());
  for (size_t i = 0; i < seeds.size(); ++i) {
    Outcome outcome;
    ASSERT_NO_THROW(outcome = target().run(seeds[i])) << "seed " << i;
    EXPECT_TRUE(outcome.accepted) << "seed " << i << " refused: " << outcome.error;
  }
}

// Every mutant is accepted, or refused with the reader's own error and a message; nothing else
// escapes and no property breaks. The readers must also refuse some of them (a reader that takes
// any corruption checks nothing).
TEST_P(FuzzTargets, MutatedSeedsAreAcceptedOrRefusedByName) {
  const auto seeds = target().seeds();
  std::mt19937_64 rng(0x6e6962626c65);
  const int mutants_per_seed = GetParam() == "gguf_model" ? 400 : 1000;
  int accepted = 0;
  int refused = 0;
  for (size_t i = 0; i < seeds.size(); ++i) {
    for (int m = 0; m < mutants_per_seed; ++m) {
      const std::vector<uint8_t> mutant = mutate(seeds[i], rng);
      Outcome outcome;
      try {
        outcome = target().run(mutant);
      } catch (const std::exception& e) {
        ADD_FAILURE() << "seed " << i << " mutant " << m << " (" << describe(mutant) << "): " << e.what();
        continue;
      }
      if (outcome.accepted) {
        ++accepted;
      } else {
        ++refused;
        EXPECT_FALSE(outcome.error.empty())
            << "seed " << i << " mutant " << m << " refused without a message";
      }
    }
  }
  std::printf("%s: %d mutants accepted, %d refused\n", GetParam().c_str(), accepted, refused);
  EXPECT_GT(accepted, 0);
  if (GetParam() != "tokenizer_text") {  // any text is a text
    EXPECT_GT(refused, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Readers, FuzzTargets,
                         ::testing::Values("gguf_model", "gguf_split", "safetensors", "client_protocol",
                                           "worker_protocol", "cluster_config", "tokenizer_text",
                                           "hf_tokenizer", "hf_config", "imatrix", "openai_request",
                                           "json_output", "json_schema", "tool_calls", "grammar",
                                           "lora_adapter"),
                         [](const auto& param_info) { return param_info.param; });

// Inputs libFuzzer found, kept after their fix in tests/fuzz/found/<target>/ (file names say what
// each one broke): accepted or refused by name now.
TEST(FuzzFoundInputs, StayFixed) {
  const fs::path found = test::source_dir() / "tests" / "fuzz" / "found";
  std::vector<fs::path> inputs;
  for (const auto& entry : fs::recursive_directory_iterator(found)) {
    if (entry.is_regular_file()) inputs.push_back(entry.path());
  }
  std::sort(inputs.begin(), inputs.end());
  ASSERT_FALSE(inputs.empty()) << found;
  for (const fs::path& path : inputs) {
    const std::string name = path.parent_path().filename().string() + "/" + path.filename().string();
    Outcome outcome;
    try {
      outcome = target_by_name(path.parent_path().filename().string()).run(test::read_file_bytes(path));
    } catch (const std::exception& e) {
      ADD_FAILURE() << name << ": " << e.what();
      continue;
    }
    if (!outcome.accepted) {
      EXPECT_FALSE(outcome.error.empty()) << name;
    }
  }
}

TEST(FuzzTargetNames, UnknownNamesAreRefusedWithTheKnownOnes) {
  try {
    (void)target_by_name("gguf");
    FAIL() << "an unknown target was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("gguf_model"), std::string::npos) << e.what();
  }
  EXPECT_EQ(targets().size(), 16u);
}

}  // namespace
}  // namespace nibble::fuzz
