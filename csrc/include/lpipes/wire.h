// The lpipes frame format, version 1 (docs/wire-format.md): layout constants, limits, and the
// encoder / validator. No Python here; csrc/bind_wire.cpp is the glue.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lpipes::wire {

constexpr uint8_t kMagic[4] = {'L', 'P', 'W', 'F'};
constexpr uint16_t kVersion = 1;
constexpr size_t kHeaderBytes = 32;
constexpr size_t kDescriptorBytes = 88;
constexpr size_t kAlign = 64;
constexpr int kMaxNdim = 8;
constexpr uint16_t kMaxType = 9;  // message types are 1..kMaxType

// Wire dtype codes (not lpipes::dtype_t: the wire codes are fixed by the spec).
enum class wire_dtype : uint8_t { f16 = 1, bf16 = 2, f32 = 3, i32 = 4, i64 = 5, u8 = 6 };

// Size in bytes of a wire dtype code; 0 for an unknown code.
size_t wire_dtype_size(uint8_t code);

struct limits_t {
  uint64_t max_frame_bytes = 1ull << 30;
  uint32_t max_meta_bytes = 64u << 10;
  uint32_t max_tensors = 16;
};

struct tensor_desc_t {
  uint8_t dtype = 0;
  int ndim = 0;
  uint64_t shape[kMaxNdim] = {};
  uint64_t offset = 0;  // from the start of the frame
  uint64_t nbytes = 0;
};

struct header_t {
  uint16_t version = 0;
  uint16_t type = 0;
  uint32_t flags = 0;
  uint32_t meta_len = 0;
  uint32_t n_tensors = 0;
  uint64_t frame_len = 0;
};

// Validates the 32-byte header (step 1 of the spec) and returns it. Throws lpipes::error naming the
// failed check. `len` may exceed the header; fewer than 32 bytes is an error.
header_t parse_header(const uint8_t* data, size_t len, const limits_t& lim);

struct frame_t {
  header_t header;
  uint64_t meta_offset = 0;
  std::vector<tensor_desc_t> tensors;
};

// Validates a whole frame (steps 1 and 2 except the JSON check, which the caller does on the
// metadata bytes) and returns where everything is. `len` must equal the header's frame_len.
frame_t parse_frame(const uint8_t* data, size_t len, const limits_t& lim);

// Lays out a frame: fills in each tensor's offset and nbytes (from dtype and shape, overflow-checked)
// and returns the prefix bytes (header + descriptors + metadata + padding up to the first tensor).
// `pads[i]` receives the zero padding to write after tensor i. Throws lpipes::error if the frame
// would exceed the limits.
std::string encode_prefix(uint16_t type, uint32_t flags, const std::string& meta, std::vector<tensor_desc_t>& tensors,
                          std::vector<uint64_t>& pads, const limits_t& lim);

}  // namespace lpipes::wire
