// Split GGUF models (llama.cpp's gguf-split, convert_hf_to_gguf.py --split-max-*): a set's first file
// opens the whole set as one file; GgufWriter::write_split writes sets llama.cpp reads; broken sets
// (a file missing, renamed, from another set, a tensor twice, a wrong count) are refused naming the
// file and the problem. gguf-py's sets and llama.cpp's outputs on them: tests/test_fixture_models.cpp.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "model/gguf.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::model {
namespace {

namespace fs = std::filesystem;
using kernels::DType;

// Runs `fn`, expecting a GgufError whose message contains every one of `words`.
template <typename Fn>
void expect_gguf_error(Fn&& fn, std::initializer_list<std::string> words) {
  try {
    fn();
  } catch (const GgufError& e) {
    const std::string msg = e.what();
    for (const std::string& w : words)
      EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "expected a GgufError";
}

std::vector<uint8_t> random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

struct Tensor {
  std::string name;
  std::vector<int64_t> dims;
  DType type;
  std::vector<uint8_t> data;
};

// Eleven tensors of several types and odd sizes (so files need padding), and some metadata.
std::vector<Tensor> sample_tensors() {
  std::vector<Tensor> t;
  for (int i = 0; i < 11; ++i) {
    const std::string name = "blk." + std::to_string(i) + ".weight";
    switch (i % 3) {
      case 0:
        t.push_back({name, {3 + i, 5}, DType::F32, random_bytes(static_cast<size_t>(3 + i) * 5 * 4, i)});
        break;
      case 1:
        t.push_back({name, {64, 1 + i}, DType::Q4_0, random_bytes(static_cast<size_t>(1 + i) * 2 * 18, i)});
        break;
      default:
        t.push_back({name, {256, 2}, DType::Q4_K, random_bytes(2 * 144, i)});
    }
  }
  return t;
}

GgufWriter sample_writer(const std::vector<Tensor>& tensors, uint32_t alignment = 32) {
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_uint32("llama.block_count", 11);
  w.set_string_array("tokenizer.ggml.tokens", {"a", "b", "c"});
  if (alignment != 32) w.set_uint32("general.alignment", alignment);
  for (const Tensor& t : tensors) w.add_tensor(t.name, t.dims, t.type, t.data);
  return w;
}

// The set reads as the one file written from the same writer: metadata, tensors and bytes.
void expect_same_model(const GgufFile& set, const GgufFile& whole) {
  ASSERT_EQ(set.metadata().size(), whole.metadata().size());
  for (const auto& [key, value] : whole.metadata()) {
    const GgufValue* got = set.find(key);
    ASSERT_NE(got, nullptr) << key;
    EXPECT_EQ(got->type, value.type) << key;
  }
  EXPECT_EQ(set.get_uint("llama.block_count"), 11u);
  EXPECT_EQ(set.get_string_array("tokenizer.ggml.tokens"), whole.get_string_array("tokenizer.ggml.tokens"));
  ASSERT_EQ(set.tensors().size(), whole.tensors().size());
  for (size_t k = 0; k < whole.tensors().size(); ++k) {
    const GgufTensorInfo& a = set.tensors()[k];
    const GgufTensorInfo& b = whole.tensors()[k];
    SCOPED_TRACE(b.name);
    EXPECT_EQ(a.name, b.name);  // in the order written, file after file
    EXPECT_EQ(a.dims, b.dims);
    EXPECT_EQ(a.type, b.type);
    ASSERT_EQ(a.size_bytes, b.size_bytes);
    EXPECT_EQ(set.find_tensor(a.name), &a);
    EXPECT_EQ(std::memcmp(set.tensor_data(a), whole.tensor_data(b), b.size_bytes), 0);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(set.tensor_data(a)) % set.alignment(), 0u);
  }
}

// A set written file by file with the given split.* keys: files[i] holds the named tensors (and the
// first the architecture), as a writer of sets other than GgufWriter::write_split could write it.
struct Part {
  std::vector<std::string> tensor_names;
  std::vector<std::pair<std::string, GgufValue>> keys;
};
std::vector<std::string> write_set(const test::TempDir& dir, const std::vector<Tensor>& tensors,
                                   const std::string& name, const std::vector<Part>& parts) {
  std::vector<std::string> paths;
  for (size_t i = 0; i < parts.size(); ++i) {
    GgufWriter part;
    if (i == 0) part.set_string("general.architecture", "llama");
    for (const auto& [key, value] : parts[i].keys) part.set(key, value);
    for (const std::string& t : parts[i].tensor_names) {
      for (const Tensor& tensor : tensors) {
        if (tensor.name == t) part.add_tensor(tensor.name, tensor.dims, tensor.type, tensor.data);
      }
    }
    paths.push_back(
        gguf_split_path((dir.path() / name).string(), static_cast<int>(i), static_cast<int>(parts.size())));
    part.write(paths.back());
  }
  return paths;
}

GgufValue u16(uint64_t v) { return GgufValue::make_uint(GgufValueType::UINT16, v); }
GgufValue i32(int64_t v) { return GgufValue::make_int(GgufValueType::INT32, v); }

TEST(GgufSplit, AWrittenSetReadsAsTheWholeFile) {
  test::TempDir dir;
  const std::vector<Tensor> tensors = sample_tensors();
  for (const uint32_t alignment : {32u, 64u}) {
    SCOPED_TRACE(alignment);
    const GgufWriter w = sample_writer(tensors, alignment);
    const fs::path whole_path = dir.path() / ("whole-" + std::to_string(alignment) + ".gguf");
    w.write(whole_path.string());
    const auto whole = GgufFile::open(whole_path.string());

    const std::string prefix = (dir.path() / ("model-" + std::to_string(alignment))).string();
    const std::vector<std::string> paths = w.write_split(prefix, {.max_tensors = 4});
    ASSERT_EQ(paths.size(), 3u);  // 4 + 4 + 3
    EXPECT_EQ(paths[0], prefix + "-00001-of-00003.gguf");
    EXPECT_EQ(paths[2], prefix + "-00003-of-00003.gguf");
    const auto set = GgufFile::open(paths[0]);
    EXPECT_EQ(set->split_count(), 3);
    EXPECT_EQ(set->split_paths(), paths);
    EXPECT_EQ(set->path(), paths[0]);
    EXPECT_EQ(set->alignment(), alignment);
    uint64_t bytes = 0;
    for (const std::string& p : paths) bytes += fs::file_size(p);
    EXPECT_EQ(set->file_size(), bytes);
    // The split.* keys frame the set; they are not the model's metadata.
    EXPECT_FALSE(set->has("split.count"));
    EXPECT_FALSE(set->has("split.no"));
    EXPECT_FALSE(set->has("split.tensors.count"));
    for (size_t k = 0; k < tensors.size(); ++k) EXPECT_EQ(set->tensors()[k].split, k / 4) << k;
    expect_same_model(*set, *whole);

    // Each file is a GGUF file of its own, as llama.cpp's are: its header counts its own tensors;
    // the first holds the metadata, the others only the three split.* keys (and the alignment).
    const uint64_t kv_first = whole->metadata().size() + 3;
    const uint64_t kv_other = 3 + (alignment != 32 ? 1 : 0);
    for (size_t i = 0; i < paths.size(); ++i) {
      const std::vector<uint8_t> bytes_of_file = test::read_file_bytes(paths[i]);
      ASSERT_GE(bytes_of_file.size(), 24u);
      uint64_t tensor_count = 0, kv_count = 0;
      std::memcpy(&tensor_count, bytes_of_file.data() + 8, 8);
      std::memcpy(&kv_count, bytes_of_file.data() + 16, 8);
      EXPECT_EQ(tensor_count, i < 2 ? 4u : 3u) << paths[i];
      EXPECT_EQ(kv_count, i == 0 ? kv_first : kv_other) << paths[i];
    }
  }
}

TEST(GgufSplit, SizeLimitCutsBeforeTheTensorThatWouldPassIt) {
  test::TempDir dir;
  const std::vector<Tensor> tensors = sample_tensors();
  const GgufWriter w = sample_writer(tensors);
  const fs::path whole_path = dir.path() / "whole.gguf";
  w.write(whole_path.string());
  const auto whole = GgufFile::open(whole_path.string());
  // 300 bytes: the Q4_K tensors (288) and F32 [9, 5] (180) fit alone, F32 [12, 5] (240) with little else.
  const uint64_t limit = 300;
  const std::vector<std::string> paths = w.write_split((dir.path() / "m").string(), {.max_bytes = limit});
  const auto set = GgufFile::open(paths[0]);
  EXPECT_EQ(set->split_count(), static_cast<int>(paths.size()));
  expect_same_model(*set, *whole);
  std::vector<uint64_t> file_bytes(paths.size());
  std::vector<int> file_tensors(paths.size());
  const auto& ts = set->tensors();
  for (size_t k = 0; k < ts.size(); ++k) {
    ASSERT_LT(ts[k].split, paths.size());
    if (k > 0) {
      EXPECT_GE(ts[k].split, ts[k - 1].split) << "tensors keep their order across the files";
    }
    file_bytes[ts[k].split] += ts[k].size_bytes;
    ++file_tensors[ts[k].split];
  }
  for (size_t i = 0; i < paths.size(); ++i) {
    SCOPED_TRACE(paths[i]);
    EXPECT_GE(file_tensors[i], 1);
    // Within the limit, or a tensor alone that is larger than it.
    EXPECT_TRUE(file_bytes[i] <= limit || file_tensors[i] == 1) << file_bytes[i];
  }
  // Greedy: a file ends only where its next tensor would pass the limit.
  for (size_t k = 1; k < ts.size(); ++k) {
    if (ts[k].split != ts[k - 1].split) {
      EXPECT_GT(file_bytes[ts[k - 1].split] + ts[k].size_bytes, limit) << ts[k].name;
    }
  }

  // No limit: one file, named as gguf-split names it, reading as a plain file.
  const std::vector<std::string> one = w.write_split((dir.path() / "one").string(), {});
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0], (dir.path() / "one-00001-of-00001.gguf").string());
  const auto single = GgufFile::open(one[0]);
  EXPECT_EQ(single->split_count(), 1);
  EXPECT_FALSE(single->has("split.count"));
  expect_same_model(*single, *whole);
}

// llama.cpp's gguf-split --no-tensor-in-metadata: the first file holds the metadata and no tensor.
TEST(GgufSplit, TheFirstFileMayHoldOnlyTheMetadata) {
  test::TempDir dir;
  const std::vector<Tensor> tensors = sample_tensors();
  const auto paths =
      write_set(dir, tensors, "meta-only",
                {{{}, {{"split.no", u16(0)}, {"split.count", u16(3)}, {"split.tensors.count", i32(3)}}},
                 {{tensors[0].name, tensors[1].name}, {{"split.no", u16(1)}, {"split.count", u16(3)}}},
                 {{tensors[2].name}, {{"split.no", u16(2)}, {"split.count", u16(3)}}}});
  // write_split writes such a set too.
  const GgufWriter w = sample_writer(tensors);
  const auto written =
      w.write_split((dir.path() / "written").string(), {.max_tensors = 6, .metadata_alone = true});
  ASSERT_EQ(written.size(), 3u);  // the metadata, 6 tensors, 5 tensors
  const auto whole_set = GgufFile::open(written[0]);
  EXPECT_EQ(whole_set->tensors().size(), tensors.size());
  EXPECT_EQ(whole_set->tensors().front().split, 1);
  EXPECT_EQ(whole_set->get_uint("llama.block_count"), 11u);
  const std::vector<uint8_t> first_file = test::read_file_bytes(written[0]);
  uint64_t first_tensors = 1;
  std::memcpy(&first_tensors, first_file.data() + 8, 8);
  EXPECT_EQ(first_tensors, 0u);

  const auto set = GgufFile::open(paths[0]);
  ASSERT_EQ(set->tensors().size(), 3u);
  for (int k = 0; k < 3; ++k) {
    const GgufTensorInfo& t = set->tensors()[k];
    EXPECT_EQ(t.name, tensors[k].name);
    EXPECT_EQ(t.split, k < 2 ? 1 : 2);
    ASSERT_EQ(t.size_bytes, tensors[k].data.size());
    EXPECT_EQ(std::memcmp(set->tensor_data(t), tensors[k].data.data(), t.size_bytes), 0);
  }
  EXPECT_EQ(set->get_string("general.architecture"), "llama");
}

TEST(GgufSplit, NamesFollowLlamaCpp) {
  EXPECT_EQ(gguf_split_path("dir/model", 0, 3), "dir/model-00001-of-00003.gguf");
  EXPECT_EQ(gguf_split_path("m", 11, 12), "m-00012-of-00012.gguf");
}

// A set opens by its first file only, and a broken set is refused naming the file and the problem.
TEST(GgufSplit, BrokenSetsAreRefusedByName) {
  test::TempDir dir;
  const std::vector<Tensor> tensors = sample_tensors();
  const GgufWriter w = sample_writer(tensors);
  const auto fresh_set = [&](const std::string& name, GgufSplitLimits limits = {.max_tensors = 4}) {
    return w.write_split((dir.path() / name).string(), limits);
  };

  {
    const auto paths = fresh_set("second");
    expect_gguf_error([&] { GgufFile::open(paths[1]); }, {paths[1], "file 2 of 3", "split.no = 1", paths[0]});
  }
  {
    const auto paths = fresh_set("missing");
    fs::remove(paths[2]);
    expect_gguf_error([&] { GgufFile::open(paths[0]); }, {"file 3 of 3", paths[2], "cannot open"});
  }
  {
    const auto paths = fresh_set("renamed");
    const fs::path renamed = dir.path() / "renamed.gguf";
    fs::rename(paths[0], renamed);
    expect_gguf_error([&] { GgufFile::open(renamed.string()); },
                      {renamed.string(), "3 files", "-00001-of-00003.gguf"});
  }
  {
    // Files 2 and 3 swapped: each says which it is.
    const auto paths = fresh_set("swapped");
    const fs::path scratch = dir.path() / "scratch";
    fs::rename(paths[1], scratch);
    fs::rename(paths[2], paths[1]);
    fs::rename(scratch, paths[2]);
    expect_gguf_error([&] { GgufFile::open(paths[0]); }, {paths[1], "says it is file 3 of 3"});
  }
  {
    // File 2 of another set of two files put in place of file 2 of three.
    const auto paths = fresh_set("mixed");
    const auto other = fresh_set("other", {.max_tensors = 6});
    ASSERT_EQ(other.size(), 2u);
    fs::copy_file(other[1], paths[1], fs::copy_options::overwrite_existing);
    expect_gguf_error([&] { GgufFile::open(paths[0]); }, {paths[1], "says it is file 2 of 2"});
  }
  {
    const auto paths = fresh_set("truncated");
    std::vector<uint8_t> bytes = test::read_file_bytes(paths[1]);
    bytes.resize(bytes.size() - 100);
    test::write_file_bytes(paths[1], bytes);
    expect_gguf_error([&] { GgufFile::open(paths[0]); },
                      {"file 2 of 3", paths[1], "past the end of the file"});
  }

  // Hand-made sets: the split.* keys as a writer of sets other than ours could get them wrong.
  const std::string a = tensors[0].name, b = tensors[1].name, c = tensors[2].name;
  {
    const auto paths =
        write_set(dir, tensors, "twice",
                  {{{a, b}, {{"split.no", u16(0)}, {"split.count", u16(2)}, {"split.tensors.count", i32(3)}}},
                   {{b, c}, {{"split.no", u16(1)}, {"split.count", u16(2)}}}});
    expect_gguf_error([&] { GgufFile::open(paths[0]); },
                      {"tensor '" + b + "' is in both", paths[0], paths[1]});
  }
  {
    const auto paths =
        write_set(dir, tensors, "count",
                  {{{a, b}, {{"split.no", u16(0)}, {"split.count", u16(2)}, {"split.tensors.count", i32(5)}}},
                   {{c}, {{"split.no", u16(1)}, {"split.count", u16(2)}}}});
    expect_gguf_error([&] { GgufFile::open(paths[0]); }, {"holds 3 tensors", "split.tensors.count says 5"});
  }
  {
    const auto paths = write_set(dir, tensors, "no-count",
                                 {{{a, b}, {{"split.no", u16(0)}, {"split.count", u16(2)}}},
                                  {{c}, {{"split.no", u16(1)}, {"split.count", u16(2)}}}});
    expect_gguf_error([&] { GgufFile::open(paths[0]); }, {"without split.tensors.count"});
  }
  {
    const auto paths =
        write_set(dir, tensors, "past", {{{a}, {{"split.no", u16(3)}, {"split.count", u16(1)}}}});
    expect_gguf_error([&] { GgufFile::open(paths[0]); }, {"split.no = 3 is not below split.count = 1"});
  }
  {
    const auto paths = write_set(dir, tensors, "zero", {{{a}, {{"split.count", u16(0)}}}});
    expect_gguf_error([&] { GgufFile::open(paths[0]); }, {"split.count = 0"});
  }
  {
    const auto paths =
        write_set(dir, tensors, "text", {{{a}, {{"split.count", GgufValue::make_string("2")}}}});
    expect_gguf_error([&] { GgufFile::open(paths[0]); }, {"split.count", "STRING"});
  }
}

}  // namespace
}  // namespace nibble::model
