#include "lpipes/native_span.h"

#include <cstring>

namespace lpipes {

NativeSpan::NativeSpan(const native_config_t& cfg, std::vector<native_layer_t> layers)
    : cfg_(cfg), layers_(std::move(layers)) {
  LPIPES_CHECK(cfg.hidden > 0 && cfg.num_heads > 0 && cfg.num_kv_heads > 0 && cfg.head_dim > 0 && cfg.intermediate > 0,
               "NativeSpan: all dimensions must be positive");
  LPIPES_CHECK(cfg.num_heads % cfg.num_kv_heads == 0, "NativeSpan: num_heads (", cfg.num_heads,
               ") must be a multiple of num_kv_heads (", cfg.num_kv_heads, ")");
  LPIPES_CHECK(!layers_.empty(), "NativeSpan: a span needs at least one layer");
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& l = layers_[i];
    LPIPES_CHECK(l.qkv && l.o && l.gate_up && l.down && l.input_norm && l.post_attn_norm, "NativeSpan: layer ", i,
                 " lacks a required weight");
    LPIPES_CHECK(!cfg.sandwich_norms || (l.pre_ff_norm && l.post_ff_norm), "NativeSpan: layer ", i,
                 " lacks the Gemma feed-forward norms");
  }
}

void NativeSpan::forward(PagedKVCache& cache, float* h, const std::vector<native_seq_t>& seqs,
                         const std::vector<const float*>& cos, const std::vector<const float*>& sin, int64_t rot,
                         isa_t isa) const {
  const native_config_t& c = cfg_;
  LPIPES_CHECK(cache.num_layers() == num_layers(), "NativeSpan.forward: the cache has ", cache.num_layers(),
               " layers, the span ", num_layers());
  LPIPES_CHECK(cos.size() == sin.size() && !cos.empty(), "NativeSpan.forward: need matching cos/sin tables");
  LPIPES_CHECK(rot > 0 && rot <= c.head_dim && rot % 2 == 0, "NativeSpan.forward: rotary dim ", rot,
               " must be even and in (0, head_dim=", c.head_dim, "]");
  int64_t n = 0;
  for (const auto& s : seqs) {
    LPIPES_CHECK(s.q_len > 0 && s.q_start >= 0, "NativeSpan.forward: bad sequence (q_start ", s.q_start, ", q_len ",
                 s.q_len, ")");
    LPIPES_CHECK(cache.capacity(s.session) >= s.q_start + s.q_len, "NativeSpan.forward: session ", s.session,
                 " has room for ", cache.capacity(s.session), " tokens, needs ", s.q_start + s.q_len,
                 " (reserve first)");
    n += s.q_len;
  }
  LPIPES_CHECK(n > 0, "NativeSpan.forward: empty batch");
  for (const auto& l : layers_) {
    LPIPES_CHECK(l.rope_table >= 0 && static_cast<size_t>(l.rope_table) < cos.size(),
                 "NativeSpan.forward: layer refers to rope table ", l.rope_table, " of ", cos.size());
  }
  for (int64_t i = 0; i < cache.num_layers(); ++i) {
    const auto& shape = cache.layer(static_cast<int32_t>(i));
    LPIPES_CHECK(shape.num_kv_heads == c.num_kv_heads && shape.head_dim == c.head_dim &&
                     shape.head_dim_v == c.head_dim,
                 "NativeSpan.forward: cache layer ", i, " shape does not match the model");
  }

  const int64_t H = c.hidden, D = c.head_dim, nq = c.num_heads * D, nkv = c.num_kv_heads * D;
  const int64_t nqkv = nq + 2 * nkv, I = c.intermediate;
  std::vector<float> x(n * H), qkv(n * nqkv), q(n * nq), k(n * nkv), v(n * nkv), attn(n * nq), tmp(n * H),
      gu(n * 2 * I), act(n * I);
  std::vector<attention_seq_t> aseqs(seqs.size());

  for (size_t li = 0; li < layers_.size(); ++li) {
    const native_layer_t& L = layers_[li];
    const int32_t layer = static_cast<int32_t>(li);
    // --- attention block
    rms_norm(h, n, H, L.input_norm, c.eps, c.norm_offset, x.data(), isa);
    linear_f16(x.data(), n, H, L.qkv, nqkv, L.qkv_bias, qkv.data(), false, isa);
    for (int64_t t = 0; t < n; ++t) {  // split the fused rows into contiguous q / k / v
      const float* row = qkv.data() + t * nqkv;
      std::memcpy(q.data() + t * nq, row, nq * sizeof(float));
      std::memcpy(k.data() + t * nkv, row + nq, nkv * sizeof(float));
      std::memcpy(v.data() + t * nkv, row + nq + nkv, nkv * sizeof(float));
    }
    if (L.q_norm) rms_norm(q.data(), n * c.num_heads, D, L.q_norm, c.eps, c.norm_offset, q.data(), isa);
    if (L.k_norm) rms_norm(k.data(), n * c.num_kv_heads, D, L.k_norm, c.eps, c.norm_offset, k.data(), isa);
    rope(q.data(), n, c.num_heads, D, cos[L.rope_table], sin[L.rope_table], rot, isa);
    rope(k.data(), n, c.num_kv_heads, D, cos[L.rope_table], sin[L.rope_table], rot, isa);
    int64_t off = 0;
    for (size_t s = 0; s < seqs.size(); ++s) {
      const auto& sq = seqs[s];
      cache.write(layer, sq.session, sq.q_start, sq.q_len, k.data() + off * nkv, v.data() + off * nkv);
      aseqs[s] = attention_seq_t{sq.session, sq.q_start, sq.q_len, q.data() + off * nq, attn.data() + off * nq};
      off += sq.q_len;
    }
    paged_attention(cache, layer, aseqs.data(), static_cast<int64_t>(aseqs.size()), static_cast<int32_t>(c.num_heads),
                    L.scale, L.window, 0.f, isa);
    if (c.sandwich_norms) {
      linear_f16(attn.data(), n, nq, L.o, H, nullptr, tmp.data(), false, isa);
      rms_norm(tmp.data(), n, H, L.post_attn_norm, c.eps, c.norm_offset, tmp.data(), isa);
      for (int64_t i = 0; i < n * H; ++i) h[i] += tmp[i];
    } else {
      linear_f16(attn.data(), n, nq, L.o, H, nullptr, h, true, isa);  // residual add fused
    }
    // --- feed-forward block
    rms_norm(h, n, H, c.sandwich_norms ? L.pre_ff_norm : L.post_attn_norm, c.eps, c.norm_offset, x.data(), isa);
    linear_f16(x.data(), n, H, L.gate_up, 2 * I, nullptr, gu.data(), false, isa);
    act_mul(gu.data(), n, I, c.act, act.data(), isa);
    if (c.sandwich_norms) {
      linear_f16(act.data(), n, I, L.down, H, nullptr, tmp.data(), false, isa);
      rms_norm(tmp.data(), n, H, L.post_ff_norm, c.eps, c.norm_offset, tmp.data(), isa);
      for (int64_t i = 0; i < n * H; ++i) h[i] += tmp[i];
    } else {
      linear_f16(act.data(), n, I, L.down, H, nullptr, h, true, isa);
    }
  }
}

}  // namespace lpipes
