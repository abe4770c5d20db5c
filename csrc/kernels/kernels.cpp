// Host side of the CPU kernels: variant selection (isa_t) and work splitting over lpipes::ThreadPool.
// Compiled for baseline x86-64 (or any architecture); the SIMD variants live in csrc/cpu/*_avx2.cpp and
// csrc/cpu/*_avx512.cpp and only ever run single-threaded sub-ranges handed to them from here.
#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "kernels/kernels_impl.h"
#include "lpipes/cpu_features.h"
#include "lpipes/tensor.h"
#include "lpipes/threadpool.h"

#if LPIPES_X86
#include <cpuid.h>
#endif

namespace lpipes {
namespace {

struct variant_ops_t {
  decltype(&scalar::linear_tile) linear_tile;
  decltype(&scalar::rms_norm_rows) rms_norm_rows;
  decltype(&scalar::rope_rows) rope_rows;
  decltype(&scalar::act_mul_span) act_mul_span;
  decltype(&scalar::f16_to_f32_span) f16_to_f32_span;
  decltype(&scalar::f32_to_f16_span) f32_to_f16_span;
  decltype(&scalar::read_memory_span) read_memory_span;
};

#define LPIPES_VARIANT_OPS(ns)                                                                          \
  variant_ops_t {                                                                                       \
    &ns::linear_tile, &ns::rms_norm_rows, &ns::rope_rows, &ns::act_mul_span, &ns::f16_to_f32_span,      \
        &ns::f32_to_f16_span, &ns::read_memory_span                                                     \
  }

const variant_ops_t kScalarOps = LPIPES_VARIANT_OPS(scalar);
#if LPIPES_X86
const variant_ops_t kAvx2Ops = LPIPES_VARIANT_OPS(avx2);
const variant_ops_t kAvx512Ops = LPIPES_VARIANT_OPS(avx512);

// AVX-512DQ is not in cpu_features_t, but the AVX-512 translation unit is compiled with -mavx512dq.
bool cpu_has_avx512dq() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx) || eax < 7) return false;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  return (ebx >> 17) & 1;
}
#endif

bool can_run_avx2() {
#if LPIPES_X86
  const cpu_features_t& f = cpu_features();
  return f.avx2 && f.fma && f.f16c;
#else
  return false;
#endif
}

bool can_run_avx512() {
#if LPIPES_X86
  static const bool ok = [] {
    const cpu_features_t& f = cpu_features();
    return can_run_avx2() && f.avx512f && f.avx512bw && f.avx512vl && cpu_has_avx512dq();
  }();
  return ok;
#else
  return false;
#endif
}

ThreadPool& pool() { return ThreadPool::instance(); }

// Resolve the variant (throws if this CPU cannot run it).
const variant_ops_t& ops_for(isa_t isa) {
  switch (resolve_isa(isa)) {
#if LPIPES_X86
    case isa_t::avx512: return kAvx512Ops;
    case isa_t::avx2: return kAvx2Ops;
#endif
    default: return kScalarOps;
  }
}

int num_threads() { return pool().num_threads(); }

// Below this many multiply-adds a linear runs on the calling thread (waking the pool costs ~1-2 us).
constexpr int64_t kLinearInlineMacs = int64_t{1} << 15;
// N is split between threads in multiples of this (a multiple of every variant's register tile).
constexpr int64_t kNSplitUnit = 64;
// Bytes of W per GEMV work slice.
constexpr int64_t kGemvSliceBytes = int64_t{256} << 10;
// L2 blocks of W rows per chunk of a multi-row linear's work (see linear_f16).
constexpr int64_t kStealBlocks = 2;

// A thread's range [lo, hi) of chunks, packed lo | hi << 32: its owner takes from lo, others from hi.
// Both ends only move inwards, so a compare-and-swap on the pair never sees a stale range (no ABA).
struct alignas(64) StealRange {
  std::atomic<uint64_t> lohi{0};
};

uint64_t pack_range(int64_t lo, int64_t hi) { return static_cast<uint64_t>(lo) | static_cast<uint64_t>(hi) << 32; }

// Claims one chunk of r (its first, or with from_end its last); false once r is empty. *lo and *hi:
// the range as it was when the chunk was claimed.
bool take_chunk(StealRange& r, bool from_end, int64_t* lo, int64_t* hi) {
  uint64_t s = r.lohi.load(std::memory_order_relaxed);
  for (;;) {
    *lo = static_cast<int64_t>(s & 0xffffffffu);
    *hi = static_cast<int64_t>(s >> 32);
    if (*lo >= *hi) return false;
    const uint64_t next = from_end ? pack_range(*lo, *hi - 1) : pack_range(*lo + 1, *hi);
    if (r.lohi.compare_exchange_weak(s, next, std::memory_order_relaxed)) return true;
  }
}

}  // namespace

isa_t resolve_isa(isa_t requested) {
  switch (requested) {
    case isa_t::automatic: {
      static const isa_t best = can_run_avx512() ? isa_t::avx512 : can_run_avx2() ? isa_t::avx2 : isa_t::scalar;
      return best;
    }
    case isa_t::scalar: return isa_t::scalar;
    case isa_t::avx2:
#if !LPIPES_X86
      fail("isa 'avx2' was requested, but this build has no x86 SIMD kernels (", cpu_features().arch,
           "); use 'auto' or 'scalar'");
#endif
      LPIPES_CHECK(can_run_avx2(), "isa 'avx2' was requested, but this CPU lacks AVX2+FMA+F16C "
                   "(best available: '", isa_name(resolve_isa(isa_t::automatic)), "')");
      return isa_t::avx2;
    case isa_t::avx512:
#if !LPIPES_X86
      fail("isa 'avx512' was requested, but this build has no x86 SIMD kernels (", cpu_features().arch,
           "); use 'auto' or 'scalar'");
#endif
      LPIPES_CHECK(can_run_avx512(), "isa 'avx512' was requested, but this CPU lacks AVX-512 F/BW/VL/DQ "
                   "(best available: '", isa_name(resolve_isa(isa_t::automatic)), "')");
      return isa_t::avx512;
  }
  fail("unknown isa value ", static_cast<int>(requested));
}

const char* isa_name(isa_t isa) {
  switch (isa) {
    case isa_t::automatic: return "auto";
    case isa_t::scalar: return "scalar";
    case isa_t::avx2: return "avx2";
    case isa_t::avx512: return "avx512";
  }
  return "unknown";
}

void linear_f16(const float* x, int64_t M, int64_t K, const f16_t* W, int64_t N, const float* bias, float* y,
                bool accumulate, isa_t isa) {
  const variant_ops_t& ops = ops_for(isa);
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // empty reduction: y = bias (+ y)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const float b = bias ? bias[n] : 0.0f;
        y[m * N + n] = accumulate ? y[m * N + n] + b : b;
      }
    return;
  }
  const int nt = num_threads();
  if (nt <= 1 || M * N * K < kLinearInlineMacs) {
    ops.linear_tile(x, K, W, bias, y, N, accumulate, 0, M, 0, N, N);
    return;
  }
  if (M == 1) {
    // GEMV: memory-bound. Threads take 256 KB slices of W in turn (a relaxed atomic counter), each read
    // in memory order; a thread slowed by the machine then simply takes fewer slices, which measured
    // better on a shared machine than a static half each (the prefetcher restarts at every 4 KB page
    // anyway, so slices cost nothing in stream efficiency).
    const int64_t chunk = std::max<int64_t>(16, kGemvSliceBytes / (K * 2));
    std::atomic<int64_t> next{0};
    const std::function<void(int, int)> job = [&](int, int) {
      for (;;) {
        const int64_t n0 = next.fetch_add(chunk, std::memory_order_relaxed);
        if (n0 >= N) break;
        const int64_t n1 = std::min(N, n0 + chunk);
        ops.linear_tile(x, K, W, bias, y, N, accumulate, 0, M, n0, n1, n1);
      }
    };
    pool().run(job);
    return;
  }
  // More rows: split N (W rows) between threads, so each streams its own part of W, in memory order.
  // With too few columns for every thread, split M as well (a static grid tm x tn of tiles).
  const int64_t n_units = (N + kNSplitUnit - 1) / kNSplitUnit;
  const int tn = static_cast<int>(std::min<int64_t>(nt, n_units));
  const int tm = static_cast<int>(std::min<int64_t>(nt / tn, M));
  if (tm > 1) {
    const std::function<void(int, int)> job = [&](int t, int) {
      if (t >= tm * tn) return;
      const int im = t / tn, in = t % tn;
      const int64_t n0 = std::min(N, n_units * in / tn * kNSplitUnit);
      const int64_t n1 = std::min(N, n_units * (in + 1) / tn * kNSplitUnit);
      const int64_t m0 = M * im / tm, m1 = M * (im + 1) / tm;
      if (n0 < n1 && m0 < m1) ops.linear_tile(x, K, W, bias, y, N, accumulate, m0, m1, n0, n1, n1);
    };
    pool().run(job);
    return;
  }
  // Each thread owns a contiguous range of chunks (kStealBlocks L2 blocks of W rows each) and computes
  // it in order, its tiles prefetching the next block even across chunks (pf_limit: the end of what
  // it still owns), so W streams as it would in one call. A thread done with its range takes chunks
  // from the end of another's, so a thread slowed by other work on its core (a server's event loop
  // keeps ~25 % of one busy while streaming 8 requests) no longer holds up the call. On 2 Zen 4 cores
  // against a static half each, the 0.6B model's layer matrices at 8 rows: 4-5 % less time on an idle
  // machine, 6-7 % with a 25 % load on one core (LM head: 10-12 %); one node serving 8 streams with
  // 2 threads: 105.9 -> 110.4 tok/s (alternating rounds). The GEMV's 256 KB slices, which 2-4 rows
  // once took, ran 1.5-1.8x slower than contiguous parts: every slice's first block came cold from
  // DRAM, the prefetch stopping at the slice's end; an owner's chunks keep it running.
  const int64_t chunk = kStealBlocks * std::max<int64_t>(1, kLinearBlockWBytes / (2 * K));
  const int64_t n_chunks = (N + chunk - 1) / chunk;
  std::unique_ptr<StealRange[]> ranges(new StealRange[nt]);
  for (int t = 0; t < nt; ++t)
    ranges[t].lohi.store(pack_range(n_chunks * t / nt, n_chunks * (t + 1) / nt), std::memory_order_relaxed);
  const std::function<void(int, int)> job = [&](int t, int) {
    int64_t lo = 0, hi = 0;
    while (take_chunk(ranges[t], /*from_end=*/false, &lo, &hi)) {  // own range, in order
      const int64_t n0 = lo * chunk, n1 = std::min(N, n0 + chunk);
      ops.linear_tile(x, K, W, bias, y, N, accumulate, 0, M, n0, n1, std::min(N, hi * chunk));
    }
    for (int i = 1; i < nt; ++i) {  // then the others' ends
      while (take_chunk(ranges[(t + i) % nt], /*from_end=*/true, &lo, &hi)) {
        const int64_t n0 = (hi - 1) * chunk, n1 = std::min(N, n0 + chunk);
        ops.linear_tile(x, K, W, bias, y, N, accumulate, 0, M, n0, n1, n1);
      }
    }
  };
  pool().run(job);
}

void rms_norm(const float* x, int64_t M, int64_t N, const float* w, float eps, float offset, float* out,
              isa_t isa) {
  const variant_ops_t& ops = ops_for(isa);
  if (M <= 0 || N <= 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / N);
  parallel_for(M, grain, [&](int64_t b, int64_t e) { ops.rms_norm_rows(x, N, w, eps, offset, out, b, e); });
}

void rope(float* x, int64_t T, int64_t heads, int64_t head_dim, const float* cos, const float* sin, int64_t rot,
          isa_t isa) {
  const variant_ops_t& ops = ops_for(isa);
  if (T <= 0 || heads <= 0 || rot <= 1) return;
  const int64_t grain = std::max<int64_t>(1, 16384 / rot);
  parallel_for(T * heads, grain,
               [&](int64_t b, int64_t e) { ops.rope_rows(x, heads, head_dim, cos, sin, rot, b, e); });
}

void act_mul(const float* gate_up, int64_t M, int64_t I, act_t act, float* out, isa_t isa) {
  const variant_ops_t& ops = ops_for(isa);
  if (M <= 0 || I <= 0) return;
  constexpr int64_t kGrain = 16384;  // elements
  if (M >= num_threads()) {
    parallel_for(M, std::max<int64_t>(1, kGrain / I), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) ops.act_mul_span(gate_up + m * 2 * I, gate_up + m * 2 * I + I, I, act, out + m * I);
    });
  } else {  // decode: few rows, split the columns
    parallel_for(I, kGrain / M, [&](int64_t b, int64_t e) {
      for (int64_t m = 0; m < M; ++m)
        ops.act_mul_span(gate_up + m * 2 * I + b, gate_up + m * 2 * I + I + b, e - b, act, out + m * I + b);
    });
  }
}

void f16_to_f32(const f16_t* src, int64_t n, float* dst, isa_t isa) {
  const variant_ops_t& ops = ops_for(isa);
  parallel_for(n, int64_t{1} << 16, [&](int64_t b, int64_t e) { ops.f16_to_f32_span(src + b, e - b, dst + b); });
}

void f32_to_f16(const float* src, int64_t n, f16_t* dst, isa_t isa) {
  const variant_ops_t& ops = ops_for(isa);
  parallel_for(n, int64_t{1} << 16, [&](int64_t b, int64_t e) { ops.f32_to_f16_span(src + b, e - b, dst + b); });
}

double read_memory(const void* p, int64_t bytes, isa_t isa) {
  const variant_ops_t& ops = ops_for(isa);
  if (bytes <= 0) return 0.0;
  const int nt = num_threads();
  const char* base = static_cast<const char*>(p);
  if (nt <= 1 || bytes < (int64_t{1} << 20)) return static_cast<double>(ops.read_memory_span(base, bytes));
  struct alignas(64) partial_t {
    uint64_t sum = 0;
  };
  std::vector<partial_t> partial(static_cast<size_t>(nt));
  const std::function<void(int, int)> job = [&](int t, int n) {
    // Page-aligned chunks, so no cache line is read by two threads.
    const int64_t chunk = ((bytes + n - 1) / n + 4095) / 4096 * 4096;
    const int64_t b = std::min(bytes, chunk * t), e = std::min(bytes, chunk * (t + 1));
    if (b < e) partial[t].sum = ops.read_memory_span(base + b, e - b);
  };
  pool().run(job);
  uint64_t sum = 0;
  for (const partial_t& s : partial) sum += s.sum;
  return static_cast<double>(sum);
}

}  // namespace lpipes
