#pragma once
// Communicator over MPI (host memory), the start-up helpers that need MPI, and the construction of
// the worker / tensor / pipeline groups from a RankLayout. MPI must be initialized by the caller
// (MPI_Init in main) and outlive every MpiCommunicator that is destroyed before MPI_Finalize.

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <memory>
#include <string>

#include "parallel/communicator.hpp"
#include "parallel/rank_layout.hpp"

namespace nibble::parallel {

class MpiCommunicator final : public Communicator {
 public:
  // Collective over parent (every rank of parent must call it): ranks with the same color form a
  // group, ordered by key (ties by parent rank). Ranks passing color == MPI_UNDEFINED get nullptr.
  // The new communicator is owned (freed by the destructor) and reports errors as exceptions.
  static std::unique_ptr<MpiCommunicator> split(MPI_Comm parent, int color, int key,
                                                const std::string& name = "");
  // Collective over comm: wraps an owned MPI_Comm_dup of it (e.g. of MPI_COMM_WORLD).
  static std::unique_ptr<MpiCommunicator> duplicate(MPI_Comm comm, const std::string& name = "");

  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(float* data, size_t count) override;
  void all_gather(const float* send, size_t count_per_rank, float* recv) override;
  void broadcast(void* data, size_t bytes, int root) override;
  void send(const void* data, size_t bytes, int dest, int tag) override;
  void recv(void* data, size_t bytes, int src, int tag) override;
  void barrier() override;

  MPI_Comm handle() const { return comm_; }
  const std::string& name() const { return name_; }

  // MPI counts are int, so longer buffers go in chunks of at most this many elements (floats for
  // the float calls, bytes otherwise). Tests lower it to exercise the chunking; every rank of the
  // group must use the same value.
  static constexpr size_t kMaxChunkElements = INT_MAX;
  void set_max_chunk_elements(size_t elements);

 private:
  MpiCommunicator(MPI_Comm owned, std::string name);
  // Throws CommunicatorError naming the call, this rank and MPI's error string unless code is success.
  void check(int code, const char* call) const;
  void check_peer(int peer, const char* what, const char* call) const;
  void check_tag(int tag, const char* call) const;

  MPI_Comm comm_;
  std::string name_;
  int rank_ = 0;
  int size_ = 0;
  int max_tag_ = 32767;  // MPI guarantees at least this; the real MPI_TAG_UB is read at construction
  size_t max_chunk_ = kMaxChunkElements;
};

// The communicators one process takes part in. All null on the coordinator, which only talks to
// workers over the world communicator.
struct ParallelGroups {
  std::unique_ptr<MpiCommunicator> workers;   // every worker; rank = world rank - 1
  std::unique_ptr<MpiCommunicator> tensor;    // this stage's T ranks; rank = tp_rank
  std::unique_ptr<MpiCommunicator> pipeline;  // this tp_rank across the P stages; rank = stage
};

// Collective over world (coordinator included). Throws CommunicatorError if world's size is not
// layout.world_size().
ParallelGroups make_groups(MPI_Comm world, const RankLayout& layout);

// Index of this process among the processes on its host: OMPI_COMM_WORLD_LOCAL_RANK when world is
// MPI_COMM_WORLD and the variable is set (no communication), otherwise the rank in an
// MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) of world, which is collective over world.
int host_local_rank(MPI_Comm world);

// layout.rank(this world rank) with local_rank filled in by host_local_rank (see there: may be
// collective).
RankInfo describe_this_rank(MPI_Comm world, const RankLayout& layout);

}  // namespace nibble::parallel
