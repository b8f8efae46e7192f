// `nibble openai`: the OpenAI-compatible HTTP server (cluster/openai_server) in front of a running
// `nibble serve`. Stops on SIGINT or SIGTERM, after the requests it is serving.
#include <pthread.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>

#include "cluster/cli/commands.hpp"
#include "cluster/cli/model_session.hpp"
#include "cluster/openai_server.hpp"
#include "model/llama_checkpoint.hpp"

namespace nibble::cli {

Runner add_openai(CLI::App& app) {
  auto options = std::make_shared<cluster::OpenAiServerOptions>();
  app.add_option("--endpoint,-e", options->coordinator, "The coordinator's address (server.listen)")
      ->capture_default_str();
  app.add_option("--host", options->host, "Address to listen on")->capture_default_str();
  app.add_option("--port", options->port, "Port to listen on (0: any free one)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  app.add_option("--model-name,--served-model-name", options->api.model_name,
                 "The model's name in /v1/models and in requests' \"model\"")
      ->capture_default_str();
  app.add_option("--threads", options->threads, "HTTP requests served at once")
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--chat-max-tokens", options->api.default_chat_max_tokens,
                 "max_tokens of a chat request that gives none")
      ->check(CLI::Range(1u, 1u << 30))
      ->capture_default_str();
  app.add_option("--timeout-ms", options->timeout_ms, "Longest wait for the coordinator within one request")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option(
         "--api-key", options->api_key,
         "Requests to /v1/* must carry \"Authorization: Bearer KEY\" (default: $NIBBLE_API_KEY; none: open)")
      ->envname("NIBBLE_API_KEY");
  auto tokenizer_path = std::make_shared<std::string>();
  app.add_option("--tokenizer", *tokenizer_path,
                 "The served model (GGUF file or Hugging Face directory): logprobs name tokens by their text "
                 "instead of token_id:N");

  return [options, tokenizer_path]() {
    std::shared_ptr<const model::Tokenizer> tokenizer;
    if (!tokenizer_path->empty()) {
      try {
        tokenizer = open_tokenizer(*model::LlamaCheckpoint::open(*tokenizer_path));
        if (tokenizer == nullptr) throw std::runtime_error(*tokenizer_path + " has no tokenizer");
      } catch (const std::exception& e) {
        std::fprintf(stderr, "nibble openai: error: --tokenizer: %s\n", e.what());
        return 1;
      }
      options->api.token_text = logprob_token_text(tokenizer);
      options->api.tokenizer = tokenizer;
    }
    // SIGINT / SIGTERM go to one thread that stops the server; every other thread blocks them.
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGINT);
    sigaddset(&stop_signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

    cluster::OpenAiServer server(*options);
    int port = 0;
    try {
      port = server.bind();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "nibble openai: error: %s\n", e.what());
      return 1;
    }
    std::fprintf(stderr, "nibble openai: listening on http://%s:%d (model '%s', coordinator %s)\n",
                 options->host.c_str(), port, options->api.model_name.c_str(), options->coordinator.c_str());
    std::atomic<bool> signalled{false};
    std::thread stopper([&server, &signalled, stop_signals] {
      int signal_number = 0;
      sigwait(&stop_signals, &signal_number);
      signalled = true;
      server.stop();
    });
    server.run();
    // run() ends without a signal only when listening failed: wake the stopper so it can be joined.
    if (!signalled) pthread_kill(stopper.native_handle(), SIGTERM);
    stopper.join();
    std::fprintf(stderr, "nibble openai: stopped\n");
    return 0;
  };
}

}  // namespace nibble::cli
