// Frame encoder and validator (docs/wire-format.md). Every length read from the network is checked
// with overflow-safe arithmetic before it is used.
#include "lpipes/wire.h"

#include <cstdint>
#include <cstring>

#include "lpipes/tensor.h"

namespace lpipes::wire {
namespace {

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t rd32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t rd64(const uint8_t* p) { return static_cast<uint64_t>(rd32(p)) | (static_cast<uint64_t>(rd32(p + 4)) << 32); }

void wr16(std::string& s, size_t at, uint16_t v) {
  for (int i = 0; i < 2; ++i) s[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
void wr32(std::string& s, size_t at, uint32_t v) {
  for (int i = 0; i < 4; ++i) s[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}
void wr64(std::string& s, size_t at, uint64_t v) {
  for (int i = 0; i < 8; ++i) s[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }
bool add_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_add_overflow(a, b, out); }

uint64_t align_up(uint64_t v) {
  uint64_t out;
  if (add_overflows(v, kAlign - 1, &out)) fail("frame: length overflows 64 bits");
  return out & ~static_cast<uint64_t>(kAlign - 1);
}

// nbytes of a tensor from its dtype and shape; throws on overflow.
//
// The extent (the product of the dimensions with zeros counted as one, times the item size) must fit
// in a signed 64-bit integer even when a zero dimension makes nbytes 0: a receiver builds an empty
// tensor of that shape, and torch refuses sizes or strides past 2^63 - 1 with its own exception. A
// shape like [0, 2^64 - 1] would otherwise pass here and fail later, outside the WireError contract.
uint64_t tensor_nbytes(const tensor_desc_t& t, size_t index) {
  const size_t item = wire_dtype_size(t.dtype);
  LPIPES_CHECK(item != 0, "frame: tensor ", index, " has unknown dtype code ", static_cast<int>(t.dtype));
  LPIPES_CHECK(t.ndim >= 0 && t.ndim <= kMaxNdim, "frame: tensor ", index, " has ndim ", t.ndim, " (at most ",
               kMaxNdim, ")");
  constexpr uint64_t kMaxExtent = static_cast<uint64_t>(INT64_MAX);
  uint64_t extent = item;
  bool empty = false;
  for (int d = 0; d < t.ndim; ++d) {
    const uint64_t dim = t.shape[d];
    empty = empty || dim == 0;
    if (mul_overflows(extent, dim ? dim : 1, &extent) || extent > kMaxExtent) {
      fail("frame: tensor ", index, " shape overflows 63 bits");
    }
  }
  return empty ? 0 : extent;
}

}  // namespace

size_t wire_dtype_size(uint8_t code) {
  switch (code) {
    case 1: case 2: return 2;
    case 3: case 4: return 4;
    case 5: return 8;
    case 6: return 1;
    default: return 0;
  }
}

header_t parse_header(const uint8_t* p, size_t len, const limits_t& lim) {
  LPIPES_CHECK(len >= kHeaderBytes, "frame: truncated header (", len, " of ", kHeaderBytes, " bytes)");
  LPIPES_CHECK(std::memcmp(p, kMagic, 4) == 0, "frame: bad magic (not an lpipes frame)");
  header_t h;
  h.version = rd16(p + 4);
  LPIPES_CHECK(h.version == kVersion, "frame: unsupported version ", h.version, " (this peer speaks ", kVersion,
               ")");
  h.type = rd16(p + 6);
  LPIPES_CHECK(h.type >= 1 && h.type <= kMaxType, "frame: unknown message type ", h.type);
  h.flags = rd32(p + 8);
  LPIPES_CHECK(h.flags == 0, "frame: unknown flags ", h.flags, " (none are defined in version ", kVersion, ")");
  h.meta_len = rd32(p + 12);
  LPIPES_CHECK(h.meta_len <= lim.max_meta_bytes, "frame: metadata of ", h.meta_len, " bytes exceeds the limit of ",
               lim.max_meta_bytes);
  h.n_tensors = rd32(p + 16);
  LPIPES_CHECK(h.n_tensors <= lim.max_tensors, "frame: ", h.n_tensors, " tensors exceed the limit of ",
               lim.max_tensors);
  LPIPES_CHECK(rd32(p + 20) == 0, "frame: reserved header field is not zero");
  h.frame_len = rd64(p + 24);
  LPIPES_CHECK(h.frame_len <= lim.max_frame_bytes, "frame: length ", h.frame_len, " exceeds the limit of ",
               lim.max_frame_bytes, " bytes");
  // The limits above keep this sum far from overflowing.
  const uint64_t fixed = kHeaderBytes + kDescriptorBytes * static_cast<uint64_t>(h.n_tensors) + h.meta_len;
  LPIPES_CHECK(h.frame_len >= fixed, "frame: length ", h.frame_len, " is shorter than its header, descriptors and ",
               "metadata (", fixed, " bytes)");
  return h;
}

frame_t parse_frame(const uint8_t* p, size_t len, const limits_t& lim) {
  frame_t f;
  f.header = parse_header(p, len, lim);
  const header_t& h = f.header;
  LPIPES_CHECK(len == h.frame_len, "frame: got ", len, " bytes, the header says ", h.frame_len);
  f.meta_offset = kHeaderBytes + kDescriptorBytes * static_cast<uint64_t>(h.n_tensors);
  uint64_t cursor = f.meta_offset + h.meta_len;  // first byte a tensor may use
  f.tensors.resize(h.n_tensors);
  for (uint32_t i = 0; i < h.n_tensors; ++i) {
    const uint8_t* d = p + kHeaderBytes + kDescriptorBytes * i;
    tensor_desc_t& t = f.tensors[i];
    t.dtype = d[0];
    t.ndim = d[1];
    LPIPES_CHECK(wire_dtype_size(t.dtype) != 0, "frame: tensor ", i, " has unknown dtype code ",
                 static_cast<int>(t.dtype));
    LPIPES_CHECK(t.ndim <= kMaxNdim, "frame: tensor ", i, " has ndim ", t.ndim, " (at most ", kMaxNdim, ")");
    LPIPES_CHECK(rd16(d + 2) == 0 && rd32(d + 4) == 0, "frame: tensor ", i, " reserved fields are not zero");
    t.offset = rd64(d + 8);
    t.nbytes = rd64(d + 16);
    for (int k = 0; k < kMaxNdim; ++k) {
      const uint64_t dim = rd64(d + 24 + 8 * k);
      if (k < t.ndim) t.shape[k] = dim;
      else LPIPES_CHECK(dim == 0, "frame: tensor ", i, " has a non-zero shape entry past ndim");
    }
    const uint64_t expect = tensor_nbytes(t, i);
    LPIPES_CHECK(t.nbytes == expect, "frame: tensor ", i, " nbytes ", t.nbytes, " does not match its shape and ",
                 "dtype (", expect, ")");
    LPIPES_CHECK(t.offset % kAlign == 0, "frame: tensor ", i, " offset ", t.offset, " is not ", kAlign, "-aligned");
    LPIPES_CHECK(t.offset >= cursor, "frame: tensor ", i, " offset ", t.offset, " overlaps the preceding data (which ",
                 "ends at ", cursor, ")");
    uint64_t end;
    LPIPES_CHECK(!add_overflows(t.offset, t.nbytes, &end) && end <= h.frame_len, "frame: tensor ", i,
                 " runs past the end of the frame");
    cursor = end;
  }
  const uint64_t expected_end = h.n_tensors ? cursor : align_up(cursor);
  LPIPES_CHECK(h.frame_len == expected_end, "frame: ", h.frame_len - std::min<uint64_t>(h.frame_len, expected_end),
               " trailing bytes after the last tensor");
  return f;
}

std::string encode_prefix(uint16_t type, uint32_t flags, const std::string& meta, std::vector<tensor_desc_t>& tensors,
                          std::vector<uint64_t>& pads, const limits_t& lim) {
  LPIPES_CHECK(type >= 1 && type <= kMaxType, "encode: unknown message type ", type);
  LPIPES_CHECK(flags == 0, "encode: no flags are defined in version ", kVersion);
  LPIPES_CHECK(meta.size() <= lim.max_meta_bytes, "encode: metadata of ", meta.size(), " bytes exceeds the limit of ",
               lim.max_meta_bytes);
  LPIPES_CHECK(tensors.size() <= lim.max_tensors, "encode: ", tensors.size(), " tensors exceed the limit of ",
               lim.max_tensors);
  const uint64_t meta_offset = kHeaderBytes + kDescriptorBytes * tensors.size();
  uint64_t cursor = align_up(meta_offset + meta.size());
  const uint64_t prefix_len = cursor;
  pads.assign(tensors.size(), 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    tensor_desc_t& t = tensors[i];
    t.nbytes = tensor_nbytes(t, i);
    t.offset = cursor;
    uint64_t end;
    if (add_overflows(cursor, t.nbytes, &end)) fail("encode: frame length overflows 64 bits");
    if (i + 1 < tensors.size()) {
      cursor = align_up(end);
      pads[i] = cursor - end;
    } else {
      cursor = end;
    }
  }
  const uint64_t frame_len = cursor;
  LPIPES_CHECK(frame_len <= lim.max_frame_bytes, "encode: frame of ", frame_len, " bytes exceeds the limit of ",
               lim.max_frame_bytes);
  std::string out(prefix_len, '\0');
  std::memcpy(out.data(), kMagic, 4);
  wr16(out, 4, kVersion);
  wr16(out, 6, type);
  wr32(out, 8, flags);
  wr32(out, 12, static_cast<uint32_t>(meta.size()));
  wr32(out, 16, static_cast<uint32_t>(tensors.size()));
  wr64(out, 24, frame_len);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const tensor_desc_t& t = tensors[i];
    const size_t at = kHeaderBytes + kDescriptorBytes * i;
    out[at] = static_cast<char>(t.dtype);
    out[at + 1] = static_cast<char>(t.ndim);
    wr64(out, at + 8, t.offset);
    wr64(out, at + 16, t.nbytes);
    for (int k = 0; k < t.ndim; ++k) wr64(out, at + 24 + 8 * k, t.shape[k]);
  }
  std::memcpy(out.data() + meta_offset, meta.data(), meta.size());
  return out;
}

}  // namespace lpipes::wire
