// Python entry points of the CPU backend, written against the CPython vectorcall API rather than
// pybind11: decode calls these ~90 times per token, and argument conversion is most of the cost
// of a call at decode sizes.
//
// Anything outside the fast path (autograd needed, other devices or dtypes, broadcasting the
// kernels don't do, malformed arguments) is handed unchanged to the native implementation, so
// the semantics, including error messages, are the reference's by construction.
#include "kernels.h"

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <initializer_list>

namespace {

using at::Tensor;
using personakern::cpu::SteerArgs;

struct Fallback {};  // thrown to route a call to the native implementation

inline void need(bool ok) {
  if (!ok) throw Fallback{};
}

enum Op { kRmsNorm, kSteerProject, kAddRmsNorm, kFused, kNumOps };
PyObject* g_native[kNumOps] = {};

// Parameter lists must match personakern/backends/native.py exactly.
struct Signature {
  std::vector<const char*> names;
  int required;
  std::vector<PyObject*> interned;
};
Signature g_sig[kNumOps] = {
    {{"x", "weight", "eps", "gemma"}, 3, {}},
    {{"hidden", "delta", "steer_vecs", "coef", "clamp_vecs", "clamp_lo", "clamp_hi", "readout",
      "gate_vecs", "gate_thr"}, 1, {}},
    {{"residual", "x", "weight", "eps", "gemma"}, 4, {}},
    {{"residual", "x", "weight", "eps", "gemma", "steer_vecs", "coef", "clamp_vecs", "clamp_lo",
      "clamp_hi", "readout", "gate_vecs", "gate_thr"}, 4, {}},
};
constexpr int kMaxParams = 13;

// Positional and keyword arguments into slots (nullptr = not given). Anything odd returns false
// and the call goes to native, which raises the proper TypeError.
bool bind(const Signature& sig, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
          PyObject** slots) {
  const Py_ssize_t count = static_cast<Py_ssize_t>(sig.names.size());
  if (nargs > count) return false;
  for (Py_ssize_t i = 0; i < count; ++i) slots[i] = i < nargs ? args[i] : nullptr;
  if (kwnames) {
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(kwnames); ++k) {
      PyObject* key = PyTuple_GET_ITEM(kwnames, k);
      Py_ssize_t idx = -1;
      for (Py_ssize_t i = 0; i < count && idx < 0; ++i)
        if (key == sig.interned[i]) idx = i;
      for (Py_ssize_t i = 0; i < count && idx < 0; ++i)
        if (PyUnicode_Compare(key, sig.interned[i]) == 0) idx = i;
      if (idx < 0 || slots[idx]) return false;
      slots[idx] = args[nargs + k];
    }
  }
  for (int i = 0; i < sig.required; ++i)
    if (!slots[i]) return false;
  return true;
}

// Inputs made contiguous only when they are not already, kept alive for the kernel call.
struct Inputs {
  std::array<Tensor, kMaxParams> owned;
  int count = 0;
  // Below the autograd key (inside a custom op's autograd wrapper) nobody records a graph.
  const bool grad = at::GradMode::is_enabled() &&
                    !c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::AutogradCPU);

  const Tensor* get(PyObject* o) {
    if (!o || o == Py_None) return nullptr;
    need(THPVariable_Check(o));
    const Tensor& t = THPVariable_Unpack(o);
    // Plain dense CPU memory only: lazily negated views, zero tensors, functional wrappers and
    // __torch_dispatch__ subclasses get native's handling.
    constexpr c10::DispatchKeySet kExotic({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                           c10::DispatchKey::Negative, c10::DispatchKey::Conjugate,
                                           c10::DispatchKey::ZeroTensor});
    need(t.is_cpu() && t.layout() == c10::kStrided && !t.key_set().has_any(kExotic) &&
         !(grad && t.requires_grad()));
    if (t.is_contiguous()) return &t;
    owned[count] = t.contiguous();
    return &owned[count++];
  }
  const Tensor& require(PyObject* o) {
    const Tensor* t = get(o);
    need(t != nullptr);
    return *t;
  }
};

inline bool model_dtype(c10::ScalarType s) {
  return s == c10::kFloat || s == c10::kBFloat16 || s == c10::kHalf;
}

// What at::empty_like gives for the contiguous CPU tensors that reach here, without the trip
// through the dispatcher (measured ~0.2 us per tensor at decode sizes).
inline Tensor new_like(const Tensor& t) {
  return at::detail::empty_cpu(t.sizes(), t.scalar_type(), std::nullopt, std::nullopt, std::nullopt,
                               std::nullopt);
}

inline const float* f32(const Tensor& t) { return static_cast<const float*>(t.const_data_ptr()); }

// A [rows, cols] float table indexed by row, or one row broadcast over all rows (stride 0).
int64_t row_stride(const Tensor& t, int64_t cols, int64_t rows, bool per_row_ok) {
  need(t.scalar_type() == c10::kFloat);
  if (t.dim() == 1 && t.size(0) == cols) return 0;
  need(t.dim() == 2 && t.size(1) == cols);
  if (t.size(0) == 1) return 0;
  need(per_row_ok && t.size(0) == rows);
  return cols;
}

inline const Tensor& model_rows(Inputs& in, PyObject* o) {
  const Tensor& t = in.require(o);
  need(model_dtype(t.scalar_type()) && t.dim() >= 1 && t.size(-1) > 0);
  return t;
}

inline const Tensor& weight_for(Inputs& in, PyObject* o, const Tensor& x) {
  const Tensor& w = in.require(o);
  need(w.scalar_type() == x.scalar_type() && w.dim() == 1 && w.size(0) == x.size(-1));
  return w;
}

float eps_of(PyObject* o) {
  const double eps = PyFloat_AsDouble(o);
  if (eps == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw Fallback{};
  }
  return static_cast<float>(eps);
}

bool flag_of(PyObject* o) {
  if (!o) return false;
  const int v = PyObject_IsTrue(o);
  if (v < 0) {
    PyErr_Clear();
    throw Fallback{};
  }
  return v == 1;
}

// slots: hidden, delta, steer_vecs, coef, clamp_vecs, clamp_lo, clamp_hi, readout, gate_vecs,
// gate_thr.
void steer_args(Inputs& in, PyObject* const* slot, const Tensor& hidden, SteerArgs& a,
                Tensor& readings) {
  a.d = hidden.size(-1);
  a.n = hidden.numel() / a.d;
  a.hidden = hidden.const_data_ptr();
  // Per-row tables only line up with rows when the rows are the tensor's first dimension.
  const bool per_row_ok = hidden.dim() == 2;
  if (const Tensor* delta = in.get(slot[1])) {
    need(delta->scalar_type() == hidden.scalar_type() && delta->sizes() == hidden.sizes());
    a.delta = delta->const_data_ptr();
  }
  const Tensor* steer = in.get(slot[2]);
  if (steer) {
    need(steer->scalar_type() == c10::kFloat && steer->dim() == 2 && steer->size(1) == a.d);
    const Tensor& coef = in.require(slot[3]);
    a.s = steer->size(0);
    a.coef_stride = row_stride(coef, a.s, a.n, per_row_ok);
    a.steer = f32(*steer);
    a.coef = f32(coef);
    if (const Tensor* gate = in.get(slot[8])) {
      need(gate->scalar_type() == c10::kFloat && gate->dim() == 2 && gate->size(0) == a.s &&
           gate->size(1) == a.d);
      const Tensor& thr = in.require(slot[9]);
      a.gate_stride = row_stride(thr, a.s, a.n, per_row_ok);
      a.gate = f32(*gate);
      a.gate_thr = f32(thr);
    }
  }
  const Tensor* clamp = in.get(slot[4]);
  if (clamp) {
    need(clamp->scalar_type() == c10::kFloat && clamp->dim() == 2 && clamp->size(1) == a.d);
    const Tensor& lo = in.require(slot[5]);
    const Tensor& hi = in.require(slot[6]);
    a.c = clamp->size(0);
    a.lo_stride = row_stride(lo, a.c, a.n, per_row_ok);
    a.hi_stride = row_stride(hi, a.c, a.n, per_row_ok);
    a.clamp = f32(*clamp);
    a.lo = f32(lo);
    a.hi = f32(hi);
  }
  if (const Tensor* readout = in.get(slot[7])) {
    need(readout->scalar_type() == c10::kFloat && readout->dim() == 2 && readout->size(1) == a.d);
    a.m = readout->size(0);
    a.readout = f32(*readout);
    auto sizes = hidden.sizes().vec();
    sizes.back() = a.m;
    readings = at::detail::empty_cpu(sizes, c10::kFloat, std::nullopt, std::nullopt, std::nullopt,
                                     std::nullopt);
    a.readings = readings.mutable_data_ptr<float>();
  }
}

// Dropping the GIL costs about as much as a decode-sized call; only do it for real work.
template <typename F>
void maybe_without_gil(int64_t cost, const F& work) {
  if (cost < (1 << 20)) {
    work();
    return;
  }
  PyThreadState* state = PyEval_SaveThread();
  try {
    work();
  } catch (...) {
    PyEval_RestoreThread(state);
    throw;
  }
  PyEval_RestoreThread(state);
}

void run_steer(c10::ScalarType dtype, const SteerArgs& a) {
  maybe_without_gil(personakern::cpu::steer_cost(a), [&] { personakern::cpu::steer_project(dtype, a); });
}

inline PyObject* wrap(Tensor& t) { return t.defined() ? THPVariable_Wrap(std::move(t)) : Py_NewRef(Py_None); }

// Steals the references; any null (a failed wrap) fails the whole result.
PyObject* tuple_of(std::initializer_list<PyObject*> items) {
  bool ok = true;
  for (PyObject* item : items) ok = ok && item;
  PyObject* tup = ok ? PyTuple_New(static_cast<Py_ssize_t>(items.size())) : nullptr;
  Py_ssize_t i = 0;
  for (PyObject* item : items) {
    if (tup) PyTuple_SET_ITEM(tup, i++, item);
    else Py_XDECREF(item);
  }
  return tup;
}

PyObject* do_rms_norm(PyObject* const* slot) {
  Inputs in;
  const Tensor& x = model_rows(in, slot[0]);
  const Tensor& w = weight_for(in, slot[1], x);
  const float eps = eps_of(slot[2]);
  const bool gemma = flag_of(slot[3]);
  Tensor out = new_like(x);
  const int64_t d = x.size(-1);
  maybe_without_gil(3 * x.numel(), [&] {
    personakern::cpu::rms_norm(x.scalar_type(), x.const_data_ptr(), w.const_data_ptr(),
                               out.mutable_data_ptr(), x.numel() / d, d, eps, gemma);
  });
  return THPVariable_Wrap(std::move(out));
}

PyObject* do_steer_project(PyObject* const* slot) {
  Inputs in;
  const Tensor& hidden = model_rows(in, slot[0]);
  SteerArgs a;
  Tensor readings;
  steer_args(in, slot, hidden, a, readings);
  Tensor out = new_like(hidden);
  a.out = out.mutable_data_ptr();
  run_steer(hidden.scalar_type(), a);
  return tuple_of({THPVariable_Wrap(std::move(out)), wrap(readings)});
}

// add_rms_norm (fused=false) and add_rms_norm_steer_project (fused=true).
PyObject* do_add_rms_norm(PyObject* const* slot, bool fused) {
  Inputs in;
  const Tensor& residual = model_rows(in, slot[0]);
  const Tensor& w = weight_for(in, slot[2], residual);
  SteerArgs a;
  a.eps = eps_of(slot[3]);
  a.gemma = flag_of(slot[4]);
  PyObject* const none[8] = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* const* extra = fused ? slot + 5 : none;
  PyObject* const steer_slots[10] = {slot[0], slot[1], extra[0], extra[1], extra[2],
                                     extra[3], extra[4], extra[5], extra[6], extra[7]};
  Tensor readings;
  need(slot[1] && slot[1] != Py_None);  // x is required by the reference
  steer_args(in, steer_slots, residual, a, readings);
  Tensor r = new_like(residual);
  Tensor normed = new_like(residual);
  a.out = r.mutable_data_ptr();
  a.weight = w.const_data_ptr();
  a.normed = normed.mutable_data_ptr();
  run_steer(residual.scalar_type(), a);
  PyObject* n = THPVariable_Wrap(std::move(normed));
  PyObject* rr = THPVariable_Wrap(std::move(r));
  return fused ? tuple_of({n, rr, wrap(readings)}) : tuple_of({n, rr});
}

template <Op op>
PyObject* entry(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  PyObject* slots[kMaxParams];
  if (bind(g_sig[op], args, nargs, kwnames, slots)) {
    try {
      switch (op) {
        case kRmsNorm: return do_rms_norm(slots);
        case kSteerProject: return do_steer_project(slots);
        case kAddRmsNorm: return do_add_rms_norm(slots, false);
        default: return do_add_rms_norm(slots, true);
      }
    } catch (const Fallback&) {
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
      return nullptr;
    } catch (const std::exception& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
      return nullptr;
    }
  }
  if (!g_native[op]) {
    PyErr_SetString(PyExc_RuntimeError, "personakern cpu: inputs not supported and no fallback set");
    return nullptr;
  }
  return PyObject_Vectorcall(g_native[op], args, nargs, kwnames);
}

PyObject* set_fallbacks(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != kNumOps) {
    PyErr_SetString(PyExc_TypeError, "_set_fallbacks expects the four native ops");
    return nullptr;
  }
  for (int i = 0; i < kNumOps; ++i) {
    Py_XSETREF(g_native[i], Py_NewRef(args[i]));
  }
  Py_RETURN_NONE;
}

#define PK_FAST(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fn))

PyMethodDef g_methods[] = {
    {"rms_norm", PK_FAST(entry<kRmsNorm>), METH_FASTCALL | METH_KEYWORDS,
     "rms_norm($module, x, weight, eps, gemma=False)\n--\n\nFused RMSNorm (see backends.native)."},
    {"steer_project", PK_FAST(entry<kSteerProject>), METH_FASTCALL | METH_KEYWORDS,
     "steer_project($module, hidden, delta=None, steer_vecs=None, coef=None, clamp_vecs=None, "
     "clamp_lo=None, clamp_hi=None, readout=None, gate_vecs=None, gate_thr=None)\n--\n\n"
     "Residual add, steering, clamping and readout (see backends.native)."},
    {"add_rms_norm", PK_FAST(entry<kAddRmsNorm>), METH_FASTCALL | METH_KEYWORDS,
     "add_rms_norm($module, residual, x, weight, eps, gemma=False)\n--\n\n"
     "Residual add and RMSNorm (see backends.native)."},
    {"add_rms_norm_steer_project", PK_FAST(entry<kFused>), METH_FASTCALL | METH_KEYWORDS,
     "add_rms_norm_steer_project($module, residual, x, weight, eps, gemma=False, steer_vecs=None, "
     "coef=None, clamp_vecs=None, clamp_lo=None, clamp_hi=None, readout=None, gate_vecs=None, "
     "gate_thr=None)\n--\n\n"
     "steer_project followed by RMSNorm, in one pass per row (see backends.native)."},
    {"_set_fallbacks", PK_FAST(set_fallbacks), METH_FASTCALL,
     "_set_fallbacks($module, rms_norm, steer_project, add_rms_norm, add_rms_norm_steer_project)"
     "\n--\n\nNative ops that take calls outside the fast path."},
    {nullptr, nullptr, 0, nullptr},
};

#define PK_STR2(x) #x
#define PK_STR(x) PK_STR2(x)
#define PK_CAT2(a, b) a##b
#define PK_CAT(a, b) PK_CAT2(a, b)

PyModuleDef g_module = {PyModuleDef_HEAD_INIT, PK_STR(TORCH_EXTENSION_NAME), nullptr, -1, g_methods};

}  // namespace

PyMODINIT_FUNC PK_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  for (auto& sig : g_sig) {
    for (const char* name : sig.names) {
      PyObject* s = PyUnicode_InternFromString(name);
      if (!s) return nullptr;
      sig.interned.push_back(s);
    }
  }
  return PyModule_Create(&g_module);
}
