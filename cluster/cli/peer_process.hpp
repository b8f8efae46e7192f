#pragma once
// Benchmark peers (llama.cpp) run as child processes through small Python drivers in tools/ that
// print one JSON object; the bench commands print their figures beside Nibble's.
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace nibble::cli {

// Runs `python3 script args...` (each argument shell-quoted; stderr dropped) and returns the JSON
// object it printed, or {"error": ...} when it printed none. A driver reports its own failures as
// {"error": ...} too, so callers check for "error" only.
nlohmann::json run_peer_script(const std::string& script, const std::vector<std::string>& args);

}  // namespace nibble::cli
