// Python entry points of the CPU backend, written against the CPython vectorcall API rather than
// pybind11: decode calls these ~90 times per token, and argument conversion is most of the cost
// of a call at decode sizes.
//
// Anything outside the fast path (autograd needed, other devices or dtypes, broadcasting the
// kernels don't do, malformed arguments) is handed unchanged to the native implementation, so
// the semantics, including error messages, are the reference's by construction.
#include "buffers.h"
#include "call_args.h"
#include "kernels.h"
#include "step_tables.h"

#include <initializer_list>

namespace {

using personakern::cpu::SteerArgs;

enum Op { kRmsNorm, kSteerProject, kAddRmsNorm, kFused, kNumOps };
PyObject* g_native[kNumOps] = {};
Signature g_sig[kNumOps];   // each op's parameters, from the contract (bind_op)

inline bool model_dtype(c10::ScalarType s) {
  return s == c10::kFloat || s == c10::kBFloat16 || s == c10::kHalf;
}

// A fresh output (pooled when large, see buffers.h): what at::empty_like gives for the
// contiguous CPU tensors that reach here, without the trip through the dispatcher.
inline Tensor new_like(const Tensor& t) { return personakern::cpu::new_output(t.sizes(), t.scalar_type()); }

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

// The steering group of the contract, added to the rows `hidden` (+ `delta`).
void steer_args(Inputs& in, const Args& arg, PyObject* delta_arg, const Tensor& hidden, SteerArgs& a,
                Tensor& readings) {
  a.d = hidden.size(-1);
  a.n = hidden.numel() / a.d;
  a.hidden = hidden.const_data_ptr();
  // Per-row tables only line up with rows when the rows are the tensor's first dimension.
  const bool per_row_ok = hidden.dim() == 2;
  if (const Tensor* delta = in.get(delta_arg)) {
    need(delta->scalar_type() == hidden.scalar_type() && delta->sizes() == hidden.sizes());
    a.delta = delta->const_data_ptr();
  }
  const Tensor* steer = in.get(arg[kSteerVecs]);
  if (steer) {
    need(steer->scalar_type() == c10::kFloat && steer->dim() == 2 && steer->size(1) == a.d);
    const Tensor& coef = in.require(arg[kCoef]);
    a.s = steer->size(0);
    a.coef_stride = row_stride(coef, a.s, a.n, per_row_ok);
    a.steer = f32(*steer);
    a.coef = f32(coef);
    if (const Tensor* gate = in.get(arg[kGateVecs])) {
      need(gate->scalar_type() == c10::kFloat && gate->dim() == 2 && gate->size(0) == a.s &&
           gate->size(1) == a.d);
      const Tensor& thr = in.require(arg[kGateThr]);
      a.gate_stride = row_stride(thr, a.s, a.n, per_row_ok);
      a.gate = f32(*gate);
      a.gate_thr = f32(thr);
    }
  }
  const Tensor* clamp = in.get(arg[kClampVecs]);
  if (clamp) {
    need(clamp->scalar_type() == c10::kFloat && clamp->dim() == 2 && clamp->size(1) == a.d);
    const Tensor& lo = in.require(arg[kClampLo]);
    const Tensor& hi = in.require(arg[kClampHi]);
    a.c = clamp->size(0);
    a.lo_stride = row_stride(lo, a.c, a.n, per_row_ok);
    a.hi_stride = row_stride(hi, a.c, a.n, per_row_ok);
    a.clamp = f32(*clamp);
    a.lo = f32(lo);
    a.hi = f32(hi);
  }
  if (const Tensor* readout = in.get(arg[kReadout])) {
    need(readout->scalar_type() == c10::kFloat && readout->dim() == 2 && readout->size(1) == a.d);
    a.m = readout->size(0);
    a.readout = f32(*readout);
    auto sizes = hidden.sizes().vec();
    sizes.back() = a.m;
    readings = personakern::cpu::new_output(sizes, c10::kFloat);
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

PyObject* do_rms_norm(const Args& arg) {
  Inputs in;
  const Tensor& x = model_rows(in, arg[kX]);
  const Tensor& w = weight_for(in, arg[kWeight], x);
  const float eps = eps_of(arg[kEps]);
  const bool gemma = flag_of(arg[kGemma]);
  Tensor out = new_like(x);
  const int64_t d = x.size(-1);
  maybe_without_gil(3 * x.numel(), [&] {
    personakern::cpu::rms_norm(x.scalar_type(), x.const_data_ptr(), w.const_data_ptr(),
                               out.mutable_data_ptr(), x.numel() / d, d, eps, gemma);
  });
  return THPVariable_Wrap(std::move(out));
}

PyObject* do_steer_project(const Args& arg) {
  Inputs in;
  const Tensor& hidden = model_rows(in, arg[kHidden]);
  SteerArgs a;
  Tensor readings;
  steer_args(in, arg, arg[kDelta], hidden, a, readings);
  Tensor out = new_like(hidden);
  a.out = out.mutable_data_ptr();
  run_steer(hidden.scalar_type(), a);
  return tuple_of({THPVariable_Wrap(std::move(out)), wrap(readings)});
}

// add_rms_norm (fused=false: the op has no steering arguments) and add_rms_norm_steer_project.
PyObject* do_add_rms_norm(const Args& arg, bool fused) {
  Inputs in;
  const Tensor& residual = model_rows(in, arg[kResidual]);
  const Tensor& w = weight_for(in, arg[kWeight], residual);
  SteerArgs a;
  a.eps = eps_of(arg[kEps]);
  a.gemma = flag_of(arg[kGemma]);
  Tensor readings;
  need(arg[kX] && arg[kX] != Py_None);  // x is required by the reference
  steer_args(in, arg, arg[kX], residual, a, readings);
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
  Args arg{g_sig[op], {}};
  if (bind(g_sig[op], args, nargs, kwnames, arg.slots)) {
    try {
      switch (op) {
        case kRmsNorm: return do_rms_norm(arg);
        case kSteerProject: return do_steer_project(arg);
        case kAddRmsNorm: return do_add_rms_norm(arg, false);
        default: return do_add_rms_norm(arg, true);
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

#define PK_FAST(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fn))

const char* const kOpNames[kNumOps] = {"rms_norm", "steer_project", "add_rms_norm",
                                       "add_rms_norm_steer_project"};
const PyCFunction kEntries[kNumOps] = {PK_FAST(entry<kRmsNorm>), PK_FAST(entry<kSteerProject>),
                                       PK_FAST(entry<kAddRmsNorm>), PK_FAST(entry<kFused>)};

// One op's parameters from the contract: (names in order, how many have no default, doc with
// the text signature that inspect.signature reads). Sets module.<op> to a new C entry point.
bool bind_op(PyObject* module, int op, PyObject* spec) {
  PyObject *names, *doc;
  Signature sig;
  if (!PyArg_ParseTuple(spec, "O!iU", &PyTuple_Type, &names, &sig.required, &doc)) return false;
  const Py_ssize_t count = PyTuple_GET_SIZE(names);
  bool ok = count <= kMaxParams && sig.required >= 0 && sig.required <= count;
  std::fill(std::begin(sig.pos), std::end(sig.pos), -1);
  for (Py_ssize_t i = 0; ok && i < count; ++i) {
    PyObject* name = Py_NewRef(PyTuple_GET_ITEM(names, i));
    ok = PyUnicode_Check(name);
    if (ok) PyUnicode_InternInPlace(&name);  // kept for the life of the process
    sig.interned.push_back(name);
    int n = 0;
    while (ok && n < kNumNames && PyUnicode_CompareWithASCIIString(name, kNames[n]) != 0) ++n;
    if (n < kNumNames) sig.pos[n] = static_cast<int>(i);
    else sig.unknown.push_back(static_cast<int>(i));
  }
  const char* text = ok ? PyUnicode_AsUTF8(doc) : nullptr;
  if (!text) {
    if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "personakern cpu: bad parameters for %s", kOpNames[op]);
    return false;
  }
  // A method definition must outlive its function objects: it and its doc are never freed.
  auto* def = new PyMethodDef{kOpNames[op], kEntries[op], METH_FASTCALL | METH_KEYWORDS, strdup(text)};
  PyObject* fn = PyCFunction_NewEx(def, module, nullptr);  // module: "$module" in the signature
  g_sig[op] = std::move(sig);
  const int rc = fn ? PyObject_SetAttrString(module, kOpNames[op], fn) : -1;
  Py_XDECREF(fn);
  return rc == 0;
}

// _set_fallbacks(rms_norm, steer_project, add_rms_norm, add_rms_norm_steer_project[, contract]):
// the native ops that take calls outside the fast path, and (first time) each op's parameters
// as bind_op takes them, in that order.
PyObject* set_fallbacks(PyObject* module, PyObject* const* args, Py_ssize_t nargs) {
  PyObject* contract = nargs > kNumOps ? args[kNumOps] : nullptr;
  if ((nargs != kNumOps && !contract) || nargs > kNumOps + 1 ||
      (contract && (!PyTuple_Check(contract) || PyTuple_GET_SIZE(contract) != kNumOps))) {
    PyErr_SetString(PyExc_TypeError, "_set_fallbacks expects the four native ops (and their parameters)");
    return nullptr;
  }
  for (int i = 0; contract && i < kNumOps; ++i)
    if (!bind_op(module, i, PyTuple_GET_ITEM(contract, i))) return nullptr;
  for (int i = 0; i < kNumOps; ++i) Py_XSETREF(g_native[i], Py_NewRef(args[i]));
  Py_RETURN_NONE;
}

PyMethodDef g_methods[] = {
    {"_set_fallbacks", PK_FAST(set_fallbacks), METH_FASTCALL,
     "_set_fallbacks($module, rms_norm, steer_project, add_rms_norm, add_rms_norm_steer_project, "
     "contract=None)\n--\n\nNative ops for calls outside the fast path; the ops' parameters."},
    {"_buffers", PK_FAST(personakern::cpu::buffers_py), METH_FASTCALL,
     "_buffers($module, limit_bytes=None)\n--\n\n(limit, held, entries, reused, fresh) of the output pool."},
    {"_stream_threshold", PK_FAST(personakern::cpu::stream_threshold_py), METH_FASTCALL,
     "_stream_threshold($module, nbytes=None)\n--\n\nOutputs this large count as too large for the cache."},
    {nullptr, nullptr, 0, nullptr},
};

#define PK_STR2(x) #x
#define PK_STR(x) PK_STR2(x)
#define PK_CAT2(a, b) a##b
#define PK_CAT(a, b) PK_CAT2(a, b)

PyModuleDef g_module = {PyModuleDef_HEAD_INIT, PK_STR(TORCH_EXTENSION_NAME), nullptr, -1, g_methods};

}  // namespace

PyMODINIT_FUNC PK_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* module = PyModule_Create(&g_module);
  if (module && PyModule_AddFunctions(module, personakern::cpu::step_table_methods) < 0) Py_CLEAR(module);
  return module;
}
