#include "cluster/cli/peer_process.hpp"

#include <cstdio>

namespace nibble::cli {
namespace {

// Single quotes keep everything literal in sh; a quote inside becomes '\''.
std::string shell_quote(const std::string& s) {
  std::string out(1, '\'');
  for (char c : s) {
    if (c == '\'')
      out.append("'\\''");
    else
      out.push_back(c);
  }
  out.push_back('\'');
  return out;
}

}  // namespace

nlohmann::json run_peer_script(const std::string& script, const std::vector<std::string>& args) {
  // Appended piece by piece: GCC 12 warns falsely (-Wrestrict) about `"literal" + std::string`.
  std::string command = "python3";
  command.append(" ").append(shell_quote(script));
  for (const std::string& arg : args) command.append(" ").append(shell_quote(arg));
  command.append(" 2>/dev/null");
  std::string output;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buffer[4096];
    size_t n = 0;
    while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) output.append(buffer, n);
    pclose(pipe);
  }
  const auto parsed = nlohmann::json::parse(output, nullptr, false);
  if (parsed.is_discarded() || !parsed.is_object()) {
    std::string error = "the peer script ";
    error.append(script).append(" printed no result");
    return {{"error", error}};
  }
  return parsed;
}

}  // namespace nibble::cli
