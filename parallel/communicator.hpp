#pragma once
// The collective-communication interface the tensor- and pipeline-parallel layers program against.
// One object is one group of ranks: MpiCommunicator (host memory) or, in CUDA builds,
// NcclCommunicator (device memory; see its header). Every call is blocking. Failures throw CommunicatorError:
// a failed collective leaves the group in an unknown state, so the caller should stop rather than retry.

#include <cstddef>
#include <stdexcept>
#include <string>

namespace nibble::parallel {

class CommunicatorError : public std::runtime_error {
 public:
  explicit CommunicatorError(const std::string& message) : std::runtime_error(message) {}
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  // This rank's index in the group, in [0, size()).
  virtual int rank() const = 0;
  // Number of ranks in the group.
  virtual int size() const = 0;

  // Collective. data: [count] floats on every rank; on return each holds the element-wise sum over
  // all ranks (in place).
  virtual void all_reduce_sum(float* data, size_t count) = 0;

  // Collective. send: [count_per_rank] floats; recv: [size(), count_per_rank] floats, row r holding
  // rank r's send buffer (this rank's row included). send and recv must not overlap.
  virtual void all_gather(const float* send, size_t count_per_rank, float* recv) = 0;

  // Collective. data: [bytes] on every rank; on return every rank holds root's bytes.
  virtual void broadcast(void* data, size_t bytes, int root) = 0;

  // Point to point. Sends [bytes] to group rank dest; the matching recv must name the same byte
  // count, this rank as src and the same tag (tag >= 0). Messages with the same (src, dest, tag)
  // arrive in the order they were sent. Blocking: two ranks that both send first to each other
  // may deadlock on large messages, so order the calls (e.g. even ranks send first).
  virtual void send(const void* data, size_t bytes, int dest, int tag) = 0;
  // Receives exactly [bytes] from group rank src with the given tag; a message of any other size
  // throws CommunicatorError.
  virtual void recv(void* data, size_t bytes, int src, int tag) = 0;

  // Collective. Returns once every rank of the group has entered it.
  virtual void barrier() = 0;
};

}  // namespace nibble::parallel
