"""torch.library registration: opcheck, float64 gradcheck, and gradients equal to native autograd.

The native kernels stand in for a compiled backend here, so these checks run everywhere; the
compiled backends reuse the same registration."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from personakern.backends import native
from personakern.ops.library import register

OPS = register("selftest", SimpleNamespace(rms_norm=native.rms_norm, steer_project=native.steer_project,
                                           add_rms_norm=native.add_rms_norm,
                                           add_rms_norm_steer_project=native.add_rms_norm_steer_project))


def make(n=5, d=11, s=2, c=2, m=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)
    unit = lambda k: torch.nn.functional.normalize(r(k, d), dim=-1)
    lo = torch.full((n, c), -float("inf"), dtype=dtype)
    hi = torch.full((n, c), float("inf"), dtype=dtype)
    hi[:, 0] = -0.3          # capping that binds on most rows
    lo[:2, 1] = hi[:2, 1] = 0.0  # ablation on two rows
    hidden, delta = r(n, d), r(n, d)
    gate = unit(s)
    # conditional steering: one gate open and one closed per row, half a unit from the boundary
    thr = ((hidden + delta) @ gate.t()).detach() + torch.tensor([-0.5, 0.5], dtype=dtype)[:s]
    return dict(hidden=hidden, delta=delta, steer_vecs=r(s, d), coef=r(n, s), clamp_vecs=unit(c),
                clamp_lo=lo, clamp_hi=hi, readout=unit(m), gate_vecs=gate, gate_thr=thr,
                weight=1 + 0.1 * r(d))


STEER_KEYS = ("steer_vecs", "coef", "clamp_vecs", "clamp_lo", "clamp_hi", "readout", "gate_vecs", "gate_thr")


def test_opcheck():
    t = make(dtype=torch.float32)
    steer = [t[k] for k in STEER_KEYS]
    torch.library.opcheck(OPS.ops.steer_project, (t["hidden"], t["delta"], *steer))
    torch.library.opcheck(OPS.ops.steer_project, (t["hidden"], None, None, None, None, None, None, None))
    torch.library.opcheck(OPS.ops.rms_norm, (t["hidden"], t["weight"], 1e-6, False))
    torch.library.opcheck(OPS.ops.add_rms_norm, (t["hidden"], t["delta"], t["weight"], 1e-6, True))
    torch.library.opcheck(OPS.ops.add_rms_norm_steer_project,
                          (t["hidden"], t["delta"], t["weight"], 1e-6, False, *steer))


@pytest.mark.parametrize("gemma", [False, True])
def test_gradcheck_float64(gemma):
    t = make()
    steer = [t[k] for k in STEER_KEYS]
    h, d = t["hidden"].requires_grad_(), t["delta"].requires_grad_()
    w = t["weight"].requires_grad_()
    torch.autograd.gradcheck(lambda h, d: OPS.ops.steer_project(h, d, *steer)[0], (h, d))
    torch.autograd.gradcheck(lambda h, w: OPS.ops.rms_norm(h, w, 1e-6, gemma), (h, w))
    torch.autograd.gradcheck(lambda h, d, w: OPS.ops.add_rms_norm(h, d, w, 1e-6, gemma), (h, d, w))
    torch.autograd.gradcheck(
        lambda h, d, w: OPS.ops.add_rms_norm_steer_project(h, d, w, 1e-6, gemma, *steer)[:2], (h, d, w))


def test_gradients_equal_native_autograd():
    t = make(n=7, d=33, dtype=torch.float32, seed=3)
    steer = [t[k] for k in STEER_KEYS]

    def grads(fn):
        h = t["hidden"].clone().requires_grad_()
        d = t["delta"].clone().requires_grad_()
        w = t["weight"].clone().requires_grad_()
        normed, r, _ = fn(h, d, w, 1e-5, False, *steer)
        (normed.square().sum() + (r * 0.3).sum()).backward()
        return h.grad, d.grad, w.grad

    for a, b in zip(grads(OPS.add_rms_norm_steer_project), grads(native.add_rms_norm_steer_project)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_direct_path_without_grad_and_readings_none():
    t = make(dtype=torch.float32)
    out, readings = OPS.steer_project(t["hidden"], t["delta"])
    assert readings is None and torch.equal(out, t["hidden"] + t["delta"])
    out, readings = OPS.steer_project(t["hidden"].requires_grad_(), t["delta"], readout=t["readout"])
    assert out.requires_grad and readings.shape == (5, 3)


def test_opcheck_compiled_backends():
    """The registration of each compiled backend usable here passes torch.library's checks
    (schema, fake kernel, autograd registration, dispatcher consistency)."""
    from conftest import usable_backends
    from personakern import ops
    compiled = [b for b in usable_backends() if b != "native"]
    if not compiled:
        pytest.skip("no compiled backend usable here")
    t = make(n=6, d=19, dtype=torch.float32, seed=7)
    steer = [t[k] for k in STEER_KEYS]
    for name in compiled:
        lib = ops.select_backend(torch.device("cpu"), torch.float32, name).ops
        torch.library.opcheck(lib.steer_project, (t["hidden"], t["delta"], *steer))
        torch.library.opcheck(lib.rms_norm, (t["hidden"], t["weight"], 1e-6, True))
        torch.library.opcheck(lib.add_rms_norm, (t["hidden"], t["delta"], t["weight"], 1e-6, False))
        torch.library.opcheck(lib.add_rms_norm_steer_project,
                              (t["hidden"], t["delta"], t["weight"], 1e-6, False, *steer))
