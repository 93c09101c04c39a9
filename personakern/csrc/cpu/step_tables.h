// Step tables of an inference engine (vLLM) and the op that reads them.
//
// vLLM runs personakern's fused op at every block output of every step, inside a compiled graph
// that is traced once. The per-request steering data are values in persistent tables that the
// engine rewrites once per step (personakern/vllm/tables.py). This op takes those tables from a
// registry instead of as arguments, so a call is the dispatcher and the kernel: no Python
// wrapper, no tensor views built per call, and the block's read-outs are written straight into
// the engine's readings table (no copy). Two host flags per table, set once per step, switch the
// steering group and the read-outs off in steps that need neither: a step of plain requests
// then costs the fused add + RMSNorm alone. The flags are host values read by the kernel, not
// tensors in the graph, so this op is for the CPU (a CUDA graph would freeze them).
//
//   personakern::cpu_step_add_rms_norm(Tensor residual, Tensor x, Tensor weight, float eps,
//                                      int table, int block) -> (Tensor normed, Tensor out)
//
// out = steer(residual + x) with block `block`'s rows of the tables, normed = rmsnorm(out) * w;
// the read-outs of `out` go to readings[block, :n] when the table reads.
#pragma once

#include <Python.h>

namespace personakern::cpu {

// The three functions below as module methods (null-terminated), for the module's init.
extern PyMethodDef step_table_methods[];

// Python: _step_table(steer, coef, unit, lo, hi, gate, thr, readings) -> handle.
// float32 contiguous CPU tensors: steer [L, S, D], coef [L, N, S], unit [L, T, D] (clamp and
// read-out directions), lo/hi [L, N, T], gate [L, S, D] and thr [N, S] or both None,
// readings [L, N, T]. The registry keeps references to them until _step_table_release.
PyObject* step_table_py(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

// Python: _step_flags(handle, steers, reads): what the next calls on this table apply.
PyObject* step_flags_py(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

// Python: _step_table_release(handle): drops the registry's references (idempotent).
PyObject* step_table_release_py(PyObject* module, PyObject* const* args, Py_ssize_t nargs);

}  // namespace personakern::cpu
