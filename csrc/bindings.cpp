// The only PYBIND11_MODULE of lpipes: thin bindings over csrc/, no logic here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "lpipes/cpu_features.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lpipes native core (private; use the lpipes package API)";

  m.def(
      "cpu_features",
      []() {
        const auto& f = lpipes::cpu_features();
        py::dict d;
        d["arch"] = f.arch;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512_fp16"] = f.avx512_fp16;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["neon"] = f.neon;
        d["best_isa"] = lpipes::best_isa();
        return d;
      },
      "Which SIMD features the running CPU (and OS) support, and the kernel variant lpipes picks.");
}
