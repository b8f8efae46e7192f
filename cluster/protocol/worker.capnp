# Nibble control plane between the coordinator and its workers: one WorkerStep per step, sent to
# every worker (so all ranks run the same batches and issue the same collectives in the same
# order), and one StepResult per step from the sampling worker (tensor rank 0 of the last pipeline
# stage) back to the coordinator. One message per ZeroMQ frame, capnp flat-array framing.
# Same evolution rules as nibble.capnp: append fields, never renumber.
@0xf567efdc51beb0b5;

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("nibble::protocol::wire");
using Nibble = import "nibble.capnp";

struct SequenceSampling {
  # Sampler settings of a sequence, sent once, in the first step that contains it.
  seqId @0 :UInt64;
  temperature @1 :Float32;
  topK @2 :Int32;
  topP @3 :Float32;
  minP @4 :Float32;
  repetitionPenalty @5 :Float32;
  repeatLastN @6 :Int32;
  seed @7 :UInt64;
  logprobs @8 :UInt8;                  # 0: none; else each sampled token's log-probability and this
                                       # many most likely tokens'
  presencePenalty @9 :Float32;
  frequencyPenalty @10 :Float32;
  logitBias @11 :List(Nibble.TokenBias);
  promptLogprobs @12 :Int8 = -1;       # -1: none; else the top tokens to report with each prompt
                                       # token's log-probability (the rows PlanEntry.promptTargets name)
  responseFormat @13 :Nibble.ResponseFormat;  # jsonObject: the sampling rank masks what cannot continue one
  jsonSchema @14 :Text;                # with responseFormat jsonSchema: the schema (checked by the coordinator)
  minTokens @15 :UInt32;               # the sampling rank masks end-of-generation and stop tokens before this
  stopTokenIds @16 :List(Int32);       # many generated tokens
  grammar @17 :Text;                   # with responseFormat grammar: the GBNF grammar (checked by the coordinator)
}

struct PlanEntry {
  seqId @0 :UInt64;
  tableRow @1 :Int32;                  # row of WorkerStep.blockTables
  startPos @2 :Int32;                  # position of tokens[0] in the sequence
  tokens @3 :List(Int32);
  sample @4 :Bool;                     # sample the token after the last one
  nDraft @5 :Int32;                    # the last nDraft tokens are draft proposals to verify
  cachedPrefix @6 :List(Int32);        # a sequence's first entry after a cached prefix: the tokens at
                                       # positions 0 .. startPos - 1, whose K/V are already in its blocks
  promptTargets @7 :List(Int32);       # prompt logprobs: the prompt tokens the entry's first rows predict
                                       # (row i: the token at startPos + i + 1); their logits are computed
                                       # and each target's log-probability goes back (StepResult.prompts)
  adapter @8 :Int32;                   # 0: the base model; i: the config's LoRA adapter i (lora_adapters[i - 1])
}

struct WorkerStep {
  stepId @0 :UInt64;
  shutdown @1 :Bool;                   # stop the worker loop (no entries)
  newSequences @2 :List(SequenceSampling);
  released @3 :List(UInt64);           # sequences that ended: drop their sampler state
  entries @4 :List(PlanEntry);
  blockTables @5 :List(Int32);         # [entries, maxBlocksPerSeq], -1 padded
  maxBlocksPerSeq @6 :UInt32;
  adapterChanges @7 :List(AdapterChange);  # done first, in order, before any entry (a step with only
                                       # these, stepId 0, runs no batch and gets no StepResult)
}

struct AdapterChange {
  # A LoRA adapter loaded into a slot while the job runs (path non-empty), or a slot emptied (path
  # empty). Every worker answers a load with an AdapterReport; an unload goes unanswered.
  slot @0 :Int32;                      # PlanEntry.adapter's index, >= 1
  path @1 :Text;                       # GGUF adapter or PEFT directory, on the worker's host
  scale @2 :Float32 = 1.0;
}

struct AdapterReport {
  slot @0 :Int32;
  rank @1 :Int32;                      # the worker's world rank
  error @2 :Text;                      # empty: loaded
}

struct SampledToken {
  seqId @0 :UInt64;
  token @1 :Int32;                     # the token sampled after the accepted drafts
  acceptedDrafts @2 :List(Int32);      # speculative: the verified draft tokens before `token`
  proposed @3 :Int32;                  # speculative: drafts the step verified
  draft @4 :List(Int32);               # speculative: the draft's proposals to verify next
  logprobs @5 :List(Nibble.TokenLogprob);  # with SequenceSampling.logprobs: the accepted drafts', then
                                       # the token's
}

struct PromptLogprobs {
  seqId @0 :UInt64;
  startPos @1 :Int32;                  # the entry's: logprobs[i] is of the prompt token at startPos + i + 1
  logprobs @2 :List(Nibble.TokenLogprob);
}

struct StepResult {
  stepId @0 :UInt64;
  sampled @1 :List(SampledToken);
  prompts @2 :List(PromptLogprobs);    # one per entry with promptTargets, in entry order
  adapterReports @3 :List(AdapterReport);  # stepId 0: a worker's answers to a step's adapter loads
                                       # (every worker sends them, the sampling worker too)
}

# Between the sampling worker and a draft on a rank of its own (`draft.placement: own_rank`): one
# DraftRequest per step that wants proposals, answered by one DraftReply (ZeroMQ REQ/REP).
struct DraftSequence {
  sampling @0 :SequenceSampling;       # the request's settings (sampling.seqId names the sequence)
  keep @1 :UInt32;                     # tokens of this sequence's previous request that still hold
  tokens @2 :List(Int32);              # the sequence's tokens after those (prompt and accepted tokens)
  k @3 :Int32;                         # proposals wanted
}

struct DraftRequest {
  shutdown @0 :Bool;                   # stop the draft rank (no sequences)
  released @1 :List(UInt64);           # sequences that ended: drop their draft state
  sequences @2 :List(DraftSequence);
}

struct DraftProposal {
  seqId @0 :UInt64;
  tokens @1 :List(Int32);
  probs @2 :List(Float32);             # [tokens, nVocab] q of each proposal; empty at temperature 0
}

struct DraftReply {
  proposals @0 :List(DraftProposal);
  error @1 :Text;                      # non-empty: the draft rank failed (and is stopping)
}
