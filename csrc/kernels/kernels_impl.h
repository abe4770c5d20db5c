// Private: the per-variant building blocks behind lpipes/kernels.h.
//
// Each variant (scalar twin in csrc/kernels/kernels_scalar.cpp, AVX2 in csrc/cpu/kernels_avx2.cpp,
// AVX-512 in csrc/cpu/kernels_avx512.cpp) implements the same single-threaded functions over a
// sub-range of the work. csrc/kernels/kernels.cpp, compiled for baseline x86-64, picks the variant,
// splits the work and runs it on lpipes::ThreadPool; the SIMD translation units never touch the pool
// (nor any other inline function shared with baseline code), so no code compiled with -mavx* can be
// picked by the linker for a baseline caller.
#pragma once

#include <cstdint>

#include "lpipes/kernels.h"

namespace lpipes {

// Bytes of W per L2 block of the SIMD variants' linear_tile (rows kLinearBlockWBytes / (2 K)): with
// several x rows, every row tile passes over a block while the next is prefetched into L2.
constexpr int64_t kLinearBlockWBytes = int64_t{192} << 10;

// One declaration list, stamped into each variant's namespace.
#define LPIPES_KERNEL_VARIANT_API                                                                         \
  /* y[m0:m1, n0:n1] of y[M, N] = x[M, K] · W[N, K]^T (+ bias) (+ y). ldy = N. Rows m0..m1 of x, */       \
  /* rows n0..n1 of W. Every output summed in the variant's one order (batch invariance).       */      \
  /* pf_limit >= n1: W rows up to it may be prefetched (the rows this thread computes next).    */      \
  void linear_tile(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,  \
                   bool accumulate, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t pf_limit);   \
  /* rows [m0, m1) of rms_norm. */                                                                       \
  void rms_norm_rows(const float* x, int64_t N, const float* w, float eps, float offset, float* out,     \
                     int64_t m0, int64_t m1);                                                            \
  /* (token, head) pairs [r0, r1) of x[T, heads, head_dim], r = t * heads + h. */                        \
  void rope_rows(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin,          \
                 int64_t rot, int64_t r0, int64_t r1);                                                   \
  /* out[i] = act(gate[i]) * up[i] for i < n. */                                                         \
  void act_mul_span(const float* gate, const float* up, int64_t n, act_t act, float* out);               \
  void f16_to_f32_span(const f16_t* src, int64_t n, float* dst);                                         \
  void f32_to_f16_span(const float* src, int64_t n, f16_t* dst);                                         \
  /* Reads `bytes` bytes at p; returns a checksum of them (wrapping sum of 64-bit words). */             \
  uint64_t read_memory_span(const void* p, int64_t bytes);

namespace scalar {
LPIPES_KERNEL_VARIANT_API
}  // namespace scalar

#if LPIPES_X86
namespace avx2 {
LPIPES_KERNEL_VARIANT_API
}  // namespace avx2

namespace avx512 {
LPIPES_KERNEL_VARIANT_API
}  // namespace avx512
#endif

}  // namespace lpipes
