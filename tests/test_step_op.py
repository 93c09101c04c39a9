"""The cpu extension's step-table op (``personakern::cpu_step_add_rms_norm``, csrc/cpu/step_tables.*),
which vLLM's layers call with tables registered once per engine.

References: the same backend's ``add_rms_norm_steer_project`` given the table rows as explicit
arguments (the same kernel: bit-identical), the pure-PyTorch native op (float32, to rounding),
and the backend's plain ``add_rms_norm`` where a step neither steers nor reads. Sizes are
awkward (D = 77, 13 of 40 table rows), and every failing call is checked to leave the tables
as they were."""
from __future__ import annotations

import pytest
import torch

from personakern.backends import cpu, native

pytestmark = pytest.mark.skipif(not cpu.available(), reason=str(cpu.unavailable_reason()))

L, T, G, D, N = 5, 3, 2, 77, 40
S = T + G
EPS = 1e-5


def _tables(seed=0):
    g = torch.Generator().manual_seed(seed)
    steer = torch.randn(L, S, D, generator=g) * 0.2
    unit = torch.randn(L, T, D, generator=g)
    unit /= unit.norm(dim=-1, keepdim=True)
    gate = torch.randn(L, S, D, generator=g)
    gate /= gate.norm(dim=-1, keepdim=True)
    gate[:, :T] = 0.0
    coef = torch.randn(L, N, S, generator=g)
    coef[:, ::3] = 0.0                                  # some plain rows
    lo = torch.full((L, N, T), -torch.inf)
    hi = torch.full((L, N, T), torch.inf)
    lo[:, 1::4, 0], hi[:, 1::4, 0] = -0.1, 0.1          # caps on some rows
    thr = torch.full((N, S), -torch.inf)
    thr[::2, T:] = torch.randn(N // 2, G, generator=g) * 0.1
    readings = torch.full((L, N, T), 7.0)
    t = dict(steer=steer, coef=coef, unit=unit, lo=lo, hi=hi, gate=gate, thr=thr, readings=readings)
    handle = cpu.step_table(*t.values())
    assert isinstance(handle, int)
    return handle, t


def _rows(n, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, generator=g).to(dtype), torch.randn(n, D, generator=g).to(dtype),
            (torch.rand(D, generator=g) + 0.5).to(dtype))


def _op(*args):
    return torch.ops.personakern.cpu_step_add_rms_norm(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("steers,reads", [(True, True), (True, False), (False, True), (False, False)])
def test_equals_the_fused_op_with_the_rows_given(dtype, steers, reads):
    handle, t = _tables()
    try:
        res, x, w = _rows(13, dtype)
        block, n = 3, 13
        cpu.step_flags(handle, steers, reads)
        before = t["readings"].clone()
        normed, out = _op(res, x, w, EPS, handle, block)
        ref_normed, ref_out, ref_read = cpu.add_rms_norm_steer_project(
            res, x, w, EPS, False,
            t["steer"][block] if steers else None, t["coef"][block, :n] if steers else None,
            t["unit"][block] if steers else None, t["lo"][block, :n] if steers else None,
            t["hi"][block, :n] if steers else None, t["unit"][block] if reads else None,
            t["gate"][block] if steers else None, t["thr"][:n] if steers else None)
        assert torch.equal(out, ref_out) and torch.equal(normed, ref_normed)
        expect = before.clone()
        if reads:
            expect[block, :n] = ref_read
        assert torch.equal(t["readings"], expect)     # only block 3's first 13 rows written
        if not steers:
            plain_normed, plain_out = cpu.add_rms_norm(res, x, w, EPS)
            assert torch.equal(out, plain_out) and torch.equal(normed, plain_normed)
        if dtype == torch.float32 and steers:         # independent oracle: the PyTorch op
            o_normed, o_out, o_read = native.add_rms_norm_steer_project(
                res, x, w, EPS, False, t["steer"][block], t["coef"][block, :n], t["unit"][block],
                t["lo"][block, :n], t["hi"][block, :n], t["unit"][block], t["gate"][block], t["thr"][:n])
            torch.testing.assert_close(out, o_out, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(normed, o_normed, rtol=1e-5, atol=1e-5)
            if reads:
                torch.testing.assert_close(t["readings"][block, :n], o_read, rtol=1e-5, atol=1e-5)
    finally:
        cpu.step_table_release(handle)


def test_bad_calls_raise_and_leave_the_tables_alone():
    handle, t = _tables()
    cpu.step_flags(handle, True, True)
    snapshot = {k: v.clone() for k, v in t.items()}
    res, x, w = _rows(13, torch.float32)
    bad = [
        ((res, x, w, EPS, handle, L), "out of range"),
        ((res, x, w, EPS, handle, -1), "out of range"),
        ((res, x, w, EPS, handle + 1000, 0), "no step table"),
        ((torch.randn(N + 1, D), torch.randn(N + 1, D), w, EPS, handle, 0), "exceed"),
        ((res[:, :10], x[:, :10], w, EPS, handle, 0), "shape"),
        ((res, x.double(), w, EPS, handle, 0), "same dtype"),
        ((res.double(), x.double(), w.double(), EPS, handle, 0), "float32/bfloat16/float16"),
        ((res, x, w[:10], EPS, handle, 0), "norm weight"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            _op(*args)
    for k, v in t.items():
        assert torch.equal(v, snapshot[k]), k
    cpu.step_table_release(handle)
    with pytest.raises(RuntimeError, match="released"):
        _op(res, x, w, EPS, handle, 0)
    cpu.step_table_release(handle)                    # twice is fine
    with pytest.raises(ValueError, match="shapes do not agree"):
        cpu.step_table(t["steer"], t["coef"][:, :5].contiguous(), t["unit"], t["lo"], t["hi"], None, None, t["readings"])
    with pytest.raises(ValueError, match="contiguous float32"):
        cpu.step_table(t["steer"].double(), t["coef"], t["unit"], t["lo"], t["hi"], None, None, t["readings"])
    with pytest.raises(ValueError, match="together"):
        cpu.step_table(t["steer"], t["coef"], t["unit"], t["lo"], t["hi"], t["gate"], None, t["readings"])


def test_compiled_graph_reads_the_flags_and_tables_of_each_step():
    """Traced once: later flag and table changes take effect without a retrace, as in vLLM's
    compiled mode, and the compiled call equals the eager one."""
    handle, t = _tables(seed=3)
    try:
        res, x, w = _rows(9, torch.float32, seed=4)

        def chain(res, x):
            for block in range(L):
                x, res = _op(res, x, w, EPS, handle, block)
            return x, res

        compiled = torch.compile(chain, fullgraph=True, dynamic=False)
        results = {}
        for flags in [(False, False), (True, True), (False, True)]:
            cpu.step_flags(handle, *flags)
            t["readings"].fill_(7.0)
            eager = chain(res, x)
            eager_read = t["readings"].clone()
            t["readings"].fill_(7.0)
            got = compiled(res, x)
            assert all(torch.equal(a, b) for a, b in zip(got, eager)), flags
            assert torch.equal(t["readings"], eager_read), flags
            results[flags] = got[1]
        assert not torch.equal(results[(False, False)], results[(True, True)])   # steering applied
        assert torch.equal(results[(False, False)], results[(False, True)])      # read-outs only read
        t["coef"].zero_()                                                        # a table rewrite
        t["lo"].fill_(-torch.inf)
        t["hi"].fill_(torch.inf)
        cpu.step_flags(handle, True, False)
        assert torch.equal(compiled(res, x)[1], results[(False, False)])
    finally:
        cpu.step_table_release(handle)
