#include "parallel/rank_layout.hpp"

#include <stdexcept>

namespace nibble::parallel {

const char* role_name(Role role) {
  switch (role) {
    case Role::coordinator:
      return "coordinator";
    case Role::worker:
      return "worker";
    case Role::draft:
      return "draft";
  }
  return "unknown";
}

RankLayout::RankLayout(int world_size, int tensor, int pipeline, bool draft_rank)
    : world_size_(world_size), tensor_(tensor), pipeline_(pipeline), draft_rank_(draft_rank) {
  if (tensor < 1 || pipeline < 1) {
    throw std::invalid_argument("tensor and pipeline parallel sizes must be >= 1 (got tensor " +
                                std::to_string(tensor) + ", pipeline " + std::to_string(pipeline) + ")");
  }
  // Compute in 64 bits so that absurd arguments give the size message, not an overflow.
  const long long expected = 1 + static_cast<long long>(tensor) * pipeline + (draft_rank ? 1 : 0);
  if (world_size != expected) {
    throw std::invalid_argument("world size " + std::to_string(world_size) +
                                " does not match 1 coordinator + " + std::to_string(pipeline) +
                                " pipeline stages x " + std::to_string(tensor) + " tensor ranks" +
                                (draft_rank ? " + 1 draft rank" : "") + " = " + std::to_string(expected) +
                                " ranks (start with mpirun -np " + std::to_string(expected) + ")");
  }
}

int RankLayout::world_rank_of(int stage, int tp_rank) const {
  if (stage < 0 || stage >= pipeline_ || tp_rank < 0 || tp_rank >= tensor_) {
    throw std::out_of_range("no worker at stage " + std::to_string(stage) + ", tp_rank " +
                            std::to_string(tp_rank) + " in " + describe());
  }
  return 1 + stage * tensor_ + tp_rank;
}

std::vector<int> RankLayout::tensor_group(int stage) const {
  std::vector<int> ranks;
  for (int t = 0; t < tensor_; ++t) ranks.push_back(world_rank_of(stage, t));
  return ranks;
}

std::vector<int> RankLayout::pipeline_group(int tp_rank) const {
  std::vector<int> ranks;
  for (int s = 0; s < pipeline_; ++s) ranks.push_back(world_rank_of(s, tp_rank));
  return ranks;
}

RankInfo RankLayout::rank(int world_rank) const {
  if (world_rank < 0 || world_rank >= world_size_) {
    throw std::out_of_range("world rank " + std::to_string(world_rank) + " outside " + describe());
  }
  RankInfo info;
  info.world_rank = world_rank;
  if (world_rank == kCoordinatorRank) return info;
  if (world_rank == draft_world_rank()) {
    info.role = Role::draft;
    return info;
  }

  info.role = Role::worker;
  info.worker_index = world_rank - 1;
  info.stage = info.worker_index / tensor_;
  info.tp_rank = info.worker_index % tensor_;
  info.tensor_group = tensor_group(info.stage);
  info.pipeline_group = pipeline_group(info.tp_rank);
  info.is_first_stage = info.stage == 0;
  info.is_last_stage = info.stage == pipeline_ - 1;
  if (!info.is_first_stage) info.prev_stage_peer = world_rank_of(info.stage - 1, info.tp_rank);
  if (!info.is_last_stage) info.next_stage_peer = world_rank_of(info.stage + 1, info.tp_rank);
  return info;
}

std::string RankLayout::describe() const {
  auto count = [](int n, const char* one, const char* many) {
    return std::to_string(n) + " " + (n == 1 ? one : many);
  };
  return "1 coordinator + " + count(pipeline_, "stage", "stages") + " x " +
         count(tensor_, "tensor rank", "tensor ranks") + (draft_rank_ ? " + 1 draft rank" : "") + " = " +
         std::to_string(world_size_) + " ranks";
}

}  // namespace nibble::parallel
