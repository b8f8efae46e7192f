#include "model/partial_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <utility>

namespace nibble::model {

PartialFile::PartialFile(std::string path, std::string tmp, std::map<std::string, Slot> slots, Fail on_error)
    : path_(std::move(path)), tmp_(std::move(tmp)), slots_(std::move(slots)), fail_(on_error) {
  if (slots_.empty()) return;
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd_ < 0) {
    const int err = errno;
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
    fail("cannot open " + std::exchange(tmp_, {}) + ": " + std::strerror(err));
  }
}

PartialFile::PartialFile(PartialFile&& other) noexcept
    : path_(std::move(other.path_)),
      tmp_(std::exchange(other.tmp_, {})),
      slots_(std::move(other.slots_)),
      fail_(other.fail_),
      fd_(std::exchange(other.fd_, -1)) {}

PartialFile::~PartialFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) {
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
  }
}

void PartialFile::fail(const std::string& what) const {
  fail_(what);
  throw std::runtime_error(what);  // (fail_ throws; this keeps the promise of [[noreturn]] if not)
}

void PartialFile::fill(const std::string& name, const uint8_t* data, uint64_t size) {
  if (tmp_.empty()) fail("tensor '" + name + "' filled after " + path_ + " was finished");
  const auto it = slots_.find(name);
  if (it == slots_.end()) fail("tensor '" + name + "' was not added to be filled later");
  Slot& slot = it->second;
  if (slot.filled) fail("tensor '" + name + "' filled twice");
  if (size != slot.size) {
    fail("tensor '" + name + "' filled with " + std::to_string(size) + " bytes, not " +
         std::to_string(slot.size));
  }
  for (uint64_t done = 0; done < size;) {
    const ssize_t n = ::pwrite(fd_, data + done, std::min<uint64_t>(size - done, uint64_t{1} << 30),
                               static_cast<off_t>(slot.offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) fail("failed writing tensor '" + name + "' to " + tmp_ + ": " + std::strerror(errno));
    done += static_cast<uint64_t>(n);
  }
  slot.filled = true;
}

void PartialFile::finish() {
  if (tmp_.empty()) fail(path_ + " was finished already");
  for (const auto& [name, slot] : slots_) {
    if (!slot.filled) fail(path_ + ": tensor '" + name + "' was never filled");
  }
  if (fd_ >= 0) {
    const int closed = ::close(fd_);
    fd_ = -1;
    if (closed != 0) fail("failed writing " + tmp_ + ": " + std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(tmp_, path_, ec);
  if (ec) fail("cannot rename " + tmp_ + " to " + path_ + ": " + ec.message());
  tmp_.clear();
}

}  // namespace nibble::model
