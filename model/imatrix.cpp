#include "model/imatrix.hpp"

#include <cmath>
#include <cstring>
#include <fstream>

#include "model/gguf.hpp"

namespace nibble::model {

namespace {

constexpr const char* kSumsSuffix = ".in_sum2";
constexpr const char* kCountsSuffix = ".counts";

bool remove_suffix(std::string& name, const std::string& suffix) {
  if (!name.ends_with(suffix)) return false;
  name.resize(name.size() - suffix.size());
  return true;
}

std::vector<float> read_f32(const GgufFile& file, const GgufTensorInfo& t) {
  if (t.type != kernels::DType::F32) {
    throw GgufError(file.path() + ": imatrix tensor '" + t.name + "' is " + kernels::type_name(t.type) +
                    ", not F32");
  }
  std::vector<float> values(static_cast<size_t>(t.n_elements));
  std::memcpy(values.data(), file.tensor_data(t), values.size() * sizeof(float));
  return values;
}

// llama.cpp's legacy format: int32 n_entries; per entry int32 name length, the name, int32 ncall, int32
// nval, float values[nval] (the sums already divided by the tokens and multiplied by ncall); then
// optionally int32 chunk count, int32 length and the dataset name.
ImportanceMatrix read_legacy(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw GgufError("cannot open imatrix " + path);
  const int64_t size = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  // Bytes left after the read position: counts read from the file are checked against them before
  // anything is allocated.
  auto left = [&]() { return size - static_cast<int64_t>(in.tellg()); };
  auto read_i32 = [&](const char* what) {
    int32_t v = 0;
    in.read(reinterpret_cast<char*>(&v), sizeof v);
    if (!in)
      throw GgufError(path + ": not an imatrix (GGUF or llama.cpp's legacy .dat): truncated at " + what);
    return v;
  };
  ImportanceMatrix imatrix;
  const int32_t n_entries = read_i32("the entry count");
  if (n_entries < 1 || n_entries > (1 << 20))
    throw GgufError(path + ": not an imatrix (GGUF or llama.cpp's legacy .dat): " +
                    std::to_string(n_entries) + " entries");
  for (int32_t i = 0; i < n_entries; ++i) {
    const int32_t length = read_i32("an entry's name length");
    // 55: a GGUF tensor name holds at most 63 bytes, and the entry's becomes "<name>.in_sum2".
    if (length < 1 || length > 55 || length > left()) {
      throw GgufError(path + ": imatrix entry " + std::to_string(i) + ": bad name length " +
                      std::to_string(length));
    }
    std::string name(static_cast<size_t>(length), '\0');
    in.read(name.data(), length);
    const int32_t ncall = read_i32("an entry's call count");
    if (ncall < 0) throw GgufError(path + ": imatrix entry '" + name + "' has a negative call count");
    const int32_t nval = read_i32("an entry's value count");
    if (nval < 1 || static_cast<int64_t>(nval) * 4 > left()) {
      throw GgufError(path + ": imatrix entry '" + name + "': " + std::to_string(nval) +
                      " values, more than the file holds");
    }
    ImatrixEntry e;
    e.sums.resize(static_cast<size_t>(nval));
    in.read(reinterpret_cast<char*>(e.sums.data()), static_cast<std::streamsize>(nval * sizeof(float)));
    if (!in) throw GgufError(path + ": imatrix entry '" + name + "' is truncated");
    e.count = ncall;  // the values are averages times ncall: importance() divides by it
    imatrix.entries[name] = std::move(e);
  }
  int32_t chunks = 0;
  if (in.read(reinterpret_cast<char*>(&chunks), sizeof chunks)) {
    imatrix.chunk_count = chunks;
    int32_t length = 0;
    if (in.read(reinterpret_cast<char*>(&length), sizeof length) && length > 0 && length <= left()) {
      std::string dataset(static_cast<size_t>(length), '\0');
      if (in.read(dataset.data(), length)) imatrix.datasets.push_back(dataset);
    }
  }
  return imatrix;
}

bool is_gguf(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  in.read(magic, 4);
  return in && std::memcmp(magic, "GGUF", 4) == 0;
}

}  // namespace

std::optional<std::vector<float>> ImportanceMatrix::importance(const std::string& tensor) const {
  const auto it = entries.find(tensor);
  if (it == entries.end()) return std::nullopt;
  std::vector<float> row(it->second.sums.size(), 1.0f);
  if (it->second.count > 0) {
    const float count = static_cast<float>(it->second.count);
    for (size_t i = 0; i < row.size(); ++i) row[i] = it->second.sums[i] / count;
  }
  return row;
}

ImportanceMatrix read_imatrix(const std::string& path) {
  if (!is_gguf(path)) {
    ImportanceMatrix legacy = read_legacy(path);
    legacy.file = path;
    return legacy;
  }
  const auto file = GgufFile::open(path);
  ImportanceMatrix imatrix;
  imatrix.file = path;
  if (file->has("imatrix.datasets")) imatrix.datasets = file->get_string_array("imatrix.datasets");
  imatrix.chunk_count = static_cast<int64_t>(file->find_uint("imatrix.chunk_count").value_or(0));
  imatrix.chunk_size = static_cast<int64_t>(file->find_uint("imatrix.chunk_size").value_or(0));
  std::map<std::string, const GgufTensorInfo*> sums, counts;
  for (const GgufTensorInfo& t : file->tensors()) {
    std::string name = t.name;
    if (remove_suffix(name, kSumsSuffix)) {
      sums[name] = &t;
    } else if (remove_suffix(name, kCountsSuffix)) {
      counts[name] = &t;
    }
  }
  if (sums.empty()) throw GgufError(path + ": not an imatrix: no '<tensor>.in_sum2' tensors");
  for (const auto& [name, sums_tensor] : sums) {
    const auto c = counts.find(name);
    if (c == counts.end()) throw GgufError(path + ": imatrix entry '" + name + "' has sums but no counts");
    const std::vector<float> count = read_f32(*file, *c->second);
    if (count.size() != 1) {
      throw GgufError(path + ": imatrix entry '" + name + "' has " + std::to_string(count.size()) +
                      " matrices (a mixture of experts); Nibble serves dense models");
    }
    if (!(count[0] >= 0.0f) || count[0] > 1e15f)
      throw GgufError(path + ": imatrix entry '" + name + "' has count " + std::to_string(count[0]));
    ImatrixEntry e;
    e.sums = read_f32(*file, *sums_tensor);
    e.count = std::llround(count[0]);
    imatrix.entries[name] = std::move(e);
  }
  for (const auto& [name, count_tensor] : counts) {
    if (!sums.contains(name)) throw GgufError(path + ": imatrix entry '" + name + "' has counts but no sums");
  }
  return imatrix;
}

void write_imatrix(const ImportanceMatrix& imatrix, const std::string& path) {
  GgufWriter out;
  out.set_string("general.type", "imatrix");
  out.set_string_array("imatrix.datasets", imatrix.datasets);
  out.set_uint32("imatrix.chunk_count", static_cast<uint32_t>(imatrix.chunk_count));
  out.set_uint32("imatrix.chunk_size", static_cast<uint32_t>(imatrix.chunk_size));
  for (const auto& [name, e] : imatrix.entries) {
    std::vector<uint8_t> sums(e.sums.size() * sizeof(float));
    std::memcpy(sums.data(), e.sums.data(), sums.size());
    const float count = static_cast<float>(e.count);
    std::vector<uint8_t> counts(sizeof count);
    std::memcpy(counts.data(), &count, sizeof count);
    out.add_tensor(name + kSumsSuffix, {static_cast<int64_t>(e.sums.size()), 1}, kernels::DType::F32,
                   std::move(sums));
    out.add_tensor(name + kCountsSuffix, {1, 1}, kernels::DType::F32, std::move(counts));
  }
  out.write(path);
}

}  // namespace nibble::model
