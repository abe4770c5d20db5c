// Paged attention over the fp16 KV cache (see lpipes/kv_cache.h), with the scalar twins of its inner loops.
//
// Work items are (sequence, KV head, query tile[, key chunk]): one item computes the G = H / Hkv query
// heads that share a KV head for up to `tile` query tokens, so each K/V block is read once for all of
// them. Keys are read straight from the blocks through the block table, one block at a time:
//   S = Q·K_blockᵀ (fp32) → softcap → per-row mask (causal, window) → online softmax → acc += P·V_block.
// When there are too few items to keep every thread busy (decode of one session with few KV heads),
// long key ranges are split into chunks whose partial softmax states are merged at the end
// (flash-decoding). Items are handed out dynamically, largest first.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "lpipes/cpu_features.h"
#include "lpipes/half.h"
#include "lpipes/kv_cache.h"
#include "lpipes/threadpool.h"

namespace lpipes {
namespace kv_detail {
namespace {

// ---------------------------------------------------------------- scalar twins
void qk_scalar(const float* q, int64_t rows, const f16_t* k, int64_t nk, int64_t D, float* s, int64_t s_stride) {
  float kf[512];
  for (int64_t j = 0; j < nk; ++j) {
    const f16_t* kj = k + j * D;
    for (int64_t d0 = 0; d0 < D; d0 += 512) {  // convert the key once per 512-wide slice
      const int64_t n = std::min<int64_t>(512, D - d0);
      for (int64_t d = 0; d < n; ++d) kf[d] = lpipes::f16_to_f32(kj[d0 + d]);
      for (int64_t r = 0; r < rows; ++r) {
        const float* qr = q + r * D + d0;
        float acc = 0.f;
        for (int64_t d = 0; d < n; ++d) acc += qr[d] * kf[d];
        if (d0 == 0) s[r * s_stride + j] = acc;
        else s[r * s_stride + j] += acc;
      }
    }
  }
}

void pv_scalar(const float* p, int64_t rows, int64_t p_stride, const f16_t* v, int64_t nk, int64_t Dv, float* acc) {
  float vf[512];
  for (int64_t j = 0; j < nk; ++j) {
    const f16_t* vj = v + j * Dv;
    for (int64_t d0 = 0; d0 < Dv; d0 += 512) {
      const int64_t n = std::min<int64_t>(512, Dv - d0);
      for (int64_t d = 0; d < n; ++d) vf[d] = lpipes::f16_to_f32(vj[d0 + d]);
      for (int64_t r = 0; r < rows; ++r) {
        const float w = p[r * p_stride + j];
        if (w == 0.f) continue;
        float* ar = acc + r * Dv + d0;
        for (int64_t d = 0; d < n; ++d) ar[d] += w * vf[d];
      }
    }
  }
}

float exp_sum_scalar(float* x, int64_t n, float m) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  return sum;
}

void to_f16_scalar(const float* src, int64_t n, f16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = lpipes::f32_to_f16(src[i]);
}

float max_of_scalar(const float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

void scale_scalar(float* x, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

const attn_kernels_t kScalar = {qk_scalar, pv_scalar, exp_sum_scalar, to_f16_scalar, max_of_scalar, scale_scalar};

}  // namespace

isa_t attention_isa(isa_t requested) {
#if defined(LPIPES_X86)
  static const std::string best = best_isa();
  const bool has512 = best == "avx512";
  const bool has2 = has512 || best == "avx2";
#else
  const bool has512 = false, has2 = false;
#endif
  switch (requested) {
    case isa_t::automatic: return has512 ? isa_t::avx512 : has2 ? isa_t::avx2 : isa_t::scalar;
    case isa_t::scalar: return isa_t::scalar;
    case isa_t::avx2:
      LPIPES_CHECK(has2, "isa: avx2 (with FMA and F16C) is not supported by this CPU or build");
      return isa_t::avx2;
    case isa_t::avx512:
      LPIPES_CHECK(has512, "isa: avx512 (F, BW, VL with FMA and F16C) is not supported by this CPU or build");
      return isa_t::avx512;
  }
  fail("isa: unknown variant ", static_cast<int>(requested));
}

const attn_kernels_t& attn_kernels(isa_t resolved) {
#if defined(LPIPES_X86)
  if (resolved == isa_t::avx512) return attn_kernels_avx512();
  if (resolved == isa_t::avx2) return attn_kernels_avx2();
#endif
  (void)resolved;
  return kScalar;
}

}  // namespace kv_detail

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kTileRows = 32;      // query rows (tokens x heads of a group) per work item
constexpr int64_t kMinChunkKeys = 256;  // smallest key range worth a split
constexpr int64_t kChunkKeys = 64;      // keys per online-softmax step (amortises the per-row work)

struct item_t {
  int32_t seq;
  int32_t kvh;
  int64_t t0, t1;  // query tokens [t0, t1) of the sequence
  int64_t k0, k1;  // key positions [k0, k1)
  int64_t part;    // index of this item's partial state, or -1 when it writes `out` directly
  int64_t cost;
};

struct group_t {  // items of one (seq, kvh, tile) whose key range was split
  int64_t first_item, num_items;
};

struct params_t {
  const PagedKVCache* cache;
  int32_t layer;
  const attention_seq_t* seqs;
  const std::vector<const std::vector<int32_t>*>* tables;
  int64_t H, Hkv, G, D, Dv, bs;
  float scale, softcap;
  int64_t window;
  int64_t chunk;  // keys per online-softmax step (a multiple of bs)
  const kv_detail::attn_kernels_t* kern;
};

// Per-thread scratch, sized for the largest item.
struct scratch_t {
  std::vector<float> q, acc, s, m, l;
};

// Partial softmax states of split items: m, l [rows] and acc [rows, Dv] each.
struct partials_t {
  int64_t rows_max = 0, Dv = 0;
  std::vector<float> data;
  float* m(int64_t part) { return data.data() + part * stride(); }
  float* l(int64_t part) { return m(part) + rows_max; }
  float* acc(int64_t part) { return l(part) + rows_max; }
  int64_t stride() const { return rows_max * (2 + Dv); }
};

void run_item(const params_t& P, const item_t& it, scratch_t& sc, partials_t& parts) {
  const attention_seq_t& sq = P.seqs[it.seq];
  const std::vector<int32_t>& table = *(*P.tables)[it.seq];
  const int64_t G = P.G, D = P.D, Dv = P.Dv, bs = P.bs, H = P.H, Hkv = P.Hkv;
  const int64_t nt = it.t1 - it.t0, R = nt * G;
  float* qp = sc.q.data();
  float* acc = sc.acc.data();
  float* S = sc.s.data();
  float* m = sc.m.data();
  float* l = sc.l.data();
  for (int64_t t = 0; t < nt; ++t) {  // rows ordered (token, head in group); the scale folded into q
    for (int64_t g = 0; g < G; ++g) {
      const float* src = sq.q + ((it.t0 + t) * H + it.kvh * G + g) * D;
      float* dst = qp + (t * G + g) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * P.scale;
    }
  }
  std::fill(acc, acc + R * Dv, 0.f);
  std::fill(m, m + R, kNegInf);
  std::fill(l, l + R, 0.f);

  const auto* kbase = static_cast<const f16_t*>(P.cache->k_data(P.layer));
  const auto* vbase = static_cast<const f16_t*>(P.cache->v_data(P.layer));
  const kv_detail::attn_kernels_t& K = *P.kern;
  const float cap = P.softcap, inv_cap = cap > 0.f ? 1.f / cap : 0.f;
  const int64_t KC = P.chunk;  // keys per softmax step: whole blocks, S row stride
  const int64_t kstride = Hkv * bs * D, vstride = Hkv * bs * Dv;  // elements per block
  const f16_t* kh = kbase + it.kvh * bs * D;                      // this KV head in block 0
  const f16_t* vh = vbase + it.kvh * bs * Dv;
  auto prefetch = [](const f16_t* p, int64_t elems) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t off = 0; off < elems * 2; off += 64) __builtin_prefetch(c + off);
  };
  const int64_t last_block = (it.k1 - 1) / bs;

  for (int64_t cb = it.k0 / bs; cb * bs < it.k1; cb += KC / bs) {
    const int64_t j0 = std::max(it.k0, cb * bs), j1 = std::min(it.k1, (cb + KC / bs) * bs);
    // S[:, 0 .. j1 - j0) = Q · K[j0 .. j1)ᵀ, block by block (blocks are scattered: prefetch the next)
    for (int64_t bi = cb; bi * bs < j1; ++bi) {
      const int64_t b0 = std::max(j0, bi * bs), b1 = std::min(j1, (bi + 1) * bs);
      if (bi < last_block) prefetch(kh + table[static_cast<size_t>(bi + 1)] * kstride, bs * D);
      const f16_t* kp = kh + table[static_cast<size_t>(bi)] * kstride + (b0 - bi * bs) * D;
      K.qk(qp, R, kp, b1 - b0, D, S + (b0 - j0), KC);
    }
    // online softmax per row over its visible keys [a, b) of the chunk; invisible ones get p = 0
    const int64_t nk = j1 - j0;
    bool any = false;
    for (int64_t r = 0; r < R; ++r) {
      float* sr = S + r * KC;
      const int64_t qpos = sq.q_start + it.t0 + r / G;
      const int64_t lo = P.window > 0 ? qpos - P.window + 1 : 0;
      const int64_t a = std::max<int64_t>(lo, j0) - j0, b = std::min<int64_t>(qpos + 1, j1) - j0;
      if (a >= b) {
        std::fill(sr, sr + nk, 0.f);
        continue;
      }
      any = true;
      if (cap > 0.f) {
        for (int64_t i = a; i < b; ++i) sr[i] = cap * std::tanh(sr[i] * inv_cap);
      }
      const float mb = K.max_of(sr + a, b - a);
      if (mb > m[r]) {
        if (m[r] != kNegInf) {
          const float corr = std::exp(m[r] - mb);
          l[r] *= corr;
          K.scale(acc + r * Dv, Dv, corr);
        }
        m[r] = mb;
      }
      // m[r] is -inf only when every score so far is -inf (infinite inputs): keep NaN out of the sums.
      l[r] += K.exp_sum(sr + a, b - a, m[r] == kNegInf ? 0.f : m[r]);
      std::fill(sr, sr + a, 0.f);
      std::fill(sr + b, sr + nk, 0.f);
    }
    if (!any) continue;
    // acc += P · V[j0 .. j1)
    for (int64_t bi = cb; bi * bs < j1; ++bi) {
      const int64_t b0 = std::max(j0, bi * bs), b1 = std::min(j1, (bi + 1) * bs);
      if (bi < last_block) prefetch(vh + table[static_cast<size_t>(bi + 1)] * vstride, bs * Dv);
      const f16_t* vp = vh + table[static_cast<size_t>(bi)] * vstride + (b0 - bi * bs) * Dv;
      K.pv(S + (b0 - j0), R, KC, vp, b1 - b0, Dv, acc);
    }
  }

  if (it.part < 0) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t t = it.t0 + r / G, h = it.kvh * G + r % G;
      float* dst = sq.out + (t * H + h) * Dv;
      const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
      const float* ar = acc + r * Dv;
      for (int64_t d = 0; d < Dv; ++d) dst[d] = ar[d] * inv;
    }
  } else {
    std::copy(m, m + R, parts.m(it.part));
    std::copy(l, l + R, parts.l(it.part));
    std::copy(acc, acc + R * Dv, parts.acc(it.part));
  }
}

// out rows of a split (seq, kvh, tile) from its chunks' partial states.
void merge_group(const params_t& P, const std::vector<item_t>& items, const group_t& g, partials_t& parts) {
  const item_t& first = items[static_cast<size_t>(g.first_item)];
  const attention_seq_t& sq = P.seqs[first.seq];
  const int64_t G = P.G, Dv = P.Dv, H = P.H;
  const int64_t R = (first.t1 - first.t0) * G;
  for (int64_t r = 0; r < R; ++r) {
    float M = kNegInf;
    for (int64_t i = 0; i < g.num_items; ++i) M = std::max(M, parts.m(items[g.first_item + i].part)[r]);
    const int64_t t = first.t0 + r / G, h = first.kvh * G + r % G;
    float* dst = sq.out + (t * H + h) * Dv;
    std::fill(dst, dst + Dv, 0.f);
    float L = 0.f;
    for (int64_t i = 0; i < g.num_items; ++i) {
      const int64_t part = items[g.first_item + i].part;
      const float mi = parts.m(part)[r];
      if (mi == kNegInf) continue;  // no key of this chunk is visible to the row
      const float w = std::exp(mi - M);
      L += parts.l(part)[r] * w;
      const float* a = parts.acc(part) + r * Dv;
      for (int64_t d = 0; d < Dv; ++d) dst[d] += w * a[d];
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    for (int64_t d = 0; d < Dv; ++d) dst[d] *= inv;
  }
}

}  // namespace

void paged_attention(const PagedKVCache& cache, int32_t layer, const attention_seq_t* seqs, int64_t num_seqs,
                     int32_t num_heads, float scale, int32_t window, float softcap, isa_t isa) {
  LPIPES_CHECK(cache.dtype() == dtype_t::f16, "paged_attention: the cache must store float16 K/V, got ",
               dtype_name(cache.dtype()));
  LPIPES_CHECK(layer >= 0 && layer < cache.num_layers(), "paged_attention: layer must be in [0, ",
               cache.num_layers(), "), got ", layer);
  LPIPES_CHECK(num_seqs >= 0, "paged_attention: num_seqs must be >= 0, got ", num_seqs);
  LPIPES_CHECK(num_seqs == 0 || seqs != nullptr, "paged_attention: seqs must not be null");
  const kv_layer_shape_t& shape = cache.layer(layer);
  LPIPES_CHECK(num_heads >= 1 && num_heads % shape.num_kv_heads == 0, "paged_attention: num_heads (", num_heads,
               ") must be a positive multiple of the layer's num_kv_heads (", shape.num_kv_heads, ")");
  LPIPES_CHECK(window >= 0, "paged_attention: window must be >= 0 (0 = no window), got ", window);
  LPIPES_CHECK(std::isfinite(scale), "paged_attention: scale must be finite, got ", scale);
  LPIPES_CHECK(std::isfinite(softcap) && softcap >= 0.f, "paged_attention: softcap must be >= 0 (0 = off), got ",
               softcap);
  const kv_detail::attn_kernels_t& kern = kv_detail::attn_kernels(kv_detail::attention_isa(isa));

  params_t P;
  P.cache = &cache;
  P.layer = layer;
  P.seqs = seqs;
  P.H = num_heads;
  P.Hkv = shape.num_kv_heads;
  P.G = P.H / P.Hkv;
  P.D = shape.head_dim;
  P.Dv = shape.head_dim_v;
  P.bs = cache.block_size();
  P.scale = scale;
  P.softcap = softcap;
  P.window = window;
  P.chunk = std::max<int64_t>(P.bs, kChunkKeys);
  P.kern = &kern;

  std::vector<const std::vector<int32_t>*> tables(static_cast<size_t>(num_seqs));
  for (int64_t i = 0; i < num_seqs; ++i) {
    const attention_seq_t& s = seqs[i];
    tables[i] = &cache.table_ref(s.session);  // throws for an unknown session
    const int64_t cap = static_cast<int64_t>(tables[i]->size()) * P.bs;
    LPIPES_CHECK(s.q_len >= 0 && s.q_start >= 0, "paged_attention: sequence ", i, ": q_start and q_len must be >= 0, got ",
                 s.q_start, " and ", s.q_len);
    LPIPES_CHECK(s.q_len <= cap - s.q_start, "paged_attention: sequence ", i, " (session ", s.session,
                 "): q_start + q_len = ", s.q_start + s.q_len, " exceeds the session's capacity of ", cap,
                 " tokens (reserve() and write() the keys first)");
    LPIPES_CHECK(s.q_len == 0 || (s.q != nullptr && s.out != nullptr), "paged_attention: sequence ", i,
                 ": q and out must not be null");
  }
  P.tables = &tables;

  // Query tiles: about kTileRows rows (tokens x grouped heads) per item.
  const int64_t tile = std::max<int64_t>(1, kTileRows / P.G);
  std::vector<item_t> items;
  int64_t base_items = 0;
  for (int64_t i = 0; i < num_seqs; ++i) base_items += P.Hkv * ((seqs[i].q_len + tile - 1) / tile);
  const int64_t threads = ThreadPool::instance().num_threads();
  const int64_t want = 4 * threads;  // enough items to balance the load
  const int64_t split_goal = base_items > 0 && base_items < want ? (want + base_items - 1) / base_items : 1;

  std::vector<group_t> groups;
  int64_t num_parts = 0;
  int64_t rows_max = 0;
  for (int64_t i = 0; i < num_seqs; ++i) {
    const attention_seq_t& s = seqs[i];
    for (int64_t t0 = 0; t0 < s.q_len; t0 += tile) {
      const int64_t t1 = std::min(s.q_len, t0 + tile);
      const int64_t k1 = s.q_start + t1;
      const int64_t k0 = window > 0 ? std::max<int64_t>(0, s.q_start + t0 - window + 1) : 0;
      const int64_t nkeys = k1 - k0;
      rows_max = std::max(rows_max, (t1 - t0) * P.G);
      int64_t splits = std::min(split_goal, std::max<int64_t>(1, nkeys / kMinChunkKeys));
      int64_t chunk = nkeys;
      if (splits > 1) {
        chunk = ((nkeys + splits - 1) / splits + P.bs - 1) / P.bs * P.bs;
        splits = (nkeys + chunk - 1) / chunk;
      }
      for (int64_t kvh = 0; kvh < P.Hkv; ++kvh) {
        if (splits > 1) groups.push_back({static_cast<int64_t>(items.size()), splits});
        for (int64_t c = 0; c < splits; ++c) {
          item_t it;
          it.seq = static_cast<int32_t>(i);
          it.kvh = static_cast<int32_t>(kvh);
          it.t0 = t0;
          it.t1 = t1;
          it.k0 = k0 + c * chunk;
          it.k1 = std::min(k1, it.k0 + chunk);
          it.part = splits > 1 ? num_parts++ : -1;
          it.cost = (t1 - t0) * (it.k1 - it.k0);
          items.push_back(it);
        }
      }
    }
  }
  if (items.empty()) return;
  std::vector<int64_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return items[a].cost > items[b].cost; });

  partials_t parts;
  parts.rows_max = rows_max;
  parts.Dv = P.Dv;
  parts.data.resize(static_cast<size_t>(num_parts * parts.stride()));

  const int64_t slots = std::min<int64_t>(threads, static_cast<int64_t>(items.size()));
  std::vector<scratch_t> scratch(static_cast<size_t>(slots));
  for (scratch_t& sc : scratch) {  // allocate here: nothing may throw inside the parallel region
    sc.q.resize(static_cast<size_t>(rows_max * P.D));
    sc.acc.resize(static_cast<size_t>(rows_max * P.Dv));
    sc.s.resize(static_cast<size_t>(rows_max * P.chunk));
    sc.m.resize(static_cast<size_t>(rows_max));
    sc.l.resize(static_cast<size_t>(rows_max));
  }
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  parallel_for(slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      for (;;) {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        if (i >= n_items) break;
        run_item(P, items[static_cast<size_t>(order[i])], scratch[static_cast<size_t>(slot)], parts);
      }
    }
  });
  if (!groups.empty()) {
    parallel_for(static_cast<int64_t>(groups.size()), 4, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) merge_group(P, items, groups[static_cast<size_t>(g)], parts);
    });
  }
}

}  // namespace lpipes
