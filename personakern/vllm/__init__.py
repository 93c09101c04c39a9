"""personakern inside vLLM: per-request persona steering and monitoring in continuous batching.

Set ``PERSONAKERN_VECTORS=/path/a.safetensors[:/path/b.safetensors]`` and use vLLM as usual
(``LLM(...)`` or ``vllm serve``); the ``vllm.general_plugins`` entry point (:mod:`.plugin`) puts
personakern's fused op into the model. A request asks with data only::

    SamplingParams(extra_args={"personakern": {"steer": [...], "monitor": {...}}})

and :func:`readings` gives a monitored request's :class:`personakern.Readings`; an engine started
with ``PERSONAKERN_VLLM_CAPTURE=1`` also gathers activation means (``"capture": true``,
:func:`captured`). See docs/vllm.md.
Importing this package does not import vLLM.
"""
from __future__ import annotations

from typing import Optional

from ..readings import Readings
from .live import set_vector
from .spec import KEY, Catalog, Spec, SpecError, parse_spec

__all__ = ["KEY", "Catalog", "Spec", "SpecError", "captured", "parse_spec", "readings", "set_vector"]


def readings(request_output) -> Optional[Readings]:
    """Readings of one finished request (``values [1, T, L, M]``, column ``t`` = token ``t`` of
    prompt + output; the last output token is never fed back, so ``T = prompt + output - 1``),
    or None when its SPEC did not monitor. Available on outputs of ``LLM.generate``/``chat``."""
    if hasattr(request_output, "personakern"):
        return request_output.personakern
    if not getattr(request_output, "finished", True):
        raise ValueError("personakern.vllm.readings: the request has not finished")
    return None


def captured(request_output) -> Optional[dict]:
    """Activation means one finished request gathered (its SPEC had ``"capture"``; the engine was
    started with ``PERSONAKERN_VLLM_CAPTURE=1``), or None: ``{"means": float32 [layers, kinds, D],
    "kinds", "layers", "counts" (tokens averaged per kind), "prompt_length"}``. Kinds as on the
    Hugging Face engine: ``response`` (the fed answer tokens: every output token but the last,
    which is never fed back), ``prompt``, ``last_prompt``; row ``l`` is block ``l``'s output."""
    if hasattr(request_output, "personakern_capture"):
        return request_output.personakern_capture
    if not getattr(request_output, "finished", True):
        raise ValueError("personakern.vllm.captured: the request has not finished")
    return None
