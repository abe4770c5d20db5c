// AVX-512 (F, BW, VL) + F16C inner loops of paged attention; the scalar twins are in attention.cpp.
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own `_mm512_undefined_*()` (GCC bug
// 105593, fixed in 13); the warning is located in the header, so silencing it here is enough.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif

#include <algorithm>

#include "lpipes/kv_cache.h"

namespace lpipes {
namespace kv_detail {
namespace {

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

inline __m512 load_h(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load_h(const f16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// Sum of the two 256-bit halves (AVX512F only: no DQ).
inline __m256 fold(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

// The four horizontal sums of a, b, c, d.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 a8 = fold(a), b8 = fold(b), c8 = fold(c), d8 = fold(d);
  const __m256 ab = _mm256_hadd_ps(a8, b8);  // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(c8, d8);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a b c d (low half) | a b c d (high half)
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// s[r, j..j+NK) for NR rows starting at q and NK keys starting at k.
template <int NR, int NK>
inline void qk_tile(const float* q, const f16_t* k, int64_t D, float* s, int64_t s_stride) {
  __m512 acc[NR][NK];
  for (int r = 0; r < NR; ++r)
    for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m512 kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = load_h(k + j * D + d);
    for (int r = 0; r < NR; ++r) {
      const __m512 qv = _mm512_loadu_ps(q + r * D + d);
      for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_fmadd_ps(qv, kv[j], acc[r][j]);
    }
  }
  if (d < D) {
    const __mmask16 m = tail_mask(D - d);
    __m512 kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = load_h(k + j * D + d, m);
    for (int r = 0; r < NR; ++r) {
      const __m512 qv = _mm512_maskz_loadu_ps(m, q + r * D + d);
      for (int j = 0; j < NK; ++j) acc[r][j] = _mm512_fmadd_ps(qv, kv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    if constexpr (NK == 4) {
      _mm_storeu_ps(s + r * s_stride, reduce4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]));
    } else {
      for (int j = 0; j < NK; ++j) s[r * s_stride + j] = _mm512_reduce_add_ps(acc[r][j]);
    }
  }
}

template <int NR>
inline void qk_rows(const float* q, const f16_t* k, int64_t nk, int64_t D, float* s, int64_t s_stride) {
  int64_t j = 0;
  for (; j + 4 <= nk; j += 4) qk_tile<NR, 4>(q, k + j * D, D, s + j, s_stride);
  for (; j < nk; ++j) qk_tile<NR, 1>(q, k + j * D, D, s + j, s_stride);
}

void qk_avx512(const float* q, int64_t rows, const f16_t* k, int64_t nk, int64_t D, float* s, int64_t s_stride) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) qk_rows<4>(q + r * D, k, nk, D, s + r * s_stride, s_stride);
  switch (rows - r) {
    case 3: qk_rows<3>(q + r * D, k, nk, D, s + r * s_stride, s_stride); break;
    case 2: qk_rows<2>(q + r * D, k, nk, D, s + r * s_stride, s_stride); break;
    case 1: qk_rows<1>(q + r * D, k, nk, D, s + r * s_stride, s_stride); break;
    default: break;
  }
}

// acc[r, 0 .. 16 * NC) += sum_j p[r, j] v[j, 0 .. 16 * NC) for NR rows; when MASKED, the last chunk
// is limited to the lanes of `last`.
template <int NR, int NC, bool MASKED>
inline void pv_tile(const float* p, int64_t p_stride, const f16_t* v, int64_t nk, int64_t Dv, float* acc,
                    __mmask16 last) {
  __m512 a[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c)
      a[r][c] = (MASKED && c == NC - 1) ? _mm512_maskz_loadu_ps(last, acc + r * Dv + 16 * c)
                                        : _mm512_loadu_ps(acc + r * Dv + 16 * c);
  for (int64_t j = 0; j < nk; ++j) {
    __m512 vv[NC];
    for (int c = 0; c < NC; ++c)
      vv[c] = (MASKED && c == NC - 1) ? load_h(v + j * Dv + 16 * c, last) : load_h(v + j * Dv + 16 * c);
    for (int r = 0; r < NR; ++r) {
      const __m512 w = _mm512_set1_ps(p[r * p_stride + j]);
      for (int c = 0; c < NC; ++c) a[r][c] = _mm512_fmadd_ps(w, vv[c], a[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) {
      if (MASKED && c == NC - 1) _mm512_mask_storeu_ps(acc + r * Dv + 16 * c, last, a[r][c]);
      else _mm512_storeu_ps(acc + r * Dv + 16 * c, a[r][c]);
    }
}

template <int NR>
inline void pv_rows(const float* p, int64_t p_stride, const f16_t* v, int64_t nk, int64_t Dv, float* acc) {
  int64_t d = 0;
  for (; d + 64 <= Dv; d += 64) pv_tile<NR, 4, false>(p, p_stride, v + d, nk, Dv, acc + d, 0xFFFF);
  const int64_t rest = Dv - d;
  if (rest <= 0) return;
  const int64_t chunks = (rest + 15) / 16;
  const __mmask16 last = tail_mask(rest - 16 * (chunks - 1));
  switch (chunks) {
    case 1: pv_tile<NR, 1, true>(p, p_stride, v + d, nk, Dv, acc + d, last); break;
    case 2: pv_tile<NR, 2, true>(p, p_stride, v + d, nk, Dv, acc + d, last); break;
    default: pv_tile<NR, 3, true>(p, p_stride, v + d, nk, Dv, acc + d, last); break;
  }
}

void pv_avx512(const float* p, int64_t rows, int64_t p_stride, const f16_t* v, int64_t nk, int64_t Dv, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<4>(p + r * p_stride, p_stride, v, nk, Dv, acc + r * Dv);
  switch (rows - r) {
    case 3: pv_rows<3>(p + r * p_stride, p_stride, v, nk, Dv, acc + r * Dv); break;
    case 2: pv_rows<2>(p + r * p_stride, p_stride, v, nk, Dv, acc + r * Dv); break;
    case 1: pv_rows<1>(p + r * p_stride, p_stride, v, nk, Dv, acc + r * Dv); break;
    default: break;
  }
}

// exp(x) for x <= 0 (Cephes expf polynomial, ~1 ulp); exp(x) = 0 below about -103.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

float exp_sum_avx512(float* x, int64_t n, float m) {
  const __m512 mv = _mm512_set1_ps(m);
  __m512 sum = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv));
    _mm512_storeu_ps(x + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (i < n) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), mv));
    _mm512_mask_storeu_ps(x + i, k, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(sum);
}

void to_f16_avx512(const float* src, int64_t n, f16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
  if (i < n) {
    const __mmask16 k = tail_mask(n - i);
    const __m256i h =
        _mm512_cvtps_ph(_mm512_maskz_loadu_ps(k, src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(dst + i, k, h);
  }
}

float max_of_avx512(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
  if (i < n) m = _mm512_mask_max_ps(m, tail_mask(n - i), m, _mm512_maskz_loadu_ps(tail_mask(n - i), x + i));
  return _mm512_reduce_max_ps(m);
}

void scale_avx512(float* x, int64_t n, float a) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), av));
  if (i < n) {
    const __mmask16 k = tail_mask(n - i);
    _mm512_mask_storeu_ps(x + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), av));
  }
}

const attn_kernels_t kAvx512 = {qk_avx512,     pv_avx512,    exp_sum_avx512, to_f16_avx512,
                                max_of_avx512, scale_avx512};

}  // namespace

const attn_kernels_t& attn_kernels_avx512() { return kAvx512; }

}  // namespace kv_detail
}  // namespace lpipes
