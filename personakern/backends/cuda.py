"""CUDA backend: the ops of :mod:`personakern.backends.native` as one fused row kernel each.

The kernels (``personakern/csrc/cuda/persona_kernels.cu``, package data, so every install
carries them) are torch-free; ``binding.cpp`` beside them wraps them for torch. Both are
compiled just in time on the first :func:`available` (or
:func:`unavailable_reason`) call, for the GPUs present, into
``$PERSONAKERN_CACHE/build/cuda-<hash>``; the hash covers the sources, torch, CUDA, Python and
the target architectures, so an upgrade never loads a stale library. Importing this module
builds nothing and needs no GPU.

Calls the kernel cannot serve exactly as native does (tensors not on CUDA, float64, mixed
dtypes that native would promote, more clamp vectors than the kernel holds, inputs that need
gradients) run on native, so every call keeps the native contract. ``PERSONAKERN_NO_BUILD=1``
forbids compiling (a cached build is still used). CUDA rows with the extension unavailable
raise, with :func:`unavailable_reason`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from . import contract, native

NAME = "cuda"

_SOURCES = ("persona_kernels.h", "launch_plan.h", "row_utils.cuh", "persona_kernels.cu", "binding.cpp")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_log = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict = {"tried": False, "ext": None, "reason": None}


# ---------------------------------------------------------------------------- build
def _source_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "csrc" / "cuda"


def _arch_flags() -> list[str]:
    """``-gencode`` for each distinct GPU present; ``$TORCH_CUDA_ARCH_LIST`` wins if set
    (torch then derives the flags itself)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}" for major, minor in caps]


@contextlib.contextmanager
def _file_lock(path: Path):
    """Serialise builds across processes. An flock dies with its process, so a build killed
    half-way cannot leave the next one waiting forever."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock file still guards the build
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build():
    from torch.utils import cpp_extension

    from ..paths import cache_dir

    src = _source_dir()
    missing = [name for name in _SOURCES if not (src / name).is_file()]
    if missing:
        raise RuntimeError(f"CUDA sources not found in {src} (missing {', '.join(missing)}): "
                           "this install of personakern is incomplete")
    arch = _arch_flags()
    # No fast math: the IEEE adds, multiplies and roundings are what make the results match
    # native. No -std either: torch picks the standard its headers need (C++20 from 2.13).
    cuda_flags = ["-O3", *arch]
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((src / name).read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), sys.version, sys.platform,
                 " ".join(cuda_flags), os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
                 str(cpp_extension.CUDA_HOME)):
        digest.update(part.encode())
    tag = digest.hexdigest()[:16]
    build_dir = cache_dir() / "build" / f"cuda-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    name = f"personakern_cuda_{tag}"
    # Held for the cached import too: another process may be linking this very library.
    with _file_lock(build_dir.parent / f"cuda-{tag}.lock"):
        built = build_dir / f"{name}.so"
        if built.is_file():
            spec = importlib.util.spec_from_file_location(name, built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        if os.environ.get("PERSONAKERN_NO_BUILD", "") not in ("", "0"):
            raise RuntimeError(f"PERSONAKERN_NO_BUILD is set and {built} does not exist")
        cpp_extension.verify_ninja_availability()
        # Under our lock nobody else builds here, so torch's lock file, if present, is the
        # leftover of a killed build and would make torch wait for ever.
        with contextlib.suppress(FileNotFoundError):
            (build_dir / "lock").unlink()
        _log.info("building the personakern CUDA extension in %s (first use only)", build_dir)
        return cpp_extension.load(
            name=name,
            sources=[str(src / "binding.cpp"), str(src / "persona_kernels.cu")],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=cuda_flags,
            build_directory=str(build_dir),
            with_cuda=True,
            verbose=False,
        )


def _load():
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if _state["tried"]:
            return _state["ext"]
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is built without CUDA (torch.version.cuda is None)"
        elif not torch.cuda.is_available():
            reason = "torch.cuda.is_available() is False: no usable CUDA device"
        else:
            reason = None
            try:
                _state["ext"] = _build()
            except Exception as exc:  # any failure means "use native", with the reason kept
                text = str(exc).strip()
                reason = f"building the CUDA extension failed: {type(exc).__name__}: {text[-4000:]}"
        _state["reason"] = reason
        _state["tried"] = True
        return _state["ext"]


def available(device=None) -> bool:
    """True when the kernels are built and loadable; builds them on the first call.
    ``device`` (optional): False for anything but a CUDA device."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    """Why :func:`available` is False (None when it is True)."""
    _load()
    return _state["reason"]


# ---------------------------------------------------------------------------- calls
def _fused(a: Tensor, b: Optional[Tensor], weight: Optional[Tensor], clamp_vecs: Optional[Tensor],
           gated_steer: Optional[Tensor] = None):
    """The extension when the kernel reproduces native for these tensors, else None (native
    runs: other devices and dtypes, what native would broadcast or promote, autograd)."""
    if not a.is_cuda or a.dtype not in _DTYPES or a.dim() == 0 or a.numel() == 0:
        return None
    if b is not None and (b.shape != a.shape or b.dtype != a.dtype or b.device != a.device):
        return None
    if weight is not None and (weight.dtype != a.dtype or weight.shape != a.shape[-1:] or weight.device != a.device):
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, weight)):
        return None  # the kernel has no backward; native's is exact
    ext = _load()
    if ext is None:
        raise RuntimeError(f"personakern cuda backend unavailable: {_state['reason']}")
    if clamp_vecs is not None and clamp_vecs.shape[0] > ext.max_clamp:
        return None
    if gated_steer is not None and gated_steer.shape[0] > ext.max_clamp:
        return None  # the gate projections share the kernel's register budget with clamping
    return ext


def _f32(t: Optional[Tensor], device) -> Optional[Tensor]:
    return None if t is None else t.to(device=device, dtype=torch.float32).contiguous()


def _per_row(t: Optional[Tensor], rows: int, device) -> Optional[Tensor]:
    """``[..., K]`` per-row values as ``[rows, K]``, broadcasting as native's matmul would."""
    if t is None:
        return None
    t = t.to(device=device, dtype=torch.float32)
    if t.dim() > 2:
        t = t.reshape(-1, t.shape[-1])
    return torch.broadcast_to(t, (rows, t.shape[-1])).contiguous()


def _kernel_steering(steering: tuple, rows: int, device) -> tuple:
    """The steering group as the kernel takes it: float32, contiguous, per-row tables
    broadcast to ``rows``. A group whose switch is off (no steer_vecs for coef and the gate,
    no gate_vecs for gate_thr, no clamp_vecs for the bounds) goes as None."""
    s = contract.Steering(*steering)
    off = set()
    if s.steer_vecs is None:
        off |= {"coef", "gate_vecs", "gate_thr"}
    if s.gate_vecs is None:
        off.add("gate_thr")
    if s.clamp_vecs is None:
        off |= {"clamp_lo", "clamp_hi"}
    return tuple(None if arg.name in off else
                 _f32(t, device) if arg.layout == contract.VECTORS else _per_row(t, rows, device)
                 for arg, t in zip(contract.STEERING, steering))


def _run(ext, a, b, weight, eps, gemma, want_out, steering=()):
    """Runs the kernel on ``[..., D]`` rows; returns (out, normed, readings) in the leading
    shape of ``a``, None for what was not asked for."""
    shape = a.shape
    a2 = a.reshape(-1, shape[-1]).contiguous()
    rows, dev = a2.shape[0], a2.device
    b2 = None if b is None else b.reshape(-1, shape[-1]).contiguous()
    w = None if weight is None else weight.contiguous()
    group = _kernel_steering(steering or (None,) * len(contract.STEERING), rows, dev)
    out, normed, readings = ext.rows(a2, b2, w, float(eps), bool(gemma), want_out, *group)
    readout = contract.Steering(*group).readout
    return (out.view(shape) if want_out else None,
            None if weight is None else normed.view(shape),
            None if readout is None else readings.view(*shape[:-1], readings.shape[-1]))


def _fused_for(a, b, weight, steering):
    s = contract.Steering(*steering)
    gated = s.steer_vecs if s.steer_vecs is not None and s.gate_vecs is not None else None
    return _fused(a, b, weight, s.clamp_vecs, gated)


def _rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
    ext = _fused(x, None, weight, None)
    if ext is None:
        return native.rms_norm(x, weight, eps, gemma)
    return _run(ext, x, None, weight, eps, gemma, False)[1]


def _steer_project(hidden: Tensor, delta: Optional[Tensor], steering: tuple):
    ext = _fused_for(hidden, delta, None, steering)
    if ext is None:
        return native.steer_project(hidden, delta, *steering)
    out, _, readings = _run(ext, hidden, delta, None, 0.0, False, True, steering)
    return out, readings


def _add_rms_norm(residual: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool):
    ext = _fused(residual, x, weight, None)
    if ext is None:
        return native.add_rms_norm(residual, x, weight, eps, gemma)
    r, normed, _ = _run(ext, residual, x, weight, eps, gemma, True)
    return normed, r


def _add_rms_norm_steer_project(residual: Tensor, x: Tensor, weight: Tensor, eps: float, gemma: bool,
                                steering: tuple):
    ext = _fused_for(residual, x, weight, steering)
    if ext is None:
        return native.add_rms_norm_steer_project(residual, x, weight, eps, gemma, *steering)
    r, normed, readings = _run(ext, residual, x, weight, eps, gemma, True, steering)
    return normed, r, readings


contract.define_backend(globals())
