// Bindings of the frame format (csrc/wire): thin glue over the validator and the prefix encoder.
// Buffers are read through the buffer protocol without copying.
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "lpipes/wire.h"

namespace py = pybind11;

namespace lpipes {
namespace {

wire::limits_t make_limits(uint64_t max_frame, uint32_t max_meta, uint32_t max_tensors) {
  wire::limits_t lim;
  lim.max_frame_bytes = max_frame;
  lim.max_meta_bytes = max_meta;
  lim.max_tensors = max_tensors;
  return lim;
}

struct buffer_bytes {
  py::buffer_info info;
  const uint8_t* data;
  size_t len;
};

buffer_bytes read_buffer(const py::buffer& b) {
  py::buffer_info info = b.request();
  LPIPES_CHECK(info.ndim <= 1 && (info.ndim == 0 || info.strides[0] == info.itemsize), "frame: expected a ",
               "contiguous byte buffer");
  const size_t len = static_cast<size_t>(info.size) * static_cast<size_t>(info.itemsize);
  const auto* data = static_cast<const uint8_t*>(info.ptr);
  return {std::move(info), data, len};
}

}  // namespace

void bind_wire(py::module_& m) {
  m.def(
      "wire_frame_length",
      [](const py::buffer& header, uint64_t max_frame, uint32_t max_meta, uint32_t max_tensors) {
        buffer_bytes b = read_buffer(header);
        const wire::header_t h = wire::parse_header(b.data, b.len, make_limits(max_frame, max_meta, max_tensors));
        return h.frame_len;
      },
      py::arg("header"), py::arg("max_frame_bytes"), py::arg("max_meta_bytes"), py::arg("max_tensors"),
      "Validate a frame header (its first 32 bytes suffice) and return the frame's total length.");

  m.def(
      "wire_parse",
      [](const py::buffer& frame, uint64_t max_frame, uint32_t max_meta, uint32_t max_tensors) {
        buffer_bytes b = read_buffer(frame);
        const wire::frame_t f = wire::parse_frame(b.data, b.len, make_limits(max_frame, max_meta, max_tensors));
        py::list tensors;
        for (const auto& t : f.tensors) {
          py::tuple shape(t.ndim);
          for (int k = 0; k < t.ndim; ++k) shape[k] = py::int_(t.shape[k]);
          tensors.append(py::make_tuple(static_cast<int>(t.dtype), shape, t.offset, t.nbytes));
        }
        return py::make_tuple(f.header.type, f.header.flags, f.meta_offset, f.header.meta_len, tensors);
      },
      py::arg("frame"), py::arg("max_frame_bytes"), py::arg("max_meta_bytes"), py::arg("max_tensors"),
      "Validate a whole frame; returns (type, flags, meta_offset, meta_len, [(dtype, shape, offset, nbytes)]).");

  m.def(
      "wire_encode_prefix",
      [](uint16_t type, const py::bytes& meta, const std::vector<std::tuple<int, std::vector<uint64_t>>>& specs,
         uint64_t max_frame, uint32_t max_meta, uint32_t max_tensors) {
        std::vector<wire::tensor_desc_t> tensors(specs.size());
        for (size_t i = 0; i < specs.size(); ++i) {
          const auto& [dtype, shape] = specs[i];
          LPIPES_CHECK(dtype >= 0 && dtype < 256 && wire::wire_dtype_size(static_cast<uint8_t>(dtype)) != 0,
                       "encode: tensor ", i, " has unknown dtype code ", dtype);
          LPIPES_CHECK(shape.size() <= static_cast<size_t>(wire::kMaxNdim), "encode: tensor ", i, " has ",
                       shape.size(), " dimensions (at most ", wire::kMaxNdim, ")");
          tensors[i].dtype = static_cast<uint8_t>(dtype);
          tensors[i].ndim = static_cast<int>(shape.size());
          for (size_t k = 0; k < shape.size(); ++k) tensors[i].shape[k] = shape[k];
        }
        std::vector<uint64_t> pads;
        const std::string prefix = wire::encode_prefix(type, 0, std::string(meta), tensors, pads,
                                                       make_limits(max_frame, max_meta, max_tensors));
        std::vector<uint64_t> offsets;
        for (const auto& t : tensors) offsets.push_back(t.offset);
        return py::make_tuple(py::bytes(prefix), offsets, pads);
      },
      py::arg("type"), py::arg("meta"), py::arg("tensors"), py::arg("max_frame_bytes"), py::arg("max_meta_bytes"),
      py::arg("max_tensors"),
      "Lay out a frame: returns (prefix bytes, tensor offsets, zero padding after each tensor).");
}

}  // namespace lpipes
