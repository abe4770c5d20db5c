// Borrowed views of caller-owned tensors, and the checks every host entry point runs on them.
//
// Kernels never own tensor memory: Python (torch) allocates, keeps the tensors alive for the
// duration of the call, and passes them in through DLPack. A view is only valid during that call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace lpipes {

// The one exception type native code throws for bad input; mapped to lpipes._C.NativeError
// (a ValueError) at the binding boundary. Messages name the argument, what was expected and what came.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Thrown when the KV cache has no free block for a request; mapped to lpipes._C.KVCacheFullError.
class cache_full_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <typename T, typename... Rest>
void append_all(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append_all(os, rest...);
}
}  // namespace detail

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  detail::append_all(os, args...);
  throw error(os.str());
}

#define LPIPES_CHECK(cond, ...)          \
  do {                                   \
    if (!(cond)) ::lpipes::fail(__VA_ARGS__); \
  } while (0)

enum class dtype_t : int { f32 = 0, f16 = 1, bf16 = 2, i32 = 3, i64 = 4, u8 = 5, boolean = 6 };

inline const char* dtype_name(dtype_t t) {
  switch (t) {
    case dtype_t::f32: return "float32";
    case dtype_t::f16: return "float16";
    case dtype_t::bf16: return "bfloat16";
    case dtype_t::i32: return "int32";
    case dtype_t::i64: return "int64";
    case dtype_t::u8: return "uint8";
    case dtype_t::boolean: return "bool";
  }
  return "unknown";
}

inline size_t dtype_size(dtype_t t) {
  switch (t) {
    case dtype_t::f32: case dtype_t::i32: return 4;
    case dtype_t::f16: case dtype_t::bf16: return 2;
    case dtype_t::i64: return 8;
    case dtype_t::u8: case dtype_t::boolean: return 1;
  }
  return 0;
}

constexpr int kMaxDims = 6;

struct tensor_view_t {
  void* data = nullptr;
  dtype_t dtype = dtype_t::f32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0};
  int64_t strides[kMaxDims] = {0};  // in elements
  const char* name = "tensor";      // argument name, for error messages

  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {
    if (numel() == 0) return true;  // an empty tensor has no layout (torch gives it arbitrary strides)
    int64_t expect = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expect) return false;
      expect *= shape[i];
    }
    return true;
  }
  std::string shape_str() const {
    std::ostringstream os;
    os << "[";
    for (int i = 0; i < ndim; ++i) os << (i ? ", " : "") << shape[i];
    os << "]";
    return os.str();
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }

  // ---- checks (throw lpipes::error with the argument name) ----
  const tensor_view_t& expect_dtype(dtype_t t) const {
    LPIPES_CHECK(dtype == t, name, ": expected dtype ", dtype_name(t), ", got ", dtype_name(dtype));
    return *this;
  }
  const tensor_view_t& expect_ndim(int n) const {
    LPIPES_CHECK(ndim == n, name, ": expected ", n, " dimensions, got shape ", shape_str());
    return *this;
  }
  const tensor_view_t& expect_contiguous() const {
    LPIPES_CHECK(is_contiguous(), name, ": expected a contiguous tensor (shape ", shape_str(), ")");
    return *this;
  }
  // expect_size(d, n): dimension d must be n.
  const tensor_view_t& expect_size(int d, int64_t n) const {
    LPIPES_CHECK(size(d) == n, name, ": dimension ", d, " must be ", n, ", got shape ", shape_str());
    return *this;
  }
};

}  // namespace lpipes
