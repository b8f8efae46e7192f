// .safetensors reader and HF checkpoint directories: the committed reference checkpoint reads back
// as transformers wrote it, the writer round-trips every dtype, and corrupt files, indexes and
// config.json files built from the good data are rejected with a message naming the problem (never
// a crash: truncated and bit-flipped copies are tried too).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "model/hf_checkpoint.hpp"
#include "model/llama_checkpoint.hpp"
#include "model/safetensors.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::model {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

fs::path reference_dir(const std::string& variant) {
  return test::test_data_dir() / "hf-tiny-llama" / variant;
}

// Runs `fn`, expecting an exception of type E whose message contains every one of `words`.
template <typename E, typename Fn>
std::string expect_error(Fn&& fn, std::initializer_list<const char*> words) {
  try {
    fn();
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const char* w : words) EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
    return msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

// A .safetensors file taken apart: its header JSON and its byte buffer.
struct Parts {
  json header;
  std::vector<uint8_t> buffer;
};

Parts split(const fs::path& path) {
  const std::vector<uint8_t> bytes = test::read_file_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | bytes[static_cast<size_t>(i)];
  Parts p;
  p.header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<int64_t>(n));
  p.buffer.assign(bytes.begin() + 8 + static_cast<int64_t>(n), bytes.end());
  return p;
}

std::vector<uint8_t> assemble(const std::string& header_text, const std::vector<uint8_t>& buffer) {
  std::vector<uint8_t> out(8 + header_text.size() + buffer.size());
  for (size_t i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(header_text.size() >> (8 * i));
  std::memcpy(out.data() + 8, header_text.data(), header_text.size());
  if (!buffer.empty()) std::memcpy(out.data() + 8 + header_text.size(), buffer.data(), buffer.size());
  return out;
}

// Tensors filled later (start_safetensors), in any order: the file is byte for byte write_safetensors'; it
// appears at its path only when finished, a duplicate name is refused and an unfinished file leaves nothing.
TEST(Safetensors, TensorsFilledInAnyOrderMakeTheWritersFile) {
  test::TempDir dir;
  std::mt19937 rng(5);
  std::vector<SafetensorsTensorData> tensors;
  for (int i = 0; i < 4; ++i) {
    SafetensorsTensorData t{
        "layer." + std::to_string(i), i % 2 ? SafetensorsDType::F16 : SafetensorsDType::I32, {3 + i, 7}, {}};
    t.bytes.resize(static_cast<size_t>((3 + i) * 7 * safetensors_dtype_bytes(t.dtype)));
    for (auto& b : t.bytes) b = static_cast<uint8_t>(rng());
    tensors.push_back(t);
  }
  const std::string expected = (dir.path() / "whole.safetensors").string(),
                    path = (dir.path() / "filled.safetensors").string();
  write_safetensors(expected, tensors, {{"format", "pt"}});
  std::vector<SafetensorsTensorSpec> specs;
  for (const auto& t : tensors) specs.push_back({t.name, t.dtype, t.shape});
  {
    PartialFile file = start_safetensors(path, specs, {{"format", "pt"}});
    for (auto t = tensors.rbegin(); t != tensors.rend(); ++t) file.fill(t->name, t->bytes);
    EXPECT_FALSE(std::filesystem::exists(path));
    EXPECT_THROW(file.fill("layer.0", tensors[0].bytes), SafetensorsError);  // twice
    file.finish();
  }
  EXPECT_EQ(test::read_file_bytes(path), test::read_file_bytes(expected));
  specs.push_back(specs[0]);
  EXPECT_THROW(start_safetensors((dir.path() / "twice.safetensors").string(), specs), SafetensorsError);
  specs.pop_back();
  const std::string unfinished = (dir.path() / "unfinished.safetensors").string();
  {
    PartialFile file = start_safetensors(unfinished, specs);
    file.fill("layer.1", tensors[1].bytes);
    EXPECT_THROW(file.finish(), SafetensorsError);  // layer.0 never filled
  }
  EXPECT_FALSE(std::filesystem::exists(unfinished));
  EXPECT_FALSE(std::filesystem::exists(unfinished + ".tmp"));
}

class SafetensorsCorruption : public ::testing::Test {
 protected:
  void SetUp() override { good_ = split(reference_dir("f32") / "model.safetensors"); }
  // Writes the (modified) parts and opens them.
  void open_parts(const Parts& p) { open_bytes(assemble(p.header.dump(), p.buffer)); }
  void open_bytes(const std::vector<uint8_t>& bytes) {
    test::write_file_bytes(path(), bytes);
    SafetensorsFile::open(path());
  }
  std::string path() const { return (dir_.path() / "bad.safetensors").string(); }

  test::TempDir dir_;
  Parts good_;
};

TEST(Safetensors, ReadsTheReferenceCheckpoint) {
  auto file = SafetensorsFile::open((reference_dir("f32") / "model.safetensors").string());
  EXPECT_EQ(file->tensors().size(), 21u);  // 9 per layer x 2, embedding, final norm, head
  EXPECT_EQ(file->metadata().at("format"), "pt");
  const SafetensorsTensorInfo* embd = file->find_tensor("model.embed_tokens.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->dtype, SafetensorsDType::F32);
  EXPECT_EQ(embd->shape, (std::vector<int64_t>{192, 64}));
  EXPECT_EQ(embd->size_bytes, 192u * 64 * 4);
  EXPECT_EQ(file->find_tensor("no.such.tensor"), nullptr);
  uint64_t covered = 0;
  for (const auto& t : file->tensors()) {
    EXPECT_EQ(t.offset, covered) << t.name;  // in buffer order
    covered += t.size_bytes;
  }
  EXPECT_EQ(file->data_offset() + covered, file->file_size());

  auto bf16 = SafetensorsFile::open((reference_dir("bf16-tied") / "model.safetensors").string());
  EXPECT_EQ(bf16->find_tensor("model.norm.weight")->dtype, SafetensorsDType::BF16);
  EXPECT_EQ(bf16->find_tensor("lm_head.weight"), nullptr);  // tied: transformers leaves it out
}

TEST(Safetensors, WriterRoundTripsEveryDtype) {
  test::TempDir dir;
  const std::string path = (dir.path() / "all.safetensors").string();
  std::vector<SafetensorsTensorData> tensors;
  const SafetensorsDType dtypes[] = {SafetensorsDType::U8,  SafetensorsDType::F16,  SafetensorsDType::I32,
                                     SafetensorsDType::F32, SafetensorsDType::BF16, SafetensorsDType::I8,
                                     SafetensorsDType::I64};
  std::mt19937 rng(3);
  for (SafetensorsDType d : dtypes) {
    SafetensorsTensorData t;
    t.name = std::string("t.") + safetensors_dtype_name(d);
    t.dtype = d;
    t.shape = {3, 5};
    t.bytes.resize(static_cast<size_t>(15 * safetensors_dtype_bytes(d)));
    for (auto& b : t.bytes) b = static_cast<uint8_t>(rng());
    tensors.push_back(t);
  }
  tensors.push_back({"scalar", SafetensorsDType::F32, {}, {0, 0, 128, 63}});
  tensors.push_back({"empty", SafetensorsDType::F32, {0, 4}, {}});
  write_safetensors(path, tensors, {{"format", "pt"}, {"note", "héllo"}});

  auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->metadata().at("note"), "héllo");
  EXPECT_EQ(file->data_offset() % 8, 0u);
  for (const auto& t : tensors) {
    const SafetensorsTensorInfo* info = file->find_tensor(t.name);
    ASSERT_NE(info, nullptr) << t.name;
    EXPECT_EQ(info->dtype, t.dtype);
    EXPECT_EQ(info->shape, t.shape);
    ASSERT_EQ(info->size_bytes, t.bytes.size());
    if (t.bytes.empty()) continue;  // an empty vector's data() may be null, which memcmp must not get
    EXPECT_EQ(std::memcmp(file->tensor_data(*info), t.bytes.data(), t.bytes.size()), 0) << t.name;
  }
  EXPECT_EQ(file->find_tensor("scalar")->n_elements, 1);
  EXPECT_EQ(file->find_tensor("empty")->n_elements, 0);
}

TEST_F(SafetensorsCorruption, TruncatedFile) {
  std::vector<uint8_t> bytes = assemble(good_.header.dump(), good_.buffer);
  bytes.resize(bytes.size() - 100);
  // The tensor at the end of the buffer is the one that no longer fits.
  expect_error<SafetensorsError>([&] { open_bytes(bytes); },
                                 {"bad.safetensors", "extend past the end of the data", "truncated"});
  bytes.resize(5);
  expect_error<SafetensorsError>([&] { open_bytes(bytes); }, {"bad.safetensors", "too small", "5 bytes"});
}

TEST_F(SafetensorsCorruption, HeaderLengthPastTheEnd) {
  std::vector<uint8_t> bytes = assemble(good_.header.dump(), good_.buffer);
  const uint64_t too_long = bytes.size();  // 8 + this is past the end
  for (int i = 0; i < 8; ++i) bytes[static_cast<size_t>(i)] = static_cast<uint8_t>(too_long >> (8 * i));
  expect_error<SafetensorsError>([&] { open_bytes(bytes); },
                                 {"bad.safetensors", "header length", "extends past the end of the file"});
  for (int i = 0; i < 8; ++i) bytes[static_cast<size_t>(i)] = 0xFF;
  expect_error<SafetensorsError>([&] { open_bytes(bytes); }, {"header length", "exceeds the limit"});
}

TEST_F(SafetensorsCorruption, BadJson) {
  std::string text = good_.header.dump();
  text[text.size() / 2] = '\x01';
  expect_error<SafetensorsError>([&] { open_bytes(assemble(text, good_.buffer)); },
                                 {"bad.safetensors", "not valid JSON"});
  expect_error<SafetensorsError>([&] { open_bytes(assemble("[1, 2]", good_.buffer)); },
                                 {"does not start with '{'"});
  expect_error<SafetensorsError>([&] { open_bytes(assemble("{\"a\": 3}", {})); },
                                 {"tensor 'a'", "not an object"});
  Parts p = good_;
  p.header["__metadata__"] = {{"format", 3}};
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"__metadata__", "'format'", "not a string"});
}

TEST_F(SafetensorsCorruption, DuplicateTensorName) {
  // nlohmann would keep the last of two equal keys; the reader must refuse the file instead.
  const json entry = good_.header["model.norm.weight"];
  std::string text = good_.header.dump();
  text.insert(1, "\"model.norm.weight\":" + entry.dump() + ",");
  expect_error<SafetensorsError>([&] { open_bytes(assemble(text, good_.buffer)); },
                                 {"'model.norm.weight' twice"});
}

TEST_F(SafetensorsCorruption, UnknownDtype) {
  Parts p = good_;
  p.header["model.norm.weight"]["dtype"] = "F64";
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"bad.safetensors", "tensor 'model.norm.weight'",
                                                          "dtype 'F64' is not supported"});
  p.header["model.norm.weight"]["dtype"] = 7;
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"'dtype' is missing or not a string"});
}

TEST_F(SafetensorsCorruption, ShapeDisagreesWithTheByteRange) {
  Parts p = good_;
  p.header["model.norm.weight"]["shape"] = {65};
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"tensor 'model.norm.weight'",
                                                          "shape [65] of F32 needs 260 bytes", "hold 256"});
  p = good_;
  p.header["model.norm.weight"]["dtype"] = "F16";  // same shape, half the bytes
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"tensor 'model.norm.weight'", "needs 128 bytes"});
  p.header["model.norm.weight"]["shape"] = {-64};
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"not a dimension"});
  p.header["model.norm.weight"]["shape"] = {uint64_t{1} << 40, uint64_t{1} << 40};
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"too many elements"});
}

TEST_F(SafetensorsCorruption, OffsetsOutOfRange) {
  Parts p = good_;
  const uint64_t size = good_.buffer.size();
  p.header["model.norm.weight"]["data_offsets"] = {size, size + 256};
  expect_error<SafetensorsError>([&] { open_parts(p); },
                                 {"tensor 'model.norm.weight'", "extend past the end of the data"});
  p.header["model.norm.weight"]["data_offsets"] = {256, 0};
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"end before they begin"});
  p.header["model.norm.weight"]["data_offsets"] = {0};
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"'data_offsets' is missing"});
}

TEST_F(SafetensorsCorruption, OverlappingTensors) {
  Parts p = good_;
  // Two tensors of the same size at the same bytes.
  p.header["model.layers.0.input_layernorm.weight"]["data_offsets"] =
      p.header["model.layers.0.post_attention_layernorm.weight"]["data_offsets"];
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"bad.safetensors", "overlaps tensor", "layernorm"});
}

TEST_F(SafetensorsCorruption, GapsAndTrailingBytes) {
  Parts p = good_;
  p.buffer.push_back(0);
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"1 bytes after the last tensor"});
  p = good_;
  for (const auto& [name, entry] : good_.header.items()) {
    if (name != "__metadata__" && entry["data_offsets"][0] == 0) p.header.erase(name);  // the first
  }
  ASSERT_EQ(p.header.size() + 1, good_.header.size());
  expect_error<SafetensorsError>([&] { open_parts(p); }, {"leaving a gap after byte 0"});
}

// Every truncation and random header corruptions: a SafetensorsError or a clean open, never a crash
// or another exception.
TEST_F(SafetensorsCorruption, TruncatedAndBitFlippedCopiesFailCleanly) {
  const std::vector<uint8_t> bytes = assemble(good_.header.dump(), good_.buffer);
  const size_t header_end = bytes.size() - good_.buffer.size();
  std::vector<size_t> cuts;
  for (size_t n = 0; n < header_end + 64; n += 7) cuts.push_back(n);
  for (size_t n = header_end; n < bytes.size(); n += bytes.size() / 50) cuts.push_back(n);
  for (size_t n : cuts) {
    std::vector<uint8_t> cut(bytes.begin(), bytes.begin() + static_cast<int64_t>(n));
    EXPECT_THROW(open_bytes(cut), SafetensorsError) << "truncated to " << n << " bytes";
  }
  std::mt19937 rng(5);
  int rejected = 0;
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<uint8_t> flipped = bytes;
    flipped[rng() % header_end] ^= static_cast<uint8_t>(1u << (rng() % 8));
    try {
      open_bytes(flipped);
    } catch (const SafetensorsError&) {
      ++rejected;
    }
  }
  EXPECT_GT(rejected, 100);  // most flips break the JSON, an offset or a shape
}

// ---------------------------------------------------------------------------------------------
// Checkpoint directories

class HfCheckpointErrors : public ::testing::Test {
 protected:
  // A copy of the reference F32 checkpoint that tests may break.
  void SetUp() override {
    for (const char* name : {"config.json", "model.safetensors"})
      fs::copy_file(reference_dir("f32") / name, dir() / name);
    config_ = json::parse(std::ifstream(dir() / "config.json"));
  }
  fs::path dir() const { return tmp_.path(); }
  void write_config(const json& config) { std::ofstream(dir() / "config.json") << config.dump(1); }
  std::string open_error(std::initializer_list<const char*> words) {
    return expect_error<HfCheckpointError>([&] { LlamaCheckpoint::open(dir().string())->bind_weights(); },
                                           words);
  }

  test::TempDir tmp_;
  json config_;
};

TEST_F(HfCheckpointErrors, MissingFiles) {
  fs::remove(dir() / "model.safetensors");
  open_error({"neither model.safetensors nor model.safetensors.index.json"});
  fs::remove(dir() / "config.json");
  open_error({"config.json is missing"});
}

TEST_F(HfCheckpointErrors, BadConfigKeys) {
  struct Case {
    const char* key;
    json value;  // null: remove the key
    std::vector<const char*> words;
  };
  const Case cases[] = {
      {"hidden_size", nullptr, {"config.json", "key 'hidden_size' is missing"}},
      {"hidden_size", "64", {"key 'hidden_size' must be an integer"}},
      {"num_hidden_layers", 2.5, {"key 'num_hidden_layers' must be an integer"}},
      {"num_attention_heads", 0, {"key 'num_attention_heads'", "out of range"}},
      {"num_key_value_heads", 3, {"key 'num_attention_heads' is not a multiple of num_key_value_heads"}},
      {"intermediate_size", nullptr, {"key 'intermediate_size' is missing"}},
      {"vocab_size", -1, {"key 'vocab_size'", "out of range"}},
      {"max_position_embeddings", true, {"key 'max_position_embeddings' must be an integer"}},
      {"rms_norm_eps", "1e-5", {"key 'rms_norm_eps' must be a number"}},
      {"rms_norm_eps", nullptr, {"key 'rms_norm_eps' is missing"}},
      {"tie_word_embeddings", "yes", {"key 'tie_word_embeddings' must be true or false"}},
      {"architectures", json::array({"MistralForCausalLM"}), {"key 'architectures'", "not supported"}},
      {"architectures", nullptr, {"key 'architectures' is missing"}},
      {"hidden_act", "gelu", {"key 'hidden_act'", "not supported"}},
      {"attention_bias", true, {"key 'attention_bias' = true is not supported"}},
      // linear, llama3 and yarn run (tests/test_hf_llama.cpp); the scalings Nibble does not run are refused.
      {"rope_parameters",
       {{"rope_type", "longrope"}, {"factor", 8.0}},
       {"key 'rope_parameters'", "not supported"}},
      {"rope_parameters",
       {{"rope_type", "yarn"}, {"factor", 8.0}},
       {"key 'rope_parameters.original_max_position_embeddings' is missing"}},
      {"rope_scaling", {{"type", "dynamic"}, {"factor", 2.0}}, {"key 'rope_scaling'", "not supported"}},
      {"rope_scaling", {{"type", "linear"}, {"factor", 0.5}}, {"key 'rope_scaling.factor'", "at least 1"}},
      {"head_dim", 15, {"key 'head_dim' must be even"}},
      // Fuzzing's find on the GGUF side: a layer count the checkpoint cannot hold, refused before
      // anything is sized by it.
      {"num_hidden_layers",
       1000000,
       {"key 'num_hidden_layers' = 1000000, but tensor 'model.layers.2.input_layernorm.weight' is missing"}},
      {"rope_parameters",
       {{"rope_type", "default"}, {"rope_theta", 1e300}},
       {"key 'rope_theta' must be positive and finite"}},
      {"rms_norm_eps", -1e-6, {"key 'rms_norm_eps' must be positive and finite"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.key) + " = " + c.value.dump());
    json config = config_;
    if (c.value.is_null()) {
      config.erase(c.key);
    } else {
      config[c.key] = c.value;
    }
    write_config(config);
    expect_error<HfCheckpointError>([&] { LlamaCheckpoint::open(dir().string()); }, {});
    const std::string msg = open_error({});
    for (const char* w : c.words)
      EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
  }
  std::ofstream(dir() / "config.json") << "{\"hidden_size\": 64,";
  open_error({"config.json", "not valid JSON"});
}

TEST_F(HfCheckpointErrors, ConfigDisagreesWithTheTensors) {
  json config = config_;
  config["vocab_size"] = 300;
  write_config(config);
  open_error(
      {"model.safetensors", "tensor 'model.embed_tokens.weight' has shape [192, 64], expected [300, 64]"});
  config = config_;
  config["num_hidden_layers"] = 3;
  write_config(config);
  open_error({"tensor 'model.layers.2.input_layernorm.weight' is missing"});
}

TEST_F(HfCheckpointErrors, MissingTensor) {
  Parts p = split(dir() / "model.safetensors");
  std::vector<SafetensorsTensorData> kept;
  auto file = SafetensorsFile::open((dir() / "model.safetensors").string());
  for (const auto& t : file->tensors()) {
    if (t.name == "model.layers.1.mlp.up_proj.weight" || t.name == "lm_head.weight") continue;
    const uint8_t* data = file->tensor_data(t);
    kept.push_back({t.name, t.dtype, t.shape, std::vector<uint8_t>(data, data + t.size_bytes)});
  }
  file.reset();
  write_safetensors((dir() / "model.safetensors").string(), kept);
  open_error({"lm_head.weight' is missing", "tie_word_embeddings"});
  json config = config_;
  config["tie_word_embeddings"] = true;
  write_config(config);
  open_error({"tensor 'model.layers.1.mlp.up_proj.weight' is missing"});
}

TEST_F(HfCheckpointErrors, IntegerWeightsAreNotServedYet) {
  Parts p = split(dir() / "model.safetensors");
  p.header["model.layers.0.mlp.gate_proj.weight"]["dtype"] = "I32";  // same element size as F32
  test::write_file_bytes(dir() / "model.safetensors", assemble(p.header.dump(), p.buffer));
  open_error({"tensor 'model.layers.0.mlp.gate_proj.weight' has dtype I32", "only F32, F16 and BF16"});
}

// Splits the reference checkpoint into two shards with an index; `edit` may break the index.
void write_sharded(const fs::path& dir, const std::function<void(json&)>& edit = {}) {
  auto file = SafetensorsFile::open((reference_dir("f32") / "model.safetensors").string());
  std::vector<SafetensorsTensorData> shards[2];
  json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", json::object()}};
  int i = 0;
  for (const auto& t : file->tensors()) {
    const int shard = i++ % 2;
    const uint8_t* data = file->tensor_data(t);
    shards[shard].push_back({t.name, t.dtype, t.shape, std::vector<uint8_t>(data, data + t.size_bytes)});
    index["weight_map"][t.name] = "model-0000" + std::to_string(shard + 1) + "-of-00002.safetensors";
  }
  for (int s = 0; s < 2; ++s)
    write_safetensors((dir / ("model-0000" + std::to_string(s + 1) + "-of-00002.safetensors")).string(),
                      shards[s], {{"format", "pt"}});
  if (edit) edit(index);
  std::ofstream(dir / "model.safetensors.index.json") << index.dump(1);
  fs::copy_file(reference_dir("f32") / "config.json", dir / "config.json",
                fs::copy_options::overwrite_existing);
}

TEST(HfCheckpoint, ReadsShardsThroughTheIndex) {
  test::TempDir tmp;
  write_sharded(tmp.path());
  auto ckpt = HfCheckpoint::open(tmp.path().string());
  EXPECT_EQ(ckpt->files().size(), 2u);
  EXPECT_EQ(ckpt->tensors().size(), 21u);
  const auto* t = ckpt->find_tensor("model.norm.weight");
  ASSERT_NE(t, nullptr);
  auto single = SafetensorsFile::open((reference_dir("f32") / "model.safetensors").string());
  const auto* s = single->find_tensor("model.norm.weight");
  EXPECT_EQ(std::memcmp(t->data(), single->tensor_data(*s), s->size_bytes), 0);
}

TEST(HfCheckpoint, RejectsBadIndexes) {
  struct Case {
    std::function<void(json&)> edit;
    std::vector<const char*> words;
  };
  const Case cases[] = {
      {[](json& j) { j["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"; },
       {"model.safetensors.index.json", "tensor 'model.norm.weight' is listed in shard",
        "does not contain it"}},
      {[](json& j) { j["weight_map"]["extra.weight"] = "model-00001-of-00002.safetensors"; },
       {"tensor 'extra.weight'", "does not contain it"}},
      {[](json& j) { j["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors"; },
       {"shard 'model-00003-of-00002.safetensors'", "missing from the directory"}},
      {[](json& j) { j["weight_map"]["model.norm.weight"] = "../model.safetensors"; },
       {"'../model.safetensors'", "not a file name in the checkpoint directory"}},
      {[](json& j) { j["weight_map"]["model.norm.weight"] = 1; }, {"'model.norm.weight' is not a file name"}},
      {[](json& j) { j.erase("weight_map"); }, {"'weight_map' is missing"}},
  };
  for (const Case& c : cases) {
    test::TempDir tmp;
    write_sharded(tmp.path(), c.edit);
    const std::string msg =
        expect_error<HfCheckpointError>([&] { HfCheckpoint::open(tmp.path().string()); }, {});
    for (const char* w : c.words)
      EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
  }
  test::TempDir tmp;
  write_sharded(tmp.path());
  // A broken shard is reported by the safetensors reader, naming the shard.
  const fs::path shard = tmp.path() / "model-00002-of-00002.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 4);
  expect_error<SafetensorsError>([&] { HfCheckpoint::open(tmp.path().string()); },
                                 {"model-00002-of-00002.safetensors", "truncated"});
}

}  // namespace
}  // namespace nibble::model
