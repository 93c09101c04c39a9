"""``torch.library`` registration of a compiled backend's kernels.

A compiled backend (cpu, triton, cuda) provides raw kernels with the contract's signatures
(:mod:`personakern.backends.contract`). This module turns them into
``personakern::<backend>_<op>`` custom ops, everything argument-shaped generated from the
contract: the schema, the public wrappers, and

- fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces the patched model;
- autograd through ``hidden``/``delta``/``residual``/``x`` and the norm weight (the persona
  vectors, coefficients and bounds are frozen), with closed-form backward formulas in plain
  torch ops, so preventative steering trains on the fused path and AOTAutograd can trace the
  backward too. Saving the inputs and laying the gradients out in argument order is generic;
  only the formulas (:data:`BACKWARD`) are per op.

The ops are functional (outputs are new tensors). Writing the block output to a fresh buffer
moves the same bytes as updating ``hidden`` in place (one read, one write per row), and a
functional op composes with autograd and with the compiler's functionalization for free.

In eager mode without autograd the backend calls its raw kernel directly: going through the
dispatcher costs microseconds per call, ~90 calls per decoded token.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import torch
from torch import Tensor

from ..backends import contract


def _acc(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _readings_or_empty(readings: Optional[Tensor], rows: Tensor) -> Tensor:
    return rows.new_empty((rows.shape[0], 0), dtype=torch.float32) if readings is None else readings


# ---------------------------------------------------------------------------- backward pieces
def _clamp_active(h: Tensor, steer_vecs, coef, clamp_vecs, lo, hi, gate_vecs=None, gate_thr=None) -> Tensor:
    """[N, C] mask of the clamp constraints that were binding in the forward."""
    from ..backends.native import gated_coef
    h32 = _acc(h)
    if steer_vecs is not None:
        h32 = h32 + gated_coef(h32, coef, gate_vecs, gate_thr) @ _acc(steer_vecs)
    p = h32 @ _acc(clamp_vecs).t()
    return ((p < lo) | (p > hi)).float()


def _steer_grad(g: Tensor, h: Tensor, steer_vecs, coef, clamp_vecs, lo, hi, gate_vecs=None, gate_thr=None) -> Tensor:
    """Vector-Jacobian product of the steered output w.r.t. the summed input ``h``.

    The Jacobian is ``I - sum_k a_k c_k c_k^T`` (a_k: constraint k was binding), steering
    vectors being constants (a gate is a step function of ``h``: zero derivative almost
    everywhere)."""
    if clamp_vecs is None or clamp_vecs.shape[0] == 0:
        return g
    active = _clamp_active(h, steer_vecs, coef, clamp_vecs, lo, hi, gate_vecs, gate_thr)
    c = _acc(clamp_vecs)
    g32 = _acc(g)
    return (g32 - ((g32 @ c.t()) * active) @ c).to(g.dtype)


def _rms_norm_grad(g: Tensor, r: Tensor, weight: Tensor, eps: float, gemma: bool):
    """Gradients of ``rmsnorm(r) * w`` (or ``* (1 + w)``) w.r.t. ``r`` and ``w``."""
    r32 = _acc(r)
    rstd = torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)
    n = r32 * rstd
    w32 = _acc(weight) + (1.0 if gemma else 0.0)
    gw = _acc(g) * w32
    grad_r = rstd * (gw - n * (gw * n).mean(-1, keepdim=True))
    grad_w = (_acc(g) * n).sum(0)
    return grad_r.to(r.dtype), grad_w.to(weight.dtype)


# ---------------------------------------------------------------------------- backward formulas
# Per op: the inputs (by contract name) and outputs (by index) the backward needs, and the
# formula, which returns the gradients of the differentiable inputs by name. Saving, restoring
# and laying the gradients out in argument order is generic (see _register_autograd).
def _rms_norm_backward(a, outs, g):
    gx, gw = _rms_norm_grad(g[0], a.x, a.weight, a.eps, a.gemma)
    return {"x": gx, "weight": gw}


def _steer_backward(a, outs, g):
    h = a.hidden if a.delta is None else a.hidden + a.delta
    gh = _steer_grad(g[0], h, a.steer_vecs, a.coef, a.clamp_vecs, a.clamp_lo, a.clamp_hi, a.gate_vecs, a.gate_thr)
    return {"hidden": gh, "delta": gh}


def _add_norm_backward(a, outs, g):
    gr, gw = _rms_norm_grad(g[0], outs[0], a.weight, a.eps, a.gemma)
    gr = gr + g[1]
    return {"residual": gr, "x": gr, "weight": gw}


def _fused_backward(a, outs, g):
    gr, gw = _rms_norm_grad(g[0], outs[0], a.weight, a.eps, a.gemma)
    gh = _steer_grad(gr + g[1], a.residual + a.x, a.steer_vecs, a.coef, a.clamp_vecs, a.clamp_lo, a.clamp_hi,
                     a.gate_vecs, a.gate_thr)
    return {"residual": gh, "x": gh, "weight": gw}


_STEER_SAVED = tuple(a.name for a in contract.STEERING if a.name != "readout")
BACKWARD = {
    "rms_norm": (("x", "weight"), (), _rms_norm_backward),
    "steer_project": (("hidden", "delta") + _STEER_SAVED, (), _steer_backward),
    "add_rms_norm": (("weight",), (1,), _add_norm_backward),
    "add_rms_norm_steer_project": (("residual", "x", "weight") + _STEER_SAVED, (1,), _fused_backward),
}


# ---------------------------------------------------------------------------- registration
def _bind(op: str, args: tuple, kwargs: dict) -> dict:
    """The arguments by name, defaults filled in (the dispatcher may leave trailing defaults out)."""
    a = {arg.name: arg.default for arg in contract.OPS[op].args}
    a.update(zip(a, args), **kwargs)
    return a


def _fake(op: str):
    spec = contract.OPS[op]

    def fake(*args, **kwargs):
        a = _bind(op, args, kwargs)
        outs = []
        for like in spec.outputs:
            if like == "readings":
                rows, readout = a[spec.args[0].name], a[spec.readings_of]
                m = 0 if readout is None else readout.shape[0]
                outs.append(rows.new_empty((rows.shape[0], m), dtype=torch.float32))
            else:
                outs.append(torch.empty_like(a[like]))
        return outs[0] if len(outs) == 1 else tuple(outs)
    return fake


def _register_autograd(custom, op: str) -> None:
    args = contract.OPS[op].args
    names = [a.name for a in args]
    scalars = [a.name for a in args if a.role == contract.SCALAR]
    grad = [a.role == contract.GRAD for a in args]
    saved_inputs, saved_outputs, formula = BACKWARD[op]

    def setup_context(ctx, inputs, output):
        a = _bind(op, inputs, {})
        ctx.scalars = {n: a[n] for n in scalars}
        ctx.given = [a[n] is not None for n in names]
        output = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*(a[n] for n in saved_inputs), *(output[i] for i in saved_outputs))

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        k = len(saved_inputs)
        a = SimpleNamespace(**ctx.scalars, **dict(zip(saved_inputs, saved[:k])))
        got = formula(a, saved[k:], grads)
        return tuple(got[n] if g and given else None for n, g, given in zip(names, grad, ctx.given))

    custom.register_autograd(backward, setup_context=setup_context)


def register(prefix: str, kernels: SimpleNamespace, fast_path: Callable[[], bool] = lambda: True) -> SimpleNamespace:
    """Register ``kernels`` (raw functions with the contract's signatures) as custom ops and
    return a namespace of the four ops with those signatures."""
    def _direct(*tensors) -> bool:
        """Call the raw kernel: eager, and no gradient will be asked of this call."""
        if torch.compiler.is_compiling() or not fast_path():
            return False
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))

    public, custom_ops = {}, {}
    for op, spec in contract.OPS.items():
        # looked up at each call: the cpu backend rebinds its names once the extension loads
        def impl(*args, _op=op, **kwargs):
            outs = getattr(kernels, _op)(*args, **kwargs)
            if contract.OPS[_op].readings_of is None:
                return outs
            return (*outs[:-1], _readings_or_empty(outs[-1], args[0]))
        custom = torch.library.custom_op(f"personakern::{prefix}_{op}", impl, mutates_args=(),
                                         schema=contract.schema(op))
        custom.register_fake(_fake(op))
        _register_autograd(custom, op)
        custom_ops[op] = custom
        # the custom op returns [N, 0] readings without a readout; the contract says None
        body = f"if _direct({{grad}}):\n    return _kernels.{op}({{args}})\n"
        body += ("return _op({args})" if spec.readings_of is None else
                 "outs = _op({args})\nreturn (*outs[:-1], None if {readout} is None else outs[-1])")
        # no __name__ in these globals: torch.compile would look the names up in that module
        public[op] = contract.define(op, body, {"_direct": _direct, "_kernels": kernels, "_op": custom})
    return SimpleNamespace(**public, ops=SimpleNamespace(**custom_ops))
