#include "model/chat_template.hpp"

#include <array>
#include <cctype>
#include <utility>

namespace nibble::model {
namespace {

constexpr std::array<std::pair<const char*, ChatFormat>, 14> kNames = {{
    {"chatml", ChatFormat::chatml},
    {"llama2", ChatFormat::llama2},
    {"llama2-sys", ChatFormat::llama2_sys},
    {"llama2-sys-bos", ChatFormat::llama2_sys_bos},
    {"llama2-sys-strip", ChatFormat::llama2_sys_strip},
    {"llama3", ChatFormat::llama3},
    {"mistral-v1", ChatFormat::mistral_v1},
    {"mistral-v3", ChatFormat::mistral_v3},
    {"mistral-v3-tekken", ChatFormat::mistral_v3_tekken},
    {"mistral-v7", ChatFormat::mistral_v7},
    {"mistral-v7-tekken", ChatFormat::mistral_v7_tekken},
    {"phi3", ChatFormat::phi3},
    {"zephyr", ChatFormat::zephyr},
    {"gemma", ChatFormat::gemma},
}};

// Leading and trailing ASCII whitespace removed (as the templates' strip / trim filters).
std::string trim(std::string_view s) {
  size_t begin = 0, end = s.size();
  while (begin < end && std::isspace(static_cast<unsigned char>(s[begin]))) ++begin;
  while (end > begin && std::isspace(static_cast<unsigned char>(s[end - 1]))) --end;
  return std::string(s.substr(begin, end - begin));
}

}  // namespace

std::optional<ChatFormat> chat_format_by_name(std::string_view name) {
  for (const auto& [n, format] : kNames) {
    if (name == n) return format;
  }
  return std::nullopt;
}

const char* chat_format_name(ChatFormat format) {
  for (const auto& [n, f] : kNames) {
    if (f == format) return n;
  }
  return "?";
}

std::string chat_format_names() {
  std::string out;
  for (const auto& [n, f] : kNames) out += (out.empty() ? "" : ", ") + std::string(n);
  return out;
}

std::optional<ChatFormat> detect_chat_format(std::string_view t) {
  if (const auto named = chat_format_by_name(t)) return named;
  const auto has = [t](std::string_view marker) { return t.find(marker) != std::string_view::npos; };
  // llama.cpp's checks in its order; a format it has and Nibble does not is nullopt, so a later check
  // never claims a template llama.cpp would have given to an earlier one.
  if (has("<|im_start|>")) {
    if (has("<|im_sep|>") || has("<end_of_utterance>")) return std::nullopt;  // phi4, smolvlm
    return ChatFormat::chatml;
  }
  if (t.rfind("mistral", 0) == 0 || has("[INST]")) {
    if (has("[SYSTEM_PROMPT]")) return ChatFormat::mistral_v7;
    if (has("' [INST] ' + system_message") || has("[AVAILABLE_TOOLS]")) {
      if (has(" [INST]")) return ChatFormat::mistral_v1;
      if (has("\"[INST]\"")) return ChatFormat::mistral_v3_tekken;
      return ChatFormat::mistral_v3;
    }
    if (has("content.strip()")) return ChatFormat::llama2_sys_strip;
    if (has("bos_token + '[INST]")) return ChatFormat::llama2_sys_bos;
    return has("<<SYS>>") ? ChatFormat::llama2_sys : ChatFormat::llama2;
  }
  if (has("<|assistant|>") && has("<|end|>")) return ChatFormat::phi3;
  if (has("[gMASK]<sop>")) return std::nullopt;                      // chatglm4
  if (has("<|assistant|>") && has("<|user|>")) return std::nullopt;  // falcon3, glmedge, exaone
  if (has("<|{{ item['role'] }}|>") && has("<|begin_of_image|>")) return std::nullopt;  // glmedge
  if (has("<|user|>") && has("<|endoftext|>")) return ChatFormat::zephyr;
  if (has("bos_token + message['role']")) return std::nullopt;  // monarch
  if (has("<start_of_turn>")) return ChatFormat::gemma;
  if (has("'\\n\\nAssistant: ' + eos_token") || has("GPT4 Correct ") ||
      (has("USER: ") && has("ASSISTANT: ")) || (has("### Instruction:") && has("<|EOT|>")) ||
      (has("<|START_OF_TURN_TOKEN|>") && has("<|USER_TOKEN|>")))
    return std::nullopt;  // orion, openchat, vicuna, deepseek, command-r
  if (has("<|start_header_id|>") && has("<|end_header_id|>")) return ChatFormat::llama3;
  return std::nullopt;
}

std::string format_chat(ChatFormat format, std::span<const ChatMessage> messages, bool add_assistant) {
  std::string out;
  switch (format) {
    case ChatFormat::chatml:
      for (const ChatMessage& m : messages)
        out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
      if (add_assistant) out += "<|im_start|>assistant\n";
      break;
    case ChatFormat::mistral_v7:
    case ChatFormat::mistral_v7_tekken: {
      const std::string space = format == ChatFormat::mistral_v7 ? " " : "";
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += "[SYSTEM_PROMPT]" + space + m.content + "[/SYSTEM_PROMPT]";
        } else if (m.role == "user") {
          out += "[INST]" + space + m.content + "[/INST]";
        } else {
          out += space + m.content + "</s>";
        }
      }
      break;
    }
    case ChatFormat::mistral_v1:
    case ChatFormat::mistral_v3:
    case ChatFormat::mistral_v3_tekken: {
      const std::string before = format == ChatFormat::mistral_v1 ? " " : "";
      const std::string after = format == ChatFormat::mistral_v3_tekken ? "" : " ";
      bool in_turn = false;
      for (const ChatMessage& m : messages) {
        if (!in_turn) {
          out += before + "[INST]" + after;
          in_turn = true;
        }
        if (m.role == "system") {
          out += m.content + "\n\n";
        } else if (m.role == "user") {
          out += m.content + before + "[/INST]";
        } else {
          out += after + (format == ChatFormat::mistral_v3 ? trim(m.content) : m.content) + "</s>";
          in_turn = false;
        }
      }
      break;
    }
    case ChatFormat::llama2:
    case ChatFormat::llama2_sys:
    case ChatFormat::llama2_sys_bos:
    case ChatFormat::llama2_sys_strip: {
      // The first turn's "[INST] " is written up front (BOS comes from the tokenizer); the system message
      // goes into the first turn, marked with <<SYS>> where the variant has it.
      bool in_turn = true;
      out += "[INST] ";
      for (const ChatMessage& m : messages) {
        const std::string content = format == ChatFormat::llama2_sys_strip ? trim(m.content) : m.content;
        if (!in_turn) {
          in_turn = true;
          out += format == ChatFormat::llama2_sys_bos ? "<s>[INST] " : "[INST] ";
        }
        if (m.role == "system") {
          out += format == ChatFormat::llama2 ? content + "\n" : "<<SYS>>\n" + content + "\n<</SYS>>\n\n";
        } else if (m.role == "user") {
          out += content + " [/INST]";
        } else {
          out += content + "</s>";
          in_turn = false;
        }
      }
      break;
    }
    case ChatFormat::llama3:
      for (const ChatMessage& m : messages)
        out += "<|start_header_id|>" + m.role + "<|end_header_id|>\n\n" + trim(m.content) + "<|eot_id|>";
      if (add_assistant) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      break;
    case ChatFormat::phi3:
      for (const ChatMessage& m : messages) out += "<|" + m.role + "|>\n" + m.content + "<|end|>\n";
      if (add_assistant) out += "<|assistant|>\n";
      break;
    case ChatFormat::zephyr:
      for (const ChatMessage& m : messages) out += "<|" + m.role + "|>\n" + m.content + "<|endoftext|>\n";
      if (add_assistant) out += "<|assistant|>\n";
      break;
    case ChatFormat::gemma: {
      // No system turn: the system messages go before the next user message.
      std::string system;
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          system += trim(m.content);
          continue;
        }
        const std::string role = m.role == "assistant" ? "model" : m.role;
        out += "<start_of_turn>" + role + "\n";
        if (!system.empty() && role != "model") {
          out += system + "\n\n";
          system.clear();
        }
        out += trim(m.content) + "<end_of_turn>\n";
      }
      if (add_assistant) out += "<start_of_turn>model\n";
      break;
    }
  }
  return out;
}

}  // namespace nibble::model
