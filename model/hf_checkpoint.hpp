#pragma once
// A Hugging Face checkpoint directory: config.json plus the weights, either one model.safetensors or
// shards listed in model.safetensors.index.json ({"weight_map": {tensor name: shard file name}}).
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "model/safetensors.hpp"

namespace nibble::model {

// Problems with the directory, config.json or the index (a problem inside one .safetensors file is
// a SafetensorsError). The message names the file and the problem.
class HfCheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class HfCheckpoint {
 public:
  // True when `path` is a directory (the only thing that can be an HF checkpoint).
  static bool is_checkpoint_dir(const std::string& path);
  // Reads config.json and maps the weights (model.safetensors when present, else the shards of the
  // index). Every tensor the index names must exist in its shard; shard names must be plain file
  // names inside the directory. Throws HfCheckpointError or SafetensorsError.
  static std::shared_ptr<const HfCheckpoint> open(const std::string& dir);

  const std::string& dir() const { return dir_; }
  const std::string& config_path() const { return config_path_; }
  const std::string& config_text() const { return config_text_; }  // config.json, unparsed

  struct Tensor {
    const SafetensorsFile* file = nullptr;
    const SafetensorsTensorInfo* info = nullptr;
    const uint8_t* data() const { return file->tensor_data(*info); }
  };
  // Null when the checkpoint has no such tensor.
  const Tensor* find_tensor(const std::string& name) const;
  const std::map<std::string, Tensor>& tensors() const { return tensors_; }
  const std::vector<std::shared_ptr<const SafetensorsFile>>& files() const { return files_; }
  uint64_t weight_bytes() const;  // sum of the .safetensors file sizes

 private:
  HfCheckpoint() = default;
  std::string dir_, config_path_, config_text_;
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, Tensor> tensors_;
};

}  // namespace nibble::model
