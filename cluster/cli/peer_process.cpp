#include "cluster/cli/peer_process.hpp"

#include <sys/wait.h>

#include <csignal>
#include <cstdio>
#include <cstring>
#include <string>

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
  int status = -1;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buffer[4096];
    size_t n = 0;
    while ((n = fread(buffer, 1, sizeof buffer, pipe)) > 0) output.append(buffer, n);
    status = pclose(pipe);
  }
  const auto parsed = nlohmann::json::parse(output, nullptr, false);
  if (parsed.is_discarded() || !parsed.is_object()) {
    std::string error = "the peer script ";
    error.append(script).append(" printed no result");
    // sh reports a child killed by signal N as exit status 128 + N.
    const int exit_code = status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    if (exit_code > 128) {
      const int signal_number = exit_code - 128;
      error.append(" (killed by signal ").append(std::to_string(signal_number));
      if (const char* name = strsignal(signal_number)) error.append(", ").append(name);
      error.append(")");
      if (signal_number == SIGILL) {
        // Seen with llama-cpp-python built with GGML_NATIVE on a VM that reports AMX it refuses.
        error.append(
            ": llama.cpp was built for instructions this CPU refuses; reinstall llama-cpp-python "
            "with CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" "
            "(plus -DGGML_AVX512=ON and -DGGML_AVX512_VNNI=ON where the CPU has them)");
      }
    } else if (exit_code > 0) {
      error.append(" (exit status ").append(std::to_string(exit_code)).append(")");
    }
    return {{"error", error}};
  }
  return parsed;
}

}  // namespace nibble::cli
