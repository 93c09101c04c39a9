"""The triton backend against the native oracle, op by op.

Without a CUDA device the kernels run in triton's CPU interpreter, which cannot do bf16
arithmetic (so bf16 is only tested on CUDA) and is slow (so shapes stay modest).
"""
from __future__ import annotations

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the install
    pytest.skip(f"triton is not importable: {type(exc).__name__}: {exc}", allow_module_level=True)

from personakern.backends import native
from personakern.backends import triton as tb

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, pytest.param(
    torch.bfloat16, marks=pytest.mark.skipif(DEVICE.type != "cuda", reason="the interpreter has no bf16"))]
OPS = ("rms_norm", "steer_project", "add_rms_norm", "add_rms_norm_steer_project")
SHAPES = [(1, 1), (3, 7), (37, 40), (3, 576), (37, 1000)]
EPS = 1e-6

if not tb.available(DEVICE):
    pytest.skip(f"triton backend unavailable: {tb.unavailable_reason(DEVICE)}", allow_module_level=True)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rand(g, *shape, dtype=torch.float32, scale=1.0):
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)


def _unit(g, k, d):
    return torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=-1).to(DEVICE)


def _bounds(g, n, c, mode):
    """clamp_lo/hi [N, C]; "mixed" draws every kind (finite, cap, no-op, ablation) per entry."""
    lo = -torch.rand(n, c, generator=g) * 0.5
    hi = torch.rand(n, c, generator=g) * 0.5
    kind = torch.randint(0, 4, (n, c), generator=g) if mode == "mixed" else torch.full((n, c), mode)
    inf = torch.tensor(float("inf"))
    lo = torch.where(kind == 1, -inf, lo)  # capping
    lo = torch.where(kind == 2, -inf, lo)
    hi = torch.where(kind == 2, inf, hi)  # no-op
    lo = torch.where(kind == 3, 0.0, lo)
    hi = torch.where(kind == 3, 0.0, hi)  # ablation
    return lo.to(DEVICE), hi.to(DEVICE)


def _groups(g, n, d, s, c, m, bounds="mixed"):
    """Steer/clamp/readout kwargs; a count of None leaves that group out."""
    kw = {}
    if s is not None:
        kw["steer_vecs"] = _rand(g, s, d)
        kw["coef"] = _rand(g, n, s, scale=2.0)
    if c is not None:
        kw["clamp_vecs"] = _unit(g, c, d)
        kw["clamp_lo"], kw["clamp_hi"] = _bounds(g, n, c, bounds)
    if m is not None:
        kw["readout"] = _unit(g, m, d)
    return kw


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _float_inputs(args, kwargs):
    conv = lambda v: v.float() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return [conv(a) for a in args], {k: conv(v) for k, v in kwargs.items()}


def check(op, *args, **kwargs):
    """Run ``op`` on both backends and hold triton to native's accuracy."""
    snapshot = [a.clone() for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    got = _as_tuple(getattr(tb, op)(*args, **kwargs))
    want = _as_tuple(getattr(native, op)(*args, **kwargs))
    after = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after)), "inputs were modified"
    assert len(got) == len(want)
    dtype = args[0].dtype
    ref = None
    if dtype != torch.float32:
        fargs, fkw = _float_inputs(args, kwargs)
        ref = _as_tuple(getattr(native, op)(*fargs, **fkw))
    for i, (t, n) in enumerate(zip(got, want)):
        if n is None:
            assert t is None, f"output {i} should be None"
            continue
        assert t.shape == n.shape and t.dtype == n.dtype and t.device == n.device, (i, t.shape, n.shape)
        if t.numel() == 0:
            continue
        assert torch.isfinite(t).all()
        if ref is None:
            torch.testing.assert_close(t, n, rtol=1e-5, atol=1e-5 * max(1.0, n.abs().max().item()))
        else:
            r = ref[i].float()
            err_t = (t.float() - r).abs().max().item()
            err_n = (n.float() - r).abs().max().item()
            atol = 1e-5 * max(1.0, r.abs().max().item())
            assert err_t <= 2 * err_n + atol, f"output {i}: triton err {err_t} vs native {err_n}"
    return got


def test_module_contract():
    assert tb.NAME == "triton"
    assert tb.available() and tb.unavailable_reason() is None
    for op in OPS:
        assert inspect.signature(getattr(tb, op)) == inspect.signature(getattr(native, op)), op


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("n,d", SHAPES)
def test_rms_norm(n, d, gemma, dtype):
    g = _gen(n * 1000 + d)
    x = _rand(g, n, d, dtype=dtype, scale=3.0)
    w = (_rand(g, d, scale=0.3) + (0.0 if gemma else 1.0)).to(dtype)
    check("rms_norm", x, w, EPS, gemma)
    check("add_rms_norm", x, _rand(g, n, d, dtype=dtype), w, EPS, gemma=gemma)


# (S, C, M); None leaves the group out, 0 passes an empty one
GROUPS = [(None, None, None), (None, None, 3), (0, 0, 0), (1, 1, 1), (3, 3, 3), (3, None, 1), (None, 3, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", GROUPS, ids=str)
@pytest.mark.parametrize("n,d", [(1, 1), (3, 7), (37, 40), (3, 1000)])
def test_steer_project(n, d, groups, dtype):
    g = _gen(n * 1000 + d)
    hidden = _rand(g, n, d, dtype=dtype, scale=2.0)
    delta = _rand(g, n, d, dtype=dtype)
    kw = _groups(g, n, d, *groups)
    check("steer_project", hidden, delta, **kw)
    if groups[0] is None:
        check("steer_project", hidden, **kw)  # no delta


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("groups", [(None, None, None), (0, 0, 0), (1, 1, 1), (3, 3, 3), (None, 1, None)], ids=str)
@pytest.mark.parametrize("n,d", [(1, 7), (37, 40), (3, 576)])
def test_add_rms_norm_steer_project(n, d, groups, gemma, dtype):
    g = _gen(n * 1000 + d)
    residual = _rand(g, n, d, dtype=dtype, scale=2.0)
    x = _rand(g, n, d, dtype=dtype)
    w = (_rand(g, d, scale=0.3) + (0.0 if gemma else 1.0)).to(dtype)
    check("add_rms_norm_steer_project", residual, x, w, EPS, gemma, **_groups(g, n, d, *groups))


@pytest.mark.parametrize("bounds", ["mixed", 0, 1, 2, 3], ids=["mixed", "finite", "cap", "noop", "ablate"])
def test_clamp_bounds(bounds):
    g = _gen(7)
    n, d = 37, 576
    hidden = _rand(g, n, d, scale=2.0)
    kw = _groups(g, n, d, 3, 3, 3, bounds=bounds)
    # orthonormal clamp vectors, so that ablation must leave nothing along any of them
    kw["clamp_vecs"] = torch.linalg.qr(torch.randn(d, 3, generator=g))[0].t().contiguous().to(DEVICE)
    h, _ = check("steer_project", hidden, _rand(g, n, d), **kw)
    if bounds == 3:
        c = kw["clamp_vecs"]
        assert (h @ c.t()).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
def test_idle_is_bit_exact(dtype):
    g = _gen(3)
    n, d = 37, 1000
    hidden, delta = _rand(g, n, d, dtype=dtype, scale=2.0), _rand(g, n, d, dtype=dtype)
    exact = hidden + delta
    h, readings = tb.steer_project(hidden, delta)
    assert readings is None and torch.equal(h, exact)
    # present but idle groups: zero coefficients, (-inf, inf) clamps
    kw = _groups(g, n, d, 3, 3, 2, bounds=2)
    kw["coef"] = torch.zeros_like(kw["coef"])
    h, readings = tb.steer_project(hidden, delta, **kw)
    assert torch.equal(h, exact) and readings.shape == (n, 2)
    w = _rand(g, d, dtype=dtype)
    _, r = tb.add_rms_norm(hidden, delta, w, EPS)
    assert torch.equal(r, exact)
    _, r, readings = tb.add_rms_norm_steer_project(hidden, delta, w, EPS, False, **kw)
    assert torch.equal(r, exact)


def test_leading_dims_and_strides():
    g = _gen(11)
    d = 40
    x = _rand(g, 2, 5, d, dtype=torch.float16)
    w = _rand(g, d, dtype=torch.float16)
    check("rms_norm", x, w, EPS, False)
    check("add_rms_norm", x, _rand(g, 2, 5, d, dtype=torch.float16), w, EPS, True)
    # a column slice (row stride != D), broadcast clamp bounds (stride 0) and an fp32 weight
    wide = _rand(g, 6, 2 * d)
    hidden = wide[:, :d]
    lo, hi = _bounds(g, 1, 2, "mixed")
    kw = _groups(g, 6, d, 2, 2, 2)
    kw["clamp_lo"], kw["clamp_hi"] = lo.expand(6, 2), hi.expand(6, 2)
    check("steer_project", hidden, _rand(g, 6, d), **kw)
    check("add_rms_norm_steer_project", hidden.half(), _rand(g, 6, d, dtype=torch.float16),
          _rand(g, d), EPS, False, **kw)


def test_autograd_falls_back_to_native():
    g = _gen(5)
    hidden = _rand(g, 3, 40).requires_grad_()
    delta = _rand(g, 3, 40)
    kw = _groups(g, 3, 40, 1, 1, 1)
    h, _ = tb.steer_project(hidden, delta, **kw)
    h.sum().backward()
    assert hidden.grad is not None
    with torch.no_grad():
        check("steer_project", hidden, delta, **kw)


@pytest.mark.parametrize("op", ["steer_project", "add_rms_norm_steer_project"])
def test_sum_is_rounded_before_steering(op):
    # fp16 spacing at 1024 is 1: 1024 + 0.75 rounds to 1025, + 0.5 steering gives 1025.5 -> 1026
    # (round half to even). Steering the unrounded sum would give 1025.25 -> 1025 instead.
    n, d = 3, 8
    hidden = torch.full((n, d), 1024.0, dtype=torch.float16, device=DEVICE)
    delta = torch.full((n, d), 0.75, dtype=torch.float16, device=DEVICE)
    kw = dict(steer_vecs=torch.full((1, d), 0.5, device=DEVICE), coef=torch.ones(n, 1, device=DEVICE),
              readout=torch.eye(d, device=DEVICE)[:1])
    for backend in (native, tb):
        if op == "steer_project":
            h, readings = backend.steer_project(hidden, delta, **kw)
        else:
            _, h, readings = backend.add_rms_norm_steer_project(
                hidden, delta, torch.ones(d, dtype=torch.float16, device=DEVICE), EPS, False, **kw)
        assert torch.equal(h, torch.full_like(h, 1026.0)), backend.NAME
        assert torch.equal(readings, torch.full_like(readings, 1025.5)), backend.NAME
