"""Triton kernel for the four ops: one program per row, the whole row held in registers.

Every op is the same row pipeline with parts switched off by constexpr flags, so there is one
kernel to keep numerically faithful to :mod:`personakern.backends.native`:

    h   = round(x + delta)                 (one rounding of the sum, as torch's add does)
    h32 = float(h) + sum_s gate_s(h) * coef[s] * V[s]   (gate_s: <h, g_s> > thr[s], or 1)
    h32 -= sum_k (p_k - clamp(p_k)) * c_k  (every p_k taken from the same, steered h32)
    readings[m] = <h32, u_m>
    h   = round(h32)                        (stored as the residual stream)
    y   = rmsnorm(float(h)) * w             (llama: round before * w; gemma: * (1 + w), then round)

The group sizes S, C, M are runtime loop bounds (0 runs no iteration), so adding a steering
vector does not recompile. Only long-stable ``tl`` APIs are used (triton 3.x).

Every stride is passed explicitly: triton specialises integer arguments equal to 1, so
contiguous rows still get vector loads, while strided or broadcast (stride 0) views work
without a copy.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# Beyond this the row no longer fits in registers comfortably; the backend falls back to native.
MAX_D = 16384


@triton.jit
def _rows_kernel(
    x_ptr, d_ptr, h_ptr, y_ptr, w_ptr,
    v_ptr, coef_ptr, c_ptr, lo_ptr, hi_ptr, u_ptr, read_ptr, g_ptr, gt_ptr,
    D, S, C, M,
    sx0, sx1, sd0, sd1, sv0, sv1, sa0, sa1, sc0, sc1,
    slo0, slo1, shi0, shi1, su0, su1, sg0, sg1, sgt0, sgt1, sw,
    eps,
    HAS_DELTA: tl.constexpr, STORE_H: tl.constexpr, HAS_STEER: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_CLAMP: tl.constexpr, HAS_READ: tl.constexpr, HAS_NORM: tl.constexpr,
    GEMMA: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # h_ptr's element type is the residual dtype even when STORE_H is off (the wrapper then
    # passes x itself), so every rounding below has one source of truth.
    H_DT = h_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    h = tl.load(x_ptr + row * sx0 + cols * sx1, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * sd0 + cols * sd1, mask=mask, other=0.0).to(tl.float32)
        h = (h + d).to(H_DT).to(tl.float32)

    if HAS_STEER:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s in range(S):
            a = tl.load(coef_ptr + row * sa0 + s * sa1).to(tl.float32)
            if HAS_GATE:
                # the condition is read on h before any steering (acc is kept apart from h)
                g = tl.load(g_ptr + s * sg0 + cols * sg1, mask=mask, other=0.0).to(tl.float32)
                thr = tl.load(gt_ptr + row * sgt0 + s * sgt1).to(tl.float32)
                a = tl.where(tl.sum(h * g, axis=0) > thr, a, 0.0)
            v = tl.load(v_ptr + s * sv0 + cols * sv1, mask=mask, other=0.0).to(tl.float32)
            acc += a * v
        h = h + acc

    if HAS_CLAMP:
        # The correction is accumulated apart from h so that every projection sees the same h
        # (the contract: clamps are applied simultaneously, not one after another).
        corr = tl.zeros([BLOCK_D], dtype=tl.float32)
        for k in range(C):
            c = tl.load(c_ptr + k * sc0 + cols * sc1, mask=mask, other=0.0).to(tl.float32)
            p = tl.sum(h * c, axis=0)
            lo = tl.load(lo_ptr + row * slo0 + k * slo1).to(tl.float32)
            hi = tl.load(hi_ptr + row * shi0 + k * shi1).to(tl.float32)
            excess = p - tl.maximum(tl.minimum(p, hi), lo)
            corr += excess * c
        h = h - corr

    if HAS_READ:
        for m in range(M):
            u = tl.load(u_ptr + m * su0 + cols * su1, mask=mask, other=0.0).to(tl.float32)
            tl.store(read_ptr + row * M + m, tl.sum(h * u, axis=0))

    hq = h.to(H_DT)
    if STORE_H:
        tl.store(h_ptr + row * D + cols, hq, mask=mask)

    if HAS_NORM:
        # The norm sees the rounded residual, exactly what native's rms_norm(r) receives.
        hr = hq.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(hr * hr, axis=0) / D + eps)
        xn = hr * rstd
        w = tl.load(w_ptr + cols * sw, mask=mask, other=0.0).to(tl.float32)
        if GEMMA:
            y = xn * (1.0 + w)
        else:
            # HF llama order: cast to the activation dtype first, then multiply by w.
            y = xn.to(H_DT).to(tl.float32) * w
        tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _launch_config(d: int) -> tuple[int, int]:
    block = max(16, triton.next_power_of_2(d))
    if block <= 128:
        warps = 1
    elif block <= 512:
        warps = 2
    elif block < 2048:
        warps = 4
    elif block < 8192:
        warps = 8
    else:
        warps = 16
    return block, warps


def _s(t: Optional[Tensor]) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def rows(
    x: Tensor,
    delta: Optional[Tensor],
    h_dtype: torch.dtype,
    store_h: bool,
    weight: Optional[Tensor] = None,
    y_dtype: Optional[torch.dtype] = None,
    eps: float = 0.0,
    gemma: bool = False,
    steering: tuple = (None,) * 8,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Run the row pipeline on 2-D ``[N, D]`` inputs; returns ``(y, h, readings)``.

    ``steering`` is the steering group of ``personakern.backends.contract`` in its order.
    ``y`` is None without ``weight`` (no norm), ``h`` is None unless ``store_h``. Callers
    guarantee N > 0 and D <= MAX_D; the group tensors' dtypes are converted in the kernel.
    """
    steer_vecs, coef, clamp_vecs, clamp_lo, clamp_hi, readout, gate_vecs, gate_thr = steering
    n, d = x.shape
    block, warps = _launch_config(d)
    if steer_vecs is not None and gate_vecs is not None:
        gate_thr = torch.broadcast_to(gate_thr, (n, gate_vecs.shape[0]))  # stride 0 where broadcast
    else:
        gate_vecs = gate_thr = None
    h = torch.empty((n, d), dtype=h_dtype, device=x.device) if store_h else None
    y = torch.empty((n, d), dtype=y_dtype, device=x.device) if weight is not None else None
    m = 0
    readings = None
    if readout is not None:
        m = readout.shape[0]
        readings = torch.empty((n, m), dtype=torch.float32, device=x.device)
    # Absent groups still need a pointer argument; x is a harmless stand-in never read.
    h_arg = h if store_h else x
    _rows_kernel[(n,)](
        x, delta if delta is not None else x, h_arg, y if y is not None else x,
        weight if weight is not None else x,
        steer_vecs if steer_vecs is not None else x, coef if coef is not None else x,
        clamp_vecs if clamp_vecs is not None else x,
        clamp_lo if clamp_lo is not None else x, clamp_hi if clamp_hi is not None else x,
        readout if readout is not None else x, readings if readings is not None else x,
        gate_vecs if gate_vecs is not None else x, gate_thr if gate_thr is not None else x,
        d,
        steer_vecs.shape[0] if steer_vecs is not None else 0,
        clamp_vecs.shape[0] if clamp_vecs is not None else 0,
        m,
        *_s(x), *_s(delta), *_s(steer_vecs), *_s(coef), *_s(clamp_vecs),
        *_s(clamp_lo), *_s(clamp_hi), *_s(readout), *_s(gate_vecs), *_s(gate_thr),
        weight.stride(0) if weight is not None else 0,
        float(eps),
        HAS_DELTA=delta is not None, STORE_H=store_h, HAS_STEER=steer_vecs is not None,
        HAS_GATE=steer_vecs is not None and gate_vecs is not None,
        HAS_CLAMP=clamp_vecs is not None, HAS_READ=readout is not None,
        HAS_NORM=weight is not None, GEMMA=bool(gemma), BLOCK_D=block,
        num_warps=warps,
    )
    return y, h, readings
