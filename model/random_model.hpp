#pragma once
// Project-made Llama test models: random but deterministic weights with llama.cpp's tensor names
// and metadata keys, plus a small synthetic SentencePiece-style vocabulary, so the whole engine
// (loader, tokenizer, forward pass, benchmarks) can run without downloading a model.
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernels/quant_types.hpp"
#include "model/gguf.hpp"
#include "model/tokenizer.hpp"

namespace nibble::model {

struct LlamaShape {
  int64_t n_embd = 0;
  int64_t n_layer = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;
  int64_t n_ff = 0;
  int64_t n_vocab = 0;
  int64_t n_ctx = 0;
  int64_t head_dim = 0;  // 0: n_embd / n_head; else written as llama.attention.key_length / value_length
  float rope_base = 10000;
  float rms_eps = 1e-5f;
  float rope_linear_factor = 0.0f;            // llama.rope.scaling.factor (type linear); 0: none
  std::vector<float> rope_freq_factors = {};  // rope_freqs.weight [head_dim / 2] (Llama 3.1's); empty: none
  int64_t rope_yarn_original_context = 0;     // > 0: YaRN (type yarn, rope_linear_factor its factor) from it

  int64_t head_size() const { return head_dim > 0 ? head_dim : n_embd / n_head; }
  // Number of weights (matrices, embeddings and norms) in a model of this shape, with an
  // untied output head.
  int64_t n_params() const;
};

// "tiny" (embd 128, 2 layers, 4 / 2 heads, ffn 256, vocab 4096, ctx 2048), "tiny-h64" (tiny with 2 / 1
// heads of 64 values, where llama.cpp rotates a quantized KV cache), "small" (embd 256, 2
// layers, 4 / 1 heads, ffn 768, vocab 4096, ctx 2048: the dims of the fixture small-llama-q4_k_m.gguf,
// with rows that are multiples of 256 as K-quants need) or a Llama 3 shape (vocab 128256, 8 KV heads,
// ctx 8192, rope base 500000): "llama-1b" (Llama-3.2-1B: embd 2048, 16 layers, 32 heads, ffn 8192),
// "llama-8b" (embd 4096, 32 layers, 32 heads, ffn 14336) or "llama-70b" (embd 8192, 80 layers, 64
// heads, ffn 28672). Throws std::invalid_argument listing the names for others.
extern const char* const kShapeNames;  // the names above, for messages
LlamaShape llama_shape_by_name(const std::string& name);

// The synthetic vocabulary written by write_random_llama: n_vocab pieces with their scores and
// SentencePiece token types (1 normal, 2 unknown, 3 control, 6 byte). Ids: 0 <unk>, 1 <s>,
// 2 </s>, 3..258 <0x00>..<0xFF>, then single printable ASCII characters and "▁", then longer
// pieces, each the concatenation of two earlier pieces, with decreasing scores.
// Throws std::invalid_argument when n_vocab is too small to hold the bytes and characters (< 354).
struct SyntheticVocab {
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> token_types;
};
SyntheticVocab make_synthetic_vocab(int64_t n_vocab);

// The tokenizer.ggml.* metadata write_random_llama stores for that vocabulary (SentencePiece "llama"
// model, BOS 1, EOS 2, UNK 0, BOS added, space prefix), in the order it writes them.
std::vector<std::pair<std::string, GgufValue>> synthetic_tokenizer_metadata(int64_t n_vocab);
// The tokenizer a write_random_llama file of this vocabulary size gives (Tokenizer::from_metadata on
// the metadata above), for models with no file (dummy checkpoints). Throws like make_synthetic_vocab.
std::shared_ptr<const Tokenizer> make_synthetic_tokenizer(int64_t n_vocab);

// Writes a complete Llama GGUF v3 file: metadata (general.*, llama.*, tokenizer.ggml.*), and
// tensors token_embd.weight [n_embd, n_vocab], blk.N.{attn_norm, attn_q, attn_k, attn_v,
// attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}.weight, output_norm.weight and
// output.weight [n_embd, n_vocab] (GGML dim order, dims[0] = row length), and rope_freqs.weight when
// the shape has frequency factors. Matrices are stored as
// matrix_type (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K: the floats rounded to
// nearest as kernels::quantize_row does), norms as F32. Weights are drawn deterministically
// from `seed`: matrices ~ N(0, 1/row_length) so every projection keeps activations near unit scale,
// norm weights uniform in [0.8, 1.2]. Throws std::invalid_argument for an inconsistent shape or
// unsupported type, GgufError on I/O failure.
void write_random_llama(const std::string& path, const LlamaShape& shape, kernels::DType matrix_type,
                        uint64_t seed);

// llama.cpp's general.file_type (LLAMA_FTYPE) for a model whose matrices are `matrix_type`.
uint32_t llama_file_type(kernels::DType matrix_type);

}  // namespace nibble::model
