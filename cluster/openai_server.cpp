#include "cluster/openai_server.hpp"

#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "cluster/client.hpp"

namespace nibble::cluster {

using nlohmann::json;
using openai::ApiError;
using openai::ApiRequest;
using openai::Endpoint;

struct OpenAiServer::Impl {
  explicit Impl(OpenAiServerOptions o) : options(std::move(o)), started(unix_time()) {
    // The adapters served now are the coordinator's to say (loaded at start-up or since): asked when a
    // request names a model other than the base one, and by /v1/models.
    if (!options.api.adapters) options.api.adapters = [this] { return served_adapters(); };
  }

  OpenAiServerOptions options;
  int64_t started;
  httplib::Server http;
  std::mutex clients_mutex;
  std::vector<std::unique_ptr<Client>> idle_clients;  // one coordinator connection per request at a time
  std::set<Client*> leased_clients;                   // in use: interrupted when the server stops
  bool stopping = false;
  std::mutex answers_mutex;
  std::map<std::pair<std::string, int>, uint64_t> answers;  // (path, status) -> count, for /metrics
  openai::RequestLatencies latencies;                       // answered choices' (answers_mutex)

  static int64_t unix_time() {
    return std::chrono::duration_cast<std::chrono::seconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }

  // A coordinator connection for one request, back to the pool when the lease ends. A connection
  // whose request timed out is not reused for long: late replies to it are skipped by request id.
  struct Lease {
    Impl* impl;
    std::unique_ptr<Client> client;
    ~Lease() {
      std::lock_guard lock(impl->clients_mutex);
      impl->leased_clients.erase(client.get());
      if (!impl->stopping) impl->idle_clients.push_back(std::move(client));
    }
    Client& operator*() { return *client; }
  };
  Lease lease() {
    std::unique_ptr<Client> client;
    {
      std::lock_guard lock(clients_mutex);
      if (!idle_clients.empty()) {
        client = std::move(idle_clients.back());
        idle_clients.pop_back();
      }
    }
    if (!client) {
      ClientOptions client_options;
      client_options.timeout_ms = options.timeout_ms;
      client = std::make_unique<Client>(options.coordinator, client_options);
    }
    std::lock_guard lock(clients_mutex);
    if (stopping) client->interrupt();  // a request that slipped in fails at once
    leased_clients.insert(client.get());
    return Lease{this, std::move(client)};
  }

  static void send_json(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(openai::dump(body), "application/json");
  }
  static void send_error(httplib::Response& res, const ApiError& error) {
    send_json(res, error.status, openai::error_body(error));
  }
  static ApiError client_error(const ClientError& e) {
    // ClientError's what() prefixes the code's name, which the error object carries on its own.
    std::string message = e.what();
    if (e.code) {
      const std::string prefix = std::string(protocol::to_string(*e.code)) + ": ";
      if (message.rfind(prefix, 0) == 0) message.erase(0, prefix.size());
    }
    return openai::from_protocol(e.code, message);
  }

  void health(httplib::Response& res) {
    try {
      Lease client = lease();
      const protocol::Health h = (*client).health();
      send_json(res, h.ok ? 200 : 503,
                {{"status", h.ok ? "ok" : "unavailable"}, {"workers", h.workers}, {"detail", h.detail}});
    } catch (const ClientError& e) {
      send_error(res, client_error(e));
    }
  }

  void metrics(httplib::Response& res) {
    try {
      Lease client = lease();
      const protocol::Stats stats = (*client).stats();
      std::vector<std::pair<std::pair<std::string, int>, uint64_t>> counts;
      openai::RequestLatencies seen;
      {
        std::lock_guard lock(answers_mutex);
        counts.assign(answers.begin(), answers.end());
        seen = latencies;
      }
      res.status = 200;
      res.set_content(openai::prometheus_metrics(stats, counts, seen), "text/plain; version=0.0.4");
    } catch (const ClientError& e) {
      send_error(res, client_error(e));
    }
  }

  std::vector<std::string> served_adapters() {
    try {
      Lease client = lease();
      return (*client).stats().adapters;
    } catch (const ClientError& e) {
      throw client_error(e);
    }
  }

  void models(httplib::Response& res) {
    json data = json::array({{{"id", options.api.model_name},
                              {"object", "model"},
                              {"created", started},
                              {"owned_by", "nibble"}}});
    std::vector<std::string> adapters;
    try {
      adapters = options.api.adapters();
    } catch (const ApiError&) {
      // Without the coordinator the base model is still what this server answers for.
    }
    // LoRA adapters as vLLM lists them: their own ids, with the base model as parent.
    for (const std::string& adapter : adapters) {
      data.push_back({{"id", adapter},
                      {"object", "model"},
                      {"created", started},
                      {"owned_by", "nibble"},
                      {"parent", options.api.model_name}});
    }
    send_json(res, 200, {{"object", "list"}, {"data", data}});
  }

  // POST /v1/load_lora_adapter and /v1/unload_lora_adapter: vLLM's plain-text answers.
  void change_adapters(const httplib::Request& req, httplib::Response& res, bool load) {
    try {
      std::string done;
      if (load) {
        const protocol::LoadAdapterRequest r = openai::parse_load_adapter(req.body);
        Lease client = lease();
        (*client).load_adapter(r.name, r.path, r.scale);
        done = "Success: LoRA adapter '" + r.name + "' added successfully.";
      } else {
        const protocol::UnloadAdapterRequest r = openai::parse_unload_adapter(req.body);
        Lease client = lease();
        (*client).unload_adapter(r.name);
        done = "Success: LoRA adapter '" + r.name + "' removed successfully.";
      }
      res.status = 200;
      res.set_content(done, "text/plain");
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const ClientError& e) {
      send_error(res, client_error(e));
    }
  }

  // The model an answer names: the adapter the request asked for, else the base model.
  const std::string& answering_model(const ApiRequest& api) const {
    return api.request.adapter.empty() ? options.api.model_name : api.request.adapter;
  }

  void generate(Endpoint endpoint, const httplib::Request& req, httplib::Response& res) {
    ApiRequest api;
    try {
      api = openai::parse_request(endpoint, req.body, options.api);
    } catch (const ApiError& e) {
      send_error(res, e);
      return;
    }
    static std::atomic<uint64_t> counter{0};
    const std::string base =
        "oai-" + std::to_string(started) + "-" + std::to_string(counter.fetch_add(1) + 1);
    auto choices = std::make_shared<std::vector<protocol::GenerateRequest>>(openai::choice_requests(api));
    for (size_t i = 0; i < choices->size(); ++i) {
      (*choices)[i].request_id = choices->size() == 1 ? base : base + "-" + std::to_string(i);
      // Several choices stream from the coordinator even for an answer sent whole: a Delta is where a
      // choice learns that another failed and cancels itself.
      if (choices->size() > 1) (*choices)[i].stream = true;
      // The coordinator's checks, so that a stream never starts on a request it would refuse.
      try {
        protocol::validate((*choices)[i]);
      } catch (const protocol::ProtocolError& e) {
        send_error(res, openai::from_protocol(e.code, e.what()));
        return;
      }
    }
    const std::string id = (endpoint == Endpoint::completions ? "cmpl-" : "chatcmpl-") + base;
    const int64_t created = unix_time();
    if (!api.request.stream) {
      std::vector<protocol::Final> finals(choices->size());
      std::optional<ApiError> failure;
      run_choices(*choices,
                  [&](size_t i, const protocol::Delta*, const protocol::Final* final, const ApiError* error) {
                    if (final != nullptr) finals[i] = *final;
                    if (error != nullptr && !failure) failure = *error;
                    return !failure;  // one choice's failure cancels the others
                  });
      if (failure) {
        send_error(res, *failure);
      } else {
        send_json(res, 200, openai::response(api, finals, id, created, answering_model(api)));
      }
      return;
    }
    // Server-sent events: the status is sent before the coordinator has answered, so a refusal found
    // there (an over-long prompt, overload) comes as an {"error": ...} event, as vLLM's do.
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream", [this, api, choices, id, created](size_t, httplib::DataSink& sink) {
          const std::string name = answering_model(api);
          bool gone = false;  // the HTTP client went away: its requests are cancelled
          const auto event = [&](const std::string& data) {
            const std::string text = "data: " + data + "\n\n";
            if (!gone && !sink.write(text.data(), text.size())) gone = true;
            return !gone;
          };
          if (api.endpoint == Endpoint::chat_completions) {
            for (size_t i = 0; i < choices->size(); ++i)
              event(openai::dump(openai::role_chunk(api, i, id, created, name)));
          }
          std::vector<protocol::Final> finals(choices->size());
          std::vector<bool> echoed(choices->size(), false);
          bool failed = false;
          run_choices(*choices, [&](size_t i, const protocol::Delta* delta, const protocol::Final* final,
                                    const ApiError* error) {
            // An echo comes first: with the first Delta (which brings the prompt's logprobs when asked
            // for), or with the Final when nothing was streamed before it.
            if (api.echo && !echoed[i] && (delta != nullptr || final != nullptr)) {
              echoed[i] = true;
              event(openai::dump(delta != nullptr
                                     ? openai::echo_chunk(api, i, delta->prompt_token_ids,
                                                          delta->prompt_logprobs, id, created, name)
                                     : openai::echo_chunk(api, i, final->prompt_token_ids,
                                                          final->prompt_logprobs, id, created, name)));
            }
            // A Delta with only the prompt's logprobs has no chunk of its own.
            if (delta != nullptr && (!delta->tokens.empty() || !delta->text.empty()))
              event(openai::dump(openai::delta_chunk(api, i, *delta, id, created, name)));
            if (final != nullptr) {
              finals[i] = *final;
              if (!final->tool_calls.empty())
                event(openai::dump(openai::tool_calls_chunk(api, i, *final, id, created, name)));
              event(openai::dump(openai::finish_chunk(api, i, *final, id, created, name)));
            }
            if (error != nullptr && !failed) {
              failed = true;
              event(openai::dump(openai::error_body(*error)));
            }
            return !gone && !failed;
          });
          if (!failed && api.include_usage)
            event(openai::dump(openai::usage_chunk(api, finals, id, created, name)));
          event("[DONE]");
          sink.done();
          return true;
        });
  }

  // What a choice's coordinator connection reports: a Delta, its Final, or its failure. Called on the
  // request's own thread, one report at a time; returning false cancels every choice still running.
  using ChoiceReport = std::function<bool(size_t index, const protocol::Delta* delta,
                                          const protocol::Final* final, const ApiError* error)>;

  // Runs every choice on a coordinator connection of its own (one thread each beyond the first) and
  // hands their reports to `report` in arrival order on this thread, so a stream is written from one
  // thread only. Returns once every choice has ended.
  void run_choices(const std::vector<protocol::GenerateRequest>& choices, const ChoiceReport& report) {
    struct Report {
      size_t index;
      std::optional<protocol::Delta> delta;
      std::optional<protocol::Final> final;
      std::optional<ApiError> error;
    };
    std::mutex mutex;
    std::condition_variable changed;
    std::deque<Report> reports;
    size_t running = choices.size();
    std::atomic<bool> cancel{false};
    const auto run_one = [&](size_t i) {
      const auto push = [&](Report r) {
        std::lock_guard lock(mutex);
        reports.push_back(std::move(r));
        changed.notify_one();
      };
      try {
        Lease client = lease();
        bool cancelled = false;
        const protocol::Final final = (*client).generate(choices[i], [&](const protocol::Delta& delta) {
          if (cancel && !cancelled) {
            cancelled = true;
            (*client).cancel(choices[i].request_id);
          }
          if (!cancelled) push({i, delta, std::nullopt, std::nullopt});
        });
        {
          std::lock_guard lock(answers_mutex);
          latencies.observe(final);
        }
        push({i, std::nullopt, final, std::nullopt});
      } catch (const ClientError& e) {
        push({i, std::nullopt, std::nullopt, client_error(e)});
      } catch (const std::exception& e) {
        push({i, std::nullopt, std::nullopt, ApiError(500, "server_error", "", "internal", e.what())});
      }
      std::lock_guard lock(mutex);
      --running;
      changed.notify_one();
    };
    std::vector<std::thread> threads;
    for (size_t i = 1; i < choices.size(); ++i) threads.emplace_back(run_one, i);
    std::thread first(run_one, 0);  // this thread reports while the choices run
    for (;;) {
      std::unique_lock lock(mutex);
      changed.wait(lock, [&] { return !reports.empty() || running == 0; });
      if (reports.empty()) break;
      Report r = std::move(reports.front());
      reports.pop_front();
      lock.unlock();
      // After a cancel, what is left is only drained: the choices end with errors nobody reads.
      if (cancel) continue;
      const bool keep_going = report(r.index, r.delta ? &*r.delta : nullptr, r.final ? &*r.final : nullptr,
                                     r.error ? &*r.error : nullptr);
      if (!keep_going) cancel = true;
    }
    first.join();
    for (std::thread& t : threads) t.join();
  }
};

OpenAiServer::OpenAiServer(OpenAiServerOptions options) : impl_(std::make_unique<Impl>(std::move(options))) {
  Impl& s = *impl_;
  const int threads = std::max(1, s.options.threads);
  s.http.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  s.http.set_payload_max_length(s.options.max_body_bytes);
  s.http.Get("/health", [&s](const httplib::Request&, httplib::Response& res) { s.health(res); });
  s.http.Get("/v1/models", [&s](const httplib::Request&, httplib::Response& res) { s.models(res); });
  s.http.Get("/metrics", [&s](const httplib::Request&, httplib::Response& res) { s.metrics(res); });
  // The tokenizer's endpoints: 501 without one.
  const auto with_tokenizer = [&s](httplib::Response& res, auto&& answer) {
    if (!s.options.api.tokenizer) {
      Impl::send_error(
          res, ApiError(501, "invalid_request_error", "", "no_tokenizer",
                        "this server has no tokenizer: start `nibble openai` with --tokenizer MODEL"));
      return;
    }
    try {
      Impl::send_json(res, 200, answer());
    } catch (const ApiError& e) {
      Impl::send_error(res, e);
    }
  };
  for (const auto& endpoint :
       {std::pair{"/tokenize", &openai::tokenize}, std::pair{"/detokenize", &openai::detokenize}}) {
    const auto answer = endpoint.second;  // a variable of its own: lambdas cannot capture structured bindings
    s.http.Post(endpoint.first,
                [&s, answer, with_tokenizer](const httplib::Request& req, httplib::Response& res) {
                  with_tokenizer(res, [&] { return answer(req.body, s.options.api); });
                });
  }
  s.http.Get("/tokenizer_info", [&s, with_tokenizer](const httplib::Request&, httplib::Response& res) {
    with_tokenizer(res, [&] { return openai::tokenizer_info(s.options.api); });
  });
  // Every answer of a known endpoint counted by status (unknown paths are not: a scan would grow the map).
  s.http.set_logger([&s](const httplib::Request& req, const httplib::Response& res) {
    static const std::set<std::string> kPaths = {
        "/health",   "/v1/models",  "/metrics",        "/v1/completions",       "/v1/chat/completions",
        "/tokenize", "/detokenize", "/tokenizer_info", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"};
    if (!kPaths.contains(req.path)) return;
    std::lock_guard lock(s.answers_mutex);
    ++s.answers[{req.path, res.status}];
  });
  s.http.Post("/v1/completions", [&s](const httplib::Request& req, httplib::Response& res) {
    s.generate(Endpoint::completions, req, res);
  });
  s.http.Post("/v1/chat/completions", [&s](const httplib::Request& req, httplib::Response& res) {
    s.generate(Endpoint::chat_completions, req, res);
  });
  s.http.Post("/v1/load_lora_adapter", [&s](const httplib::Request& req, httplib::Response& res) {
    s.change_adapters(req, res, /*load=*/true);
  });
  s.http.Post("/v1/unload_lora_adapter", [&s](const httplib::Request& req, httplib::Response& res) {
    s.change_adapters(req, res, /*load=*/false);
  });
  if (!s.options.api_key.empty()) {
    s.http.set_pre_routing_handler([&s](const httplib::Request& req, httplib::Response& res) {
      const bool guarded = req.path.rfind("/v1/", 0) == 0 || req.path == "/tokenize" ||
                           req.path == "/detokenize" || req.path == "/tokenizer_info";
      if (!guarded || req.get_header_value("Authorization") == "Bearer " + s.options.api_key)
        return httplib::Server::HandlerResponse::Unhandled;
      Impl::send_error(res, ApiError(401, "invalid_request_error", "", "invalid_api_key",
                                     "a missing or wrong API key (Authorization: Bearer KEY)"));
      return httplib::Server::HandlerResponse::Handled;
    });
  }
  // httplib's own refusals (no such path, a body over the limit, a wrong method) in OpenAI's form; a
  // handler's error body stays as it is.
  s.http.set_error_handler(
      httplib::Server::HandlerWithResponse([](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
        const std::string what = res.status == 404   ? "no such endpoint: " + req.method + " " + req.path
                                 : res.status == 413 ? "the body is over the size limit"
                                                     : "HTTP " + std::to_string(res.status);
        Impl::send_error(res, ApiError(res.status, "invalid_request_error", "", "", what));
        return httplib::Server::HandlerResponse::Handled;
      }));
  s.http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown failure";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    Impl::send_error(res, ApiError(500, "server_error", "", "internal", what));
  });
}

OpenAiServer::~OpenAiServer() = default;

int OpenAiServer::bind() {
  Impl& s = *impl_;
  const int port = s.options.port == 0
                       ? s.http.bind_to_any_port(s.options.host)
                       : (s.http.bind_to_port(s.options.host, s.options.port) ? s.options.port : -1);
  if (port < 0)
    throw std::runtime_error("cannot listen on " + s.options.host + ":" + std::to_string(s.options.port) +
                             " (in use, or not an address of this host)");
  return port;
}

void OpenAiServer::run() { impl_->http.listen_after_bind(); }

void OpenAiServer::stop() {
  Impl& s = *impl_;
  s.http.stop();
  // Requests still waiting on the coordinator (one that stops answers no more) end now, with a 503.
  std::lock_guard lock(s.clients_mutex);
  s.stopping = true;
  for (Client* client : s.leased_clients) client->interrupt();
}

}  // namespace nibble::cluster
