// Private: the element-wise kernels (rms_norm, rope, act_mul, fp16 conversion) written once over a
// thin vector wrapper and compiled separately in each SIMD translation unit.
//
// Include this inside the variant's namespace (lpipes::avx2 / lpipes::avx512) after <immintrin.h>
// and after defining exactly one of LPIPES_SIMD_AVX512 / LPIPES_SIMD_AVX2; everything here then gets
// that namespace, so the variants never share a symbol (an inline function compiled with -mavx512f
// that the linker could hand to baseline code). Nothing here may use the standard library.

// ---------------------------------------------------------------------------------------------------
// Vector wrapper: vf is one register of fp32 lanes, kW lanes wide.
// ---------------------------------------------------------------------------------------------------
#if defined(LPIPES_SIMD_AVX512)

using vf = __m512;
constexpr int kW = 16;

static inline __mmask16 lane_mask(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vset1(float v) { return _mm512_set1_ps(v); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vload_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(lane_mask(n), p); }
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline void vstore_n(float* p, vf v, int64_t n) { _mm512_mask_storeu_ps(p, lane_mask(n), v); }
static inline vf vload_h(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline vf vload_h_n(const f16_t* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lane_mask(n), p)); }
static inline void vstore_h(f16_t* p, vf v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline void vstore_h_n(f16_t* p, vf v, int64_t n) {
  _mm256_mask_storeu_epi16(p, lane_mask(n), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }   // a * b + c
static inline vf vfnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); } // c - a * b
static inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for integral n in [-126, 127], built in the exponent field.
static inline vf vpow2i(vf n) {
  const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
}
static inline float vreduce_add(vf v) { return _mm512_reduce_add_ps(v); }
// a > b ? t : f, lane-wise (false for NaN).
static inline vf vselect_gt(vf a, vf b, vf t, vf f) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GT_OQ), f, t); }

#elif defined(LPIPES_SIMD_AVX2)

using vf = __m256;
constexpr int kW = 8;

alignas(32) static const int32_t kLaneMaskTable[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
static inline __m256i lane_mask(int64_t n) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMaskTable + 8 - (n >= 8 ? 8 : n)));
}
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vset1(float v) { return _mm256_set1_ps(v); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vload_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, lane_mask(n)); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline void vstore_n(float* p, vf v, int64_t n) { _mm256_maskstore_ps(p, lane_mask(n), v); }
static inline vf vload_h(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
static inline vf vload_h_n(const f16_t* p, int64_t n) {
  alignas(16) f16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n && i < 8; ++i) tmp[i] = p[i];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}
static inline void vstore_h(f16_t* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
static inline void vstore_h_n(f16_t* p, vf v, int64_t n) {
  alignas(16) f16_t tmp[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(tmp), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (int64_t i = 0; i < n && i < 8; ++i) p[i] = tmp[i];
}
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf vfnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
static inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vpow2i(vf n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
static inline vf vselect_gt(vf a, vf b, vf t, vf f) { return _mm256_blendv_ps(f, t, _mm256_cmp_ps(a, b, _CMP_GT_OQ)); }
static inline float vreduce_add(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#else
#error "define LPIPES_SIMD_AVX512 or LPIPES_SIMD_AVX2 before including simd_common.h"
#endif

// exp(x) in fp32 (Cephes expf: range reduction by ln 2 in two parts, degree-5 polynomial; ~1 ulp).
// Below -87.3 the result is flushed to exp(-87.3) ~ 1.2e-38 and above 88.38 it is +inf; NaN is not
// propagated (callers divide x by 1 + exp(.), which carries it).
static inline vf vexp(vf x_in) {
  const vf hi = vset1(88.3762626647949f);
  vf x = vmin(vmax(x_in, vset1(-87.3365f)), hi);
  const vf fx = vround(vmul(x, vset1(1.44269504088896341f)));
  x = vfnmadd(fx, vset1(0.693359375f), x);
  x = vfnmadd(fx, vset1(-2.12194440e-4f), x);
  const vf z = vmul(x, x);
  vf y = vset1(1.9875691500e-4f);
  y = vfmadd(y, x, vset1(1.3981999507e-3f));
  y = vfmadd(y, x, vset1(8.3334519073e-3f));
  y = vfmadd(y, x, vset1(4.1665795894e-2f));
  y = vfmadd(y, x, vset1(1.6666665459e-1f));
  y = vfmadd(y, x, vset1(5.0000001201e-1f));
  y = vfmadd(y, z, vadd(x, vset1(1.0f)));
  return vselect_gt(x_in, hi, vset1(__builtin_inff()), vmul(y, vpow2i(fx)));
}

// act(g) * u. SiLU(g) = g / (1 + exp(-g)); tanh-GELU(g) = 0.5 g (1 + tanh(s)) = g / (1 + exp(-2 s)),
// s = sqrt(2/pi) (g + 0.044715 g^3): the same function as torch's gelu(approximate="tanh"), in the
// form that does not cancel for negative g.
static inline vf vsilu_mul(vf g, vf u) { return vmul(vdiv(g, vadd(vset1(1.0f), vexp(vsub(vzero(), g)))), u); }
static inline vf vgelu_tanh_mul(vf g, vf u) {
  const vf g3 = vmul(vmul(g, g), g);
  const vf s2 = vmul(vset1(-2.0f * 0.7978845608028654f), vfmadd(vset1(0.044715f), g3, g));  // -2 s
  return vmul(vdiv(g, vadd(vset1(1.0f), vexp(s2))), u);
}

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------------------
// Element-wise kernels (the LPIPES_KERNEL_VARIANT_API entries other than linear and read_memory).
// ---------------------------------------------------------------------------------------------------

void rms_norm_rows(const float* x, int64_t N, const float* w, float eps, float offset, float* out, int64_t m0,
                   int64_t m1) {
  const vf voff = vset1(offset);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * N;
    float* o = out + m * N;
    vf s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
    int64_t i = 0;
    for (; i + 4 * kW <= N; i += 4 * kW) {
      const vf a = vload(xr + i), b = vload(xr + i + kW), c = vload(xr + i + 2 * kW), d = vload(xr + i + 3 * kW);
      s0 = vfmadd(a, a, s0);
      s1 = vfmadd(b, b, s1);
      s2 = vfmadd(c, c, s2);
      s3 = vfmadd(d, d, s3);
    }
    for (; i < N; i += kW) {
      const vf a = vload_n(xr + i, N - i);
      s0 = vfmadd(a, a, s0);
    }
    const float ss = vreduce_add(vadd(vadd(s0, s1), vadd(s2, s3)));
    const float r = 1.0f / __builtin_sqrtf(ss / static_cast<float>(N) + eps);
    const vf vr = vset1(r);
    for (i = 0; i + kW <= N; i += kW) {
      const vf v = vmul(vload(xr + i), vr);
      vstore(o + i, w ? vmul(v, vadd(vload(w + i), voff)) : v);
    }
    if (i < N) {
      const vf v = vmul(vload_n(xr + i, N - i), vr);
      vstore_n(o + i, w ? vmul(v, vadd(vload_n(w + i, N - i), voff)) : v, N - i);
    }
  }
}

void rope_rows(float* x, int64_t heads, int64_t head_dim, const float* cos, const float* sin, int64_t rot,
               int64_t r0, int64_t r1) {
  const int64_t half = rot / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r / heads;
    float* v1 = x + r * head_dim;
    float* v2 = v1 + half;
    const float* c1 = cos + t * rot;
    const float* c2 = c1 + half;
    const float* s1 = sin + t * rot;
    const float* s2 = s1 + half;
    int64_t d = 0;
    for (; d + kW <= half; d += kW) {
      const vf a = vload(v1 + d), b = vload(v2 + d);
      vstore(v1 + d, vsub(vmul(a, vload(c1 + d)), vmul(b, vload(s1 + d))));
      vstore(v2 + d, vadd(vmul(b, vload(c2 + d)), vmul(a, vload(s2 + d))));
    }
    if (d < half) {
      const int64_t n = half - d;
      const vf a = vload_n(v1 + d, n), b = vload_n(v2 + d, n);
      vstore_n(v1 + d, vsub(vmul(a, vload_n(c1 + d, n)), vmul(b, vload_n(s1 + d, n))), n);
      vstore_n(v2 + d, vadd(vmul(b, vload_n(c2 + d, n)), vmul(a, vload_n(s2 + d, n))), n);
    }
  }
}

void act_mul_span(const float* gate, const float* up, int64_t n, act_t act, float* out) {
  int64_t i = 0;
  if (act == act_t::silu) {
    for (; i + kW <= n; i += kW) vstore(out + i, vsilu_mul(vload(gate + i), vload(up + i)));
    if (i < n) vstore_n(out + i, vsilu_mul(vload_n(gate + i, n - i), vload_n(up + i, n - i)), n - i);
  } else {
    for (; i + kW <= n; i += kW) vstore(out + i, vgelu_tanh_mul(vload(gate + i), vload(up + i)));
    if (i < n) vstore_n(out + i, vgelu_tanh_mul(vload_n(gate + i, n - i), vload_n(up + i, n - i)), n - i);
  }
}

void f16_to_f32_span(const f16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    const vf a = vload_h(src + i), b = vload_h(src + i + kW), c = vload_h(src + i + 2 * kW),
             d = vload_h(src + i + 3 * kW);
    vstore(dst + i, a);
    vstore(dst + i + kW, b);
    vstore(dst + i + 2 * kW, c);
    vstore(dst + i + 3 * kW, d);
  }
  for (; i < n; i += kW) vstore_n(dst + i, vload_h_n(src + i, n - i), n - i);
}

void f32_to_f16_span(const float* src, int64_t n, f16_t* dst) {
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW) {
    const vf a = vload(src + i), b = vload(src + i + kW), c = vload(src + i + 2 * kW), d = vload(src + i + 3 * kW);
    vstore_h(dst + i, a);
    vstore_h(dst + i + kW, b);
    vstore_h(dst + i + 2 * kW, c);
    vstore_h(dst + i + 3 * kW, d);
  }
  for (; i < n; i += kW) vstore_h_n(dst + i, vload_n(src + i, n - i), n - i);
}
