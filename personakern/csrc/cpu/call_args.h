// Python call arguments bound to the op contract's parameter names, and the tensors behind them
// (persona_ops.cpp's fast path). Included by persona_ops.cpp only. Anything this binding cannot
// take throws Fallback, and the call goes to the native implementation unchanged.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <vector>

namespace {

using at::Tensor;

struct Fallback {};  // thrown to route a call to the native implementation

inline void need(bool ok) {
  if (!ok) throw Fallback{};
}

// The names this file reads arguments by. Their positions come from the op contract
// (personakern/backends/contract.py) through _set_fallbacks, so calls bind as the native
// signature does; a call giving a contract argument not named here goes to native.
enum Name { kX, kWeight, kEps, kGemma, kHidden, kDelta, kResidual, kSteerVecs, kCoef, kClampVecs,
            kClampLo, kClampHi, kReadout, kGateVecs, kGateThr, kNumNames };
const char* const kNames[kNumNames] = {"x", "weight", "eps", "gemma", "hidden", "delta", "residual",
                                       "steer_vecs", "coef", "clamp_vecs", "clamp_lo", "clamp_hi",
                                       "readout", "gate_vecs", "gate_thr"};

struct Signature {
  std::vector<PyObject*> interned;  // parameter names in contract order
  int required = 0;
  int pos[kNumNames];  // where each name sits in the parameter list, -1 where the op has none
  std::vector<int> unknown;  // positions of parameters this file does not read
};
constexpr int kMaxParams = 16;

// Bound arguments of one call: by name, nullptr where not given or not a parameter of the op.
struct Args {
  const Signature& sig;
  PyObject* slots[kMaxParams];
  PyObject* operator[](Name n) const { return sig.pos[n] < 0 ? nullptr : slots[sig.pos[n]]; }
};

// Positional and keyword arguments into slots (nullptr = not given). Anything odd returns false
// and the call goes to native, which raises the proper TypeError.
bool bind(const Signature& sig, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
          PyObject** slots) {
  const Py_ssize_t count = static_cast<Py_ssize_t>(sig.interned.size());
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
  for (int i : sig.unknown)
    if (slots[i] && slots[i] != Py_None) return false;
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

}  // namespace
