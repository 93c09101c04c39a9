"""CPU backend: the ops of :mod:`personakern.backends.native` as vectorized C++ (``csrc/cpu``).

The extension is compiled just in time, on the first call to :func:`available` or to an op, never
at import. Builds are cached in ``$PERSONAKERN_CACHE/build/cpu-<key>`` (default
``~/.cache/personakern``); the key covers the sources, torch, Python, the machine and the SIMD
level the code is compiled for, so a cache shared between different machines stays correct.
``PERSONAKERN_NO_BUILD=1`` forbids compiling (an already cached build is still used).

Once loaded, the module-level op names are rebound to the C entry points, so a call through
``backend.op(...)`` goes straight to C with no Python frame in between. The C side handles the
float32/bfloat16/float16 CPU fast path and forwards every other call (autograd, other devices,
broadcasting, bad arguments) to the native op unchanged, so results and errors match the
reference whichever path runs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import native

NAME = "cpu"

_EXT_NAME = "personakern_cpu_ops"
_SRC_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cpu"
_OPS = ("rms_norm", "steer_project", "add_rms_norm", "add_rms_norm_steer_project")

# Compiler flags per ATen SIMD level, the same ISA sets ATen compiles its own kernels with. Not
# -march=native: a cached build must never use instructions the level does not promise.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2"],
}

_lock = threading.Lock()
_ext = None
_reason: Optional[str] = None
_tried = False


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    # Only x86 levels get their vector path; others build ATen's portable (or NEON) code.
    if platform.machine().lower() in ("x86_64", "amd64") and cap in _ISA_FLAGS:
        return cap
    return "DEFAULT"


def _flags(cap: str) -> list[str]:
    # -ffp-contract=off: a product must stay rounded before it is added wherever the reference
    # rounds it (the squares of RMSNorm); explicit FMAs are written as such.
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden", "-DNDEBUG"]
    # A namespace of our own keeps our inline ATen vector functions from ever being merged with
    # libtorch's copies built for a different ISA.
    flags += [f"-DCPU_CAPABILITY=personakern_{cap.lower()}"]
    if cap != "DEFAULT":
        flags += [f"-DCPU_CAPABILITY_{cap}"] + _ISA_FLAGS[cap]
    return flags


def _sources() -> list[Path]:
    return sorted(p for p in _SRC_DIR.glob("*") if p.suffix in (".cpp", ".h"))


def _build_dir(cap: str, flags: list[str]) -> Path:
    key = hashlib.sha256()
    for part in (torch.__version__, sys.version, platform.machine(), cap, " ".join(flags),
                 os.environ.get("CXX", "")):
        key.update(part.encode() + b"\0")
    for src in _sources():
        key.update(src.name.encode() + b"\0" + src.read_bytes())
    root = Path(os.environ.get("PERSONAKERN_CACHE") or Path.home() / ".cache" / "personakern")
    return root / "build" / f"cpu-{key.hexdigest()[:16]}"


def _import_built(build_dir: Path):
    path = build_dir / f"{_EXT_NAME}.so"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(_EXT_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build():
    if not _sources():
        raise RuntimeError(f"C++ sources not found in {_SRC_DIR}")
    cap = _capability()
    flags = _flags(cap)
    build_dir = _build_dir(cap, flags)
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    # Held for the cached-import check too: another process may be writing this very .so.
    with open(build_dir.parent / f"{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        module = _import_built(build_dir)
        if module is not None:
            return module
        if os.environ.get("PERSONAKERN_NO_BUILD", "") not in ("", "0"):
            raise RuntimeError("PERSONAKERN_NO_BUILD is set and no cached build exists")
        return _compile(build_dir, flags)


def _compile(build_dir: Path, flags: list[str]):
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler found ({compiler})")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    build_dir.mkdir(exist_ok=True)
    # Silence torch's compiler-compatibility notices: the caller reports problems once.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(
                name=_EXT_NAME,
                sources=[str(p) for p in _sources() if p.suffix == ".cpp"],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                verbose=False,
            )
    finally:
        logger.setLevel(level)


def _load():
    global _ext, _reason, _tried
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        try:
            ext = _build()
            ext._set_fallbacks(native.rms_norm, native.steer_project, native.add_rms_norm,
                               native.add_rms_norm_steer_project)
        except Exception as exc:  # no compiler, failed build, unsupported platform
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            # For a failed compile the first compiler error says more than the last line.
            errors = [line for line in lines if "error:" in line.lower()]
            _reason = f"cpu extension unavailable: {(errors or lines)[0].strip()[:300]}"
            ext = None
        else:
            globals().update({op: getattr(ext, op) for op in _OPS})
        _ext = ext
        _tried = True
        return ext


def available() -> bool:
    """True when the C++ extension is (or could now be) built and loaded. Builds on first call."""
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _reason


def _require():
    ext = _load()
    if ext is None:
        raise RuntimeError(_reason)
    return ext


# Stand-ins until the first call loads the extension and rebinds these names to the C entry
# points; a reference taken before that keeps working through them.
def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    return _require().rms_norm(x, weight, eps, gemma)


def steer_project(
    hidden: Tensor,
    delta: Optional[Tensor] = None,
    steer_vecs: Optional[Tensor] = None,
    coef: Optional[Tensor] = None,
    clamp_vecs: Optional[Tensor] = None,
    clamp_lo: Optional[Tensor] = None,
    clamp_hi: Optional[Tensor] = None,
    readout: Optional[Tensor] = None,
    gate_vecs: Optional[Tensor] = None,
    gate_thr: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    return _require().steer_project(hidden, delta, steer_vecs, coef, clamp_vecs, clamp_lo,
                                     clamp_hi, readout, gate_vecs, gate_thr)


def add_rms_norm(residual: Tensor, x: Tensor, weight: Tensor, eps: float,
                 gemma: bool = False) -> tuple[Tensor, Tensor]:
    return _require().add_rms_norm(residual, x, weight, eps, gemma)


def add_rms_norm_steer_project(
    residual: Tensor,
    x: Tensor,
    weight: Tensor,
    eps: float,
    gemma: bool = False,
    steer_vecs: Optional[Tensor] = None,
    coef: Optional[Tensor] = None,
    clamp_vecs: Optional[Tensor] = None,
    clamp_lo: Optional[Tensor] = None,
    clamp_hi: Optional[Tensor] = None,
    readout: Optional[Tensor] = None,
    gate_vecs: Optional[Tensor] = None,
    gate_thr: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    return _require().add_rms_norm_steer_project(residual, x, weight, eps, gemma, steer_vecs, coef,
                                                 clamp_vecs, clamp_lo, clamp_hi, readout, gate_vecs,
                                                 gate_thr)
