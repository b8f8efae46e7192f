// .safetensors reader and writer. Like the GGUF reader, nothing in the file is trusted: the header
// length, every JSON field, every shape and offset is checked against the bytes actually present
// before use, so a corrupt or hostile file gives a SafetensorsError instead of a crash.
#include "model/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

namespace nibble::model {

namespace {

using nlohmann::json;

// The reference implementation refuses larger headers; real ones are a few hundred KB at most.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
constexpr size_t kMaxDims = 8;

struct DTypeName {
  SafetensorsDType dtype;
  const char* name;
  int64_t bytes;
};
constexpr DTypeName kDTypes[] = {
    {SafetensorsDType::F32, "F32", 4}, {SafetensorsDType::F16, "F16", 2}, {SafetensorsDType::BF16, "BF16", 2},
    {SafetensorsDType::I64, "I64", 8}, {SafetensorsDType::I32, "I32", 4}, {SafetensorsDType::I8, "I8", 1},
    {SafetensorsDType::U8, "U8", 1},
};

const DTypeName& dtype_entry(SafetensorsDType dtype) {
  for (const DTypeName& d : kDTypes)
    if (d.dtype == dtype) return d;
  return kDTypes[0];  // unreachable: every enumerator is listed
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace

const char* safetensors_dtype_name(SafetensorsDType dtype) { return dtype_entry(dtype).name; }
int64_t safetensors_dtype_bytes(SafetensorsDType dtype) { return dtype_entry(dtype).bytes; }

std::optional<kernels::DType> safetensors_float_type(SafetensorsDType dtype) {
  switch (dtype) {
    case SafetensorsDType::F32:
      return kernels::DType::F32;
    case SafetensorsDType::F16:
      return kernels::DType::F16;
    case SafetensorsDType::BF16:
      return kernels::DType::BF16;
    default:
      return std::nullopt;
  }
}

std::shared_ptr<const SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw SafetensorsError(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw SafetensorsError(path + ": cannot stat: " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw SafetensorsError(path + ": not a regular file");
  }
  file->size_ = static_cast<uint64_t>(st.st_size);
  if (file->size_ < 8) {
    ::close(fd);
    throw SafetensorsError(path + ": file is " + std::to_string(file->size_) +
                           " bytes, too small for the 8-byte header length (truncated?)");
  }
  void* map = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) throw SafetensorsError(path + ": cannot memory-map: " + std::strerror(map_err));
  file->base_ = static_cast<const uint8_t*>(map);
  file->parse();  // on throw, the destructor unmaps
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

void SafetensorsFile::parse() {
  const std::string& p = path_;
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = header_len << 8 | base_[i];  // little-endian
  if (header_len > kMaxHeaderBytes) {
    throw SafetensorsError(p + ": header length " + std::to_string(header_len) + " exceeds the limit of " +
                           std::to_string(kMaxHeaderBytes) + " bytes (not a safetensors file?)");
  }
  if (header_len > size_ - 8) {
    throw SafetensorsError(p + ": header length " + std::to_string(header_len) +
                           " extends past the end of the file (" + std::to_string(size_) +
                           " bytes; truncated?)");
  }
  data_offset_ = 8 + header_len;
  const auto* header_begin = reinterpret_cast<const char*>(base_ + 8);
  const std::string_view header_text(header_begin, header_len);
  if (header_text.empty() || header_text.front() != '{') {
    throw SafetensorsError(p + ": header does not start with '{' (not a safetensors file?)");
  }

  // Parse, refusing a name that occurs twice (nlohmann would silently keep the last one, so two
  // readers could disagree about the file).
  std::set<std::string> seen;
  std::string duplicate;
  const json::parser_callback_t no_duplicates = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth == 1 && event == json::parse_event_t::key && !seen.insert(parsed.get<std::string>()).second)
      duplicate = parsed.get<std::string>();
    return true;
  };
  json header;
  try {
    header = json::parse(header_text.begin(), header_text.end(), no_duplicates);
  } catch (const json::exception& e) {
    throw SafetensorsError(p + ": header is not valid JSON: " + e.what());
  }
  if (!duplicate.empty()) throw SafetensorsError(p + ": header names '" + duplicate + "' twice");
  if (!header.is_object()) throw SafetensorsError(p + ": header is not a JSON object");

  const uint64_t buffer_bytes = size_ - data_offset_;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) throw SafetensorsError(p + ": __metadata__ is not an object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          throw SafetensorsError(p + ": __metadata__ value of '" + key + "' is not a string");
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = p + ": tensor '" + name + "'";
    if (!entry.is_object()) throw SafetensorsError(where + ": entry is not an object");
    for (const auto& [key, value] : entry.items()) {
      if (key != "dtype" && key != "shape" && key != "data_offsets")
        throw SafetensorsError(where + ": unknown field '" + key + "'");
    }
    SafetensorsTensorInfo t;
    t.name = name;

    const auto dtype = entry.find("dtype");
    if (dtype == entry.end() || !dtype->is_string())
      throw SafetensorsError(where + ": 'dtype' is missing or not a string");
    const auto* known = std::find_if(std::begin(kDTypes), std::end(kDTypes),
                                     [&](const DTypeName& d) { return *dtype == d.name; });
    if (known == std::end(kDTypes)) {
      throw SafetensorsError(where + ": dtype '" + dtype->get<std::string>() +
                             "' is not supported (F32, F16, BF16, I64, I32, I8, U8)");
    }
    t.dtype = known->dtype;

    const auto shape = entry.find("shape");
    if (shape == entry.end() || !shape->is_array())
      throw SafetensorsError(where + ": 'shape' is missing or not an array");
    if (shape->size() > kMaxDims)
      throw SafetensorsError(where + ": shape has " + std::to_string(shape->size()) + " dimensions");
    // Overflow-safe element count: every dimension and the running product stay below 2^62.
    constexpr uint64_t kLimit = uint64_t{1} << 62;
    uint64_t elements = 1;
    for (const json& d : *shape) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() >= kLimit)
        throw SafetensorsError(where + ": shape " + shape->dump() + " holds a value that is not a dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && elements > kLimit / dim)
        throw SafetensorsError(where + ": shape " + shape->dump() + " has too many elements");
      elements *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    t.n_elements = static_cast<int64_t>(elements);
    const auto element_bytes = static_cast<uint64_t>(known->bytes);
    if (elements > kLimit / element_bytes)
      throw SafetensorsError(where + ": shape " + shape->dump() + " has too many bytes");

    const auto offsets = entry.find("data_offsets");
    if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
        !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
      throw SafetensorsError(where + ": 'data_offsets' is missing or not two non-negative integers");
    }
    const uint64_t begin = (*offsets)[0].get<uint64_t>();
    const uint64_t end = (*offsets)[1].get<uint64_t>();
    const std::string range = "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "]";
    if (end < begin) throw SafetensorsError(where + ": " + range + " end before they begin");
    if (end > buffer_bytes) {
      throw SafetensorsError(where + ": " + range + " extend past the end of the data (" +
                             std::to_string(buffer_bytes) + " bytes; file truncated?)");
    }
    if (end - begin != elements * element_bytes) {
      throw SafetensorsError(where + ": shape " + shape_string(t.shape) + " of " + known->name + " needs " +
                             std::to_string(elements * element_bytes) + " bytes but " + range + " hold " +
                             std::to_string(end - begin));
    }
    t.offset = begin;
    t.size_bytes = end - begin;
    tensors_.push_back(std::move(t));
  }

  // The buffer must be covered exactly, in offset order: no overlaps, no gaps, nothing after.
  std::sort(tensors_.begin(), tensors_.end(),
            [](const SafetensorsTensorInfo& a, const SafetensorsTensorInfo& b) {
              return a.offset != b.offset ? a.offset < b.offset : a.size_bytes < b.size_bytes;
            });
  // Overlaps first: they are the worse problem (two tensors sharing bytes), and a moved tensor
  // leaves a gap behind as well.
  const SafetensorsTensorInfo* furthest = nullptr;  // of the tensors so far, the one ending last
  for (const SafetensorsTensorInfo& t : tensors_) {
    if (furthest != nullptr && t.offset < furthest->offset + furthest->size_bytes) {
      throw SafetensorsError(p + ": tensor '" + t.name + "' data [" + std::to_string(t.offset) + ", " +
                             std::to_string(t.offset + t.size_bytes) + ") overlaps tensor '" +
                             furthest->name + "' [" + std::to_string(furthest->offset) + ", " +
                             std::to_string(furthest->offset + furthest->size_bytes) + ")");
    }
    if (furthest == nullptr || t.offset + t.size_bytes > furthest->offset + furthest->size_bytes)
      furthest = &t;
  }
  uint64_t covered = 0;
  for (const SafetensorsTensorInfo& t : tensors_) {
    if (t.offset > covered) {
      throw SafetensorsError(p + ": tensor '" + t.name + "' data starts at " + std::to_string(t.offset) +
                             ", leaving a gap after byte " + std::to_string(covered) + " of the data");
    }
    covered = t.offset + t.size_bytes;
  }
  if (covered != buffer_bytes) {
    throw SafetensorsError(p + ": " + std::to_string(buffer_bytes - covered) +
                           " bytes after the last tensor's data (the tensors cover " +
                           std::to_string(covered) + " of " + std::to_string(buffer_bytes) + ")");
  }
  for (size_t i = 0; i < tensors_.size(); ++i) tensor_index_[tensors_[i].name] = i;
}

const SafetensorsTensorInfo* SafetensorsFile::find_tensor(const std::string& name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const uint8_t* SafetensorsFile::tensor_data(const SafetensorsTensorInfo& tensor) const {
  return base_ + data_offset_ + tensor.offset;
}

PartialFile start_safetensors(const std::string& path, const std::vector<SafetensorsTensorSpec>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::map<std::string, PartialFile::Slot> slots;
  uint64_t offset = 0;
  for (const SafetensorsTensorSpec& t : tensors) {
    int64_t elements = 1;
    for (int64_t d : t.shape) elements *= d;
    const auto size = static_cast<uint64_t>(elements * safetensors_dtype_bytes(t.dtype));
    if (header.contains(t.name)) throw SafetensorsError(path + ": tensor '" + t.name + "' is named twice");
    header[t.name] = {{"dtype", safetensors_dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + size}}};
    slots[t.name] = {offset, size, false};  // from the buffer's start until the header's length is known
    offset += size;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the buffer 8-byte aligned
  const uint64_t buffer_start = 8 + text.size();
  for (auto& [name, slot] : slots) slot.offset += buffer_start;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw SafetensorsError("cannot create " + tmp + ": " + std::strerror(errno));
    uint8_t length[8];
    for (int i = 0; i < 8; ++i)
      length[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
    out.write(reinterpret_cast<const char*>(length), 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    out.close();
    std::error_code ec;
    if (out) std::filesystem::resize_file(tmp, buffer_start + offset, ec);  // the tensors: holes until filled
    if (!out || ec) {
      std::filesystem::remove(tmp, ec);
      throw SafetensorsError(tmp + ": cannot write");
    }
  }
  return PartialFile(path, tmp, std::move(slots),
                     [](const std::string& what) { throw SafetensorsError(what); });
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsTensorData>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsTensorSpec> specs;
  for (const SafetensorsTensorData& t : tensors) {
    int64_t elements = 1;
    for (int64_t d : t.shape) elements *= d;
    if (static_cast<uint64_t>(elements * safetensors_dtype_bytes(t.dtype)) != t.bytes.size()) {
      throw SafetensorsError(path + ": tensor '" + t.name + "' has " + std::to_string(t.bytes.size()) +
                             " bytes for shape " + shape_string(t.shape));
    }
    specs.push_back({t.name, t.dtype, t.shape});
  }
  PartialFile file = start_safetensors(path, specs, metadata);
  for (const SafetensorsTensorData& t : tensors) file.fill(t.name, t.bytes);
  file.finish();
}

}  // namespace nibble::model
