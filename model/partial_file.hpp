#pragma once
// A file written but for some named byte ranges (a model's tensors), which are filled later, in any order,
// each once (as a long run produces them, so that it holds none of them for long), and then the file is
// put at its path. Until finish() it lives at a temporary name beside the path; destroyed unfinished (a
// run that failed), it is removed, so no half file is ever left at the path. The GGUF and safetensors
// writers make these (GgufWriter::start, start_safetensors).
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace nibble::model {

class PartialFile {
 public:
  struct Slot {
    uint64_t offset = 0;  // from the start of the file
    uint64_t size = 0;
    bool filled = false;
  };
  // Throws the format's exception with this message (GgufError, SafetensorsError).
  using Fail = void (*)(const std::string& what);

  // tmp: the file written so far, at its full length (the slots are holes or zeros). Opens it for the
  // fills (none are needed when there are no slots); on failure removes it and fails.
  PartialFile(std::string path, std::string tmp, std::map<std::string, Slot> slots, Fail on_error);
  PartialFile(PartialFile&& other) noexcept;
  PartialFile& operator=(PartialFile&&) = delete;
  PartialFile(const PartialFile&) = delete;
  PartialFile& operator=(const PartialFile&) = delete;
  ~PartialFile();

  const std::string& path() const { return path_; }
  // data: the slot's size. Fails for a name that has no slot, a second fill, another size, or an I/O
  // failure.
  void fill(const std::string& name, const uint8_t* data, uint64_t size);
  void fill(const std::string& name, const std::vector<uint8_t>& bytes) {
    fill(name, bytes.data(), bytes.size());
  }
  // Puts the file at its path. Fails naming a slot not filled, or on I/O failure.
  void finish();

 private:
  [[noreturn]] void fail(const std::string& what) const;
  std::string path_, tmp_;  // tmp_ empty once finished (or moved from)
  std::map<std::string, Slot> slots_;
  Fail fail_;
  int fd_ = -1;
};

}  // namespace nibble::model
