"""Conditional steering inside the fused ops (``gate_vecs``/``gate_thr``) on every backend.

The oracle is a direct per-row computation in float64 (not native's code path): steering
vector ``s`` is added to row ``n`` iff ``<h_n, g_s> > thr[n, s]``, the projection taken before
steering. Thresholds are drawn away from the projections (|p - thr| > 1e-2), so the decision is
the same for every summation order; then every backend must equal native to rounding.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import usable_backends
from personakern import ops as ops_dispatch
from personakern.backends import native

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1), (3, 7), (5, 40), (64, 576), (17, 4099)]
OPS = ("steer_project", "add_rms_norm_steer_project")


def _backends():
    names = ["native"] + [b for b in usable_backends(DEVICE) if b != "native"]
    return names


def case(n, d, s, dtype, seed=0, c=0, m=2):
    g = torch.Generator().manual_seed(seed + 31 * n + d)
    hidden = (3 * torch.randn(n, d, generator=g)).to(dtype)
    delta = torch.randn(n, d, generator=g).to(dtype)
    h64 = (hidden + delta).double()  # the sum the kernels see (rounded once to dtype)
    gate = torch.nn.functional.normalize(torch.randn(s, d, generator=g), dim=-1)
    p = h64 @ gate.double().t()
    # thresholds: a mix of open (-inf), closed (+inf) and data-dependent ones away from p
    thr = p + torch.where(torch.rand(n, s, generator=g) < 0.5, -0.5, 0.5).double()
    kind = torch.randint(0, 4, (n, s), generator=g)
    thr[kind == 0] = -math.inf
    thr[kind == 1] = math.inf
    kw = dict(steer_vecs=2 * torch.randn(s, d, generator=g), coef=torch.randn(n, s, generator=g),
              gate_vecs=gate, gate_thr=thr.float())
    if c:
        kw["clamp_vecs"] = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=-1)
        kw["clamp_lo"] = torch.full((n, c), -math.inf)
        kw["clamp_hi"] = torch.rand(n, c, generator=g)
    if m:
        kw["readout"] = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1)
    weight = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    to = lambda t: t.to(DEVICE)
    return to(hidden), to(delta), to(weight), {k: to(v) for k, v in kw.items()}, p


def oracle(hidden, delta, kw):
    """float64 per-row reference of the gated steering (no clamps)."""
    h = (hidden + delta).double().cpu()
    p = h @ kw["gate_vecs"].double().cpu().t()
    open_ = p > kw["gate_thr"].double().cpu()
    coef = torch.where(open_, kw["coef"].double().cpu(), 0.0)
    return h + coef @ kw["steer_vecs"].double().cpu(), open_


def _close(got, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-4)
    elif dtype == torch.bfloat16:
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=1e-1)
    else:
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-3, atol=2e-2)


def test_native_matches_float64_oracle():
    hidden, delta, _, kw, _ = case(9, 33, 3, torch.float32, m=0)
    out, _ = native.steer_project(hidden, delta, **kw)
    ref, open_ = oracle(hidden, delta, kw)
    assert 0 < open_.sum() < open_.numel()  # both branches exercised
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-6, atol=1e-5)
    # closed gates: the row is exactly the unsteered sum where every gate of the row is closed
    closed = ~open_.any(1)
    if closed.any():
        assert torch.equal(out[closed.to(out.device)], (hidden + delta)[closed.to(out.device)])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("s", [1, 3, 8])
def test_backends_match_native(backend, dtype, n, d, s):
    if backend == "triton" and DEVICE.type == "cpu" and (d > 576 or dtype == torch.bfloat16):
        pytest.skip("interpreted triton: long rows are slow, and there is no bf16")
    ops = ops_dispatch.select_backend(DEVICE, dtype, backend)
    hidden, delta, weight, kw, _ = case(n, d, s, dtype)
    out, readings = ops.steer_project(hidden, delta, **kw)
    ref, ref_read = native.steer_project(hidden, delta, **kw)
    _close(out, ref, dtype)
    _close(readings, ref_read, torch.float32 if dtype == torch.float32 else dtype)
    normed, r, readings = ops.add_rms_norm_steer_project(hidden, delta, weight, 1e-6, False, **kw)
    rn, rr, rread = native.add_rms_norm_steer_project(hidden, delta, weight, 1e-6, False, **kw)
    _close(r, rr, dtype)
    _close(normed, rn, dtype)
    _close(readings, rread, torch.float32 if dtype == torch.float32 else dtype)


@pytest.mark.parametrize("backend", _backends())
def test_gate_with_clamp_and_broadcast_threshold(backend):
    """Gates and caps in one call; a 1-D threshold broadcast over rows."""
    ops = ops_dispatch.select_backend(DEVICE, torch.float32, backend)
    hidden, delta, weight, kw, _ = case(6, 40, 2, torch.float32, c=2)
    kw["gate_thr"] = torch.tensor([0.0, -math.inf], device=DEVICE)
    out, readings = ops.steer_project(hidden, delta, **kw)
    ref, ref_read = native.steer_project(hidden, delta, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(readings, ref_read, rtol=1e-5, atol=1e-4)
    # the caps hold after steering
    p = out.double() @ kw["clamp_vecs"].double().t()
    assert (p <= kw["clamp_hi"].double() + 1e-4).all()


@pytest.mark.parametrize("backend", _backends())
def test_open_gates_equal_plain_steering_bitwise(backend):
    """All gates open (-inf) must give exactly the ungated op's bytes on the same backend."""
    ops = ops_dispatch.select_backend(DEVICE, torch.float16, backend)
    hidden, delta, weight, kw, _ = case(7, 130, 3, torch.float16)
    kw["gate_thr"] = torch.full_like(kw["gate_thr"], -math.inf)
    plain = {k: v for k, v in kw.items() if not k.startswith("gate")}
    got, _ = ops.steer_project(hidden, delta, **kw)
    ref, _ = ops.steer_project(hidden, delta, **plain)
    assert torch.equal(got, ref)


def test_gate_gradients_float64():
    """The gate is a step function: gradients flow as through plain steering with the open
    coefficients (checked by gradcheck through the registered op and against native autograd)."""
    if "cpu" not in usable_backends("cpu"):
        pytest.skip("cpu backend unavailable")
    ops = ops_dispatch.select_backend(torch.device("cpu"), torch.float64, "cpu")
    g = torch.Generator().manual_seed(3)
    n, d, s = 4, 9, 2
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    gate = torch.nn.functional.normalize(torch.randn(s, d, generator=g, dtype=torch.float64), dim=-1)
    p = (hidden + delta).detach() @ gate.t()
    thr = p + torch.tensor([[-0.5, 0.5]], dtype=torch.float64)
    kw = dict(steer_vecs=torch.randn(s, d, generator=g, dtype=torch.float64),
              coef=torch.randn(n, s, generator=g, dtype=torch.float64), gate_vecs=gate, gate_thr=thr,
              clamp_vecs=torch.nn.functional.normalize(torch.randn(1, d, generator=g, dtype=torch.float64), dim=-1),
              clamp_lo=torch.full((n, 1), -math.inf, dtype=torch.float64),
              clamp_hi=torch.zeros(n, 1, dtype=torch.float64))
    fn = lambda h, x: ops.steer_project(h, x, **kw)[0]
    assert torch.autograd.gradcheck(fn, (hidden, delta), eps=1e-6, atol=1e-5)
    w = torch.randn(n, d, generator=g, dtype=torch.float64)
    (fn(hidden, delta) * w).sum().backward()
    got = hidden.grad.clone(), delta.grad.clone()
    hidden.grad = delta.grad = None
    (native.steer_project(hidden, delta, **kw)[0] * w).sum().backward()
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], delta.grad)


def test_cpu_gated_calls_stay_on_the_compiled_path():
    """The C++ entry points hand unsupported calls to native; gated calls must not be among them."""
    from personakern.backends import cpu
    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())
    ext = cpu._load()

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to native")

    try:
        ext._set_fallbacks(refuse, refuse, refuse, refuse)
        for dtype in DTYPES:
            hidden, delta, weight, kw, _ = case(33, 200, 3, dtype, c=1)
            hidden, delta, weight = hidden.cpu(), delta.cpu(), weight.cpu()
            kw = {k: v.cpu() for k, v in kw.items()}
            out, _ = cpu.steer_project(hidden, delta, **kw)
            _close(out, native.steer_project(hidden, delta, **kw)[0], dtype)
            cpu.add_rms_norm_steer_project(hidden, delta, weight, 1e-6, False, **kw)
    finally:
        ext._set_fallbacks(native.rms_norm, native.steer_project, native.add_rms_norm,
                           native.add_rms_norm_steer_project)
