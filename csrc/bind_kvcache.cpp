// Bindings of the paged KV cache and paged attention (csrc/kvcache): check arguments, release the GIL,
// call csrc/. Storage is exposed as zero-copy numpy arrays that keep the cache alive.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "lpipes/kv_cache.h"

namespace py = pybind11;

namespace lpipes {
namespace {

dtype_t parse_cache_dtype(const std::string& s) {
  if (s == "float16") return dtype_t::f16;
  if (s == "float32") return dtype_t::f32;
  if (s == "bfloat16") return dtype_t::bf16;
  fail("PagedKVCache: dtype must be \"float16\", \"float32\" or \"bfloat16\", got \"", s, "\"");
}

int32_t to_i32(int64_t v, const char* name) {
  LPIPES_CHECK(v >= std::numeric_limits<int32_t>::min() && v <= std::numeric_limits<int32_t>::max(), name,
               ": value ", v, " does not fit in int32");
  return static_cast<int32_t>(v);
}

int32_t check_layer(const PagedKVCache& c, int64_t layer, const char* where) {
  LPIPES_CHECK(layer >= 0 && layer < c.num_layers(), where, ": layer must be in [0, ", c.num_layers(), "), got ",
               layer);
  return static_cast<int32_t>(layer);
}

// [num_blocks, Hkv, block_size, dim] view of one layer's K or V storage; `self` is the numpy base.
py::array storage_array(py::object self, int64_t layer_arg, bool value) {
  PagedKVCache& c = self.cast<PagedKVCache&>();
  const int32_t layer = check_layer(c, layer_arg, value ? "v_storage" : "k_storage");
  const kv_layer_shape_t& l = c.layer(layer);
  const int64_t dim = value ? l.head_dim_v : l.head_dim;
  py::dtype dt = c.dtype() == dtype_t::f16   ? py::dtype("float16")
                 : c.dtype() == dtype_t::f32 ? py::dtype("float32")
                                             : py::dtype("uint16");  // bfloat16 bits
  const int64_t e = static_cast<int64_t>(dtype_size(c.dtype()));
  std::vector<py::ssize_t> shape = {c.num_blocks(), l.num_kv_heads, c.block_size(), dim};
  std::vector<py::ssize_t> strides = {l.num_kv_heads * c.block_size() * dim * e, c.block_size() * dim * e, dim * e, e};
  void* data = value ? c.v_data(layer) : c.k_data(layer);
  return py::array(dt, shape, strides, data, self);
}

// A contiguous fp32 tensor of exactly `ndim` dimensions.
tensor_view_t f32_view(py::handle obj, const char* name, int ndim) {
  tensor_view_t v = as_view(obj, name);
  v.expect_dtype(dtype_t::f32).expect_ndim(ndim).expect_contiguous();
  return v;
}

void attention_entry(PagedKVCache& cache, int64_t layer_arg, const std::vector<uint64_t>& session_ids,
                     const std::vector<int64_t>& q_starts, py::handle q_obj, const std::vector<int64_t>& cu_seqlens,
                     py::handle out_obj, double scale, int64_t window, double softcap, const std::string& isa_s) {
  const int32_t layer = check_layer(cache, layer_arg, "paged_attention");
  LPIPES_CHECK(cache.dtype() == dtype_t::f16, "paged_attention: the cache must store float16 K/V, got ",
               dtype_name(cache.dtype()));
  const isa_t isa = kv_detail::attention_isa(parse_isa(isa_s));
  const kv_layer_shape_t& shape = cache.layer(layer);
  const size_t B = session_ids.size();
  LPIPES_CHECK(q_starts.size() == B, "paged_attention: q_starts must have one entry per session (", B, "), got ",
               q_starts.size());
  LPIPES_CHECK(cu_seqlens.size() == B + 1, "paged_attention: cu_seqlens must have len(session_ids) + 1 = ", B + 1,
               " entries, got ", cu_seqlens.size());
  tensor_view_t q = f32_view(q_obj, "q", 3);
  tensor_view_t out = f32_view(out_obj, "out", 3);
  const int64_t N = q.size(0), H = q.size(1);
  LPIPES_CHECK(q.size(2) == shape.head_dim, "q: dimension 2 must be the layer's head_dim ", shape.head_dim,
               ", got shape ", q.shape_str());
  LPIPES_CHECK(H >= 1 && H % shape.num_kv_heads == 0, "q: the number of heads (dimension 1, shape ", q.shape_str(),
               ") must be a positive multiple of the layer's num_kv_heads ", shape.num_kv_heads);
  LPIPES_CHECK(H <= std::numeric_limits<int32_t>::max(), "q: too many heads");
  LPIPES_CHECK(out.size(0) == N && out.size(1) == H && out.size(2) == shape.head_dim_v, "out: expected shape [", N,
               ", ", H, ", ", shape.head_dim_v, "], got ", out.shape_str());
  {
    const char* qb = static_cast<const char*>(q.data);
    const char* ob = static_cast<const char*>(out.data);
    const int64_t qn = q.numel() * 4, on = out.numel() * 4;
    LPIPES_CHECK(qn == 0 || on == 0 || qb + qn <= ob || ob + on <= qb, "out: must not overlap q");
  }
  LPIPES_CHECK(cu_seqlens[0] == 0, "cu_seqlens: must start at 0, got ", cu_seqlens[0]);
  LPIPES_CHECK(cu_seqlens[B] == N, "cu_seqlens: must end at q.shape[0] = ", N, ", got ", cu_seqlens[B]);
  LPIPES_CHECK(window >= 0 && window <= std::numeric_limits<int32_t>::max(),
               "window: must be in [0, 2^31) (0 = no sliding window), got ", window);
  LPIPES_CHECK(softcap >= 0.0, "softcap: must be >= 0 (0 = off), got ", softcap);
  std::vector<attention_seq_t> seqs(B);
  for (size_t i = 0; i < B; ++i) {
    const int64_t a = cu_seqlens[i], b = cu_seqlens[i + 1];
    LPIPES_CHECK(a <= b, "cu_seqlens: must be non-decreasing, got ", a, " then ", b, " at index ", i);
    const uint64_t sid = session_ids[i];
    LPIPES_CHECK(cache.has(sid), "session_ids[", i, "]: unknown session ", sid);
    const int64_t cap = cache.capacity(sid);
    LPIPES_CHECK(q_starts[i] >= 0, "q_starts[", i, "]: must be >= 0, got ", q_starts[i]);
    LPIPES_CHECK(q_starts[i] <= cap - (b - a), "q_starts[", i, "] + q_len = ", q_starts[i], " + ", b - a,
                 " exceeds the capacity of session ", sid, " (", cap, " tokens): reserve() and write() first");
    seqs[i] = {sid, q_starts[i], b - a, q.ptr<float>() + a * H * shape.head_dim,
               out.ptr<float>() + a * H * shape.head_dim_v};
  }
  py::gil_scoped_release release;
  paged_attention(cache, layer, seqs.data(), static_cast<int64_t>(B), static_cast<int32_t>(H),
                  static_cast<float>(scale), static_cast<int32_t>(window), static_cast<float>(softcap), isa);
}

}  // namespace

void bind_kvcache(py::module_& m) {
  py::class_<PagedKVCache>(m, "PagedKVCache", R"doc(
Paged KV cache: a budgeted pool of fixed-size blocks, one block table per session.

Args:
    layers: per layer (num_kv_heads, head_dim, head_dim_v).
    block_size: tokens per block (8, 16 or 32).
    budget_bytes: the pool holds budget_bytes // block_bytes blocks (at least one).
    dtype: "float16", "float32" or "bfloat16".

Storage of layer i: K [num_blocks, Hkv, block_size, head_dim], V [num_blocks, Hkv, block_size, head_dim_v].
Sessions are caller-chosen uint64 ids. reserve() is all-or-nothing and raises KVCacheFullError.
)doc")
      .def(py::init([](const std::vector<std::tuple<int64_t, int64_t, int64_t>>& layers, int64_t block_size,
                       int64_t budget_bytes, const std::string& dtype) {
             std::vector<kv_layer_shape_t> shapes;
             shapes.reserve(layers.size());
             for (const auto& t : layers) {
               shapes.push_back({to_i32(std::get<0>(t), "layers: num_kv_heads"), to_i32(std::get<1>(t), "layers: head_dim"),
                                 to_i32(std::get<2>(t), "layers: head_dim_v")});
             }
             return new PagedKVCache(std::move(shapes), to_i32(block_size, "block_size"), budget_bytes,
                                     parse_cache_dtype(dtype));
           }),
           py::arg("layers"), py::arg("block_size"), py::arg("budget_bytes"), py::arg("dtype"))
      .def_property_readonly("num_blocks", &PagedKVCache::num_blocks)
      .def_property_readonly("blocks_used", &PagedKVCache::blocks_used)
      .def_property_readonly("blocks_free", &PagedKVCache::blocks_free)
      .def_property_readonly("peak_blocks_used", &PagedKVCache::peak_blocks_used)
      .def_property_readonly("cache_full_count", &PagedKVCache::cache_full_count,
                             "How many reserve() calls failed with KVCacheFullError.")
      .def_property_readonly("num_sessions", &PagedKVCache::num_sessions)
      .def_property_readonly("block_size", &PagedKVCache::block_size)
      .def_property_readonly("block_bytes", &PagedKVCache::block_bytes, "Bytes of one block over all layers, K and V.")
      .def_property_readonly("num_layers", &PagedKVCache::num_layers)
      .def_property_readonly("dtype", [](const PagedKVCache& c) { return std::string(dtype_name(c.dtype())); })
      .def(
          "layer_shape",
          [](const PagedKVCache& c, int64_t layer) {
            const kv_layer_shape_t& l = c.layer(check_layer(c, layer, "layer_shape"));
            return py::make_tuple(l.num_kv_heads, l.head_dim, l.head_dim_v);
          },
          py::arg("layer"), "(num_kv_heads, head_dim, head_dim_v) of a layer.")
      .def("has", &PagedKVCache::has, py::arg("session"))
      .def("length", &PagedKVCache::length, py::arg("session"), "Committed tokens (0 for an unknown session).")
      .def("capacity", &PagedKVCache::capacity, py::arg("session"), "Reserved token slots (0 for an unknown session).")
      .def("block_table", &PagedKVCache::block_table, py::arg("session"))
      .def("sessions", &PagedKVCache::sessions, "Ids of the sessions held, sorted.")
      .def("reserve", &PagedKVCache::reserve, py::arg("session"), py::arg("n"),
           "Make room for n more tokens after the committed length (all-or-nothing; KVCacheFullError).")
      .def("commit", &PagedKVCache::commit, py::arg("session"), py::arg("new_length"))
      .def("rollback", &PagedKVCache::rollback, py::arg("session"),
           "Back to the committed length, freeing spare blocks; a session of length 0 disappears.")
      .def("free", &PagedKVCache::free, py::arg("session"))
      .def(
          "write",
          [](PagedKVCache& c, int64_t layer_arg, uint64_t session, int64_t pos, py::handle k_obj, py::handle v_obj) {
            const int32_t layer = check_layer(c, layer_arg, "write");
            const kv_layer_shape_t& l = c.layer(layer);
            tensor_view_t k = f32_view(k_obj, "k", 3);
            tensor_view_t v = f32_view(v_obj, "v", 3);
            const int64_t T = k.size(0);
            LPIPES_CHECK(k.size(1) == l.num_kv_heads && k.size(2) == l.head_dim, "k: expected shape [T, ",
                         l.num_kv_heads, ", ", l.head_dim, "], got ", k.shape_str());
            LPIPES_CHECK(v.size(0) == T && v.size(1) == l.num_kv_heads && v.size(2) == l.head_dim_v,
                         "v: expected shape [", T, ", ", l.num_kv_heads, ", ", l.head_dim_v, "], got ", v.shape_str());
            py::gil_scoped_release release;
            c.write(layer, session, pos, T, k.ptr<float>(), v.ptr<float>());
          },
          py::arg("layer"), py::arg("session"), py::arg("pos"), py::arg("k"), py::arg("v"),
          "Store fp32 k [T, Hkv, D] and v [T, Hkv, Dv] at positions [pos, pos + T), within [length, capacity).")
      .def(
          "k_storage", [](py::object self, int64_t layer) { return storage_array(self, layer, false); },
          py::arg("layer"),
          "Zero-copy numpy view [num_blocks, Hkv, block_size, head_dim] of a layer's K storage "
          "(float16 / float32; bfloat16 storage comes as uint16 bits). It keeps the cache alive.")
      .def(
          "v_storage", [](py::object self, int64_t layer) { return storage_array(self, layer, true); },
          py::arg("layer"), "Like k_storage, for V: [num_blocks, Hkv, block_size, head_dim_v].");

  m.def("paged_attention", &attention_entry, py::arg("cache"), py::arg("layer"), py::arg("session_ids"),
        py::arg("q_starts"), py::arg("q"), py::arg("cu_seqlens"), py::arg("out"), py::arg("scale"),
        py::arg("window") = 0, py::arg("softcap") = 0.0, py::arg("isa") = "auto",
        R"doc(
Causal attention of new query tokens over the paged fp16 cache, for one layer and several sessions.

q: [N, H, D] fp32, the sessions' tokens packed in order (session i owns rows cu_seqlens[i]:cu_seqlens[i+1]);
its first token sits at absolute position q_starts[i]. out: [N, H, Dv] fp32, written. The keys of every query
position must have been written. window > 0: a sliding window of `window` tokens including the query;
softcap > 0: scores = softcap * tanh(scores / softcap). isa: "auto", "scalar", "avx2" or "avx512".
)doc");
  m.def(
      "paged_attention_isa", [](const std::string& isa) { return isa_name(kv_detail::attention_isa(parse_isa(isa))); },
      py::arg("isa") = "auto", "The variant paged_attention runs for `isa` on this CPU (NativeError if unsupported).");
}

}  // namespace lpipes
