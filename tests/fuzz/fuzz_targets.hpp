#pragma once
// Fuzz targets: each takes one input of arbitrary bytes, feeds it to a reader the service exposes
// to files or peers it does not control, and checks what must hold for every input:
//   - the input is accepted, or refused with the reader's documented error (GgufError,
//     ProtocolError, ConfigError, ...); no other exception, crash, hang or stray memory access;
//   - what is accepted survives a round trip (encode / render / decode give the same thing back)
//     and can be used (a GGUF model that loads also generates).
// A broken property throws PropertyBroken. The same targets run under libFuzzer (tests/fuzz,
// -DNIBBLE_FUZZ=ON with clang) and, on generated seeds and their mutations, in
// tests/test_fuzz_targets.cpp on every build.
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

namespace nibble::fuzz {

struct PropertyBroken : std::logic_error {
  using std::logic_error::logic_error;
};

struct Outcome {
  bool accepted = false;
  std::string error;  // the refusal's message when not accepted
};

using TargetFn = Outcome (*)(std::span<const uint8_t> input);

struct Target {
  const char* name;
  TargetFn run;
  // Valid inputs to start from (a tiny GGUF model, encoded messages, the example configs, ...).
  std::vector<std::vector<uint8_t>> (*seeds)();
};

// gguf_model, gguf_split (a split model's second file), safetensors, client_protocol, worker_protocol,
// cluster_config, tokenizer_text, hf_tokenizer, hf_config (a checkpoint's config.json against its committed
// tensors), imatrix, openai_request (the HTTP gateway's request bodies).
const std::vector<Target>& targets();
// Throws std::invalid_argument listing the names for an unknown one.
const Target& target_by_name(const std::string& name);

}  // namespace nibble::fuzz
