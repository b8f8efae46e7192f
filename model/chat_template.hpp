#pragma once
// Chat prompts: a conversation (role, content messages) formatted as a model's chat template writes it,
// for the formats llama.cpp knows without running Jinja (its llm_chat_apply_template), chosen by name or
// detected from a GGUF's tokenizer.chat_template as llama.cpp detects it. The formatted text holds
// special tokens' texts ("<|im_start|>", "<|eot_id|>", ...): tokenize it with parse_special.
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace nibble::model {

// A function call an assistant's turn made (OpenAI's tool_calls): arguments is a JSON object's text.
struct ToolCall {
  std::string id;
  std::string name;
  std::string arguments;
  bool operator==(const ToolCall&) const = default;
};

struct ChatMessage {
  std::string
      role;  // "system", "user", "assistant", "tool" (others are written as given where the format does)
  std::string content;
  // An assistant's calls (model/tool_calls writes them; format_chat's formats have no place for them).
  std::vector<ToolCall> tool_calls{};
  bool operator==(const ChatMessage&) const = default;
};

// Every format llama.cpp's llm_chat_apply_template writes, in its order.
enum class ChatFormat {
  chatml,
  llama2,
  llama2_sys,
  llama2_sys_bos,
  llama2_sys_strip,
  mistral_v1,
  mistral_v3,
  mistral_v3_tekken,
  mistral_v7,
  mistral_v7_tekken,
  phi3,
  phi4,
  falcon3,
  zephyr,
  monarch,
  gemma,
  orion,
  openchat,
  vicuna,
  vicuna_orca,
  deepseek,
  deepseek2,
  deepseek3,
  deepseek_ocr,
  command_r,
  llama3,
  chatglm3,
  chatglm4,
  glmedge,
  minicpm,
  exaone3,
  exaone4,
  exaone_moe,
  rwkv_world,
  granite,
  granite_4_0,
  granite_4_1,
  gigachat,
  megrez,
  yandex,
  bailing,
  bailing_think,
  bailing2,
  llama4,
  smolvlm,
  dots1,
  hunyuan_moe,
  gpt_oss,
  hunyuan_dense,
  hunyuan_vl,
  kimi_k2,
  seed_oss,
  grok2,
  pangu_embedded,
  solar_open,
};

// llama.cpp's names ("chatml", "llama2-sys", "mistral-v7-tekken", "deepseek3", "command-r", "granite-4.0",
// "gpt-oss", "seed_oss", ...; chat_format_names() lists them), and "dots1", the one format llama.cpp
// detects but has no name for; nullopt for any other.
std::optional<ChatFormat> chat_format_by_name(std::string_view name);
const char* chat_format_name(ChatFormat format);
// The names above, comma-separated (for error messages).
std::string chat_format_names();

// The format a chat template (tokenizer.chat_template's Jinja, or a name) stands for, by llama.cpp's
// rules (the markers it contains, checked in llama.cpp's order); nullopt for a template of none of them
// (a Jinja template of another format: Nibble, like llama.cpp's llm_chat_apply_template, runs no Jinja).
std::optional<ChatFormat> detect_chat_format(std::string_view chat_template);

// The prompt for `messages`; add_assistant: end with the start of the assistant's turn (where the
// format has one).
std::string format_chat(ChatFormat format, std::span<const ChatMessage> messages, bool add_assistant);

}  // namespace nibble::model
