#pragma once
// GGUF v3 files: a validating, memory-mapping reader and a writer.
// Reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"

namespace nibble::model {

// Every problem with a GGUF file (corrupt, truncated, unsupported) is reported as a GgufError whose
// message names the file and the problem, e.g. "model.gguf: tensor 'blk.0.attn_q.weight' data
// [offset 1234, 4096 bytes] extends past the end of the file (2048 bytes)".
class GgufError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class GgufValueType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};
const char* gguf_value_type_name(GgufValueType type);

// One metadata value. Integers keep their stored type in `type`; the value is in `i` (signed
// types) or `u` (unsigned types and bool), floats in `f`.
struct GgufValue {
  GgufValueType type = GgufValueType::UINT32;
  uint64_t u = 0;
  int64_t i = 0;
  double f = 0.0;
  std::string s;
  GgufValueType array_type = GgufValueType::UINT32;  // element type when type == ARRAY
  std::vector<GgufValue> array;

  static GgufValue make_uint(GgufValueType t, uint64_t v);
  static GgufValue make_int(GgufValueType t, int64_t v);
  static GgufValue make_float(GgufValueType t, double v);
  static GgufValue make_bool(bool v);
  static GgufValue make_string(std::string v);
  static GgufValue make_array(GgufValueType element_type, std::vector<GgufValue> items);
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // GGML order: dims[0] is the contiguous (fastest) dimension
  kernels::DType type = kernels::DType::F32;
  uint64_t offset = 0;      // relative to the start of the tensor data section
  uint64_t size_bytes = 0;  // bytes the tensor occupies
  int64_t n_elements = 0;
  int64_t rows() const;  // product of dims[1..]
  int64_t row_elements() const { return dims.empty() ? 0 : dims[0]; }
};

class GgufFile {
 public:
  // Maps and validates the whole file: magic, version (2 or 3), counts, string lengths, value
  // types, array lengths, dims, tensor types, offsets, alignment and sizes within the file.
  // Throws GgufError naming the problem.
  static std::shared_ptr<const GgufFile> open(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_offset_; }

  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const GgufValue* find(const std::string& key) const;
  bool has(const std::string& key) const { return find(key) != nullptr; }

  // Typed accessors. get_* throws GgufError when the key is missing or of an incompatible type;
  // find_* returns nullopt when missing and throws on an incompatible type.
  uint64_t get_uint(const std::string& key) const;  // any non-negative integer type
  std::optional<uint64_t> find_uint(const std::string& key) const;
  double get_float(const std::string& key) const;  // FLOAT32/FLOAT64 (and integers)
  std::optional<double> find_float(const std::string& key) const;
  std::string get_string(const std::string& key) const;
  std::optional<std::string> find_string(const std::string& key) const;
  std::optional<bool> find_bool(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<float> get_float_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(const std::string& name) const;
  // Start of the tensor's bytes inside the mapping.
  const uint8_t* tensor_data(const GgufTensorInfo& tensor) const;

 private:
  GgufFile() = default;
  std::string path_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t size_ = 0;
  uint64_t data_offset_ = 0;
  const uint8_t* base_ = nullptr;  // the read-only mapping
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
  friend class GgufParser;
};

// Builds a GGUF v3 file in memory order: metadata, tensor infos, aligned tensor data.
class GgufWriter {
 public:
  void set(const std::string& key, GgufValue value);  // replaces an existing key
  void set_uint32(const std::string& key, uint32_t v);
  void set_int32(const std::string& key, int32_t v);
  void set_uint64(const std::string& key, uint64_t v);
  void set_float32(const std::string& key, float v);
  void set_bool(const std::string& key, bool v);
  void set_string(const std::string& key, std::string v);
  void set_string_array(const std::string& key, const std::vector<std::string>& v);
  void set_float_array(const std::string& key, const std::vector<float>& v);
  void set_int32_array(const std::string& key, const std::vector<int32_t>& v);
  // data: row_bytes(type, dims[0]) * rows bytes. Tensors are written in the order added.
  void add_tensor(const std::string& name, const std::vector<int64_t>& dims, kernels::DType type,
                  std::vector<uint8_t> data);
  // Writes the file (alignment from general.alignment if set, else 32). Throws GgufError on I/O
  // failure.
  void write(const std::string& path) const;

 private:
  struct PendingTensor {
    std::string name;
    std::vector<int64_t> dims;
    kernels::DType type;
    std::vector<uint8_t> data;
  };
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::vector<PendingTensor> tensors_;
};

}  // namespace nibble::model
