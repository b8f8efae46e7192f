// The deployment scripts and example configs, run for real:
//   - deploy/launch-local.sh starts a T=2 cluster under mpirun and prints its endpoint once it is
//     healthy; `nibble client --json` gets the same greedy answer single-process `nibble generate`
//     gives; deploy/stop-local.sh shuts it down and reports exit code 0
//   - a bad config makes launch-local.sh fail with the server's message and no job left behind
//   - deploy/slurm/nibble-serve.sbatch, with stand-ins for scontrol and srun, places each stage's
//     tensor ranks on one node and refuses a task count that does not match its config; its
//     #SBATCH header matches the config it names
//   - under a real single-node Slurm (tests/slurm/local-slurm.sh; skipped where Slurm is not
//     installed), the batch script's `srun --mpi=pmix` job serves like a single process, ends
//     COMPLETED with exit code 0 on a shutdown request, and leaves no rank behind after scancel
//   - every config/*.yaml parses with the server's parser, and the `-np N` its comment shows is
//     1 + tensor * pipeline
// Every script runs under coreutils' timeout, and a guard kills a job left running, so no test can
// hang or leak processes.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "cluster/config/cluster_config.hpp"
#include "model/random_model.hpp"
#include "tests/support/test_support.hpp"

namespace nibble {
namespace {

namespace fs = std::filesystem;

const fs::path kRepoRoot = test::source_dir();

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The file once it contains `needle` (mpirun and srun forward a rank's output on their own
// schedule, so lines printed before the service answered may arrive after), or as it is after 10 s.
std::string read_text_once_it_has(const fs::path& path, const std::string& needle) {
  std::string text = read_text(path);
  for (int i = 0; i < 100 && text.find(needle) == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    text = read_text(path);
  }
  return text;
}

std::string quoted(const std::string& s) { return "'" + s + "'"; }

// Runs a deploy script with NIBBLE_BIN set, under `timeout`; stderr goes to `stderr_file` so that
// the result's output is the script's stdout alone.
test::CommandResult run_script(const std::string& script_and_args, const fs::path& stderr_file,
                               int timeout_s = 150) {
  return test::run_command("(NIBBLE_BIN=" + quoted(test::nibble_bin()) + " timeout -k 5 " +
                           std::to_string(timeout_s) + " bash " + quoted((kRepoRoot / "deploy").string()) +
                           "/" + script_and_args + " 2>" + quoted(stderr_file.string()) + ")");
}

// Fields of /proc/PID/stat after the command name: state, ppid, pgrp, session, ...; empty when
// there is no such process.
std::vector<std::string> proc_stat(int pid) {
  const std::string stat = read_text("/proc/" + std::to_string(pid) + "/stat");
  const size_t close = stat.rfind(") ");
  std::vector<std::string> fields;
  if (close == std::string::npos) return fields;
  std::istringstream in(stat.substr(close + 2));
  for (std::string f; in >> f;) fields.push_back(f);
  return fields;
}

bool process_alive(int pid) {
  const std::vector<std::string> f = proc_stat(pid);
  return !f.empty() && f[0] != "Z";
}

// Kills what launch-local.sh started from `run_dir` if it is still running when the test ends:
// every live process of the session the job leads (launch-local.sh starts it with setsid; mpirun
// puts each rank in a process group of its own, but they stay in that session).
class JobGuard {
 public:
  explicit JobGuard(fs::path run_dir) : run_dir_(std::move(run_dir)) {}
  ~JobGuard() {
    const std::string text = read_text(run_dir_ / "serve.pid");
    if (text.empty()) return;
    const int leader = std::stoi(text);
    if (leader <= 1) return;
    std::error_code ec;
    for (const fs::directory_entry& entry : fs::directory_iterator("/proc", ec)) {
      const std::string name = entry.path().filename().string();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      const std::vector<std::string> f = proc_stat(std::stoi(name));
      if (f.size() > 3 && f[0] != "Z" && f[3] == std::to_string(leader)) kill(std::stoi(name), SIGKILL);
    }
  }

 private:
  fs::path run_dir_;
};

std::string trimmed(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
  return s;
}

TEST(Deploy, LaunchLocalServesARequestAndStopLocalEndsTheJobWithExitZero) {
  test::TempDir dir;
  const fs::path model = dir.path() / "models" / "tiny.gguf";
  fs::create_directories(model.parent_path());
  model::write_random_llama(model.string(), model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 5);
  const std::string endpoint = "ipc://" + (dir.path() / "nibble.sock").string();
  const fs::path config = dir.path() / "cluster.yaml";
  // A block-style config like the examples; the model path is relative to the config's folder.
  std::ofstream(config) << "model:\n  path: models/tiny.gguf\n"
                        << "parallel:\n  tensor: 2\n  pipeline: 1\n"
                        << "threads: 1\n"
                        << "server:\n  listen: \"" << endpoint << "\"\n";
  const fs::path run_dir = dir.path() / "run";
  JobGuard guard(run_dir);

  const fs::path launch_err = dir.path() / "launch.err";
  const test::CommandResult launched =
      run_script("launch-local.sh --config " + quoted(config.string()) + " --run-dir " +
                     quoted(run_dir.string()) + " --timeout 90",
                 launch_err);
  ASSERT_EQ(launched.exit_code, 0) << launched.output << read_text(launch_err)
                                   << read_text(run_dir / "serve.log");
  EXPECT_EQ(launched.output, endpoint + "\n") << "stdout must be the endpoint alone";
  const std::string launch_log = read_text(launch_err);
  EXPECT_NE(launch_log.find("-np 3 "), std::string::npos) << "np = 1 + 2 x 1: " << launch_log;
  EXPECT_NE(launch_log.find("--allow-run-as-root"), std::string::npos) << launch_log;
  const std::string serve_log = read_text_once_it_has(run_dir / "serve.log", "worker rank 2:");
  EXPECT_NE(serve_log.find("listening on " + endpoint), std::string::npos) << serve_log;
  EXPECT_NE(serve_log.find("worker rank 2: stage 0, tensor rank 1"), std::string::npos) << serve_log;

  // A second launch for the same run folder is refused while the first job runs.
  const test::CommandResult again = run_script(
      "launch-local.sh --config " + quoted(config.string()) + " --run-dir " + quoted(run_dir.string()),
      dir.path() / "again.err");
  EXPECT_NE(again.exit_code, 0);
  EXPECT_NE(read_text(dir.path() / "again.err").find("still running"), std::string::npos)
      << read_text(dir.path() / "again.err");

  // One request through the real client CLI: the same greedy tokens as a single process.
  const std::string bin = quoted(test::nibble_bin());
  const test::CommandResult expected =
      test::run_command("timeout 60 " + bin + " generate --model " + quoted(model.string()) +
                        " --prompt Hello --max-tokens 24 --temperature 0 --threads 1 --json");
  ASSERT_EQ(expected.exit_code, 0) << expected.output;
  const auto want = nlohmann::json::parse(expected.output.substr(expected.output.find('{')));
  const test::CommandResult answer =
      test::run_command("timeout 60 " + bin + " client --endpoint " + quoted(endpoint) +
                        " --prompt Hello --max-tokens 24 --temperature 0 --json --timeout-ms 30000");
  ASSERT_EQ(answer.exit_code, 0) << answer.output;
  const auto got = nlohmann::json::parse(answer.output);
  ASSERT_TRUE(got.contains("request_id") && got["request_id"].is_string()) << got;
  EXPECT_FALSE(got["request_id"].get<std::string>().empty());
  EXPECT_EQ(got["prompt_tokens"], want["prompt_tokens"]) << got;
  EXPECT_EQ(got["prompt_tokens"][0], 1) << "BOS first";
  ASSERT_TRUE(got["tokens"].is_array()) << got;
  EXPECT_EQ(got["tokens"].size(), 24u) << got;
  EXPECT_EQ(got["tokens"], want["tokens"]) << got;
  EXPECT_EQ(got["text"], want["text"]) << got;
  EXPECT_EQ(got["finish_reason"], "length") << got;
  for (const char* key : {"queue_ms", "prefill_ms", "decode_ms"}) {
    ASSERT_TRUE(got["timings"].contains(key)) << got;
    EXPECT_GE(got["timings"][key].get<double>(), 0.0) << key;
  }
  const test::CommandResult stats =
      test::run_command("timeout 30 " + bin + " client --endpoint " + quoted(endpoint) + " --stats --json");
  ASSERT_EQ(stats.exit_code, 0) << stats.output;
  const auto counters = nlohmann::json::parse(stats.output);
  EXPECT_EQ(counters["completed"], 1) << counters;
  EXPECT_EQ(counters["tokens_generated"], 24) << counters;

  // stop-local.sh: a clean shutdown, every rank gone, exit code 0 reported.
  const fs::path stop_err = dir.path() / "stop.err";
  const test::CommandResult stopped =
      run_script("stop-local.sh --endpoint " + quoted(endpoint) + " --run-dir " + quoted(run_dir.string()) +
                     " --timeout 60",
                 stop_err);
  EXPECT_EQ(stopped.exit_code, 0) << read_text(stop_err) << read_text(run_dir / "serve.log");
  EXPECT_NE(read_text(stop_err).find("exited cleanly (code 0)"), std::string::npos) << read_text(stop_err);
  EXPECT_EQ(trimmed(read_text(run_dir / "serve.exit")), "0");
  EXPECT_NE(read_text(run_dir / "serve.log").find("shut down cleanly"), std::string::npos)
      << read_text(run_dir / "serve.log");
  const int pid = std::stoi(read_text(run_dir / "serve.pid"));
  for (int i = 0; i < 50 && process_alive(pid); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(process_alive(pid));
  for (const std::string& line : {std::string("worker rank 1"), std::string("worker rank 2")}) {
    const std::regex pid_of(line + ": .* pid ([0-9]+)");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(serve_log, m, pid_of)) << serve_log;
    EXPECT_FALSE(process_alive(std::stoi(m[1]))) << line << " still runs";
  }
  const test::CommandResult gone = test::run_command("timeout 30 " + bin + " client --endpoint " +
                                                     quoted(endpoint) + " --health --timeout-ms 500");
  EXPECT_NE(gone.exit_code, 0) << gone.output;
}

TEST(Deploy, LaunchLocalReportsABadConfigAndLeavesNoJob) {
  test::TempDir dir;
  const fs::path config = dir.path() / "bad.yaml";
  std::ofstream(config) << "model: {path: missing.gguf}\ncontxet: 256\n"
                        << "server: {listen: \"ipc://" << (dir.path() / "nibble.sock").string() << "\"}\n";
  const fs::path run_dir = dir.path() / "run";
  JobGuard guard(run_dir);
  const fs::path err = dir.path() / "launch.err";
  const auto start = std::chrono::steady_clock::now();
  const test::CommandResult r = run_script("launch-local.sh --config " + quoted(config.string()) +
                                               " --run-dir " + quoted(run_dir.string()) + " --timeout 60",
                                           err);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.output, "") << "no endpoint on stdout";
  const std::string message = read_text(err);
  EXPECT_NE(message.find("unknown key 'contxet'"), std::string::npos) << message;
  EXPECT_NE(message.find("the job ended before it answered"), std::string::npos) << message;
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(50))
      << "failed fast, not by timeout";
  const std::string code = trimmed(read_text(run_dir / "serve.exit"));
  EXPECT_FALSE(code.empty() || code == "0") << "exit code '" << code << "'";

  // Usage errors are caught before mpirun.
  const test::CommandResult missing = run_script("launch-local.sh --config /nonexistent.yaml", err);
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(read_text(err).find("config file not found"), std::string::npos) << read_text(err);
  // stop-local.sh on the failed job reports its exit code; on an endpoint nothing serves, says so.
  const test::CommandResult stop_failed =
      run_script("stop-local.sh --endpoint " + quoted("ipc://" + (dir.path() / "nibble.sock").string()) +
                     " --run-dir " + quoted(run_dir.string()),
                 err);
  EXPECT_NE(stop_failed.exit_code, 0);
  EXPECT_NE(read_text(err).find("had already ended with exit code " + code), std::string::npos)
      << read_text(err);
  const test::CommandResult no_stop =
      run_script("stop-local.sh --endpoint " + quoted("ipc://" + (dir.path() / "none.sock").string()) +
                     " --run-dir " + quoted((dir.path() / "no-run").string()),
                 err);
  EXPECT_NE(no_stop.exit_code, 0);
  EXPECT_NE(read_text(err).find("no nibble serve answers"), std::string::npos) << read_text(err);
}

TEST(Deploy, ScriptsAreValidBash) {
  for (const char* script :
       {"deploy/launch-local.sh", "deploy/stop-local.sh", "deploy/local-common.sh", "deploy/quickstart.sh",
        "deploy/build.sh", "deploy/install-deps.sh", "deploy/test.sh", "deploy/slurm/nibble-serve.sbatch",
        "tests/slurm/local-slurm.sh"}) {
    const test::CommandResult r = test::run_command("bash -n " + quoted((kRepoRoot / script).string()));
    EXPECT_EQ(r.exit_code, 0) << script << ": " << r.output;
  }
}

// The `#SBATCH --key=value` lines of the batch script.
std::map<std::string, std::string> sbatch_options(const std::string& text) {
  std::map<std::string, std::string> options;
  const std::regex line(R"(^#SBATCH --([a-z-]+)(?:=(\S+))?)");
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) {
    std::smatch m;
    if (std::regex_search(l, m, line)) options[m[1]] = m[2];
  }
  return options;
}

TEST(Deploy, SlurmHeaderMatchesTheConfigItNames) {
  const std::string script = read_text(kRepoRoot / "deploy/slurm/nibble-serve.sbatch");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(script, m, std::regex(R"re(config="\$\{1:-\$root/([^}]+)\}")re")))
      << "the script names its default config as config=\"${1:-$root/...}\"";
  const cluster::ClusterConfig config = cluster::load_cluster_config((kRepoRoot / m[1].str()).string());
  const auto options = sbatch_options(script);
  ASSERT_TRUE(options.count("ntasks") && options.count("nodes")) << script;
  EXPECT_EQ(std::stoi(options.at("ntasks")), config.world_size()) << m[1];
  EXPECT_EQ(std::stoi(options.at("nodes")), config.parallel.pipeline) << "one node per stage: " << m[1];
  EXPECT_EQ(config.device, cluster::Device::cpu) << "nibble serve refuses cuda for now";
  EXPECT_FALSE(config.draft.has_value()) << "nibble serve refuses draft: for now";
  EXPECT_NE(config.server.listen.find("0.0.0.0"), std::string::npos) << "remote clients must reach it";
}

// Runs the batch script outside Slurm with stand-ins: scontrol lists `nodes`, srun records its
// arguments and the SLURM_HOSTFILE it was given.
struct FakeSlurmRun {
  test::CommandResult result;
  std::string stderr_text, srun_args;
  std::vector<std::string> placement;  // node of each world rank
};

FakeSlurmRun run_sbatch(const fs::path& dir, const std::vector<std::string>& nodes, int ntasks,
                        const std::string& config_arg) {
  const fs::path fake = dir / "fake-bin";
  fs::create_directories(fake);
  {
    std::ofstream scontrol(fake / "scontrol");
    scontrol << "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 3\n";
    for (const std::string& n : nodes) scontrol << "echo " << n << "\n";
  }
  std::ofstream(fake / "srun") << "#!/bin/sh\necho \"$@\" > \"$FAKE_OUT/srun.args\"\n"
                               << "cp \"$SLURM_HOSTFILE\" \"$FAKE_OUT/srun.hosts\"\n";
  fs::permissions(fake / "scontrol", fs::perms::owner_all);
  fs::permissions(fake / "srun", fs::perms::owner_all);
  fs::remove(dir / "srun.args");
  fs::remove(dir / "srun.hosts");
  FakeSlurmRun run;
  const fs::path err = dir / "sbatch.err";
  run.result = test::run_command(
      "(cd " + quoted(dir.string()) + " && env -u NIBBLE_ROOT PATH=" + quoted(fake.string()) +
      ":\"$PATH\" FAKE_OUT=" + quoted(dir.string()) +
      " SLURM_JOB_NODELIST=nodes SLURM_NTASKS=" + std::to_string(ntasks) +
      " SLURM_SUBMIT_DIR=" + quoted(kRepoRoot.string()) + " NIBBLE_BIN=" + quoted(test::nibble_bin()) +
      " timeout 60 bash " + quoted((kRepoRoot / "deploy/slurm/nibble-serve.sbatch").string()) + " " +
      config_arg + " 2>" + quoted(err.string()) + ")");
  run.stderr_text = read_text(err);
  run.srun_args = trimmed(read_text(dir / "srun.args"));
  std::istringstream hosts(read_text(dir / "srun.hosts"));
  for (std::string h; std::getline(hosts, h);) run.placement.push_back(h);
  return run;
}

// Where the rank layout wants world rank r: the coordinator with stage 0, stage s on node s mod n.
std::vector<std::string> expected_placement(const std::vector<std::string>& nodes, int tensor, int pipeline) {
  std::vector<std::string> placement{nodes[0]};
  for (int r = 1; r <= tensor * pipeline; ++r) {
    placement.push_back(nodes[static_cast<size_t>((r - 1) / tensor) % nodes.size()]);
  }
  return placement;
}

TEST(Deploy, SlurmScriptKeepsEachStageOnOneNode) {
  test::TempDir dir;
  const std::vector<std::string> two{"node-a", "node-b"};
  {  // The default config: T=2, P=2.
    const FakeSlurmRun run = run_sbatch(dir.path(), two, 5, "");
    ASSERT_EQ(run.result.exit_code, 0) << run.stderr_text;
    EXPECT_EQ(run.placement, expected_placement(two, 2, 2));
    EXPECT_EQ(run.srun_args,
              "--mpi=pmix --distribution=arbitrary --ntasks=5 --kill-on-bad-exit=1 "
              "--cpu-bind=none " +
                  test::nibble_bin() + " serve --config " + (kRepoRoot / "config/tp2-pp2-cpu.yaml").string());
    EXPECT_NE(run.stderr_text.find("clients connect to tcp://node-a:5555"), std::string::npos)
        << run.stderr_text;
  }
  {  // T=3, P=3 on two nodes: stage 2 shares the first node, no stage is split.
    std::ofstream(dir.path() / "t3p3.yaml") << "model: {path: m.gguf}\nparallel: {tensor: 3, pipeline: 3}\n";
    const FakeSlurmRun run = run_sbatch(dir.path(), two, 10, quoted((dir.path() / "t3p3.yaml").string()));
    ASSERT_EQ(run.result.exit_code, 0) << run.stderr_text;
    EXPECT_EQ(run.placement, expected_placement(two, 3, 3));
    EXPECT_NE(run.stderr_text.find("3 stages on 2 nodes"), std::string::npos) << run.stderr_text;
  }
  {  // A task count that does not match the config: refused before srun.
    const FakeSlurmRun run = run_sbatch(dir.path(), two, 4, "");
    EXPECT_NE(run.result.exit_code, 0);
    EXPECT_NE(run.stderr_text.find("needs 1 + 2 x 2 = 5 tasks but the job has 4"), std::string::npos)
        << run.stderr_text;
    EXPECT_TRUE(run.srun_args.empty()) << "srun ran: " << run.srun_args;
  }
}

// A real single-node Slurm cluster (munged, slurmctld, slurmd) from tests/slurm/local-slurm.sh,
// stopped when the test ends whatever happens. `skip_reason` is set when Slurm is not installed.
class LocalSlurm {
 public:
  explicit LocalSlurm(fs::path dir) : dir_(std::move(dir)) {
    // Ports of this process's own, so that a stale cluster from another run cannot answer.
    const int port_base = 20000 + 2 * (getpid() % 10000);
    const test::CommandResult r =
        test::run_command("timeout 60 bash " + quoted(script()) + " start " + quoted(dir_.string()) + " " +
                          std::to_string(port_base) + " 2>&1");
    if (r.exit_code == 77) {
      skip_reason = trimmed(r.output);
    } else if (r.exit_code != 0) {
      error = r.output;
    } else {
      conf = (dir_ / "slurm.conf").string();
    }
  }
  ~LocalSlurm() {
    test::run_command("timeout 60 bash " + quoted(script()) + " stop " + quoted(dir_.string()));
  }

  // A Slurm client command against this cluster, with nibble's binary in its environment (sbatch
  // passes the environment on to the job).
  test::CommandResult run(const std::string& command) const {
    return test::run_command("cd " + quoted(kRepoRoot.string()) + " && SLURM_CONF=" + quoted(conf) +
                             " NIBBLE_BIN=" + quoted(test::nibble_bin()) + " timeout 60 " + command +
                             " 2>&1");
  }
  // The value of `field` in `scontrol show job ID` (e.g. JobState, ExitCode).
  std::string job_field(const std::string& job, const std::string& field) const {
    const std::string text = run("scontrol show job " + job).output;
    std::smatch m;
    if (!std::regex_search(text, m, std::regex("\\b" + field + "=(\\S+)"))) return "";
    return m[1];
  }
  // Waits up to `seconds` for the job to leave PENDING/RUNNING; returns its final state.
  std::string wait_for_end(const std::string& job, int seconds) const {
    std::string state;
    for (int i = 0; i < seconds * 5; ++i) {
      state = job_field(job, "JobState");
      if (state != "PENDING" && state != "RUNNING" && state != "COMPLETING" && !state.empty()) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
    return state;
  }

  std::string conf, skip_reason, error;

 private:
  static std::string script() { return (kRepoRoot / "tests/slurm/local-slurm.sh").string(); }
  fs::path dir_;
};

// Submits the batch script for `config` on the one node; returns the job id.
std::string submit_serve_job(const LocalSlurm& slurm, const fs::path& config, const fs::path& log) {
  const test::CommandResult r = slurm.run("sbatch --parsable --nodes=1 --output=" + quoted(log.string()) +
                                          " deploy/slurm/nibble-serve.sbatch " + quoted(config.string()));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return trimmed(r.output);
}

// Polls the service's health until it answers (true) or the job stops running or time runs out.
bool wait_until_serving(const LocalSlurm& slurm, const std::string& job, const std::string& endpoint) {
  for (int i = 0; i < 120; ++i) {
    const test::CommandResult health =
        test::run_command("timeout 10 " + quoted(test::nibble_bin()) + " client --endpoint " +
                          quoted(endpoint) + " --health --timeout-ms 500 2>&1");
    if (health.exit_code == 0) return true;
    const std::string state = slurm.job_field(job, "JobState");
    if (state != "PENDING" && state != "RUNNING") return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  return false;
}

// The batch script under a real Slurm: `srun --mpi=pmix` starts the 5 ranks (PMIx wires up Open
// MPI), the service answers like a single process, a shutdown request ends the job COMPLETED with
// exit code 0, and scancel ends a second job with every rank gone.
TEST(Deploy, SlurmBatchJobServesUnderSrunPmixAndEndsCleanly) {
  test::TempDir dir;
  const LocalSlurm slurm(dir.path() / "slurm");
  if (!slurm.skip_reason.empty()) GTEST_SKIP() << slurm.skip_reason;
  ASSERT_TRUE(slurm.error.empty()) << slurm.error;

  const fs::path model = dir.path() / "tiny.gguf";
  model::write_random_llama(model.string(), model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 9);
  const std::string endpoint = "ipc://" + (dir.path() / "nibble.sock").string();
  const fs::path config = dir.path() / "cluster.yaml";
  std::ofstream(config) << "model: { path: tiny.gguf }\nparallel: { tensor: 2, pipeline: 2 }\nthreads: 1\n"
                        << "server: { listen: \"" << endpoint << "\" }\n";

  const fs::path log = dir.path() / "job.log";
  const std::string job = submit_serve_job(slurm, config, log);
  ASSERT_FALSE(job.empty());
  ASSERT_TRUE(wait_until_serving(slurm, job, endpoint))
      << "job " << job << " state " << slurm.job_field(job, "JobState") << "\n"
      << read_text(log);
  // The ranks are one job step of 5 tasks started by srun; they found each other through PMIx
  // (without it each would be a world of its own and the service could not start).
  const test::CommandResult step = slurm.run("scontrol show step " + job + ".0");
  EXPECT_NE(step.output.find("State=RUNNING"), std::string::npos) << step.output;
  EXPECT_NE(step.output.find("Tasks=5 Name=nibble"), std::string::npos) << step.output;
  EXPECT_NE(read_text(log).find("5 ranks (2 tensor x 2 pipeline + coordinator)"), std::string::npos)
      << read_text(log);

  const std::string bin = quoted(test::nibble_bin());
  const test::CommandResult expected =
      test::run_command("timeout 60 " + bin + " generate --model " + quoted(model.string()) +
                        " --prompt 'Under Slurm' --max-tokens 16 --temperature 0 --threads 1 --json");
  ASSERT_EQ(expected.exit_code, 0) << expected.output;
  const auto want = nlohmann::json::parse(expected.output.substr(expected.output.find('{')));
  const test::CommandResult answer =
      test::run_command("timeout 60 " + bin + " client --endpoint " + quoted(endpoint) +
                        " --prompt 'Under Slurm' --max-tokens 16 --temperature 0 --json --timeout-ms 30000");
  ASSERT_EQ(answer.exit_code, 0) << answer.output;
  const auto got = nlohmann::json::parse(answer.output);
  EXPECT_EQ(got["tokens"].size(), 16u) << got;
  EXPECT_EQ(got["tokens"], want["tokens"]) << got;
  EXPECT_EQ(got["text"], want["text"]) << got;

  // A shutdown request: every rank exits 0, so the job ends COMPLETED with exit code 0.
  const test::CommandResult stop =
      test::run_command("timeout 30 " + bin + " client --endpoint " + quoted(endpoint) + " --shutdown");
  EXPECT_EQ(stop.exit_code, 0) << stop.output;
  EXPECT_EQ(slurm.wait_for_end(job, 60), "COMPLETED") << read_text(log);
  EXPECT_EQ(slurm.job_field(job, "ExitCode"), "0:0") << read_text(log);
  EXPECT_NE(read_text(log).find("shut down cleanly"), std::string::npos) << read_text(log);

  // scancel: the job ends CANCELLED and no rank outlives it.
  const fs::path log2 = dir.path() / "job2.log";
  const std::string job2 = submit_serve_job(slurm, config, log2);
  ASSERT_TRUE(wait_until_serving(slurm, job2, endpoint)) << read_text(log2);
  const std::string log2_text = read_text_once_it_has(log2, "worker rank 4:");  // the last of 4
  std::vector<int> worker_pids;
  const std::regex pid_of("worker rank [0-9]+: .* pid ([0-9]+)");
  for (std::sregex_iterator it(log2_text.begin(), log2_text.end(), pid_of), end; it != end; ++it)
    worker_pids.push_back(std::stoi((*it)[1]));
  EXPECT_EQ(worker_pids.size(), 4u) << log2_text;
  EXPECT_EQ(slurm.run("scancel " + job2).exit_code, 0);
  EXPECT_EQ(slurm.wait_for_end(job2, 60), "CANCELLED") << read_text(log2);
  for (int pid : worker_pids) {
    for (int i = 0; i < 100 && process_alive(pid); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    EXPECT_FALSE(process_alive(pid)) << "worker pid " << pid << " outlived scancel";
  }
}

TEST(Deploy, EveryExampleConfigParsesAndShowsItsRankCount) {
  std::set<std::string> seen;
  for (const fs::directory_entry& entry : fs::directory_iterator(kRepoRoot / "config")) {
    if (entry.path().extension() != ".yaml") continue;
    const std::string name = entry.path().filename().string();
    SCOPED_TRACE(name);
    seen.insert(name);
    cluster::ClusterConfig config;
    ASSERT_NO_THROW(config = cluster::load_cluster_config(entry.path().string()));
    // The usage comment at the top shows the -np to use: it must be 1 + tensor * pipeline.
    const std::string text = read_text(entry.path());
    const std::regex np(R"(-np ([0-9]+))");
    int shown = 0;
    for (auto it = std::sregex_iterator(text.begin(), text.end(), np); it != std::sregex_iterator(); ++it) {
      EXPECT_EQ(std::stoi((*it)[1]), config.world_size());
      ++shown;
    }
    EXPECT_GT(shown, 0) << "no `mpirun -np N` usage line";
  }
  EXPECT_TRUE(seen.count("local-tp2.yaml")) << "the quickstart's config";
  // The quickstart's config is one that `nibble serve` accepts today, on this host.
  const cluster::ClusterConfig quickstart =
      cluster::load_cluster_config((kRepoRoot / "config/local-tp2.yaml").string());
  EXPECT_EQ(quickstart.device, cluster::Device::cpu);
  EXPECT_FALSE(quickstart.draft.has_value());
  EXPECT_EQ(quickstart.world_size(), 3);
  EXPECT_EQ(quickstart.model.path, (kRepoRoot / "build/models/tiny-q4_0.gguf").lexically_normal().string());
}

}  // namespace
}  // namespace nibble
