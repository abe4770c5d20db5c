// AVX2 + FMA + F16C variant of the CPU kernels. Compiled with -mavx2 -mfma -mf16c; only ever called
// through the dispatch in csrc/kernels/kernels.cpp after the CPU was checked.
//
// Same structure as the AVX-512 variant with 8-lane registers: a streaming GEMV for one x row, and
// for more rows tiles of 4 x rows over L2-sized blocks of W rows with the same per-row kernel (every
// output summed in one fixed order: batch invariance), the next block prefetched into L2 meanwhile.
#include <immintrin.h>

#include <algorithm>

#include "kernels/kernels_impl.h"

namespace lpipes {
namespace avx2 {

#define LPIPES_SIMD_AVX2 1
#include "kernels/simd_common.h"

namespace {

// ---------------------------------------------------------------------------------------------------
// MB x rows (1..4) against one W row at a time.
// ---------------------------------------------------------------------------------------------------
static inline __m256 cvt_h(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// pf: a W row of the next block whose lines are prefetched into L2, one per line of w consumed (see
// linear_tile); nullptr: none.
template <int MB>
static inline void gemv_row(const float* x, int64_t K, const f16_t* w, const float* bias, float* y, int64_t ldy,
                            bool accumulate, const f16_t* pf) {
  __m256 acc0[MB], acc1[MB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (pf != nullptr) _mm_prefetch(reinterpret_cast<const char*>(pf + k), _MM_HINT_T1);
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

// Rows n0..n1 of W; pf_ahead > 0: prefetch the W row that many rows ahead of each, up to row pf_end.
template <int MB>
static void gemv_rows(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                      bool accumulate, int64_t n0, int64_t n1, int64_t pf_ahead, int64_t pf_end) {
  for (int64_t n = n0; n < n1; ++n) {
    const f16_t* pf = pf_ahead > 0 && n + pf_ahead < pf_end ? W + (n + pf_ahead) * K : nullptr;
    gemv_row<MB>(x, K, W + n * K, bias ? bias + n : nullptr, y + n, ldy, accumulate, pf);
  }
}

static void gemv(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t rows, int64_t n0, int64_t n1, int64_t pf_ahead, int64_t pf_end) {
  switch (rows) {
    case 1: gemv_rows<1>(x, K, W, bias, y, ldy, accumulate, n0, n1, pf_ahead, pf_end); break;
    case 2: gemv_rows<2>(x, K, W, bias, y, ldy, accumulate, n0, n1, pf_ahead, pf_end); break;
    case 3: gemv_rows<3>(x, K, W, bias, y, ldy, accumulate, n0, n1, pf_ahead, pf_end); break;
    default: gemv_rows<4>(x, K, W, bias, y, ldy, accumulate, n0, n1, pf_ahead, pf_end); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Any number of x rows: tiles of up to 4 rows against blocks of W rows small enough to stay in L2
// while every tile passes over them. Each output is still one gemv_row dot product, so y[m, n] is
// summed in the same order whatever M is and however the rows are split between threads: a
// sequence gets bit-identical results alone and batched with others (batch invariance; the packed
// outer-product GEMM this replaced summed in another order and changed greedy tokens at near-ties
// once batched). Slower than that GEMM for long K: bench/kernels.py --isa avx2 on an AVX-512 machine,
// one thread, gave 45-68 GFLOP/s for K = 1024 but 33-45 for K = 3072 (4 x rows of 12 KB each come
// from L2 for every W row; 16 ymm registers leave no room for 2 W rows per tile).
// ---------------------------------------------------------------------------------------------------
constexpr int64_t kTileRows = 4;
constexpr int64_t kBlockWBytes = kLinearBlockWBytes;

}  // namespace

void linear_tile(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t pf_limit) {
  if (m1 - m0 == 1) {  // the decode GEMV: W streamed strictly in memory order
    gemv(x + m0 * K, K, W, bias, y + m0 * ldy, ldy, accumulate, 1, n0, n1, 0, 0);
    return;
  }
  const int64_t block = std::max<int64_t>(1, kBlockWBytes / (2 * K));
  for (int64_t b0 = n0; b0 < n1; b0 += block) {
    const int64_t b1 = std::min(n1, b0 + block);
    const int64_t pf_end = std::min(pf_limit, b1 + block);  // the next block (this thread's rows only)
    for (int64_t m = m0; m < m1; m += kTileRows) {
      const int64_t rows = std::min(kTileRows, m1 - m);
      gemv(x + m * K, K, W, bias, y + m * ldy, ldy, accumulate, rows, b0, b1, m == m0 ? block : 0, pf_end);
    }
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
