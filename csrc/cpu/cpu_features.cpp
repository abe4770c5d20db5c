// Run-time CPU feature detection (cpuid + xgetbv on x86-64).
//
// A feature counts as present only when the CPU reports it *and* the operating system saves the
// register state it needs (XCR0), as the Intel SDM requires before using AVX / AVX-512.
#include "lpipes/cpu_features.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#include <cstdint>
#endif

namespace lpipes {
namespace {

#if defined(__x86_64__) || defined(_M_X64)
uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

cpu_features_t detect() {
  cpu_features_t f;
  f.arch = "x86_64";
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return f;
  const unsigned int max_leaf = eax;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = (ecx >> 27) & 1;
  const bool avx_cpu = (ecx >> 28) & 1;
  const bool fma_cpu = (ecx >> 12) & 1;
  const bool f16c_cpu = (ecx >> 29) & 1;
  uint64_t xcr0 = osxsave ? read_xcr0() : 0;
  const bool os_ymm = (xcr0 & 0x6) == 0x6;            // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;          // + opmask, ZMM_Hi256, Hi16_ZMM
  f.fma = fma_cpu && avx_cpu && os_ymm;
  f.f16c = f16c_cpu && avx_cpu && os_ymm;
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    f.avx2 = ((ebx >> 5) & 1) && avx_cpu && os_ymm;
    f.avx512f = ((ebx >> 16) & 1) && os_zmm;
    f.avx512bw = ((ebx >> 30) & 1) && os_zmm;
    f.avx512vl = ((ebx >> 31) & 1) && os_zmm;
    f.avx512_fp16 = ((edx >> 23) & 1) && os_zmm;
  }
  return f;
}
#elif defined(__aarch64__)
cpu_features_t detect() {
  cpu_features_t f;
  f.arch = "aarch64";
  f.neon = true;  // Advanced SIMD is mandatory on AArch64.
  return f;
}
#else
cpu_features_t detect() {
  cpu_features_t f;
  f.arch = "unknown";
  return f;
}
#endif

}  // namespace

const cpu_features_t& cpu_features() {
  static const cpu_features_t features = detect();
  return features;
}

std::string best_isa() {
  const auto& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.f16c && f.fma) return "avx512";
  if (f.avx2 && f.fma && f.f16c) return "avx2";
  if (f.neon) return "neon";
  return "scalar";
}

}  // namespace lpipes
