// `mpirun -np 1+T*P nibble serve --config cluster.yaml`: start-up of the distributed service.
// MPI is used here only: to agree on the layout, build the tensor/pipeline groups, exchange the
// ZeroMQ endpoints, size the KV cache from the smallest worker, and fail together. Every start-up
// phase ends with an all-reduce of "did it work here", so one rank's bad file or busy port stops
// every rank with an error instead of leaving the others waiting in a collective.
#include <mpi.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>
#include <zmq.hpp>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/model_session.hpp"
#include "cluster/config/cluster_config.hpp"
#include "cluster/coordinator.hpp"
#include "cluster/draft_service.hpp"
#include "cluster/openai_server.hpp"
#include "cluster/remote_draft.hpp"
#include "cluster/worker_service.hpp"
#include "cluster/worker_stage.hpp"
#include "model/hf_checkpoint.hpp"
#include "model/hf_tokenizer.hpp"
#include "parallel/communicator_reducer.hpp"
#include "parallel/mpi_communicator.hpp"
#include "parallel/rank_layout.hpp"
#include "speculative/local_draft.hpp"
#include "speculative/ngram_draft.hpp"
#include "speculative/speculator.hpp"
#include "speculative/vocab_match.hpp"
#include "worker/cuda_llama_model.hpp"
#include "worker/json_constraint.hpp"
#include "worker/tensor_shard.hpp"
#if NIBBLE_WITH_CUDA
#include "parallel/nccl_communicator.hpp"
#include "parallel/nccl_reducer.hpp"
#endif

namespace nibble::cli {
namespace {

constexpr size_t kNameBytes = 256;  // fixed-size slots for hostnames and endpoints in MPI gathers
using Slot = std::array<char, kNameBytes>;

Slot to_slot(const std::string& s) {
  Slot slot{};
  std::strncpy(slot.data(), s.c_str(), kNameBytes - 1);
  return slot;
}

std::string this_host() {
  char name[kNameBytes] = {};
  gethostname(name, sizeof(name) - 1);
  return name;
}

// True on every rank when `ok` holds on every rank.
// The in-process HTTP API's settings (`openai:`): it talks to this coordinator at server.listen (a
// wildcard host reached over loopback); the model's name defaults to its file's, less .gguf.
cluster::OpenAiServerOptions openai_options(const cluster::ClusterConfig& config,
                                            const std::shared_ptr<const model::Tokenizer>& tokenizer) {
  cluster::OpenAiServerOptions o;
  o.coordinator = config.server.listen;
  for (const char* wildcard : {"tcp://*:", "tcp://0.0.0.0:"}) {
    if (o.coordinator.rfind(wildcard, 0) == 0)
      o.coordinator = "tcp://127.0.0.1:" + o.coordinator.substr(std::string(wildcard).size());
  }
  o.host = config.openai->host;
  o.port = config.openai->port;
  o.threads = config.openai->threads;
  if (!config.openai->api_key_env.empty()) {
    const char* key = std::getenv(config.openai->api_key_env.c_str());
    if (key == nullptr || *key == '\0')
      throw std::runtime_error("openai.api_key_env: the environment variable " + config.openai->api_key_env +
                               " is not set (it holds the API key)");
    o.api_key = key;
  }
  o.api.default_chat_max_tokens = static_cast<uint32_t>(config.openai->chat_max_tokens);
  o.api.model_name = config.openai->model_name;
  if (o.api.model_name.empty()) {
    std::filesystem::path path(config.model.path);
    if (path.filename().empty()) path = path.parent_path();  // a directory given with a trailing slash
    o.api.model_name = path.extension() == ".gguf" ? path.stem().string() : path.filename().string();
  }
  if (tokenizer) {
    o.api.token_text = cli::logprob_token_text(tokenizer);
    o.api.tokenizer = tokenizer;
  }
  return o;
}

bool all_ok(bool ok) {
  int flag = ok ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &flag, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return flag == 1;
}

// Runs one start-up phase on this rank; prints its error (prefixed with the rank) and returns
// false on every rank if it failed on any.
template <class Phase>
bool phase(int world_rank, bool print_error, Phase&& run) {
  bool ok = true;
  try {
    run();
  } catch (const std::exception& e) {
    ok = false;
    if (print_error) std::fprintf(stderr, "nibble serve: rank %d: error: %s\n", world_rank, e.what());
  }
  return all_ok(ok);
}

// Binds to an ephemeral TCP port; returns the address peers connect to. Loopback when every peer
// runs on this host, otherwise all interfaces, advertised under the host name.
std::string bind_ephemeral(zmq::socket_t& socket, bool single_host) {
  socket.bind(single_host ? "tcp://127.0.0.1:*" : "tcp://*:*");
  std::string endpoint = socket.get(zmq::sockopt::last_endpoint);
  if (!single_host) {
    const std::string port = endpoint.substr(endpoint.rfind(':'));
    endpoint = "tcp://" + this_host() + port;
  }
  return endpoint;
}

// KV blocks this worker can hold: the configured count, or memory_fraction of `available` bytes
// (host memory, or the GPU's free memory once every worker's weights are loaded) shared among the
// `sharers` workers that draw on it, each block costing `per_block` bytes (its cache's, a draft's that
// holds as many blocks included), but never more than max_running full contexts.
int64_t blocks_for_this_worker(const cluster::ClusterConfig& config, int64_t per_block, double available,
                               int sharers) {
  if (config.kv_cache.num_blocks > 0) return config.kv_cache.num_blocks;
  const auto by_memory = static_cast<int64_t>(available * config.kv_cache.memory_fraction /
                                              std::max(1, sharers) / static_cast<double>(per_block));
  const int64_t blocks_per_context =
      (config.context + config.kv_cache.block_size - 1) / config.kv_cache.block_size;
  return std::max<int64_t>(1, std::min(by_memory, blocks_per_context * config.scheduler.max_running));
}

double host_available_bytes() {
  struct sysinfo info {};
  sysinfo(&info);
  return static_cast<double>(info.freeram + info.bufferram) * info.mem_unit;
}

worker::Int4Kernels worker_int4_kernels(cluster::Int4KernelChoice choice) {
  switch (choice) {
    case cluster::Int4KernelChoice::cuda_cores:
      return worker::Int4Kernels::cuda_cores;
    case cluster::Int4KernelChoice::tensor_cores:
      return worker::Int4Kernels::tensor_cores;
    case cluster::Int4KernelChoice::half2:
      return worker::Int4Kernels::half2;
    case cluster::Int4KernelChoice::measured:
      break;
  }
  return worker::Int4Kernels::measured;
}

worker::Int4Layout worker_int4_layout(cluster::Int4LayoutChoice choice) {
  switch (choice) {
    case cluster::Int4LayoutChoice::rows:
      return worker::Int4Layout::rows;
    case cluster::Int4LayoutChoice::tiles:
      return worker::Int4Layout::tiles;
    case cluster::Int4LayoutChoice::cutlass:
      return worker::Int4Layout::cutlass;
    case cluster::Int4LayoutChoice::measured:
      return worker::Int4Layout::measured;
  }
  return worker::Int4Layout::rows;
}

// The GPU models' options from a job's keys (the target's shard and the draft next to the sampler alike).
// graphs: not with a host reducer (see CudaModelOptions), which the model itself sees to.
worker::CudaModelOptions gpu_model_options(const cluster::ClusterConfig& config, int device) {
  worker::CudaModelOptions options;
  options.device = device;
  options.int4_kernels = worker_int4_kernels(config.int4_kernels);
  options.int4_layout = worker_int4_layout(config.int4_layout);
  options.cutlass_gemm = config.cutlass_gemm;
  options.int8_activations = config.int8_activations;
  options.graphs = config.cuda_graphs;
  options.mma_prefill_attention = config.tensor_core_prefill_attention;
  options.decode_split_tokens = config.decode_split_tokens;
  options.kv_cache_rotation = config.kv_cache.rotation;
  return options;
}

extern "C" void on_terminate(int) { cluster::Coordinator::request_abort(); }

int serve(const std::string& config_path) {
  int provided = 0;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  int world_rank = 0, world_size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  const bool coordinator = world_rank == parallel::RankLayout::kCoordinatorRank;
  auto fail = [] {
    MPI_Finalize();
    return 1;
  };

  // 1. Configuration and layout: every rank reads the same file; rank 0 alone reports.
  cluster::ClusterConfig config;
  std::optional<parallel::RankLayout> layout;
  if (!phase(world_rank, coordinator, [&] {
        config = cluster::load_cluster_config(config_path);
        if (world_size != config.world_size()) {
          throw std::runtime_error(
              "the config asks for 1 coordinator + " + std::to_string(config.parallel.tensor) + " x " +
              std::to_string(config.parallel.pipeline) + " workers" +
              (config.draft_has_own_rank() ? " + 1 draft rank" : "") + " = " +
              std::to_string(config.world_size()) + " ranks, but mpirun started " +
              std::to_string(world_size) + " (use mpirun -np " + std::to_string(config.world_size()) + ")");
        }
        layout.emplace(world_size, config.parallel.tensor, config.parallel.pipeline,
                       config.draft_has_own_rank());
      })) {
    return fail();
  }

  // Host names: who shares a host with whom (loopback endpoints, threads per worker).
  std::vector<Slot> hosts(static_cast<size_t>(world_size));
  const Slot my_host = to_slot(this_host());
  MPI_Allgather(my_host.data(), kNameBytes, MPI_CHAR, hosts.data(), kNameBytes, MPI_CHAR, MPI_COMM_WORLD);
  const bool single_host = std::all_of(
      hosts.begin(), hosts.end(), [&](const Slot& h) { return std::strcmp(h.data(), hosts[0].data()) == 0; });
  int workers_on_host = 0;
  for (int r = 1; r < world_size; ++r) workers_on_host += std::strcmp(hosts[r].data(), my_host.data()) == 0;

  // 2. Groups and models. The coordinator needs only the tokenizer and hyperparameters; each worker
  // loads its tensor shard of its stage's layers.
  parallel::ParallelGroups groups = parallel::make_groups(MPI_COMM_WORLD, *layout);
  const parallel::RankInfo me = parallel::describe_this_rank(MPI_COMM_WORLD, *layout);

  // With device: cuda every worker (not the coordinator, not the draft rank: a draft of its own stays
  // on the CPU) takes GPU local_rank % devices on its host, and refuses to start without one. A draft
  // co-located with the sampling worker runs on that worker's GPU.
  const bool cuda = config.device == cluster::Device::cuda;
  const bool gpu_rank = cuda && me.role == parallel::Role::worker;
  int device = -1;
  if (!phase(world_rank, true, [&] {
        if (!gpu_rank) return;
        const std::string why = worker::cuda_unavailable_reason();
        if (!why.empty()) throw std::runtime_error("device: cuda: " + why);
        device = me.local_rank % worker::cuda_device_count();
      })) {
    return fail();
  }
  std::vector<int> devices(static_cast<size_t>(world_size));
  MPI_Allgather(&device, 1, MPI_INT, devices.data(), 1, MPI_INT, MPI_COMM_WORLD);
  // Workers on one host with one device id share that GPU.
  auto same_gpu = [&](int a, int b) {
    return devices[static_cast<size_t>(a)] >= 0 &&
           devices[static_cast<size_t>(a)] == devices[static_cast<size_t>(b)] &&
           std::strcmp(hosts[static_cast<size_t>(a)].data(), hosts[static_cast<size_t>(b)].data()) == 0;
  };
  int gpu_sharers = 0;  // workers on this rank's GPU, itself included
  for (int r = 1; r < world_size; ++r) gpu_sharers += gpu_rank && same_gpu(r, world_rank);
  // The tensor group reduces over NCCL when each of its ranks has a GPU of its own; ranks that share
  // a GPU reduce through host memory over MPI (NCCL needs one rank per device). Stage-to-stage
  // hidden states always go through the host over MPI. Every rank of a group sees the same devices,
  // so the group agrees.
  bool nccl = gpu_rank && config.parallel.tensor > 1;
  for (size_t i = 0; nccl && i < me.tensor_group.size(); ++i)
    for (size_t j = i + 1; j < me.tensor_group.size(); ++j)
      nccl = nccl && !same_gpu(me.tensor_group[i], me.tensor_group[j]);
  if (gpu_rank && me.tp_rank == 0 && config.parallel.tensor > 1) {
    std::fprintf(stderr, "nibble serve: stage %d: %d tensor ranks on %s: reductions %s\n", me.stage,
                 config.parallel.tensor, nccl ? "a GPU each" : "shared GPUs",
                 nccl ? "over NCCL on the GPUs"
                      : "through host memory over MPI (each one copied device -> host -> device)");
    std::fflush(stderr);
  }
  if (gpu_rank && me.tp_rank == 0) {
    // CudaModelOptions::graphs: a host reducer synchronizes at every reduction, which no graph holds.
    const char* launches = !config.cuda_graphs ? "every kernel launched directly (cuda_graphs: false)"
                           : config.parallel.tensor > 1 && !nccl
                               ? "every kernel launched directly (host reductions cannot be captured)"
                               : "decode steps replayed from CUDA graphs";
    std::fprintf(stderr, "nibble serve: stage %d: %s\n", me.stage, launches);
    std::fflush(stderr);
  }
#if NIBBLE_WITH_CUDA
  std::unique_ptr<parallel::NcclCommunicator> nccl_group;
  if (!phase(world_rank, true, [&] {
        if (nccl) nccl_group = parallel::NcclCommunicator::create(*groups.tensor, device);
      })) {
    return fail();
  }
#endif
  std::shared_ptr<const model::LlamaCheckpoint> file;  // a GGUF file or a Hugging Face directory
  std::shared_ptr<const model::Tokenizer> tokenizer;
  std::unique_ptr<worker::ShardReducer> reducer;
  std::unique_ptr<worker::LlamaModel> model;          // device: cpu
  std::unique_ptr<worker::CudaLlamaModel> gpu_model;  // device: cuda
  std::unique_ptr<kernels::ThreadPool> pool;
  std::unique_ptr<worker::LlamaModel> draft;
  std::unique_ptr<worker::CudaLlamaModel> gpu_draft;  // device: cuda, the draft next to the sampling worker
  const bool draft_rank = me.role == parallel::Role::draft;
  const bool sampling_rank = me.role == parallel::Role::worker && me.is_last_stage && me.tp_rank == 0;
  const int sampling_world_rank = layout->world_rank_of(config.parallel.pipeline - 1, 0);
  int64_t num_blocks = std::numeric_limits<int64_t>::max();
  int threads = 0;
  if (!phase(world_rank, true, [&] {
        if (draft_rank) {  // the draft alone, at tensor-parallel size 1
          threads = config.worker_threads(default_threads(), workers_on_host);
          pool = std::make_unique<kernels::ThreadPool>(threads);
          draft = worker::LlamaModel::load(config.draft->path);
          return;
        }
        file = model::LlamaCheckpoint::open(config.model.path);
        if (coordinator) {
          tokenizer = open_tokenizer(*file);
          if (tokenizer == nullptr) {
            throw std::runtime_error(
                config.model.path +
                " has no tokenizer.json: serving needs the tokenizer (to read prompts and "
                "write text)");
          }
          if (config.has_draft_model()) {  // refuse a draft that would speak another vocabulary
            const auto draft_tokenizer = open_tokenizer(*model::LlamaCheckpoint::open(config.draft->path));
            if (draft_tokenizer == nullptr)
              throw std::runtime_error(config.draft->path +
                                       " has no tokenizer.json to check against the target's");
            speculative::check_vocab_match(*tokenizer, *draft_tokenizer, config.draft->path);
          }
          return;
        }
        const model::LlamaConfig& whole = file->config();
        const worker::ShardRange layers = worker::split_layers(static_cast<size_t>(whole.n_layer),
                                                               static_cast<size_t>(config.parallel.pipeline),
                                                               static_cast<size_t>(me.stage));
        if (config.parallel.tensor > 1) {
#if NIBBLE_WITH_CUDA
          if (nccl) reducer = std::make_unique<parallel::NcclReducer>(*nccl_group);
#endif
          if (reducer == nullptr) reducer = std::make_unique<parallel::CommunicatorReducer>(*groups.tensor);
        }
        const worker::TensorShard shard{me.tp_rank, config.parallel.tensor};
        const worker::LayerRange range{static_cast<int64_t>(layers.begin),
                                       static_cast<int64_t>(layers.end())};
        if (gpu_rank) {
          gpu_model = std::make_unique<worker::CudaLlamaModel>(file, gpu_model_options(config, device), shard,
                                                               reducer.get(), range);
          gpu_model->set_kv_cache_types(cli::kv_cache_types(config.kv_cache));
          for (size_t i = 0; i < config.lora_adapters.size(); ++i) {  // slot i + 1, as add_lora's below
            const cluster::LoraAdapterConfig& adapter = config.lora_adapters[i];
            gpu_model->set_lora(static_cast<int32_t>(i + 1), model::LoraAdapter::read(adapter.path, whole),
                                static_cast<float>(adapter.scale));
          }
        } else {
          model = std::make_unique<worker::LlamaModel>(file, shard, reducer.get(), range);
          // Every shard and stage adds the adapters in the config's order: request adapter i is the
          // i-th everywhere.
          for (const cluster::LoraAdapterConfig& adapter : config.lora_adapters)
            model->add_lora(model::LoraAdapter::read(adapter.path, whole), static_cast<float>(adapter.scale));
          model->set_kv_cache_types(cli::kv_cache_types(config.kv_cache));
          model->set_kv_cache_rotation(config.kv_cache.rotation);
          num_blocks = blocks_for_this_worker(
              config,
              worker::KvCache::bytes_per_block(model->shard_config(), config.kv_cache.block_size,
                                               model->kv_cache_types()),
              host_available_bytes(), workers_on_host);
        }
        threads = config.worker_threads(default_threads(), workers_on_host);
        pool = std::make_unique<kernels::ThreadPool>(threads);
        if (sampling_rank && config.has_draft_model() && !config.draft_has_own_rank()) {
          if (gpu_rank) {
            gpu_draft = std::make_unique<worker::CudaLlamaModel>(
                model::LlamaCheckpoint::open(config.draft->path), gpu_model_options(config, device));
          } else {
            draft = worker::LlamaModel::load(config.draft->path);
          }
        }
      })) {
    return fail();
  }
  // A GPU's free memory counts once every worker on it holds its weights (the phase above ended
  // on every rank).
  if (!phase(world_rank, true, [&] {
        if (gpu_model == nullptr) return;
        const int64_t block = config.kv_cache.block_size;
        int64_t per_block = worker::CudaKvCache::bytes_per_block(gpu_model->shard_config(), block,
                                                                 gpu_model->kv_cache_types());
        if (gpu_draft != nullptr)
          per_block += worker::CudaKvCache::bytes_per_block(gpu_draft->config(), block);
        num_blocks = blocks_for_this_worker(
            config, per_block, static_cast<double>(worker::cuda_memory_info(device).free), gpu_sharers);
      })) {
    return fail();
  }
  MPI_Allreduce(MPI_IN_PLACE, &num_blocks, 1, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD);
  if (gpu_model != nullptr && me.tp_rank == 0) {  // what the stage's model took of the job's keys
    std::fprintf(stderr, "nibble serve: stage %d: decode attention cut every %lld positions\n", me.stage,
                 static_cast<long long>(gpu_model->options().decode_split_tokens));
    std::fflush(stderr);
  }

  // 3. Control plane: each worker binds a PULL for steps; the coordinator binds the client ROUTER
  // and a PULL for results, then connects a PUSH to every worker. A draft rank binds a REP that the
  // sampling worker connects a REQ to.
  zmq::context_t context(1);
  zmq::socket_t steps(context, draft_rank ? zmq::socket_type::rep : zmq::socket_type::pull);
  zmq::socket_t to_draft(context, zmq::socket_type::req);
  zmq::socket_t results(context, coordinator ? zmq::socket_type::pull : zmq::socket_type::push);
  zmq::socket_t clients(context, zmq::socket_type::router);
  std::vector<std::unique_ptr<zmq::socket_t>> to_workers;
  Slot my_endpoint{};
  std::unique_ptr<cluster::OpenAiServer> gateway;  // `openai:`: the HTTP API in this process
  int gateway_port = 0;
  std::string gateway_model;
  if (!phase(world_rank, true, [&] {
        if (coordinator) {
          clients.set(zmq::sockopt::linger, 2000);  // let the last errors reach clients at exit
          // A hard cap far above the protocol limit: bigger frames are dropped by ZeroMQ before
          // they cost memory; those between the two limits get a message_too_large reply.
          clients.set(zmq::sockopt::maxmsgsize,
                      std::max<int64_t>(16 * config.server.max_message_bytes, 1 << 24));
          try {
            clients.bind(config.server.listen);
          } catch (const zmq::error_t& e) {
            throw std::runtime_error("server.listen: cannot bind " + config.server.listen + ": " + e.what());
          }
          my_endpoint = to_slot(bind_ephemeral(results, single_host));
          if (config.openai) {
            const cluster::OpenAiServerOptions gateway_options = openai_options(config, tokenizer);
            gateway_model = gateway_options.api.model_name;
            gateway = std::make_unique<cluster::OpenAiServer>(gateway_options);
            try {
              gateway_port = gateway->bind();
            } catch (const std::exception& e) {
              throw std::runtime_error(std::string("openai.listen: ") + e.what());
            }
          }
        } else {
          my_endpoint = to_slot(bind_ephemeral(steps, single_host));
        }
      })) {
    return fail();
  }
  std::vector<Slot> endpoints(static_cast<size_t>(world_size));
  MPI_Allgather(my_endpoint.data(), kNameBytes, MPI_CHAR, endpoints.data(), kNameBytes, MPI_CHAR,
                MPI_COMM_WORLD);
  if (coordinator) {
    for (int r = 1; r <= layout->num_workers(); ++r) {
      auto push = std::make_unique<zmq::socket_t>(context, zmq::socket_type::push);
      push->set(zmq::sockopt::linger, 5000);  // the shutdown step must arrive
      push->connect(endpoints[static_cast<size_t>(r)].data());
      to_workers.push_back(std::move(push));
    }
  } else if (!draft_rank) {
    // Every worker answers adapter loads on it; the sampling worker sends its step results there too.
    results.set(zmq::sockopt::linger, 5000);
    results.connect(endpoints[0].data());
    if (sampling_rank && layout->has_draft_rank())
      to_draft.connect(endpoints[static_cast<size_t>(layout->draft_world_rank())].data());
  }

  // A draft rank times its draft for the sampling worker's cost model (before the target is timed
  // there, so the two measurements do not disturb each other on a shared host).
  std::vector<std::pair<int64_t, double>> draft_costs;
  double draft_file_bytes = 0;
  if (layout->has_draft_rank() && (draft_rank || sampling_rank)) {
    constexpr int kCostTag = 11;
    std::vector<double> flat;
    if (draft_rank) {
      for (const auto& [tokens, seconds] :
           speculative::CostModel::measure_model(*draft, *pool, config.scheduler.max_batch_tokens)) {
        flat.push_back(static_cast<double>(tokens));
        flat.push_back(seconds);
      }
      flat.push_back(static_cast<double>(draft->checkpoint().weight_bytes()));
      MPI_Send(flat.data(), static_cast<int>(flat.size()), MPI_DOUBLE, sampling_world_rank, kCostTag,
               MPI_COMM_WORLD);
    } else {
      MPI_Status status;
      MPI_Probe(layout->draft_world_rank(), kCostTag, MPI_COMM_WORLD, &status);
      int count = 0;
      MPI_Get_count(&status, MPI_DOUBLE, &count);
      flat.resize(static_cast<size_t>(count));
      MPI_Recv(flat.data(), count, MPI_DOUBLE, layout->draft_world_rank(), kCostTag, MPI_COMM_WORLD,
               MPI_STATUS_IGNORE);
      const size_t pairs = flat.empty() ? 0 : (flat.size() - 1) / 2;  // (tokens, seconds)..., file bytes
      for (size_t i = 0; i < pairs; ++i)
        draft_costs.emplace_back(static_cast<int64_t>(flat[2 * i]), flat[2 * i + 1]);
      draft_file_bytes = flat.empty() ? 0 : flat.back();
    }
  }
  // A sampling rank that holds the whole target measures what verification (and a draft next to
  // it) costs, before the barrier: the service answers health requests only once this is done, so
  // the first request does not wait for it.
  speculative::CostModel measured_costs;
  // (A GPU target is not timed: its cost comes from weight bytes below, as for a sharded target.)
  const bool whole_cpu_target = config.num_workers() == 1 && !cuda;
  if (sampling_rank && config.draft.has_value() && whole_cpu_target) {
    if (draft != nullptr) {
      measured_costs =
          speculative::CostModel::measure(*model, *draft, *pool, config.scheduler.max_batch_tokens);
    } else {
      measured_costs.target =
          speculative::CostModel::measure_model(*model, *pool, config.scheduler.max_batch_tokens);
      measured_costs.draft = draft_costs;
      // Prompt lookup costs nothing next to a forward pass.
      if (!config.has_draft_model())
        measured_costs.draft = {{1, 0.0}, {config.scheduler.max_batch_tokens, 0.0}};
    }
  }

  std::vector<int> pids(static_cast<size_t>(world_size));
  const int my_pid = static_cast<int>(getpid());
  MPI_Gather(&my_pid, 1, MPI_INT, pids.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  MPI_Barrier(MPI_COMM_WORLD);

  if (draft_rank) {
    int code = 0;
    try {
      speculative::LocalDraft drafts(*draft, *pool, num_blocks, config.kv_cache.block_size);
      cluster::DraftService(drafts, steps).run();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "nibble serve: draft rank %d: error: %s\n", world_rank, e.what());
      code = 1;
    }
    if (code != 0) MPI_Abort(MPI_COMM_WORLD, code);
    steps.close();
    MPI_Finalize();
    return 0;
  }

  if (!coordinator) {
    int code = 0;
    try {
      std::unique_ptr<worker::ForwardModel> draft_forward;  // the GPU draft's (declared before its user)
      std::unique_ptr<speculative::Speculator> speculator;
      std::unique_ptr<cluster::RemoteDraft> remote;
      std::unique_ptr<speculative::NgramDraft> lookup;
      if (sampling_rank && config.draft.has_value()) {
        speculative::SpeculatorSettings settings;
        settings.max_draft_tokens = config.draft->max_draft_tokens;
        settings.adaptive = config.draft->adaptive;
        settings.num_blocks = num_blocks;
        settings.block_size = config.kv_cache.block_size;
        const bool draft_here = draft != nullptr || gpu_draft != nullptr;
        if (whole_cpu_target) {
          settings.costs = measured_costs;  // this rank holds the whole target
        } else {
          // Sharded or GPU target: estimate from weight bytes (decode is memory-bound; for a GPU
          // target with a CPU draft this underestimates the draft's cost).
          const double bytes = draft != nullptr ? static_cast<double>(draft->checkpoint().weight_bytes())
                               : gpu_draft != nullptr
                                   ? static_cast<double>(gpu_draft->checkpoint().weight_bytes())
                                   : draft_file_bytes;
          settings.draft_cost = bytes / static_cast<double>(file->weight_bytes());
        }
        if (!config.has_draft_model()) {
          settings.draft_cost = 0.0;
          lookup = std::make_unique<speculative::NgramDraft>(file->config().n_vocab, config.draft->ngram_min,
                                                             config.draft->ngram_max);
          speculator = std::make_unique<speculative::Speculator>(*lookup, settings);
        } else if (gpu_draft != nullptr) {
          draft_forward = std::make_unique<worker::CudaForwardModel>(*gpu_draft, device);
          speculator = std::make_unique<speculative::Speculator>(*draft_forward, settings);
        } else if (draft_here) {
          speculator = std::make_unique<speculative::Speculator>(*draft, *pool, settings);
        } else {
          remote = std::make_unique<cluster::RemoteDraft>(to_draft);
          speculator = std::make_unique<speculative::Speculator>(*remote, settings);
        }
      }
      std::unique_ptr<worker::ForwardModel> shard_model;
      if (gpu_model != nullptr) {
        shard_model = std::make_unique<worker::CudaForwardModel>(*gpu_model, device);
      } else {
        shard_model = std::make_unique<worker::CpuForwardModel>(*model, *pool);
      }
      cluster::WorkerStage stage(*shard_model, num_blocks, config.kv_cache.block_size);
      // The sampling rank constrains JSON output with the model's vocabulary.
      std::shared_ptr<const worker::JsonConstraint> json;
      std::shared_ptr<const worker::GrammarConstraint> grammar;
      if (sampling_rank) {
        if (const auto vocabulary = open_tokenizer(*file)) {
          json = std::make_shared<const worker::JsonConstraint>(*vocabulary);
          grammar = std::make_shared<const worker::GrammarConstraint>(*vocabulary);
        }
      }
      cluster::WorkerService service(stage, config.parallel.pipeline > 1 ? groups.pipeline.get() : nullptr,
                                     steps, sampling_rank ? &results : nullptr, speculator.get(), json,
                                     grammar);
      service.report_adapters_to(results, world_rank);
      service.run();
      if (remote != nullptr) remote->shutdown();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "nibble serve: worker rank %d (stage %d, tensor rank %d): error: %s\n", world_rank,
                   me.stage, me.tp_rank, e.what());
      code = 1;
    }
    if (code != 0) MPI_Abort(MPI_COMM_WORLD, code);  // peers may be waiting in a collective
    steps.close();
    results.close();
    to_draft.close();
    groups = {};
    MPI_Finalize();
    return 0;
  }

  const worker::KvCacheTypes kv_types = cli::kv_cache_types(config.kv_cache);
  const bool unrotated = kv_types.quantized() && !config.kv_cache.rotation;
  std::fprintf(stderr, "nibble serve: %s; %lld KV blocks of %d tokens (%s%s) per worker; listening on %s\n",
               layout->describe().c_str(), static_cast<long long>(num_blocks), config.kv_cache.block_size,
               kv_types.name().c_str(), unrotated ? ", unrotated" : "", config.server.listen.c_str());
  for (int r = 1; r < world_size; ++r) {
    const parallel::RankInfo info = layout->rank(r);
    if (info.role == parallel::Role::draft) {
      std::fprintf(stderr, "nibble serve: draft rank %d: %s, pid %d on %s\n", r, config.draft->path.c_str(),
                   pids[static_cast<size_t>(r)], hosts[static_cast<size_t>(r)].data());
      continue;
    }
    const int gpu = devices[static_cast<size_t>(r)];
    std::fprintf(stderr, "nibble serve: worker rank %d: stage %d, tensor rank %d, pid %d on %s%s\n", r,
                 info.stage, info.tp_rank, pids[static_cast<size_t>(r)], hosts[static_cast<size_t>(r)].data(),
                 gpu >= 0 ? (", GPU " + std::to_string(gpu)).c_str() : "");
  }
  if (config.draft.has_value() && !config.has_draft_model()) {
    std::fprintf(
        stderr,
        "nibble serve: ngram drafts (prompt lookup, n %d..%d) next to the sampling worker (rank %d)\n",
        config.draft->ngram_min, config.draft->ngram_max, sampling_world_rank);
  } else if (config.draft.has_value() && !config.draft_has_own_rank()) {
    // The sampling worker's stage on a GPU (the last, whole or a tensor shard) verifies sampled drafts on
    // the device (worker::CudaForwardModel::verifies_drafts); on the CPU it verifies its logits.
    const bool verify_on_gpu = cuda;
    std::fprintf(stderr,
                 "nibble serve: draft %s next to the sampling worker (rank %d), on its %s; sampled drafts "
                 "verified on the %s\n",
                 config.draft->path.c_str(), sampling_world_rank, cuda ? "GPU" : "CPU",
                 verify_on_gpu ? "GPU" : "host");
  }
  std::fflush(stderr);

  struct sigaction action {};
  action.sa_handler = on_terminate;
  sigaction(SIGTERM, &action, nullptr);
  sigaction(SIGINT, &action, nullptr);

  cluster::SchedulerConfig scheduler;
  scheduler.max_batch_tokens = config.scheduler.max_batch_tokens;
  scheduler.max_running = config.scheduler.max_running;
  scheduler.prefill_chunk = config.scheduler.prefill_chunk;
  scheduler.max_queue = config.server.max_queue;
  scheduler.block_size = config.kv_cache.block_size;
  scheduler.num_blocks = num_blocks;
  scheduler.context = config.context;
  scheduler.prefix_caching = config.kv_cache.prefix_caching;
  cluster::CoordinatorSockets sockets;
  sockets.clients = &clients;
  sockets.results = &results;
  for (auto& push : to_workers) sockets.workers.push_back(push.get());
  // How requests' conversations become prompts: the configured format, or the model's own template's
  // (a GGUF's tokenizer.chat_template, a Hugging Face directory's tokenizer_config.json chat_template).
  cluster::CoordinatorChat chat;
  std::optional<std::string> chat_template;
  if (file->gguf() != nullptr && file->gguf()->metadata().count("tokenizer.chat_template") != 0)
    chat_template = file->gguf()->metadata().at("tokenizer.chat_template").s;
  if (file->hf() != nullptr) chat_template = model::hf_chat_template(file->hf()->dir());
  if (config.chat_template != "auto") {
    chat.format = model::chat_format_by_name(config.chat_template);
  } else {
    if (chat_template) chat.format = model::detect_chat_format(*chat_template);
    if (!chat.format) {
      chat.missing = (chat_template ? "the model's chat template is not a format Nibble writes"
                                    : config.model.path + " has no chat template (tokenizer.chat_template)") +
                     "; set chat_template: NAME in the configuration (" + model::chat_format_names() +
                     ") or send a formatted prompt with special tokens parsed";
    }
  }
  if (chat.format) chat.tools = model::tool_prompt_for(*chat.format, chat_template.value_or(""));
  std::fprintf(
      stderr, "nibble serve: chat format: %s, tool calls: %s\n",
      chat.format ? model::chat_format_name(*chat.format) : "none (requests with messages are refused)",
      chat.tools ? model::tool_form_name(chat.tools->form) : "none");
  // The HTTP API's own threads, a client of this coordinator like any other; stopped once it has answered
  // its last request.
  std::thread gateway_thread;
  if (gateway) {
    std::fprintf(stderr, "nibble serve: openai: listening on http://%s:%d (model '%s')\n",
                 config.openai->host.c_str(), gateway_port, gateway_model.c_str());
    gateway_thread = std::thread([&gateway] { gateway->run(); });
  }
  const auto stop_gateway = [&] {
    if (!gateway) return;
    gateway->stop();
    gateway_thread.join();
  };
  int code = 1;
  try {
    cluster::Coordinator coordinator_loop(config, *tokenizer, file->config(), scheduler, sockets,
                                          layout->describe(), chat);
    code = coordinator_loop.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nibble serve: coordinator: error: %s\n", e.what());
  }
  stop_gateway();
  if (code != 0) {
    std::fprintf(stderr,
                 "nibble serve: stopping after a failure; every open request was answered with an error\n");
    clients.close();  // lingers until the errors are out
    MPI_Abort(MPI_COMM_WORLD, code);
  }
  std::fprintf(stderr, "nibble serve: shut down cleanly\n");
  clients.close();
  for (auto& push : to_workers) push->close();
  results.close();
  MPI_Finalize();
  return 0;
}

}  // namespace

Runner add_serve(CLI::App& app) {
  auto config_path = std::make_shared<std::string>();
  app.add_option("--config", *config_path, "Cluster YAML (see config/)")->required();
  return [config_path] { return serve(*config_path); };
}

}  // namespace nibble::cli
