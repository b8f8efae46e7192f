// GGUF reader and writer. The reader trusts nothing in the file: every length, count, type and
// offset is checked against the bytes actually present before it is used, so a corrupt or hostile
// file gives a GgufError instead of a crash or a huge allocation.
#include "model/gguf.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <utility>

namespace nibble::model {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr uint64_t kDefaultAlignment = 32;
constexpr size_t kMaxTensorName = 63;  // llama.cpp rejects names of GGML_MAX_NAME (64) bytes or more
constexpr int kMaxDims = 4;            // GGML_MAX_DIMS
constexpr int kMaxArrayDepth = 3;      // arrays of arrays of arrays; real files use depth 1
// In memory every array element becomes a GgufValue (~100 bytes), so a metadata section that is
// mostly tiny elements could blow up ~100x. Real vocabularies hold well under a million entries.
constexpr uint64_t kMaxMetadataElements = uint64_t{1} << 24;

bool is_valid_value_type(uint32_t raw) { return raw <= static_cast<uint32_t>(GgufValueType::FLOAT64); }

bool is_unsigned_type(GgufValueType t) {
  return t == GgufValueType::UINT8 || t == GgufValueType::UINT16 || t == GgufValueType::UINT32 ||
         t == GgufValueType::UINT64;
}

bool is_signed_type(GgufValueType t) {
  return t == GgufValueType::INT8 || t == GgufValueType::INT16 || t == GgufValueType::INT32 ||
         t == GgufValueType::INT64;
}

bool is_float_type(GgufValueType t) { return t == GgufValueType::FLOAT32 || t == GgufValueType::FLOAT64; }

// Bytes of a scalar value, 0 for STRING/ARRAY.
uint64_t scalar_size(GgufValueType t) {
  switch (t) {
    case GgufValueType::UINT8:
    case GgufValueType::INT8:
    case GgufValueType::BOOL:
      return 1;
    case GgufValueType::UINT16:
    case GgufValueType::INT16:
      return 2;
    case GgufValueType::UINT32:
    case GgufValueType::INT32:
    case GgufValueType::FLOAT32:
      return 4;
    case GgufValueType::UINT64:
    case GgufValueType::INT64:
    case GgufValueType::FLOAT64:
      return 8;
    case GgufValueType::STRING:
    case GgufValueType::ARRAY:
      return 0;
  }
  return 0;
}

// The fewest bytes a value of this type can occupy in a file (used to bound counts).
uint64_t min_encoded_size(GgufValueType t) {
  if (t == GgufValueType::STRING) return 8;     // length
  if (t == GgufValueType::ARRAY) return 4 + 8;  // element type + count
  return scalar_size(t);
}

bool is_power_of_two(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// GGML's names for the tensor types Nibble does not read (ggml.h's enum ggml_type), so that a file
// of one says which; nullptr for an id ggml never had.
const char* unread_ggml_type_name(uint32_t raw_type) {
  switch (raw_type) {
    case 4:
      return "Q4_2 (removed from ggml)";
    case 5:
      return "Q4_3 (removed from ggml)";
    case 24:
      return "I8";
    case 25:
      return "I16";
    case 26:
      return "I32";
    case 27:
      return "I64";
    case 28:
      return "F64";
    case 31:
      return "Q4_0_4_4 (removed from ggml)";
    case 32:
      return "Q4_0_4_8 (removed from ggml)";
    case 33:
      return "Q4_0_8_8 (removed from ggml)";
    case 36:
      return "IQ4_NL_4_4 (removed from ggml)";
    case 37:
      return "IQ4_NL_4_8 (removed from ggml)";
    case 38:
      return "IQ4_NL_8_8 (removed from ggml)";
    default:
      return nullptr;
  }
}

std::string shape_string(const std::vector<int64_t>& dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// Keys and names come from the file and may hold anything; keep messages printable and short.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s.substr(0, 80)) {
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  if (s.size() > 80) out += "...";
  return out;
}

std::string type_label(GgufValueType t) { return gguf_value_type_name(t); }

}  // namespace

const char* gguf_value_type_name(GgufValueType type) {
  switch (type) {
    case GgufValueType::UINT8:
      return "UINT8";
    case GgufValueType::INT8:
      return "INT8";
    case GgufValueType::UINT16:
      return "UINT16";
    case GgufValueType::INT16:
      return "INT16";
    case GgufValueType::UINT32:
      return "UINT32";
    case GgufValueType::INT32:
      return "INT32";
    case GgufValueType::FLOAT32:
      return "FLOAT32";
    case GgufValueType::BOOL:
      return "BOOL";
    case GgufValueType::STRING:
      return "STRING";
    case GgufValueType::ARRAY:
      return "ARRAY";
    case GgufValueType::UINT64:
      return "UINT64";
    case GgufValueType::INT64:
      return "INT64";
    case GgufValueType::FLOAT64:
      return "FLOAT64";
  }
  return "UNKNOWN";
}

// ---------------------------------------------------------------------------------------------
// GgufValue constructors

GgufValue GgufValue::make_uint(GgufValueType t, uint64_t v) {
  GgufValue value;
  value.type = t;
  value.u = v;
  return value;
}

GgufValue GgufValue::make_int(GgufValueType t, int64_t v) {
  GgufValue value;
  value.type = t;
  value.i = v;
  return value;
}

GgufValue GgufValue::make_float(GgufValueType t, double v) {
  GgufValue value;
  value.type = t;
  value.f = v;
  return value;
}

GgufValue GgufValue::make_bool(bool v) {
  GgufValue value;
  value.type = GgufValueType::BOOL;
  value.u = v ? 1 : 0;
  return value;
}

GgufValue GgufValue::make_string(std::string v) {
  GgufValue value;
  value.type = GgufValueType::STRING;
  value.s = std::move(v);
  return value;
}

GgufValue GgufValue::make_array(GgufValueType element_type, std::vector<GgufValue> items) {
  GgufValue value;
  value.type = GgufValueType::ARRAY;
  value.array_type = element_type;
  value.array = std::move(items);
  return value;
}

int64_t GgufTensorInfo::rows() const {
  int64_t r = 1;
  for (size_t i = 1; i < dims.size(); ++i) r *= dims[i];
  return r;
}

// ---------------------------------------------------------------------------------------------
// Reader

// Walks the mapped bytes with a cursor; every read is bounds-checked first.
class GgufParser {
 public:
  explicit GgufParser(GgufFile& file) : file_(file), data_(file.base_), size_(file.size_) {}

  void parse() {
    parse_header();
    for (uint64_t k = 0; k < kv_count_; ++k) parse_kv(k);
    apply_alignment();
    for (uint64_t t = 0; t < tensor_count_; ++t) parse_tensor_info(t);
    file_.data_offset_ = align_up(pos_, file_.alignment_);
    check_tensor_layout();
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { throw GgufError(file_.path_ + ": " + what); }

  uint64_t remaining() const { return size_ - pos_; }

  void need(uint64_t n, const char* what) const {
    if (n > remaining()) {
      fail("truncated file: " + std::string(what) + " at offset " + std::to_string(pos_) + " needs " +
           std::to_string(n) + " bytes but only " + std::to_string(remaining()) + " remain (file is " +
           std::to_string(size_) + " bytes)");
    }
  }

  template <typename T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));  // the file is little-endian, like every host we target
    pos_ += sizeof(T);
    return v;
  }

  std::string read_string(const char* what) {
    const auto len = read<uint64_t>(what);
    if (len > remaining()) {
      fail(std::string(what) + " at offset " + std::to_string(pos_ - 8) + " has length " +
           std::to_string(len) + ", larger than the " + std::to_string(remaining()) +
           " bytes left in the file");
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(len));
    pos_ += len;
    return s;
  }

  void parse_header() {
    if (size_ < 4) fail("file is " + std::to_string(size_) + " bytes, too small to be a GGUF file");
    const auto magic = read<uint32_t>("magic");
    if (magic != kMagic) {
      std::string got(reinterpret_cast<const char*>(data_), 4);
      fail("bad magic '" + printable(got) + "' (expected 'GGUF'): not a GGUF file");
    }
    const auto version = read<uint32_t>("version");
    if (version == 1) fail("GGUF version 1 is not supported (only versions 2 and 3)");
    if (version != 2 && version != 3) {
      // A big-endian file stores 3 as 0x03000000.
      if (version == 0x02000000u || version == 0x03000000u) fail("big-endian GGUF files are not supported");
      fail("unsupported GGUF version " + std::to_string(version) + " (only versions 2 and 3)");
    }
    file_.version_ = version;
    tensor_count_ = read<uint64_t>("tensor count");
    kv_count_ = read<uint64_t>("metadata key/value count");
    // The smallest metadata pair: key length + one-byte key... keys may even be empty, so 8 (key
    // length) + 4 (type) + 1 (smallest value). The smallest tensor info: name length + n_dims +
    // one dim + type + offset.
    constexpr uint64_t kMinKv = 8 + 4 + 1;
    constexpr uint64_t kMinTensorInfo = 8 + 4 + 8 + 4 + 8;
    const uint64_t left = remaining();
    if (kv_count_ > left / kMinKv) {
      fail("metadata key/value count " + std::to_string(kv_count_) + " is impossible for a file of " +
           std::to_string(size_) + " bytes");
    }
    if (tensor_count_ > left / kMinTensorInfo || kv_count_ * kMinKv + tensor_count_ * kMinTensorInfo > left) {
      fail("tensor count " + std::to_string(tensor_count_) + " is impossible for a file of " +
           std::to_string(size_) + " bytes");
    }
  }

  void parse_kv(uint64_t index) {
    const std::string key = read_string("metadata key");
    const std::string where = "metadata key '" + printable(key) + "'";
    if (file_.metadata_.count(key) != 0) fail("duplicate " + where + " (pair " + std::to_string(index) + ")");
    const auto raw_type = read<uint32_t>("metadata value type");
    if (!is_valid_value_type(raw_type)) {
      fail(where + " has unknown value type " + std::to_string(raw_type));
    }
    GgufValue value = parse_value(static_cast<GgufValueType>(raw_type), where, 0);
    file_.metadata_.emplace(key, std::move(value));
  }

  GgufValue parse_value(GgufValueType type, const std::string& where, int depth) {
    GgufValue v;
    v.type = type;
    switch (type) {
      case GgufValueType::UINT8:
        v.u = read<uint8_t>("value");
        break;
      case GgufValueType::INT8:
        v.i = read<int8_t>("value");
        break;
      case GgufValueType::UINT16:
        v.u = read<uint16_t>("value");
        break;
      case GgufValueType::INT16:
        v.i = read<int16_t>("value");
        break;
      case GgufValueType::UINT32:
        v.u = read<uint32_t>("value");
        break;
      case GgufValueType::INT32:
        v.i = read<int32_t>("value");
        break;
      case GgufValueType::UINT64:
        v.u = read<uint64_t>("value");
        break;
      case GgufValueType::INT64:
        v.i = read<int64_t>("value");
        break;
      case GgufValueType::FLOAT32:
        v.f = read<float>("value");
        break;
      case GgufValueType::FLOAT64:
        v.f = read<double>("value");
        break;
      case GgufValueType::BOOL: {
        const auto b = read<uint8_t>("value");
        if (b > 1) fail(where + " is a BOOL with invalid value " + std::to_string(b));
        v.u = b;
        break;
      }
      case GgufValueType::STRING:
        v.s = read_string("string value");
        break;
      case GgufValueType::ARRAY:
        parse_array(v, where, depth);
        break;
    }
    return v;
  }

  void parse_array(GgufValue& v, const std::string& where, int depth) {
    if (depth >= kMaxArrayDepth) fail(where + " nests arrays deeper than " + std::to_string(kMaxArrayDepth));
    const auto raw_type = read<uint32_t>("array element type");
    if (!is_valid_value_type(raw_type)) {
      fail(where + " is an array with unknown element type " + std::to_string(raw_type));
    }
    v.array_type = static_cast<GgufValueType>(raw_type);
    const auto count = read<uint64_t>("array length");
    const uint64_t min_size = min_encoded_size(v.array_type);
    if (count > remaining() / min_size) {
      fail(where + " is an array of " + std::to_string(count) + " " + type_label(v.array_type) +
           " elements, more than the " + std::to_string(remaining()) + " bytes left in the file can hold");
    }
    metadata_elements_ += count;
    if (metadata_elements_ > kMaxMetadataElements) {
      fail(where + ": metadata holds more than " + std::to_string(kMaxMetadataElements) + " array elements");
    }
    // Grow as elements actually parse rather than trusting the count for one big reservation.
    v.array.reserve(static_cast<size_t>(std::min<uint64_t>(count, 1 << 16)));
    for (uint64_t j = 0; j < count; ++j) v.array.push_back(parse_value(v.array_type, where, depth + 1));
  }

  void apply_alignment() {
    const auto it = file_.metadata_.find("general.alignment");
    if (it == file_.metadata_.end()) return;
    const GgufValue& a = it->second;
    uint64_t alignment = 0;
    if (is_unsigned_type(a.type)) {
      alignment = a.u;
    } else if (is_signed_type(a.type) && a.i > 0) {
      alignment = static_cast<uint64_t>(a.i);
    } else if (!is_signed_type(a.type)) {
      fail("general.alignment is " + type_label(a.type) + ", expected an integer");
    }
    // The format asks for a multiple of 8, which keeps every tensor's elements aligned in the mapping.
    if (!is_power_of_two(alignment) || alignment < 8 || alignment > (uint64_t{1} << 30)) {
      fail("general.alignment = " + std::to_string(alignment) +
           " is not a power of two between 8 and 2^30 (GGUF asks for a multiple of 8)");
    }
    file_.alignment_ = alignment;
  }

  static uint64_t align_up(uint64_t v, uint64_t alignment) {
    return v % alignment == 0 ? v : v + (alignment - v % alignment);
  }

  void parse_tensor_info(uint64_t index) {
    GgufTensorInfo t;
    t.name = read_string("tensor name");
    const std::string where = "tensor '" + printable(t.name) + "'";
    if (t.name.empty()) fail("tensor " + std::to_string(index) + " has an empty name");
    if (t.name.size() > kMaxTensorName) {
      fail(where + " name is " + std::to_string(t.name.size()) + " bytes, longer than " +
           std::to_string(kMaxTensorName));
    }
    if (file_.tensor_index_.count(t.name) != 0) fail("duplicate tensor name '" + printable(t.name) + "'");

    const auto n_dims = read<uint32_t>("tensor dimension count");
    if (n_dims < 1 || n_dims > kMaxDims) {
      fail(where + " has " + std::to_string(n_dims) + " dims (must be 1 to " + std::to_string(kMaxDims) +
           ")");
    }
    int64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const auto dim = read<int64_t>("tensor dimension");
      if (dim < 1)
        fail(where + " has dim " + std::to_string(d) + " = " + std::to_string(dim) + " (must be >= 1)");
      if (n_elements > std::numeric_limits<int64_t>::max() / dim)
        fail(where + " has an element count that overflows");
      n_elements *= dim;
      t.dims.push_back(dim);
    }
    t.n_elements = n_elements;

    const auto raw_type = read<uint32_t>("tensor type");
    const kernels::TypeInfo* info = kernels::type_info(raw_type);
    if (info == nullptr) {
      if (const char* name = unread_ggml_type_name(raw_type)) {
        fail(where + " is " + name + " (ggml type " + std::to_string(raw_type) +
             "), which Nibble does not read (it reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, "
             "Q2_K-Q6_K, IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ4_NL, IQ4_XS, TQ1_0, TQ2_0 "
             "and "
             "MXFP4): requantize the model from its F16 / BF16 original with `nibble quantize`");
      }
      fail(where + " has unknown tensor type " + std::to_string(raw_type));
    }
    t.type = static_cast<kernels::DType>(raw_type);
    if (t.dims[0] % info->block_elems != 0) {
      fail(where + " of type " + info->name + " has row length " + std::to_string(t.dims[0]) +
           ", not a multiple of the block size " + std::to_string(info->block_elems));
    }
    const int64_t blocks_per_row = t.dims[0] / info->block_elems;
    const int64_t rows = n_elements / t.dims[0];
    // n_elements fits in int64 and block_bytes <= 292 < block_elems * 2^9, so check explicitly.
    if (blocks_per_row > std::numeric_limits<int64_t>::max() / info->block_bytes) {
      fail(where + " has a byte size that overflows");
    }
    const int64_t row_size = blocks_per_row * info->block_bytes;
    if (rows > std::numeric_limits<int64_t>::max() / row_size)
      fail(where + " has a byte size that overflows");
    t.size_bytes = static_cast<uint64_t>(rows * row_size);

    t.offset = read<uint64_t>("tensor offset");
    if (t.offset % file_.alignment_ != 0) {
      fail(where + " offset " + std::to_string(t.offset) + " is not aligned to " +
           std::to_string(file_.alignment_) + " bytes (misaligned)");
    }
    file_.tensor_index_.emplace(t.name, file_.tensors_.size());
    file_.tensors_.push_back(std::move(t));
  }

  void check_tensor_layout() {
    const uint64_t data_offset = file_.data_offset_;
    const uint64_t data_bytes = data_offset <= size_ ? size_ - data_offset : 0;
    for (const GgufTensorInfo& t : file_.tensors_) {
      if (t.offset > data_bytes || t.size_bytes > data_bytes - t.offset) {
        fail("tensor '" + printable(t.name) + "' data [offset " + std::to_string(t.offset) + ", " +
             std::to_string(t.size_bytes) +
             " bytes] extends past the end of the file (data section starts at " +
             std::to_string(data_offset) + ", file is " + std::to_string(size_) + " bytes)");
      }
    }
    // Overlap check: sort by offset, each tensor must end before the next begins.
    std::vector<size_t> order(file_.tensors_.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::sort(order.begin(), order.end(),
              [&](size_t a, size_t b) { return file_.tensors_[a].offset < file_.tensors_[b].offset; });
    for (size_t k = 1; k < order.size(); ++k) {
      const GgufTensorInfo& prev = file_.tensors_[order[k - 1]];
      const GgufTensorInfo& cur = file_.tensors_[order[k]];
      if (cur.offset < prev.offset + prev.size_bytes) {
        fail("tensors '" + printable(prev.name) + "' and '" + printable(cur.name) + "' overlap (offsets " +
             std::to_string(prev.offset) + " and " + std::to_string(cur.offset) + ")");
      }
    }
  }

  GgufFile& file_;
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
  uint64_t tensor_count_ = 0;
  uint64_t kv_count_ = 0;
  uint64_t metadata_elements_ = 0;
};

std::shared_ptr<GgufFile> GgufFile::open_one(const std::string& path) {
  std::shared_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw GgufError(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw GgufError(path + ": cannot stat: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw GgufError(path + ": not a regular file");
  }
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ == 0) {
    ::close(fd);
    throw GgufError(path + ": file is empty (0 bytes), too small to be a GGUF file");
  }
  void* map = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) throw GgufError(path + ": cannot memory-map: " + std::strerror(map_err));
  file->base_ = static_cast<const uint8_t*>(map);
  GgufParser(*file).parse();  // on throw, ~GgufFile unmaps
  return file;
}

namespace {

constexpr const char* kSplitNo = "split.no";
constexpr const char* kSplitCount = "split.count";
constexpr const char* kSplitTensors = "split.tensors.count";

// A file's split.* keys, taken out of its metadata (they frame the set; the set reads as one file).
struct SplitKeys {
  uint64_t no = 0;
  uint64_t count = 1;
  std::optional<uint64_t> tensors;
};

SplitKeys take_split_keys(GgufFile& file, std::map<std::string, GgufValue>& metadata) {
  SplitKeys keys;
  auto take = [&](const char* key) -> std::optional<uint64_t> {
    const std::optional<uint64_t> v = file.find_uint(key);  // throws on a non-integer
    metadata.erase(key);
    return v;
  };
  keys.no = take(kSplitNo).value_or(0);
  keys.count = take(kSplitCount).value_or(1);
  keys.tensors = take(kSplitTensors);
  // llama.cpp stores them as u16: a set has at most 65535 files.
  if (keys.count < 1 || keys.count > 65535) {
    throw GgufError(file.path() + ": split.count = " + std::to_string(keys.count) + " (must be 1 to 65535)");
  }
  if (keys.no >= keys.count) {
    throw GgufError(file.path() + ": split.no = " + std::to_string(keys.no) +
                    " is not below split.count = " + std::to_string(keys.count));
  }
  return keys;
}

}  // namespace

std::string gguf_split_path(const std::string& prefix, int index, int count) {
  char suffix[64];
  std::snprintf(suffix, sizeof suffix, "-%05d-of-%05d.gguf", index + 1, count);
  return prefix + suffix;
}

std::shared_ptr<const GgufFile> GgufFile::open(const std::string& path) {
  std::shared_ptr<GgufFile> first = open_one(path);
  const SplitKeys keys = take_split_keys(*first, first->metadata_);
  if (keys.count == 1) return first;

  const int count = static_cast<int>(keys.count);
  const std::string of = " of " + std::to_string(count);
  // llama.cpp finds the other files from the first's name, so a set opens by its first file only.
  const std::string suffix = gguf_split_path("", static_cast<int>(keys.no), count);
  const bool named =
      path.size() > suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
  const std::string prefix = named ? path.substr(0, path.size() - suffix.size()) : std::string();
  if (keys.no != 0) {
    throw GgufError(path + ": file " + std::to_string(keys.no + 1) + of +
                    " of a split model (split.no = " + std::to_string(keys.no) + "): open the first file" +
                    (named ? ", " + gguf_split_path(prefix, 0, count) : std::string()) +
                    ", which finds the others");
  }
  if (!named) {
    throw GgufError(path + ": the first file of a split model of " + std::to_string(count) +
                    " files (split.count) must be named PREFIX" + suffix +
                    " (llama.cpp's gguf-split names) so that the others can be found");
  }
  for (int index = 1; index < count; ++index) {
    const std::string part_path = gguf_split_path(prefix, index, count);
    const std::string where = path + ": file " + std::to_string(index + 1) + of + " of the split model: ";
    std::shared_ptr<GgufFile> part;
    SplitKeys part_keys;
    try {
      part = open_one(part_path);
      part_keys = take_split_keys(*part, part->metadata_);
    } catch (const GgufError& e) {
      throw GgufError(where + e.what());
    }
    if (part_keys.no != static_cast<uint64_t>(index) || part_keys.count != keys.count) {
      throw GgufError(where + part_path + " says it is file " + std::to_string(part_keys.no + 1) + " of " +
                      std::to_string(part_keys.count) + " (split.no / split.count)");
    }
    for (GgufTensorInfo t : part->tensors_) {
      if (first->tensor_index_.count(t.name) != 0) {
        const GgufTensorInfo& other = first->tensors_[first->tensor_index_.at(t.name)];
        throw GgufError(where + "tensor '" + printable(t.name) + "' is in both " + part_path + " and " +
                        (other.split == 0 ? path : first->other_splits_[other.split - 1]->path()));
      }
      t.split = static_cast<uint16_t>(index);
      first->tensor_index_.emplace(t.name, first->tensors_.size());
      first->tensors_.push_back(std::move(t));
    }
    first->other_splits_.push_back(std::move(part));
  }
  if (!keys.tensors) {
    throw GgufError(path + ": split model without split.tensors.count (how many tensors its files hold)");
  }
  if (*keys.tensors != first->tensors_.size()) {
    throw GgufError(path + ": split model of " + std::to_string(count) + " files holds " +
                    std::to_string(first->tensors_.size()) + " tensors, but split.tensors.count says " +
                    std::to_string(*keys.tensors));
  }
  return first;
}

uint64_t GgufFile::file_size() const {
  uint64_t total = size_;
  for (const auto& part : other_splits_) total += part->size_;
  return total;
}

std::vector<std::string> GgufFile::split_paths() const {
  std::vector<std::string> paths{path_};
  for (const auto& part : other_splits_) paths.push_back(part->path_);
  return paths;
}

GgufFile::~GgufFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

const GgufValue* GgufFile::find(const std::string& key) const {
  const auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

namespace {

[[noreturn]] void type_error(const std::string& path, const std::string& key, const GgufValue& v,
                             const char* expected) {
  std::string got = gguf_value_type_name(v.type);
  if (v.type == GgufValueType::ARRAY) got += " of " + std::string(gguf_value_type_name(v.array_type));
  throw GgufError(path + ": metadata key '" + key + "' is " + got + ", expected " + expected);
}

[[noreturn]] void missing(const std::string& path, const std::string& key) {
  throw GgufError(path + ": metadata key '" + key + "' is missing");
}

std::optional<uint64_t> as_uint(const GgufValue& v) {
  if (is_unsigned_type(v.type)) return v.u;
  if (is_signed_type(v.type) && v.i >= 0) return static_cast<uint64_t>(v.i);
  return std::nullopt;
}

std::optional<double> as_float(const GgufValue& v) {
  if (is_float_type(v.type)) return v.f;
  if (is_unsigned_type(v.type)) return static_cast<double>(v.u);
  if (is_signed_type(v.type)) return static_cast<double>(v.i);
  return std::nullopt;
}

}  // namespace

std::optional<uint64_t> GgufFile::find_uint(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  const auto u = as_uint(*v);
  if (!u) type_error(path_, key, *v, "a non-negative integer");
  return u;
}

uint64_t GgufFile::get_uint(const std::string& key) const {
  const auto v = find_uint(key);
  if (!v) missing(path_, key);
  return *v;
}

std::optional<double> GgufFile::find_float(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  const auto f = as_float(*v);
  if (!f) type_error(path_, key, *v, "a number");
  return f;
}

double GgufFile::get_float(const std::string& key) const {
  const auto v = find_float(key);
  if (!v) missing(path_, key);
  return *v;
}

std::optional<std::string> GgufFile::find_string(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != GgufValueType::STRING) type_error(path_, key, *v, "STRING");
  return v->s;
}

std::string GgufFile::get_string(const std::string& key) const {
  auto v = find_string(key);
  if (!v) missing(path_, key);
  return std::move(*v);
}

std::optional<bool> GgufFile::find_bool(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != GgufValueType::BOOL) type_error(path_, key, *v, "BOOL");
  return v->u != 0;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) missing(path_, key);
  if (v->type != GgufValueType::ARRAY || v->array_type != GgufValueType::STRING) {
    type_error(path_, key, *v, "ARRAY of STRING");
  }
  std::vector<std::string> out;
  out.reserve(v->array.size());
  for (const GgufValue& item : v->array) out.push_back(item.s);
  return out;
}

std::vector<float> GgufFile::get_float_array(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) missing(path_, key);
  const bool numeric =
      is_float_type(v->array_type) || is_unsigned_type(v->array_type) || is_signed_type(v->array_type);
  if (v->type != GgufValueType::ARRAY || !numeric) type_error(path_, key, *v, "ARRAY of numbers");
  std::vector<float> out;
  out.reserve(v->array.size());
  for (const GgufValue& item : v->array) out.push_back(static_cast<float>(*as_float(item)));
  return out;
}

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) missing(path_, key);
  const bool integer = is_unsigned_type(v->array_type) || is_signed_type(v->array_type);
  if (v->type != GgufValueType::ARRAY || !integer) type_error(path_, key, *v, "ARRAY of integers");
  std::vector<int64_t> out;
  out.reserve(v->array.size());
  for (const GgufValue& item : v->array) {
    if (is_signed_type(item.type)) {
      out.push_back(item.i);
    } else {
      if (item.u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        throw GgufError(path_ + ": metadata key '" + key + "' holds " + std::to_string(item.u) +
                        ", too large for a signed 64-bit integer");
      }
      out.push_back(static_cast<int64_t>(item.u));
    }
  }
  return out;
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* GgufFile::tensor_data(const GgufTensorInfo& tensor) const {
  // Offsets were checked against the file size when the file was opened.
  if (tensor.split != 0) {
    const GgufFile& part = *other_splits_.at(tensor.split - 1);
    return part.base_ + part.data_offset_ + tensor.offset;
  }
  return base_ + data_offset_ + tensor.offset;
}

void GgufFile::release_pages(const GgufTensorInfo& tensor) const {
  // Only whole pages inside the tensor: its neighbours' bytes stay resident.
  static const auto kPage = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<uintptr_t>(tensor_data(tensor));
  const uintptr_t first = (begin + kPage - 1) / kPage * kPage,
                  end = (begin + tensor.size_bytes) / kPage * kPage;
  // A read-only private mapping: dropped pages read back from the file unchanged. Advice only, so a
  // failure changes nothing but memory use.
  if (end > first) (void)::madvise(reinterpret_cast<void*>(first), end - first, MADV_DONTNEED);
}

// ---------------------------------------------------------------------------------------------
// Writer

namespace {

[[noreturn]] void writer_error(const std::string& what) { throw GgufError("GGUF writer: " + what); }

void check_value(const std::string& key, const GgufValue& v, int depth) {
  if (!is_valid_value_type(static_cast<uint32_t>(v.type)))
    writer_error("key '" + key + "' has an invalid type");
  if (v.type != GgufValueType::ARRAY) return;
  if (depth >= kMaxArrayDepth) writer_error("key '" + key + "' nests arrays too deeply");
  for (const GgufValue& item : v.array) {
    if (item.type != v.array_type) {
      writer_error("key '" + key + "': array of " + type_label(v.array_type) + " holds a " +
                   type_label(item.type));
    }
    check_value(key, item, depth + 1);
  }
}

// Appends little-endian bytes to a buffer.
class ByteSink {
 public:
  template <typename T>
  void put(T v) {
    const size_t at = bytes_.size();
    bytes_.resize(at + sizeof(T));
    std::memcpy(bytes_.data() + at, &v, sizeof(T));
  }
  void put_string(const std::string& s) {
    put<uint64_t>(s.size());
    bytes_.insert(bytes_.end(), s.begin(), s.end());
  }
  void put_value(const GgufValue& v) {
    switch (v.type) {
      case GgufValueType::UINT8:
        put<uint8_t>(static_cast<uint8_t>(v.u));
        break;
      case GgufValueType::INT8:
        put<int8_t>(static_cast<int8_t>(v.i));
        break;
      case GgufValueType::UINT16:
        put<uint16_t>(static_cast<uint16_t>(v.u));
        break;
      case GgufValueType::INT16:
        put<int16_t>(static_cast<int16_t>(v.i));
        break;
      case GgufValueType::UINT32:
        put<uint32_t>(static_cast<uint32_t>(v.u));
        break;
      case GgufValueType::INT32:
        put<int32_t>(static_cast<int32_t>(v.i));
        break;
      case GgufValueType::UINT64:
        put<uint64_t>(v.u);
        break;
      case GgufValueType::INT64:
        put<int64_t>(v.i);
        break;
      case GgufValueType::FLOAT32:
        put<float>(static_cast<float>(v.f));
        break;
      case GgufValueType::FLOAT64:
        put<double>(v.f);
        break;
      case GgufValueType::BOOL:
        put<uint8_t>(v.u != 0 ? 1 : 0);
        break;
      case GgufValueType::STRING:
        put_string(v.s);
        break;
      case GgufValueType::ARRAY:
        put<uint32_t>(static_cast<uint32_t>(v.array_type));
        put<uint64_t>(v.array.size());
        for (const GgufValue& item : v.array) put_value(item);
        break;
    }
  }
  void pad_to(uint64_t alignment) {
    while (bytes_.size() % alignment != 0) bytes_.push_back(0);
  }
  std::vector<uint8_t>& bytes() { return bytes_; }

 private:
  std::vector<uint8_t> bytes_;
};

}  // namespace

void GgufWriter::set(const std::string& key, GgufValue value) {
  check_value(key, value, 0);
  for (auto& [k, v] : metadata_) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  metadata_.emplace_back(key, std::move(value));
}

void GgufWriter::set_uint32(const std::string& key, uint32_t v) {
  set(key, GgufValue::make_uint(GgufValueType::UINT32, v));
}
void GgufWriter::set_int32(const std::string& key, int32_t v) {
  set(key, GgufValue::make_int(GgufValueType::INT32, v));
}
void GgufWriter::set_uint64(const std::string& key, uint64_t v) {
  set(key, GgufValue::make_uint(GgufValueType::UINT64, v));
}
void GgufWriter::set_float32(const std::string& key, float v) {
  set(key, GgufValue::make_float(GgufValueType::FLOAT32, v));
}
void GgufWriter::set_bool(const std::string& key, bool v) { set(key, GgufValue::make_bool(v)); }
void GgufWriter::set_string(const std::string& key, std::string v) {
  set(key, GgufValue::make_string(std::move(v)));
}

void GgufWriter::set_string_array(const std::string& key, const std::vector<std::string>& v) {
  std::vector<GgufValue> items;
  items.reserve(v.size());
  for (const std::string& s : v) items.push_back(GgufValue::make_string(s));
  set(key, GgufValue::make_array(GgufValueType::STRING, std::move(items)));
}

void GgufWriter::set_float_array(const std::string& key, const std::vector<float>& v) {
  std::vector<GgufValue> items;
  items.reserve(v.size());
  for (float f : v) items.push_back(GgufValue::make_float(GgufValueType::FLOAT32, f));
  set(key, GgufValue::make_array(GgufValueType::FLOAT32, std::move(items)));
}

void GgufWriter::set_int32_array(const std::string& key, const std::vector<int32_t>& v) {
  std::vector<GgufValue> items;
  items.reserve(v.size());
  for (int32_t i : v) items.push_back(GgufValue::make_int(GgufValueType::INT32, i));
  set(key, GgufValue::make_array(GgufValueType::INT32, std::move(items)));
}

uint64_t GgufWriter::checked_bytes(const std::string& name, const std::vector<int64_t>& dims,
                                   kernels::DType type) const {
  if (name.empty() || name.size() > kMaxTensorName) {
    writer_error("tensor name '" + name + "' must be 1 to " + std::to_string(kMaxTensorName) + " bytes");
  }
  for (const PendingTensor& t : tensors_) {
    if (t.name == name) writer_error("duplicate tensor name '" + name + "'");
  }
  if (dims.empty() || dims.size() > static_cast<size_t>(kMaxDims)) {
    writer_error("tensor '" + name + "' has " + std::to_string(dims.size()) + " dims (must be 1 to 4)");
  }
  const kernels::TypeInfo* info = kernels::type_info(static_cast<uint32_t>(type));
  if (info == nullptr) writer_error("tensor '" + name + "' has an unknown type");
  int64_t rows = 1;
  for (size_t d = 0; d < dims.size(); ++d) {
    if (dims[d] < 1)
      writer_error("tensor '" + name + "' has shape " + shape_string(dims) + " with a dim < 1");
    if (d > 0) rows *= dims[d];
  }
  if (dims[0] % info->block_elems != 0) {
    writer_error("tensor '" + name + "' row length " + std::to_string(dims[0]) +
                 " is not a multiple of the " + info->name + " block size " +
                 std::to_string(info->block_elems));
  }
  return static_cast<uint64_t>(kernels::row_bytes(type, dims[0]) * rows);
}

void GgufWriter::check_size(const std::string& name, const std::vector<int64_t>& dims, kernels::DType type,
                            uint64_t expected, uint64_t size) {
  if (size != expected) {
    writer_error("tensor '" + name + "' " + shape_string(dims) + " " + kernels::type_name(type) + " needs " +
                 std::to_string(expected) + " bytes of data, got " + std::to_string(size));
  }
}

void GgufWriter::add_tensor(const std::string& name, const std::vector<int64_t>& dims, kernels::DType type,
                            std::vector<uint8_t> data) {
  const uint64_t size = checked_bytes(name, dims, type);
  check_size(name, dims, type, size, data.size());
  tensors_.push_back(PendingTensor{name, dims, type, std::move(data), nullptr, size, {}});
}

void GgufWriter::add_tensor_made(const std::string& name, const std::vector<int64_t>& dims,
                                 kernels::DType type, std::function<std::vector<uint8_t>()> make) {
  const uint64_t size = checked_bytes(name, dims, type);
  if (!make) writer_error("tensor '" + name + "' has no way to make its bytes");
  tensors_.push_back(PendingTensor{name, dims, type, {}, nullptr, size, std::move(make)});
}

void GgufWriter::add_tensor_view(const std::string& name, const std::vector<int64_t>& dims,
                                 kernels::DType type, const uint8_t* data, uint64_t size) {
  check_size(name, dims, type, checked_bytes(name, dims, type), size);
  if (data == nullptr && size > 0) writer_error("tensor '" + name + "' has no data");
  tensors_.push_back(PendingTensor{name, dims, type, {}, data, size, {}});
}

void GgufWriter::add_tensor_later(const std::string& name, const std::vector<int64_t>& dims,
                                  kernels::DType type) {
  const uint64_t size = checked_bytes(name, dims, type);
  PendingTensor t{name, dims, type, {}, nullptr, size, {}};
  t.later = true;
  tensors_.push_back(std::move(t));
}

void GgufWriter::refuse_later(const char* what) const {
  for (const PendingTensor& t : tensors_) {
    if (t.later) writer_error(std::string(what) + ": tensor '" + t.name + "' is filled later (use start())");
  }
}

void GgufWriter::write(const std::string& path) const {
  refuse_later("write");
  start(path).finish();
}

PartialFile GgufWriter::start(const std::string& path) const {
  std::vector<const PendingTensor*> all;
  for (const PendingTensor& t : tensors_) all.push_back(&t);
  return write_file(path, metadata_, all);
}

std::vector<std::string> GgufWriter::write_split(const std::string& prefix,
                                                 const GgufSplitLimits& limits) const {
  if (limits.max_tensors < 0) writer_error("a split's tensor limit must not be negative");
  refuse_later("write_split");
  // Cut the tensors, in the order added, into runs.
  std::vector<std::vector<const PendingTensor*>> runs(limits.metadata_alone && !tensors_.empty() ? 2 : 1);
  uint64_t run_bytes = 0;
  for (const PendingTensor& t : tensors_) {
    const bool past_count =
        limits.max_tensors > 0 && static_cast<int64_t>(runs.back().size()) >= limits.max_tensors;
    const bool past_bytes = limits.max_bytes > 0 && run_bytes + t.size > limits.max_bytes;
    if (!runs.back().empty() && (past_count || past_bytes)) {
      runs.emplace_back();
      run_bytes = 0;
    }
    runs.back().push_back(&t);
    run_bytes += t.size;
  }
  if (runs.size() > 65535)
    writer_error("a split model has at most 65535 files, these limits make " + std::to_string(runs.size()));
  const int count = static_cast<int>(runs.size());
  std::vector<std::string> paths;
  for (int index = 0; index < count; ++index) {
    Metadata metadata;
    if (index == 0) {
      for (const auto& kv : metadata_) {
        if (kv.first.rfind("split.", 0) != 0) metadata.push_back(kv);
      }
    }
    // llama.cpp's types: u16, u16, i32.
    metadata.emplace_back(kSplitNo,
                          GgufValue::make_uint(GgufValueType::UINT16, static_cast<uint64_t>(index)));
    metadata.emplace_back(kSplitCount,
                          GgufValue::make_uint(GgufValueType::UINT16, static_cast<uint64_t>(count)));
    metadata.emplace_back(kSplitTensors,
                          GgufValue::make_int(GgufValueType::INT32, static_cast<int64_t>(tensors_.size())));
    // Every file keeps the first's alignment, so each reads alone as the first does.
    if (index > 0) {
      for (const auto& kv : metadata_) {
        if (kv.first == "general.alignment") metadata.push_back(kv);
      }
    }
    paths.push_back(gguf_split_path(prefix, index, count));
    write_file(paths.back(), metadata, runs[index]).finish();
  }
  return paths;
}

PartialFile GgufWriter::write_file(const std::string& path, const Metadata& metadata,
                                   const std::vector<const PendingTensor*>& tensors) {
  uint64_t alignment = kDefaultAlignment;
  for (const auto& [key, value] : metadata) {
    if (key != "general.alignment") continue;
    const auto a = as_uint(value);
    if (!a || !is_power_of_two(*a) || *a < 8 || *a > (uint64_t{1} << 30)) {
      writer_error("general.alignment must be an integer power of two between 8 and 2^30");
    }
    alignment = *a;
  }

  // Header, metadata and tensor infos are small: build them in memory. Tensors follow one another
  // in the order added, each padded to the alignment (the layout llama.cpp's reader expects).
  ByteSink head;
  head.put<uint32_t>(kMagic);
  head.put<uint32_t>(3);
  head.put<uint64_t>(tensors.size());
  head.put<uint64_t>(metadata.size());
  for (const auto& [key, value] : metadata) {
    head.put_string(key);
    head.put<uint32_t>(static_cast<uint32_t>(value.type));
    head.put_value(value);
  }
  uint64_t offset = 0;
  std::vector<uint64_t> offsets;
  for (const PendingTensor* t : tensors) {
    head.put_string(t->name);
    head.put<uint32_t>(static_cast<uint32_t>(t->dims.size()));
    for (int64_t d : t->dims) head.put<int64_t>(d);
    head.put<uint32_t>(static_cast<uint32_t>(t->type));
    head.put<uint64_t>(offset);
    offsets.push_back(offset);
    offset += t->size;
    offset += (alignment - offset % alignment) % alignment;
  }
  head.pad_to(alignment);

  // Write to a temporary name and rename (finish()), so a failed write (or a made tensor's failure)
  // never leaves a half file at `path`. Tensors filled later are holes until then.
  const std::string tmp = path + ".tmp";
  const uint64_t data_start = head.bytes().size();
  std::map<std::string, PartialFile::Slot> later;
  try {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) writer_error("cannot create " + tmp + ": " + std::strerror(errno));
    out.write(reinterpret_cast<const char*>(head.bytes().data()),
              static_cast<std::streamsize>(head.bytes().size()));
    auto pad = [&out](uint64_t n) {
      static const char kZeros[4096] = {};
      for (; n > 0; n -= std::min<uint64_t>(n, sizeof kZeros)) {
        out.write(kZeros, static_cast<std::streamsize>(std::min<uint64_t>(n, sizeof kZeros)));
      }
    };
    uint64_t written = 0;
    for (size_t k = 0; k < tensors.size(); ++k) {
      const PendingTensor& t = *tensors[k];
      pad(offsets[k] - written);
      if (t.later) {
        later[t.name] = {data_start + offsets[k], t.size, false};
        out.seekp(static_cast<std::streamoff>(t.size), std::ios::cur);
      } else if (t.make) {
        const std::vector<uint8_t> made = t.make();  // freed before the next is made
        if (made.size() != t.size) {
          writer_error("tensor '" + t.name + "' was made " + std::to_string(made.size()) +
                       " bytes long, not " + std::to_string(t.size));
        }
        out.write(reinterpret_cast<const char*>(made.data()), static_cast<std::streamsize>(t.size));
      } else {
        const uint8_t* bytes = t.data != nullptr ? t.data : t.owned.data();
        out.write(reinterpret_cast<const char*>(bytes), static_cast<std::streamsize>(t.size));
      }
      written = offsets[k] + t.size;
    }
    pad(offset - written);
    out.close();
    if (!out) writer_error("failed writing " + tmp);
    // A hole at the end (a tensor filled later) is part of the file's length too.
    std::filesystem::resize_file(tmp, data_start + offset);
  } catch (const std::filesystem::filesystem_error& e) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    writer_error("failed writing " + tmp + ": " + e.code().message());
  } catch (...) {
    std::error_code ec;
    std::filesystem::remove(tmp, ec);
    throw;
  }
  return PartialFile(path, tmp, std::move(later), [](const std::string& what) { writer_error(what); });
}

}  // namespace nibble::model
