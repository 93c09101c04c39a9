"""pytest-benchmark: each op, each usable backend, against the unfused PyTorch sequence.

Run: ``python -m pytest benchmarks/test_bench_ops.py --benchmark-group-by=param:case``; compare
medians within a group (same shape), which pytest-benchmark lays side by side.
"""
from __future__ import annotations

import pytest
import torch

from personakern import ops
from personakern.backends import native
from personakern.benchmark.ops import _cases, _inputs

BACKENDS = ["native"] + [b for b in ("cpu", "triton") if ops.backend_usable(b, "cpu")]
CASES = [(op, n, d) for op in ("steer_project", "add_rms_norm_steer_project", "rms_norm")
         for n, d in ((1, 576), (64, 576), (2048, 576), (8, 4096), (2048, 4096))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-N{c[1]}-D{c[2]}")
def test_op(benchmark, backend, case):
    op, n, d = case
    t = _inputs(n, d, torch.float32, "cpu")
    fn, _ = _cases(t)[op]
    mod = native if backend == "native" else ops.select_backend(torch.device("cpu"), torch.float32, backend)
    benchmark.group = f"{op} N={n} D={d}"
    benchmark(fn, mod)
