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

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" (other roles are written as given where the format does)
  std::string content;
  bool operator==(const ChatMessage&) const = default;
};

enum class ChatFormat {
  chatml,
  llama2,
  llama2_sys,
  llama2_sys_bos,
  llama2_sys_strip,
  llama3,
  mistral_v1,
  mistral_v3,
  mistral_v3_tekken,
  mistral_v7,
  mistral_v7_tekken,
  phi3,
  zephyr,
  gemma,
};

// llama.cpp's names: "chatml", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "llama3",
// "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken", "phi3", "zephyr",
// "gemma"; nullopt for any other.
std::optional<ChatFormat> chat_format_by_name(std::string_view name);
const char* chat_format_name(ChatFormat format);
// The names above, comma-separated (for error messages).
std::string chat_format_names();

// The format a chat template (tokenizer.chat_template's Jinja, or a name) stands for, by llama.cpp's
// rules (the markers it contains, checked in llama.cpp's order); nullopt for a template of a format not
// listed above (llama.cpp knows more) or of none.
std::optional<ChatFormat> detect_chat_format(std::string_view chat_template);

// The prompt for `messages`; add_assistant: end with the start of the assistant's turn (where the
// format has one).
std::string format_chat(ChatFormat format, std::span<const ChatMessage> messages, bool add_assistant);

}  // namespace nibble::model
