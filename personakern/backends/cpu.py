"""CPU backend: the ops of :mod:`personakern.backends.native` as vectorized C++ (``personakern/csrc/cpu``).

The extension is loaded on the first call to :func:`available` or to an op, never at import,
from the first of:

1. the library ``setup.py`` built ahead of time beside this file (an install built where torch was
   importable: ``pip install --no-build-isolation .``, a wheel built that way, ``install.sh``),
   if its build record matches this process: same torch, same SIMD level the just-in-time build
   would pick on this machine, same flags, built from the sources installed;
2. a just-in-time build of the sources shipped in the package, cached in
   ``$PERSONAKERN_CACHE/build/cpu-<key>`` (default ``~/.cache/personakern``; the key covers the
   sources, torch, Python, the machine and the SIMD level, so a cache shared between machines
   stays correct); compiled with ninja on first use.

``PERSONAKERN_NO_BUILD=1`` forbids compiling (the ahead-of-time library and a cached build are
still used). :func:`build_info` says which one runs, or why none does.

Once loaded, the module-level op names are rebound to the C entry points, so a call through
``backend.op(...)`` goes straight to C with no Python frame in between. The C side handles the
float32/bfloat16/float16 CPU fast path and forwards every other call (autograd, other devices,
broadcasting, bad arguments) to the native op unchanged, so results and errors match the
reference whichever path runs.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
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

from . import contract, cpu_build, native

NAME = "cpu"

_EXT_NAME = cpu_build.EXT_NAME
_SRC_DIR = cpu_build.SRC_DIR
# setup.py builds the extension as personakern.backends.<_EXT_NAME>, i.e. into this folder
_AOT_DIR = Path(__file__).resolve().parent
_OPS = tuple(contract.OPS)

_lock = threading.Lock()
_ext = None
_reason: Optional[str] = None
_tried = False
_kind: Optional[str] = None  # "aot" or "jit", once loaded
_aot_note: Optional[str] = None  # why the ahead-of-time library was not used


CAPABILITY_ENV = "PERSONAKERN_CPU_CAPABILITY"


def _capability() -> str:
    """The SIMD level this machine supports, or a lower one named in $PERSONAKERN_CPU_CAPABILITY
    (e.g. ``AVX512`` on an AVX512-BF16 machine: ATen's own bfloat16 rounding, subnormals kept)."""
    detected = cpu_build.capability(torch.backends.cpu.get_cpu_capability(), platform.machine(),
                                    cpu_build.cpu_flags())
    wanted = os.environ.get(CAPABILITY_ENV, "").strip().upper()
    if not wanted:
        return detected
    order = cpu_build.LEVELS
    if wanted not in order:
        raise RuntimeError(f"${CAPABILITY_ENV}={wanted!r}: not a level ({', '.join(order)})")
    if order.index(wanted) > order.index(detected):
        raise RuntimeError(f"${CAPABILITY_ENV}={wanted}: this machine supports {detected} at most")
    return wanted


def _flags(cap: str) -> list[str]:
    return cpu_build.flags(cap)


def _sources() -> list[Path]:
    return cpu_build.sources(_SRC_DIR)


def _build_dir(cap: str, flags: list[str]) -> Path:
    key = hashlib.sha256()
    for part in (torch.__version__, sys.version, platform.machine(), cap, " ".join(flags),
                 os.environ.get("CXX", "")):
        key.update(part.encode() + b"\0")
    for src in _sources():
        key.update(src.name.encode() + b"\0" + src.read_bytes())
    from ..paths import cache_dir
    return cache_dir() / "build" / f"cpu-{key.hexdigest()[:16]}"


def _import_file(path: Path):
    spec = importlib.util.spec_from_file_location(_EXT_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _import_built(build_dir: Path):
    path = build_dir / f"{_EXT_NAME}.so"
    return _import_file(path) if path.is_file() else None


def _aot_library(directory: Path) -> Optional[Path]:
    # only a file this interpreter's ABI can import (its suffix names the ABI)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = directory / f"{_EXT_NAME}{suffix}"
        if path.is_file():
            return path
    return None


def _load_aot(cap: str):
    """(module, None), or (None, why the ahead-of-time library is not used). The record is
    checked before the library is opened: a library built for another torch or a wider SIMD
    level must not even be loaded."""
    path = _aot_library(_AOT_DIR)
    if path is None:
        return None, "no ahead-of-time build in this install"
    built = cpu_build.read_record(_AOT_DIR / f"{_EXT_NAME}{cpu_build.RECORD_SUFFIX}")
    why = cpu_build.mismatch(built, cpu_build.record(torch.__version__, cap, platform.machine(), _SRC_DIR))
    if why is not None:
        return None, f"ahead-of-time build not used: {why}"
    try:
        return _import_file(path), None
    except Exception as exc:  # e.g. a libtorch symbol this torch lacks
        return None, f"ahead-of-time build failed to load: {str(exc).strip()[:200]}"


def _build():
    global _kind, _aot_note
    cap = _capability()
    module, _aot_note = _load_aot(cap)
    if module is not None:
        _kind = "aot"
        return module
    if not _sources():
        raise RuntimeError(f"C++ sources not found in {_SRC_DIR}")
    flags = _flags(cap)
    build_dir = _build_dir(cap, flags)
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    # Held for the cached-import check too: another process may be writing this very .so.
    with open(build_dir.parent / f"{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        module = _import_built(build_dir)
        if module is None:
            if os.environ.get("PERSONAKERN_NO_BUILD", "") not in ("", "0"):
                raise RuntimeError("PERSONAKERN_NO_BUILD is set and no cached build exists")
            module = _compile(build_dir, flags)
    _kind = "jit"
    return module


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
                extra_ldflags=cpu_build.LINK_FLAGS,
                build_directory=str(build_dir),
                verbose=False,
            )
    finally:
        logger.setLevel(level)


def _parameters() -> tuple:
    """Each op's parameters as the extension binds them: (names, how many required, doc)."""
    return tuple((tuple(contract.names(op)), contract.required(op), _text_signature(op)) for op in _OPS)


def _text_signature(op: str) -> str:
    """The docstring from which ``inspect.signature`` reads a C function's parameters."""
    params = ", ".join(str(p.replace(annotation=p.empty)) for p in contract.signature(op).parameters.values())
    return f"{op}($module, {params})\n--\n\nSee personakern.backends.native.{op}."


def _load():
    global _ext, _reason, _tried
    if _tried:
        return _ext
    with _lock:
        if _tried:
            return _ext
        try:
            ext = _build()
            ext._set_fallbacks(*(getattr(native, op) for op in _OPS), _parameters())
        except Exception as exc:  # no compiler, failed build, unsupported platform
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            # For a failed compile the first compiler error says more than the last line.
            errors = [line for line in lines if "error:" in line.lower()]
            _reason = f"cpu extension unavailable: {(errors or lines)[0].strip()[:300]}"
            if _aot_note is not None:
                _reason += f"; {_aot_note}"
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


def build_info() -> dict:
    """Which library runs the backend: ``build`` is ``"aot"`` (built with the package),
    ``"jit"`` (built from the installed sources on this machine) or None (unavailable, see
    ``reason``); ``aot`` says why an ahead-of-time library was not used. Loads (builds) it."""
    ext = _load()
    return {"usable": ext is not None, "build": _kind if ext is not None else None,
            "library": getattr(ext, "__file__", None), "sources": str(_SRC_DIR),
            "aot": _aot_note, "reason": _reason}


def buffers(limit_mb: Optional[float] = None) -> dict:
    """The pool of large output buffers the C++ ops reuse (``csrc/cpu/buffers.h``).

    Outputs of 1 MiB and more get memory that a destroyed output gave back, so a
    prefill-sized forward writes into pages already mapped instead of faulting fresh ones in
    (about 6x slower for a 128 MB output). Memory returns to the pool only when its storage is
    destroyed: an output somebody keeps (``output_hidden_states``, a hook, a view, a saved
    tensor) is never reused. The pool keeps at most ``limit_mb`` of free memory (default
    1024, or ``$PERSONAKERN_CPU_BUFFER_MB``); setting a lower limit releases what no longer fits
    at once, 0 switches pooling off. Returns the limit, the MiB kept free, the number of free
    blocks, and how many outputs were reused / freshly allocated so far."""
    ext = _require()
    if limit_mb is not None and not (limit_mb >= 0):  # also refuses NaN
        raise ValueError(f"limit_mb must be a number >= 0, got {limit_mb!r}")
    limit, held, entries, reused, fresh = ext._buffers(None if limit_mb is None else int(limit_mb * (1 << 20)))
    return {"limit_mb": limit / (1 << 20), "held_mb": held / (1 << 20), "entries": entries,
            "reused": reused, "fresh": fresh}


STEP_OP = "personakern::cpu_step_add_rms_norm"
_step_fake_done = False


def step_table(steer, coef, unit, lo, hi, gate, thr, readings) -> Optional[int]:
    """Register an inference engine's step tables with the extension's step op
    (``csrc/cpu/step_tables.h``; ``torch.ops.personakern.cpu_step_add_rms_norm``) and return
    their handle, or None where the extension (or a build with the op) is unavailable."""
    global _step_fake_done
    ext = _load()
    if ext is None or not hasattr(ext, "_step_table"):
        return None
    with _lock:
        if not _step_fake_done:
            @torch.library.register_fake(STEP_OP)
            def _fake(residual, x, weight, eps, table, block):
                return torch.empty_like(residual), torch.empty_like(residual)
            _step_fake_done = True
    return ext._step_table(steer, coef, unit, lo, hi, gate, thr, readings)


def step_flags(handle: int, steers: bool, reads: bool) -> None:
    """What the step op applies from table ``handle`` until the next call: the steering
    group (vectors, gates, clamps) and the read-outs."""
    _require()._step_flags(handle, steers, reads)


def step_table_release(handle: int) -> None:
    _require()._step_table_release(handle)


def _require():
    ext = _load()
    if ext is None:
        raise RuntimeError(_reason)
    return ext


# Stand-ins until the first call loads the extension and rebinds these names to the C entry
# points; a reference taken before that keeps working through them.
for _op in contract.OPS:
    globals()[_op] = contract.define(_op, "return _require().%s({args})" % _op, globals(),
                                     doc=f"See :func:`personakern.backends.native.{_op}`.")
del _op
