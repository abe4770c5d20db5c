// The native executor's fused decoder span: every layer of a llama-family span in one call.
//
// One forward() runs all layers of the span for a packed batch of sequences (varlen, no padding):
// fp32 activations, fp16 weights streamed once per step by linear_f16, K/V written to and read from
// the paged cache. Python only computes the RoPE tables and does the block bookkeeping (reserve /
// commit / rollback); nothing crosses the language boundary per layer.
//
// Supported layer shapes (flags per span): llama / mistral / qwen2 (qkv bias) / qwen3 (q/k norms) /
// phi3 (fused qkv, partial rotary) / gemma3 (four (1+w) norms, q/k norms, GELU-tanh, per-layer-type
// RoPE and windows). Weights are borrowed: the Python owner keeps the tensors alive.
#pragma once

#include <cstdint>
#include <vector>

#include "lpipes/kernels.h"
#include "lpipes/kv_cache.h"

namespace lpipes {

struct native_config_t {
  int64_t hidden = 0;        // H
  int64_t num_heads = 0;     // query heads
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;      // D
  int64_t intermediate = 0;  // I
  float eps = 1e-6f;
  float norm_offset = 0.f;   // 1 for Gemma's (1 + w) norms
  act_t act = act_t::silu;
  bool sandwich_norms = false;  // Gemma: post-attention / pre- and post-feedforward norms
};

struct native_layer_t {
  const f16_t* qkv = nullptr;        // [(heads + 2 kv_heads) * D, H]: rows q | k | v
  const float* qkv_bias = nullptr;   // [(heads + 2 kv_heads) * D] or null
  const f16_t* o = nullptr;          // [H, heads * D]
  const f16_t* gate_up = nullptr;    // [2I, H]: rows gate | up
  const f16_t* down = nullptr;       // [H, I]
  const float* input_norm = nullptr;      // [H]
  const float* post_attn_norm = nullptr;  // [H]: llama: the pre-MLP norm; gemma: applied to the attention output
  const float* pre_ff_norm = nullptr;     // [H] gemma only
  const float* post_ff_norm = nullptr;    // [H] gemma only
  const float* q_norm = nullptr;          // [D] or null
  const float* k_norm = nullptr;          // [D] or null
  float scale = 1.f;    // attention score scale
  int32_t window = 0;   // sliding window (tokens incl. the query), 0 = full attention
  int32_t rope_table = 0;  // index into the cos/sin tables passed to forward()
};

struct native_seq_t {
  uint64_t session;
  int64_t q_start;  // absolute position (= cache index) of the first new token
  int64_t q_len;
};

class NativeSpan {
 public:
  NativeSpan(const native_config_t& cfg, std::vector<native_layer_t> layers);

  const native_config_t& config() const { return cfg_; }
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // h: [N, H] fp32, updated in place (N = sum of q_len). cos/sin: per table, [N, rot] fp32 rows in
  // token order. The cache must have capacity for every sequence's new tokens (reserve() first);
  // cache layer l of the span is layer l here.
  void forward(PagedKVCache& cache, float* h, const std::vector<native_seq_t>& seqs,
               const std::vector<const float*>& cos, const std::vector<const float*>& sin, int64_t rot,
               isa_t isa = isa_t::automatic) const;

 private:
  native_config_t cfg_;
  std::vector<native_layer_t> layers_;
};

}  // namespace lpipes
