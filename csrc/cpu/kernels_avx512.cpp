// AVX-512 (F/BW/VL/DQ + F16C + FMA) variant of the CPU kernels. Compiled with -mavx512*; only ever
// called through the dispatch in csrc/kernels/kernels.cpp after the CPU was checked.
//
// linear_f16: every output is one dot product summed in a fixed order (batch invariance, see below).
//  * one x row (decode GEMV): W is streamed once, in memory order, fp16 -> fp32 with vcvtph2ps on the
//    fly.
//  * more rows: W is read in L2-sized blocks of rows; tiles of up to 4 x rows x 3 W rows pass over a
//    block while the next block is prefetched into L2.
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

static inline __m512 cvt_h(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline __m512 cvt_h_n(const f16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }

// MB x rows against RB consecutive W rows: every output y[m, r] is one dot product, summed in the one
// order every path uses (two 16-lane accumulators over alternate halves of each 32-element chunk, the
// masked tail into the first, then one horizontal sum): the batch invariance of linear_f16 rests on
// this being the only dot product. Each x load feeds RB FMAs (x rows of a long K come from L2).
//
// pf: the first of pf_rows (< RB) W rows of the *next* block, whose lines are prefetched into L2, one
// line per row for every line of W consumed here (see linear_tile).
template <int MB, int RB>
static inline void gemv_tile(const float* x, int64_t K, const f16_t* w, const float* bias, float* y, int64_t ldy,
                             bool accumulate, const f16_t* pf, int64_t pf_rows) {
  __m512 acc0[MB][RB], acc1[MB][RB];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 3
    for (int r = 0; r < RB; ++r) acc0[m][r] = acc1[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    if (pf != nullptr) {
#pragma GCC unroll 3
      for (int r = 0; r < RB; ++r)
        if (r < pf_rows) _mm_prefetch(reinterpret_cast<const char*>(pf + r * K + k), _MM_HINT_T1);
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

// ---------------------------------------------------------------------------------------------------
// Blocks of W rows small enough to stay in L2 (kBlockWBytes); every tile of up to 4 x rows passes over
// a block, W rows 3 at a time, before the next block. Each output is one gemv_tile dot product, so
// y[m, n] is summed in the same order whatever M is and however the rows are split between threads: a
// sequence gets bit-identical results alone and batched with others (batch invariance; the packed
// outer-product GEMM this replaced summed in another order and changed greedy tokens at near-ties
// once batched).
//
// The passes over a block prefetch the next block into L2, each pass the rows of every passes-th tile
// (a line per line of W read in those tiles), so W arrives from DRAM while the block in L2 is computed
// on, spread evenly over the block's compute (at first the first pass prefetched it all; spreading it
// measured 2-5 % faster at 8 and 16 rows on 1 and 2 Zen 4 cores). Without any prefetch the hardware
// prefetcher, which follows the W rows being read, falls behind whenever a W line takes longer to
// consume than to fetch (more than one x row), and every pass waited on DRAM: on Zen 4, one thread,
// the 0.6B model's layer matrices from DRAM (bench/kernels.py) went at 8 rows from 4.1-4.4 to 3.1-3.7
// ms per layer (55 -> 75 GFLOP/s), at 4 rows from 3.1-3.3 to 1.8-2.2 ms, at 2 rows from 2.1 to 1.5 ms
// (the L2-resident rate is ~100 GFLOP/s at 4+ rows).
//
// One x row (the decode GEMV) is memory-bound and reads its W rows strictly in memory order, one
// stream, which the hardware prefetcher follows best: on Zen 4 this beat interleaved row streams,
// the block prefetch above (1.33 vs 1.6-1.7 ms per layer) and a prefetch 4 KB ahead, and matched a
// plain read of the same bytes.
// ---------------------------------------------------------------------------------------------------
constexpr int64_t kTileRows = 4;
constexpr int kTileWRows = 3;
constexpr int64_t kBlockWBytes = kLinearBlockWBytes;

// y[0:MB, n0:n1] for MB x rows (x, y at the first row), W rows kTileWRows at a time. pf_ahead > 0:
// the tiles whose index is pf_phase modulo pf_period prefetch the W rows pf_ahead rows ahead of
// theirs, up to row pf_end.
template <int MB>
static void tile_rows(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                      bool accumulate, int64_t n0, int64_t n1, int64_t pf_ahead, int64_t pf_end, int64_t pf_phase,
                      int64_t pf_period) {
  int64_t i = 0;
  auto prefetch = [&](int64_t n, int64_t rows, int64_t* count) -> const f16_t* {
    const bool mine = pf_ahead > 0 && i++ % pf_period == pf_phase;
    *count = mine ? std::clamp<int64_t>(pf_end - (n + pf_ahead), 0, rows) : 0;
    return *count > 0 ? W + (n + pf_ahead) * K : nullptr;
  };
  int64_t n = n0, count = 0;
  for (; n + kTileWRows <= n1; n += kTileWRows) {
    const f16_t* pf = prefetch(n, kTileWRows, &count);
    gemv_tile<MB, kTileWRows>(x, K, W + n * K, bias ? bias + n : nullptr, y + n, ldy, accumulate, pf, count);
  }
  for (; n < n1; ++n) {
    const f16_t* pf = prefetch(n, 1, &count);
    gemv_tile<MB, 1>(x, K, W + n * K, bias ? bias + n : nullptr, y + n, ldy, accumulate, pf, count);
  }
}

static void tile(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t rows, int64_t n0, int64_t n1, int64_t pf_ahead, int64_t pf_end,
                 int64_t pf_phase, int64_t pf_period) {
  switch (rows) {
    case 1: tile_rows<1>(x, K, W, bias, y, ldy, accumulate, n0, n1, pf_ahead, pf_end, pf_phase, pf_period); break;
    case 2: tile_rows<2>(x, K, W, bias, y, ldy, accumulate, n0, n1, pf_ahead, pf_end, pf_phase, pf_period); break;
    case 3: tile_rows<3>(x, K, W, bias, y, ldy, accumulate, n0, n1, pf_ahead, pf_end, pf_phase, pf_period); break;
    default: tile_rows<4>(x, K, W, bias, y, ldy, accumulate, n0, n1, pf_ahead, pf_end, pf_phase, pf_period); break;
  }
}

}  // namespace

void linear_tile(const float* x, int64_t K, const f16_t* W, const float* bias, float* y, int64_t ldy,
                 bool accumulate, int64_t m0, int64_t m1, int64_t n0, int64_t n1, int64_t pf_limit) {
  if (m1 - m0 == 1) {  // the decode GEMV: W streamed strictly in memory order
    x += m0 * K;
    y += m0 * ldy;
    for (int64_t n = n0; n < n1; ++n)
      gemv_tile<1, 1>(x, K, W + n * K, bias ? bias + n : nullptr, y + n, ldy, accumulate, nullptr, 0);
    return;
  }
  const int64_t block = std::max<int64_t>(1, kBlockWBytes / (2 * K));
  const int64_t passes = (m1 - m0 + kTileRows - 1) / kTileRows;
  for (int64_t b0 = n0; b0 < n1; b0 += block) {
    const int64_t b1 = std::min(n1, b0 + block);
    const int64_t pf_end = std::min(pf_limit, b1 + block);  // the next block (this thread's rows only)
    for (int64_t m = m0, p = 0; m < m1; m += kTileRows, ++p) {
      const int64_t rows = std::min(kTileRows, m1 - m);
      tile(x + m * K, K, W, bias, y + m * ldy, ldy, accumulate, rows, b0, b1, block, pf_end, p, passes);
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
