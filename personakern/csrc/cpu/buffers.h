// Output buffers of the CPU ops, reused across calls once nothing else holds them.
//
// A large fresh allocation comes back from the OS with its pages unfaulted: writing a 128 MB
// output into it costs about six times what writing into memory already mapped does (measured
// in docs/backends.md#buffers). The ops' outputs are functional (new tensors to the caller),
// so reuse is decided by ownership, not by the caller's promise: a pooled output's memory comes
// back to the pool only when its storage is destroyed. A block output that a caller keeps
// (output_hidden_states, a hook, autograd, a view, a Python storage object) is therefore never
// overwritten, and one dropped after its next block has run is reused by the block after that.
#pragma once

#include <ATen/core/Tensor.h>
#include <Python.h>

namespace personakern::cpu {

// A new contiguous CPU tensor of `sizes` and `dtype` (contents undefined). Outputs of at least
// 1 MiB come from the pool, reusing a free block of that exact size where there is one.
at::Tensor new_output(at::IntArrayRef sizes, c10::ScalarType dtype);

// Python: _buffers(limit_bytes=None) -> (limit, free bytes kept, free blocks, reused, fresh).
// A limit (bytes, 0 switches the pool off) releases the free blocks that no longer fit.
PyObject* buffers_py(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

// Python: _stream_threshold(bytes=None) -> bytes; see stream_threshold in kernels.h.
PyObject* stream_threshold_py(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

}  // namespace personakern::cpu
