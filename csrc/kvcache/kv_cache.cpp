// Paged KV cache: a budgeted pool of fixed-size blocks shared by all layers of a span, a stack of
// free block ids and one block table per session (see lpipes/kv_cache.h for the contract).
#include "lpipes/kv_cache.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "lpipes/half.h"

namespace lpipes {
namespace {

constexpr size_t kAlign = 64;
constexpr size_t kHugePage = size_t{2} << 20;

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) fail("PagedKVCache: ", what, " overflows int64 (", a, " * ", b, ")");
  return r;
}

int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) fail("PagedKVCache: ", what, " overflows int64 (", a, " + ", b, ")");
  return r;
}

// Zero-initialised storage that costs no memory until written: anonymous mappings are backed by
// the shared zero page until touched, so a large budget is only committed as sessions fill blocks.
// 2 MiB aligned with transparent huge pages when large (attention reads one block per 4 KiB page
// otherwise, and TLB misses dominate). Returns the aligned pointer and records the mapping to release.
void* alloc_zeroed(int64_t bytes, std::vector<std::pair<void*, size_t>>& mappings) {
  const size_t n = static_cast<size_t>(bytes);
  const size_t align = n >= kHugePage ? kHugePage : kAlign;
  if (n > std::numeric_limits<size_t>::max() - 2 * align) return nullptr;
  const size_t rounded = n == 0 ? align : (n + align - 1) / align * align;
#if defined(__linux__)
  const size_t len = rounded + align;  // slack to align the start
  void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  mappings.emplace_back(base, len);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(base);
  void* p = reinterpret_cast<void*>((addr + align - 1) / align * align);
#if defined(MADV_HUGEPAGE)
  if (align == kHugePage) (void)madvise(p, rounded, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
  return p;
#else
  void* p = std::aligned_alloc(align, rounded);
  if (p == nullptr) return nullptr;
  mappings.emplace_back(p, 0);
  std::memset(p, 0, rounded);
  return p;
#endif
}

void release(std::vector<std::pair<void*, size_t>>& mappings) {
  for (auto& [base, len] : mappings) {
#if defined(__linux__)
    munmap(base, len);
#else
    (void)len;
    std::free(base);
#endif
  }
  mappings.clear();
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);  // quiet NaN
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

}  // namespace

PagedKVCache::PagedKVCache(std::vector<kv_layer_shape_t> layers, int32_t block_size, int64_t budget_bytes,
                           dtype_t dtype)
    : layers_(std::move(layers)), block_size_(block_size), dtype_(dtype) {
  LPIPES_CHECK(block_size == 8 || block_size == 16 || block_size == 32,
               "PagedKVCache: block_size must be 8, 16 or 32, got ", block_size);
  LPIPES_CHECK(!layers_.empty(), "PagedKVCache: layers must not be empty");
  LPIPES_CHECK(dtype == dtype_t::f16 || dtype == dtype_t::f32 || dtype == dtype_t::bf16,
               "PagedKVCache: dtype must be float16, float32 or bfloat16, got ", dtype_name(dtype));
  LPIPES_CHECK(budget_bytes > 0, "PagedKVCache: budget_bytes must be positive, got ", budget_bytes);
  const int64_t elem = static_cast<int64_t>(dtype_size(dtype));
  int64_t per_block = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const kv_layer_shape_t& l = layers_[i];
    LPIPES_CHECK(l.num_kv_heads >= 1 && l.head_dim >= 1 && l.head_dim_v >= 1, "PagedKVCache: layer ", i,
                 ": num_kv_heads, head_dim and head_dim_v must be >= 1, got (", l.num_kv_heads, ", ", l.head_dim,
                 ", ", l.head_dim_v, ")");
    const int64_t dims = checked_add(l.head_dim, l.head_dim_v, "head_dim + head_dim_v");
    const int64_t layer_bytes =
        checked_mul(checked_mul(checked_mul(l.num_kv_heads, block_size, "block elements"), dims, "block elements"),
                    elem, "block bytes");
    per_block = checked_add(per_block, layer_bytes, "block bytes");
  }
  block_bytes_ = per_block;
  num_blocks_ = budget_bytes / block_bytes_;
  if (num_blocks_ < 1) {
    fail("PagedKVCache: budget_bytes (", budget_bytes, ") is smaller than one block (", block_bytes_,
         " bytes: block_size ", block_size, " tokens over ", layers_.size(), " layers, K and V, ", dtype_name(dtype),
         ")");
  }
  // Block ids are int32 in the block tables.
  num_blocks_ = std::min<int64_t>(num_blocks_, std::numeric_limits<int32_t>::max());

  k_.assign(layers_.size(), nullptr);
  v_.assign(layers_.size(), nullptr);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const kv_layer_shape_t& l = layers_[i];
    const int64_t per_head_block = checked_mul(l.num_kv_heads, block_size, "block elements");
    const int64_t k_bytes = checked_mul(checked_mul(checked_mul(num_blocks_, per_head_block, "K storage"), l.head_dim,
                                                    "K storage"),
                                        elem, "K storage");
    const int64_t v_bytes = checked_mul(
        checked_mul(checked_mul(num_blocks_, per_head_block, "V storage"), l.head_dim_v, "V storage"), elem,
        "V storage");
    k_[i] = alloc_zeroed(k_bytes, mappings_);
    v_[i] = alloc_zeroed(v_bytes, mappings_);
    if (k_[i] == nullptr || v_[i] == nullptr) {
      release(mappings_);
      k_.clear();
      v_.clear();
      fail("PagedKVCache: could not allocate ", k_bytes + v_bytes, " bytes of KV storage for layer ", i);
    }
  }
  free_blocks_.reserve(static_cast<size_t>(num_blocks_));
  for (int64_t b = num_blocks_ - 1; b >= 0; --b) free_blocks_.push_back(static_cast<int32_t>(b));
}

PagedKVCache::~PagedKVCache() { release(mappings_); }

int64_t PagedKVCache::blocks_used() const {
  std::lock_guard<std::mutex> lock(mu_);
  return num_blocks_ - static_cast<int64_t>(free_blocks_.size());
}

int64_t PagedKVCache::peak_blocks_used() const {
  std::lock_guard<std::mutex> lock(mu_);
  return peak_used_;
}

int64_t PagedKVCache::num_sessions() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(sessions_.size());
}

int64_t PagedKVCache::cache_full_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return full_count_;
}

bool PagedKVCache::has(uint64_t session) const {
  std::lock_guard<std::mutex> lock(mu_);
  return sessions_.count(session) != 0;
}

int64_t PagedKVCache::length(uint64_t session) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(session);
  return it == sessions_.end() ? 0 : it->second.length;
}

int64_t PagedKVCache::capacity(uint64_t session) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(session);
  return it == sessions_.end() ? 0 : static_cast<int64_t>(it->second.blocks.size()) * block_size_;
}

std::vector<int32_t> PagedKVCache::block_table(uint64_t session) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(session);
  LPIPES_CHECK(it != sessions_.end(), "PagedKVCache.block_table: unknown session ", session);
  return it->second.blocks;
}

const std::vector<int32_t>& PagedKVCache::table_ref(uint64_t session) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(session);
  LPIPES_CHECK(it != sessions_.end(), "paged_attention: unknown session ", session);
  return it->second.blocks;  // unordered_map references stay valid until the element is erased
}

std::vector<uint64_t> PagedKVCache::sessions() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<uint64_t> out;
  out.reserve(sessions_.size());
  for (const auto& kv : sessions_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

void PagedKVCache::reserve(uint64_t session, int64_t n) {
  LPIPES_CHECK(n >= 0, "PagedKVCache.reserve: n must be >= 0, got ", n);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(session);
  const int64_t length = it == sessions_.end() ? 0 : it->second.length;
  const int64_t have = it == sessions_.end() ? 0 : static_cast<int64_t>(it->second.blocks.size());
  LPIPES_CHECK(n <= std::numeric_limits<int64_t>::max() - length - block_size_,
               "PagedKVCache.reserve: n = ", n, " is too large");
  const int64_t need_blocks = (length + n + block_size_ - 1) / block_size_;
  const int64_t more = std::max<int64_t>(0, need_blocks - have);
  const int64_t free_now = static_cast<int64_t>(free_blocks_.size());
  if (more > free_now) {
    ++full_count_;
    std::ostringstream os;
    os << "KV cache full: session " << session << " needs " << more << " more blocks, " << free_now << " of "
       << num_blocks_ << " free (block_size " << block_size_ << ")";
    throw cache_full_error(os.str());
  }
  session_t& s = it == sessions_.end() ? sessions_[session] : it->second;  // may throw bad_alloc: nothing changed yet
  s.blocks.reserve(static_cast<size_t>(need_blocks > have ? need_blocks : have));
  for (int64_t i = 0; i < more; ++i) {
    s.blocks.push_back(free_blocks_.back());
    free_blocks_.pop_back();
  }
  peak_used_ = std::max<int64_t>(peak_used_, num_blocks_ - static_cast<int64_t>(free_blocks_.size()));
}

void PagedKVCache::write(int32_t layer, uint64_t session, int64_t pos, int64_t T, const float* k, const float* v) {
  LPIPES_CHECK(layer >= 0 && layer < num_layers(), "PagedKVCache.write: layer must be in [0, ", num_layers(),
               "), got ", layer);
  LPIPES_CHECK(T >= 0, "PagedKVCache.write: T must be >= 0, got ", T);
  LPIPES_CHECK(pos >= 0, "PagedKVCache.write: pos must be >= 0, got ", pos);
  if (T == 0) return;
  LPIPES_CHECK(k != nullptr && v != nullptr, "PagedKVCache.write: k and v must not be null");
  // Snapshot the block ids of [pos, pos + T) under the lock, then convert without it.
  const int64_t bs = block_size_;
  std::vector<int32_t> blocks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sessions_.find(session);
    LPIPES_CHECK(it != sessions_.end(), "PagedKVCache.write: unknown session ", session, " (reserve() first)");
    const session_t& s = it->second;
    const int64_t cap = static_cast<int64_t>(s.blocks.size()) * bs;
    LPIPES_CHECK(pos >= s.length && T <= cap - pos, "PagedKVCache.write: positions [", pos, ", ", pos + T,
                 ") of session ", session, " must lie within [length, capacity) = [", s.length, ", ", cap,
                 ") (committed tokens are immutable; reserve() before writing)");
    blocks.assign(s.blocks.begin() + pos / bs, s.blocks.begin() + (pos + T - 1) / bs + 1);
  }
  const kv_layer_shape_t& l = layers_[layer];
  const int64_t H = l.num_kv_heads, D = l.head_dim, Dv = l.head_dim_v;
  const kv_detail::attn_kernels_t& kern = kv_detail::attn_kernels(kv_detail::attention_isa(isa_t::automatic));
  auto store = [&](void* base, const float* src, int64_t dim) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = pos + t;
      const int64_t blk = blocks[static_cast<size_t>(p / bs - pos / bs)];
      const int64_t slot = p % bs;
      for (int64_t h = 0; h < H; ++h) {
        const float* row = src + (t * H + h) * dim;
        const int64_t off = ((blk * H + h) * bs + slot) * dim;  // elements
        switch (dtype_) {
          case dtype_t::f32:
            std::memcpy(static_cast<float*>(base) + off, row, static_cast<size_t>(dim) * sizeof(float));
            break;
          case dtype_t::f16:
            kern.to_f16(row, dim, static_cast<f16_t*>(base) + off);
            break;
          default: {  // bf16
            uint16_t* dst = static_cast<uint16_t*>(base) + off;
            for (int64_t d = 0; d < dim; ++d) dst[d] = f32_to_bf16(row[d]);
            break;
          }
        }
      }
    }
  };
  store(k_[layer], k, D);
  store(v_[layer], v, Dv);
}

void PagedKVCache::commit(uint64_t session, int64_t new_length) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(session);
  LPIPES_CHECK(it != sessions_.end(), "PagedKVCache.commit: unknown session ", session);
  session_t& s = it->second;
  const int64_t cap = static_cast<int64_t>(s.blocks.size()) * block_size_;
  LPIPES_CHECK(new_length >= s.length && new_length <= cap, "PagedKVCache.commit: new_length of session ", session,
               " must be in [length, capacity] = [", s.length, ", ", cap, "], got ", new_length);
  s.length = new_length;
}

void PagedKVCache::rollback(uint64_t session) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(session);
  if (it == sessions_.end()) return;  // nothing was reserved for it
  session_t& s = it->second;
  const size_t keep = static_cast<size_t>((s.length + block_size_ - 1) / block_size_);
  while (s.blocks.size() > keep) {  // free_blocks_ has room for every block: no allocation
    free_blocks_.push_back(s.blocks.back());
    s.blocks.pop_back();
  }
  if (s.length == 0) sessions_.erase(it);
}

void PagedKVCache::free(uint64_t session) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sessions_.find(session);
  LPIPES_CHECK(it != sessions_.end(), "PagedKVCache.free: unknown session ", session);
  for (auto b = it->second.blocks.rbegin(); b != it->second.blocks.rend(); ++b) free_blocks_.push_back(*b);
  sessions_.erase(it);
}

}  // namespace lpipes
