# Nibble client protocol: what clients send to the coordinator (ClientRequest) and what it sends
# back (ServerResponse), one message per ZeroMQ frame, serialized with capnp's flat-array framing.
#
# Evolution rules: never renumber, retype or remove a field; add new fields with the next free
# ordinal (Cap'n Proto requires ordinals to be contiguous, so "room" means appending). New union
# members are also appended; old readers see them as an unknown discriminant and answer
# unknownRequestType.
@0xa77233bb70e86b63;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("nibble::protocol::wire");

# ---------------------------------------------------------------- client -> coordinator

struct SamplingParams {
  # Defaults match the C++ side, so a client that omits `sampling` gets plain sampling.
  temperature @0 :Float32 = 1.0;       # 0 = greedy
  topK @1 :Int32 = 0;                  # 0 = off
  topP @2 :Float32 = 1.0;              # (0, 1]
  minP @3 :Float32 = 0.0;              # [0, 1)
  repetitionPenalty @4 :Float32 = 1.0; # > 0, 1 = off
  seed @5 :UInt64;
  hasSeed @6 :Bool;                    # false: the server picks a seed
  presencePenalty @7 :Float32 = 0.0;   # [-2, 2]: subtracted from tokens in the recent window (llama.cpp's)
  frequencyPenalty @8 :Float32 = 0.0;  # [-2, 2]: subtracted once per occurrence there
  logitBias @9 :List(TokenBias);       # added to those tokens' logits first; distinct tokens
}

enum ResponseFormat {
  text @0;                             # free text
  jsonObject @1;                       # a JSON object (OpenAI's response_format json_object): tokens that
                                       # cannot continue one are masked out; it ends when the object closes
  jsonSchema @2;                       # an instance of GenerateRequest.jsonSchema, likewise
  grammar @3;                          # a sentence of GenerateRequest.grammar (GBNF), likewise
}

struct TokenBias {
  token @0 :Int32;
  bias @1 :Float32;                    # [-100, 100]
}

struct ToolCall {
  id @0 :Text;                         # the coordinator's name for it ("call_..."); a conversation's as given
  name @1 :Text;                       # the function's
  arguments @2 :Text;                  # a JSON object's text
}

struct ChatMessage {
  role @0 :Text;                       # "system", "user", "assistant", "tool"
  content @1 :Text;
  toolCalls @2 :List(ToolCall);        # an assistant's calls
}

struct GenerateRequest {
  requestId @0 :Text;
  prompt :union {
    text @1 :Text;
    tokens @2 :List(Int32);
    messages @9 :List(ChatMessage);    # a conversation: the server formats it with the model's chat
                                       # template and tokenizes it with special tokens parsed
  }
  sampling @3 :SamplingParams;
  maxTokens @4 :UInt32 = 256;
  stop @5 :List(Text);
  stream @6 :Bool;                     # true: Delta messages before the Final
  logprobs @7 :UInt8;                  # 0: none; 1..20: each generated token's log-probability and
                                       # this many most likely tokens' (TokenLogprob)
  parseSpecial @8 :Bool;               # a text prompt's control tokens' texts become those tokens
  ignoreEos @10 :Bool;                 # generate past end-of-sequence tokens, up to maxTokens
  promptLogprobs @11 :Int8 = -1;       # -1: none; 0..20: each prompt token's log-probability after the
                                       # first (given the tokens before it) and this many most likely
                                       # tokens' there (vLLM's prompt_logprobs); then maxTokens may be 0
  responseFormat @12 :ResponseFormat;
  jsonSchema @13 :Text;                # with responseFormat jsonSchema: the JSON schema (worker/json_schema's
                                       # subset), at most 64 KiB
  minTokens @14 :UInt32;               # vLLM's: no end-of-generation or stop token before this many tokens
  stopTokenIds @15 :List(Int32);       # vLLM's: a sampled one ends the request (kept in the output); at most 64
  tools @16 :Text;                     # with messages: the functions the model may call, a JSON array of
                                       # OpenAI tool objects (model/tool_calls), at most 256 KiB; empty: none
  toolChoice :union {                  # with tools: whether the answer may, must or must not be calls
    auto @17 :Void;                    # text or calls, as the model writes
    none @18 :Void;                    # text only (the tools are still in the prompt)
    required @19 :Void;                # one call to any of the tools
    function @20 :Text;                # one call to this one
  }
  grammar @21 :Text;                   # with responseFormat grammar: the GBNF grammar (llama.cpp's;
                                       # worker/gbnf_grammar), at most 64 KiB
  adapter @22 :Text;                   # the LoRA adapter to answer with, by its configured name
                                       # (lora_adapters); empty: the base model
}

struct CancelRequest {
  requestId @0 :Text;
}

struct LoadAdapterRequest {
  # Serve a LoRA adapter under a name from now on (vLLM's /v1/load_lora_adapter); only where the job
  # allows it (server.lora_updates). Answered by an AdapterList once every worker has loaded it, or
  # an Error naming what failed.
  requestId @0 :Text;
  name @1 :Text;                       # what GenerateRequest.adapter calls it
  path @2 :Text;                       # a GGUF adapter or PEFT directory, as the workers' hosts see it
  scale @3 :Float32 = 1.0;             # llama.cpp's --lora-scaled
}

struct UnloadAdapterRequest {
  # Stop serving an adapter (vLLM's /v1/unload_lora_adapter): later requests naming it are refused,
  # the running ones finish with it. Answered by an AdapterList.
  requestId @0 :Text;
  name @1 :Text;
}

struct ClientRequest {
  union {
    generate @0 :GenerateRequest;
    cancel @1 :CancelRequest;
    health @2 :Void;
    stats @3 :Void;
    shutdown @4 :Void;
    loadAdapter @5 :LoadAdapterRequest;
    unloadAdapter @6 :UnloadAdapterRequest;
  }
}

# ---------------------------------------------------------------- coordinator -> client

enum FinishReason {
  length @0;
  eos @1;
  stop @2;
  cancelled @3;
  toolCalls @4;                        # the answer is calls (Final.toolCalls)
}

enum ErrorCode {
  badRequest @0;
  malformedMessage @1;
  messageTooLarge @2;
  unknownRequestType @3;
  promptTooLong @4;
  overloaded @5;
  cancelled @6;
  workerFailed @7;
  shuttingDown @8;
  internal @9;
  notFound @10;                        # what the request names is not there (an adapter not served)
}

struct TopLogprob {
  token @0 :Int32;
  logprob @1 :Float32;
}

struct TokenLogprob {
  # A generated token's log-probability under the model (the log-softmax of its logits, before
  # temperature, penalties and filtering) and the most likely tokens' there, most likely first.
  logprob @0 :Float32;
  top @1 :List(TopLogprob);
}

struct Delta {
  requestId @0 :Text;
  tokens @1 :List(Int32);
  text @2 :Text;
  logprobs @3 :List(TokenLogprob);     # with GenerateRequest.logprobs: one per token
  promptTokenIds @4 :List(Int32);      # with GenerateRequest.promptLogprobs, in the first Delta only: the
  promptLogprobs @5 :List(TokenLogprob);  # prompt as the model saw it and its tokens' values (as Final's)
}

struct Timings {
  queueMs @0 :Float64;
  prefillMs @1 :Float64;
  decodeMs @2 :Float64;
}

struct Final {
  requestId @0 :Text;
  finishReason @1 :FinishReason;
  promptTokens @2 :UInt32;
  completionTokens @3 :UInt32;
  text @4 :Text;
  tokens @5 :List(Int32);
  timings @6 :Timings;
  promptTokenIds @7 :List(Int32);      # the prompt as the model saw it (BOS included, after tokenizing)
  draftProposed @8 :UInt64;            # speculative decoding: draft tokens verified
  draftAccepted @9 :UInt64;            # ... and accepted
  cachedPromptTokens @10 :UInt32;      # prompt tokens whose K/V came from the prefix cache
  logprobs @11 :List(TokenLogprob);    # with GenerateRequest.logprobs: one per token
  promptLogprobs @12 :List(TokenLogprob);  # with GenerateRequest.promptLogprobs: one per prompt token
                                       # after the first (promptTokenIds[1..])
  toolCalls @13 :List(ToolCall);       # with tools: the calls the answer made (text: what it said besides)
}

struct Error {
  requestId @0 :Text;                  # empty when the request could not be read
  code @1 :ErrorCode;
  message @2 :Text;
}

struct HealthResponse {
  ok @0 :Bool;
  workers @1 :UInt32;
  detail @2 :Text;
}

struct StatsResponse {
  queued @0 :UInt64;
  running @1 :UInt64;
  completed @2 :UInt64;
  failed @3 :UInt64;
  freeKvBlocks @4 :UInt64;
  totalKvBlocks @5 :UInt64;
  tokensGenerated @6 :UInt64;
  draftProposed @7 :UInt64;            # speculative decoding, all requests
  draftAccepted @8 :UInt64;
  promptTokens @9 :UInt64;             # prompts' tokens at their first step, all requests
  cachedPromptTokens @10 :UInt64;      # ... of which the prefix cache held the K/V
  cachedKvBlocks @11 :UInt64;          # cached prefix blocks no request holds (part of freeKvBlocks)
  adapters @12 :List(Text);            # the LoRA adapters served now, by name
}

struct AdapterList {
  # The answer to a load or unload: the LoRA adapters served after it, by name.
  requestId @0 :Text;
  names @1 :List(Text);
}

struct ServerResponse {
  union {
    delta @0 :Delta;
    final @1 :Final;
    error @2 :Error;
    health @3 :HealthResponse;
    stats @4 :StatsResponse;
    adapters @5 :AdapterList;
  }
}
