// `nibble bench-gpu`: the CUDA W4A16 kernel on Llama-70B's matrix shapes against fp16 cuBLAS in the
// same run, as achieved bandwidth and as a fraction of the device's measured copy bandwidth; with
// --tinygemm, also against PyTorch's int4 kernel timed by tools/bench_tinygemm.py on the same shapes.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <tuple>

#include "cluster/cli/commands.hpp"
#ifdef NIBBLE_WITH_CUDA
#include "kernels/cuda/matmul_bench.cuh"
#endif

namespace nibble::cli {

namespace {

struct Args {
  std::string rows = "1,4,16,32,64,256";
  std::string shapes = "8192x8192,8192x1024,8192x28672,28672x8192";
  std::string tinygemm;
  int iterations = 20, repetitions = 5;
  bool json = false;
};

#ifdef NIBBLE_WITH_CUDA
std::vector<int64_t> parse_list(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) out.push_back(std::stoll(item));
  return out;
}

// "KxN" items: input features x output features.
std::vector<kernels::cuda::MatmulShape> parse_shapes(const std::string& text) {
  std::vector<kernels::cuda::MatmulShape> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    const size_t x = item.find('x');
    if (x == std::string::npos) throw std::invalid_argument("--shapes item '" + item + "' is not KxN");
    out.push_back({std::stoll(item.substr(0, x)), std::stoll(item.substr(x + 1))});
  }
  return out;
}

// (k, n_out, m) -> microseconds, from tools/bench_tinygemm.py's JSON.
std::map<std::tuple<int64_t, int64_t, int64_t>, double> read_tinygemm(const std::string& path) {
  std::map<std::tuple<int64_t, int64_t, int64_t>, double> out;
  if (path.empty()) return out;
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  const auto j = nlohmann::json::parse(in);
  for (const auto& r : j.at("rows")) out[{r.at("k"), r.at("n_out"), r.at("m")}] = r.at("us").get<double>();
  return out;
}

int run(const Args& a) {
  kernels::cuda::MatmulBenchResult result;
  std::string error;
  const kernels::Status st = kernels::cuda::run_matmul_bench(parse_shapes(a.shapes), parse_list(a.rows),
                                                             a.iterations, a.repetitions, result, error);
  if (st != kernels::Status::ok)
    throw std::runtime_error(std::string("GPU benchmark failed: ") + kernels::status_name(st) + " " + error);
  const auto tinygemm = read_tinygemm(a.tinygemm);
  nlohmann::json rows = nlohmann::json::array();
  if (!a.json) {
    std::printf("device: %s\ncopy bandwidth (read + write): %.0f GB/s\n\n", result.device.c_str(),
                result.copy_gbps);
    std::printf("%-12s %4s | %10s %8s %6s | %10s %8s | %8s | %11s %8s\n", "k x n_out", "m", "W4A16 us",
                "GB/s", "%copy", "cuBLAS us", "GB/s", "vs fp16", "tinygemm us", "vs tg");
  }
  for (const auto& r : result.rows) {
    const double ours_gbps = r.ours_bytes / (r.ours_us * 1e-6) / 1e9;
    const double cublas_gbps = r.cublas_bytes / (r.cublas_us * 1e-6) / 1e9;
    const auto tg = tinygemm.find({r.shape.k, r.shape.n_out, r.m});
    const double tg_us = tg == tinygemm.end() ? 0.0 : tg->second;
    nlohmann::json row{{"k", r.shape.k},
                       {"n_out", r.shape.n_out},
                       {"m", r.m},
                       {"w4a16_us", r.ours_us},
                       {"w4a16_kernel", r.ours_kernel},
                       {"w4a16_gbps", ours_gbps},
                       {"copy_fraction", ours_gbps / result.copy_gbps},
                       {"cublas_fp16_us", r.cublas_us},
                       {"cublas_gbps", cublas_gbps},
                       {"speedup_vs_cublas", r.cublas_us / r.ours_us}};
    if (tg_us > 0) {
      row["tinygemm_us"] = tg_us;
      row["speedup_vs_tinygemm"] = tg_us / r.ours_us;
    }
    rows.push_back(row);
    if (!a.json) {
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", static_cast<long long>(r.shape.k),
                    static_cast<long long>(r.shape.n_out));
      std::printf("%-12s %4lld | %10.1f %8.0f %5.0f%% | %10.1f %8.0f | %7.2fx |", shape,
                  static_cast<long long>(r.m), r.ours_us, ours_gbps, 100.0 * ours_gbps / result.copy_gbps,
                  r.cublas_us, cublas_gbps, r.cublas_us / r.ours_us);
      if (tg_us > 0)
        std::printf(" %11.1f %7.2fx\n", tg_us, tg_us / r.ours_us);
      else
        std::printf(" %11s %8s\n", "-", "-");
    }
  }
  if (a.json) {
    std::cout
        << nlohmann::json{{"device", result.device}, {"copy_gbps", result.copy_gbps}, {"rows", rows}}.dump()
        << "\n";
  } else {
    std::printf(
        "\nW4A16 = GGUF Q4_0 weights x fp16 activations, fp32 accumulation (m > 32: one 32-row call per "
        "32 rows). GB/s counts the bytes each product must move.\n");
  }
  return 0;
}
#else
int run(const Args&) {
  throw std::runtime_error(
      "this nibble was built without CUDA (configure with -DNIBBLE_CUDA=ON where nvcc exists)");
}
#endif

}  // namespace

Runner add_bench_gpu(CLI::App& app) {
  auto a = std::make_shared<Args>();
  app.add_option("--rows", a->rows, "Activation row counts, comma-separated");
  app.add_option("--shapes", a->shapes, "Matrix shapes KxN (input x output features), comma-separated");
  app.add_option("--iterations", a->iterations, "Products per timed loop")->check(CLI::PositiveNumber);
  app.add_option("--repetitions", a->repetitions, "Timed loops (the median is reported)")
      ->check(CLI::PositiveNumber);
  app.add_option("--tinygemm", a->tinygemm, "JSON from tools/bench_tinygemm.py (same shapes, same machine)");
  app.add_flag("--json", a->json, "Print one JSON object");
  return [a]() { return run(*a); };
}

}  // namespace nibble::cli
