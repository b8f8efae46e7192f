#pragma once
// Where each process of `mpirun -np 1+T*P nibble serve` sits. Pure arithmetic, no MPI, so that it
// can be tested and used by the coordinator without a communicator.
//
// World rank 0 is the coordinator; ranks 1..T*P are workers. Worker w = world_rank - 1 belongs to
// pipeline stage w / T and has tensor-parallel rank w % T, so each stage's T ranks are contiguous
// in the world (they usually share a host and the fastest links). With a draft rank (speculative
// decoding, `draft.placement: own_rank`) the last world rank, 1 + T*P, runs the draft model.

#include <optional>
#include <string>
#include <vector>

namespace nibble::parallel {

enum class Role { coordinator, worker, draft };

const char* role_name(Role role);

// One rank's place in the layout. Worker-only fields are -1 / empty / nullopt on the coordinator
// and the draft rank.
struct RankInfo {
  int world_rank = 0;
  Role role = Role::coordinator;
  int worker_index = -1;  // world_rank - 1
  int stage = -1;         // pipeline stage, in [0, P)
  int tp_rank = -1;       // rank inside the stage's tensor group, in [0, T)
  // World ranks of this stage's tensor group, ordered by tp_rank (this rank included).
  std::vector<int> tensor_group;
  // World ranks of this tp_rank across all stages, ordered by stage (this rank included).
  std::vector<int> pipeline_group;
  // World rank of the same tp_rank in the previous / next stage; nullopt at the ends.
  std::optional<int> prev_stage_peer;
  std::optional<int> next_stage_peer;
  bool is_first_stage = false;
  bool is_last_stage = false;
  // Index of this process among those on its host (picks the GPU). RankLayout cannot know it:
  // -1 unless filled in by describe_this_rank() (mpi_communicator.hpp).
  int local_rank = -1;
};

class RankLayout {
 public:
  // Throws std::invalid_argument unless tensor >= 1, pipeline >= 1 and
  // world_size == 1 + tensor * pipeline (+ 1 with a draft rank).
  RankLayout(int world_size, int tensor, int pipeline, bool draft_rank = false);

  int world_size() const { return world_size_; }
  int tensor() const { return tensor_; }
  int pipeline() const { return pipeline_; }
  int num_workers() const { return tensor_ * pipeline_; }
  bool has_draft_rank() const { return draft_rank_; }
  // World rank of the draft (the last one); -1 without a draft rank.
  int draft_world_rank() const { return draft_rank_ ? 1 + num_workers() : -1; }

  static constexpr int kCoordinatorRank = 0;

  // Throws std::out_of_range for a rank outside [0, world_size).
  RankInfo rank(int world_rank) const;

  // World rank of the worker at (stage, tp_rank); throws std::out_of_range if outside the grid.
  int world_rank_of(int stage, int tp_rank) const;
  // World ranks of a stage's tensor group, ordered by tp_rank.
  std::vector<int> tensor_group(int stage) const;
  // World ranks holding tp_rank in each stage, ordered by stage.
  std::vector<int> pipeline_group(int tp_rank) const;

  std::string describe() const;  // e.g. "1 coordinator + 2 stages x 4 tensor ranks = 9 ranks"

 private:
  int world_size_;
  int tensor_;
  int pipeline_;
  bool draft_rank_;
};

}  // namespace nibble::parallel
