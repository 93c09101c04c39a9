"""Ops dispatch: one function per op, backed by the backend chosen once at patch time.

A backend is a module exposing ``NAME`` and the four ops of
:mod:`personakern.backends.native`. :func:`select_backend` picks it from the device, the dtype
and what is installed; the patched layers then call the backend's functions directly, so no
per-call dispatch cost lands on the forward.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch

from ..backends import native

ENV_VAR = "PERSONAKERN_BACKEND"
OP_NAMES = ("rms_norm", "steer_project", "add_rms_norm", "add_rms_norm_steer_project")

_REGISTRY: dict[str, ModuleType] = {"native": native}


def register_backend(module: ModuleType) -> None:
    """Make a backend module available by its ``NAME`` (used by the compiled backends)."""
    missing = [op for op in OP_NAMES if not hasattr(module, op)]
    if missing:
        raise TypeError(f"backend {module!r} lacks ops {missing}")
    _REGISTRY[module.NAME] = module


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def select_backend(device: torch.device, dtype: torch.dtype, requested: Optional[str] = None) -> ModuleType:
    """Choose the backend once: explicit request, then ``$PERSONAKERN_BACKEND``, then the best
    available for ``device``/``dtype`` (today: native everywhere)."""
    name = requested or os.environ.get(ENV_VAR) or None
    if name is not None:
        if name not in _REGISTRY:
            raise ValueError(
                f"unknown or unavailable backend {name!r}; available: {', '.join(available_backends())}"
            )
        return _REGISTRY[name]
    return native


rms_norm = native.rms_norm
steer_project = native.steer_project
add_rms_norm = native.add_rms_norm
add_rms_norm_steer_project = native.add_rms_norm_steer_project
