// AVX2 + FMA + F16C variant of the CPU kernels. Compiled with -mavx2 -mfma -mf16c; only ever called
// through the dispatch in csrc/kernels/kernels.cpp after the CPU was checked.
//
// Same structure as the AVX-512 variant with 8-lane registers: a streaming GEMV for few x rows,
// and for more rows W^T packed per (KC x 16) micro-panel (8x8 in-register transposes) feeding a
// 6x16 micro-kernel (12 ymm accumulators + 2 panel registers + 1 broadcast = 15 of 16 registers).
#include <immintrin.h>

#include "kernels/kernels_impl.h"

namespace lpipes {
namespace avx2 {

#define LPIPES_SIMD_AVX2 1
#include "kernels/simd_common.h"

namespace {

// ---------------------------------------------------------------------------------------------------
// GEMV: MB x rows (1..4) against one W row at a time, W read strictly in memory order (see the
// AVX-512 variant for why).
// ---------------------------------------------------------------------------------------------------
static inline __m256 cvt_h(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

template <int MB>
static inline void gemv_row(const float* x, int64_t K, const f16_t* w, const float* bias, float* y, int64_t ldy,
                            bool accumulate) {
  __m256 acc0[MB], acc1[MB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m256 b0 = cvt_h(w + k), b1 = cvt_h(w + k + 8), b2 = cvt_h(w + k + 16), b3 = cvt_h(w + k + 24);
    const float* xm = x + k;
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m, xm += K) {
      acc0[m] = _mm256_fmadd_ps(b2, _mm256_loadu_ps(xm + 16), _mm256_fmadd_ps(b0, _mm256_loadu_ps(xm), acc0[m]));
      acc1[m] = _mm256_fmadd_ps(b3, _mm256_loadu_ps(xm + 24), _mm256_fmadd_ps(b1, _mm256_loadu_ps(xm + 8), acc1[m]));
    }
  }
  for (; k < K; k += 8) {
    const int64_t kk = K - k;
    const __m256 b = kk >= 8 ? cvt_h(w + k) : vload_h_n(w + k, kk);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) acc0[m] = _mm256_fmadd_ps(b, vload_n(x + m * K + k, kk), acc0[m]);
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    float v = vreduce_add(_mm256_add_ps(acc0[m], acc1[m]));
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
// GEMM: packed W^T micro-panels and a 6x16 micro-kernel.
// ---------------------------------------------------------------------------------------------------
constexpr int kMR = 6;
constexpr int kNR = 16;
constexpr int64_t kKC = 256;
constexpr int64_t kNC = 16 * kNR;

// 8x8 transpose: r[i] holds row i on entry and column i on return.
static inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Bp[k * 16 + c] = W[c, k] for k < kc, c < nr (zero for c >= nr). W points at W[j0, k0]; ldw = K.
static void pack_panel(const f16_t* W, int64_t ldw, int64_t nr, int64_t kc, float* Bp) {
  for (int64_t c0 = 0; c0 < kNR; c0 += 8) {
    const int64_t rows = nr - c0 < 0 ? 0 : (nr - c0 > 8 ? 8 : nr - c0);
    if (rows == 0) {
      for (int64_t k = 0; k < kc; ++k) _mm256_store_ps(Bp + k * kNR + c0, _mm256_setzero_ps());
      continue;
    }
    const f16_t* w = W + c0 * ldw;
    for (int64_t k = 0; k < kc; k += 8) {
      const int64_t kk = kc - k < 8 ? kc - k : 8;
      __m256 r[8];
      if (kk == 8 && rows == 8) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) r[i] = cvt_h(w + i * ldw + k);
      } else {
        for (int i = 0; i < 8; ++i) r[i] = i < rows ? vload_h_n(w + i * ldw + k, kk) : _mm256_setzero_ps();
      }
      transpose8(r);
      if (kk == 8) {
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) _mm256_store_ps(Bp + (k + j) * kNR + c0, r[j]);
      } else {
        for (int j = 0; j < kk; ++j) _mm256_store_ps(Bp + (k + j) * kNR + c0, r[j]);
      }
    }
  }
}

// C[0:MR, 0:nr] (+)= A[0:MR, 0:kc] · Bp[0:kc, 0:16] (+ bias). A rows are lda apart.
template <int MR>
static void micro_kernel(int64_t kc, const float* A, int64_t lda, const float* Bp, float* C, int64_t ldc,
                         int64_t nr, bool load_c, const float* bias) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) c0[m] = c1[m] = _mm256_setzero_ps();
  const float* a[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) a[m] = A + m * lda;
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(Bp + k * kNR), b1 = _mm256_load_ps(Bp + k * kNR + 8);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 av = _mm256_broadcast_ss(a[m] + k);
      c0[m] = _mm256_fmadd_ps(av, b0, c0[m]);
      c1[m] = _mm256_fmadd_ps(av, b1, c1[m]);
    }
  }
  const int64_t nr0 = nr > 8 ? 8 : nr, nr1 = nr > 8 ? nr - 8 : 0;
  if (nr == kNR) {
    __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
    if (bias) {
      bias0 = _mm256_loadu_ps(bias);
      bias1 = _mm256_loadu_ps(bias + 8);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      float* c = C + m * ldc;
      __m256 v0 = _mm256_add_ps(c0[m], bias0), v1 = _mm256_add_ps(c1[m], bias1);
      if (load_c) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(c));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(c + 8));
      }
      _mm256_storeu_ps(c, v0);
      _mm256_storeu_ps(c + 8, v1);
    }
  } else {
    __m256 bias0 = _mm256_setzero_ps(), bias1 = _mm256_setzero_ps();
    if (bias) {
      bias0 = vload_n(bias, nr0);
      bias1 = vload_n(bias + 8, nr1);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      float* c = C + m * ldc;
      __m256 v0 = _mm256_add_ps(c0[m], bias0), v1 = _mm256_add_ps(c1[m], bias1);
      if (load_c) {
        v0 = _mm256_add_ps(v0, vload_n(c, nr0));
        v1 = _mm256_add_ps(v1, vload_n(c + 8, nr1));
      }
      vstore_n(c, v0, nr0);
      vstore_n(c + 8, v1, nr1);
    }
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

constexpr int64_t kSkinnyRows = 4;

}  // namespace

void linear_tile(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 - m0 <= kSkinnyRows) {
    gemv(x + m0 * K, K, W, bias, y + m0 * ldy, ldy, accumulate, m1 - m0, n0, n1);
  } else {
    gemm(x, K, W, bias, y, ldy, accumulate, m0, m1, n0, n1);
  }
}

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

}  // namespace avx2
}  // namespace lpipes
