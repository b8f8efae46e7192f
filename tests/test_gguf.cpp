// GGUF reader and writer: round trips of every value type and tensor type, hand-crafted bad
// files with the expected error, and robustness against truncated and bit-flipped copies of
// project-made and fixture models (a corrupt file must give GgufError, never a crash).
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <tuple>

#include "kernels/quantize.hpp"
#include "model/gguf.hpp"
#include "model/llama_config.hpp"
#include "model/llama_weights.hpp"
#include "model/random_model.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::model {
namespace {

namespace fs = std::filesystem;
using kernels::DType;
using V = GgufValue;
using T = GgufValueType;

// Runs `fn`, expecting a GgufError whose message contains every one of `words`; returns the message.
template <typename Fn>
std::string expect_gguf_error(Fn&& fn, std::initializer_list<const char*> words) {
  try {
    fn();
  } catch (const GgufError& e) {
    const std::string msg = e.what();
    for (const char* w : words) EXPECT_NE(msg.find(w), std::string::npos) << "'" << w << "' not in: " << msg;
    return msg;
  }
  ADD_FAILURE() << "expected a GgufError";
  return "";
}

std::vector<uint8_t> random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

std::vector<uint8_t> quantized(DType type, const std::vector<float>& x, int64_t row_length) {
  const int64_t rows = static_cast<int64_t>(x.size()) / row_length;
  const int64_t rb = kernels::row_bytes(type, row_length);
  std::vector<uint8_t> out(static_cast<size_t>(rb * rows));
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(kernels::quantize_row(type, x.data() + r * row_length, out.data() + r * rb, row_length),
              kernels::Status::ok);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST(Gguf, RoundTripsEveryValueType) {
  test::TempDir dir;
  const fs::path path = dir.path() / "values.gguf";
  GgufWriter w;
  w.set("u8", V::make_uint(T::UINT8, 200));
  w.set("i8", V::make_int(T::INT8, -100));
  w.set("u16", V::make_uint(T::UINT16, 60000));
  w.set("i16", V::make_int(T::INT16, -30000));
  w.set_uint32("u32", 4000000000u);
  w.set_int32("i32", -2000000000);
  w.set_uint64("u64", 18000000000000000000ull);
  w.set("i64", V::make_int(T::INT64, -9000000000000000000ll));
  w.set_float32("f32", 0.15625f);
  w.set("f64", V::make_float(T::FLOAT64, 3.141592653589793));
  w.set_bool("yes", true);
  w.set_bool("no", false);
  w.set_string("str", "héllo ▁wörld");
  w.set_string("empty", "");
  w.set_string("binary", std::string("a\0\xff\xfe", 4));  // not UTF-8, embedded NUL
  w.set_string_array("strs", {"a", "", "▁the", std::string("\x80", 1)});
  w.set_float_array("floats", {1.5f, -2.25f, 1e-30f});
  w.set_int32_array("ints", {-1, 0, 2147483647});
  w.set("u8s", V::make_array(T::UINT8, {V::make_uint(T::UINT8, 1), V::make_uint(T::UINT8, 255)}));
  w.set("u64s", V::make_array(T::UINT64, {V::make_uint(T::UINT64, 1ull << 40)}));
  w.set("f64s", V::make_array(T::FLOAT64, {V::make_float(T::FLOAT64, 0.1)}));
  w.set("bools", V::make_array(T::BOOL, {V::make_bool(true), V::make_bool(false)}));
  w.set("empty_array", V::make_array(T::INT16, {}));
  w.set("nested",
        V::make_array(T::ARRAY, {V::make_array(T::INT32, {V::make_int(T::INT32, 7)}),
                                 V::make_array(T::STRING, {V::make_string("x"), V::make_string("y")})}));
  w.set_uint32("replaced", 1);
  w.set_uint32("replaced", 2);  // set() replaces
  w.write(path.string());

  const auto f = GgufFile::open(path.string());
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->metadata().size(), 25u);
  EXPECT_EQ(f->find("u8")->type, T::UINT8);
  EXPECT_EQ(f->get_uint("u8"), 200u);
  EXPECT_EQ(f->find("i8")->type, T::INT8);
  EXPECT_EQ(f->find("i8")->i, -100);
  EXPECT_EQ(f->get_uint("u16"), 60000u);
  EXPECT_EQ(f->find("i16")->i, -30000);
  EXPECT_EQ(f->get_uint("u32"), 4000000000u);
  EXPECT_EQ(f->find("i32")->type, T::INT32);
  EXPECT_EQ(f->find("i32")->i, -2000000000);
  EXPECT_EQ(f->get_uint("u64"), 18000000000000000000ull);
  EXPECT_EQ(f->find("i64")->i, -9000000000000000000ll);
  EXPECT_EQ(f->find("f32")->type, T::FLOAT32);
  EXPECT_EQ(f->get_float("f32"), 0.15625);
  EXPECT_EQ(f->find("f64")->type, T::FLOAT64);
  EXPECT_EQ(f->get_float("f64"), 3.141592653589793);
  EXPECT_EQ(f->find_bool("yes"), true);
  EXPECT_EQ(f->find_bool("no"), false);
  EXPECT_EQ(f->get_string("str"), "héllo ▁wörld");
  EXPECT_EQ(f->get_string("empty"), "");
  EXPECT_EQ(f->get_string("binary"), std::string("a\0\xff\xfe", 4));
  EXPECT_EQ(f->get_string_array("strs"), (std::vector<std::string>{"a", "", "▁the", std::string("\x80", 1)}));
  EXPECT_EQ(f->get_float_array("floats"), (std::vector<float>{1.5f, -2.25f, 1e-30f}));
  EXPECT_EQ(f->get_int_array("ints"), (std::vector<int64_t>{-1, 0, 2147483647}));
  EXPECT_EQ(f->get_int_array("u8s"), (std::vector<int64_t>{1, 255}));
  EXPECT_EQ(f->find("u8s")->array_type, T::UINT8);
  EXPECT_EQ(f->get_int_array("u64s"), (std::vector<int64_t>{1ll << 40}));
  EXPECT_EQ(f->get_float_array("f64s"), (std::vector<float>{0.1f}));
  ASSERT_EQ(f->find("bools")->array.size(), 2u);
  EXPECT_EQ(f->find("bools")->array_type, T::BOOL);
  EXPECT_EQ(f->find("bools")->array[0].u, 1u);
  EXPECT_EQ(f->find("bools")->array[1].u, 0u);
  EXPECT_EQ(f->find("empty_array")->array_type, T::INT16);
  EXPECT_TRUE(f->get_int_array("empty_array").empty());
  const GgufValue* nested = f->find("nested");
  ASSERT_NE(nested, nullptr);
  ASSERT_EQ(nested->array_type, T::ARRAY);
  ASSERT_EQ(nested->array.size(), 2u);
  EXPECT_EQ(nested->array[0].array_type, T::INT32);
  ASSERT_EQ(nested->array[0].array.size(), 1u);
  EXPECT_EQ(nested->array[0].array[0].i, 7);
  EXPECT_EQ(nested->array[1].array_type, T::STRING);
  ASSERT_EQ(nested->array[1].array.size(), 2u);
  EXPECT_EQ(nested->array[1].array[1].s, "y");
  EXPECT_EQ(f->get_uint("replaced"), 2u);
  EXPECT_TRUE(f->tensors().empty());
}

TEST(Gguf, TypedAccessorsCheckTypes) {
  test::TempDir dir;
  const fs::path path = dir.path() / "acc.gguf";
  GgufWriter w;
  w.set_int32("neg", -5);
  w.set_int32("pos", 5);
  w.set_string("s", "text");
  w.set_uint32("n", 3);
  w.set_float_array("fa", {1.0f});
  w.write(path.string());
  const auto f = GgufFile::open(path.string());
  EXPECT_EQ(f->get_uint("pos"), 5u);  // a non-negative signed value is a valid uint
  expect_gguf_error([&] { f->get_uint("neg"); }, {"acc.gguf", "neg", "INT32"});
  expect_gguf_error([&] { f->get_uint("s"); }, {"acc.gguf", "'s'", "STRING"});
  expect_gguf_error([&] { f->get_uint("absent"); }, {"acc.gguf", "absent", "missing"});
  expect_gguf_error([&] { f->get_string("n"); }, {"'n'", "UINT32", "STRING"});
  expect_gguf_error([&] { f->find_bool("n"); }, {"'n'", "BOOL"});
  expect_gguf_error([&] { f->get_string_array("fa"); }, {"'fa'", "ARRAY of FLOAT32"});
  expect_gguf_error([&] { f->get_int_array("fa"); }, {"'fa'"});
  expect_gguf_error([&] { f->get_float_array("s"); }, {"'s'"});
  EXPECT_EQ(f->get_float("n"), 3.0);  // integers read as floats
  EXPECT_FALSE(f->find_uint("absent").has_value());
  EXPECT_FALSE(f->find_float("absent").has_value());
  EXPECT_FALSE(f->find_string("absent").has_value());
  EXPECT_FALSE(f->find_bool("absent").has_value());
  EXPECT_EQ(f->find_string("s"), "text");
  EXPECT_TRUE(f->has("s"));
  EXPECT_FALSE(f->has("absent"));
}

struct TensorCase {
  std::string name;
  std::vector<int64_t> dims;
  DType type;
  std::vector<uint8_t> data;
};

void round_trip_tensors(uint64_t alignment) {
  test::TempDir dir;
  const fs::path path = dir.path() / "tensors.gguf";
  std::vector<TensorCase> cases;
  const auto f32 = test::random_floats(3 * 5, 1);
  cases.push_back({"odd_f32", {3, 5}, DType::F32, {}});  // 60 bytes: the next tensor needs padding
  cases.back().data.resize(f32.size() * 4);
  std::memcpy(cases.back().data.data(), f32.data(), cases.back().data.size());
  const auto x = test::random_floats(64 * 4, 2);
  cases.push_back({"q4_0", {64, 4}, DType::Q4_0, quantized(DType::Q4_0, x, 64)});
  cases.push_back({"q8_0", {64, 2, 2}, DType::Q8_0, quantized(DType::Q8_0, x, 64)});
  cases.push_back(
      {"f16", {7}, DType::F16, quantized(DType::F16, std::vector<float>(x.begin(), x.begin() + 7), 7)});
  cases.push_back({"bf16", {2, 2, 2, 2}, DType::BF16, random_bytes(32, 3)});
  cases.push_back({"q4_k", {256, 3}, DType::Q4_K, random_bytes(3 * 144, 4)});
  cases.push_back({"q5_k", {256, 2}, DType::Q5_K, random_bytes(2 * 176, 6)});
  cases.push_back({"q6_k", {512}, DType::Q6_K, random_bytes(2 * 210, 5)});
  cases.push_back({"q8_k", {256}, DType::Q8_K, random_bytes(292, 6)});
  cases.push_back({"iq4_xs", {512, 2}, DType::IQ4_XS, random_bytes(4 * 136, 7)});
  cases.push_back({"iq4_nl", {96}, DType::IQ4_NL, random_bytes(3 * 18, 8)});
  cases.push_back({"q4_1", {64, 3}, DType::Q4_1, random_bytes(6 * 20, 9)});
  cases.push_back({"q5_0", {32, 5}, DType::Q5_0, random_bytes(5 * 22, 10)});
  cases.push_back({"q5_1", {96}, DType::Q5_1, random_bytes(3 * 24, 11)});

  GgufWriter w;
  if (alignment != 32) w.set_uint32("general.alignment", static_cast<uint32_t>(alignment));
  w.set_string("general.architecture", "test");
  for (const auto& c : cases) w.add_tensor(c.name, c.dims, c.type, c.data);
  w.write(path.string());

  const auto f = GgufFile::open(path.string());
  EXPECT_EQ(f->alignment(), alignment);
  EXPECT_EQ(f->data_offset() % alignment, 0u);
  EXPECT_EQ(f->file_size(), fs::file_size(path));
  ASSERT_EQ(f->tensors().size(), cases.size());
  for (size_t k = 0; k < cases.size(); ++k) {
    const GgufTensorInfo& t = f->tensors()[k];  // file order is the order added
    const TensorCase& c = cases[k];
    SCOPED_TRACE(c.name);
    EXPECT_EQ(t.name, c.name);
    EXPECT_EQ(t.dims, c.dims);
    EXPECT_EQ(t.type, c.type);
    EXPECT_EQ(t.size_bytes, c.data.size());
    int64_t n = 1;
    for (int64_t d : c.dims) n *= d;
    EXPECT_EQ(t.n_elements, n);
    EXPECT_EQ(t.row_elements(), c.dims[0]);
    EXPECT_EQ(t.rows(), n / c.dims[0]);
    EXPECT_EQ(t.offset % alignment, 0u);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(f->tensor_data(t)) % alignment, 0u);
    EXPECT_EQ(f->find_tensor(c.name), &t);
    EXPECT_EQ(std::memcmp(f->tensor_data(t), c.data.data(), c.data.size()), 0);
  }
  EXPECT_EQ(f->find_tensor("absent"), nullptr);
  // Quantized data decodes to values close to what was quantized.
  std::vector<float> y(64);
  ASSERT_EQ(kernels::dequantize_row(DType::Q4_0, f->tensor_data(*f->find_tensor("q4_0")), y.data(), 64),
            kernels::Status::ok);
  for (int j = 0; j < 64; ++j) EXPECT_NEAR(y[j], x[j], 0.1f);
}

TEST(Gguf, RoundTripsTensorsOfEveryTypeAligned) { round_trip_tensors(32); }
// Made tensors (GgufWriter::add_tensor_made): each made once a write, at its turn between the others, and
// written as made; a wrong size or a failure while making leaves no file and reports which tensor.
TEST(Gguf, MadeTensorsAreMadeAtTheirTurnAndCheckedAsMade) {
  test::TempDir dir;
  const std::vector<uint8_t> a = random_bytes(2 * 18, 1), b = random_bytes(5 * 4, 2), c = random_bytes(18, 3);
  std::vector<std::string> order;
  GgufWriter w;
  w.set_string("general.architecture", "test");
  w.add_tensor("a", {32, 2}, DType::Q4_0, a);
  w.add_tensor_made("b", {5}, DType::F32, [&] {
    order.push_back("b");
    return b;
  });
  w.add_tensor_made("c", {32}, DType::Q4_0, [&] {
    order.push_back("c");
    return c;
  });
  const fs::path path = dir.path() / "made.gguf";
  w.write(path.string());
  EXPECT_EQ(order, (std::vector<std::string>{"b", "c"}));
  const auto f = GgufFile::open(path.string());
  ASSERT_EQ(f->tensors().size(), 3u);
  EXPECT_EQ(std::vector<uint8_t>(f->tensor_data(f->tensors()[1]), f->tensor_data(f->tensors()[1]) + b.size()),
            b);
  EXPECT_EQ(std::vector<uint8_t>(f->tensor_data(f->tensors()[2]), f->tensor_data(f->tensors()[2]) + c.size()),
            c);
  w.write((dir.path() / "again.gguf").string());
  EXPECT_EQ(order.size(), 4u) << "made again for a second write";

  GgufWriter short_one;
  short_one.add_tensor_made("short", {32}, DType::Q4_0, [] { return std::vector<uint8_t>(17); });
  const fs::path bad = dir.path() / "short.gguf";
  expect_gguf_error([&] { short_one.write(bad.string()); }, {"'short'", "made 17 bytes long, not 18"});
  EXPECT_FALSE(fs::exists(bad));
  EXPECT_FALSE(fs::exists(bad.string() + ".tmp"));
  GgufWriter failing;
  failing.add_tensor_made("fails", {32}, DType::Q4_0, []() -> std::vector<uint8_t> {
    throw std::runtime_error("cannot quantize 'fails'");
  });
  const fs::path failed = dir.path() / "failed.gguf";
  EXPECT_THROW(failing.write(failed.string()), std::runtime_error);
  EXPECT_FALSE(fs::exists(failed));
  EXPECT_FALSE(fs::exists(failed.string() + ".tmp"));
  // Shapes and types are checked when added, as for any tensor.
  EXPECT_THROW(failing.add_tensor_made("odd", {33}, DType::Q4_0, [] { return std::vector<uint8_t>(); }),
               GgufError);
  EXPECT_THROW(failing.add_tensor_made("fails", {32}, DType::Q4_0, [] { return std::vector<uint8_t>(18); }),
               GgufError);
}

// Tensors filled later (GgufWriter::add_tensor_later, start): filled in any order, the file is byte for
// byte the one written with every tensor at once, a hole at the end included; and it appears at its path
// only when finished.
TEST(Gguf, TensorsFilledLaterInAnyOrderMakeTheSameFile) {
  test::TempDir dir;
  const std::vector<uint8_t> a = random_bytes(3 * 18, 1), b = random_bytes(7 * 4, 2),
                             c = random_bytes(5 * 18, 3), d = random_bytes(3 * 4, 4);
  GgufWriter whole, later;
  for (GgufWriter* w : {&whole, &later}) {
    w->set_string("general.architecture", "test");
    w->set_uint32("general.alignment", 64);
  }
  whole.add_tensor("a", {32, 3}, DType::Q4_0, a);
  whole.add_tensor("b", {7}, DType::F32, b);
  whole.add_tensor("c", {32, 5}, DType::Q4_0, c);
  whole.add_tensor("d", {3}, DType::F32, d);
  later.add_tensor_later("a", {32, 3}, DType::Q4_0);
  later.add_tensor_made("b", {7}, DType::F32, [&] { return b; });
  later.add_tensor_later("c", {32, 5}, DType::Q4_0);
  later.add_tensor_later("d", {3}, DType::F32);  // a hole at the end of the file until filled
  const fs::path expected = dir.path() / "whole.gguf", path = dir.path() / "later.gguf";
  whole.write(expected.string());
  {
    PartialFile file = later.start(path.string());
    EXPECT_EQ(fs::file_size(path.string() + ".tmp"), fs::file_size(expected)) << "the hole at the end";
    file.fill("d", d);
    file.fill("a", a);
    file.fill("c", c.data(), c.size());
    EXPECT_FALSE(fs::exists(path)) << "at its path before it was finished";
    file.finish();
  }
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));
  EXPECT_EQ(test::read_file_bytes(path), test::read_file_bytes(expected));
  EXPECT_EQ(GgufFile::open(path.string())->tensors().size(), 4u);
}

// Filling is checked (an unknown name, a second fill, a wrong size, a tensor never filled: each named),
// a writer with tensors to fill later is not written whole, and a file never finished leaves nothing.
TEST(Gguf, FillingLaterIsCheckedAndAnUnfinishedFileLeavesNothing) {
  test::TempDir dir;
  GgufWriter w;
  w.set_string("general.architecture", "test");
  w.add_tensor("a", {32}, DType::Q4_0, random_bytes(18, 1));
  w.add_tensor_later("b", {32, 2}, DType::Q4_0);
  w.add_tensor_later("c", {4}, DType::F32);
  const fs::path path = dir.path() / "m.gguf";
  expect_gguf_error([&] { w.write(path.string()); }, {"'b'", "filled later"});
  expect_gguf_error([&] { w.write_split((dir.path() / "s").string(), {}); }, {"'b'", "filled later"});
  EXPECT_THROW(w.add_tensor_later("b", {32}, DType::Q4_0), GgufError);  // a duplicate name
  EXPECT_THROW(w.add_tensor_later("odd", {33}, DType::Q4_0), GgufError);
  {
    PartialFile file = w.start(path.string());
    expect_gguf_error([&] { file.fill("a", random_bytes(18, 1)); }, {"'a'", "not added to be filled later"});
    expect_gguf_error([&] { file.fill("nope", random_bytes(18, 1)); }, {"'nope'"});
    expect_gguf_error([&] { file.fill("b", random_bytes(35, 1)); }, {"'b'", "35 bytes, not 36"});
    file.fill("b", random_bytes(36, 2));
    expect_gguf_error([&] { file.fill("b", random_bytes(36, 2)); }, {"'b'", "filled twice"});
    expect_gguf_error([&] { file.finish(); }, {"'c'", "never filled"});
    EXPECT_FALSE(fs::exists(path));
  }  // dropped unfinished, as a failed run's is
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(fs::exists(path.string() + ".tmp"));
  // A path that cannot be written fails at start, before any tensor is filled.
  expect_gguf_error([&] { (void)w.start((dir.path() / "no-such-dir" / "m.gguf").string()); },
                    {"cannot create"});
  // Moved, the file is finished once, by its new owner.
  PartialFile first = w.start(path.string());
  PartialFile moved = std::move(first);
  moved.fill("b", random_bytes(36, 3));
  moved.fill("c", random_bytes(16, 4));
  moved.finish();
  expect_gguf_error([&] { moved.finish(); }, {"finished already"});
  EXPECT_EQ(GgufFile::open(path.string())->tensors().size(), 3u);
}

// Released pages read back the same (from the file), each tensor alone and every one in turn.
TEST(Gguf, ReleasedPagesReadBackTheSame) {
  test::TempDir dir;
  const fs::path path = dir.path() / "pages.gguf";
  GgufWriter w;
  std::vector<std::vector<uint8_t>> data;
  for (int i = 0; i < 5; ++i) {
    data.push_back(random_bytes(static_cast<size_t>(4 * (3000 + 1111 * i)), static_cast<uint32_t>(i)));
    w.add_tensor(std::string("t").append(std::to_string(i)), {3000 + 1111 * i}, DType::F32, data.back());
  }
  w.write(path.string());
  const auto f = GgufFile::open(path.string());
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < data.size(); ++i) {
      const GgufTensorInfo& t = f->tensors()[i];
      f->release_pages(t);
      EXPECT_EQ(std::vector<uint8_t>(f->tensor_data(t), f->tensor_data(t) + t.size_bytes), data[i]) << t.name;
    }
  }
}

TEST(Gguf, HonoursGeneralAlignment) {
  round_trip_tensors(64);
  round_trip_tensors(8);
}

TEST(Gguf, AcceptsVersion2) {
  test::TempDir dir;
  const fs::path path = dir.path() / "v2.gguf";
  GgufWriter w;
  w.set_uint32("k", 1);
  w.add_tensor("t", {32}, DType::F32, std::vector<uint8_t>(128, 0));
  w.write(path.string());
  auto bytes = test::read_file_bytes(path);
  bytes[4] = 2;  // v2 has the same layout as v3 (v3 only added big-endian support)
  test::write_file_bytes(path, bytes);
  const auto f = GgufFile::open(path.string());
  EXPECT_EQ(f->version(), 2u);
  EXPECT_EQ(f->tensors().size(), 1u);
}

TEST(Gguf, WriterRejectsBadInput) {
  GgufWriter w;
  expect_gguf_error(
      [&] {
        w.add_tensor("t", {32, 2}, DType::F32, std::vector<uint8_t>(100));
      },
      {"'t'", "bytes"});
  expect_gguf_error([&] { w.add_tensor("q", {48}, DType::Q4_0, std::vector<uint8_t>(27)); }, {"block size"});
  expect_gguf_error([&] { w.add_tensor("z", {0}, DType::F32, {}); }, {"'z'"});
  expect_gguf_error(
      [&] {
        w.add_tensor("d", {1, 1, 1, 1, 1}, DType::F32, std::vector<uint8_t>(4));
      },
      {"dims"});
  expect_gguf_error([&] { w.add_tensor(std::string(64, 'n'), {1}, DType::F32, std::vector<uint8_t>(4)); },
                    {"name"});
  w.add_tensor("ok", {1}, DType::F32, std::vector<uint8_t>(4));
  expect_gguf_error([&] { w.add_tensor("ok", {1}, DType::F32, std::vector<uint8_t>(4)); }, {"duplicate"});
  expect_gguf_error([&] { w.set("mixed", V::make_array(T::INT32, {V::make_uint(T::UINT8, 1)})); }, {"mixed"});
  test::TempDir dir;
  GgufWriter bad_alignment;
  bad_alignment.set_uint32("general.alignment", 48);
  expect_gguf_error([&] { bad_alignment.write((dir.path() / "a.gguf").string()); }, {"power of two"});
  GgufWriter ok;
  expect_gguf_error([&] { ok.write((dir.path() / "no_such_dir" / "x.gguf").string()); }, {"no_such_dir"});
}

// ---------------------------------------------------------------------------------------------
// Hand-crafted bad files

// Builds GGUF bytes field by field, so that any field can hold any (bad) value.
class RawGguf {
 public:
  RawGguf& u8(uint8_t v) { return put(v); }
  RawGguf& u32(uint32_t v) { return put(v); }
  RawGguf& u64(uint64_t v) { return put(v); }
  RawGguf& i64(int64_t v) { return put(v); }
  RawGguf& str(const std::string& s) {
    u64(s.size());
    bytes.insert(bytes.end(), s.begin(), s.end());
    return *this;
  }
  RawGguf& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    return u32(0x46554747).u32(version).u64(n_tensors).u64(n_kv);  // "GGUF" little-endian
  }
  RawGguf& kv_u32(const std::string& key, uint32_t v) { return str(key).u32(uint32_t(T::UINT32)).u32(v); }
  RawGguf& tensor(const std::string& name, std::vector<int64_t> dims, uint32_t type, uint64_t offset) {
    str(name).u32(static_cast<uint32_t>(dims.size()));
    for (int64_t d : dims) i64(d);
    return u32(type).u64(offset);
  }
  RawGguf& pad(size_t alignment = 32) {
    while (bytes.size() % alignment != 0) bytes.push_back(0);
    return *this;
  }
  RawGguf& data(size_t n) {
    bytes.resize(bytes.size() + n, 0);
    return *this;
  }
  std::vector<uint8_t> bytes;

 private:
  template <typename X>
  RawGguf& put(X v) {
    const size_t at = bytes.size();
    bytes.resize(at + sizeof v);
    std::memcpy(bytes.data() + at, &v, sizeof v);
    return *this;
  }
};

class GgufBadFile : public ::testing::Test {
 protected:
  // Writes `raw` to a file named `name` and expects open() to fail with all of `words`.
  void expect_error(const std::string& name, const RawGguf& raw, std::initializer_list<const char*> words) {
    const fs::path path = dir_.path() / name;
    test::write_file_bytes(path, raw.bytes);
    SCOPED_TRACE(name);
    const std::string msg = expect_gguf_error([&] { GgufFile::open(path.string()); }, words);
    EXPECT_NE(msg.find(name), std::string::npos) << "message does not name the file: " << msg;
  }
  fs::path write(const std::string& name, const RawGguf& raw) {
    const fs::path path = dir_.path() / name;
    test::write_file_bytes(path, raw.bytes);
    return path;
  }
  test::TempDir dir_;
};

TEST_F(GgufBadFile, ValidRawFileOpens) {
  // The builder itself makes good files: the bad ones below differ in one field each.
  RawGguf r;
  r.header(2, 1).kv_u32("a", 1).tensor("x", {32}, 0, 0).tensor("y", {32, 2}, 8, 128).pad().data(128 + 68);
  const auto f = GgufFile::open(write("good.gguf", r).string());
  ASSERT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(f->tensors()[1].size_bytes, 68u);
  EXPECT_EQ(f->data_offset() + 128 + 68, f->file_size());
}

TEST_F(GgufBadFile, BadMagic) {
  RawGguf r;
  r.header(0, 0);
  r.bytes[3] = 'X';
  expect_error("magic.gguf", r, {"magic", "GGUX"});
}

TEST_F(GgufBadFile, MissingFileAndEmptyFile) {
  expect_gguf_error([&] { GgufFile::open((dir_.path() / "absent.gguf").string()); },
                    {"absent.gguf", "cannot open"});
  expect_error("empty.gguf", RawGguf{}, {"empty"});
  expect_gguf_error([&] { GgufFile::open(dir_.path().string()); }, {"not a regular file"});
}

TEST_F(GgufBadFile, UnsupportedVersions) {
  RawGguf v99;
  v99.header(0, 0, 99);
  expect_error("v99.gguf", v99, {"version 99"});
  RawGguf v1;
  v1.header(0, 0, 1);
  expect_error("v1.gguf", v1, {"version 1"});
  RawGguf big;
  big.header(0, 0, 0x03000000);
  expect_error("bigendian.gguf", big, {"big-endian"});
}

TEST_F(GgufBadFile, ImpossibleCounts) {
  RawGguf kv;
  kv.header(0, 1ull << 40).kv_u32("a", 1);
  expect_error("kvcount.gguf", kv, {"key/value count", "impossible"});
  RawGguf tensors;
  tensors.header(~0ull, 0);
  expect_error("tcount.gguf", tensors, {"tensor count", "impossible"});
}

TEST_F(GgufBadFile, StringLengthPastEndOfFile) {
  RawGguf r;
  r.header(0, 1).u64(1000000).u8('a').data(64);
  expect_error("strlen.gguf", r, {"length 1000000", "larger than"});
  RawGguf value;
  value.header(0, 1).str("k").u32(uint32_t(T::STRING)).u64(~0ull);
  expect_error("strlen2.gguf", value, {"length", "larger than"});
}

TEST_F(GgufBadFile, UnknownValueType) {
  RawGguf r;
  r.header(0, 1).str("k").u32(13).u32(0);
  expect_error("vtype.gguf", r, {"'k'", "unknown value type 13"});
  RawGguf arr;
  arr.header(0, 1).str("k").u32(uint32_t(T::ARRAY)).u32(77).u64(0);
  expect_error("atype.gguf", arr, {"'k'", "unknown element type 77"});
}

TEST_F(GgufBadFile, ArrayLengthPastEndOfFile) {
  RawGguf r;
  r.header(0, 1).str("arr").u32(uint32_t(T::ARRAY)).u32(uint32_t(T::UINT32)).u64(1ull << 60).u32(1);
  expect_error("alen.gguf", r, {"'arr'", "array of 1152921504606846976"});
}

TEST_F(GgufBadFile, ArraysNestedTooDeep) {
  RawGguf r;
  r.header(0, 1).str("deep").u32(uint32_t(T::ARRAY));
  for (int d = 0; d < 8; ++d) r.u32(uint32_t(T::ARRAY)).u64(1);
  r.u32(uint32_t(T::UINT8)).u64(0);
  expect_error("deep.gguf", r, {"'deep'", "deeper"});
}

TEST_F(GgufBadFile, InvalidBool) {
  RawGguf r;
  r.header(0, 1).str("b").u32(uint32_t(T::BOOL)).u8(7);
  expect_error("bool.gguf", r, {"'b'", "BOOL"});
}

TEST_F(GgufBadFile, DuplicateKey) {
  RawGguf r;
  r.header(0, 2).kv_u32("same.key", 1).kv_u32("same.key", 2);
  expect_error("dupkey.gguf", r, {"duplicate", "same.key"});
}

TEST_F(GgufBadFile, AlignmentNotPowerOfTwo) {
  RawGguf r;
  r.header(0, 1).kv_u32("general.alignment", 48);
  expect_error("align48.gguf", r, {"general.alignment", "48", "power of two"});
  RawGguf zero;
  zero.header(0, 1).kv_u32("general.alignment", 0);
  expect_error("align0.gguf", zero, {"power of two"});
  // Fuzzing's find: an alignment of 1 let an F16 tensor start at an odd address.
  RawGguf one;
  one.header(0, 1).kv_u32("general.alignment", 1);
  expect_error("align1.gguf", one, {"general.alignment = 1", "between 8 and 2^30"});
  RawGguf text;
  text.header(0, 1).str("general.alignment").u32(uint32_t(T::STRING)).str("32");
  expect_error("aligntext.gguf", text, {"general.alignment", "STRING"});
}

TEST_F(GgufBadFile, UnknownTensorType) {
  RawGguf r;
  r.header(1, 0).tensor("w", {32}, 77, 0).pad().data(128);
  expect_error("ttype.gguf", r, {"'w'", "unknown tensor type 77"});
  // ggml's types Nibble does not read are named, with what to do instead.
  for (const auto& [id, name] : {std::pair{24u, "I8 (ggml type 24)"}, std::pair{28u, "F64 (ggml type 28)"},
                                 std::pair{33u, "Q4_0_8_8 (removed from ggml) (ggml type 33)"}}) {
    RawGguf named;
    named.header(1, 0).tensor("blk.0.attn_q.weight", {256}, id, 0).pad().data(256);
    expect_error("named-" + std::to_string(id) + ".gguf", named,
                 {"'blk.0.attn_q.weight' is ", name, "which Nibble does not read", "nibble quantize"});
  }
}

TEST_F(GgufBadFile, TensorOffsetPastEnd) {
  RawGguf r;
  r.header(1, 0).tensor("w", {32}, 0, 1 << 20).pad().data(128);
  expect_error("offset.gguf", r, {"'w'", "past the end"});
  RawGguf huge;  // offset + size would overflow 64 bits
  huge.header(1, 0).tensor("w", {32}, 0, ~0ull - 31).pad().data(128);
  expect_error("offset2.gguf", huge, {"'w'", "past the end"});
  RawGguf short_data;  // the tensor's last bytes are missing
  short_data.header(1, 0).tensor("w", {32}, 0, 0).pad().data(127);
  expect_error("shortdata.gguf", short_data, {"'w'", "past the end"});
}

TEST_F(GgufBadFile, MisalignedOffset) {
  RawGguf r;
  r.header(1, 0).tensor("w", {32}, 0, 4).pad().data(256);
  expect_error("misaligned.gguf", r, {"'w'", "offset 4", "aligned"});
}

TEST_F(GgufBadFile, BadDims) {
  RawGguf zero;
  zero.header(1, 0).tensor("w", {32, 0}, 0, 0).pad().data(128);
  expect_error("zerodim.gguf", zero, {"'w'", "dim 1 = 0"});
  RawGguf negative;
  negative.header(1, 0).tensor("w", {-32}, 0, 0).pad().data(128);
  expect_error("negdim.gguf", negative, {"'w'", "dim 0 = -32"});
  RawGguf many;
  many.header(1, 0).tensor("w", {1, 1, 1, 1, 32}, 0, 0).pad().data(128);
  expect_error("fivedims.gguf", many, {"'w'", "5 dims"});
  RawGguf none;
  none.header(1, 0).tensor("w", {}, 0, 0).pad().data(128);
  expect_error("nodims.gguf", none, {"'w'", "0 dims"});
  RawGguf overflow;
  overflow.header(1, 0).tensor("w", {1ll << 40, 1ll << 40}, 0, 0).pad().data(128);
  expect_error("overflow.gguf", overflow, {"'w'", "overflow"});
  RawGguf bytes_overflow;  // the element count fits in int64, the byte count does not
  bytes_overflow.header(1, 0).tensor("w", {1ll << 31, 1ll << 31}, 0, 0).pad().data(128);
  expect_error("overflow2.gguf", bytes_overflow, {"'w'", "overflow"});
}

TEST_F(GgufBadFile, RowNotMultipleOfBlock) {
  RawGguf r;
  r.header(1, 0).tensor("w", {48, 2}, uint32_t(DType::Q4_0), 0).pad().data(256);
  expect_error("block.gguf", r, {"'w'", "row length 48", "block size 32"});
}

TEST_F(GgufBadFile, DuplicateTensorName) {
  RawGguf r;
  r.header(2, 0).tensor("w", {32}, 0, 0).tensor("w", {32}, 0, 128).pad().data(256);
  expect_error("duptensor.gguf", r, {"duplicate tensor", "'w'"});
}

TEST_F(GgufBadFile, OverlappingTensors) {
  RawGguf r;
  r.header(2, 0).tensor("a", {64}, 0, 0).tensor("b", {32}, 0, 128).pad().data(512);
  expect_error("overlap.gguf", r, {"'a'", "'b'", "overlap"});
}

TEST_F(GgufBadFile, BadTensorNames) {
  RawGguf empty;
  empty.header(1, 0).tensor("", {32}, 0, 0).pad().data(128);
  expect_error("emptyname.gguf", empty, {"empty name"});
  RawGguf long_name;  // llama.cpp's limit: names shorter than GGML_MAX_NAME (64)
  long_name.header(1, 0).tensor(std::string(64, 'x'), {32}, 0, 0).pad().data(128);
  expect_error("longname.gguf", long_name, {"64 bytes"});
  RawGguf longest;
  longest.header(1, 0).tensor(std::string(63, 'x'), {32}, 0, 0).pad().data(128);
  EXPECT_EQ(GgufFile::open(write("longest.gguf", longest).string())->tensors()[0].name.size(), 63u);
}

// ---------------------------------------------------------------------------------------------
// Corrupt copies of real files

long max_rss_kb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

// Tensors of a file that opened must lie inside the file without overlapping.
void expect_tensors_inside(const GgufFile& f) {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const GgufTensorInfo& t : f.tensors()) {
    EXPECT_LE(f.data_offset() + t.offset + t.size_bytes, f.file_size()) << t.name;
    EXPECT_GE(t.dims.size(), 1u);
    EXPECT_LE(t.dims.size(), 4u);
    ranges.emplace_back(t.offset, t.offset + t.size_bytes);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t k = 1; k < ranges.size(); ++k) EXPECT_LE(ranges[k - 1].second, ranges[k].first);
}

// Truncates a copy of `source` to many lengths: each must fail with GgufError. For files without
// tensors the last `alignment` bytes may be padding, so only cuts inside the metadata count.
void check_truncations(const fs::path& source, const fs::path& work) {
  const auto original = GgufFile::open(source.string());
  const uint64_t size = original->file_size();
  const uint64_t data_offset = original->data_offset();
  uint64_t must_have = data_offset > original->alignment() ? data_offset - original->alignment() : 0;
  for (const GgufTensorInfo& t : original->tensors()) {
    must_have = std::max(must_have, data_offset + t.offset + t.size_bytes);
  }
  std::set<uint64_t, std::greater<>> lengths = {0, 3, 4, 8, 23, 24, 25, data_offset / 2, must_have - 1};
  for (int k = 1; k < 16; ++k) lengths.insert(data_offset * k / 16);  // through metadata and tensor infos
  if (!original->tensors().empty()) {
    lengths.insert(data_offset - 1);
    lengths.insert(data_offset + 1);
    lengths.insert((data_offset + size) / 2);  // inside the data
  }
  fs::copy_file(source, work, fs::copy_options::overwrite_existing);
  fs::permissions(work, fs::perms::owner_read | fs::perms::owner_write);
  for (uint64_t len : lengths) {  // longest first, so one copy can be cut shorter and shorter
    if (len >= must_have) continue;
    fs::resize_file(work, len);
    SCOPED_TRACE(source.filename().string() + " truncated to " + std::to_string(len) + " bytes");
    EXPECT_THROW(GgufFile::open(work.string()), GgufError);
  }
}

// Flips 1 to 3 random bits in the header/metadata/tensor-info region, `trials` times: every
// result must either fail with GgufError or describe tensors that lie within the file.
void check_bit_flips(const fs::path& source, const fs::path& work, int trials, uint64_t seed) {
  const auto original = GgufFile::open(source.string());
  const uint64_t region = original->data_offset();
  std::vector<uint8_t> head(region);
  {
    std::ifstream in(source, std::ios::binary);
    in.read(reinterpret_cast<char*>(head.data()), static_cast<std::streamsize>(region));
  }
  fs::copy_file(source, work, fs::copy_options::overwrite_existing);
  fs::permissions(work, fs::perms::owner_read | fs::perms::owner_write);
  std::mt19937_64 rng(seed);
  int opened = 0;
  for (int trial = 0; trial < trials; ++trial) {
    std::vector<uint8_t> flipped = head;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < flips; ++k) {
      const uint64_t bit = rng() % (region * 8);
      flipped[bit / 8] ^= static_cast<uint8_t>(1u << (bit % 8));
    }
    {
      std::fstream out(work, std::ios::binary | std::ios::in | std::ios::out);
      out.write(reinterpret_cast<const char*>(flipped.data()), static_cast<std::streamsize>(region));
    }
    SCOPED_TRACE(source.filename().string() + " bit-flip trial " + std::to_string(trial));
    try {
      const auto f = GgufFile::open(work.string());
      ++opened;
      expect_tensors_inside(*f);
    } catch (const GgufError&) {
      // expected for most flips
    }
  }
  // Flips inside string bytes (token texts, names) change nothing structural: some must open.
  EXPECT_GT(opened, 0) << source;
}

fs::path make_project_model(const fs::path& dir) {
  const fs::path path = dir / "tiny-q4_0.gguf";
  write_random_llama(path.string(), llama_shape_by_name("tiny"), DType::Q4_0, 7);
  return path;
}

TEST(GgufCorruption, TruncatedProjectModelThrows) {
  test::TempDir dir;
  check_truncations(make_project_model(dir.path()), dir.path() / "cut.gguf");
}

TEST(GgufCorruption, BitFlippedProjectModelNeverCrashes) {
  test::TempDir dir;
  const long rss_before = max_rss_kb();
  check_bit_flips(make_project_model(dir.path()), dir.path() / "flip.gguf", 300, 11);
  EXPECT_LT(max_rss_kb() - rss_before, 512 * 1024) << "corrupt metadata caused a huge allocation";
}

std::vector<fs::path> fixture_ggufs(const fs::path& fixtures) {
  std::vector<fs::path> files;
  for (const char* sub : {"models", "tokenizer"}) {
    if (!fs::is_directory(fixtures / sub)) continue;
    for (const auto& entry : fs::directory_iterator(fixtures / sub)) {
      if (entry.path().extension() == ".gguf") files.push_back(entry.path());
    }
  }
  std::sort(files.begin(), files.end());
  return files;
}

TEST(GgufFixtures, EveryFixtureOpens) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  const auto files = fixture_ggufs(fixtures);
  ASSERT_FALSE(files.empty());
  for (const fs::path& path : files) {
    SCOPED_TRACE(path.string());
    const auto f = GgufFile::open(path.string());
    EXPECT_EQ(f->version(), 3u);
    EXPECT_FALSE(f->get_string_array("tokenizer.ggml.tokens").empty());
    expect_tensors_inside(*f);
    if (path.parent_path().filename() == "models") {
      EXPECT_EQ(f->get_string("general.architecture"), "llama");
      EXPECT_NE(f->find_tensor("token_embd.weight"), nullptr);
      EXPECT_NE(f->find_tensor("blk.0.attn_q.weight"), nullptr);
      EXPECT_EQ(f->get_string_array("tokenizer.ggml.tokens").size(), 32000u);
      EXPECT_EQ(f->get_float_array("tokenizer.ggml.scores").size(), 32000u);
    }
  }
  const auto tiny = GgufFile::open((fixtures / "models" / "tiny-llama-f32.gguf").string());
  EXPECT_EQ(tiny->get_uint("llama.embedding_length"), 128u);
  EXPECT_EQ(tiny->get_uint("llama.block_count"), 2u);
  const GgufTensorInfo* embd = tiny->find_tensor("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->dims, (std::vector<int64_t>{128, 32000}));
  EXPECT_EQ(embd->type, DType::F32);
}

TEST(GgufFixtures, TruncatedFixturesThrow) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  test::TempDir dir;
  for (const fs::path& path : fixture_ggufs(fixtures)) check_truncations(path, dir.path() / "cut.gguf");
}

TEST(GgufFixtures, BitFlippedFixturesNeverCrash) {
  NIBBLE_REQUIRE_FIXTURES(fixtures);
  test::TempDir dir;
  const long rss_before = max_rss_kb();
  uint64_t seed = 100;
  for (const fs::path& path : fixture_ggufs(fixtures))
    check_bit_flips(path, dir.path() / "flip.gguf", 300, seed++);
  EXPECT_LT(max_rss_kb() - rss_before, 1024 * 1024) << "corrupt metadata caused a huge allocation";
}

// `file` written again to `path` with metadata keys set (or dropped: nullopt) and tensors replaced
// (name -> dims, type, bytes), then opened.
struct GgufEdits {
  std::vector<std::pair<std::string, std::optional<GgufValue>>> metadata;
  std::map<std::string, std::tuple<std::vector<int64_t>, DType, std::vector<uint8_t>>> tensors;
};
std::shared_ptr<const GgufFile> edited_copy(const GgufFile& file, const fs::path& path,
                                            const GgufEdits& edits) {
  std::map<std::string, GgufValue> metadata = file.metadata();
  for (const auto& [key, value] : edits.metadata) {
    if (value) {
      metadata.insert_or_assign(key, *value);
    } else {
      metadata.erase(key);
    }
  }
  GgufWriter writer;
  for (const auto& [key, value] : metadata) writer.set(key, value);
  for (const GgufTensorInfo& tensor : file.tensors()) {
    if (const auto it = edits.tensors.find(tensor.name); it != edits.tensors.end()) {
      const auto& [dims, type, bytes] = it->second;
      writer.add_tensor(tensor.name, dims, type, bytes);
      continue;
    }
    const uint8_t* data = file.tensor_data(tensor);
    writer.add_tensor(tensor.name, tensor.dims, tensor.type,
                      std::vector<uint8_t>(data, data + tensor.size_bytes));
  }
  writer.write(path.string());
  return GgufFile::open(path.string());
}

// A model's hyperparameters come from its metadata: values its tensors cannot back are refused by
// name before anything is sized by them (fuzzing found a block_count of 2^31 that made room for as
// many layers before the first missing tensor was noticed).
TEST(GgufLlamaConfig, RefusesHyperparametersTheFileCannotBack) {
  test::TempDir dir;
  const fs::path good = dir.path() / "good.gguf";
  write_random_llama(good.string(), llama_shape_by_name("tiny"), DType::Q4_0, 1);
  const auto file = GgufFile::open(good.string());
  EXPECT_EQ(LlamaConfig::from_gguf(*file).n_layer, 2);
  EXPECT_EQ(LlamaConfig::from_gguf(*edited_copy(*file, dir.path() / "dense.gguf",
                                                {{{"llama.expert_count", V::make_uint(T::UINT32, 0)}}, {}}))
                .n_layer,
            2)
      << "an expert count of 0 is a dense model";
  // The file again with one metadata value changed.
  const auto changed = [&](const std::string& key, const GgufValue& value) {
    return edited_copy(*file, dir.path() / "changed.gguf", {{{key, value}}, {}});
  };
  struct Case {
    const char* key;
    GgufValue value;
    std::vector<const char*> words;
  };
  const Case cases[] = {
      {"llama.block_count",
       V::make_uint(T::UINT32, 1u << 31),
       {"llama.block_count = 2147483648, but tensor 'blk.2.attn_norm.weight' is missing"}},
      {"llama.block_count",
       V::make_uint(T::UINT32, 3),
       {"llama.block_count = 3, but tensor 'blk.2.attn_norm.weight' is missing"}},
      {"llama.rope.freq_base", V::make_float(T::FLOAT32, std::nan("")), {"must be positive and finite"}},
      {"llama.rope.freq_base", V::make_float(T::FLOAT32, INFINITY), {"must be positive and finite"}},
      {"llama.attention.layer_norm_rms_epsilon", V::make_float(T::FLOAT32, -1e-5), {"must be positive"}},
      {"llama.expert_count",
       V::make_uint(T::UINT32, 8),
       {"llama.expert_count = 8: mixture-of-experts models (Mixtral's) are not supported"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.key);
    const auto bad = changed(c.key, c.value);
    try {
      (void)LlamaConfig::from_gguf(*bad);
      ADD_FAILURE() << "accepted";
    } catch (const GgufError& e) {
      for (const char* word : c.words)
        EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  }
}

// RoPE scaling as llama.cpp reads it from a GGUF (llama_model::load_hparams, the rope_freqs tensor): a
// linear factor (type "linear" or no type; "none" ignores the factor; the older rope.scale_linear key),
// Llama 3.1's frequency factors, YaRN with llama.cpp's defaults, the attention factor; LongRoPE, which
// would run as plain RoPE, and factors that are not one positive float a rotated pair are refused by name.
TEST(GgufLlamaConfig, ReadsRopeScalingAsLlamaCppDoesAndRefusesWhatItCannotRun) {
  test::TempDir dir;
  LlamaShape shape = llama_shape_by_name("tiny");  // heads of 32: 16 rotated pairs
  shape.rope_linear_factor = 4.0f;
  shape.rope_freq_factors = llama3_rope_freq_factors({8.0, 1.0, 4.0, 32.0}, shape.rope_base, 32);
  const fs::path scaled = dir.path() / "scaled.gguf";
  write_random_llama(scaled.string(), shape, DType::Q8_0, 1);
  const auto file = GgufFile::open(scaled.string());
  const LlamaConfig c = LlamaConfig::from_gguf(*file);
  EXPECT_EQ(c.rope_freq_scale(), 0.25f);
  EXPECT_EQ(c.rope_freq_factors, shape.rope_freq_factors);
  EXPECT_EQ(c.rope_freq_factors.front(), 1.0f);
  EXPECT_EQ(c.rope_freq_factors.back(), 8.0f);
  const fs::path plain = dir.path() / "plain.gguf";
  write_random_llama(plain.string(), llama_shape_by_name("tiny"), DType::Q8_0, 1);
  const LlamaConfig p = LlamaConfig::from_gguf(*GgufFile::open(plain.string()));
  EXPECT_EQ(p.rope_freq_scale(), 1.0f);
  EXPECT_TRUE(p.rope_freq_factors.empty());

  // The file again with metadata keys set (or removed: nullopt) and rope_freqs.weight replaced.
  using Edits = std::vector<std::pair<std::string, std::optional<GgufValue>>>;
  int files = 0;
  const auto rewritten = [&](const Edits& edits, DType freqs_type = DType::F32,
                             std::vector<float> freqs = {}) {
    GgufEdits e{edits, {}};
    if (!freqs.empty()) {
      std::vector<uint8_t> bytes(freqs.size() * (freqs_type == DType::F32 ? 4 : 2), 0);
      if (freqs_type == DType::F32) std::memcpy(bytes.data(), freqs.data(), bytes.size());
      e.tensors["rope_freqs.weight"] = {{static_cast<int64_t>(freqs.size())}, freqs_type, std::move(bytes)};
    }
    // A file of its own each: the earlier ones stay mapped.
    return edited_copy(*file, dir.path() / ("changed-" + std::to_string(files++) + ".gguf"), e);
  };
  const auto scale_of = [&](const Edits& edits) {
    return LlamaConfig::from_gguf(*rewritten(edits)).rope_freq_scale();
  };
  EXPECT_EQ(scale_of({{"llama.rope.scaling.type", V::make_string("none")}}), 1.0f)
      << "none ignores the factor";
  EXPECT_EQ(scale_of({{"llama.rope.scaling.type", std::nullopt}}), 0.25f) << "no type is linear";
  EXPECT_EQ(scale_of({{"llama.rope.scaling.factor", std::nullopt},
                      {"llama.rope.scale_linear", V::make_float(T::FLOAT32, 2.0)}}),
            0.5f)
      << "the older key";
  EXPECT_EQ(scale_of({{"llama.rope.scaling.factor", V::make_float(T::FLOAT32, 0.0)}}), 1.0f)
      << "factor 0: none";

  // YaRN as llama.cpp reads it for Llama: the factor, the original context (else the training
  // context), nothing else; the file's attn_factor multiplies the magnitude, with or without YaRN.
  const LlamaConfig yarn = LlamaConfig::from_gguf(
      *rewritten({{"llama.rope.scaling.type", V::make_string("yarn")},
                  {"llama.rope.scaling.original_context_length", V::make_uint(T::UINT32, 512)},
                  {"llama.rope.scaling.yarn_beta_fast", V::make_float(T::FLOAT32, 8.0)}}));
  EXPECT_EQ(yarn.rope_yarn_original_context, 512);
  EXPECT_EQ(yarn.rope_freq_scale(), 0.25f);
  const kernels::RopeScaling yarn_scaling = yarn.rope_scaling();
  EXPECT_TRUE(yarn_scaling.yarn);
  EXPECT_EQ(yarn_scaling.freq_factors, yarn.rope_freq_factors.data());
  const kernels::RopeScaling want = kernels::rope_yarn_scaling(0.25f, nullptr, 32, 512, shape.rope_base);
  EXPECT_EQ(yarn_scaling.yarn_low, want.yarn_low);
  EXPECT_EQ(yarn_scaling.yarn_high, want.yarn_high) << "beta_fast 32 whatever the file says (llama.cpp's)";
  EXPECT_EQ(yarn_scaling.mscale, want.mscale);
  const LlamaConfig yarn_train =
      LlamaConfig::from_gguf(*rewritten({{"llama.rope.scaling.type", V::make_string("yarn")}}));
  EXPECT_EQ(yarn_train.rope_yarn_original_context, yarn_train.n_ctx_train);
  EXPECT_EQ(c.rope_yarn_original_context, 0) << "linear is not YaRN";
  EXPECT_FALSE(c.rope_scaling().yarn);
  const LlamaConfig attn = LlamaConfig::from_gguf(
      *rewritten({{"llama.rope.scaling.attn_factor", V::make_float(T::FLOAT32, 0.5)}}));
  EXPECT_EQ(attn.rope_scaling().mscale, 0.5f);
  EXPECT_EQ(c.rope_scaling().mscale, 1.0f);

  std::vector<float> zero_at_3 = shape.rope_freq_factors;
  zero_at_3[3] = 0.0f;
  std::vector<float> inf_at_15 = shape.rope_freq_factors;
  inf_at_15[15] = INFINITY;
  struct Refused {
    const char* what;
    std::shared_ptr<const GgufFile> file;
    const char* words;
  };
  const Refused refused[] = {
      {"attn_factor 0", rewritten({{"llama.rope.scaling.attn_factor", V::make_float(T::FLOAT32, 0.0)}}),
       "llama.rope.scaling.attn_factor must be positive and finite"},
      {"original context 0",
       rewritten({{"llama.rope.scaling.type", V::make_string("yarn")},
                  {"llama.rope.scaling.original_context_length", V::make_uint(T::UINT32, 0)}}),
       "llama.rope.scaling.original_context_length"},
      {"longrope", rewritten({{"llama.rope.scaling.type", V::make_string("longrope")}}),
       "llama.rope.scaling.type = 'longrope' is not supported"},
      {"negative factor", rewritten({{"llama.rope.scaling.factor", V::make_float(T::FLOAT32, -2.0)}}),
       "llama.rope.scaling.factor must be positive and finite"},
      {"NaN factor", rewritten({{"llama.rope.scaling.factor", V::make_float(T::FLOAT32, std::nan(""))}}),
       "llama.rope.scaling.factor must be positive and finite"},
      {"F16 factors", rewritten({}, DType::F16, shape.rope_freq_factors),
       "tensor 'rope_freqs.weight' must be F32 [16]"},
      {"15 factors", rewritten({}, DType::F32, std::vector<float>(15, 1.0f)),
       "tensor 'rope_freqs.weight' must be F32 [16]"},
      {"a zero factor", rewritten({}, DType::F32, zero_at_3), "rope_freqs.weight[3] = 0"},
      {"an infinite factor", rewritten({}, DType::F32, inf_at_15), "rope_freqs.weight[15] = inf"},
  };
  for (const Refused& r : refused) {
    SCOPED_TRACE(r.what);
    try {
      (void)LlamaConfig::from_gguf(*r.file);
      ADD_FAILURE() << "accepted";
    } catch (const GgufError& e) {
      EXPECT_NE(std::string(e.what()).find(r.words), std::string::npos) << e.what();
    }
  }
}

// A head size other than embedding_length / head_count (llama.attention.key_length, as Mistral Nemo's
// files have): q and the attention output sized by it; V heads of another size refused by name.
TEST(GgufLlamaConfig, HeadSizeFromKeyLength) {
  test::TempDir dir;
  LlamaShape shape = llama_shape_by_name("tiny");  // embd 128, 4 / 2 heads
  shape.head_dim = 64;
  const fs::path path = dir.path() / "h64.gguf";
  write_random_llama(path.string(), shape, DType::Q8_0, 1);
  const auto file = GgufFile::open(path.string());
  const LlamaConfig c = LlamaConfig::from_gguf(*file);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.q_dim(), 256);
  EXPECT_EQ(c.kv_dim(), 128);
  EXPECT_EQ(c.rope_dims, 64);
  const LlamaWeights w = LlamaWeights::bind(*file, c);
  EXPECT_EQ(w.layers.at(0).wq.n_out, 256);
  EXPECT_EQ(w.layers.at(0).wo.k, 256);

  const auto bad = edited_copy(*file, dir.path() / "v32.gguf",
                               {{{"llama.attention.value_length", V::make_uint(T::UINT32, 32)}}, {}});
  try {
    (void)LlamaConfig::from_gguf(*bad);
    ADD_FAILURE() << "accepted";
  } catch (const GgufError& e) {
    EXPECT_NE(
        std::string(e.what()).find("llama.attention.value_length differs from llama.attention.key_length"),
        std::string::npos)
        << e.what();
  }
}

// A weight matrix stored in an activation-only type (Q8_1, Q8_K: GGML's types for quantized
// activations, which no quantizer writes for weights) is refused at load with the tensor's name, not
// at the first matmul.
TEST(GgufLlamaWeights, RefusesActivationOnlyTypesByName) {
  test::TempDir dir;
  const fs::path good = dir.path() / "good.gguf";
  write_random_llama(good.string(), llama_shape_by_name("tiny"), DType::F32, 1);
  const auto file = GgufFile::open(good.string());
  GgufWriter writer;
  for (const auto& [name, value] : file->metadata()) writer.set(name, value);
  for (const GgufTensorInfo& tensor : file->tensors()) {
    if (tensor.name == "blk.1.attn_k.weight") {
      writer.add_tensor(
          tensor.name, tensor.dims, DType::Q8_1,
          std::vector<uint8_t>(static_cast<size_t>(row_bytes(DType::Q8_1, tensor.dims[0]) * tensor.dims[1])));
      continue;
    }
    const uint8_t* data = file->tensor_data(tensor);
    writer.add_tensor(tensor.name, tensor.dims, tensor.type,
                      std::vector<uint8_t>(data, data + tensor.size_bytes));
  }
  const fs::path bad_path = dir.path() / "q8_1.gguf";
  writer.write(bad_path.string());
  const auto bad = GgufFile::open(bad_path.string());
  try {
    (void)LlamaWeights::bind(*bad, LlamaConfig::from_gguf(*bad));
    ADD_FAILURE() << "accepted";
  } catch (const GgufError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("tensor 'blk.1.attn_k.weight' has type q8_1, which holds activations"),
              std::string::npos)
        << what;
  }
  EXPECT_NO_THROW((void)LlamaWeights::bind(*file, LlamaConfig::from_gguf(*file)));
}

}  // namespace
}  // namespace nibble::model
