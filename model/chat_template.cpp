#include "model/chat_template.hpp"

#include <array>
#include <cctype>
#include <utility>

namespace nibble::model {
namespace {

constexpr std::array<std::pair<const char*, ChatFormat>, 55> kNames = {{
    {"chatml", ChatFormat::chatml},
    {"llama2", ChatFormat::llama2},
    {"llama2-sys", ChatFormat::llama2_sys},
    {"llama2-sys-bos", ChatFormat::llama2_sys_bos},
    {"llama2-sys-strip", ChatFormat::llama2_sys_strip},
    {"mistral-v1", ChatFormat::mistral_v1},
    {"mistral-v3", ChatFormat::mistral_v3},
    {"mistral-v3-tekken", ChatFormat::mistral_v3_tekken},
    {"mistral-v7", ChatFormat::mistral_v7},
    {"mistral-v7-tekken", ChatFormat::mistral_v7_tekken},
    {"phi3", ChatFormat::phi3},
    {"phi4", ChatFormat::phi4},
    {"falcon3", ChatFormat::falcon3},
    {"zephyr", ChatFormat::zephyr},
    {"monarch", ChatFormat::monarch},
    {"gemma", ChatFormat::gemma},
    {"orion", ChatFormat::orion},
    {"openchat", ChatFormat::openchat},
    {"vicuna", ChatFormat::vicuna},
    {"vicuna-orca", ChatFormat::vicuna_orca},
    {"deepseek", ChatFormat::deepseek},
    {"deepseek2", ChatFormat::deepseek2},
    {"deepseek3", ChatFormat::deepseek3},
    {"deepseek-ocr", ChatFormat::deepseek_ocr},
    {"command-r", ChatFormat::command_r},
    {"llama3", ChatFormat::llama3},
    {"chatglm3", ChatFormat::chatglm3},
    {"chatglm4", ChatFormat::chatglm4},
    {"glmedge", ChatFormat::glmedge},
    {"minicpm", ChatFormat::minicpm},
    {"exaone3", ChatFormat::exaone3},
    {"exaone4", ChatFormat::exaone4},
    {"exaone-moe", ChatFormat::exaone_moe},
    {"rwkv-world", ChatFormat::rwkv_world},
    {"granite", ChatFormat::granite},
    {"granite-4.0", ChatFormat::granite_4_0},
    {"granite-4.1", ChatFormat::granite_4_1},
    {"gigachat", ChatFormat::gigachat},
    {"megrez", ChatFormat::megrez},
    {"yandex", ChatFormat::yandex},
    {"bailing", ChatFormat::bailing},
    {"bailing-think", ChatFormat::bailing_think},
    {"bailing2", ChatFormat::bailing2},
    {"llama4", ChatFormat::llama4},
    {"smolvlm", ChatFormat::smolvlm},
    {"dots1", ChatFormat::dots1},
    {"hunyuan-moe", ChatFormat::hunyuan_moe},
    {"gpt-oss", ChatFormat::gpt_oss},
    {"hunyuan-dense", ChatFormat::hunyuan_dense},
    {"hunyuan-vl", ChatFormat::hunyuan_vl},
    {"kimi-k2", ChatFormat::kimi_k2},
    {"seed_oss", ChatFormat::seed_oss},
    {"grok-2", ChatFormat::grok2},
    {"pangu-embedded", ChatFormat::pangu_embedded},
    {"solar-open", ChatFormat::solar_open},
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
  // llama.cpp's llm_chat_detect_template: its checks in its order (an earlier one wins).
  using F = ChatFormat;
  if (has("<|im_start|>")) {
    if (has("<|im_sep|>")) return F::phi4;
    return has("<end_of_utterance>") ? F::smolvlm : F::chatml;  // SmolVLM's <|im_start|> is its BOS
  }
  if (t.rfind("mistral", 0) == 0 || has("[INST]")) {
    if (has("[SYSTEM_PROMPT]")) return F::mistral_v7;
    if (has("' [INST] ' + system_message") || has("[AVAILABLE_TOOLS]")) {
      if (has(" [INST]")) return F::mistral_v1;
      if (has("\"[INST]\"")) return F::mistral_v3_tekken;
      return F::mistral_v3;
    }
    if (has("content.strip()")) return F::llama2_sys_strip;
    if (has("bos_token + '[INST]")) return F::llama2_sys_bos;
    return has("<<SYS>>") ? F::llama2_sys : F::llama2;
  }
  if (has("<|assistant|>") && has("<|end|>")) return F::phi3;
  if (has("[gMASK]<sop>")) return F::chatglm4;
  if (has("<|assistant|>") && has("<|user|>")) {
    if (has("<|tool_declare|>")) return F::exaone_moe;
    return has("</s>") ? F::falcon3 : F::glmedge;
  }
  if (has("<|{{ item['role'] }}|>") && has("<|begin_of_image|>")) return F::glmedge;
  if (has("<|user|>") && has("<|endoftext|>")) return F::zephyr;
  if (has("bos_token + message['role']")) return F::monarch;
  if (has("<start_of_turn>")) return F::gemma;
  if (has("'\\n\\nAssistant: ' + eos_token")) return F::orion;
  if (has("GPT4 Correct ")) return F::openchat;
  if (has("USER: ") && has("ASSISTANT: ")) return has("SYSTEM: ") ? F::vicuna_orca : F::vicuna;
  if (has("### Instruction:") && has("<|EOT|>")) return F::deepseek;
  if (has("<|START_OF_TURN_TOKEN|>") && has("<|USER_TOKEN|>")) return F::command_r;
  if (has("<|start_header_id|>") && has("<|end_header_id|>")) return F::llama3;
  if (has("[gMASK]sop")) return F::chatglm3;
  if (has("<用户>")) return F::minicpm;
  if (has("'Assistant: ' + message['content'] + eos_token")) return F::deepseek2;
  if (has("<｜Assistant｜>") && has("<｜User｜>") && has("<｜end▁of▁sentence｜>")) return F::deepseek3;
  if (has("[|system|]") && has("[|assistant|]") && has("[|endofturn|]"))
    return has("[|tool|]") ? F::exaone4 : F::exaone3;
  if (has("rwkv-world") || has("{{- 'User: ' + message['content']|trim + '\\n\\n' -}}")) return F::rwkv_world;
  if (has("<|start_of_role|>")) {
    if (has("<tool_call>") || has("<tools>"))
      return has("g4_default_system_message") ? F::granite_4_0 : F::granite_4_1;
    return F::granite;
  }
  if (has("message['role'] + additional_special_tokens[0] + message['content'] + "
          "additional_special_tokens[1]"))
    return F::gigachat;
  if (has("<|role_start|>")) return F::megrez;
  if (has(" Ассистент:")) return F::yandex;
  if (has("<role>ASSISTANT</role>") && has("'HUMAN'")) return F::bailing;
  if (has("<role>ASSISTANT</role>") && has("\"HUMAN\"") && has("<think>")) return F::bailing_think;
  if (has("<role>ASSISTANT</role>") && has("<role>HUMAN</role>") && has("<|role_end|>")) return F::bailing2;
  if (has("<|header_start|>") && has("<|header_end|>")) return F::llama4;
  if (has("<|endofuserprompt|>")) return F::dots1;
  if (has("<|extra_0|>") && has("<|extra_4|>")) return F::hunyuan_moe;
  if (has("<|start|>") && has("<|channel|>")) return F::gpt_oss;
  if (has("<｜hy_Assistant｜>") && has("<｜hy_begin▁of▁sentence｜>")) return F::hunyuan_vl;
  if (has("<｜hy_Assistant｜>") && has("<｜hy_place▁holder▁no▁3｜>")) return F::hunyuan_dense;
  if (has("<|im_assistant|>assistant<|im_middle|>")) return F::kimi_k2;
  if (has("<seed:bos>")) return F::seed_oss;
  if (has("'Assistant: '  + message['content'] + '<|separator|>")) return F::grok2;
  if (has("[unused9]系统：[unused10]")) return F::pangu_embedded;
  if (has("<|begin|>") && has("<|end|>") && has("<|content|>")) return F::solar_open;
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
    case ChatFormat::phi4:
      for (const ChatMessage& m : messages)
        out += "<|im_start|>" + m.role + "<|im_sep|>" + m.content + "<|im_end|>";
      if (add_assistant) out += "<|im_start|>assistant<|im_sep|>";
      break;
    case ChatFormat::falcon3:
      for (const ChatMessage& m : messages) out += "<|" + m.role + "|>\n" + m.content + "\n";
      if (add_assistant) out += "<|assistant|>\n";
      break;
    case ChatFormat::monarch:
      // BOS inside the history: every message but the first starts with "<s>".
      for (size_t i = 0; i < messages.size(); ++i)
        out += (i == 0 ? "" : "<s>") + messages[i].role + "\n" + messages[i].content + "</s>\n";
      if (add_assistant) out += "<s>assistant\n";
      break;
    case ChatFormat::orion: {
      // No system turn: the system messages go into the next user message.
      std::string system;
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          system += m.content;
        } else if (m.role == "user") {
          out += "Human: ";
          if (!system.empty()) out += std::exchange(system, "") + "\n\n";
          out += m.content + "\n\nAssistant: </s>";
        } else {
          out += m.content + "</s>";
        }
      }
      break;
    }
    case ChatFormat::openchat:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += m.content + "<|end_of_turn|>";
        } else {
          std::string role = m.role;
          if (!role.empty()) role[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(role[0])));
          out += "GPT4 Correct " + role + ": " + m.content + "<|end_of_turn|>";
        }
      }
      if (add_assistant) out += "GPT4 Correct Assistant:";
      break;
    case ChatFormat::vicuna:
    case ChatFormat::vicuna_orca:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += format == ChatFormat::vicuna_orca ? "SYSTEM: " + m.content + "\n" : m.content + "\n\n";
        } else if (m.role == "user") {
          out += "USER: " + m.content + "\n";
        } else if (m.role == "assistant") {
          out += "ASSISTANT: " + m.content + "</s>\n";
        }
      }
      if (add_assistant) out += "ASSISTANT:";
      break;
    case ChatFormat::deepseek:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += m.content;
        } else if (m.role == "user") {
          out += "### Instruction:\n" + m.content + "\n";
        } else if (m.role == "assistant") {
          out += "### Response:\n" + m.content + "\n<|EOT|>\n";
        }
      }
      if (add_assistant) out += "### Response:\n";
      break;
    case ChatFormat::deepseek2:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += m.content + "\n\n";
        } else if (m.role == "user") {
          out += "User: " + m.content + "\n\n";
        } else if (m.role == "assistant") {
          out += "Assistant: " + m.content + "<｜end▁of▁sentence｜>";
        }
      }
      if (add_assistant) out += "Assistant:";
      break;
    case ChatFormat::deepseek3:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += m.content + "\n\n";
        } else if (m.role == "user") {
          out += "<｜User｜>" + m.content;
        } else if (m.role == "assistant") {
          out += "<｜Assistant｜>" + m.content + "<｜end▁of▁sentence｜>";
        }
      }
      if (add_assistant) out += "<｜Assistant｜>";
      break;
    case ChatFormat::deepseek_ocr:
      for (const ChatMessage& m : messages) out += m.content;  // no template
      break;
    case ChatFormat::command_r:
      for (const ChatMessage& m : messages) {
        const char* token = m.role == "system"      ? "<|SYSTEM_TOKEN|>"
                            : m.role == "user"      ? "<|USER_TOKEN|>"
                            : m.role == "assistant" ? "<|CHATBOT_TOKEN|>"
                                                    : nullptr;
        if (token) out += "<|START_OF_TURN_TOKEN|>" + (token + trim(m.content)) + "<|END_OF_TURN_TOKEN|>";
      }
      if (add_assistant) out += "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>";
      break;
    case ChatFormat::chatglm3:
      out += "[gMASK]sop";
      for (const ChatMessage& m : messages) out += "<|" + m.role + "|>\n " + m.content;
      if (add_assistant) out += "<|assistant|>";
      break;
    case ChatFormat::chatglm4:
    case ChatFormat::glmedge:
      if (format == ChatFormat::chatglm4) out += "[gMASK]<sop>";
      for (const ChatMessage& m : messages) out += "<|" + m.role + "|>\n" + m.content;
      if (add_assistant) out += format == ChatFormat::chatglm4 ? "<|assistant|>\n" : "<|assistant|>";
      break;
    case ChatFormat::minicpm:
      for (const ChatMessage& m : messages)
        out += m.role == "user" ? "<用户>" + trim(m.content) + "<AI>" : trim(m.content);
      break;
    case ChatFormat::exaone3:
    case ChatFormat::exaone4:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += "[|system|]" + trim(m.content) + "[|endofturn|]\n";
        } else if (m.role == "user") {
          out += "[|user|]" + trim(m.content) + "\n";
        } else if (m.role == "assistant") {
          out += "[|assistant|]" + trim(m.content) + "[|endofturn|]\n";
        } else if (m.role == "tool" && format == ChatFormat::exaone4) {
          out += "[|tool|]" + trim(m.content) + "[|endofturn|]\n";
        }
      }
      if (add_assistant) out += "[|assistant|]";
      break;
    case ChatFormat::exaone_moe:
      for (const ChatMessage& m : messages) {
        if (m.role == "system" || m.role == "user" || m.role == "assistant" || m.role == "tool")
          out += "<|" + m.role + "|>\n" + trim(m.content) + "<|endofturn|>\n";
      }
      if (add_assistant) out += "<|assistant|>\n";
      break;
    case ChatFormat::rwkv_world:
      // The model's end of turn is "\n\n"; the assistant's header follows a last user message only.
      for (size_t i = 0; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if (m.role == "system") {
          out += "System: " + trim(m.content) + "\n\n";
        } else if (m.role == "user") {
          out += "User: " + trim(m.content) + "\n\n";
          if (i + 1 == messages.size()) out += "Assistant:";
        } else if (m.role == "assistant") {
          out += "Assistant: " + trim(m.content) + "\n\n";
        }
      }
      break;
    case ChatFormat::granite:
    case ChatFormat::granite_4_0:
    case ChatFormat::granite_4_1:
      for (const ChatMessage& m : messages) {
        if (m.role == "assistant_tool_call" && format != ChatFormat::granite) {
          out += "<|start_of_role|>assistant<|end_of_role|><|tool_call|>";
        } else {
          out += "<|start_of_role|>" + m.role + "<|end_of_role|>";
          if (m.role == "assistant_tool_call") out += "<|tool_call|>";
        }
        out += m.content + "<|end_of_text|>\n";
      }
      if (add_assistant) out += "<|start_of_role|>assistant<|end_of_role|>";
      break;
    case ChatFormat::gigachat: {
      const bool has_system = !messages.empty() && messages[0].role == "system";
      out += "<s>";
      if (has_system) out += messages[0].content + "<|message_sep|>";
      for (size_t i = has_system ? 1 : 0; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if (m.role == "user") {
          out += "user<|role_sep|>" + m.content +
                 "<|message_sep|>available functions<|role_sep|>[]<|message_sep|>";
        } else if (m.role == "assistant") {
          out += "assistant<|role_sep|>" + m.content + "<|message_sep|>";
        }
      }
      if (add_assistant) out += "assistant<|role_sep|>";
      break;
    }
    case ChatFormat::megrez:
      for (const ChatMessage& m : messages)
        out += "<|role_start|>" + m.role + "<|role_end|>" + m.content + "<|turn_end|>";
      if (add_assistant) out += "<|role_start|>assistant<|role_end|>";
      break;
    case ChatFormat::yandex:
      // The model's end of turn is "\n\n".
      for (const ChatMessage& m : messages) {
        if (m.role == "user") {
          out += " Пользователь: " + m.content + "\n\n";
        } else if (m.role == "assistant") {
          out += " Ассистент: " + m.content + "\n\n";
        }
      }
      if (add_assistant) out += " Ассистент:[SEP]";
      break;
    case ChatFormat::bailing:
    case ChatFormat::bailing_think:
    case ChatFormat::bailing2: {
      const std::string end_of_turn = format == ChatFormat::bailing2 ? "<|role_end|>" : "";
      if (format == ChatFormat::bailing2 && (messages.empty() || messages[0].role != "system"))
        out += "<role>SYSTEM</role>detailed thinking off<|role_end|>";
      for (const ChatMessage& m : messages) {
        std::string role = m.role == "user" ? "HUMAN" : m.role;
        for (char& c : role) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
        out += "<role>" + role + "</role>" + m.content + end_of_turn;
      }
      if (add_assistant)
        out +=
            format == ChatFormat::bailing_think ? "<role>ASSISTANT</role><think>" : "<role>ASSISTANT</role>";
      break;
    }
    case ChatFormat::llama4:
      for (const ChatMessage& m : messages)
        out += "<|header_start|>" + m.role + "<|header_end|>\n\n" + trim(m.content) + "<|eot|>";
      if (add_assistant) out += "<|header_start|>assistant<|header_end|>\n\n";
      break;
    case ChatFormat::smolvlm:
      out += "<|im_start|>";  // its BOS: the rest is not chatml
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += m.content + "\n\n";
        } else if (m.role == "user") {
          out += "User: " + m.content + "<end_of_utterance>\n";
        } else {
          out += "Assistant: " + m.content + "<end_of_utterance>\n";
        }
      }
      if (add_assistant) out += "Assistant:";
      break;
    case ChatFormat::dots1:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += "<|system|>" + m.content + "<|endofsystem|>";
        } else if (m.role == "user") {
          out += "<|userprompt|>" + m.content + "<|endofuserprompt|>";
        } else {
          out += "<|response|>" + m.content + "<|endofresponse|>";
        }
      }
      if (add_assistant) out += "<|response|>";
      break;
    case ChatFormat::hunyuan_moe:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += "<|startoftext|>" + m.content + "<|extra_4|>";
        } else if (m.role == "assistant") {
          out += m.content + "<|eos|>";
        } else {
          out += "<|startoftext|>" + m.content + "<|extra_0|>";
        }
      }
      break;
    case ChatFormat::gpt_oss:
      for (const ChatMessage& m : messages)
        out += "<|start|>" + m.role + "<|message|>" + m.content +
               (m.role == "assistant" ? "<|return|>" : "<|end|>");
      if (add_assistant) out += "<|start|>assistant";
      break;
    case ChatFormat::hunyuan_dense:
      for (size_t i = 0; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if (i == 0 && m.role == "system") out += m.content + "<｜hy_place▁holder▁no▁3｜>";
        if (m.role == "assistant") {
          out += "<｜hy_Assistant｜>" + m.content + "<｜hy_place▁holder▁no▁2｜>";
        } else if (m.role == "user") {
          out += "<｜hy_User｜>" + m.content + "<｜hy_Assistant｜>";
        }
      }
      break;
    case ChatFormat::hunyuan_vl:
      out += "<｜hy_begin▁of▁sentence｜>";
      for (size_t i = 0; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if (i == 0 && m.role == "system") {
          out += m.content + "<｜hy_place▁holder▁no▁3｜>";
        } else if (m.role == "user") {
          out += m.content + "<｜hy_User｜>";
        } else if (m.role == "assistant") {
          out += m.content + "<｜hy_Assistant｜>";
        }
      }
      break;
    case ChatFormat::kimi_k2:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += "<|im_system|>system<|im_middle|>";
        } else if (m.role == "user") {
          out += "<|im_user|>user<|im_middle|>";
        } else if (m.role == "assistant") {
          out += "<|im_assistant|>assistant<|im_middle|>";
        } else if (m.role == "tool") {
          out += "<|im_system|>tool<|im_middle|>";
        }
        out += m.content + "<|im_end|>";
      }
      if (add_assistant) out += "<|im_assistant|>assistant<|im_middle|>";
      break;
    case ChatFormat::seed_oss:
      for (const ChatMessage& m : messages)
        out += "<seed:bos>" + m.role + "\n" + (m.role == "assistant" ? trim(m.content) : m.content) +
               "<seed:eos>";
      if (add_assistant) out += "<seed:bos>assistant\n";
      break;
    case ChatFormat::grok2:
      for (const ChatMessage& m : messages) {
        if (m.role == "system") {
          out += "System: " + trim(m.content) + "<|separator|>\n\n";
        } else if (m.role == "user") {
          out += "Human: " + trim(m.content) + "<|separator|>\n\n";
        } else if (m.role == "assistant") {
          out += "Assistant: " + m.content + "<|separator|>\n\n";
        }
      }
      if (add_assistant) out += "Assistant:";
      break;
    case ChatFormat::pangu_embedded:
      for (size_t i = 0; i < messages.size(); ++i) {
        const ChatMessage& m = messages[i];
        if (i == 0 && m.role != "system") out += "[unused9]系统：[unused10]";
        const char* speaker = m.role == "system"      ? "系统："
                              : m.role == "user"      ? "用户："
                              : m.role == "assistant" ? "助手："
                              : m.role == "tool"      ? "工具："
                              : m.role == "function"  ? "方法："
                                                      : nullptr;
        if (speaker) out += "[unused9]" + (speaker + m.content) + "[unused10]";
      }
      if (add_assistant) out += "[unused9]助手：";
      break;
    case ChatFormat::solar_open:
      for (const ChatMessage& m : messages)
        out += "<|begin|>" + m.role + "<|content|>" + m.content + "<|end|>";
      if (add_assistant) out += "<|begin|>assistant";
      break;
  }
  return out;
}

}  // namespace nibble::model
