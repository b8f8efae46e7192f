#include "parallel/communicator_reducer.hpp"

#include <algorithm>
#include <string>

namespace nibble::parallel {

void CommunicatorReducer::sum(float* data, size_t n) {
  if (group_.size() > 1) group_.all_reduce_sum(data, n);
}

void CommunicatorReducer::gather_columns(const float* local, int64_t rows,
                                         const std::vector<int64_t>& col_counts, float* out) {
  const int size = group_.size();
  if (static_cast<int>(col_counts.size()) != size) {
    throw CommunicatorError("gather_columns: " + std::to_string(col_counts.size()) +
                            " column counts for a group of " + std::to_string(size));
  }
  const int64_t max_cols = *std::max_element(col_counts.begin(), col_counts.end());
  const int64_t my_cols = col_counts[group_.rank()];
  send_.assign(static_cast<size_t>(rows * max_cols), 0.0f);
  for (int64_t r = 0; r < rows; ++r) std::copy_n(local + r * my_cols, my_cols, send_.data() + r * max_cols);
  recv_.resize(static_cast<size_t>(size * rows * max_cols));
  group_.all_gather(send_.data(), send_.size(), recv_.data());

  int64_t total_cols = 0;
  for (int64_t c : col_counts) total_cols += c;
  int64_t col_begin = 0;
  for (int s = 0; s < size; ++s) {
    const float* block = recv_.data() + static_cast<int64_t>(s) * rows * max_cols;  // [rows, max_cols]
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(block + r * max_cols, col_counts[s], out + r * total_cols + col_begin);
    col_begin += col_counts[s];
  }
}

}  // namespace nibble::parallel
