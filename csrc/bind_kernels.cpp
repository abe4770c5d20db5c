// Bindings of the CPU kernels (csrc/kernels): check every tensor argument (dtype, shape, contiguity,
// aliasing) with a message naming it, resolve the requested variant, then release the GIL and run.
// Outputs are caller-allocated; nothing here allocates tensor memory.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings.h"
#include "lpipes/kernels.h"

namespace py = pybind11;

namespace lpipes {
namespace {

// Parse and check that this CPU can run it (throws before any work is done).
isa_t checked_isa(const std::string& s) { return resolve_isa(parse_isa(s)); }

act_t parse_act(const std::string& s) {
  if (s == "silu") return act_t::silu;
  if (s == "gelu_tanh") return act_t::gelu_tanh;
  fail("act: expected 'silu' or 'gelu_tanh', got '", s, "'");
}

const tensor_view_t& expect_tensor(const tensor_view_t& v, dtype_t dtype, int ndim) {
  v.expect_dtype(dtype).expect_ndim(ndim);
  return v.expect_contiguous();
}

size_t nbytes(const tensor_view_t& v) { return static_cast<size_t>(v.numel()) * dtype_size(v.dtype); }

bool overlaps(const tensor_view_t& a, const tensor_view_t& b) {
  const auto a0 = reinterpret_cast<uintptr_t>(a.data), b0 = reinterpret_cast<uintptr_t>(b.data);
  const size_t na = nbytes(a), nb = nbytes(b);
  return na > 0 && nb > 0 && a0 < b0 + nb && b0 < a0 + na;
}

void expect_no_overlap(const tensor_view_t& out, const tensor_view_t& in) {
  LPIPES_CHECK(!overlaps(out, in), out.name, ": must not overlap ", in.name);
}

}  // namespace

void bind_kernels(py::module_& m) {
  m.def(
      "resolve_isa", [](const std::string& isa) { return std::string(isa_name(checked_isa(isa))); },
      py::arg("isa") = "auto",
      "The kernel variant a request resolves to on this CPU ('scalar', 'avx2' or 'avx512'); raises "
      "NativeError for an unknown name or a variant this CPU cannot run.");

  m.def(
      "linear_f16",
      [](py::handle x_obj, py::handle w_obj, py::handle out_obj, py::handle bias_obj, bool accumulate,
         const std::string& isa_s) {
        const tensor_view_t x = as_view(x_obj, "x"), w = as_view(w_obj, "w"), out = as_view(out_obj, "out");
        expect_tensor(x, dtype_t::f32, 2);
        expect_tensor(w, dtype_t::f16, 2);
        const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
        w.expect_size(1, K);
        expect_tensor(out, dtype_t::f32, 2).expect_size(0, M).expect_size(1, N);
        const float* bias = nullptr;
        if (!bias_obj.is_none()) {
          const tensor_view_t b = as_view(bias_obj, "bias");
          expect_tensor(b, dtype_t::f32, 1).expect_size(0, N);
          expect_no_overlap(out, b);
          bias = b.ptr<const float>();
        }
        expect_no_overlap(out, x);
        expect_no_overlap(out, w);
        const isa_t isa = checked_isa(isa_s);
        py::gil_scoped_release release;
        linear_f16(x.ptr<const float>(), M, K, w.ptr<const f16_t>(), N, bias, out.ptr<float>(), accumulate, isa);
      },
      py::arg("x"), py::arg("w"), py::arg("out"), py::arg("bias") = py::none(), py::arg("accumulate") = false,
      py::arg("isa") = "auto",
      "out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) (+ out when accumulate). x, bias, out: float32; "
      "w: float16; all contiguous.");

  m.def(
      "rms_norm",
      [](py::handle x_obj, py::handle w_obj, float eps, float offset, py::handle out_obj, const std::string& isa_s) {
        const tensor_view_t x = as_view(x_obj, "x"), out = as_view(out_obj, "out");
        expect_tensor(x, dtype_t::f32, 2);
        const int64_t M = x.size(0), N = x.size(1);
        expect_tensor(out, dtype_t::f32, 2).expect_size(0, M).expect_size(1, N);
        LPIPES_CHECK(out.data == x.data || !overlaps(out, x), "out: must be x itself or not overlap it");
        const float* w = nullptr;
        if (!w_obj.is_none()) {
          const tensor_view_t wv = as_view(w_obj, "w");
          expect_tensor(wv, dtype_t::f32, 1).expect_size(0, N);
          expect_no_overlap(out, wv);
          w = wv.ptr<const float>();
        }
        LPIPES_CHECK(eps >= 0.0f, "eps: must be >= 0, got ", eps);
        const isa_t isa = checked_isa(isa_s);
        py::gil_scoped_release release;
        rms_norm(x.ptr<const float>(), M, N, w, eps, offset, out.ptr<float>(), isa);
      },
      py::arg("x"), py::arg("w"), py::arg("eps"), py::arg("offset"), py::arg("out"), py::arg("isa") = "auto",
      "out[M, N] = x / sqrt(mean(x^2, -1) + eps) * (w + offset) (w None: factor 1). x, w, out: float32, "
      "contiguous; out may be x.");

  m.def(
      "rope",
      [](py::handle x_obj, py::handle cos_obj, py::handle sin_obj, const std::string& isa_s) {
        const tensor_view_t x = as_view(x_obj, "x"), c = as_view(cos_obj, "cos"), s = as_view(sin_obj, "sin");
        expect_tensor(x, dtype_t::f32, 3);
        const int64_t T = x.size(0), heads = x.size(1), head_dim = x.size(2);
        expect_tensor(c, dtype_t::f32, 2).expect_size(0, T);
        const int64_t rot = c.size(1);
        expect_tensor(s, dtype_t::f32, 2).expect_size(0, T).expect_size(1, rot);
        LPIPES_CHECK(rot % 2 == 0 && rot <= head_dim, "cos: rotary dimension (", rot,
                     ") must be even and at most head_dim (", head_dim, ")");
        expect_no_overlap(x, c);
        expect_no_overlap(x, s);
        const isa_t isa = checked_isa(isa_s);
        py::gil_scoped_release release;
        rope(x.ptr<float>(), T, heads, head_dim, c.ptr<const float>(), s.ptr<const float>(), rot, isa);
      },
      py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("isa") = "auto",
      "In-place rotary embedding (HF rotate_half) of x[T, heads, head_dim] with cos, sin [T, rot]; "
      "all float32, contiguous.");

  m.def(
      "act_mul",
      [](py::handle gu_obj, py::handle out_obj, const std::string& act_s, const std::string& isa_s) {
        const tensor_view_t gu = as_view(gu_obj, "gate_up"), out = as_view(out_obj, "out");
        expect_tensor(gu, dtype_t::f32, 2);
        const int64_t M = gu.size(0), two_i = gu.size(1);
        LPIPES_CHECK(two_i % 2 == 0, "gate_up: last dimension must be even ([gate | up]), got shape ",
                     gu.shape_str());
        expect_tensor(out, dtype_t::f32, 2).expect_size(0, M).expect_size(1, two_i / 2);
        expect_no_overlap(out, gu);
        const act_t act = parse_act(act_s);
        const isa_t isa = checked_isa(isa_s);
        py::gil_scoped_release release;
        act_mul(gu.ptr<const float>(), M, two_i / 2, act, out.ptr<float>(), isa);
      },
      py::arg("gate_up"), py::arg("out"), py::arg("act"), py::arg("isa") = "auto",
      "out[M, I] = act(gate_up[:, :I]) * gate_up[:, I:], act 'silu' or 'gelu_tanh'; float32, contiguous.");

  m.def(
      "f16_to_f32",
      [](py::handle src_obj, py::handle dst_obj, const std::string& isa_s) {
        const tensor_view_t src = as_view(src_obj, "src"), dst = as_view(dst_obj, "dst");
        src.expect_dtype(dtype_t::f16).expect_contiguous();
        dst.expect_dtype(dtype_t::f32).expect_contiguous();
        LPIPES_CHECK(src.numel() == dst.numel(), "dst: expected ", src.numel(), " elements (as src ",
                     src.shape_str(), "), got shape ", dst.shape_str());
        expect_no_overlap(dst, src);
        const isa_t isa = checked_isa(isa_s);
        py::gil_scoped_release release;
        f16_to_f32(src.ptr<const f16_t>(), src.numel(), dst.ptr<float>(), isa);
      },
      py::arg("src"), py::arg("dst"), py::arg("isa") = "auto",
      "dst (float32) = src (float16), element-wise; both contiguous with the same number of elements.");

  m.def(
      "f32_to_f16",
      [](py::handle src_obj, py::handle dst_obj, const std::string& isa_s) {
        const tensor_view_t src = as_view(src_obj, "src"), dst = as_view(dst_obj, "dst");
        src.expect_dtype(dtype_t::f32).expect_contiguous();
        dst.expect_dtype(dtype_t::f16).expect_contiguous();
        LPIPES_CHECK(src.numel() == dst.numel(), "dst: expected ", src.numel(), " elements (as src ",
                     src.shape_str(), "), got shape ", dst.shape_str());
        expect_no_overlap(dst, src);
        const isa_t isa = checked_isa(isa_s);
        py::gil_scoped_release release;
        f32_to_f16(src.ptr<const float>(), src.numel(), dst.ptr<f16_t>(), isa);
      },
      py::arg("src"), py::arg("dst"), py::arg("isa") = "auto",
      "dst (float16) = src (float32) rounded to nearest even; both contiguous with the same number of elements.");

  m.def(
      "read_memory",
      [](py::handle buf_obj, const std::string& isa_s) {
        const tensor_view_t buf = as_view(buf_obj, "buf");
        buf.expect_contiguous();
        const isa_t isa = checked_isa(isa_s);
        const int64_t bytes = static_cast<int64_t>(nbytes(buf));
        py::gil_scoped_release release;
        return read_memory(buf.data, bytes, isa);
      },
      py::arg("buf"), py::arg("isa") = "auto",
      "Read every byte of the contiguous tensor buf with all threads; returns a checksum (the wrapping "
      "sum of its 64-bit words, then of its trailing bytes) as a float.");
}

}  // namespace lpipes
