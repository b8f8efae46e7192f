// The client library and the `nibble client` / `nibble bench-serve` commands against a scripted
// in-test server: a real ZeroMQ ROUTER socket that decodes real requests and answers with real
// encoded responses, so everything but the coordinator's logic is the production path.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "cluster/client.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::cluster {
namespace {

using protocol::ClientRequestMsg;
using protocol::Delta;
using protocol::ErrorCode;
using protocol::Final;
using protocol::FinishReason;
using protocol::GenerateRequest;
using protocol::ServerResponseMsg;
using protocol::Timings;

// Answers each request with what `script` returns for it (nothing: no reply). A frame that does not
// decode is answered as the real coordinator does: an Error with an empty request id.
class ScriptedServer {
 public:
  using Script = std::function<std::vector<ServerResponseMsg>(const ClientRequestMsg&)>;

  explicit ScriptedServer(Script script)
      : script_(std::move(script)), router_(context_, zmq::socket_type::router) {
    router_.set(zmq::sockopt::linger, 0);
    router_.set(zmq::sockopt::rcvtimeo, 20);  // the loop checks stop_ this often
    router_.set(zmq::sockopt::sndtimeo, 5000);
    router_.bind("tcp://127.0.0.1:*");  // ephemeral port: tests may run in parallel
    endpoint_ = router_.get(zmq::sockopt::last_endpoint);
    thread_ = std::thread([this] { serve(); });
  }
  ~ScriptedServer() {
    stop_ = true;
    thread_.join();
  }

  const std::string& endpoint() const { return endpoint_; }
  // Every request decoded so far, in arrival order.
  std::vector<ClientRequestMsg> received() {
    std::lock_guard lock(mutex_);
    return received_;
  }
  // Frames to send verbatim (undecoded) in place of the next script answer.
  void send_raw_next(std::vector<uint8_t> frame) {
    std::lock_guard lock(mutex_);
    raw_next_ = std::move(frame);
  }

 private:
  void serve() {
    while (!stop_) {
      std::vector<zmq::message_t> parts;
      if (!zmq::recv_multipart(router_, std::back_inserter(parts))) continue;
      if (parts.size() != 2) continue;  // a DEALER sends [identity, payload] as the ROUTER sees it
      std::vector<std::vector<uint8_t>> replies;
      std::vector<uint8_t> raw;
      {
        std::lock_guard lock(mutex_);
        raw.swap(raw_next_);
      }
      if (!raw.empty()) {
        replies.push_back(std::move(raw));
      } else {
        try {
          ClientRequestMsg request =
              protocol::decode_client_request({parts[1].data<uint8_t>(), parts[1].size()});
          {
            std::lock_guard lock(mutex_);
            received_.push_back(request);
          }
          for (const auto& reply : script_(request)) replies.push_back(protocol::encode(reply));
        } catch (const protocol::ProtocolError& e) {
          replies.push_back(protocol::encode(ServerResponseMsg{protocol::Error{"", e.code, e.what()}}));
        }
      }
      for (const auto& reply : replies) {
        zmq::message_t identity;
        identity.copy(parts[0]);
        router_.send(identity, zmq::send_flags::sndmore);
        router_.send(zmq::buffer(reply), zmq::send_flags::none);
      }
    }
  }

  Script script_;
  zmq::context_t context_;
  zmq::socket_t router_;
  std::string endpoint_;
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::vector<ClientRequestMsg> received_;
  std::vector<uint8_t> raw_next_;
  std::thread thread_;  // last: starts after every member it uses exists
};

// Short enough that a broken test fails fast, long enough for a loaded CI machine.
ClientOptions test_options(int timeout_ms = 5000) {
  ClientOptions options;
  options.timeout_ms = timeout_ms;
  return options;
}

GenerateRequest token_request(const std::string& id, bool stream = true) {
  GenerateRequest request;
  request.request_id = id;
  request.prompt = std::vector<int32_t>{1, 15043, 3186};
  request.sampling.temperature = 0.0f;
  request.max_tokens = 8;
  request.stream = stream;
  return request;
}

Final final_for(const std::string& id) {
  Final f;
  f.request_id = id;
  f.finish_reason = FinishReason::eos;
  f.prompt_tokens = 4;
  f.completion_tokens = 3;
  f.text = "Hello world!";
  f.tokens = {15, 16, 17};
  f.timings = Timings{0.5, 12.25, 30.125};
  f.prompt_token_ids = {1, 1, 15043, 3186};
  return f;
}

const std::string& id_of(const ClientRequestMsg& request) {
  return std::get<GenerateRequest>(request).request_id;
}

// ---------------------------------------------------------------- the library

TEST(Client, StreamsDeltasInOrderThenReturnsTheFinal) {
  ScriptedServer server([](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    const std::string& id = id_of(request);
    return {Delta{id, {15}, "Hello"}, Delta{id, {16}, " world"}, Delta{id, {}, ""}, Delta{id, {17}, "!"},
            final_for(id)};
  });
  Client client(server.endpoint(), test_options());
  const GenerateRequest request = token_request("req-stream");
  std::vector<Delta> deltas;
  const Final result = client.generate(request, [&](const Delta& d) { deltas.push_back(d); });

  EXPECT_EQ(result, final_for("req-stream"));
  ASSERT_EQ(deltas.size(), 4u);
  std::string text;
  std::vector<int32_t> tokens;
  for (const Delta& d : deltas) {
    EXPECT_EQ(d.request_id, "req-stream");
    text += d.text;
    tokens.insert(tokens.end(), d.tokens.begin(), d.tokens.end());
  }
  EXPECT_EQ(text, "Hello world!");
  EXPECT_EQ(tokens, (std::vector<int32_t>{15, 16, 17}));
  // The server saw exactly the request that was sent.
  const auto received = server.received();
  ASSERT_EQ(received.size(), 1u);
  EXPECT_EQ(received[0], ClientRequestMsg{request});
}

TEST(Client, EmptyRequestIdIsReplacedByAUniqueOne) {
  ScriptedServer server([](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    return {final_for(id_of(request))};
  });
  Client client(server.endpoint(), test_options());
  std::set<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    const Final result = client.generate(token_request("", false));
    EXPECT_FALSE(result.request_id.empty());
    ids.insert(result.request_id);
  }
  EXPECT_EQ(ids.size(), 3u);
  const auto received = server.received();
  ASSERT_EQ(received.size(), 3u);
  for (const auto& request : received) EXPECT_TRUE(ids.count(id_of(request))) << id_of(request);
}

TEST(Client, ErrorReplyThrowsClientErrorWithTheCode) {
  ScriptedServer server([](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    const std::string& id = id_of(request);
    return {Delta{id, {15}, "Hel"}, protocol::Error{id, ErrorCode::cancelled, "request cancelled"}};
  });
  Client client(server.endpoint(), test_options());
  std::string streamed;
  try {
    client.generate(token_request("req-err"), [&](const Delta& d) { streamed += d.text; });
    FAIL() << "expected ClientError";
  } catch (const ClientError& e) {
    ASSERT_TRUE(e.code.has_value());
    EXPECT_EQ(*e.code, ErrorCode::cancelled);
    EXPECT_EQ(e.request_id, "req-err");
    EXPECT_STREQ(e.what(), "cancelled: request cancelled");
  }
  EXPECT_EQ(streamed, "Hel");
}

TEST(Client, SkipsRepliesForOtherRequestIds) {
  // Late replies of an abandoned request ("old") interleaved with the current one's.
  ScriptedServer server([](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    const std::string& id = id_of(request);
    return {Delta{"old", {1}, "x"},
            Delta{id, {15}, "Hello"},
            final_for("old"),
            Delta{id, {16}, " world"},
            protocol::Error{"old", ErrorCode::internal, "stale"},
            protocol::Health{true, 1, "stale health"},
            Delta{id, {17}, "!"},
            final_for(id)};
  });
  Client client(server.endpoint(), test_options());
  std::string text;
  const Final result = client.generate(token_request("req-new"), [&](const Delta& d) {
    EXPECT_EQ(d.request_id, "req-new");
    text += d.text;
  });
  EXPECT_EQ(result, final_for("req-new"));
  EXPECT_EQ(text, "Hello world!");
}

TEST(Client, NoReplyTimesOutAsATransportError) {
  ScriptedServer server([](const ClientRequestMsg&) { return std::vector<ServerResponseMsg>{}; });
  Client client(server.endpoint(), test_options(200));
  const auto start = std::chrono::steady_clock::now();
  try {
    client.generate(token_request("req-silent"));
    FAIL() << "expected ClientError";
  } catch (const ClientError& e) {
    EXPECT_FALSE(e.code.has_value());
    EXPECT_EQ(e.request_id, "req-silent");
    EXPECT_EQ(std::string(e.what()), "no reply from " + server.endpoint() + " within 200 ms");
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(waited, 0.19);
  EXPECT_LT(waited, 3.0);
  EXPECT_THROW(client.health(), ClientError);
}

TEST(Client, ControlRequestsAndCancel) {
  const protocol::Stats stats{1, 2, 3, 4, 5, 6, 7};
  ScriptedServer server([&](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    if (std::holds_alternative<protocol::HealthRequest>(request)) return {protocol::Health{true, 2, "up"}};
    if (std::holds_alternative<protocol::StatsRequest>(request)) {
      // A stale Delta first: control replies skip request-scoped messages.
      return {Delta{"old", {1}, "x"}, stats};
    }
    if (std::holds_alternative<protocol::ShutdownRequest>(request)) {
      return {protocol::Health{true, 2, "shutting down"}};
    }
    return {};  // cancel: no reply of its own
  });
  Client client(server.endpoint(), test_options());
  EXPECT_EQ(client.health(), (protocol::Health{true, 2, "up"}));
  EXPECT_EQ(client.stats(), stats);
  client.cancel("req-7");
  EXPECT_EQ(client.shutdown(), (protocol::Health{true, 2, "shutting down"}));
  const auto received = server.received();
  ASSERT_EQ(received.size(), 4u);
  EXPECT_TRUE(std::holds_alternative<protocol::HealthRequest>(received[0]));
  EXPECT_TRUE(std::holds_alternative<protocol::StatsRequest>(received[1]));
  EXPECT_EQ(received[2], ClientRequestMsg{protocol::CancelRequest{"req-7"}});
  EXPECT_TRUE(std::holds_alternative<protocol::ShutdownRequest>(received[3]));
  EXPECT_THROW(client.cancel(""), ClientError);  // invalid locally: never sent
}

TEST(Client, ControlErrorWithoutRequestIdThrows) {
  ScriptedServer server([](const ClientRequestMsg&) -> std::vector<ServerResponseMsg> {
    return {protocol::Error{"", ErrorCode::shutting_down, "bye"}};
  });
  Client client(server.endpoint(), test_options());
  try {
    client.health();
    FAIL() << "expected ClientError";
  } catch (const ClientError& e) {
    EXPECT_EQ(e.code, ErrorCode::shutting_down);
    EXPECT_STREQ(e.what(), "shuttingDown: bye");
  }
}

TEST(Client, RawFramesAndTheServersVerdict) {
  ScriptedServer server([](const ClientRequestMsg&) { return std::vector<ServerResponseMsg>{}; });
  Client client(server.endpoint(), test_options());
  const std::vector<uint8_t> garbage = {1, 2, 3, 4, 5, 6, 7};
  client.send_raw(garbage);
  const ServerResponseMsg reply = client.receive();
  const auto* error = std::get_if<protocol::Error>(&reply);
  ASSERT_NE(error, nullptr);
  EXPECT_EQ(error->code, ErrorCode::malformed_message);
  EXPECT_TRUE(error->request_id.empty());
  // A generate whose frame the server cannot read fails with that Error, though it carries no id.
  server.send_raw_next(
      protocol::encode(ServerResponseMsg{protocol::Error{"", ErrorCode::malformed_message, "?"}}));
  try {
    client.generate(token_request("req-raw"));
    FAIL() << "expected ClientError";
  } catch (const ClientError& e) {
    EXPECT_EQ(e.code, ErrorCode::malformed_message);
  }
}

TEST(Client, UndecodableReplyIsATransportError) {
  ScriptedServer server([](const ClientRequestMsg&) { return std::vector<ServerResponseMsg>{}; });
  server.send_raw_next({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff});
  Client client(server.endpoint(), test_options());
  try {
    client.generate(token_request("req-bad-reply"));
    FAIL() << "expected ClientError";
  } catch (const ClientError& e) {
    EXPECT_FALSE(e.code.has_value());
    EXPECT_NE(std::string(e.what()).find("undecodable reply"), std::string::npos) << e.what();
  }
}

TEST(Client, InvalidRequestIsRefusedLocally) {
  ScriptedServer server([](const ClientRequestMsg&) { return std::vector<ServerResponseMsg>{}; });
  Client client(server.endpoint(), test_options());
  GenerateRequest request = token_request("req-bad");
  request.sampling.top_p = 0.0f;
  try {
    client.generate(request);
    FAIL() << "expected ClientError";
  } catch (const ClientError& e) {
    EXPECT_EQ(e.code, ErrorCode::bad_request);
    EXPECT_EQ(std::string(e.what()).rfind("badRequest: sampling.topP:", 0), 0u) << e.what();
  }
  EXPECT_TRUE(server.received().empty());
}

TEST(Client, OneClientPerThreadGetsItsOwnReplies) {
  ScriptedServer server([](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    const std::string& id = id_of(request);
    return {Delta{id, {1}, id}, Delta{id, {2}, "/b"}, final_for(id)};
  });
  constexpr int kThreads = 4, kPerThread = 10;
  std::atomic<int> good{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Client client(server.endpoint(), test_options());
      for (int i = 0; i < kPerThread; ++i) {
        // Built with += : GCC 12 flags `"t" + std::to_string(t)` with a false -Wrestrict.
        std::string id = "t";
        id += std::to_string(t) + "-" + std::to_string(i);
        std::string text;
        const Final f = client.generate(token_request(id), [&](const Delta& d) { text += d.text; });
        if (f.request_id == id && text == id + "/b") ++good;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(good.load(), kThreads * kPerThread);
}

// ---------------------------------------------------------------- the commands

nlohmann::json parse_json(const test::CommandResult& result) {
  auto parsed = nlohmann::json::parse(result.output, nullptr, false);
  EXPECT_FALSE(parsed.is_discarded()) << result.output;
  return parsed;
}

TEST(ClientCommand, JsonGenerateReportsTheFinal) {
  ScriptedServer server([](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    const std::string& id = id_of(request);
    return {Delta{id, {15}, "Hello"}, final_for(id)};
  });
  const auto result = test::run_command(test::nibble_bin() + " client --endpoint " + server.endpoint() +
                                        " --tokens '1 15043 3186' --max-tokens 5 --temperature 0 --seed 9" +
                                        " --stop END --stream --json --request-id cli-1 --timeout-ms 5000");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  const auto out = parse_json(result);
  const Final expected = final_for("cli-1");
  EXPECT_EQ(out["request_id"], "cli-1");
  EXPECT_EQ(out["prompt_tokens"].get<std::vector<int32_t>>(), expected.prompt_token_ids);
  EXPECT_EQ(out["tokens"].get<std::vector<int32_t>>(), expected.tokens);
  EXPECT_EQ(out["text"], expected.text);
  EXPECT_EQ(out["finish_reason"], "eos");
  EXPECT_DOUBLE_EQ(out["timings"]["queue_ms"].get<double>(), expected.timings.queue_ms);
  EXPECT_DOUBLE_EQ(out["timings"]["prefill_ms"].get<double>(), expected.timings.prefill_ms);
  EXPECT_DOUBLE_EQ(out["timings"]["decode_ms"].get<double>(), expected.timings.decode_ms);

  // The flags reached the server as the request's fields.
  const auto received = server.received();
  ASSERT_EQ(received.size(), 1u);
  const auto& request = std::get<GenerateRequest>(received[0]);
  EXPECT_EQ(request.request_id, "cli-1");
  EXPECT_EQ(request.prompt,
            (decltype(protocol::GenerateRequest::prompt){std::vector<int32_t>{1, 15043, 3186}}));
  EXPECT_EQ(request.max_tokens, 5u);
  EXPECT_EQ(request.sampling.temperature, 0.0f);
  EXPECT_EQ(request.sampling.seed, uint64_t{9});
  EXPECT_EQ(request.stop, std::vector<std::string>{"END"});
  EXPECT_TRUE(request.stream);
}

TEST(ClientCommand, StreamsTextAndUsesGenerateDefaults) {
  ScriptedServer server([](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    const std::string& id = id_of(request);
    return {Delta{id, {15}, "Hel"}, Delta{id, {16}, "lo"}, final_for(id)};
  });
  const auto result = test::run_command(test::nibble_bin() + " client -e " + server.endpoint() +
                                        " --prompt 'Once upon a time' --stream --timeout-ms 5000");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  EXPECT_EQ(result.output, "Hello\n");  // the deltas, not the Final's text
  const auto received = server.received();
  ASSERT_EQ(received.size(), 1u);
  const auto& request = std::get<GenerateRequest>(received[0]);
  EXPECT_EQ(request.prompt, (decltype(protocol::GenerateRequest::prompt){std::string("Once upon a time")}));
  // `nibble generate`'s defaults.
  EXPECT_EQ(request.max_tokens, 128u);
  EXPECT_FLOAT_EQ(request.sampling.temperature, 0.8f);
  EXPECT_EQ(request.sampling.top_k, 40);
  EXPECT_FLOAT_EQ(request.sampling.top_p, 0.95f);
  EXPECT_FLOAT_EQ(request.sampling.min_p, 0.05f);
  EXPECT_FALSE(request.sampling.seed.has_value());
  EXPECT_FALSE(request.request_id.empty());
}

TEST(ClientCommand, HealthAndStats) {
  ScriptedServer server([](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    if (std::holds_alternative<protocol::HealthRequest>(request))
      return {protocol::Health{true, 3, "all up"}};
    return {protocol::Stats{1, 2, 3, 4, 5, 6, 7}};
  });
  const std::string base =
      test::nibble_bin() + " client --endpoint " + server.endpoint() + " --timeout-ms 5000";
  auto health = test::run_command(base + " --health --json");
  ASSERT_EQ(health.exit_code, 0) << health.output;
  auto out = parse_json(health);
  EXPECT_EQ(out["ok"], true);
  EXPECT_EQ(out["workers"], 3);
  EXPECT_EQ(out["detail"], "all up");

  auto stats = test::run_command(base + " --stats --json");
  ASSERT_EQ(stats.exit_code, 0) << stats.output;
  out = parse_json(stats);
  EXPECT_EQ(out["queued"], 1);
  EXPECT_EQ(out["free_kv_blocks"], 5);
  EXPECT_EQ(out["tokens_generated"], 7);

  auto text = test::run_command(base + " --health");
  ASSERT_EQ(text.exit_code, 0) << text.output;
  EXPECT_EQ(text.output, "ok: true\nworkers: 3\ndetail: all up\n");
}

TEST(ClientCommand, ErrorsPrintOneLineAndExitOne) {
  ScriptedServer server([](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    return {
        protocol::Error{id_of(request), ErrorCode::prompt_too_long, "prompt of 9000 tokens exceeds 4096"}};
  });
  const std::string base = test::nibble_bin() + " client --endpoint " + server.endpoint();
  auto error = test::run_command(base + " --prompt hi --timeout-ms 5000");
  EXPECT_EQ(error.exit_code, 1);
  EXPECT_EQ(error.output, "nibble: error: promptTooLong: prompt of 9000 tokens exceeds 4096\n");

  auto bad_tokens = test::run_command(base + " --tokens '1 x 3' --timeout-ms 5000");
  EXPECT_EQ(bad_tokens.exit_code, 1);
  EXPECT_NE(bad_tokens.output.find("--tokens: 'x' is not a token id"), std::string::npos)
      << bad_tokens.output;

  auto nothing = test::run_command(base);
  EXPECT_EQ(nothing.exit_code, 2);
  EXPECT_NE(nothing.output.find("one of --prompt"), std::string::npos) << nothing.output;

  ScriptedServer silent([](const ClientRequestMsg&) { return std::vector<ServerResponseMsg>{}; });
  auto timeout = test::run_command(test::nibble_bin() + " client --endpoint " + silent.endpoint() +
                                   " --health --timeout-ms 200");
  EXPECT_EQ(timeout.exit_code, 1);
  EXPECT_EQ(timeout.output, "nibble: error: no reply from " + silent.endpoint() + " within 200 ms\n");
}

// Each generate request gets max_tokens one-token Deltas and a Final; every `fail_every`-th request
// (when set) an overloaded Error instead.
ScriptedServer::Script bench_script(std::atomic<int>& count, int fail_every) {
  return [&count, fail_every](const ClientRequestMsg& request) -> std::vector<ServerResponseMsg> {
    const auto& generate = std::get<GenerateRequest>(request);
    const int n = ++count;
    if (fail_every > 0 && n % fail_every == 0) {
      return {protocol::Error{generate.request_id, ErrorCode::overloaded, "queue full"}};
    }
    std::vector<ServerResponseMsg> replies;
    Final f;
    f.request_id = generate.request_id;
    f.prompt_tokens = static_cast<uint32_t>(std::get<std::vector<int32_t>>(generate.prompt).size());
    f.completion_tokens = generate.max_tokens;
    for (uint32_t i = 0; i < generate.max_tokens; ++i) {
      replies.push_back(Delta{generate.request_id, {static_cast<int32_t>(i)}, "t"});
      f.tokens.push_back(static_cast<int32_t>(i));
      f.text += "t";
    }
    replies.push_back(f);
    return replies;
  };
}

TEST(BenchServeCommand, ReportsEveryRequestAndTheWorkloadIsTheSeeds) {
  std::atomic<int> count{0};
  ScriptedServer server(bench_script(count, 0));
  const std::string command = test::nibble_bin() + " bench-serve --endpoint " + server.endpoint() +
                              " --concurrency 3 --requests 7 --prompt-tokens 2:5 --max-tokens 1:4 --seed 11" +
                              " --vocab 50 --json --timeout-ms 5000";
  const auto result = test::run_command(command);
  ASSERT_EQ(result.exit_code, 0) << result.output;
  const auto out = parse_json(result);
  EXPECT_EQ(out["ok"], 7);
  EXPECT_EQ(out["failed"], 0);
  EXPECT_EQ(out["concurrency"], 3);
  EXPECT_TRUE(out["failures"].empty());
  for (const char* key : {"ttft_ms", "tpot_ms"}) {
    for (const char* p : {"p50", "p90", "p99"}) {
      EXPECT_TRUE(out[key][p].is_number()) << key << " " << p << ": " << out.dump();
    }
  }
  EXPECT_TRUE(out["latency_ms"]["p99"].is_number());
  EXPECT_GE(out["latency_ms"]["p99"].get<double>(), out["ttft_ms"]["p50"].get<double>());
  EXPECT_GT(out["output_tokens_per_second"].get<double>(), 0.0);

  const auto received = server.received();
  ASSERT_EQ(received.size(), 7u);
  uint64_t output_tokens = 0, input_tokens = 0;
  std::multiset<std::pair<size_t, uint32_t>> shapes;
  for (const auto& message : received) {
    const auto& request = std::get<GenerateRequest>(message);
    EXPECT_TRUE(request.stream);
    EXPECT_EQ(request.sampling.temperature, 0.0f);
    EXPECT_GE(request.max_tokens, 1u);
    EXPECT_LE(request.max_tokens, 4u);
    const auto& ids = std::get<std::vector<int32_t>>(request.prompt);
    EXPECT_GE(ids.size(), 2u);
    EXPECT_LE(ids.size(), 5u);
    for (int32_t id : ids) {
      EXPECT_GE(id, 3);
      EXPECT_LT(id, 50);
    }
    output_tokens += request.max_tokens;
    input_tokens += ids.size();
    shapes.insert({ids.size(), request.max_tokens});
  }
  EXPECT_EQ(out["output_tokens"].get<uint64_t>(), output_tokens);
  EXPECT_EQ(out["input_tokens"].get<uint64_t>(), input_tokens);

  // Same seed, same workload (arrival order may differ between threads).
  std::atomic<int> count2{0};
  ScriptedServer again(bench_script(count2, 0));
  const auto rerun = test::run_command(test::nibble_bin() + " bench-serve --endpoint " + again.endpoint() +
                                       " --concurrency 2 --requests 7 --prompt-tokens 2:5 --max-tokens 1:4" +
                                       " --seed 11 --vocab 50 --timeout-ms 5000");
  ASSERT_EQ(rerun.exit_code, 0) << rerun.output;
  EXPECT_NE(rerun.output.find("requests ok 7, failed 0"), std::string::npos) << rerun.output;
  std::multiset<std::pair<size_t, uint32_t>> shapes2;
  for (const auto& message : again.received()) {
    const auto& request = std::get<GenerateRequest>(message);
    shapes2.insert({std::get<std::vector<int32_t>>(request.prompt).size(), request.max_tokens});
  }
  EXPECT_EQ(shapes, shapes2);
}

// --shared-prefix: every random prompt begins with the same ids (a system prompt), then its own
// --prompt-tokens; the prefix cache's tokens the server reports in each Final are summed.
TEST(BenchServeCommand, SharedPrefixBeginsEveryPromptAndCachedTokensAreSummed) {
  std::atomic<int> count{0};
  const ScriptedServer::Script base = bench_script(count, 0);
  ScriptedServer server([&base](const ClientRequestMsg& request) {
    std::vector<ServerResponseMsg> replies = base(request);
    auto& f = std::get<Final>(replies.back());
    f.cached_prompt_tokens = f.prompt_tokens / 2;  // what a prefix cache might have held
    return replies;
  });
  const auto result = test::run_command(test::nibble_bin() + " bench-serve --endpoint " + server.endpoint() +
                                        " --concurrency 2 --requests 5 --prompt-tokens 2:5 --max-tokens 1:2" +
                                        " --shared-prefix 6 --seed 3 --vocab 50 --json --timeout-ms 5000");
  ASSERT_EQ(result.exit_code, 0) << result.output;
  const auto out = parse_json(result);
  const auto received = server.received();
  ASSERT_EQ(received.size(), 5u);
  std::vector<int32_t> prefix;
  uint64_t cached = 0;
  for (const auto& message : received) {
    const auto& ids = std::get<std::vector<int32_t>>(std::get<GenerateRequest>(message).prompt);
    ASSERT_GE(ids.size(), 8u);
    EXPECT_LE(ids.size(), 11u);
    if (prefix.empty()) prefix.assign(ids.begin(), ids.begin() + 6);
    EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + 6), prefix);
    cached += ids.size() / 2;
  }
  EXPECT_EQ(out["cached_prompt_tokens"].get<uint64_t>(), cached);
  const auto refused = test::run_command(test::nibble_bin() + " bench-serve --endpoint " + server.endpoint() +
                                         " --requests 1 --prompt hello --shared-prefix 4 --timeout-ms 1000");
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.output.find("--shared-prefix applies to random prompts"), std::string::npos)
      << refused.output;
}

TEST(BenchServeCommand, FailedRequestsAreCountedNotFatal) {
  std::atomic<int> count{0};
  ScriptedServer server(bench_script(count, 3));
  const auto result = test::run_command(test::nibble_bin() + " bench-serve --endpoint " + server.endpoint() +
                                        " --concurrency 2 --requests 6 --json --timeout-ms 5000");
  EXPECT_EQ(result.exit_code, 1) << result.output;
  const auto out = parse_json(result);
  EXPECT_EQ(out["ok"], 4);
  EXPECT_EQ(out["failed"], 2);
  EXPECT_EQ(out["failures"]["overloaded"], 2);
}

}  // namespace
}  // namespace nibble::cluster
