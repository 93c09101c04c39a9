"""The CUDA backend against the native oracle, on a GPU (skipped elsewhere).

fp32 must match native to ~1e-5 relative. In bf16/fp16 both backends round the same fp32
values, so the kernel must (a) agree with native in the dtype bit for bit on all but a few
near-tie elements and (b) be no further from an fp32 reference than twice native's own
distance to it. Tolerances are scaled by the size of what is compared (a readout is a dot
product, so its rounding error grows with the row norm, not with the reading).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from personakern.backends import native

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NS = [1, 3, 64, 4096]
DS = [1, 7, 40, 576, 2048, 4099, 8192]
EPS = 1e-6
INF = float("inf")


@pytest.fixture(scope="module")
def backend():
    from personakern.backends import cuda

    assert cuda.available(), cuda.unavailable_reason()
    # native's fp32 matmuls must stay fp32 for the 1e-5 comparison
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield cuda
    torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------- inputs
def _randn(shape, g, scale=1.0):
    return torch.randn(shape, generator=g, device=DEVICE) * scale


def _unit(k, d, g):
    v = _randn((k, d), g)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)


def _bounds(n, c, g):
    """[n, c] bounds mixing windows, caps (-inf, tau), ablation (0, 0) and no-ops (-inf, inf)."""
    lo = -torch.rand((n, c), generator=g, device=DEVICE)
    hi = torch.rand((n, c), generator=g, device=DEVICE)
    kind = torch.randint(0, 4, (n, c), generator=g, device=DEVICE)
    lo = torch.where(kind == 1, -INF, torch.where(kind == 2, 0.0, torch.where(kind == 3, -INF, lo)))
    hi = torch.where(kind == 2, 0.0, torch.where(kind == 3, INF, hi))
    return lo, hi


def make_case(n, d, dtype, s=3, c=3, m=3, seed=0):
    """Rows and persona groups; s/c/m None leave the group out, 0 gives it zero vectors."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    case = SimpleNamespace(
        hidden=_randn((n, d), g).to(dtype),
        delta=_randn((n, d), g, 0.5).to(dtype),
        weight=(1 + _randn((d,), g, 0.1)).to(dtype),
        steer_vecs=None, coef=None, clamp_vecs=None, clamp_lo=None, clamp_hi=None, readout=None)
    if s is not None:
        case.steer_vecs = _randn((s, d), g, 0.5)
        coef = torch.rand((n, s), generator=g, device=DEVICE) * 4 - 2
        case.coef = torch.where(torch.rand((n, s), generator=g, device=DEVICE) < 0.2, 0.0, coef)
    if c is not None:
        case.clamp_vecs = _unit(c, d, g)
        case.clamp_lo, case.clamp_hi = _bounds(n, c, g)
    if m is not None:
        case.readout = _unit(m, d, g)
    return case


def groups(case):
    return (case.steer_vecs, case.coef, case.clamp_vecs, case.clamp_lo, case.clamp_hi, case.readout)


def upcast(case):
    """The same inputs in fp32: the reference that neither backend's rounding reaches."""
    out = SimpleNamespace(**vars(case))
    out.hidden, out.delta, out.weight = case.hidden.float(), case.delta.float(), case.weight.float()
    return out


def run_ops(b, case, gemma):
    """Every op on ``case``: {name: tensor or None}."""
    res = {"rms_norm": b.rms_norm(case.hidden, case.weight, EPS, gemma)}
    res["steer.out"], res["steer.readings"] = b.steer_project(case.hidden, case.delta, *groups(case))
    res["add.normed"], res["add.r"] = b.add_rms_norm(case.hidden, case.delta, case.weight, EPS, gemma)
    res["fused.normed"], res["fused.r"], res["fused.readings"] = b.add_rms_norm_steer_project(
        case.hidden, case.delta, case.weight, EPS, gemma, *groups(case))
    return res


# ---------------------------------------------------------------------------- comparison
def _scale(name, truth):
    if name.endswith("readings"):  # unit readouts: error ~ eps * |h| of the row
        return float(truth["steer.out"].float().norm(dim=-1).max()) + 1e-30
    return float(truth[name].float().abs().max()) + 1e-30


def check(got, ref, truth, dtype):
    """``got`` (kernel) against ``ref`` (native, same dtype) and ``truth`` (native, fp32)."""
    assert got.keys() == ref.keys()
    for name in ref:
        g, r = got[name], ref[name]
        if r is None:
            assert g is None, name
            continue
        assert g is not None and g.shape == r.shape and g.dtype == r.dtype and g.device == r.device, name
        if g.numel() == 0:
            continue
        scale = _scale(name, truth)
        err = float((g.double() - r.double()).abs().max())
        if dtype == torch.float32 or name.endswith("readings"):  # readings are fp32 in every dtype
            assert err <= 1e-5 * scale, f"{name}: |kernel - native| = {err:.3g} > 1e-5 * {scale:.3g}"
        if dtype == torch.float32:
            continue
        if not name.endswith("readings"):
            mismatched = int((g != r).sum())
            assert mismatched <= max(1, g.numel() // 100), f"{name}: {mismatched} of {g.numel()} differ from native"
        t = truth[name].double()
        err_k = float((g.double() - t).abs().max())
        err_n = float((r.double() - t).abs().max())
        atol = 0.5 * torch.finfo(dtype).eps * scale
        assert err_k <= 2 * err_n + atol, f"{name}: kernel error {err_k:.3g} vs native {err_n:.3g}"


def compare(b, case, dtype, gemma):
    got = run_ops(b, case, gemma)
    ref = run_ops(native, case, gemma)
    truth = ref if dtype == torch.float32 else run_ops(native, upcast(case), gemma)
    check(got, ref, truth, dtype)


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("n", NS)
def test_ops_match_native(backend, n, d, dtype):
    case = make_case(n, d, dtype, seed=n * 10007 + d)
    for gemma in (False, True):
        compare(backend, case, dtype, gemma)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [40, 576, 4099])
@pytest.mark.parametrize("s,c,m", [(s, c, m) for s in (None, 0, 1, 3) for c in (None, 0, 1, 3)
                                   for m in (None, 0, 1, 3)])
def test_group_sizes(backend, s, c, m, d, dtype):
    compare(backend, make_case(64, d, dtype, s, c, m, seed=d), dtype, gemma=d % 2 == 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_readouts_and_max_clamps(backend, dtype):
    """Readouts beyond one reduction round; the most clamp vectors the kernel holds; one more
    falls back to native."""
    cap = 8  # kMaxProj in personakern/csrc/cuda/persona_kernels.h
    for c, m in ((cap, 2 * cap + 3), (cap + 1, 1)):
        compare(backend, make_case(64, 576, dtype, s=2, c=c, m=m, seed=c), dtype, gemma=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_longer_than_shared_memory(backend, dtype):
    """Rows whose fp32 copy exceeds shared memory are recomputed from global memory."""
    for d in (16384, 65536, 65536 + 8):
        compare(backend, make_case(3, d, dtype, seed=d), dtype, gemma=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [12080, 12081, 12288])
def test_rows_at_the_48kb_edge(backend, d, dtype):
    """The fp32 row cache (4 D bytes) and the kernel's static arrays (832 bytes) pass 48 KB
    together from D = 12081, while 4 D alone stays within it up to 12288 (a real hidden size):
    these launches need the shared-memory opt-in (tests/test_cuda_launch_plan.py)."""
    for n in (1, 5):
        compare(backend, make_case(n, d, dtype, seed=d + n), dtype, gemma=n == 5)


def _cudart(backend):
    """The CUDA runtime the extension itself calls (its last-error slot is the one that matters)."""
    import ctypes
    import subprocess

    lib = backend._state["ext"].__file__
    out = subprocess.run(["ldd", lib], capture_output=True, text=True).stdout
    paths = [line.split("=>")[1].split()[0] for line in out.splitlines() if "libcudart" in line and "=>" in line]
    if not paths:
        pytest.skip(f"cannot find the CUDA runtime {lib} links (static?)")
    return ctypes.CDLL(paths[0])


def test_launch_ignores_an_earlier_error(backend):
    """An error another call left on this thread is not this launch's error: the op runs. (A
    check with cudaGetLastError after a <<<>>> launch reported it as the launch's.)"""
    case = make_case(5, 576, torch.float32, seed=3)
    ref = native.rms_norm(case.hidden, case.weight, EPS)
    rt = _cudart(backend)
    torch.cuda.synchronize()
    assert rt.cudaSetDevice(-1) != 0  # cudaErrorInvalidDevice: not sticky, left in the slot
    try:
        assert rt.cudaPeekAtLastError() != 0
        got = backend.rms_norm(case.hidden, case.weight, EPS)
    finally:
        rt.cudaGetLastError()  # the next torch kernel must not report it either
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 1), (3, 7), (64, 576), (5, 4099), (4096, 2048)])
def test_idle_is_bit_exact(backend, n, d, dtype):
    """No steering, zero coefficients or (-inf, inf) clamps: the block output is exactly
    ``hidden + delta`` in the model dtype, as in an unpatched model."""
    case = make_case(n, d, dtype, s=2, c=2, m=2, seed=7)
    plain = case.hidden + case.delta
    zero = torch.zeros_like(case.coef)
    lo, hi = torch.full_like(case.clamp_lo, -INF), torch.full_like(case.clamp_hi, INF)
    variants = [(None, None, None, None, None, None), (case.steer_vecs, zero, None, None, None, None),
                (None, None, case.clamp_vecs, lo, hi, case.readout),
                (case.steer_vecs, zero, case.clamp_vecs, lo, hi, case.readout)]
    for grp in variants:
        out, _ = backend.steer_project(case.hidden, case.delta, *grp)
        assert torch.equal(out, plain)
        _, r, _ = backend.add_rms_norm_steer_project(case.hidden, case.delta, case.weight, EPS, False, *grp)
        assert torch.equal(r, plain)
    assert torch.equal(backend.steer_project(case.hidden)[0], case.hidden)
    assert torch.equal(backend.add_rms_norm(case.hidden, case.delta, case.weight, EPS)[1], plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ablation_zeroes_the_projection(backend, dtype):
    case = make_case(64, 2048, dtype, s=1, c=1, m=None, seed=3)
    zeros = torch.zeros_like(case.clamp_lo)
    out, readings = backend.steer_project(case.hidden, case.delta, case.steer_vecs, case.coef,
                                          case.clamp_vecs, zeros, zeros, case.clamp_vecs)
    assert float(readings.abs().max()) <= 1e-4 * float(out.float().norm(dim=-1).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(backend, dtype):
    """[B, T, D] rows, non-contiguous rows, rows at a misaligned address, broadcast coef."""
    case = make_case(10, 4096, dtype, seed=11)
    bt = SimpleNamespace(**vars(case))
    bt.hidden, bt.delta = case.hidden.view(2, 5, -1), case.delta.view(2, 5, -1)
    bt.coef, bt.clamp_lo, bt.clamp_hi = (t.view(2, 5, -1) for t in (case.coef, case.clamp_lo, case.clamp_hi))
    strided = SimpleNamespace(**vars(case))
    strided.hidden = torch.empty(4096, 10, dtype=dtype, device=DEVICE).t().copy_(case.hidden)
    shifted = SimpleNamespace(**vars(case))
    buf = torch.empty(case.hidden.numel() + 1, dtype=dtype, device=DEVICE)
    shifted.hidden = buf[1:].view_as(case.hidden).copy_(case.hidden)
    bcast = SimpleNamespace(**vars(case))
    bcast.coef = case.coef[:1]

    def flat(res):
        return {k: None if t is None else t.reshape(-1, t.shape[-1]) for k, t in res.items()}

    for v in (bt, strided, shifted, bcast):
        got, ref = run_ops(backend, v, False), run_ops(native, v, False)
        for name, r in ref.items():
            assert r is None or got[name].shape == r.shape, name
        truth = ref if dtype == torch.float32 else run_ops(native, upcast(v), False)
        check(flat(got), flat(ref), flat(truth), dtype)


def test_inputs_are_not_modified(backend):
    case = make_case(64, 576, torch.bfloat16, seed=5)
    before = {k: None if v is None else v.clone() for k, v in vars(case).items()}
    run_ops(backend, case, True)
    for k, v in vars(case).items():
        assert (v is None and before[k] is None) or torch.equal(v, before[k]), k


def test_fallbacks_to_native(backend):
    """What the kernel does not serve (CPU rows, float64, mixed dtypes) is exactly native."""
    cpu = make_case(3, 40, torch.float32, seed=2)
    cpu = SimpleNamespace(**{k: None if v is None else v.cpu() for k, v in vars(cpu).items()})
    f64 = make_case(3, 40, torch.float32, seed=2)
    f64.hidden, f64.delta, f64.weight = f64.hidden.double(), f64.delta.double(), f64.weight.double()
    mixed = make_case(3, 40, torch.bfloat16, seed=2)
    mixed.weight, mixed.delta = mixed.weight.float(), mixed.delta.float()  # every op sees mixed dtypes
    for case in (cpu, f64, mixed):
        got, ref = run_ops(backend, case, False), run_ops(native, case, False)
        for name, r in ref.items():
            assert (r is None and got[name] is None) or torch.equal(got[name], r), name


def test_side_stream(backend):
    case = make_case(64, 2048, torch.bfloat16, seed=9)
    ref = run_ops(native, case, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run_ops(backend, case, False)
    torch.cuda.current_stream().wait_stream(stream)
    truth = run_ops(native, upcast(case), False)
    check(got, ref, truth, torch.bfloat16)


def test_autograd_runs_native(backend):
    """The kernel has no backward: inputs that need gradients take native's path."""
    case = make_case(8, 576, torch.float32, seed=4)
    hidden = case.hidden.clone().requires_grad_()
    out, _ = backend.steer_project(hidden, case.delta, *groups(case))
    ref, _ = native.steer_project(hidden, case.delta, *groups(case))
    assert out.grad_fn is not None and torch.equal(out, ref)
    out.sum().backward()
    assert hidden.grad is not None
