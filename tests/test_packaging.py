"""An install that is not the checkout still carries its kernels.

The wheel test builds a wheel the way a user would with a compiler and torch at hand (``pip
wheel --no-build-isolation``), unpacks it outside the checkout and runs the cpu backend from it
with compiling forbidden: the sources must be in it, and the ahead-of-time library must load
and agree with native. It compiles the extension, so it takes about as long as one just-in-time
build (1-3 minutes on two shared cores); it is marked ``build``. The loader tests put stand-ins
for the libraries and the compiler in place and check which library is picked, and why.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from personakern.backends import cpu, cpu_build

REPO = Path(__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


# ---------------------------------------------------------------------------- the build record
def test_capability_is_the_x86_level_or_default():
    assert cpu_build.capability("AVX512", "x86_64") == "AVX512"
    assert cpu_build.capability("AVX2", "AMD64") == "AVX2"
    assert cpu_build.capability("AVX512", "aarch64") == "DEFAULT"  # no x86 flags elsewhere
    assert cpu_build.capability("ZVECTOR", "s390x") == "DEFAULT"
    assert cpu_build.capability("DEFAULT", "x86_64") == "DEFAULT"
    bf16 = frozenset({"avx512f", "avx512_bf16"})
    assert cpu_build.capability("AVX512", "x86_64", bf16) == "AVX512_BF16"
    assert cpu_build.capability("AVX2", "x86_64", bf16) == "AVX2"   # torch's level bounds ours
    assert cpu_build.capability("AVX512", "aarch64", bf16) == "DEFAULT"
    f = cpu_build.flags("AVX512_BF16")
    assert "-DCPU_CAPABILITY_AVX512" in f and "-mavx512bf16" in f and "-DPK_AVX512_BF16" in f
    assert not any("BF16" in x for x in cpu_build.flags("AVX512"))


def test_capability_override(monkeypatch):
    from personakern.backends import cpu
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(cpu.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv(cpu.CAPABILITY_ENV, raising=False)
    assert cpu._capability() == "AVX512_BF16"
    monkeypatch.setenv(cpu.CAPABILITY_ENV, "avx512")
    assert cpu._capability() == "AVX512"
    monkeypatch.setenv(cpu.CAPABILITY_ENV, "AVX512_BF16")
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: frozenset())
    with pytest.raises(RuntimeError, match="supports AVX512 at most"):
        cpu._capability()
    monkeypatch.setenv(cpu.CAPABILITY_ENV, "sse9")
    with pytest.raises(RuntimeError, match="not a level"):
        cpu._capability()


def test_flags_are_the_jit_flags_per_level():
    for cap in ("DEFAULT", "AVX2", "AVX512"):
        f = cpu_build.flags(cap)
        assert "-ffp-contract=off" in f and "-fopenmp" in f and f"-DCPU_CAPABILITY=personakern_{cap.lower()}" in f
    assert "-mavx512f" in cpu_build.flags("AVX512") and "-mavx2" not in cpu_build.flags("AVX512")
    assert not any(x.startswith("-mavx") for x in cpu_build.flags("DEFAULT"))


def test_mismatch_names_what_differs(tmp_path):
    (tmp_path / "a.cpp").write_text("int a;\n")
    wanted = cpu_build.record("2.13.0+cpu", "AVX2", "x86_64", tmp_path)
    assert cpu_build.mismatch(dict(wanted), wanted) is None
    assert "missing" in cpu_build.mismatch(None, wanted)
    assert "2.12.0" in cpu_build.mismatch(dict(wanted, torch="2.12.0"), wanted)
    assert "AVX512" in cpu_build.mismatch(dict(wanted, capability="AVX512"), wanted)
    assert "machine" in cpu_build.mismatch(dict(wanted, machine="aarch64"), wanted)
    assert "flags" in cpu_build.mismatch(dict(wanted, flags=wanted["flags"][1:]), wanted)
    assert "missing" not in cpu_build.mismatch({}, wanted)  # an empty record is a record
    (tmp_path / "a.cpp").write_text("int b;\n")  # an edited source is another program
    assert "sources" in cpu_build.mismatch(wanted, cpu_build.record("2.13.0+cpu", "AVX2", "x86_64", tmp_path))


# ---------------------------------------------------------------------------- the loader
def fresh_cpu(name="personakern.backends._cpu_pack_probe"):
    spec = importlib.util.spec_from_file_location(name, cpu.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stand_in(path):
    ops = {op: (lambda *a, _op=op: _op) for op in cpu._OPS}
    return SimpleNamespace(__file__=str(path), _set_fallbacks=lambda *fns: None, **ops)


@pytest.fixture
def loader(tmp_path, monkeypatch):
    """A fresh cpu module whose ahead-of-time folder, cache, import and compiler are stand-ins;
    ``put(record)`` places a library (and its record unless None) where setup.py would."""
    aot = tmp_path / "backends"
    aot.mkdir()
    monkeypatch.setenv("PERSONAKERN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PERSONAKERN_NO_BUILD", raising=False)
    probe = fresh_cpu()
    monkeypatch.setattr(probe, "_AOT_DIR", aot)
    monkeypatch.setattr(probe, "_capability", lambda: "AVX2")
    calls = SimpleNamespace(imported=[], compiled=[])

    def fake_import(path):
        calls.imported.append(Path(path))
        return stand_in(path)

    def fake_compile(build_dir, flags):
        calls.compiled.append(flags)
        return stand_in(build_dir / "jit.so")

    monkeypatch.setattr(probe, "_import_file", fake_import)
    monkeypatch.setattr(probe, "_compile", fake_compile)
    wanted = cpu_build.record(torch.__version__, "AVX2", platform.machine(), probe._SRC_DIR)

    def put(record, name=f"{cpu_build.EXT_NAME}{SUFFIX}"):
        (aot / name).write_bytes(b"stand-in")
        if record is not None:
            (aot / f"{cpu_build.EXT_NAME}{cpu_build.RECORD_SUFFIX}").write_text(json.dumps(record))
        return aot / name

    return SimpleNamespace(probe=probe, calls=calls, wanted=wanted, put=put)


def test_matching_aot_library_is_used_without_compiling(loader):
    lib = loader.put(loader.wanted)
    info = loader.probe.build_info()
    assert info["usable"] and info["build"] == "aot" and info["library"] == str(lib) and info["aot"] is None
    assert loader.calls.imported == [lib] and loader.calls.compiled == []


@pytest.mark.parametrize("change,why", [
    ({"torch": "2.12.0+cpu"}, "2.12.0"),
    ({"capability": "AVX512"}, "AVX512"),  # built on a wider machine: would crash on this one
    ({"sources": "0" * 64}, "other sources"),  # an edited checkout after an editable install
    (None, "missing"),
])
def test_mismatched_aot_library_is_not_loaded_and_jit_runs(loader, change, why):
    lib = loader.put(None if change is None else dict(loader.wanted, **change))
    info = loader.probe.build_info()
    assert info["usable"] and info["build"] == "jit" and why in info["aot"]
    assert lib not in loader.calls.imported  # never even opened
    assert loader.calls.compiled == [cpu_build.flags("AVX2")]


def test_library_for_another_python_is_not_considered(loader):
    loader.put(loader.wanted, name=f"{cpu_build.EXT_NAME}.cpython-29-foo.so")
    info = loader.probe.build_info()
    assert info["build"] == "jit" and "no ahead-of-time build" in info["aot"]


def test_no_build_keeps_a_matching_aot_library(loader, monkeypatch):
    monkeypatch.setenv("PERSONAKERN_NO_BUILD", "1")
    loader.put(loader.wanted)
    assert loader.probe.build_info()["build"] == "aot" and loader.calls.compiled == []


def test_no_build_without_a_usable_library_says_both(loader, monkeypatch):
    monkeypatch.setenv("PERSONAKERN_NO_BUILD", "1")
    loader.put(dict(loader.wanted, torch="2.12.0+cpu"))
    info = loader.probe.build_info()
    assert not info["usable"] and info["build"] is None and loader.calls.compiled == []
    assert "PERSONAKERN_NO_BUILD" in info["reason"] and "2.12.0" in info["reason"]
    assert not loader.probe.available() and loader.probe.unavailable_reason() == info["reason"]


# ---------------------------------------------------------------------------- a real wheel
def _copy_project(dst: Path):
    """The files a build reads, without this checkout's build outputs (an in-place library)."""
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    shutil.copytree(REPO / "personakern", dst / "personakern",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", f"*{cpu_build.RECORD_SUFFIX}"))


CHECK_INSTALLED = r"""
import json, sys, torch
from pathlib import Path
import personakern
from personakern.backends import cpu, native
site = Path(sys.argv[1]).resolve()
assert site in Path(personakern.__file__).resolve().parents, personakern.__file__
info = cpu.build_info()
assert info["build"] == "aot" and site in Path(info["library"]).resolve().parents, info
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for n, d in ((1, 576), (3, 7), (64, 40), (5, 4099)):
        r, x = torch.randn(n, d, generator=g).to(dtype), torch.randn(n, d, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
        steer = torch.randn(2, d, generator=g)
        coef = torch.randn(n, 2, generator=g)
        read = torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1)
        assert torch.equal(cpu.rms_norm(x, w, 1e-6), native.rms_norm(x, w, 1e-6))
        for a, b in zip(cpu.add_rms_norm(r, x, w, 1e-6), native.add_rms_norm(r, x, w, 1e-6)):
            assert torch.equal(a, b)
        got = cpu.add_rms_norm_steer_project(r, x, w, 1e-6, False, steer, coef, readout=read)
        ref = native.add_rms_norm_steer_project(r, x, w, 1e-6, False, steer, coef, readout=read)
        if dtype == torch.float32:
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:
            assert got[0].dtype == dtype and got[2].shape == (n, 3)
print(json.dumps(info))
"""


@pytest.mark.build
def test_wheel_carries_sources_and_an_aot_library_that_loads(tmp_path):
    if shutil.which(os.environ.get("CXX") or "c++") is None:
        pytest.skip("no C++ compiler: the wheel would have no ahead-of-time library")
    src, dist, site = tmp_path / "src", tmp_path / "dist", tmp_path / "site"
    src.mkdir()
    _copy_project(src)
    env = {k: v for k, v in os.environ.items() if k not in ("PERSONAKERN_AOT", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(dist), str(src)], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = dist.glob("personakern-*.whl")
    if os.environ.get("PERSONAKERN_WHEEL_OUT"):   # .ci/run installs this very wheel into a fresh venv
        shutil.copy2(wheel, Path(os.environ["PERSONAKERN_WHEEL_OUT"]) / wheel.name)
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for path in sorted((REPO / "personakern" / "csrc").rglob("*")):
            if path.is_file():
                name = path.relative_to(REPO).as_posix()
                assert name in names, f"the wheel lacks {name}"
                assert zf.read(name) == path.read_bytes(), name
        libs = [n for n in names if re.fullmatch(rf"personakern/backends/{cpu_build.EXT_NAME}\.[^/]+\.so", n)]
        assert len(libs) == 1, sorted(n for n in names if not n.endswith(".py"))
        record = json.loads(zf.read(f"personakern/backends/{cpu_build.EXT_NAME}{cpu_build.RECORD_SUFFIX}"))
        assert record == cpu_build.record(torch.__version__, cpu._capability(), platform.machine(), cpu._SRC_DIR)
        zf.extractall(site)
    # outside the checkout, nothing cached, compiling forbidden: only the wheel's library can run
    env.update(PYTHONPATH=str(site), PERSONAKERN_CACHE=str(tmp_path / "cache"), PERSONAKERN_NO_BUILD="1")
    proc = subprocess.run([sys.executable, "-c", CHECK_INSTALLED, str(site)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not (tmp_path / "cache" / "build").exists()
