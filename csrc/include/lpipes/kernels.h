// CPU kernels of the native executor: fp16 weights, fp32 activations and accumulation.
//
// Every kernel has a scalar twin and AVX2+F16C / AVX-512 variants, chosen at run time from the
// CPU features (isa_t::automatic) or forced by the caller (tests compare the variants). All of
// them run on lpipes::ThreadPool. Pointers are to contiguous row-major memory owned by the caller;
// shapes are validated by the host wrappers in bind_kernels.cpp before any kernel runs.
#pragma once

#include <cstdint>

#include "lpipes/half.h"

namespace lpipes {

enum class isa_t : int { automatic = 0, scalar = 1, avx2 = 2, avx512 = 3 };

// The variant isa_t::automatic resolves to on this CPU.
isa_t resolve_isa(isa_t requested);
const char* isa_name(isa_t isa);

// y[M, N] = x[M, K] · W[N, K]^T (+ bias[N]) (+ y, when accumulate: the residual add).
//   x: fp32, W: fp16 (a torch nn.Linear weight, [out_features, in_features]), bias: fp32 or null.
//   M = 1 is the decode GEMV (memory-bound: W is streamed once); more rows pass in tiles over
//   L2-sized blocks of W. Batch invariant: y[m, n] is summed in one fixed order (per variant) for
//   every M, row offset and thread count, so a row's result never depends on the other rows.
void linear_f16(const float* x, int64_t M, int64_t K, const f16_t* W, int64_t N, const float* bias, float* y,
                bool accumulate, isa_t isa = isa_t::automatic);

// out[M, N] = x / sqrt(mean(x^2) + eps) * (w + offset), offset = 1 for Gemma's (1 + w) norms, else 0.
//   x, out: fp32 (may alias); w: fp32 [N]. Also used per head (q/k norms): M = tokens * heads, N = head_dim.
//   w may be null (Gemma 4 v_norm, no scale): then the factor is 1.
void rms_norm(const float* x, int64_t M, int64_t N, const float* w, float eps, float offset, float* out,
              isa_t isa = isa_t::automatic);

// In-place rotary embedding, HF "rotate_half" layout, on x[T, heads, head_dim]:
//   for d < rot/2: (x[d], x[d + rot/2]) <- (x[d] cos[t, d] - x[d + rot/2] sin[t, d],
//                                            x[d + rot/2] cos[t, d + rot/2] + x[d] sin[t, d + rot/2])
//   cos, sin: fp32 [T, rot] (as returned by transformers' rotary modules, attention scaling included);
//   rot <= head_dim (partial rotary leaves dims >= rot untouched). Every RoPE variant (default, linear,
//   llama3, longrope, yarn, per-layer-type theta) differs only in these tables.
void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, const float* cos, const float* sin, int64_t rot,
          isa_t isa = isa_t::automatic);

// out[M, I] = act(gate) * up, where gate_up[M, 2I] holds [gate | up] per row (the fused layout).
//   act = SiLU (llama family) or tanh-approximated GELU (gemma). out may not alias gate_up.
enum class act_t : int { silu = 0, gelu_tanh = 1 };
void act_mul(const float* gate_up, int64_t M, int64_t I, act_t act, float* out, isa_t isa = isa_t::automatic);

// fp16 <-> fp32 conversion of n elements (SIMD), used at span boundaries and for the KV cache.
void f16_to_f32(const f16_t* src, int64_t n, float* dst, isa_t isa = isa_t::automatic);
void f32_to_f16(const float* src, int64_t n, f16_t* dst, isa_t isa = isa_t::automatic);

// Reads `bytes` bytes at p with all threads and returns a checksum (so the reads cannot be elided).
// The decode benchmark times it to measure the machine's memory read bandwidth.
double read_memory(const void* p, int64_t bytes, isa_t isa = isa_t::automatic);

}  // namespace lpipes
