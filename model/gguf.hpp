#pragma once
// GGUF v3 files: a validating, memory-mapping reader and a writer.
// Reference: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"
#include "model/partial_file.hpp"

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
  uint16_t split = 0;    // which file of a split set holds the bytes (0: the file opened)
  int64_t rows() const;  // product of dims[1..]
  int64_t row_elements() const { return dims.empty() ? 0 : dims[0]; }
};

class GgufFile {
 public:
  // Maps and validates the whole file: magic, version (2 or 3), counts, string lengths, value
  // types, array lengths, dims, tensor types, offsets, alignment and sizes within the file.
  // A split set's first file (llama.cpp's gguf-split: NAME-00001-of-0000N.gguf with split.count N)
  // opens the whole set, as llama.cpp loads one: the other files are found by name and validated
  // each as a file of its own, their tensors join the first's, and the set reads as one file
  // (metadata from the first; the split.* keys are checked and left out of metadata()).
  // Throws GgufError naming the problem (and the file of the set it is in).
  static std::shared_ptr<const GgufFile> open(const std::string& path);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }  // the file opened (a split set's first)
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_size() const;  // bytes of the file, or of every file of a split set
  uint64_t data_offset() const { return data_offset_; }
  int split_count() const { return 1 + static_cast<int>(other_splits_.size()); }
  std::vector<std::string> split_paths() const;  // the set's files in order ({path()} for one file)

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
  // Lets the tensor's pages go from this process's resident memory (read from the file again if
  // touched): a pass over a model larger than memory keeps only what it is working on resident, as
  // llama.cpp unmaps what it has copied to a GPU. The bytes stay the same.
  void release_pages(const GgufTensorInfo& tensor) const;

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
  std::vector<std::shared_ptr<const GgufFile>> other_splits_;  // a split set's files 2..N
  static std::shared_ptr<GgufFile> open_one(const std::string& path);
  friend class GgufParser;
};

// Where llama.cpp looks for split `index` (0-based) of `count`: PREFIX-%05d-of-%05d.gguf.
std::string gguf_split_path(const std::string& prefix, int index, int count);

// How GgufWriter::write_split cuts a file (0: no limit). A new file begins before a tensor that
// would take the current one past either limit; a tensor alone past max_bytes gets a file of its own.
struct GgufSplitLimits {
  int64_t max_tensors = 0;
  uint64_t max_bytes = 0;       // of tensor data, as llama.cpp's gguf-split counts --split-max-size
  bool metadata_alone = false;  // the first file holds no tensor (gguf-split --no-tensor-in-metadata)
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
  // The same with borrowed bytes (e.g. another GgufFile's tensor_data), which must stay valid until
  // the last write: splitting or merging a 40 GB model needs no copy of it in memory.
  void add_tensor_view(const std::string& name, const std::vector<int64_t>& dims, kernels::DType type,
                       const uint8_t* data, uint64_t size);
  // The same with bytes made when the writer reaches the tensor (e.g. a matrix quantized then), so
  // that a file is written holding one such tensor in memory at a time, not all of them: quantizing a
  // 70B model needs no room for its output. `make` must return the bytes dims and type call for (a
  // GgufError otherwise); it is called once each write, in the order added, and what it throws
  // propagates (no file is left at the path).
  void add_tensor_made(const std::string& name, const std::vector<int64_t>& dims, kernels::DType type,
                       std::function<std::vector<uint8_t>()> make);
  // A tensor whose bytes come after the file is begun (start()), in any order: a calibrated run fills
  // each layer's matrices as it finishes the layer, holding no earlier layer's.
  void add_tensor_later(const std::string& name, const std::vector<int64_t>& dims, kernels::DType type);
  // Writes the file (alignment from general.alignment if set, else 32). Throws GgufError on I/O
  // failure, or naming a tensor added with add_tensor_later (those need start()).
  void write(const std::string& path) const;
  // Writes every tensor but those added with add_tensor_later to a temporary file beside `path` and
  // returns what fills those and then puts the file at `path`. A run that fails leaves no file at
  // `path`, and an unwritable path fails here, before any long work. Throws GgufError.
  PartialFile start(const std::string& path) const;
  // Writes a split set as llama.cpp's gguf-split does: gguf_split_path(prefix, i, n) for each of the
  // n files (n >= 1), the tensors in the order added cut by `limits`, the metadata in the first,
  // split.no / split.count / split.tensors.count in each. Returns the paths written.
  std::vector<std::string> write_split(const std::string& prefix, const GgufSplitLimits& limits) const;

 private:
  struct PendingTensor {
    std::string name;
    std::vector<int64_t> dims;
    kernels::DType type;
    std::vector<uint8_t> owned;  // empty for a view or a made tensor
    const uint8_t* data = nullptr;
    uint64_t size = 0;
    std::function<std::vector<uint8_t>()> make;  // a made tensor's
    bool later = false;                          // filled through start()'s PartialFile
  };
  using Metadata = std::vector<std::pair<std::string, GgufValue>>;
  // Checks a tensor about to be added (name, dims, type) and returns the bytes it must hold.
  uint64_t checked_bytes(const std::string& name, const std::vector<int64_t>& dims,
                         kernels::DType type) const;
  static void check_size(const std::string& name, const std::vector<int64_t>& dims, kernels::DType type,
                         uint64_t expected, uint64_t size);
  static PartialFile write_file(const std::string& path, const Metadata& metadata,
                                const std::vector<const PendingTensor*>& tensors);
  void refuse_later(const char* what) const;
  Metadata metadata_;
  std::vector<PendingTensor> tensors_;
};

}  // namespace nibble::model
