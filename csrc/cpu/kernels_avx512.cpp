// AVX-512 (F/BW/VL/DQ + F16C + FMA) variant of the CPU kernels. Compiled with -mavx512*; only ever
// called through the dispatch in csrc/kernels/kernels.cpp after the CPU was checked.
//
// linear_f16:
//  * up to 4 x rows (decode GEMV): W is streamed once, in memory order, fp16 -> fp32 with vcvtph2ps
//    on the fly; each W load feeds one FMA per x row.
//  * up to 24 rows: no packing; 8 x rows by 3 W rows register tiles along K (24 accumulators).
//  * more rows (prefill): BLIS-style. W^T is packed per (KC x 32) micro-panel to fp32 (16x16 in-register
//    transposes), and a 6x32 register-blocked outer-product micro-kernel (12 zmm accumulators, one
//    broadcast of x and two panel loads per 12 FMAs) sweeps all M rows over the packed panel.
//
// GCC 12's AVX-512 intrinsics seed their pass-through operand with a self-initialised "undefined"
// value, which -Wall flags as (maybe-)uninitialized once inlined without LTO (GCC bug 105593, fixed
// in GCC 13). The values are never read; silence the false positive for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "kernels/kernels_impl.h"

namespace lpipes {
namespace avx512 {

#define LPIPES_SIMD_AVX512 1
#include "kernels/simd_common.h"

namespace {

// ---------------------------------------------------------------------------------------------------
// GEMV: MB x rows (1..4) against one W row at a time.
//
// A thread reads its slice of W rows strictly in memory order (one stream), which the hardware
// prefetcher follows best: on Zen 4 this beat 4 interleaved row streams (sharing each x load between
// 4 rows), with or without software prefetch, by 10-25 % from DRAM, and matched a plain read of the
// same bytes. x (at most 4 rows of K floats) stays in L1, so re-loading it per W row costs nothing
// against the memory-bound W stream.
// ---------------------------------------------------------------------------------------------------
static inline __m512 cvt_h(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline __m512 cvt_h_n(const f16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

template <int MB>
static inline void gemv_row(const float* x, int64_t K, const f16_t* w, const float* bias, float* y, int64_t ldy,
                            bool accumulate) {
  __m512 acc0[MB], acc1[MB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 b0 = cvt_h(w + k), b1 = cvt_h(w + k + 16);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      acc0[m] = _mm512_fmadd_ps(b0, _mm512_loadu_ps(x + m * K + k), acc0[m]);
      acc1[m] = _mm512_fmadd_ps(b1, _mm512_loadu_ps(x + m * K + k + 16), acc1[m]);
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = lane_mask(K - k);
    const __m512 b = cvt_h_n(w + k, mk);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) acc0[m] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(mk, x + m * K + k), acc0[m]);
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    float v = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
    if (bias) v += *bias;
    float& out = y[m * ldy];
    out = accumulate ? out + v : v;
  }
}

template <int MB>
static void gemv_rows(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                      bool accumulate, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) gemv_row<MB>(x, K, W + n * K, bias ? bias + n : nullptr, y + n, ldy, accumulate);
}

static void gemv(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t rows, int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: gemv_rows<1>(x, K, W, bias, y, ldy, accumulate, n0, n1); break;
    case 2: gemv_rows<2>(x, K, W, bias, y, ldy, accumulate, n0, n1); break;
    case 3: gemv_rows<3>(x, K, W, bias, y, ldy, accumulate, n0, n1); break;
    default: gemv_rows<4>(x, K, W, bias, y, ldy, accumulate, n0, n1); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Few rows (a handful of tokens): no packing. Tiles of MB x rows by RB = 3 W rows, vectors along K;
// each converted W vector feeds MB FMAs and each x load RB FMAs (24 accumulators for 8 x 3), then one
// horizontal sum per output. The RB W rows (a few KB) stay in L1 while all x row blocks pass over them.
// ---------------------------------------------------------------------------------------------------
constexpr int kDotRowsX = 8;
constexpr int kDotRowsW = 3;

template <int MB, int RB>
static void dot_tile(const float* x, int64_t K, const f16_t* w, const float* bias, float* y, int64_t ldy,
                     bool accumulate) {
  __m512 acc[MB][RB];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 b[RB];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) b[r] = cvt_h(w + r * K + k);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * K + k);
      // Keep xv in a register: GCC otherwise folds the load into each of the RB FMAs (RB x the loads).
      __asm__("" : "+v"(xv));
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_fmadd_ps(b[r], xv, acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 mk = lane_mask(K - k);
    __m512 b[RB];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) b[r] = cvt_h_n(w + r * K + k, mk);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * K + k);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) acc[m][r] = _mm512_fmadd_ps(b[r], xv, acc[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r) {
      float v = _mm512_reduce_add_ps(acc[m][r]);
      if (bias) v += bias[r];
      float& out = y[m * ldy + r];
      out = accumulate ? out + v : v;
    }
}

template <int RB>
static void dot_rows(const float* x, int64_t K, const f16_t* w, const float* bias, float* y, int64_t ldy,
                     bool accumulate, int64_t M) {
  int64_t m = 0;
  for (; m + kDotRowsX <= M; m += kDotRowsX)
    dot_tile<kDotRowsX, RB>(x + m * K, K, w, bias, y + m * ldy, ldy, accumulate);
  switch (M - m) {
    case 1: dot_tile<1, RB>(x + m * K, K, w, bias, y + m * ldy, ldy, accumulate); break;
    case 2: dot_tile<2, RB>(x + m * K, K, w, bias, y + m * ldy, ldy, accumulate); break;
    case 3: dot_tile<3, RB>(x + m * K, K, w, bias, y + m * ldy, ldy, accumulate); break;
    case 4: dot_tile<4, RB>(x + m * K, K, w, bias, y + m * ldy, ldy, accumulate); break;
    case 5: dot_tile<5, RB>(x + m * K, K, w, bias, y + m * ldy, ldy, accumulate); break;
    case 6: dot_tile<6, RB>(x + m * K, K, w, bias, y + m * ldy, ldy, accumulate); break;
    case 7: dot_tile<7, RB>(x + m * K, K, w, bias, y + m * ldy, ldy, accumulate); break;
    default: break;
  }
}

// y[0:M, n0:n1] for x[0:M] (x, y already offset to the first row).
static void dot(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                bool accumulate, int64_t M, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kDotRowsW <= n1; n += kDotRowsW)
    dot_rows<kDotRowsW>(x, K, W + n * K, bias ? bias + n : nullptr, y + n, ldy, accumulate, M);
  for (; n < n1; ++n) dot_rows<1>(x, K, W + n * K, bias ? bias + n : nullptr, y + n, ldy, accumulate, M);
}

// ---------------------------------------------------------------------------------------------------
// GEMM: packed W^T micro-panels and a 6x32 micro-kernel.
// ---------------------------------------------------------------------------------------------------
constexpr int kMR = 6;
constexpr int kNR = 32;
constexpr int64_t kKC = 256;
constexpr int64_t kNC = 12 * kNR;

// 16x16 transpose: r[i] holds row i on entry and column i on return.
static inline void transpose16(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512d p = _mm512_castps_pd(t[4 * g]), q = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d s = _mm512_castps_pd(t[4 * g + 2]), w = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(p, s));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(p, s));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(q, w));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(q, w));
  }
  // r[4g + j], 128-bit lane L: rows 4g..4g+3 of column 4L + j.
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    t[j] = _mm512_shuffle_f32x4(v0, v2, 0x88);       // column j
    t[4 + j] = _mm512_shuffle_f32x4(v1, v3, 0x88);   // column 4 + j
    t[8 + j] = _mm512_shuffle_f32x4(v0, v2, 0xDD);   // column 8 + j
    t[12 + j] = _mm512_shuffle_f32x4(v1, v3, 0xDD);  // column 12 + j
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Bp[k * 32 + c] = W[c, k] for k < kc, c < nr (zero for c >= nr). W points at W[j0, k0]; ldw = K.
static void pack_panel(const f16_t* W, int64_t ldw, int64_t nr, int64_t kc, float* Bp) {
  for (int64_t c0 = 0; c0 < kNR; c0 += 16) {
    const int64_t rows = nr - c0 < 0 ? 0 : (nr - c0 > 16 ? 16 : nr - c0);
    if (rows == 0) {
      for (int64_t k = 0; k < kc; ++k) _mm512_store_ps(Bp + k * kNR + c0, _mm512_setzero_ps());
      continue;
    }
    const f16_t* w = W + c0 * ldw;
    for (int64_t k = 0; k < kc; k += 16) {
      const int64_t kk = kc - k < 16 ? kc - k : 16;
      __m512 r[16];
      if (kk == 16 && rows == 16) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) r[i] = cvt_h(w + i * ldw + k);
      } else {
        const __mmask16 mk = lane_mask(kk);
        for (int i = 0; i < 16; ++i) r[i] = i < rows ? cvt_h_n(w + i * ldw + k, mk) : _mm512_setzero_ps();
      }
      transpose16(r);
      if (kk == 16) {
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) _mm512_store_ps(Bp + (k + j) * kNR + c0, r[j]);
      } else {
        for (int j = 0; j < kk; ++j) _mm512_store_ps(Bp + (k + j) * kNR + c0, r[j]);
      }
    }
  }
}

// C[0:MR, 0:nr] (+)= A[0:MR, 0:kc] · Bp[0:kc, 0:32] (+ bias). A rows are lda apart.
template <int MR>
static void micro_kernel(int64_t kc, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
                         int64_t nr, bool load_c, const float* bias) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) c0[m] = c1[m] = _mm512_setzero_ps();
  const float* a[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) a[m] = A + m * lda;
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_load_ps(Bp + k * kNR), b1 = _mm512_load_ps(Bp + k * kNR + 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 av = _mm512_set1_ps(a[m][k]);
      c0[m] = _mm512_fmadd_ps(av, b0, c0[m]);
      c1[m] = _mm512_fmadd_ps(av, b1, c1[m]);
    }
  }
  const __mmask16 k0 = lane_mask(nr), k1 = lane_mask(nr > 16 ? nr - 16 : 0);
  __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
  if (bias) {
    bias0 = _mm512_maskz_loadu_ps(k0, bias);
    bias1 = _mm512_maskz_loadu_ps(k1, bias + 16);
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    float* c = C + m * ldc;
    __m512 v0 = _mm512_add_ps(c0[m], bias0), v1 = _mm512_add_ps(c1[m], bias1);
    if (load_c) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, c));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, c + 16));
    }
    _mm512_mask_storeu_ps(c, k0, v0);
    _mm512_mask_storeu_ps(c + 16, k1, v1);
  }
}

using micro_kernel_fn = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t, bool,
                                 const float*);
constexpr micro_kernel_fn kMicroKernels[kMR + 1] = {nullptr,          micro_kernel<1>, micro_kernel<2>,
                                                    micro_kernel<3>,  micro_kernel<4>, micro_kernel<5>,
                                                    micro_kernel<6>};

static void gemm(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  alignas(64) float Bp[kKC * kNR];
  for (int64_t nc0 = n0; nc0 < n1; nc0 += kNC) {
    const int64_t nc1 = imin(nc0 + kNC, n1);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = imin(kKC, K - k0);
      const bool first = k0 == 0;
      for (int64_t j0 = nc0; j0 < nc1; j0 += kNR) {
        const int64_t nr = imin(kNR, nc1 - j0);
        pack_panel(W + j0 * K + k0, K, nr, kc, Bp);
        const float* b = first && bias ? bias + j0 : nullptr;
        const bool load_c = !first || accumulate;
        int64_t i0 = m0;
        for (; i0 + kMR <= m1; i0 += kMR)
          micro_kernel<kMR>(kc, x + i0 * K + k0, K, Bp, y + i0 * ldy + j0, ldy, nr, load_c, b);
        if (i0 < m1) kMicroKernels[m1 - i0](kc, x + i0 * K + k0, K, Bp, y + i0 * ldy + j0, ldy, nr, load_c, b);
      }
    }
  }
}

constexpr int64_t kSkinnyRows = 4;   // up to here: the streaming GEMV
constexpr int64_t kDotMaxRows = 24;  // up to here: the unpacked few-row kernel (crossover measured on Zen 4)

}  // namespace

void linear_tile(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 - m0 <= kSkinnyRows) {
    gemv(x + m0 * K, K, W, bias, y + m0 * ldy, ldy, accumulate, m1 - m0, n0, n1);
  } else if (m1 - m0 <= kDotMaxRows) {
    dot(x + m0 * K, K, W, bias, y + m0 * ldy, ldy, accumulate, m1 - m0, n0, n1);
  } else {
    gemm(x, K, W, bias, y, ldy, accumulate, m0, m1, n0, n1);
  }
}

// 32-byte loads: streaming from DRAM they were ~10 % faster than 64-byte loads on Zen 4 (which splits
// 512-bit loads), and they saturate memory just as well on Intel cores.
uint64_t read_memory_span(const void* p, int64_t bytes) {
  const char* b = static_cast<const char*>(p);
  __m256i s0 = _mm256_setzero_si256(), s1 = s0;
  int64_t i = 0;
  for (; i + 64 <= bytes; i += 64) {
    s0 = _mm256_add_epi64(s0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i)));
    s1 = _mm256_add_epi64(s1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i + 32)));
  }
  const __m256i s = _mm256_add_epi64(s0, s1);
  uint64_t sum = static_cast<uint64_t>(_mm256_extract_epi64(s, 0)) + static_cast<uint64_t>(_mm256_extract_epi64(s, 1)) +
                 static_cast<uint64_t>(_mm256_extract_epi64(s, 2)) + static_cast<uint64_t>(_mm256_extract_epi64(s, 3));
  for (; i + 8 <= bytes; i += 8) {
    uint64_t word;
    __builtin_memcpy(&word, b + i, sizeof word);
    sum += word;
  }
  for (; i < bytes; ++i) sum += static_cast<unsigned char>(b[i]);
  return sum;
}

}  // namespace avx512
}  // namespace lpipes
