// CPU feature detection used to pick SIMD kernel variants at run time.
#pragma once

#include <string>

namespace lpipes {

struct cpu_features_t {
  bool avx2 = false;      // AVX2 usable (CPU bit set and the OS saves YMM state)
  bool fma = false;       // FMA3
  bool f16c = false;      // fp16 <-> fp32 conversion instructions
  bool avx512f = false;   // AVX-512 Foundation usable (CPU bit set and the OS saves ZMM/opmask state)
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_fp16 = false;  // native fp16 arithmetic (Sapphire Rapids and later)
  bool neon = false;      // aarch64 Advanced SIMD
  std::string arch;       // "x86_64", "aarch64" or "unknown"
};

// Detected once (thread-safe static) and cached.
const cpu_features_t& cpu_features();

// The best SIMD variant the kernels can use on this CPU: "avx512", "avx2", "neon" or "scalar".
std::string best_isa();

}  // namespace lpipes
