// Paged KV cache (vLLM-style): fixed-size blocks from a budgeted pool, a block table per session.
//
// One block holds `block_size` consecutive token positions of a session for *every* layer of the
// span, so one block table serves all layers. Storage per layer, allocated once:
//   K: [num_blocks, num_kv_heads, block_size, head_dim]    (HND: each head's tokens contiguous)
//   V: [num_blocks, num_kv_heads, block_size, head_dim_v]
// in fp16 (native executor) or fp32/bf16 (reference executor in those dtypes).
// The pool size is budget_bytes / (bytes of one block over all layers). Appends never reallocate;
// a session that needs a block when none is free gets cache_full_error and nothing changes —
// no live session is ever evicted.
//
// Writes are provisional: reserve() grows a session's capacity, write() stores K/V at positions
// >= its committed length, commit() advances the length, rollback() drops uncommitted blocks.
#pragma once

#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "lpipes/kernels.h"
#include "lpipes/tensor.h"

namespace lpipes {

struct kv_layer_shape_t {
  int32_t num_kv_heads;
  int32_t head_dim;    // of K
  int32_t head_dim_v;  // of V (equal to head_dim for every supported model but kept separate)
};

class PagedKVCache {
 public:
  // Throws lpipes::error on bad arguments (block_size not in {8, 16, 32}, empty layers, a budget
  // smaller than one block, dtype not f16/f32/bf16).
  PagedKVCache(std::vector<kv_layer_shape_t> layers, int32_t block_size, int64_t budget_bytes, dtype_t dtype);
  ~PagedKVCache();
  PagedKVCache(const PagedKVCache&) = delete;
  PagedKVCache& operator=(const PagedKVCache&) = delete;

  int32_t block_size() const { return block_size_; }
  int32_t num_layers() const { return static_cast<int32_t>(layers_.size()); }
  const kv_layer_shape_t& layer(int32_t i) const { return layers_[i]; }
  dtype_t dtype() const { return dtype_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t blocks_used() const;
  int64_t blocks_free() const { return num_blocks() - blocks_used(); }
  int64_t block_bytes() const { return block_bytes_; }  // one block, all layers, K and V
  int64_t peak_blocks_used() const;  // high-water mark of blocks_used() since construction
  int64_t num_sessions() const;
  int64_t cache_full_count() const;  // how many reserve() calls failed for lack of blocks

  // Sessions are identified by caller-chosen 64-bit ids.
  bool has(uint64_t session) const;
  int64_t length(uint64_t session) const;    // committed tokens (0 for an unknown session)
  int64_t capacity(uint64_t session) const;  // reserved token slots
  std::vector<int32_t> block_table(uint64_t session) const;
  std::vector<uint64_t> sessions() const;

  // Make room for `n` more tokens after the committed length (creating the session if new).
  // All-or-nothing: throws cache_full_error, changing nothing, if the pool lacks blocks.
  void reserve(uint64_t session, int64_t n);
  // Store K/V of tokens at positions [pos, pos + T) of one layer; those slots must be reserved.
  //   k: [T, num_kv_heads, head_dim], v: [T, num_kv_heads, head_dim_v], fp32 (converted to the
  //   storage dtype) — the layout the projections produce.
  void write(int32_t layer, uint64_t session, int64_t pos, int64_t T, const float* k, const float* v);
  void commit(uint64_t session, int64_t new_length);  // length <= capacity
  void rollback(uint64_t session);                    // back to the committed length; frees spare blocks;
                                                      // a session with length 0 disappears
  void free(uint64_t session);                        // throws lpipes::error for an unknown session

  // Raw storage of one layer (see the layout above), for attention kernels and tensor views.
  void* k_data(int32_t layer) const { return k_[layer]; }
  void* v_data(int32_t layer) const { return v_[layer]; }

  // Block-table access without copying, for the attention kernels (caller holds no lock; tables
  // of sessions being attended must not change concurrently — the executor guarantees that).
  const std::vector<int32_t>& table_ref(uint64_t session) const;

 private:
  struct session_t {
    int64_t length = 0;
    std::vector<int32_t> blocks;
  };
  std::vector<kv_layer_shape_t> layers_;
  int32_t block_size_;
  dtype_t dtype_;
  int64_t num_blocks_ = 0;
  int64_t block_bytes_ = 0;
  std::vector<void*> k_, v_;
  std::vector<std::pair<void*, size_t>> mappings_;  // what alloc_zeroed mapped, to release
  std::vector<int32_t> free_blocks_;  // a stack
  std::unordered_map<uint64_t, session_t> sessions_;
  int64_t peak_used_ = 0;
  int64_t full_count_ = 0;
  mutable std::mutex mu_;
};

// Attention of T new query tokens of one session over its cached K/V (fp16 cache only), for one layer:
//   q: [T, num_heads, head_dim] fp32; query t sits at absolute cache position q_start + t and sees
//   keys k with k <= q_start + t (causal) and, when window > 0, k > q_start + t - window (a window
//   of `window` tokens including the query itself). GQA: head h reads KV head h / (num_heads / Hkv).
//   scores = scale * q·k, then softcap*tanh(scores/softcap) when softcap > 0; softmax in fp32.
//   out: [T, num_heads, head_dim_v] fp32.
// The keys must already be written (write() before attention, as in every decoder layer).
struct attention_seq_t {
  uint64_t session;
  int64_t q_start;   // absolute position of the first query token
  int64_t q_len;     // T
  const float* q;    // [T, num_heads, head_dim]
  float* out;        // [T, num_heads, head_dim_v]
};
void paged_attention(const PagedKVCache& cache, int32_t layer, const attention_seq_t* seqs, int64_t num_seqs,
                     int32_t num_heads, float scale, int32_t window, float softcap, isa_t isa = isa_t::automatic);

// ---- internals of csrc/kvcache (not part of the executor contract) ----
namespace kv_detail {

// The SIMD inner loops of paged attention and of write(), one table per ISA variant. Every pointer
// is to contiguous row-major memory; none of them allocates or throws.
struct attn_kernels_t {
  // s[r * s_stride + j] = q[r, :] · k[j, :] for r < rows, j < nk.  q: fp32 [rows, D]; k: fp16 [nk, D].
  void (*qk)(const float* q, int64_t rows, const f16_t* k, int64_t nk, int64_t D, float* s, int64_t s_stride);
  // acc[r, :] += sum_j p[r * p_stride + j] * v[j, :].  p: fp32; v: fp16 [nk, Dv]; acc: fp32 [rows, Dv].
  void (*pv)(const float* p, int64_t rows, int64_t p_stride, const f16_t* v, int64_t nk, int64_t Dv, float* acc);
  // x[i] = exp(x[i] - m) for i < n (x[i] <= m); returns the sum of the results.
  float (*exp_sum)(float* x, int64_t n, float m);
  // dst[i] = fp16(src[i]), round to nearest even.
  void (*to_f16)(const float* src, int64_t n, f16_t* dst);
  // max(x[0 .. n)), n >= 1.
  float (*max_of)(const float* x, int64_t n);
  // x[i] *= a for i < n.
  void (*scale)(float* x, int64_t n, float a);
};

// The variant `requested` runs as: automatic -> the best this CPU supports (from best_isa());
// an explicit variant the CPU (or this build) lacks -> lpipes::error.
isa_t attention_isa(isa_t requested);
const attn_kernels_t& attn_kernels(isa_t resolved);

#if defined(LPIPES_X86)
const attn_kernels_t& attn_kernels_avx2();    // attention_avx2.cpp
const attn_kernels_t& attn_kernels_avx512();  // attention_avx512.cpp
#endif

}  // namespace kv_detail

}  // namespace lpipes
