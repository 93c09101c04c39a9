"""The C++ CPU backend against the native oracle.

float32 must agree with native to rounding. For bfloat16/float16 the backend's error against a
float32 reference (native on ``.float()`` inputs) may be at most twice native's own error in that
dtype, plus a small atol: a kernel is allowed different summation orders, not extra roundings.
Where an idle patched model must stay bit-identical (the plain residual add, RMSNorm, the add +
norm), equality is exact.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import shutil
import subprocess

import pytest
import torch

from personakern.backends import cpu, native

if not cpu.available():
    pytest.skip(f"cpu backend not built: {cpu.unavailable_reason()}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 576), (3, 7), (64, 40), (1000, 576), (3, 4099), (1, 1)]
EPS = 1e-6
INF = math.inf


def unit(rows, d, gen):
    return torch.nn.functional.normalize(torch.randn(rows, d, generator=gen), dim=-1)


def bounds(n, c, gen):
    """Per-(row, vector) bounds cycling through no-op, capping, ablation and a two-sided band."""
    lo, hi = torch.empty(n, c), torch.empty(n, c)
    kinds = torch.randint(0, 4, (n, c), generator=gen)
    tau = torch.rand(n, c, generator=gen)
    lo[kinds == 0], hi[kinds == 0] = -INF, INF
    lo[kinds == 1], hi[kinds == 1] = -INF, tau[kinds == 1]
    lo[kinds == 2], hi[kinds == 2] = 0.0, 0.0
    lo[kinds == 3], hi[kinds == 3] = -tau[kinds == 3], tau[kinds == 3]
    return lo, hi


def make(n, d, dtype, s=0, c=0, m=0, steer=True, clamp=True, read=True, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * n + d)
    t = dict(
        hidden=(4 * torch.randn(n, d, generator=gen)).to(dtype),
        delta=torch.randn(n, d, generator=gen).to(dtype),
        weight=(1 + 0.2 * torch.randn(d, generator=gen)).to(dtype),
    )
    if steer:
        t["steer_vecs"] = 3 * unit(s, d, gen)
        t["coef"] = torch.randn(n, s, generator=gen)
    if clamp:
        t["clamp_vecs"] = unit(c, d, gen)
        t["clamp_lo"], t["clamp_hi"] = bounds(n, c, gen)
    if read:
        t["readout"] = unit(m, d, gen)
    return t


GROUPS = ("steer_vecs", "coef", "clamp_vecs", "clamp_lo", "clamp_hi", "readout")


def as_f32(t):
    return {k: v.float() for k, v in t.items()}


def check(got, ref, ref32, dtype):
    """One output (or None) against native in the same dtype and the float32 reference."""
    if ref is None:
        assert got is None
        return
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if got.numel() == 0:
        return
    scale = ref32.abs().max().item() + 1e-30
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
        return
    err = (got.float() - ref32).abs().max().item()
    err_native = (ref.float() - ref32).abs().max().item()
    assert err <= 2 * err_native + 1e-5 * scale, (err, err_native)


def run_both(op, dtype, args, kwargs):
    got = getattr(cpu, op)(*args, **kwargs)
    ref = getattr(native, op)(*args, **kwargs)
    ref32 = getattr(native, op)(*[a.float() if torch.is_tensor(a) else a for a in args],
                                **{k: v.float() if torch.is_tensor(v) else v for k, v in kwargs.items()})
    got, ref, ref32 = [x if isinstance(x, tuple) else (x,) for x in (got, ref, ref32)]
    assert len(got) == len(ref)
    for g, r, r32 in zip(got, ref, ref32):
        check(g, r, r32, dtype)
    return got, ref


CONFIGS = {  # (S, C, M) and which groups are passed at all
    "none": dict(steer=False, clamp=False, read=False),
    "read": dict(m=3, steer=False, clamp=False),
    "steer": dict(s=3, clamp=False, read=False),
    "clamp": dict(c=3, steer=False, m=1),
    "all": dict(s=3, c=3, m=3),
    "ones": dict(s=1, c=1, m=1),
    "empty": dict(s=0, c=0, m=0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_steer_project(dtype, shape, config):
    t = make(*shape, dtype, **CONFIGS[config])
    kwargs = {k: t[k] for k in GROUPS if k in t}
    (out, readings), (ref, _) = run_both("steer_project", dtype, (t["hidden"], t["delta"]), kwargs)
    if config in ("none", "read", "empty"):
        # no steering/clamping: the residual add itself, bit for bit
        assert torch.equal(out, t["hidden"] + t["delta"])
    if config == "empty":
        assert readings.shape == (shape[0], 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 576), (3, 7), (64, 2048), (1000, 40), (3, 4099), (1, 1)], ids=str)
@pytest.mark.parametrize("gemma", [False, True])
def test_rms_norm(dtype, shape, gemma):
    t = make(*shape, dtype, steer=False, clamp=False, read=False)
    got, ref = run_both("rms_norm", dtype, (t["hidden"], t["weight"], EPS, gemma), {})
    # the kernel reproduces ATen's reduction order, so the norm is bit-identical
    assert torch.equal(got[0], ref[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 576), (3, 7), (64, 2048), (1000, 40), (3, 4099)], ids=str)
@pytest.mark.parametrize("gemma", [False, True])
def test_add_rms_norm(dtype, shape, gemma):
    t = make(*shape, dtype, steer=False, clamp=False, read=False)
    (normed, r), (ref_normed, _) = run_both("add_rms_norm", dtype,
                                            (t["hidden"], t["delta"], t["weight"], 1e-5, gemma), {})
    assert torch.equal(r, t["hidden"] + t["delta"]) and torch.equal(normed, ref_normed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 576), (3, 7), (64, 40), (1000, 576), (3, 4099)], ids=str)
@pytest.mark.parametrize("config", ["none", "read", "steer", "clamp", "all", "empty"])
@pytest.mark.parametrize("gemma", [False, True])
def test_add_rms_norm_steer_project(dtype, shape, config, gemma):
    t = make(*shape, dtype, **CONFIGS[config])
    kwargs = {k: t[k] for k in GROUPS if k in t}
    (normed, r, readings), (ref_normed, _, _) = run_both(
        "add_rms_norm_steer_project", dtype, (t["hidden"], t["delta"], t["weight"], EPS, gemma), kwargs)
    if config in ("none", "read", "empty"):
        # idle: residual and norm bit-identical to the unpatched computation
        assert torch.equal(r, t["hidden"] + t["delta"]) and torch.equal(normed, ref_normed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_parallel_rows(dtype):
    # Big enough to split rows across threads.
    t = make(2048, 2048, dtype, s=1, c=1, m=3)
    kwargs = {k: t[k] for k in GROUPS}
    run_both("add_rms_norm_steer_project", dtype, (t["hidden"], t["delta"], t["weight"], EPS, False), kwargs)


def test_ablation_and_cap_hit_targets():
    gen = torch.Generator().manual_seed(3)
    c = torch.linalg.qr(torch.randn(64, 2, generator=gen))[0].t().contiguous()  # orthonormal
    h = 3 * torch.randn(4, 64, generator=gen)
    lo = torch.tensor([[0.0, -INF]] * 4)
    hi = torch.tensor([[0.0, 0.25]] * 4)
    out, readings = cpu.steer_project(h, None, None, None, c, lo, hi, c)
    assert readings[:, 0].abs().max() < 1e-5  # ablated
    assert (readings[:, 1] <= 0.25 + 1e-5).all()  # capped
    torch.testing.assert_close(readings, out @ c.t(), rtol=1e-5, atol=1e-5)


def test_zero_rows():
    t = make(0, 40, torch.bfloat16, s=1, c=1, m=2)
    run_both("add_rms_norm_steer_project", torch.bfloat16, (t["hidden"], t["delta"], t["weight"], EPS),
             {k: t[k] for k in GROUPS})


def test_none_delta_never_aliases_hidden():
    t = make(3, 40, torch.bfloat16, m=2, steer=False, clamp=False)
    out, readings = cpu.steer_project(t["hidden"], readout=t["readout"])
    assert out is not t["hidden"] and out.data_ptr() != t["hidden"].data_ptr()
    assert torch.equal(out, t["hidden"])
    torch.testing.assert_close(readings, t["hidden"].float() @ t["readout"].t())
    out, readings = cpu.steer_project(t["hidden"])
    assert torch.equal(out, t["hidden"]) and out.data_ptr() != t["hidden"].data_ptr() and readings is None


def test_inputs_untouched_and_outputs_fresh():
    t = make(5, 40, torch.bfloat16, s=2, c=2, m=2)
    before = {k: v.clone() for k, v in t.items()}
    normed, r, _ = cpu.add_rms_norm_steer_project(t["hidden"], t["delta"], t["weight"], EPS, False,
                                                  *[t[k] for k in GROUPS])
    for k, v in t.items():
        assert torch.equal(v, before[k]), k
    ptrs = {v.data_ptr() for v in t.values()}
    assert normed.data_ptr() not in ptrs and r.data_ptr() not in ptrs


def test_signatures_match_native():
    for op in ("rms_norm", "steer_project", "add_rms_norm", "add_rms_norm_steer_project"):
        ours, ref = inspect.signature(getattr(cpu, op)), inspect.signature(getattr(native, op))
        assert [(p.name, p.default, p.kind) for p in ours.parameters.values()] == \
               [(p.name, p.default, p.kind) for p in ref.parameters.values()], op


def test_keywords_and_broadcast_rows():
    t = make(6, 40, torch.float16, s=2, c=1, m=1)
    kwargs = dict(steer_vecs=t["steer_vecs"], coef=t["coef"][:1], clamp_vecs=t["clamp_vecs"],
                  clamp_lo=t["clamp_lo"][0], clamp_hi=t["clamp_hi"], readout=t["readout"])
    run_both("steer_project", torch.float16, (t["hidden"],), dict(kwargs, delta=t["delta"]))


def test_leading_dims_and_noncontiguous():
    x = torch.randn(2, 5, 40).to(torch.bfloat16)
    w = torch.randn(40).to(torch.bfloat16)
    run_both("rms_norm", torch.bfloat16, (x, w, EPS), {"gemma": True})
    u = unit(3, 40, torch.Generator().manual_seed(0))
    out, readings = cpu.steer_project(x, x, readout=u)
    assert readings.shape == (2, 5, 3) and torch.equal(out, x + x)
    xt = torch.randn(40, 7).t()  # non-contiguous rows
    run_both("add_rms_norm", torch.float32, (xt, xt, torch.randn(40), EPS), {})


def test_float64_rows_with_float32_vectors():
    """A float64 model's rows with the float32 vectors the handle prepares: native (and every
    backend's fallback to it) works in float64 throughout; checked against a float64 sum
    written out here. (It used to fail: float64 rows @ float32 vectors.)"""
    g = torch.Generator().manual_seed(4)
    n, d = 3, 40
    h, dl = torch.randn(n, d, dtype=torch.float64, generator=g), torch.randn(n, d, dtype=torch.float64, generator=g)
    steer, gate, clamp, readout = (torch.randn(k, d, generator=g) for k in (2, 2, 1, 8))
    coef, thr = torch.randn(n, 2, generator=g), torch.zeros(n, 2)
    lo, hi = torch.full((n, 1), -1.0), torch.full((n, 1), 0.5)
    x = h + dl
    p = x @ gate.double().t()
    x = x + torch.where(p > 0, coef.double(), 0.0) @ steer.double()
    q = x @ clamp.double().t()
    x = x - (q - q.clamp(-1.0, 0.5)) @ clamp.double()
    for backend in (native, cpu):
        out, readings = backend.steer_project(h, dl, steer, coef, clamp, lo, hi, readout, gate, thr)
        assert out.dtype == torch.float64 and readings.dtype == torch.float32
        assert (out - x).abs().max() <= 1e-12
        assert (readings - (x @ readout.double().t()).float()).abs().max() <= 1e-5


def test_fallbacks_to_native():
    # autograd: native builds the graph
    t = make(3, 40, torch.float32, s=1, c=1, m=1)
    h = t["hidden"].clone().requires_grad_()
    out, readings = cpu.steer_project(h, t["delta"], *[t[k] for k in GROUPS])
    (out.sum() + readings.sum()).backward()
    assert h.grad is not None
    # other dtypes / mismatched dtypes: whatever native does
    x = torch.randn(3, 8, dtype=torch.float64)
    assert cpu.rms_norm(x, torch.ones(8, dtype=torch.float64), EPS).dtype == torch.float64
    y = cpu.steer_project(x.float(), x.half())[0]
    assert torch.equal(y, x.float() + x.half())
    # lazily negated views are not plain memory
    neg = torch._neg_view(t["hidden"])
    assert torch.equal(cpu.steer_project(neg, t["delta"])[0], -t["hidden"] + t["delta"])
    # bad arguments raise native's errors
    with pytest.raises(TypeError):
        cpu.rms_norm(x)
    with pytest.raises(TypeError):
        cpu.steer_project(x, nonsense=1)
    with pytest.raises(Exception):
        cpu.steer_project(t["hidden"], steer_vecs=t["steer_vecs"])  # coef missing


def fresh_module(name="personakern.backends._cpu_probe"):
    spec = importlib.util.spec_from_file_location(name, cpu.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_does_not_build_and_no_build_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAKERN_CACHE", str(tmp_path))
    monkeypatch.setenv("PERSONAKERN_NO_BUILD", "1")
    probe = fresh_module()
    assert not any(tmp_path.iterdir()) and not probe._tried
    # no ahead-of-time library either (an install built with torch at hand has one; it is used
    # under PERSONAKERN_NO_BUILD, see test_packaging.py)
    monkeypatch.setattr(probe, "_AOT_DIR", tmp_path / "no-aot")
    assert probe.available() is False
    assert "PERSONAKERN_NO_BUILD" in probe.unavailable_reason()
    with pytest.raises(RuntimeError):
        probe.rms_norm(torch.ones(1, 4), torch.ones(4), EPS)


def test_failed_build_is_reported_not_printed(tmp_path, monkeypatch, capfd):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cpp").write_text("this is not C++;\n")
    monkeypatch.setenv("PERSONAKERN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PERSONAKERN_NO_BUILD", raising=False)
    probe = fresh_module()
    monkeypatch.setattr(probe, "_SRC_DIR", src)
    assert probe.available() is False
    assert "error" in probe.unavailable_reason().lower()
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_inside_custom_op_autograd():
    # The ops layer wraps backends in torch.library custom ops; below the autograd key the
    # kernels must run (and agree with native's own autograd).
    from personakern.ops.library import register

    ops = register("cpu_test", cpu)
    t = make(4, 40, torch.float32, s=1, c=2, m=1)
    grads = []
    for fn in (ops.add_rms_norm_steer_project, native.add_rms_norm_steer_project):
        h = t["hidden"].clone().requires_grad_()
        normed, r, _ = fn(h, t["delta"], t["weight"], EPS, False, *[t[k] for k in GROUPS])
        (normed * torch.arange(40.0)).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def vllm_like_tables(n, d, t=5, g=3, gen=None):
    """The shape of personakern.vllm's step tables: T trait columns (zero gate, threshold -inf)
    plus G conditional columns, per-row alphas that are zero for most rows and columns, clamp
    bounds (-inf, inf) except where a row caps, and a read-out per trait."""
    vec = 3 * unit(t, d, gen)
    steer = torch.zeros(t + g, d)
    steer[:t] = vec
    steer[t:] = vec[:g]
    gate = torch.zeros(t + g, d)
    gate[t:] = unit(g, d, gen)
    thr = torch.full((n, t + g), -INF)
    thr[:, t:] = torch.randn(n, g, generator=gen)
    coef = torch.randn(n, t + g, generator=gen) * (torch.rand(n, t + g, generator=gen) < 0.2)
    coef[: max(1, n // 2)] = 0.0                          # plain rows
    lo, hi = torch.full((n, t), -INF), torch.full((n, t), INF)
    if n > 1:
        hi[-1, 0] = -0.5                                  # one capped row
    units = torch.nn.functional.normalize(vec, dim=-1)
    return dict(steer_vecs=steer, coef=coef, clamp_vecs=units, clamp_lo=lo, clamp_hi=hi, readout=units,
                gate_vecs=gate, gate_thr=thr)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 576), (32, 576), (9, 4099)])
def test_sparse_tables_equal_native_and_plain_rows_equal_the_bare_op(dtype, n, d):
    """Zero alphas and unbounded clamps are skipped inside the kernel: rows with nothing to do
    come out bit-identical to the op without any steering or clamping, the others as native."""
    gen = torch.Generator().manual_seed(n + d)
    t = make(n, d, dtype, steer=False, clamp=False, read=False)
    tables = vllm_like_tables(n, d, gen=gen)
    args = (t["hidden"], t["delta"], t["weight"], EPS, False)
    (normed, r, readings), _ = run_both("add_rms_norm_steer_project", dtype, args, tables)
    bare_normed, bare_r, bare_readings = cpu.add_rms_norm_steer_project(*args, readout=tables["readout"])
    plain = (tables["coef"] == 0).all(1) & torch.isinf(tables["clamp_hi"]).all(1)
    assert plain.any()
    assert torch.equal(r[plain], bare_r[plain]) and torch.equal(normed[plain], bare_normed[plain])
    assert torch.equal(readings[plain], bare_readings[plain])


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e30])
def test_unbounded_clamps_on_nonfinite_or_huge_rows_match_native(bad):
    """A clamp with bounds (-inf, inf) is skipped only on rows bounded well inside float range:
    NaN, inf and overflowing projections spread through the row exactly as in the reference."""
    gen = torch.Generator().manual_seed(7)
    n, d = 4, 40
    tables = vllm_like_tables(n, d, gen=gen)
    hidden = torch.randn(n, d, generator=gen)
    hidden[1, 3] = bad
    hidden[2, :] = bad if not math.isnan(bad) else 1.0
    delta = torch.zeros(n, d)
    got = cpu.steer_project(hidden, delta, tables["steer_vecs"], tables["coef"], tables["clamp_vecs"],
                            tables["clamp_lo"], tables["clamp_hi"], tables["readout"],
                            tables["gate_vecs"], tables["gate_thr"])
    ref = native.steer_project(hidden, delta, tables["steer_vecs"], tables["coef"], tables["clamp_vecs"],
                               tables["clamp_lo"], tables["clamp_hi"], tables["readout"],
                               tables["gate_vecs"], tables["gate_thr"])
    for g, r in zip(got, ref):
        assert torch.equal(torch.isnan(g), torch.isnan(r)) and torch.equal(torch.isinf(g), torch.isinf(r))
        ok = torch.isfinite(r)
        torch.testing.assert_close(g[ok], r[ok], rtol=1e-5, atol=1e-3)


@pytest.fixture(params=["cached", "streamed"])
def call_size(request):
    """Both ways the kernel runs a call: sized for the cache, or too large for it (streaming
    stores where aligned; float32 read-outs then prefetch the next row behind their dot
    products); the threshold is lowered to 0 for the second, so small data takes it. bf16/fp16
    read-outs run over tiles of parked rows in both."""
    ext = cpu._ext if cpu.available() else None
    before = ext._stream_threshold()
    if request.param == "streamed":
        ext._stream_threshold(0)
    yield request.param
    ext._stream_threshold(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("extra", ["plain", "gate", "clamp"])
@pytest.mark.parametrize("d", [1000, 1024])
def test_a_rows_outputs_do_not_depend_on_the_rest_of_the_call(dtype, m, extra, d, call_size):
    """Within a call every row takes the same arithmetic, whether its read-outs run in a tile of
    parked rows (16 rows, 4 at a time: bf16/fp16 calls), in a tile remainder, alone, or over one
    parked row (float32 calls): a request's outputs and readings in vLLM do not depend on its
    batch-mates. Checked row by row against the row run alone, 37 rows (two full tiles, a
    remainder; two tasks on two threads), outputs against native too."""
    n = 37
    gen = torch.Generator().manual_seed(m)
    t = make(n, d, dtype, s=2, c=1, m=m, seed=m)
    kw = {k: t[k] for k in ("steer_vecs", "coef", "readout")}
    if extra == "gate":
        kw["gate_vecs"], kw["gate_thr"] = unit(2, d, gen), torch.randn(n, 2, generator=gen)
    if extra == "clamp":
        t["clamp_lo"][0], t["clamp_hi"][0] = -INF, INF  # at least one row the clamp leaves alone
        kw.update(clamp_vecs=t["clamp_vecs"], clamp_lo=t["clamp_lo"], clamp_hi=t["clamp_hi"])
    per_row = {"coef", "gate_thr", "clamp_lo", "clamp_hi"}
    args = (t["hidden"], t["delta"], t["weight"], EPS, False)
    (whole, _) = run_both("add_rms_norm_steer_project", dtype, args, kw)
    for r in range(n):
        one = cpu.add_rms_norm_steer_project(t["hidden"][r:r + 1], t["delta"][r:r + 1], t["weight"], EPS, False,
                                             **{k: v[r:r + 1] if k in per_row else v for k, v in kw.items()})
        for a, b in zip(whole, one):
            assert torch.equal(a[r:r + 1], b)
    # cached calls: an unclamped row reads the same whether the call clamps other rows or not
    if extra == "clamp" and call_size == "cached":
        free = torch.isinf(t["clamp_lo"]).all(1) & torch.isinf(t["clamp_hi"]).all(1)
        assert free[0]
        plain = cpu.add_rms_norm_steer_project(*args, **{k: kw[k] for k in ("steer_vecs", "coef", "readout")})
        assert torch.equal(whole[2][free], plain[2][free])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["steer_project", "add_rms_norm_steer_project", "rms_norm"])
def test_streamed_calls_equal_native(dtype, op, call_size):
    """Both call sizes against the reference, at a size with whole and partial vectors."""
    n, d = 9, 1024 + 16
    t = make(n, d, dtype, s=2, c=0, m=8, clamp=False)
    kw = {k: t[k] for k in ("steer_vecs", "coef", "readout")}
    if op == "rms_norm":
        run_both(op, dtype, (t["hidden"], t["weight"], EPS), {})
    elif op == "steer_project":
        run_both(op, dtype, (t["hidden"], t["delta"]), kw)
    else:
        run_both(op, dtype, (t["hidden"], t["delta"], t["weight"], EPS, False), kw)


# row_math.h's per-chunk helpers that the tile path needs inlined, as nm -C names them when one
# is a function of its own
PER_CHUNK_HELPERS = ("combine<", "combine_at<", "read_block<")


def out_of_line_helpers(nm_output: str) -> list:
    """The symbols of ``nm -C --defined-only`` output that are PER_CHUNK_HELPERS."""
    names = [line.split(" ", 2)[-1] for line in nm_output.splitlines() if line.count(" ") >= 2]
    return [n for n in names if "personakern::cpu::" in n and any(f"::{h}" in n for h in PER_CHUNK_HELPERS)]


def test_the_per_chunk_helpers_are_inlined():
    """A tripwire for the compiler's inlining budget: out of line, combine_at and read_block take
    and return their float vectors through memory on every chunk. A larger kernels.cpp (a
    one-pass steering variant, measured and dropped, docs/benchmarks.md) made GCC leave them out
    of line, and the unchanged bf16 tile path ran 1.6x slower. The built library must hold none
    of them as a function of its own; the filter is checked on names as nm prints them."""
    sample = ("000000000000d6a0 t void personakern::cpu::(anonymous namespace)::read_block<8, 2>(float const* const*)\n"
              "0000000000000100 t float personakern::cpu::(anonymous namespace)::dot<false>(float const*, long)\n"
              "0000000000000180 t void personakern::cpu::(anonymous namespace)::combine_at<2>(float const*, long)\n"
              "0000000000000200 t void personakern::cpu::(anonymous namespace)::tile_read_group<4, 4>(float const*)\n"
              "0000000000000300 t void personakern::cpu::(anonymous namespace)::steer_rows<float>(long, long)\n")
    assert out_of_line_helpers(sample) == [
        "void personakern::cpu::(anonymous namespace)::read_block<8, 2>(float const* const*)",
        "void personakern::cpu::(anonymous namespace)::combine_at<2>(float const*, long)"]
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    lib = cpu._load().__file__
    out = subprocess.run([nm, "-C", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    assert "steer_rows<" in out, "nm listed no kernel symbols: the check would be empty"
    assert out_of_line_helpers(out) == []


def test_bfloat16_rounding_matches_aten_bit_for_bit():
    """out = round_bf16(0 + 1 * v): the kernel's float32 -> bfloat16 rounding (one instruction on
    AVX512-BF16 builds, ATen's integer steps elsewhere) against ATen's ``.to(torch.bfloat16)`` on
    every kind of float32: random bit patterns, ties, near-overflow, inf, NaN. Subnormal floats
    round to zero on AVX512-BF16 builds (the instruction's rule) and to ATen's value elsewhere."""
    from personakern.backends import cpu as cpu_mod
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(-2**31, 2**31 - 1, (4093,), generator=g, dtype=torch.int64).to(torch.int32)
    # (no -0.0: the op adds it to +0.0, which gives +0.0)
    special = torch.tensor([0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.3895313892515355e38, 3.4e38, -3.4e38,
                            math.inf, -math.inf, math.nan, 1e-39, -1e-39, 1.17549435e-38, 2**-126])
    v = torch.cat([bits.view(torch.float32), special])
    d = v.numel()
    hidden = torch.zeros(1, d, dtype=torch.bfloat16)
    steer, coef = v[None, :].clone(), torch.ones(1, 1)
    got = cpu.steer_project(hidden, None, steer, coef)[0][0]
    ref = v.to(torch.bfloat16)
    gb, rb = got.view(torch.int16), ref.view(torch.int16)
    nan = torch.isnan(v)
    assert torch.equal(torch.isnan(got), nan)
    sub = (v != 0) & (v.abs() < torch.finfo(torch.float32).tiny) & ~nan
    normal = ~nan & ~sub
    assert torch.equal(gb[normal], rb[normal])
    if cpu_mod._capability() == "AVX512_BF16":
        assert (got[sub] == 0).all() and sub.sum() >= 2
    else:
        assert torch.equal(gb[sub], rb[sub])
