// Binding glue shared by bindings.cpp and the bind_*.cpp files: tensor views from Python objects.
// Only the bind*.cpp files include pybind11; nothing below them sees a Python object.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

#include "lpipes/kernels.h"
#include "lpipes/tensor.h"

namespace lpipes {

// A borrowed view of a CPU tensor (anything with __dlpack__: torch, numpy, ...). The caller keeps
// the tensor alive for the duration of the call. `name` is used in error messages.
tensor_view_t as_view(pybind11::handle obj, const char* name);

// "auto" | "scalar" | "avx2" | "avx512" -> isa_t (lpipes::error for anything else).
isa_t parse_isa(const std::string& name);

void bind_kernels(pybind11::module_& m);
void bind_kvcache(pybind11::module_& m);
void bind_runtime(pybind11::module_& m);
void bind_wire(pybind11::module_& m);

}  // namespace lpipes
