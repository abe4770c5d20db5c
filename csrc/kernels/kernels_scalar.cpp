// The scalar twins: plain C++ for any architecture, the reference the SIMD variants are tested
// against. Written for clarity, not speed (only what keeps the tests quick: a chunk of a W row is
// converted to fp32 once and reused for every x row).
#include <cmath>
#include <cstring>

#include "kernels/kernels_impl.h"

namespace lpipes {
namespace scalar {

void linear_tile(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t /*pf_limit*/) {
  // W rows are converted a chunk at a time into a stack buffer (no allocation: this runs on the pool).
  constexpr int64_t kChunk = 512;
  float wbuf[kChunk];
  for (int64_t n = n0; n < n1; ++n) {
    const f16_t* w = W + n * K;
    for (int64_t m = m0; m < m1; ++m) {  // the dot products accumulate in y, chunk by chunk
      float& out = y[m * ldy + n];
      if (!accumulate) out = 0.0f;
      if (bias) out += bias[n];
    }
    for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
      const int64_t kc = K - k0 < kChunk ? K - k0 : kChunk;
      for (int64_t k = 0; k < kc; ++k) wbuf[k] = f16_to_f32(w[k0 + k]);
      for (int64_t m = m0; m < m1; ++m) {
        const float* xm = x + m * K + k0;
        float acc = 0.0f;
        for (int64_t k = 0; k < kc; ++k) acc += xm[k] * wbuf[k];
        y[m * ldy + n] += acc;
      }
    }
  }
}

void rms_norm_rows(const float* x, int64_t N, const float* w, float eps, float offset, float* out, int64_t m0,
                   int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * N;
    float* o = out + m * N;
    float ss = 0.0f;
    for (int64_t i = 0; i < N; ++i) ss += xr[i] * xr[i];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(N) + eps);
    for (int64_t i = 0; i < N; ++i) {
      const float v = xr[i] * r;
      o[i] = w ? v * (w[i] + offset) : v;
    }
  }
}

void rope_rows(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin, int64_t rot,
               int64_t r0, int64_t r1) {
  const int64_t half = rot / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r / heads;
    float* v = x + r * head_dim;
    const float* c = cos + t * rot;
    const float* s = sin + t * rot;
    for (int64_t d = 0; d < half; ++d) {
      const float x1 = v[d], x2 = v[d + half];
      v[d] = x1 * c[d] - x2 * s[d];
      v[d + half] = x2 * c[d + half] + x1 * s[d + half];
    }
  }
}

void act_mul_span(const float* gate, const float* up, int64_t n, act_t act, float* out) {
  if (act == act_t::silu) {
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  } else {
    const float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
    const float kKappa = 0.044715f;
    for (int64_t i = 0; i < n; ++i) {
      const float g = gate[i];
      const float inner = kBeta * (g + kKappa * g * g * g);
      out[i] = 0.5f * g * (1.0f + std::tanh(inner)) * up[i];
    }
  }
}

void f16_to_f32_span(const f16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = lpipes::f16_to_f32(src[i]);
}

void f32_to_f16_span(const float* src, int64_t n, f16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = lpipes::f32_to_f16(src[i]);
}

uint64_t read_memory_span(const void* p, int64_t bytes) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  uint64_t sum = 0;
  int64_t i = 0;
  for (; i + 8 <= bytes; i += 8) {
    uint64_t word;
    std::memcpy(&word, b + i, sizeof word);
    sum += word;
  }
  for (; i < bytes; ++i) sum += b[i];
  return sum;
}

}  // namespace scalar
}  // namespace lpipes
