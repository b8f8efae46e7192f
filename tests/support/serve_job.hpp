#pragma once
// A real `mpirun -np 1+T*P nibble serve` job for tests (test_serve, test_openai_server): its config,
// its log, readiness, its ranks' pids, and a destructor that stops it (shutdown request, then SIGTERM,
// then SIGKILL of its process group). The including test target defines NIBBLE_MPIEXEC (CMake's
// MPIEXEC_EXECUTABLE).
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "cluster/client.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::cluster::test_jobs {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

// Where the job listens and how it is started, when not on one host over ipc://.
struct ServePlacement {
  std::string listen{};                    // server.listen; empty: ipc:// in `dir`
  std::string client_endpoint{};           // what clients connect to (default: listen)
  std::vector<std::string> mpirun_args{};  // extra mpirun arguments (hostfile, launch agent, ...)
  bool draft_rank = false;                 // one more rank: the config puts the draft on its own rank
  std::string server_keys{};               // more keys of the server: section ("lora_updates: true")
};

// The mpirun the jobs start: $NIBBLE_MPIEXEC when set (a relocated Open MPI, such as the GPU bundle's,
// whose path differs from the build machine's), else the one CMake found.
inline std::string mpiexec() {
  const char* env = std::getenv("NIBBLE_MPIEXEC");
  return env != nullptr && *env != '\0' ? env : NIBBLE_MPIEXEC;
}

// One `mpirun ... nibble serve` job, its output in a log file. The destructor stops it (shutdown
// request, then SIGKILL of its process group if it does not go).
class ServeJob {
 public:
  using Placement = ServePlacement;

  ServeJob(const fs::path& dir, const std::string& model_path, int tensor, int pipeline,
           const std::string& extra_yaml = "", const Placement& placement = {})
      : dir_(dir), log_(dir / "serve.log"), endpoint_("ipc://" + (dir / "nibble.sock").string()) {
    const std::string listen = placement.listen.empty() ? endpoint_ : placement.listen;
    if (!placement.client_endpoint.empty()) endpoint_ = placement.client_endpoint;
    const fs::path config = dir / "cluster.yaml";
    std::ofstream(config) << "model: { path: \"" << model_path << "\" }\n"
                          << "parallel: { tensor: " << tensor << ", pipeline: " << pipeline << " }\n"
                          << "threads: 1\n"
                          << "server: { listen: \"" << listen << "\""
                          << (placement.server_keys.empty() ? "" : ", " + placement.server_keys) << " }\n"
                          << extra_yaml;
    std::vector<std::string> args = {mpiexec(), "--allow-run-as-root", "--oversubscribe"};
    args.insert(args.end(), placement.mpirun_args.begin(), placement.mpirun_args.end());
    ranks_ = 1 + tensor * pipeline + (placement.draft_rank ? 1 : 0);
    const int ranks = ranks_;
    for (std::string a : {std::string("-np"), std::to_string(ranks), test::nibble_bin(), std::string("serve"),
                          std::string("--config"), config.string()}) {
      args.push_back(a);
    }
    pid_ = fork();
    if (pid_ == 0) {
      setpgid(0, 0);  // its own group, so a stuck job can be killed whole
      const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fd, 1);
      dup2(fd, 2);
      setenv("OMPI_MCA_btl_vader_single_copy_mechanism", "none", 1);
      setenv("OMPI_MCA_rmaps_base_oversubscribe", "1", 1);
      // As deploy/launch-local.sh: after a rank dies, 5 s from SIGTERM to SIGKILL (Open MPI's 1 s
      // default can cut the coordinator off before it has answered every open request).
      setenv("OMPI_MCA_odls_base_sigkill_timeout", "5", 1);
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    setpgid(pid_, pid_);
  }

  ~ServeJob() {
    if (exited_) return;
    try {
      ClientOptions options;
      options.timeout_ms = 2000;
      Client(endpoint_, options).shutdown();
    } catch (const std::exception&) {
    }
    if (!wait_exit(15s)) {
      // mpirun puts each rank in a process group of its own: a SIGTERM to mpirun lets it stop them
      // all; SIGKILL to what is left only if that does not work.
      kill(pid_, SIGTERM);
      if (!wait_exit(10s)) {
        kill(-pid_, SIGKILL);
        wait_exit(5s);
      }
    }
  }

  const std::string& endpoint() const { return endpoint_; }
  std::string log() const {
    std::ifstream in(log_);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  // Waits until the service answers a health request; false (with the log in the failure) if the
  // job ends or does not answer in time.
  bool wait_ready(std::chrono::seconds timeout = 90s) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (wait_exit(0s)) return false;
      try {
        ClientOptions options;
        options.timeout_ms = 500;
        if (Client(endpoint_, options).health().ok) {
          // mpirun forwards the coordinator's stderr on its own schedule: give the start-up lines
          // (one per rank, with its pid) a moment to reach the log.
          for (int i = 0; i < 100 && pid_lines() < ranks_ - 1; ++i) std::this_thread::sleep_for(100ms);
          return true;
        }
      } catch (const ClientError&) {
      }
    }
    return false;
  }

  int pid_lines() const {
    const std::string text = log();
    int n = 0;
    for (size_t at = text.find(", pid "); at != std::string::npos; at = text.find(", pid ", at + 1)) ++n;
    return n;
  }

  // The job's exit code once it has exited within `timeout`; nullopt while it still runs.
  std::optional<int> wait_exit(std::chrono::milliseconds timeout) {
    if (exited_) return exit_code_;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        return exit_code_;
      }
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(20ms);
    }
  }

  // pid of a worker, from the coordinator's start-up lines.
  // The pid of a worker or draft rank, from the coordinator's start-up lines.
  int worker_pid(int world_rank) const {
    const std::regex line("(worker|draft) rank " + std::to_string(world_rank) + ": .* pid ([0-9]+)");
    std::smatch m;
    const std::string text = log();
    return std::regex_search(text, m, line) ? std::stoi(m[2]) : -1;
  }

 private:
  fs::path dir_, log_;
  std::string endpoint_;
  pid_t pid_ = -1;
  int ranks_ = 0;
  bool exited_ = false;
  int exit_code_ = -1;
};

}  // namespace nibble::cluster::test_jobs
