#include "model/hf_checkpoint.hpp"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace nibble::model {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw HfCheckpointError(path.string() + ": cannot open");
  std::ostringstream text;
  text << in.rdbuf();
  if (!in && !in.eof()) throw HfCheckpointError(path.string() + ": cannot read");
  return text.str();
}

}  // namespace

bool HfCheckpoint::is_checkpoint_dir(const std::string& path) {
  std::error_code ec;
  return fs::is_directory(path, ec);
}

std::shared_ptr<const HfCheckpoint> HfCheckpoint::open(const std::string& dir) {
  if (!is_checkpoint_dir(dir)) throw HfCheckpointError(dir + ": not a directory");
  std::shared_ptr<HfCheckpoint> c(new HfCheckpoint());
  c->dir_ = dir;
  const fs::path root(dir);
  c->config_path_ = (root / "config.json").string();
  if (!fs::exists(c->config_path_))
    throw HfCheckpointError(dir + ": config.json is missing (not a Hugging Face checkpoint?)");
  c->config_text_ = read_text(c->config_path_);

  const fs::path single = root / "model.safetensors";
  const fs::path index_path = root / "model.safetensors.index.json";
  if (fs::exists(single)) {  // preferred when both exist, as transformers does
    auto file = SafetensorsFile::open(single.string());
    for (const SafetensorsTensorInfo& t : file->tensors()) c->tensors_[t.name] = Tensor{file.get(), &t};
    c->files_.push_back(std::move(file));
    return c;
  }
  if (!fs::exists(index_path)) {
    throw HfCheckpointError(dir + ": neither model.safetensors nor model.safetensors.index.json is there" +
                            " (only safetensors weights are read)");
  }
  const std::string where = index_path.string();
  json index;
  try {
    index = json::parse(read_text(index_path));
  } catch (const json::exception& e) {
    throw HfCheckpointError(where + ": not valid JSON: " + e.what());
  }
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
    throw HfCheckpointError(where + ": 'weight_map' is missing or not an object");
  std::map<std::string, const SafetensorsFile*> shards;
  for (const auto& [name, shard] : index["weight_map"].items()) {
    if (!shard.is_string())
      throw HfCheckpointError(where + ": weight_map entry of '" + name + "' is not a file name");
    const std::string shard_name = shard.get<std::string>();
    // A plain name inside the directory: the index must not point elsewhere on the machine.
    if (shard_name.empty() || shard_name.find('/') != std::string::npos || shard_name == "." ||
        shard_name == "..") {
      throw HfCheckpointError(where + ": weight_map entry of '" + name + "' names '" + shard_name +
                              "', which is not a file name in the checkpoint directory");
    }
    auto it = shards.find(shard_name);
    if (it == shards.end()) {
      const fs::path shard_path = root / shard_name;
      if (!fs::exists(shard_path)) {
        throw HfCheckpointError(where + ": shard '" + shard_name + "' (holding '" + name +
                                "') is missing from the directory");
      }
      c->files_.push_back(SafetensorsFile::open(shard_path.string()));
      it = shards.emplace(shard_name, c->files_.back().get()).first;
    }
    const SafetensorsTensorInfo* info = it->second->find_tensor(name);
    if (info == nullptr) {
      throw HfCheckpointError(where + ": tensor '" + name + "' is listed in shard '" + shard_name +
                              "' but that shard does not contain it");
    }
    c->tensors_[name] = Tensor{it->second, info};
  }
  if (c->tensors_.empty()) throw HfCheckpointError(where + ": weight_map lists no tensors");
  return c;
}

const HfCheckpoint::Tensor* HfCheckpoint::find_tensor(const std::string& name) const {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

uint64_t HfCheckpoint::weight_bytes() const {
  uint64_t total = 0;
  for (const auto& f : files_) total += f->file_size();
  return total;
}

}  // namespace nibble::model
