#pragma once
// Rows of floats kept where a model made them: a draft's dense distributions q_i, left on the GPU
// that drafted them (ForwardModel::forward_draft_sample) so that the target on that device verifies
// against them there (forward_verify) and only token ids cross to the host. A handle keeps its rows
// alive; whoever needs them on the host (a verification that runs there) copies them.
#include <cstdint>
#include <vector>

namespace nibble::worker {

class KeptRows {
 public:
  KeptRows(int64_t rows, int64_t row_size) : rows_(rows), row_size_(row_size) {}
  virtual ~KeptRows() = default;
  KeptRows(const KeptRows&) = delete;
  KeptRows& operator=(const KeptRows&) = delete;

  int64_t rows() const { return rows_; }
  int64_t row_size() const { return row_size_; }
  // The rows in device memory ([rows, row_size], a device pointer valid while this handle lives);
  // nullptr for rows a host backend keeps (such rows are only ever copied).
  virtual const float* device_data() const = 0;
  // Rows first .. first + count - 1 into out ([count, row_size]). Throws std::out_of_range for rows
  // outside the store, std::runtime_error when the copy fails.
  virtual void copy_to_host(int64_t first, int64_t count, std::vector<float>& out) const = 0;

 private:
  int64_t rows_, row_size_;
};

// Row `row` of a store a model writes into (nullptr rows: nothing kept for that logit row).
struct KeptRowRef {
  KeptRows* rows = nullptr;
  int64_t row = 0;
};

}  // namespace nibble::worker
