// AVX2 + FMA + F16C inner loops of paged attention; the scalar twins are in attention.cpp.
#include <immintrin.h>

#include "lpipes/kv_cache.h"

namespace lpipes {
namespace kv_detail {
namespace {

inline __m256 load_h(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float h2f(f16_t h) { return _cvtsh_ss(h); }

inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// The four horizontal sums of a, b, c, d.
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

template <int NR, int NK>
inline void qk_tile(const float* q, const f16_t* k, int64_t D, float* s, int64_t s_stride) {
  __m256 acc[NR][NK];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NK; ++j) acc[r][j] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = load_h(k + j * D + d);
    for (int r = 0; r < NR; ++r) {
      const __m256 qv = _mm256_loadu_ps(q + r * D + d);
      for (int j = 0; j < NK; ++j) acc[r][j] = _mm256_fmadd_ps(qv, kv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    float out[NK];
    if constexpr (NK == 4) {
      _mm_storeu_ps(out, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {
      for (int j = 0; j < NK; ++j) out[j] = hsum(acc[r][j]);
    }
    for (int64_t dt = d; dt < D; ++dt) {  // head_dim not a multiple of 8
      for (int j = 0; j < NK; ++j) out[j] += q[r * D + dt] * h2f(k[j * D + dt]);
    }
    for (int j = 0; j < NK; ++j) s[r * s_stride + j] = out[j];
  }
}

template <int NR>
inline void qk_rows(const float* q, const f16_t* k, int64_t nk, int64_t D, float* s, int64_t s_stride) {
  int64_t j = 0;
  for (; j + 4 <= nk; j += 4) qk_tile<NR, 4>(q, k + j * D, D, s + j, s_stride);
  for (; j < nk; ++j) qk_tile<NR, 1>(q, k + j * D, D, s + j, s_stride);
}

void qk_avx2(const float* q, int64_t rows, const f16_t* k, int64_t nk, int64_t D, float* s, int64_t s_stride) {
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) qk_rows<2>(q + r * D, k, nk, D, s + r * s_stride, s_stride);
  if (r < rows) qk_rows<1>(q + r * D, k, nk, D, s + r * s_stride, s_stride);
}

// acc[r, 0 .. 8 * NC) += sum_j p[r, j] v[j, ...] for NR rows.
template <int NR, int NC>
inline void pv_tile(const float* p, int64_t p_stride, const f16_t* v, int64_t nk, int64_t Dv, float* acc) {
  __m256 a[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) a[r][c] = _mm256_loadu_ps(acc + r * Dv + 8 * c);
  for (int64_t j = 0; j < nk; ++j) {
    __m256 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load_h(v + j * Dv + 8 * c);
    for (int r = 0; r < NR; ++r) {
      const __m256 w = _mm256_set1_ps(p[r * p_stride + j]);
      for (int c = 0; c < NC; ++c) a[r][c] = _mm256_fmadd_ps(w, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) _mm256_storeu_ps(acc + r * Dv + 8 * c, a[r][c]);
}

template <int NR>
inline void pv_rows(const float* p, int64_t p_stride, const f16_t* v, int64_t nk, int64_t Dv, float* acc) {
  // Enough independent accumulators (NR x NC >= 6) to keep both FMA pipes busy; <= 16 registers.
  constexpr int NC = NR <= 2 ? 4 : 2;
  int64_t d = 0;
  for (; d + 8 * NC <= Dv; d += 8 * NC) pv_tile<NR, NC>(p, p_stride, v + d, nk, Dv, acc + d);
  for (; d + 8 <= Dv; d += 8) pv_tile<NR, 1>(p, p_stride, v + d, nk, Dv, acc + d);
  for (; d < Dv; ++d) {  // head_dim_v not a multiple of 8
    for (int r = 0; r < NR; ++r) {
      float sum = acc[r * Dv + d];
      for (int64_t j = 0; j < nk; ++j) sum += p[r * p_stride + j] * h2f(v[j * Dv + d]);
      acc[r * Dv + d] = sum;
    }
  }
}

void pv_avx2(const float* p, int64_t rows, int64_t p_stride, const f16_t* v, int64_t nk, int64_t Dv, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<4>(p + r * p_stride, p_stride, v, nk, Dv, acc + r * Dv);
  switch (rows - r) {
    case 3: pv_rows<3>(p + r * p_stride, p_stride, v, nk, Dv, acc + r * Dv); break;
    case 2: pv_rows<2>(p + r * p_stride, p_stride, v, nk, Dv, acc + r * Dv); break;
    case 1: pv_rows<1>(p + r * p_stride, p_stride, v, nk, Dv, acc + r * Dv); break;
    default: break;
  }
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); inputs below -87.3 are clamped (exp < 1.2e-38).
inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

float exp_sum_avx2(float* x, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float tail = 0.f;
  if (i < n) {
    alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = i; t < n; ++t) buf[t - i] = x[t];
    _mm256_store_ps(buf, exp256(_mm256_sub_ps(_mm256_load_ps(buf), mv)));
    for (int64_t t = i; t < n; ++t) {
      x[t] = buf[t - i];
      tail += buf[t - i];
    }
  }
  return hsum(sum) + tail;
}

void to_f16_avx2(const float* src, int64_t n, f16_t* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = static_cast<f16_t>(_cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

float max_of_avx2(const float* x, int64_t n) {
  __m256 m = _mm256_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  float r = _mm_cvtss_f32(h);
  for (; i < n; ++i) r = r > x[i] ? r : x[i];
  return r;
}

void scale_avx2(float* x, int64_t n, float a) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), av));
  for (; i < n; ++i) x[i] *= a;
}

const attn_kernels_t kAvx2 = {qk_avx2, pv_avx2, exp_sum_avx2, to_f16_avx2, max_of_avx2, scale_avx2};

}  // namespace

const attn_kernels_t& attn_kernels_avx2() { return kAvx2; }

}  // namespace kv_detail
}  // namespace lpipes
