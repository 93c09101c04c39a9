"""personakern inside vLLM: per-request persona steering and monitoring in continuous batching.

Set ``PERSONAKERN_VECTORS=/path/a.safetensors[:/path/b.safetensors]`` and use vLLM as usual
(``LLM(...)`` or ``vllm serve``); the ``vllm.general_plugins`` entry point (:mod:`.plugin`) puts
personakern's fused op into the model. A request asks with data only::

    SamplingParams(extra_args={"personakern": {"steer": [...], "monitor": {...}}})

and :func:`readings` gives a monitored request's :class:`personakern.Readings`. See docs/vllm.md.
Importing this package does not import vLLM.
"""
from __future__ import annotations

from typing import Optional

from ..readings import Readings
from .spec import KEY, Catalog, Spec, SpecError, parse_spec

__all__ = ["KEY", "Catalog", "Spec", "SpecError", "parse_spec", "readings"]


def readings(request_output) -> Optional[Readings]:
    """Readings of one finished request (``values [1, T, L, M]``, column ``t`` = token ``t`` of
    prompt + output; the last output token is never fed back, so ``T = prompt + output - 1``),
    or None when its SPEC did not monitor. Available on outputs of ``LLM.generate``/``chat``."""
    if hasattr(request_output, "personakern"):
        return request_output.personakern
    if not getattr(request_output, "finished", True):
        raise ValueError("personakern.vllm.readings: the request has not finished")
    return None
