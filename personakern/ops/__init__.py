"""Ops dispatch: the backend whose four op functions the patched layers call, chosen once at patch time.

A backend exposes ``NAME``, ``available(device)``, ``unavailable_reason()`` and the four ops of
:mod:`personakern.backends.native` with the same signatures. The compiled ones (cpu, triton,
cuda) are wrapped once by :func:`personakern.ops.library.register` into ``torch.library`` custom
ops (fake kernels for ``torch.compile``, autograd for training). :func:`select_backend` picks one
from the device, the dtype and what is available; the patched layers then call it directly, so
no per-call dispatch cost lands on the forward.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType, SimpleNamespace
from typing import Optional, Union

import torch

from ..backends import native

ENV_VAR = "PERSONAKERN_BACKEND"
BACKENDS = ("native", "cpu", "triton", "cuda")
# preference order per device type when nothing is requested
PREFERENCE = {"cpu": ("cpu", "native"), "cuda": ("cuda", "triton", "native")}

_registered: dict[str, SimpleNamespace] = {}
_warned: set[str] = set()


def _module(name: str) -> Optional[ModuleType]:
    if name not in BACKENDS:
        return None
    try:
        return importlib.import_module(f"personakern.backends.{name}")
    except ImportError:
        return None


def backend_usable(name: str, device: Union[str, torch.device] = "cpu") -> bool:
    """True if backend ``name`` can run on ``device`` here (may build it the first time)."""
    device = torch.device(device)
    if name == "native":
        return True
    mod = _module(name)
    if mod is None:
        return False
    if name == "cpu" and device.type != "cpu":
        return False
    if name == "cuda" and device.type != "cuda":
        return False
    try:
        return bool(mod.available(device)) if name != "cpu" else bool(mod.available())
    except Exception:
        return False


def unavailable_reason(name: str, device: Union[str, torch.device] = "cpu") -> str:
    mod = _module(name)
    if mod is None:
        return f"no backend module {name!r}"
    try:
        return mod.unavailable_reason() or f"not usable on {device}"
    except Exception as e:
        return str(e)


def available_backends(device: Union[str, torch.device, None] = None) -> list[str]:
    """Backends present in this install (all of them for ``device=None``), or usable on ``device``."""
    if device is None:
        return [b for b in BACKENDS if b == "native" or _module(b) is not None]
    return [b for b in BACKENDS if backend_usable(b, device)]


def _wrap(name: str):
    if name == "native":
        return native
    if name not in _registered:
        from .library import register
        mod = _module(name)
        ns = register(name, mod)
        ns.NAME = name
        _registered[name] = ns
    return _registered[name]


def select_backend(device: torch.device, dtype: torch.dtype, requested: Optional[str] = None):
    """Choose the backend once: explicit request, then ``$PERSONAKERN_BACKEND``, then the first
    usable one in :data:`PREFERENCE` for the device type."""
    name = requested or os.environ.get(ENV_VAR) or None
    device = torch.device(device)
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
        if not backend_usable(name, device):
            raise ValueError(f"backend {name!r} is not usable on {device}: {unavailable_reason(name, device)}")
        return _wrap(name)
    for candidate in PREFERENCE.get(device.type, ("native",)):
        if backend_usable(candidate, device):
            return _wrap(candidate)
        if candidate != "native" and candidate not in _warned:
            _warned.add(candidate)
            warnings.warn(f"personakern: the {candidate} backend is unavailable "
                          f"({unavailable_reason(candidate, device)}); using a slower one", stacklevel=3)
    return native
