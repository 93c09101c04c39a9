"""The CUDA launcher's shared-memory decision (csrc/cuda/launch_plan.h), compiled with the host
compiler and checked without a GPU against limits worked out by hand.

A block may use 48 KB of shared memory unless the kernel is allowed more (up to 227 KB on
H100/H200, 163 KB on A100), and both limits count the kernel's static arrays (832 bytes: the
ptxas report checked in test_cuda_compile.py) together with the dynamic row cache. A row of D
fp32 values cached in a block of its own therefore fits without asking up to
D = (49152 - 832) / 4 = 12080; D = 12081 ... 12288 (a real hidden size) needs the opt-in although
4 D alone is still within 48 KB. The launcher once compared only 4 D with 48 KB there.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from personakern.backends import cuda

HEADER_DIR = cuda._source_dir()
STATIC = 832  # float scratch[16 * 9] + gated_rows[4][8] + ex_rows[4][8], 4 bytes each
KB = 1024
DEFAULT = 48 * KB
H100 = 227 * KB  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 and H200
A100 = 163 * KB

DRIVER = r"""
#include <cstdio>
#include "launch_plan.h"
int main() {
  long long dim, vec, st, def, opt, rows;
  while (std::scanf("%lld %lld %lld %lld %lld %lld", &dim, &vec, &st, &def, &opt, &rows) == 6) {
    const auto p = personakern_cuda::launch::plan(dim, static_cast<int>(vec), st, def, opt, rows);
    std::printf("%d %d %d %zu %d\n", p.group, p.rows_per_block, p.cached ? 1 : 0, p.dynamic_smem, p.opt_in ? 1 : 0);
  }
}
"""


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    tmp = tmp_path_factory.mktemp("launch_plan")
    (tmp / "driver.cpp").write_text(DRIVER)
    exe = tmp / "driver"
    proc = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{HEADER_DIR}", str(tmp / "driver.cpp"),
                           "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    def run(cases):
        # a sixth number, the row count, is optional: -1 (many rows) when left out
        text = "".join(" ".join(str(x) for x in (*c, -1)[:6]) + "\n" for c in cases)
        out = subprocess.run([str(exe)], input=text, capture_output=True, text=True, timeout=60, check=True).stdout
        rows = [tuple(int(x) for x in line.split()) for line in out.splitlines()]
        assert len(rows) == len(cases)
        return [dict(group=g, rows_per_block=r, cached=bool(c), dynamic=dyn, opt_in=bool(o)) for g, r, c, dyn, o in rows]

    return run


def expected_group(d, vec):
    nvec = d // vec
    if nvec <= 128:
        return 32, 4
    threads = -(-nvec // 4)
    return min(-(-threads // 32) * 32, 512), 1


@pytest.mark.parametrize("vec", [1, 4, 8])  # fp32 unaligned / fp32 16-byte / bf16 and fp16 16-byte
def test_band_around_48kb_on_h100(plan, vec):
    dims = list(range(12000, 12301))
    got = plan([(d, vec, STATIC, DEFAULT, H100) for d in dims])
    for d, p in zip(dims, got):
        assert (p["group"], p["rows_per_block"]) == expected_group(d, vec), d
        assert p["cached"] and p["dynamic"] == 4 * d, (d, p)
        assert p["opt_in"] == (d > 12080), (d, p)  # (49152 - 832) / 4 = 12080
    by_dim = dict(zip(dims, got))
    assert not by_dim[12080]["opt_in"] and by_dim[12081]["opt_in"] and by_dim[12288]["opt_in"]


def test_edges(plan):
    cases = {
        # the largest cached row on H100: 4 D + 832 <= 232448 gives D <= 57904
        (57904, 4, STATIC, DEFAULT, H100): dict(cached=True, dynamic=4 * 57904, opt_in=True),
        (57905, 4, STATIC, DEFAULT, H100): dict(cached=False, dynamic=0, opt_in=False),
        # A100: 4 D + 832 <= 166912 gives D <= 41520
        (41520, 8, STATIC, DEFAULT, A100): dict(cached=True, dynamic=4 * 41520, opt_in=True),
        (41521, 8, STATIC, DEFAULT, A100): dict(cached=False, dynamic=0, opt_in=False),
        # opt-in unknown or refused (limit 0): only what fits in 48 KB with the static arrays is cached
        (12080, 8, STATIC, DEFAULT, 0): dict(cached=True, dynamic=4 * 12080, opt_in=False),
        (12081, 8, STATIC, DEFAULT, 0): dict(cached=False, dynamic=0, opt_in=False),
        (12288, 8, STATIC, DEFAULT, 0): dict(cached=False, dynamic=0, opt_in=False),
        # no static arrays: 4 D alone decides, exactly at 48 KB
        (12288, 8, 0, DEFAULT, H100): dict(cached=True, dynamic=DEFAULT, opt_in=False),
        (12289, 8, 0, DEFAULT, H100): dict(cached=True, dynamic=4 * 12289, opt_in=True),
        # a warp per row, four rows a block: 4 rows x D floats
        (1024, 8, STATIC, DEFAULT, H100): dict(cached=True, dynamic=4 * 4 * 1024, opt_in=False),
        (40, 1, STATIC, DEFAULT, H100): dict(cached=True, dynamic=4 * 4 * 40, opt_in=False),
        (1, 1, STATIC, DEFAULT, H100): dict(cached=True, dynamic=16, opt_in=False),
    }
    got = plan(list(cases))
    for case, p in zip(cases, got):
        assert (p["group"], p["rows_per_block"]) == expected_group(case[0], case[1]), case
        assert {k: p[k] for k in ("cached", "dynamic", "opt_in")} == cases[case], case


def test_group_sizes(plan):
    # one warp up to 128 vectors a row, then a thread per 4 vectors in whole warps, at most 512
    cases = [(1024, 8), (1032, 8), (2048, 8), (4096, 4), (8192, 8), (16384, 4), (65536, 8), (4099, 1)]
    got = plan([(d, v, STATIC, DEFAULT, H100) for d, v in cases])
    want = [(32, 4), (64, 1), (64, 1), (256, 1), (256, 1), (512, 1), (512, 1), (512, 1)]
    assert [(p["group"], p["rows_per_block"]) for p in got] == want


def test_few_rows_spread_over_a_thread_per_vector(plan):
    # fewer than 65536 threads at 4 vectors a thread: a thread per vector (whole warps, <= 512)
    cases = [
        ((2048, 8, STATIC, DEFAULT, H100, 1), (256, 1)),       # decode, bf16 D=2048: 256 vectors
        ((2048, 8, STATIC, DEFAULT, H100, 1023), (256, 1)),    # 1023 x 64 = 65472 < 65536
        ((2048, 8, STATIC, DEFAULT, H100, 1024), (64, 1)),     # 1024 x 64 = 65536: enough rows
        ((4096, 4, STATIC, DEFAULT, H100, 64), (512, 1)),      # fp32 D=4096: 1024 vectors, capped
        ((12288, 8, STATIC, DEFAULT, H100, 1), (512, 1)),      # 1536 vectors, capped
        ((1032, 8, STATIC, DEFAULT, H100, 3), (160, 1)),       # 129 vectors: 5 warps
        ((1024, 8, STATIC, DEFAULT, H100, 1), (32, 4)),        # warp-per-row rows stay so
        ((2048, 8, STATIC, DEFAULT, H100, -1), (64, 1)),       # row count unknown: many
    ]
    got = plan([c for c, _ in cases])
    for (case, want), p in zip(cases, got):
        assert (p["group"], p["rows_per_block"]) == want, case
        assert p["cached"] and p["dynamic"] == 4 * case[0] * want[1], case
