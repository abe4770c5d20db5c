// Bindings of the native executor's fused span (csrc/runtime).
#include <pybind11/stl.h>

#include <memory>

#include "bindings.h"
#include "lpipes/native_span.h"

namespace py = pybind11;

namespace lpipes {
namespace {

// Owns the NativeSpan and keeps the Python tensors it borrows alive.
struct span_holder_t {
  std::unique_ptr<NativeSpan> span;
  py::list keepalive;
};

template <typename T>
const T* weight(const py::dict& d, const char* key, dtype_t dt, std::initializer_list<int64_t> shape, bool required,
                py::list& keep) {
  if (!d.contains(key) || d[key].is_none()) {
    LPIPES_CHECK(!required, "NativeSpan: layer weight '", key, "' is required");
    return nullptr;
  }
  py::object obj = d[key];
  tensor_view_t v = as_view(obj, key);
  v.expect_dtype(dt).expect_ndim(static_cast<int>(shape.size())).expect_contiguous();
  int dim = 0;
  for (int64_t s : shape) v.expect_size(dim++, s);
  keep.append(obj);
  return v.ptr<T>();
}

span_holder_t* make_span(const py::dict& cfg, const py::list& layers) {
  native_config_t c;
  c.hidden = cfg["hidden"].cast<int64_t>();
  c.num_heads = cfg["num_heads"].cast<int64_t>();
  c.num_kv_heads = cfg["num_kv_heads"].cast<int64_t>();
  c.head_dim = cfg["head_dim"].cast<int64_t>();
  c.intermediate = cfg["intermediate"].cast<int64_t>();
  c.eps = cfg["eps"].cast<float>();
  c.norm_offset = cfg["norm_offset"].cast<float>();
  const auto act = cfg["act"].cast<std::string>();
  LPIPES_CHECK(act == "silu" || act == "gelu_tanh", "NativeSpan: act must be silu or gelu_tanh, got ", act);
  c.act = act == "silu" ? act_t::silu : act_t::gelu_tanh;
  c.sandwich_norms = cfg["sandwich_norms"].cast<bool>();
  LPIPES_CHECK(c.hidden > 0 && c.num_heads > 0 && c.num_kv_heads > 0 && c.head_dim > 0 && c.intermediate > 0,
               "NativeSpan: all dimensions must be positive");
  const int64_t H = c.hidden, D = c.head_dim, nq = c.num_heads * D, nqkv = nq + 2 * c.num_kv_heads * D,
                I = c.intermediate;
  auto holder = std::make_unique<span_holder_t>();
  std::vector<native_layer_t> out;
  for (const py::handle& item : layers) {
    const py::dict d = py::reinterpret_borrow<py::dict>(item);
    auto& keep = holder->keepalive;
    native_layer_t L;
    L.qkv = weight<f16_t>(d, "qkv", dtype_t::f16, {nqkv, H}, true, keep);
    L.qkv_bias = weight<float>(d, "qkv_bias", dtype_t::f32, {nqkv}, false, keep);
    L.o = weight<f16_t>(d, "o", dtype_t::f16, {H, nq}, true, keep);
    L.gate_up = weight<f16_t>(d, "gate_up", dtype_t::f16, {2 * I, H}, true, keep);
    L.down = weight<f16_t>(d, "down", dtype_t::f16, {H, I}, true, keep);
    L.input_norm = weight<float>(d, "input_norm", dtype_t::f32, {H}, true, keep);
    L.post_attn_norm = weight<float>(d, "post_attn_norm", dtype_t::f32, {H}, true, keep);
    L.pre_ff_norm = weight<float>(d, "pre_ff_norm", dtype_t::f32, {H}, c.sandwich_norms, keep);
    L.post_ff_norm = weight<float>(d, "post_ff_norm", dtype_t::f32, {H}, c.sandwich_norms, keep);
    L.q_norm = weight<float>(d, "q_norm", dtype_t::f32, {D}, false, keep);
    L.k_norm = weight<float>(d, "k_norm", dtype_t::f32, {D}, false, keep);
    L.scale = d["scale"].cast<float>();
    L.window = d["window"].cast<int32_t>();
    L.rope_table = d["rope_table"].cast<int32_t>();
    LPIPES_CHECK(L.window >= 0, "NativeSpan: window must be >= 0");
    out.push_back(L);
  }
  holder->span = std::make_unique<NativeSpan>(c, std::move(out));
  return holder.release();
}

}  // namespace

void bind_runtime(py::module_& m) {
  py::class_<span_holder_t>(m, "NativeSpan",
                            "A llama-family decoder span with fp16 weights, run in one call per step.")
      .def(py::init(&make_span), py::arg("config"), py::arg("layers"))
      .def_property_readonly("num_layers", [](const span_holder_t& s) { return s.span->num_layers(); })
      .def(
          "forward",
          [](const span_holder_t& s, PagedKVCache& cache, py::handle h, const std::vector<uint64_t>& sessions,
             const std::vector<int64_t>& q_starts, const std::vector<int64_t>& q_lens, const py::list& cos,
             const py::list& sin, const std::string& isa) {
            const native_config_t& c = s.span->config();
            LPIPES_CHECK(sessions.size() == q_starts.size() && sessions.size() == q_lens.size() && !sessions.empty(),
                         "NativeSpan.forward: sessions, q_starts and q_lens must be non-empty and equally long");
            int64_t n = 0;
            std::vector<native_seq_t> seqs;
            for (size_t i = 0; i < sessions.size(); ++i) {
              LPIPES_CHECK(q_lens[i] > 0 && q_starts[i] >= 0, "NativeSpan.forward: bad q_start/q_len for sequence ", i);
              seqs.push_back(native_seq_t{sessions[i], q_starts[i], q_lens[i]});
              n += q_lens[i];
            }
            tensor_view_t hv = as_view(h, "h");
            hv.expect_dtype(dtype_t::f32).expect_ndim(2).expect_contiguous().expect_size(0, n).expect_size(1, c.hidden);
            LPIPES_CHECK(cos.size() == sin.size() && cos.size() > 0, "NativeSpan.forward: cos and sin lists differ");
            std::vector<const float*> cp, sp;
            int64_t rot = -1;
            for (size_t i = 0; i < cos.size(); ++i) {
              tensor_view_t cv = as_view(cos[i], "cos"), sv = as_view(sin[i], "sin");
              cv.expect_dtype(dtype_t::f32).expect_ndim(2).expect_contiguous().expect_size(0, n);
              if (rot < 0) rot = cv.size(1);
              cv.expect_size(1, rot);
              sv.expect_dtype(dtype_t::f32).expect_ndim(2).expect_contiguous().expect_size(0, n).expect_size(1, rot);
              cp.push_back(cv.ptr<float>());
              sp.push_back(sv.ptr<float>());
            }
            const isa_t chosen = parse_isa(isa);
            py::gil_scoped_release release;
            s.span->forward(cache, hv.ptr<float>(), seqs, cp, sp, rot, chosen);
          },
          py::arg("cache"), py::arg("h"), py::arg("sessions"), py::arg("q_starts"), py::arg("q_lens"),
          py::arg("cos"), py::arg("sin"), py::arg("isa") = "auto",
          "Run every layer for a packed batch: h [N, hidden] fp32 in place; cos/sin: one [N, rot] fp32 table "
          "per rope table index.");
}

}  // namespace lpipes
