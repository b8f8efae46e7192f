#pragma once
// .safetensors files: a validating, memory-mapping reader.
// Layout: an 8-byte little-endian header length N, N bytes of JSON (optionally padded with spaces),
// then the byte buffer. The JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin,
// end]} (offsets relative to the buffer) and may hold "__metadata__", a map of strings.
// Reference: https://github.com/huggingface/safetensors (README, "Format").
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/quant_types.hpp"
#include "model/partial_file.hpp"

namespace nibble::model {

// Every problem with a .safetensors file is reported as a SafetensorsError whose message names the
// file, the tensor where there is one, and the problem, e.g. "model.safetensors: tensor
// 'model.norm.weight': data_offsets [64, 128] extend past the end of the data (96 bytes; file
// truncated?)".
class SafetensorsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The element types Nibble reads. The integer types are there for GPTQ/AWQ checkpoints (I32 packs
// qweight/qzeros/g_idx); other dtypes of the format are rejected by name.
enum class SafetensorsDType { F32, F16, BF16, I64, I32, I8, U8 };
const char* safetensors_dtype_name(SafetensorsDType dtype);  // as spelled in the header: "BF16"
int64_t safetensors_dtype_bytes(SafetensorsDType dtype);
// The kernels' type for a float dtype (which the matmul reads directly); nullopt for integers.
std::optional<kernels::DType> safetensors_float_type(SafetensorsDType dtype);

struct SafetensorsTensorInfo {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::F32;
  std::vector<int64_t> shape;  // row-major: shape.back() is contiguous (the reverse of GGUF's dims)
  uint64_t offset = 0;         // relative to the start of the byte buffer
  uint64_t size_bytes = 0;
  int64_t n_elements = 0;  // 1 for a scalar (empty shape)
};

class SafetensorsFile {
 public:
  // Maps and validates the whole file: header length within the file (and at most 100 MB), JSON
  // syntax, no duplicate names, entry fields and their types, known dtypes, shape product times
  // element size equal to the offset range, offsets inside the buffer, no overlaps, no gaps and no
  // trailing bytes (the format requires the buffer to be exactly covered). Throws SafetensorsError.
  static std::shared_ptr<const SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_offset_; }  // 8 + header length

  const std::map<std::string, std::string>& metadata() const { return metadata_; }  // "__metadata__"
  // In order of their offsets in the buffer.
  const std::vector<SafetensorsTensorInfo>& tensors() const { return tensors_; }
  const SafetensorsTensorInfo* find_tensor(const std::string& name) const;  // null when absent
  // Start of the tensor's bytes inside the mapping (not necessarily aligned to the element size).
  const uint8_t* tensor_data(const SafetensorsTensorInfo& tensor) const;

 private:
  SafetensorsFile() = default;
  void parse();

  std::string path_;
  uint64_t size_ = 0;
  uint64_t data_offset_ = 0;
  const uint8_t* base_ = nullptr;  // the read-only mapping
  std::map<std::string, std::string> metadata_;
  std::vector<SafetensorsTensorInfo> tensors_;
  std::map<std::string, size_t> tensor_index_;
};

// Writes a .safetensors file (tensors laid out in the order given, header padded to 8 bytes as the
// reference writer does). For tests and tools; throws SafetensorsError on I/O failure.
struct SafetensorsTensorData {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // product(shape) * element size
};
void write_safetensors(const std::string& path, const std::vector<SafetensorsTensorData>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// A tensor of a file to be filled later (start_safetensors).
struct SafetensorsTensorSpec {
  std::string name;
  SafetensorsDType dtype = SafetensorsDType::F32;
  std::vector<int64_t> shape;
};
// Writes the header of a file of these tensors (their bytes in this order) to a temporary file beside
// `path` and returns what fills each tensor's bytes, in any order, then puts the file at `path`: a
// checkpoint written as its matrices are quantized holds none of them. write_safetensors is this with
// every tensor filled at once. Throws SafetensorsError (an unwritable path, a duplicate name).
PartialFile start_safetensors(const std::string& path, const std::vector<SafetensorsTensorSpec>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace nibble::model
