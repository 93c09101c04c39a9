// The step-table op of an inference engine; see step_tables.h.
#include "step_tables.h"

#include "buffers.h"
#include "kernels.h"

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

namespace personakern::cpu {
namespace {

struct StepTable {
  at::Tensor steer, coef, unit, lo, hi, gate, thr, readings;  // gate/thr undefined: no gates
  int64_t L = 0, S = 0, T = 0, D = 0, N = 0;
  std::atomic<bool> steers{false}, reads{false};
};

std::mutex g_mutex;
std::vector<std::shared_ptr<StepTable>> g_tables;  // index = handle; released: null

std::shared_ptr<StepTable> find(int64_t handle) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (handle < 0 || handle >= static_cast<int64_t>(g_tables.size())) return nullptr;
  return g_tables[handle];
}

inline const float* f32(const at::Tensor& t, int64_t offset) {
  return static_cast<const float*>(t.const_data_ptr()) + offset;
}

std::tuple<at::Tensor, at::Tensor> step_add_rms_norm(const at::Tensor& residual_in, const at::Tensor& x_in,
                                                     const at::Tensor& weight_in, double eps, int64_t handle,
                                                     int64_t block) {
  const std::shared_ptr<StepTable> t = find(handle);
  TORCH_CHECK(t, "personakern: no step table ", handle, " (never registered, or released)");
  TORCH_CHECK(block >= 0 && block < t->L, "personakern: block ", block, " out of range for a table of ",
              t->L, " blocks");
  const auto dtype = residual_in.scalar_type();
  TORCH_CHECK(dtype == c10::kFloat || dtype == c10::kBFloat16 || dtype == c10::kHalf,
              "personakern: step op takes float32/bfloat16/float16 rows, got ", dtype);
  TORCH_CHECK(residual_in.is_cpu() && x_in.is_cpu() && weight_in.is_cpu(), "personakern: step op is CPU only");
  TORCH_CHECK(residual_in.dim() == 2 && residual_in.size(1) == t->D && x_in.sizes() == residual_in.sizes() &&
                  x_in.scalar_type() == dtype,
              "personakern: step op wants residual and x of the same dtype and shape [n, ", t->D, "], got ",
              residual_in.sizes(), " and ", x_in.sizes());
  TORCH_CHECK(weight_in.dim() == 1 && weight_in.size(0) == t->D && weight_in.scalar_type() == dtype,
              "personakern: norm weight must be [", t->D, "] of the rows' dtype");
  const int64_t n = residual_in.size(0);
  TORCH_CHECK(n <= t->N, "personakern: ", n, " rows exceed the step table's ", t->N);
  const at::Tensor residual = residual_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();

  SteerArgs a;
  a.n = n;
  a.d = t->D;
  a.hidden = residual.const_data_ptr();
  a.delta = x.const_data_ptr();
  const int64_t S = t->S, T = t->T, D = t->D, N = t->N;
  if (t->steers.load(std::memory_order_relaxed)) {
    a.steer = f32(t->steer, block * S * D);
    a.s = S;
    a.coef = f32(t->coef, block * N * S);
    a.coef_stride = S;
    if (t->gate.defined()) {
      a.gate = f32(t->gate, block * S * D);
      a.gate_thr = f32(t->thr, 0);
      a.gate_stride = S;
    }
    a.clamp = f32(t->unit, block * T * D);
    a.c = T;
    a.lo = f32(t->lo, block * N * T);
    a.hi = f32(t->hi, block * N * T);
    a.lo_stride = a.hi_stride = T;
  }
  if (t->reads.load(std::memory_order_relaxed)) {
    a.readout = f32(t->unit, block * T * D);
    a.m = T;
    a.readings = t->readings.mutable_data_ptr<float>() + block * N * T;
  }
  at::Tensor out = new_output(residual.sizes(), dtype);
  at::Tensor normed = new_output(residual.sizes(), dtype);
  a.out = out.mutable_data_ptr();
  a.weight = weight.const_data_ptr();
  a.normed = normed.mutable_data_ptr();
  a.eps = static_cast<float>(eps);
  steer_project(dtype, a);
  return {std::move(normed), std::move(out)};
}

// The argument as a float32 contiguous CPU tensor of `dims` dimensions, or an exception naming it.
const at::Tensor& table_arg(PyObject* o, const char* name, int64_t dims) {
  TORCH_CHECK(THPVariable_Check(o), "_step_table: ", name, " must be a tensor");
  const at::Tensor& t = THPVariable_Unpack(o);
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == c10::kFloat && t.is_contiguous() && t.dim() == dims,
              "_step_table: ", name, " must be a contiguous float32 CPU tensor of ", dims, " dimensions");
  return t;
}

template <typename F>
PyObject* guarded(const F& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

int64_t handle_of(PyObject* o) {
  const long long h = PyLong_AsLongLong(o);
  TORCH_CHECK(!(h == -1 && PyErr_Occurred()), "a step table handle is an int");
  return h;
}

}  // namespace

PyObject* step_table_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    TORCH_CHECK(nargs == 8, "_step_table(steer, coef, unit, lo, hi, gate, thr, readings)");
    auto t = std::make_shared<StepTable>();
    t->steer = table_arg(args[0], "steer", 3);
    t->coef = table_arg(args[1], "coef", 3);
    t->unit = table_arg(args[2], "unit", 3);
    t->lo = table_arg(args[3], "lo", 3);
    t->hi = table_arg(args[4], "hi", 3);
    t->readings = table_arg(args[7], "readings", 3);
    t->L = t->steer.size(0);
    t->S = t->steer.size(1);
    t->D = t->steer.size(2);
    t->T = t->unit.size(1);
    t->N = t->coef.size(1);
    const auto L = t->L, S = t->S, D = t->D, T = t->T, N = t->N;
    TORCH_CHECK(T <= S && t->coef.sizes() == at::IntArrayRef({L, N, S}) && t->unit.sizes() == at::IntArrayRef({L, T, D}) &&
                    t->lo.sizes() == at::IntArrayRef({L, N, T}) && t->hi.sizes() == at::IntArrayRef({L, N, T}) &&
                    t->readings.sizes() == at::IntArrayRef({L, N, T}),
                "_step_table: shapes do not agree (steer [L, S, D], coef [L, N, S], unit [L, T, D], "
                "lo/hi/readings [L, N, T])");
    const bool gated = args[5] != Py_None;
    TORCH_CHECK(gated == (args[6] != Py_None), "_step_table: gate and thr are given together or not at all");
    if (gated) {
      t->gate = table_arg(args[5], "gate", 3);
      t->thr = table_arg(args[6], "thr", 2);
      TORCH_CHECK(t->gate.sizes() == t->steer.sizes() && t->thr.sizes() == at::IntArrayRef({N, S}),
                  "_step_table: gate must be [L, S, D] and thr [N, S]");
    }
    std::lock_guard<std::mutex> lock(g_mutex);
    g_tables.push_back(std::move(t));
    return PyLong_FromSsize_t(static_cast<Py_ssize_t>(g_tables.size() - 1));
  });
}

PyObject* step_flags_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    TORCH_CHECK(nargs == 3, "_step_flags(handle, steers, reads)");
    const auto t = find(handle_of(args[0]));
    TORCH_CHECK(t, "no step table with this handle");
    const int steers = PyObject_IsTrue(args[1]), reads = PyObject_IsTrue(args[2]);
    TORCH_CHECK(steers >= 0 && reads >= 0, "flags must be truth values");
    t->steers.store(steers == 1);
    t->reads.store(reads == 1);
    Py_RETURN_NONE;
  });
}

PyObject* step_table_release_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return guarded([&]() -> PyObject* {
    TORCH_CHECK(nargs == 1, "_step_table_release(handle)");
    const int64_t h = handle_of(args[0]);
    std::shared_ptr<StepTable> dropped;  // freed after the lock is let go
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      if (h >= 0 && h < static_cast<int64_t>(g_tables.size())) dropped.swap(g_tables[h]);
    }
    Py_RETURN_NONE;
  });
}

#define PK_FAST(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fn))
PyMethodDef step_table_methods[] = {
    {"_step_table", PK_FAST(step_table_py), METH_FASTCALL,
     "_step_table($module, steer, coef, unit, lo, hi, gate, thr, readings)\n--\n\nRegister an engine's step tables."},
    {"_step_flags", PK_FAST(step_flags_py), METH_FASTCALL,
     "_step_flags($module, handle, steers, reads)\n--\n\nWhat the next calls on a step table apply."},
    {"_step_table_release", PK_FAST(step_table_release_py), METH_FASTCALL,
     "_step_table_release($module, handle)\n--\n\nDrop a step table."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace personakern::cpu

TORCH_LIBRARY_FRAGMENT(personakern, m) {
  m.def("cpu_step_add_rms_norm(Tensor residual, Tensor x, Tensor weight, float eps, int table, int block) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(personakern, CPU, m) {
  m.impl("cpu_step_add_rms_norm", &personakern::cpu::step_add_rms_norm);
}
