"""Native backend: the op contracts of docs/design.md#the-fused-ops-contract in plain PyTorch.

This is both the fallback that runs everywhere and the oracle every other backend is tested
against, so it favours clarity and numerical care over speed.

Rows are tokens: ``hidden`` is ``[N, D]`` (N = batch x sequence). All steering arithmetic is
done in float32 and rounded to the model dtype once, which is why adding zero steering leaves a
bf16/fp16 hidden state bit-identical (the add is exact, one rounding of an exact value).

The ops are written functionally (they return the new hidden state) so that autograd works
through ``hidden`` and ``delta`` for preventative steering: an in-place update of a tensor that
an earlier op saved for backward would break training. Fused backends may update in place; the
caller always uses the returned tensor and treats the input ``hidden`` as consumed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import contract

NAME = "native"


def _acc(t: Tensor) -> Tensor:
    """Accumulation precision: float32 for half types and float32, float64 stays float64
    (gradcheck runs in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _as(vectors: Tensor, h32: Tensor) -> Tensor:
    """The float32 vectors in the rows' accumulation dtype (float64 rows: float64)."""
    return vectors.to(h32.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """``rmsnorm(x) * w`` exactly as Hugging Face computes it for the family.

    Llama-like: normalise in fp32, cast back to the input dtype, then multiply by ``w``.
    Gemma (``gemma=True``): multiply by ``1 + w`` in fp32, then cast.
    """
    dtype = x.dtype
    x32 = _acc(x)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (x32 * (1.0 + _acc(weight))).to(dtype)
    return weight * x32.to(dtype)


def steer_project(
    hidden: Tensor,
    delta: Optional[Tensor] = None,
    steer_vecs: Optional[Tensor] = None,
    coef: Optional[Tensor] = None,
    clamp_vecs: Optional[Tensor] = None,
    clamp_lo: Optional[Tensor] = None,
    clamp_hi: Optional[Tensor] = None,
    readout: Optional[Tensor] = None,
    gate_vecs: Optional[Tensor] = None,
    gate_thr: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Residual add, steering, clamping and projection readout of ``[N, D]`` rows.

    - ``h = hidden + delta`` (``delta`` is the sublayer output; optional)
    - ``h += coef @ steer_vecs``: ``steer_vecs [S, D]``, ``coef [N, S]`` (zeros switch a vector
      off for a row, which is how padding and prompt/response masks are expressed)
    - conditional steering (optional): with unit ``gate_vecs [S, D]`` and ``gate_thr [N, S]``,
      steering vector ``s`` is added to row ``n`` only where ``<h, g_s> > gate_thr[n, s]``, the
      projection taken on ``h`` before any steering. ``-inf`` makes a vector unconditional
      (a NaN projection never passes).
    - clamp the projection of ``h`` on each unit vector ``c_k`` (``clamp_vecs [C, D]``) into
      ``[clamp_lo[n, k], clamp_hi[n, k]]``: ``h -= (p - clamp(p, lo, hi)) * c_k``.
      Capping is ``lo=-inf, hi=tau``; ablation is ``lo=hi=0``; ``(-inf, inf)`` is a no-op.
    - ``readings[n, m] = <h, u_m>`` for unit vectors ``readout [M, D]`` (float32).

    Returns ``(h, readings)``; ``readings`` is None when ``readout`` is None.
    """
    h = hidden.clone() if delta is None else hidden + delta  # never alias an input (custom-op rule)
    if steer_vecs is None and clamp_vecs is None:
        if readout is None:
            return h, None
        h32 = _acc(h)
        return h, (h32 @ _as(readout, h32).t()).float()
    dtype = h.dtype
    h32 = _acc(h)
    if steer_vecs is not None:
        h32 = h32 + _as(gated_coef(h32, coef, gate_vecs, gate_thr), h32) @ _as(steer_vecs, h32)
    if clamp_vecs is not None:
        c = _as(clamp_vecs, h32)
        p = h32 @ c.t()
        excess = p - torch.maximum(torch.minimum(p, _acc(clamp_hi)), _acc(clamp_lo))
        h32 = h32 - excess @ c
    readings = None if readout is None else (h32 @ _as(readout, h32).t()).float()
    return h32.to(dtype), readings


def gated_coef(h32: Tensor, coef: Tensor, gate_vecs: Optional[Tensor], gate_thr: Optional[Tensor]) -> Tensor:
    """``coef`` with the entries whose gate is closed set to zero (``h32`` before steering)."""
    coef = _acc(coef)
    if gate_vecs is None:
        return coef
    if gate_thr is None:
        raise ValueError("gate_vecs needs gate_thr [N, S]")
    p = h32 @ _as(gate_vecs, h32).t()
    return torch.where(p > _acc(gate_thr), coef, torch.zeros_like(coef))


def add_rms_norm(residual: Tensor, x: Tensor, weight: Tensor, eps: float,
                 gemma: bool = False) -> tuple[Tensor, Tensor]:
    """``r = residual + x; return rmsnorm(r) * w, r`` (vLLM's fused_add_rms_norm pattern)."""
    r = residual + x
    return rms_norm(r, weight, eps, gemma), r


# The fused op's signature is the contract's (rms_norm's head, then the steering group).
add_rms_norm_steer_project = contract.define("add_rms_norm_steer_project", """
r, readings = steer_project(residual, x, {steering})
return rms_norm(r, weight, eps, gemma), r, readings
""", globals(), doc="""``steer_project(residual, x, ...)`` followed by the RMSNorm of the result.

    Returns ``(normed, residual_out, readings)``.
    """)
