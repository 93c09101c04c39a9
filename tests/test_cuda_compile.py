"""The CUDA kernels compile with plain nvcc, no GPU and no CUDA build of torch needed; without
a GPU the backend imports, builds nothing and reports why it is unavailable.

persona_kernels.cu is torch-free for exactly this: CI machines without a GPU still catch a
kernel that does not build for the architectures the backend targets. The torch binding
(binding.cpp) needs torch's CUDA headers and is only built, by the backend, where they exist.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "personakern" / "csrc" / "cuda"
# the kernel's __shared__ arrays, by hand: float scratch[16 * 9], gated_rows[4][8], ex_rows[4][8];
# tests/test_cuda_launch_plan.py checks the launch decision with this number
STATIC_SMEM = (16 * 9 + 4 * 8 + 4 * 8) * 4
ARCHS = ("80", "90")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate and candidate.is_file() else None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH (nor in $CUDA_HOME/bin)")


@needs_nvcc
def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "--resource-usage"]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd += ["-o", str(tmp_path / "persona_kernels.o"), str(CSRC / "persona_kernels.cu")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    print(f"nvcc sm_{'+sm_'.join(ARCHS)}: {elapsed:.1f} s")
    assert proc.returncode == 0, f"nvcc failed ({elapsed:.1f} s):\n{' '.join(cmd)}\n{proc.stderr}{proc.stdout}"
    assert (tmp_path / "persona_kernels.o").stat().st_size > 0
    # ptxas: "Compiling entry function '<rows_kernel<T, VEC>>' for 'sm_XX'" then its
    # "Used N registers, ..., B bytes smem" line
    report = proc.stdout + proc.stderr
    smem = re.findall(r"entry function '(\S*rows_kernel\S*)' for 'sm_(\d+)'.*?(\d+) bytes smem", report, re.S)
    assert {arch for _, arch, _ in smem} == set(ARCHS) and len(smem) == 6 * len(ARCHS), report[-3000:]
    assert {int(b) for _, _, b in smem} == {STATIC_SMEM}, smem
    # fp32 rows (float, 4 a vector) within 64 registers: two 512-thread blocks an SM. At 66 (a peeled
    # first chunk) fp32 prefill calls took 19-28 % more GPU time on an H200 (docs/benchmarks.md).
    regs = re.findall(r"entry function '(\S*rows_kernel\S*)' for 'sm_(\d+)'.*?Used (\d+) registers", report, re.S)
    fp32 = {arch: int(n) for name, arch, n in regs if "rows_kernelIfLi4E" in name}
    assert set(fp32) == set(ARCHS) and max(fp32.values()) <= 64, fp32


@needs_nvcc
def test_header_is_plain_cxx(tmp_path):
    """binding.cpp includes the header through the host compiler, not nvcc."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(NVCC).resolve().parent.parent,
             "/usr/local/cuda"]
    found = [Path(h, "include") for h in homes if h and Path(h, "include", "cuda_runtime.h").is_file()]
    if not found:
        pytest.skip("cuda_runtime.h not found next to nvcc, in $CUDA_HOME or /usr/local/cuda")
    include = found[0]
    unit = tmp_path / "uses_header.cpp"
    unit.write_text('#include "persona_kernels.h"\n'
                    "cudaError_t (*launch)(const personakern_cuda::RowsParams&, cudaStream_t) = "
                    "&personakern_cuda::launch_rows;\n")
    proc = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", f"-I{CSRC}", f"-I{include}",
                           str(unit)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_backend_without_gpu():
    from personakern.backends import cuda, native

    assert not cuda.available()
    assert "CUDA" in cuda.unavailable_reason() or "cuda" in cuda.unavailable_reason()
    x, delta, w = torch.randn(3, 40), torch.randn(3, 40), torch.rand(40)
    readout = torch.nn.functional.normalize(torch.randn(2, 40), dim=1)
    assert torch.equal(cuda.rms_norm(x, w, 1e-6), native.rms_norm(x, w, 1e-6))
    got, ref = cuda.steer_project(x, delta, readout=readout), native.steer_project(x, delta, readout=readout)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
