#pragma once
// Importance matrices (llama.cpp's "imatrix"): for each weight matrix, the sum over calibration tokens
// of the square of each of its inputs, and how many tokens were summed. Quantizers weigh each
// column's rounding error by sum / count (kernels::quantize_row_weighted), as llama-quantize --imatrix
// does. Read from and written to llama.cpp's files: the GGUF format of llama-imatrix (tensors
// "<matrix>.in_sum2" [n_in] and "<matrix>.counts" [1], F32; metadata general.type = "imatrix",
// imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size) and, read only, its legacy .dat format.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace nibble::model {

struct ImatrixEntry {
  std::vector<float> sums;  // [n_in]: Σ over tokens of x², per input column
  int64_t count = 0;        // tokens summed
};

struct ImportanceMatrix {
  std::map<std::string, ImatrixEntry> entries;  // by weight tensor name, e.g. "blk.0.attn_q.weight"
  std::vector<std::string> datasets;            // the calibration files' names
  int64_t chunk_count = 0;                      // calibration windows
  int64_t chunk_size = 0;                       // tokens a window
  std::string file;                             // the path read_imatrix read it from (empty otherwise)

  // The importance row llama-quantize uses for `tensor`: sums / count (all 1 when nothing was counted),
  // or nullopt when the matrix has no entry.
  std::optional<std::vector<float>> importance(const std::string& tensor) const;
};

// Reads llama.cpp's GGUF imatrix, or its legacy .dat when the file is not GGUF. Throws GgufError naming
// the problem (not an imatrix, an entry without counts, expert (3-D) entries, non-F32 data, a truncated
// legacy file).
ImportanceMatrix read_imatrix(const std::string& path);

// Writes the GGUF format llama-imatrix writes (entries in name order). Throws GgufError on I/O failure.
void write_imatrix(const ImportanceMatrix& imatrix, const std::string& path);

}  // namespace nibble::model
