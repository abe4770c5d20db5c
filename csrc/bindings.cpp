// The only PYBIND11_MODULE of lpipes: module setup, exception mapping and the CPU feature report.
// Op families bind themselves in bind_*.cpp (thin glue: check arguments, release the GIL, call csrc/).
#include "bindings.h"

#include <pybind11/stl.h>

#include "lpipes/cpu_features.h"
#include "lpipes/dlpack.h"
#include "lpipes/threadpool.h"

namespace py = pybind11;

namespace lpipes {

tensor_view_t as_view(py::handle obj, const char* name) {
  if (!py::hasattr(obj, "__dlpack__")) {
    fail(name, ": expected a tensor, got an object of type ", std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  }
  py::object capsule = obj.attr("__dlpack__")();
  auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  if (managed == nullptr) {
    PyErr_Clear();
    fail(name, ": __dlpack__ did not return a DLPack capsule");
  }
  const DLTensor& t = managed->dl_tensor;
  LPIPES_CHECK(t.device.device_type == kDLCPU, name, ": expected a CPU tensor (device type ", t.device.device_type, ")");
  LPIPES_CHECK(t.ndim <= kMaxDims, name, ": at most ", kMaxDims, " dimensions are supported, got ", t.ndim);
  LPIPES_CHECK(t.dtype.lanes == 1, name, ": vector dtypes are not supported");
  tensor_view_t v;
  v.name = name;
  v.ndim = t.ndim;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  const int code = t.dtype.code, bits = t.dtype.bits;
  if (code == kDLFloat && bits == 32) v.dtype = dtype_t::f32;
  else if (code == kDLFloat && bits == 16) v.dtype = dtype_t::f16;
  else if (code == kDLBfloat && bits == 16) v.dtype = dtype_t::bf16;
  else if (code == kDLInt && bits == 32) v.dtype = dtype_t::i32;
  else if (code == kDLInt && bits == 64) v.dtype = dtype_t::i64;
  else if (code == kDLUInt && bits == 8) v.dtype = dtype_t::u8;
  else if (code == kDLBool && bits == 8) v.dtype = dtype_t::boolean;
  else fail(name, ": unsupported dtype (code ", code, ", bits ", bits, ")");
  int64_t stride = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    v.shape[i] = t.shape[i];
    v.strides[i] = t.strides ? t.strides[i] : stride;
    stride *= t.shape[i];
  }
  return v;  // the capsule dies here; the caller's tensor keeps the memory alive
}

isa_t parse_isa(const std::string& name) {
  if (name == "auto") return isa_t::automatic;
  if (name == "scalar") return isa_t::scalar;
  if (name == "avx2") return isa_t::avx2;
  if (name == "avx512") return isa_t::avx512;
  fail("isa: expected 'auto', 'scalar', 'avx2' or 'avx512', got '", name, "'");
}

}  // namespace lpipes

PYBIND11_MODULE(_C, m) {
  m.doc() = "lpipes native core (private; use the lpipes package API)";

  static py::exception<lpipes::error> native_error(m, "NativeError", PyExc_ValueError);
  static py::exception<lpipes::cache_full_error> cache_full(m, "KVCacheFullError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const lpipes::cache_full_error& e) {
      py::set_error(cache_full, e.what());
    } catch (const lpipes::error& e) {
      py::set_error(native_error, e.what());
    }
  });

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

  m.def("num_threads", []() { return lpipes::ThreadPool::instance().num_threads(); },
        "Threads the native kernels use (LPIPES_NUM_THREADS, else the number of CPUs).");
  m.def(
      "set_num_threads",
      [](int n) {
        LPIPES_CHECK(n >= 1 && n <= 1024, "set_num_threads: n must be in [1, 1024], got ", n);
        py::gil_scoped_release release;
        lpipes::ThreadPool::instance().set_num_threads(n);
      },
      py::arg("n"), "Resize the native kernels' thread pool.");

  lpipes::bind_kernels(m);
  lpipes::bind_kvcache(m);
  lpipes::bind_runtime(m);
  lpipes::bind_wire(m);
}
