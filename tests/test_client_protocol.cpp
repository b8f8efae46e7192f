// The client protocol: round trips through real capnp encoding, hostile frames (garbage, oversized,
// crafted pointers), semantic validation, and one request/reply over real ZeroMQ sockets.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <zmq.hpp>
#include <zmq_addon.hpp>

#include "cluster/protocol/client_protocol.hpp"

namespace nibble::protocol {
namespace {

GenerateRequest full_generate() {
  GenerateRequest request;
  request.request_id = "req-42";
  request.prompt = std::vector<int32_t>{1, 15043, 3186, 0};
  request.sampling = SamplingParams{0.7f, 40, 0.95f, 0.05f, 1.1f, uint64_t{0xDEADBEEFCAFEull}};
  request.sampling.presence_penalty = 0.5f;
  request.sampling.frequency_penalty = -1.25f;
  request.sampling.logit_bias = {{15043, -100.0f}, {7, 2.5f}, {0, 100.0f}};
  request.max_tokens = 128;
  request.stop = {"\n\n", "</s>", ""};
  request.stream = true;
  request.logprobs = 5;
  request.parse_special = true;
  request.ignore_eos = true;
  request.prompt_logprobs = 2;
  request.response_format = ResponseFormat::json_object;
  request.min_tokens = 3;
  request.stop_token_ids = {2, 7};
  return request;
}

ClientRequestMsg round_trip(const ClientRequestMsg& message) {
  return decode_client_request(encode(message));
}
ServerResponseMsg round_trip(const ServerResponseMsg& message) {
  return decode_server_response(encode(message));
}

// Decodes and returns the ProtocolError's code; fails the test when decoding succeeds.
template <class Decode>
ProtocolError expect_error(Decode&& decode) {
  try {
    decode();
  } catch (const ProtocolError& e) {
    return e;
  }
  ADD_FAILURE() << "decoding succeeded, expected a ProtocolError";
  return ProtocolError(ErrorCode::internal, "none");
}

ProtocolError client_error(std::span<const uint8_t> frame, const DecodeLimits& limits = {}) {
  return expect_error([&] { decode_client_request(frame, limits); });
}

// Little-endian 64-bit word access into a flat-array frame.
uint64_t word_at(const std::vector<uint8_t>& frame, size_t index) {
  uint64_t word = 0;
  std::memcpy(&word, frame.data() + 8 * index, 8);
  return word;
}
void set_word(std::vector<uint8_t>& frame, size_t index, uint64_t word) {
  std::memcpy(frame.data() + 8 * index, &word, 8);
}
std::vector<uint8_t> frame_of(std::initializer_list<uint64_t> words) {
  std::vector<uint8_t> frame(8 * words.size());
  size_t i = 0;
  for (uint64_t w : words) set_word(frame, i++, w);
  return frame;
}
// Segment table of a one-segment message: (segment count - 1, segment size in words) as two u32s.
uint64_t segment_table(uint32_t segment_words) { return uint64_t{segment_words} << 32; }
// capnp pointer encodings (see the encoding spec): offset is in words from the end of the pointer.
uint64_t struct_pointer(int32_t offset, uint16_t data_words, uint16_t pointers) {
  return (uint64_t{static_cast<uint32_t>(offset) << 2}) | (uint64_t{data_words} << 32) |
         (uint64_t{pointers} << 48);
}
uint64_t list_pointer(int32_t offset, unsigned element_size, uint32_t count) {
  return (uint64_t{static_cast<uint32_t>(offset) << 2} | 1) | (uint64_t{element_size} << 32) |
         (uint64_t{count} << 35);
}
constexpr unsigned kByteElements = 2, kFourByteElements = 4;

// ---------------------------------------------------------------- round trips

TEST(ClientProtocol, RoundTripsEveryRequestKind) {
  GenerateRequest tokens_prompt = full_generate();
  GenerateRequest text_prompt = full_generate();
  text_prompt.prompt = std::string("Once upon a time");
  text_prompt.sampling.seed.reset();
  text_prompt.stream = false;
  const std::vector<ClientRequestMsg> messages = {
      tokens_prompt,
      text_prompt,
      CancelRequest{"req-42"},
      HealthRequest{},
      StatsRequest{},
      ShutdownRequest{},
      LoadAdapterRequest{"req-7", "sql", "/models/sql.gguf", 0.5f},
      UnloadAdapterRequest{"req-8", "sql"}};
  for (const auto& message : messages) {
    EXPECT_EQ(round_trip(message), message) << "variant index " << message.index();
  }
  GenerateRequest chat = full_generate();
  chat.prompt = std::vector<ChatMessage>{{"system", "Be brief."}, {"user", "Hello"}, {"assistant", ""}};
  EXPECT_EQ(round_trip(chat), ClientRequestMsg{chat});
  chat.adapter = "sql-lora";  // a LoRA adapter by name
  EXPECT_EQ(round_trip(chat), ClientRequestMsg{chat});
  // Function calling: tools, each tool choice, an assistant's calls and a tool's result.
  chat.response_format = ResponseFormat::text;
  chat.prompt = std::vector<ChatMessage>{
      {"user", "Weather?"},
      {"assistant", "", {{"call_1", "get_weather", R"({"city": "Oslo"})"}, {"call_2", "now", "{}"}}},
      {"tool", "snow"}};
  chat.tools = R"([{"type": "function", "function": {"name": "get_weather"}}])";
  for (const ToolChoice choice :
       {ToolChoice::auto_, ToolChoice::none, ToolChoice::required, ToolChoice::function}) {
    chat.tool_choice = choice;
    chat.tool_choice_function = choice == ToolChoice::function ? "get_weather" : "";
    EXPECT_EQ(round_trip(chat), ClientRequestMsg{chat}) << static_cast<int>(choice);
  }
}

TEST(ClientProtocol, RoundTripsEveryResponseKind) {
  const std::vector<ServerResponseMsg> messages = {
      Delta{"req-42", {42, 7}, " world"},
      Delta{"req-42", {42}, " x", {TokenLogprob{-0.25f, {{42, -0.25f}, {7, -1.5f}}}}},
      Delta{"req-42",
            {},
            "",
            {},
            {1, 15043, 3186},
            {TokenLogprob{-7.5f, {{2, -1.0f}}}, TokenLogprob{-3.0f, {}}}},
      Final{"req-42",
            FinishReason::stop,
            4,
            17,
            "Hello world",
            {1, 2, 3},
            Timings{1.5, 20.25, 300.125},
            {1, 15043, 3186, 0},
            12,
            9,
            3,
            {TokenLogprob{-0.5f, {}}, TokenLogprob{-2.0f, {{2, -0.125f}}}, TokenLogprob{-0.75f, {}}},
            {TokenLogprob{-9.0f, {}}, TokenLogprob{-4.0f, {}}, TokenLogprob{-0.0625f, {}}}},
      Final{"r", FinishReason::cancelled, 1, 0, "", {}, Timings{}, {}},
      Final{"r",
            FinishReason::tool_calls,
            1,
            9,
            "Looking.",
            {},
            Timings{},
            {},
            0,
            0,
            0,
            {},
            {},
            {{"call_1", "get_weather", R"({"city": "Oslo"})"}, {"call_2", "now", "{}"}}},
      Error{"req-42", ErrorCode::prompt_too_long, "prompt of 9000 tokens exceeds the context of 4096"},
      Error{"", ErrorCode::shutting_down, "bye"},
      Health{true, 4, "all workers up"},
      Stats{1, 2, 3, 4, 5, 6, 7},
      Stats{1, 2, 3, 4, 5, 6, 7, 8, 9, 1000, 640, 12},
      Stats{1, 2, 3, 4, 5, 6, 7, 8, 9, 1000, 640, 12, {"sql", "chat"}},
      Adapters{"req-7", {"sql", "chat"}},
      Adapters{"req-8", {}},
      Error{"req-8", ErrorCode::not_found, "name: the LoRA adapter 'x' is not loaded"},
  };
  for (const auto& message : messages) {
    EXPECT_EQ(round_trip(message), message) << "variant index " << message.index();
  }
}

TEST(ClientProtocol, MissingSamplingReadsAsDefaults) {
  // A minimal client sends only id, prompt and maxTokens; the schema defaults must be valid.
  GenerateRequest request;
  request.request_id = "x";
  request.prompt = std::string("hi");
  auto decoded = std::get<GenerateRequest>(round_trip(request));
  EXPECT_EQ(decoded.sampling, SamplingParams{});
  EXPECT_EQ(decoded.max_tokens, 256u);
}

// ---------------------------------------------------------------- hostile frames

TEST(ClientProtocol, RejectsEmptyAndShortFrames) {
  EXPECT_EQ(client_error({}).code, ErrorCode::malformed_message);
  std::vector<uint8_t> seven(7, 0);
  EXPECT_EQ(client_error(seven).code, ErrorCode::malformed_message);
  auto valid = encode(ClientRequestMsg{HealthRequest{}});
  valid.pop_back();
  EXPECT_EQ(client_error(valid).code, ErrorCode::malformed_message);
}

TEST(ClientProtocol, RandomGarbageNeverCrashes) {
  std::mt19937 rng(1234);
  const auto valid = encode(ClientRequestMsg{full_generate()});
  int errors = 0;
  for (int i = 0; i < 1000; ++i) {
    std::vector<uint8_t> frame;
    if (i % 2 == 0) {
      // Pure noise; every fourth one a multiple of 8 bytes so capnp gets to read it.
      size_t length = std::uniform_int_distribution<size_t>(0, 512)(rng);
      if (i % 4 == 0) length &= ~size_t{7};
      frame.resize(length);
      for (auto& byte : frame) byte = static_cast<uint8_t>(rng());
    } else {
      // A valid frame with a few bytes flipped: gets past the segment table into the pointers.
      frame = valid;
      for (int flips = 0; flips < 4; ++flips) {
        frame[std::uniform_int_distribution<size_t>(0, frame.size() - 1)(rng)] ^=
            static_cast<uint8_t>(1 + rng() % 255);
      }
    }
    try {
      decode_client_request(frame);
      decode_server_response(frame);
    } catch (const ProtocolError&) {
      ++errors;
    }  // any other exception type escapes and fails the test
  }
  EXPECT_GT(errors, 900);
}

TEST(ClientProtocol, RejectsOversizedFrameBeforeReading) {
  GenerateRequest request = full_generate();
  request.prompt = std::string(size_t{1} << 20, 'a');  // 1 MiB of text: over the default limit
  auto frame = encode(ClientRequestMsg{request});
  EXPECT_EQ(client_error(frame).code, ErrorCode::message_too_large);
  // A small limit applies to small frames too; the content is never looked at.
  std::vector<uint8_t> junk(72, 0xFF);
  EXPECT_EQ(client_error(junk, DecodeLimits{64}).code, ErrorCode::message_too_large);
}

TEST(ClientProtocol, RejectsListClaimingHugeSize) {
  GenerateRequest request = full_generate();
  request.prompt = std::vector<int32_t>{5, 6, 7};
  auto frame = encode(ClientRequestMsg{request});
  // The tokens list pointer: locate by its (element size, count) half, then claim 2^29-1 elements.
  size_t at = 0;
  for (size_t i = 0; i < frame.size() / 8; ++i) {
    uint64_t w = word_at(frame, i);
    if ((w & 3) == 1 && (w >> 32) == ((3u << 3) | kFourByteElements)) at = i;
  }
  ASSERT_NE(at, 0u);
  set_word(frame, at,
           (word_at(frame, at) & 0xFFFFFFFFu) | (uint64_t{(1u << 29) - 1} << 35) |
               (uint64_t{kFourByteElements} << 32));
  auto error = client_error(frame);
  EXPECT_EQ(error.code, ErrorCode::malformed_message) << error.what();
}

TEST(ClientProtocol, RejectsPointerLoop) {
  // One segment: root pointer -> ClientRequest{generate} whose generate pointer points back at the
  // ClientRequest itself, so GenerateRequest.requestId would be that same struct pointer.
  auto frame = frame_of({
      segment_table(3), struct_pointer(0, 1, 1),
      0,                         // discriminant: generate
      struct_pointer(-2, 1, 1),  // back to word 1 of the segment
  });
  auto error = client_error(frame);
  EXPECT_EQ(error.code, ErrorCode::malformed_message) << error.what();
  EXPECT_NE(std::string(error.what()).find("text"), std::string::npos) << error.what();
  // The same frame with a null generate pointer is fine: the failure above is the loop.
  set_word(frame, 3, 0);
  EXPECT_EQ(client_error(frame).code, ErrorCode::bad_request);  // empty requestId
}

TEST(ClientProtocol, TraversalLimitStopsAmplification) {
  // 64 stop strings that all point at one 2000-byte blob: each read is charged against the
  // traversal limit (~2x the frame), so ~64x amplification must fail before validation runs.
  GenerateRequest request = full_generate();
  request.stop.assign(kMaxStopStrings, "b");
  request.stop[0] = std::string(2000, 'A');
  auto frame = encode(ClientRequestMsg{request});
  size_t first = 0;
  for (size_t i = 0; i < frame.size() / 8; ++i) {
    uint64_t w = word_at(frame, i);
    if ((w & 3) == 1 && (w >> 32) == ((2001u << 3) | kByteElements)) first = i;
  }
  ASSERT_NE(first, 0u);
  const int64_t blob = static_cast<int64_t>(first) + 1 + (static_cast<int32_t>(word_at(frame, first)) >> 2);
  for (size_t i = 1; i < kMaxStopStrings; ++i) {
    const size_t at = first + i;
    set_word(frame, at,
             list_pointer(static_cast<int32_t>(blob - static_cast<int64_t>(at) - 1), kByteElements, 2001));
  }
  auto error = client_error(frame);
  EXPECT_EQ(error.code, ErrorCode::malformed_message) << error.what();
  EXPECT_NE(std::string(error.what()).find("traversal"), std::string::npos) << error.what();
}

TEST(ClientProtocol, UnknownUnionMemberIsUnknownRequestType) {
  // A newer client's request kind (discriminant 9) that this build does not know.
  auto frame = frame_of({segment_table(2), struct_pointer(0, 1, 0), 9});
  auto error = client_error(frame);
  EXPECT_EQ(error.code, ErrorCode::unknown_request_type) << error.what();
  auto response = expect_error([&] { decode_server_response(frame); });
  EXPECT_EQ(response.code, ErrorCode::unknown_request_type) << response.what();
}

TEST(ClientProtocol, RejectsTrailingBytes) {
  auto frame = encode(ClientRequestMsg{HealthRequest{}});
  frame.resize(frame.size() + 8, 0);
  EXPECT_EQ(client_error(frame).code, ErrorCode::malformed_message);
}

TEST(ClientProtocol, DecodesUnalignedFrame) {
  const GenerateRequest request = full_generate();
  const auto frame = encode(ClientRequestMsg{request});
  std::vector<uint8_t> buffer = {0};  // one leading byte shifts the frame off word alignment
  buffer.insert(buffer.end(), frame.begin(), frame.end());
  std::span<const uint8_t> unaligned(buffer.data() + 1, frame.size());
  ASSERT_NE(reinterpret_cast<uintptr_t>(unaligned.data()) % 8, 0u);
  EXPECT_EQ(decode_client_request(unaligned), ClientRequestMsg{request});
}

// ---------------------------------------------------------------- semantic validation

TEST(ClientProtocol, SemanticViolationsNameTheField) {
  struct Case {
    const char* field;
    void (*mutate)(GenerateRequest&);
  };
  const Case cases[] = {
      {"requestId", [](GenerateRequest& r) { r.request_id.clear(); }},
      {"requestId", [](GenerateRequest& r) { r.request_id.assign(kMaxRequestIdBytes + 1, 'x'); }},
      {"prompt", [](GenerateRequest& r) { r.prompt = std::string(); }},
      {"prompt", [](GenerateRequest& r) { r.prompt = std::vector<int32_t>(); }},
      {"prompt.tokens[1]",
       [](GenerateRequest& r) {
         r.prompt = std::vector<int32_t>{1, -5};
       }},
      {"sampling.temperature", [](GenerateRequest& r) { r.sampling.temperature = -0.1f; }},
      {"sampling.temperature",
       [](GenerateRequest& r) { r.sampling.temperature = std::numeric_limits<float>::infinity(); }},
      {"sampling.temperature",
       [](GenerateRequest& r) { r.sampling.temperature = std::numeric_limits<float>::quiet_NaN(); }},
      {"sampling.topK", [](GenerateRequest& r) { r.sampling.top_k = -1; }},
      {"sampling.topP", [](GenerateRequest& r) { r.sampling.top_p = 0.0f; }},
      {"sampling.topP", [](GenerateRequest& r) { r.sampling.top_p = 1.01f; }},
      {"sampling.topP",
       [](GenerateRequest& r) { r.sampling.top_p = std::numeric_limits<float>::quiet_NaN(); }},
      {"sampling.minP", [](GenerateRequest& r) { r.sampling.min_p = -0.01f; }},
      {"sampling.minP", [](GenerateRequest& r) { r.sampling.min_p = 1.0f; }},
      {"sampling.repetitionPenalty", [](GenerateRequest& r) { r.sampling.repetition_penalty = 0.0f; }},
      {"sampling.presencePenalty", [](GenerateRequest& r) { r.sampling.presence_penalty = 2.5f; }},
      {"sampling.presencePenalty",
       [](GenerateRequest& r) { r.sampling.presence_penalty = std::numeric_limits<float>::quiet_NaN(); }},
      {"sampling.frequencyPenalty", [](GenerateRequest& r) { r.sampling.frequency_penalty = -2.01f; }},
      {"sampling.logitBias[1]", [](GenerateRequest& r) { r.sampling.logit_bias[1].token = -3; }},
      {"sampling.logitBias[2]", [](GenerateRequest& r) { r.sampling.logit_bias[2].bias = 100.5f; }},
      {"sampling.logitBias[2]",
       [](GenerateRequest& r) { r.sampling.logit_bias[2].bias = std::numeric_limits<float>::infinity(); }},
      {"sampling.logitBias[2]", [](GenerateRequest& r) { r.sampling.logit_bias[2].token = 15043; }},  // twice
      {"sampling.logitBias",
       [](GenerateRequest& r) {
         r.sampling.logit_bias.clear();
         for (int32_t t = 0; t <= static_cast<int32_t>(kMaxLogitBias); ++t)
           r.sampling.logit_bias.push_back({t, 1.0f});
       }},
      {"maxTokens",
       [](GenerateRequest& r) {
         r.max_tokens = 0;
         r.prompt_logprobs = -1;
       }},
      {"jsonSchema", [](GenerateRequest& r) { r.json_schema = R"({"type": "object"})"; }},  // not asked for
      {"jsonSchema", [](GenerateRequest& r) { r.response_format = ResponseFormat::json_schema; }},  // none
      {"jsonSchema",
       [](GenerateRequest& r) {
         r.response_format = ResponseFormat::json_schema;
         r.json_schema.assign(kMaxJsonSchemaBytes + 1, ' ');
       }},
      {"minTokens", [](GenerateRequest& r) { r.min_tokens = r.max_tokens + 1; }},
      {"stopTokenIds[1]",
       [](GenerateRequest& r) {
         r.stop_token_ids = {5, -1};
       }},
      {"stopTokenIds[2]",
       [](GenerateRequest& r) {
         r.stop_token_ids = {5, 6, 5};
       }},
      {"stopTokenIds", [](GenerateRequest& r) { r.stop_token_ids.assign(kMaxStopTokenIds + 1, 1); }},
      {"promptLogprobs", [](GenerateRequest& r) { r.prompt_logprobs = kMaxLogprobs + 1; }},
      {"promptLogprobs", [](GenerateRequest& r) { r.prompt_logprobs = -2; }},
      {"promptLogprobs", [](GenerateRequest& r) { r.prompt_logprobs = 1000; }},  // beyond the wire's byte
      {"logprobs", [](GenerateRequest& r) { r.logprobs = kMaxLogprobs + 1; }},
      {"prompt.messages", [](GenerateRequest& r) { r.prompt = std::vector<ChatMessage>{}; }},
      {"prompt.messages[1].role",
       [](GenerateRequest& r) {
         r.prompt = std::vector<ChatMessage>{{"user", "a"}, {"", "b"}};
       }},
      {"prompt.messages[0].role",
       [](GenerateRequest& r) {
         r.prompt = std::vector<ChatMessage>{{std::string(kMaxChatRoleBytes + 1, 'r'), "a"}};
       }},
      {"prompt.messages",
       [](GenerateRequest& r) {
         r.prompt = std::vector<ChatMessage>(kMaxChatMessages + 1, {"user", "x"});
       }},
      {"tools", [](GenerateRequest& r) { r.tools = "[]"; }},  // with a prompt of tokens
      {"tools",
       [](GenerateRequest& r) {
         r.prompt = std::vector<ChatMessage>{{"user", "a"}};
         r.tools.assign(kMaxToolsBytes + 1, ' ');
       }},
      {"toolChoice",
       [](GenerateRequest& r) {
         r.prompt = std::vector<ChatMessage>{{"user", "a"}};
         r.tool_choice = ToolChoice::required;  // and no tools
       }},
      {"toolChoice",
       [](GenerateRequest& r) {
         r.prompt = std::vector<ChatMessage>{{"user", "a"}};
         r.tools = "[]";
         r.tool_choice = ToolChoice::function;  // and no name
       }},
      {"toolChoice",
       [](GenerateRequest& r) {
         r.prompt = std::vector<ChatMessage>{{"user", "a"}};
         r.tools = "[]";
         r.tool_choice = ToolChoice::required;
         r.response_format = ResponseFormat::json_object;  // a required call is the format itself
       }},
      {"prompt.messages[1].toolCalls",
       [](GenerateRequest& r) {
         r.prompt = std::vector<ChatMessage>{
             {"user", "a"}, {"assistant", "", std::vector<ToolCall>(kMaxToolCalls + 1, {"c", "f", "{}"})}};
       }},
      {"logprobs", [](GenerateRequest& r) { r.logprobs = 1000; }},  // more than the wire's byte holds
      {"stop", [](GenerateRequest& r) { r.stop.assign(kMaxStopStrings + 1, "x"); }},
      {"stop[2]", [](GenerateRequest& r) { r.stop[2].assign(kMaxStopStringBytes + 1, 'x'); }},
  };
  for (const Case& c : cases) {
    GenerateRequest request = full_generate();
    c.mutate(request);
    auto error = client_error(encode(ClientRequestMsg{request}));
    EXPECT_EQ(error.code, ErrorCode::bad_request) << c.field;
    EXPECT_EQ(std::string(error.what()).rfind(std::string(c.field) + ":", 0), 0u)
        << "expected the message to start with " << c.field << ", got: " << error.what();
  }
  // Boundary values are accepted.
  GenerateRequest edge = full_generate();
  edge.request_id.assign(kMaxRequestIdBytes, 'x');
  edge.sampling = SamplingParams{0.0f, 0, 1.0f, 0.0f, 1e-3f, std::nullopt};
  edge.max_tokens = 1;
  edge.min_tokens = 1;
  edge.prompt_logprobs = -1;
  EXPECT_EQ(round_trip(edge), ClientRequestMsg{edge});
  edge.response_format = ResponseFormat::json_schema;
  edge.json_schema = R"({"type": "object", "properties": {"a": {"type": "integer"}}})";
  EXPECT_EQ(round_trip(edge), ClientRequestMsg{edge});
  edge.response_format = ResponseFormat::text;
  edge.json_schema.clear();
  edge.max_tokens = 0;  // scoring the prompt alone
  edge.min_tokens = 0;
  edge.prompt_logprobs = kMaxLogprobs;
  edge.stop.assign(kMaxStopStrings, std::string(kMaxStopStringBytes, 's'));
  EXPECT_EQ(round_trip(edge), ClientRequestMsg{edge});
  // A response format this build does not know (a newer client's) is refused by name.
  GenerateRequest future = full_generate();
  future.response_format = static_cast<ResponseFormat>(7);
  const auto unknown_format = client_error(encode(ClientRequestMsg{future}));
  EXPECT_EQ(unknown_format.code, ErrorCode::bad_request);
  EXPECT_EQ(std::string(unknown_format.what()).rfind("responseFormat:", 0), 0u) << unknown_format.what();
  auto cancel = client_error(encode(ClientRequestMsg{CancelRequest{""}}));
  EXPECT_EQ(cancel.code, ErrorCode::bad_request);
  // Adapter loads and unloads: a name, a path and a finite scale.
  const std::pair<ClientRequestMsg, const char*> adapter_cases[] = {
      {LoadAdapterRequest{"r", "", "/a.gguf"}, "name:"},
      {LoadAdapterRequest{"r", std::string(kMaxAdapterNameBytes + 1, 'n'), "/a.gguf"}, "name:"},
      {LoadAdapterRequest{"r", "a", ""}, "path:"},
      {LoadAdapterRequest{"r", "a", std::string(kMaxAdapterPathBytes + 1, 'p')}, "path:"},
      {LoadAdapterRequest{"r", "a", "/a.gguf", std::numeric_limits<float>::infinity()}, "scale:"},
      {LoadAdapterRequest{"", "a", "/a.gguf"}, "requestId:"},
      {UnloadAdapterRequest{"r", ""}, "name:"},
  };
  for (const auto& [message, field] : adapter_cases) {
    const ProtocolError e = client_error(encode(message));
    EXPECT_EQ(e.code, ErrorCode::bad_request) << field;
    EXPECT_EQ(std::string(e.what()).rfind(field, 0), 0u) << e.what();
  }
}

// ---------------------------------------------------------------- over ZeroMQ

TEST(ClientProtocol, RequestAndReplyOverZeroMq) {
  zmq::context_t context;
  zmq::socket_t router(context, zmq::socket_type::router);
  zmq::socket_t dealer(context, zmq::socket_type::dealer);
  for (auto* socket : {&router, &dealer}) {
    socket->set(zmq::sockopt::linger, 0);
    socket->set(zmq::sockopt::rcvtimeo, 5000);  // a hang fails the test instead of blocking it
  }
  router.bind("tcp://127.0.0.1:*");  // ephemeral port: tests may run in parallel
  const std::string endpoint = router.get(zmq::sockopt::last_endpoint);
  dealer.connect(endpoint);

  const GenerateRequest request = full_generate();
  const auto request_frame = encode(ClientRequestMsg{request});
  ASSERT_TRUE(dealer.send(zmq::buffer(request_frame), zmq::send_flags::none));

  // ROUTER sees [client identity, payload].
  std::vector<zmq::message_t> parts;
  ASSERT_TRUE(zmq::recv_multipart(router, std::back_inserter(parts)));
  ASSERT_EQ(parts.size(), 2u);
  auto received = decode_client_request({parts[1].data<uint8_t>(), parts[1].size()});
  ASSERT_EQ(received, ClientRequestMsg{request});

  const ServerResponseMsg reply =
      Final{request.request_id, FinishReason::eos, 4, 2, "Hi!", {13, 14}, Timings{0.5, 12.0, 8.0}, {1, 9, 8}};
  const auto reply_frame = encode(reply);
  ASSERT_TRUE(router.send(parts[0], zmq::send_flags::sndmore));
  ASSERT_TRUE(router.send(zmq::buffer(reply_frame), zmq::send_flags::none));

  zmq::message_t answer;
  ASSERT_TRUE(dealer.recv(answer, zmq::recv_flags::none));
  EXPECT_EQ(decode_server_response({answer.data<uint8_t>(), answer.size()}), reply);
}

}  // namespace
}  // namespace nibble::protocol
