"""``torch.library`` registration of a compiled backend's kernels.

A compiled backend (cpu, triton, cuda) provides raw kernels with the native signatures. This
module turns them into ``personakern::<backend>_<op>`` custom ops with

- fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces the patched model;
- autograd through ``hidden``/``delta``/``residual``/``x`` and the norm weight (the persona
  vectors, coefficients and bounds are frozen), with closed-form backward formulas in plain
  torch ops, so preventative steering trains on the fused path and AOTAutograd can trace the
  backward too.

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


# ---------------------------------------------------------------------------- registration
def register(prefix: str, kernels: SimpleNamespace, fast_path: Callable[[], bool] = lambda: True) -> SimpleNamespace:
    """Register ``kernels`` (raw functions with the native signatures) as custom ops and
    return a namespace of the four ops with the native Python signatures."""
    lib = "personakern"

    @torch.library.custom_op(f"{lib}::{prefix}_rms_norm", mutates_args=())
    def rms_norm_op(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
        return kernels.rms_norm(x, weight, eps, gemma)

    @rms_norm_op.register_fake
    def _(x, weight, eps, gemma):
        return torch.empty_like(x)

    def rms_setup(ctx, inputs, output):
        x, weight, eps, gemma = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.gemma = eps, gemma

    def rms_backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx, gw = _rms_norm_grad(g, x, weight, ctx.eps, ctx.gemma)
        return gx, gw, None, None

    rms_norm_op.register_autograd(rms_backward, setup_context=rms_setup)

    @torch.library.custom_op(f"{lib}::{prefix}_steer_project", mutates_args=())
    def steer_op(hidden: Tensor, delta: Optional[Tensor], steer_vecs: Optional[Tensor], coef: Optional[Tensor],
                 clamp_vecs: Optional[Tensor], clamp_lo: Optional[Tensor], clamp_hi: Optional[Tensor],
                 readout: Optional[Tensor], gate_vecs: Optional[Tensor] = None,
                 gate_thr: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        out, readings = kernels.steer_project(hidden, delta, steer_vecs, coef, clamp_vecs, clamp_lo, clamp_hi, readout,
                                              gate_vecs, gate_thr)
        return out, _readings_or_empty(readings, hidden)

    @steer_op.register_fake
    def _(hidden, delta, steer_vecs, coef, clamp_vecs, clamp_lo, clamp_hi, readout, gate_vecs=None, gate_thr=None):
        m = 0 if readout is None else readout.shape[0]
        return torch.empty_like(hidden), hidden.new_empty((hidden.shape[0], m), dtype=torch.float32)

    def steer_setup(ctx, inputs, output):
        hidden, delta, steer_vecs, coef, clamp_vecs, lo, hi, _, gate_vecs, gate_thr = inputs
        ctx.has_delta = delta is not None
        ctx.save_for_backward(hidden, delta, steer_vecs, coef, clamp_vecs, lo, hi, gate_vecs, gate_thr)

    def steer_backward(ctx, g, g_readings):
        hidden, delta, steer_vecs, coef, clamp_vecs, lo, hi, gate_vecs, gate_thr = ctx.saved_tensors
        h = hidden if delta is None else hidden + delta
        gh = _steer_grad(g, h, steer_vecs, coef, clamp_vecs, lo, hi, gate_vecs, gate_thr)
        return gh, (gh if ctx.has_delta else None), None, None, None, None, None, None, None, None

    steer_op.register_autograd(steer_backward, setup_context=steer_setup)

    @torch.library.custom_op(f"{lib}::{prefix}_add_rms_norm", mutates_args=())
    def add_norm_op(residual: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool) -> tuple[Tensor, Tensor]:
        return kernels.add_rms_norm(residual, x, weight, eps, gemma)

    @add_norm_op.register_fake
    def _(residual, x, weight, eps, gemma):
        return torch.empty_like(residual), torch.empty_like(residual)

    def add_norm_setup(ctx, inputs, output):
        _, _, weight, eps, gemma = inputs
        ctx.save_for_backward(output[1], weight)
        ctx.eps, ctx.gemma = eps, gemma

    def add_norm_backward(ctx, g_normed, g_r):
        r, weight = ctx.saved_tensors
        gr, gw = _rms_norm_grad(g_normed, r, weight, ctx.eps, ctx.gemma)
        gr = gr + g_r
        return gr, gr, gw, None, None

    add_norm_op.register_autograd(add_norm_backward, setup_context=add_norm_setup)

    @torch.library.custom_op(f"{lib}::{prefix}_add_rms_norm_steer_project", mutates_args=())
    def fused_op(residual: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool,
                 steer_vecs: Optional[Tensor], coef: Optional[Tensor], clamp_vecs: Optional[Tensor],
                 clamp_lo: Optional[Tensor], clamp_hi: Optional[Tensor],
                 readout: Optional[Tensor], gate_vecs: Optional[Tensor] = None,
                 gate_thr: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        normed, r, readings = kernels.add_rms_norm_steer_project(
            residual, x, weight, eps, gemma, steer_vecs, coef, clamp_vecs, clamp_lo, clamp_hi, readout,
            gate_vecs, gate_thr)
        return normed, r, _readings_or_empty(readings, residual)

    @fused_op.register_fake
    def _(residual, x, weight, eps, gemma, steer_vecs, coef, clamp_vecs, clamp_lo, clamp_hi, readout,
          gate_vecs=None, gate_thr=None):
        m = 0 if readout is None else readout.shape[0]
        return (torch.empty_like(residual), torch.empty_like(residual),
                residual.new_empty((residual.shape[0], m), dtype=torch.float32))

    def fused_setup(ctx, inputs, output):
        residual, x, weight, eps, gemma, steer_vecs, coef, clamp_vecs, lo, hi, _, gate_vecs, gate_thr = inputs
        ctx.eps, ctx.gemma = eps, gemma
        ctx.save_for_backward(residual, x, output[1], weight, steer_vecs, coef, clamp_vecs, lo, hi,
                              gate_vecs, gate_thr)

    def fused_backward(ctx, g_normed, g_r, g_readings):
        residual, x, r, weight, steer_vecs, coef, clamp_vecs, lo, hi, gate_vecs, gate_thr = ctx.saved_tensors
        gr, gw = _rms_norm_grad(g_normed, r, weight, ctx.eps, ctx.gemma)
        gh = _steer_grad(gr + g_r, residual + x, steer_vecs, coef, clamp_vecs, lo, hi, gate_vecs, gate_thr)
        return gh, gh, gw, None, None, None, None, None, None, None, None, None, None

    fused_op.register_autograd(fused_backward, setup_context=fused_setup)

    def _direct(*tensors) -> bool:
        """Call the raw kernel: eager, and no gradient will be asked of this call."""
        if torch.compiler.is_compiling() or not fast_path():
            return False
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))

    def rms_norm(x, weight, eps, gemma=False):
        if _direct(x, weight):
            return kernels.rms_norm(x, weight, eps, gemma)
        return rms_norm_op(x, weight, eps, gemma)

    def steer_project(hidden, delta=None, steer_vecs=None, coef=None, clamp_vecs=None, clamp_lo=None,
                      clamp_hi=None, readout=None, gate_vecs=None, gate_thr=None):
        if _direct(hidden, delta):
            return kernels.steer_project(hidden, delta, steer_vecs, coef, clamp_vecs, clamp_lo, clamp_hi, readout,
                                         gate_vecs, gate_thr)
        out, readings = steer_op(hidden, delta, steer_vecs, coef, clamp_vecs, clamp_lo, clamp_hi, readout,
                                 gate_vecs, gate_thr)
        return out, (None if readout is None else readings)

    def add_rms_norm(residual, x, weight, eps, gemma=False):
        if _direct(residual, x, weight):
            return kernels.add_rms_norm(residual, x, weight, eps, gemma)
        return add_norm_op(residual, x, weight, eps, gemma)

    def add_rms_norm_steer_project(residual, x, weight, eps, gemma=False, steer_vecs=None, coef=None,
                                   clamp_vecs=None, clamp_lo=None, clamp_hi=None, readout=None,
                                   gate_vecs=None, gate_thr=None):
        if _direct(residual, x, weight):
            return kernels.add_rms_norm_steer_project(residual, x, weight, eps, gemma, steer_vecs, coef,
                                                      clamp_vecs, clamp_lo, clamp_hi, readout, gate_vecs, gate_thr)
        normed, r, readings = fused_op(residual, x, weight, eps, gemma, steer_vecs, coef, clamp_vecs,
                                       clamp_lo, clamp_hi, readout, gate_vecs, gate_thr)
        return normed, r, (None if readout is None else readings)

    return SimpleNamespace(rms_norm=rms_norm, steer_project=steer_project, add_rms_norm=add_rms_norm,
                           add_rms_norm_steer_project=add_rms_norm_steer_project,
                           ops=SimpleNamespace(rms_norm=rms_norm_op, steer_project=steer_op,
                                               add_rms_norm=add_norm_op, add_rms_norm_steer_project=fused_op))
