// AVX-512 (F/BW/VL/DQ + F16C + FMA) variant of the CPU kernels. Compiled with -mavx512*; only ever
// called through the dispatch in csrc/kernels/kernels.cpp after the CPU was checked.
//
// linear_f16: every output is one dot product summed in a fixed order (batch invariance, see below).
//  * up to 4 x rows (decode GEMV): W is streamed once, in memory order, fp16 -> fp32 with vcvtph2ps
//    on the fly; each W load feeds one FMA per x row.
//  * more rows: tiles of 4 x rows over L2-sized blocks of W rows, with the same per-row kernel.
//
// GCC 12's AVX-512 intrinsics seed their pass-through operand with a self-initialised "undefined"
// value, which -Wall flags as (maybe-)uninitialized once inlined without LTO (GCC bug 105593, fixed
// in GCC 13). The values are never read; silence the false positive for this file only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <algorithm>

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

// With 2-4 x rows each W line takes longer to consume and the hardware prefetcher falls behind: a
// software prefetch 4 KB ahead made the 0.6B LM head (151936 x 1024, one thread, from DRAM) 20-35 %
// faster at 2-4 rows (M = 2: 27 -> 17-24 ms; M = 4: 37 -> 27-30 ms). At one row it cost 0-40 %, and
// 2 or 8 KB ahead did worse: one row keeps the plain stream.
constexpr int64_t kPrefetchHalfs = 2048;

// MB x rows against RB consecutive W rows: every output y[m, r] is one dot product, summed in the one
// order every path uses (two 16-lane accumulators over alternate halves of each 32-element chunk, the
// masked tail into the first, then one horizontal sum): the batch invariance of linear_f16 rests on
// this being the only dot product. With RB > 1 each x load feeds RB FMAs (x rows of a long K come
// from L2).
template <int MB, int RB>
static inline void gemv_tile(const float* x, int64_t K, const f16_t* w, const float* bias, float* y, int64_t ldy,
                             bool accumulate) {
  __m512 acc0[MB][RB], acc1[MB][RB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 3
    for (int r = 0; r < RB; ++r) acc0[m][r] = acc1[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (MB > 1 || RB > 1) {
#pragma GCC unroll 3
      for (int r = 0; r < RB; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + kPrefetchHalfs), _MM_HINT_T0);
    }
    __m512 b0[RB], b1[RB];
#pragma GCC unroll 3
    for (int r = 0; r < RB; ++r) {
      b0[r] = cvt_h(w + r * K + k);
      b1[r] = cvt_h(w + r * K + k + 16);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      __m512 x0 = _mm512_loadu_ps(x + m * K + k), x1 = _mm512_loadu_ps(x + m * K + k + 16);
      if constexpr (RB > 1) __asm__("" : "+v"(x0), "+v"(x1));  // one load each, not one per FMA
#pragma GCC unroll 3
      for (int r = 0; r < RB; ++r) {
        acc0[m][r] = _mm512_fmadd_ps(b0[r], x0, acc0[m][r]);
        acc1[m][r] = _mm512_fmadd_ps(b1[r], x1, acc1[m][r]);
      }
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = lane_mask(K - k);
    __m512 b[RB];
#pragma GCC unroll 3
    for (int r = 0; r < RB; ++r) b[r] = cvt_h_n(w + r * K + k, mk);
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mk, x + m * K + k);
#pragma GCC unroll 3
      for (int r = 0; r < RB; ++r) acc0[m][r] = _mm512_fmadd_ps(b[r], xv, acc0[m][r]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 3
    for (int r = 0; r < RB; ++r) {
      float v = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m][r], acc1[m][r]));
      if (bias) v += bias[r];
      float& out = y[m * ldy + r];
      out = accumulate ? out + v : v;
    }
}

// One W row (the decode GEMV, W streamed in memory order).
template <int MB>
static inline void gemv_row(const float* x, int64_t K, const f16_t* w, const float* bias, float* y, int64_t ldy,
                            bool accumulate) {
  gemv_tile<MB, 1>(x, K, w, bias, y, ldy, accumulate);
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
// Any number of x rows: tiles of up to 4 rows against blocks of W rows small enough to stay in L2
// while every tile passes over them. Each output is still one gemv_tile dot product, so y[m, n] is
// summed in the same order whatever M is and however the rows are split between threads: a
// sequence gets bit-identical results alone and batched with others (batch invariance; the packed
// outer-product GEMM this replaced summed in another order and changed greedy tokens at near-ties
// once batched). bench/kernels.py, one thread: 16 rows ~80 GFLOP/s, 128-512 rows 72-94 (the GEMM:
// 80-95); the prefetch of the 3 W rows took 16 rows from ~60 and the 0.6B LM head at 8 rows from
// 55-58 to 43-47 ms.
// ---------------------------------------------------------------------------------------------------
constexpr int64_t kTileRows = 4;
constexpr int64_t kBlockWBytes = int64_t{192} << 10;

// y[0:MB, n0:n1] for MB x rows (x, y at the first row), W rows two at a time.
template <int MB>
static void tile_rows(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                      bool accumulate, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 3 <= n1; n += 3)
    gemv_tile<MB, 3>(x, K, W + n * K, bias ? bias + n : nullptr, y + n, ldy, accumulate);
  for (; n < n1; ++n) gemv_row<MB>(x, K, W + n * K, bias ? bias + n : nullptr, y + n, ldy, accumulate);
}

static void tile(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t rows, int64_t n0, int64_t n1) {
  switch (rows) {
    case 1: tile_rows<1>(x, K, W, bias, y, ldy, accumulate, n0, n1); break;
    case 2: tile_rows<2>(x, K, W, bias, y, ldy, accumulate, n0, n1); break;
    case 3: tile_rows<3>(x, K, W, bias, y, ldy, accumulate, n0, n1); break;
    default: tile_rows<4>(x, K, W, bias, y, ldy, accumulate, n0, n1); break;
  }
}

}  // namespace

void linear_tile(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  if (m1 - m0 <= kTileRows) {
    gemv(x + m0 * K, K, W, bias, y + m0 * ldy, ldy, accumulate, m1 - m0, n0, n1);
    return;
  }
  const int64_t block = std::max<int64_t>(1, kBlockWBytes / (2 * K));
  for (int64_t b0 = n0; b0 < n1; b0 += block) {
    const int64_t b1 = std::min(n1, b0 + block);
    for (int64_t m = m0; m < m1; m += kTileRows) {
      const int64_t rows = std::min(kTileRows, m1 - m);
      tile(x + m * K, K, W, bias, y + m * ldy, ldy, accumulate, rows, b0, b1);
    }
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
