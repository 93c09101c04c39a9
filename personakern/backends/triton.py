"""Triton backend: the four ops of :mod:`personakern.backends.native` as one fused row kernel.

Same signatures, defaults and return conventions as native, and the same numerics in
structure (one rounding of ``hidden + delta``, fp32 steering/clamping/readout, one final
rounding), so an idle patched model stays bit-identical here too.

Triton is imported lazily: this module always imports, and ``available()`` says whether it
can run. Calls that need autograd, or rows wider than ``triton_ops.MAX_D``, go to native:
the kernel has no backward and holds a whole row in registers.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
from torch import Tensor

from . import contract, native

NAME = "triton"

_ops = None
_import_error: Optional[str] = None
_MAX_D = 16384  # mirrors triton_ops.MAX_D without importing triton


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def _load():
    global _ops, _import_error
    if _ops is None and _import_error is None:
        try:
            _ops = importlib.import_module("personakern.kernels.triton_ops")
        except Exception as exc:  # ImportError, or a triton install broken in other ways
            _import_error = f"triton is not usable: {type(exc).__name__}: {exc}"
    return _ops


def unavailable_reason(device=None) -> Optional[str]:
    """None when the backend can run on ``device`` (default: CUDA if present), else why not."""
    if _load() is None:
        return _import_error
    if device is not None:
        if torch.device(device).type == "cuda" or _interpret():
            return None
        return f"triton runs on CUDA devices (or with TRITON_INTERPRET=1), not {torch.device(device)}"
    if torch.cuda.is_available() or _interpret():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"


def available(device=None) -> bool:
    return unavailable_reason(device) is None


def _native_needed(d: int, *tensors: Optional[Tensor]) -> bool:
    if d > _MAX_D or _load() is None:
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def _check_groups(steering: tuple) -> None:
    # native would fail on these too; the kernel would read a stand-in pointer instead
    s = contract.Steering(*steering)
    if s.steer_vecs is not None and s.coef is None:
        raise ValueError("steer_vecs needs coef [N, S]")
    if s.steer_vecs is not None and s.gate_vecs is not None and s.gate_thr is None:
        raise ValueError("gate_vecs needs gate_thr [N, S]")
    if s.clamp_vecs is not None and (s.clamp_lo is None or s.clamp_hi is None):
        raise ValueError("clamp_vecs needs clamp_lo and clamp_hi [N, C]")


def _rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
    d = x.shape[-1]
    if _native_needed(d, x, weight):
        return native.rms_norm(x, weight, eps, gemma)
    x2 = x.reshape(-1, d)
    if x2.shape[0] == 0:
        return native.rms_norm(x, weight, eps, gemma)
    y_dtype = x.dtype if gemma else torch.promote_types(weight.dtype, x.dtype)
    y, _, _ = _ops.rows(x2, None, x.dtype, False, weight, y_dtype, eps, gemma)
    return y.view(x.shape)


def _steer_project(hidden: Tensor, delta: Optional[Tensor], steering: tuple) -> tuple[Tensor, Optional[Tensor]]:
    d = hidden.shape[-1]
    s = contract.Steering(*steering)
    if _native_needed(d, hidden, delta, s.steer_vecs, s.clamp_vecs):
        return native.steer_project(hidden, delta, *steering)
    _check_groups(steering)
    h2 = hidden.reshape(-1, d)
    if h2.shape[0] == 0:
        return native.steer_project(hidden, delta, *steering)
    d2 = None
    h_dtype = hidden.dtype
    if delta is not None:
        d2 = delta.reshape(-1, d)
        h_dtype = torch.promote_types(hidden.dtype, delta.dtype)
    _, h, readings = _ops.rows(h2, d2, h_dtype, True, None, None, 0.0, False, steering)
    return h.view(hidden.shape), readings


def _add_rms_norm(residual: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool):
    return _add_rms_norm_steer_project(residual, x, weight, eps, gemma, None)


def _add_rms_norm_steer_project(residual: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool,
                                steering: Optional[tuple]):
    """``add_rms_norm`` (``steering`` None: two outputs) or the fused op (three)."""
    d = x.shape[-1]
    s = None if steering is None else contract.Steering(*steering)
    frozen = () if s is None else (s.steer_vecs, s.clamp_vecs)

    def on_native():
        if steering is None:
            return native.add_rms_norm(residual, x, weight, eps, gemma)
        return native.add_rms_norm_steer_project(residual, x, weight, eps, gemma, *steering)

    if _native_needed(d, residual, x, weight, *frozen):
        return on_native()
    if steering is not None:
        _check_groups(steering)
    if residual.reshape(-1, d).shape[0] == 0:
        return on_native()
    h_dtype = torch.promote_types(residual.dtype, x.dtype)
    y_dtype = h_dtype if gemma else torch.promote_types(weight.dtype, h_dtype)
    y, h, readings = _ops.rows(residual.reshape(-1, d), x.reshape(-1, d), h_dtype, True, weight, y_dtype, eps,
                               gemma, *(() if steering is None else (steering,)))
    if steering is None:
        return y.view(residual.shape), h.view(residual.shape)
    return y.view(residual.shape), h.view(residual.shape), readings


contract.define_backend(globals())
