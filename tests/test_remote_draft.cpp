// A draft on a rank of its own (`draft.placement: own_rank`): RemoteDraft talking to a DraftService
// over a real ZeroMQ REQ/REP pair on loopback TCP, with real Cap'n Proto messages, proposes exactly
// what the same draft proposes in-process (tokens and q), through rejections (the sequence rolls
// back), releases and sampled and greedy sequences; a bad request gets an error reply and a clear
// exception on both sides.
#include <gtest/gtest.h>

#include <thread>

#include "cluster/draft_service.hpp"
#include "cluster/remote_draft.hpp"
#include "model/random_model.hpp"
#include "speculative/local_draft.hpp"
#include "tests/support/test_support.hpp"

namespace nibble::cluster {
namespace {

class RemoteDraftTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = (tmp_.path() / "draft.gguf").string();
    model::write_random_llama(path_, model::llama_shape_by_name("tiny"), kernels::DType::Q4_0, 3);
    local_model_ = worker::LlamaModel::load(path_);
    remote_model_ = worker::LlamaModel::load(path_);
    rep_.bind("tcp://127.0.0.1:*");
    req_.connect(rep_.get(zmq::sockopt::last_endpoint));
  }

  test::TempDir tmp_;
  std::string path_;
  std::unique_ptr<worker::LlamaModel> local_model_, remote_model_;
  kernels::ThreadPool pool_{1}, service_pool_{1};
  zmq::context_t context_{1};
  zmq::socket_t rep_{context_, zmq::socket_type::rep};
  zmq::socket_t req_{context_, zmq::socket_type::req};
};

TEST_F(RemoteDraftTest, ProposesWhatTheLocalDraftProposes) {
  speculative::LocalDraft local(*local_model_, pool_, 64, 16);
  speculative::LocalDraft served(*remote_model_, service_pool_, 64, 16);
  DraftService service(served, rep_);
  std::thread server([&] { service.run(); });
  RemoteDraft remote(req_);

  worker::SamplingParams greedy, sampled;
  sampled.temperature = 0.8f;
  sampled.top_k = 50;
  sampled.seed = 42;
  greedy.seed = 1;
  std::vector<std::vector<int32_t>> tokens = {{1, 17, 300, 5}, {1, 9}, {1, 44, 45, 46, 47, 48}};
  const worker::SamplingParams* params[] = {&greedy, &sampled, &sampled};
  const int64_t n_vocab = local_model_->config().n_vocab;
  size_t total_probs = 0, rollbacks = 0;
  for (int step = 0; step < 12; ++step) {
    SCOPED_TRACE(step);
    std::vector<speculative::ProposalRequest> requests;
    for (size_t s = 0; s < tokens.size(); ++s) {
      if (tokens[s].empty()) continue;  // released
      requests.push_back({100 + s, tokens[s], params[s], 1 + static_cast<int>((step + s) % 4)});
    }
    const std::vector<speculative::Proposal> want = local.propose(requests);
    const std::vector<speculative::Proposal> got = remote.propose(requests);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(got[i].seq_id, want[i].seq_id);
      EXPECT_EQ(got[i].tokens, want[i].tokens);
      EXPECT_EQ(got[i].probs, want[i].probs);  // bit for bit: the same model and stream
      EXPECT_EQ(got[i].probs.size(), params[got[i].seq_id - 100]->temperature > 0
                                         ? got[i].tokens.size() * static_cast<size_t>(n_vocab)
                                         : 0u);
      total_probs += got[i].probs.size();
    }
    // The target accepts some proposals and replaces the next one: keep a prefix, add a token that
    // differs from the draft's, so the draft must roll back.
    for (size_t i = 0; i < want.size(); ++i) {
      std::vector<int32_t>& seq = tokens[want[i].seq_id - 100];
      const size_t accepted = (step + i) % (want[i].tokens.size() + 1);
      seq.insert(seq.end(), want[i].tokens.begin(),
                 want[i].tokens.begin() + static_cast<std::ptrdiff_t>(accepted));
      seq.push_back(accepted < want[i].tokens.size()
                        ? (want[i].tokens[accepted] + 1) % static_cast<int32_t>(n_vocab)
                        : 7);
      rollbacks += accepted < want[i].tokens.size();
    }
    if (step == 5) {  // a sequence ends: both sides forget it
      local.release(101);
      remote.release(101);
      tokens[1].clear();
    }
  }
  EXPECT_GT(total_probs, 0u);
  EXPECT_GT(rollbacks, 5u);
  remote.shutdown();
  server.join();
}

TEST_F(RemoteDraftTest, ABadRequestIsAnsweredWithAnErrorAndStopsTheService) {
  speculative::LocalDraft served(*remote_model_, service_pool_, 64, 16);
  DraftService service(served, rep_);
  std::string service_error;
  std::thread server([&] {
    try {
      service.run();
    } catch (const std::exception& e) {
      service_error = e.what();
    }
  });
  // Keeps 5 tokens of a sequence the service has never seen.
  protocol::DraftRequest request;
  protocol::SequenceSampling greedy_sampling;
  greedy_sampling.seq_id = 100;
  greedy_sampling.seed = 1;
  request.sequences = {{greedy_sampling, 5, {3}, 2}};
  const std::vector<uint8_t> bytes = protocol::encode(request);
  req_.send(zmq::buffer(bytes), zmq::send_flags::none);
  zmq::message_t frame;
  ASSERT_TRUE(req_.recv(frame, zmq::recv_flags::none));
  const protocol::DraftReply reply = protocol::decode_draft_reply(
      std::span<const uint8_t>(static_cast<const uint8_t*>(frame.data()), frame.size()));
  server.join();
  EXPECT_NE(reply.error.find("keeps 5 tokens of sequence 100"), std::string::npos) << reply.error;
  EXPECT_EQ(service_error, reply.error);
}

TEST_F(RemoteDraftTest, AnErrorReplyBecomesAnExceptionNamingTheDraftRank) {
  std::thread server([&] {
    zmq::message_t frame;
    (void)rep_.recv(frame, zmq::recv_flags::none);
    const std::vector<uint8_t> bytes = protocol::encode(protocol::DraftReply{{}, "draft cache corrupted"});
    rep_.send(zmq::buffer(bytes), zmq::send_flags::none);
  });
  RemoteDraft remote(req_);
  worker::SamplingParams greedy;
  const std::vector<int32_t> seq = {1, 2, 3};
  try {
    remote.propose({{100, seq, &greedy, 2}});
    ADD_FAILURE() << "an error reply was taken for proposals";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "draft rank: draft cache corrupted");
  }
  server.join();
}

}  // namespace
}  // namespace nibble::cluster
