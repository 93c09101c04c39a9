"""The engine's persona vectors: ``PERSONAKERN_VECTORS=/a.safetensors[:/b.safetensors]``.

Loaded once at engine start, in every process that needs them (the process that accepts requests,
to validate SPECs; each worker, to build its tables), and checked against the model's config:
a file made for another model is a :class:`~personakern.vectors.VectorFileError` naming the file
and the mismatch, and the engine does not start.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from ..vectors import VectorFileError, VectorSet
from .spec import Catalog, catalog_from_vectors

ENV_VAR = "PERSONAKERN_VECTORS"
SPARE_ENV = "PERSONAKERN_VLLM_SPARE_TRAITS"
# decoder families whose vLLM layers pass (hidden, residual) into a fused add+RMSNorm
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class EngineVectors:
    paths: tuple[str, ...]
    traits: tuple[str, ...]
    vectors: torch.Tensor      # [L, T, D] float32, trait order = catalog order
    catalog: Catalog

    @property
    def num_traits(self) -> int:
        """Trait columns, free ones included."""
        return int(self.vectors.shape[1])


def configured_paths(environ=None) -> tuple[str, ...]:
    value = (environ if environ is not None else os.environ).get(ENV_VAR, "")
    return tuple(p for p in value.split(os.pathsep) if p.strip())


def load_engine_vectors(hf_config, paths=None) -> EngineVectors:
    """Load and check every file in ``paths`` (default: ``$PERSONAKERN_VECTORS``) against
    ``hf_config``; trait names must be unique across the files."""
    paths = tuple(paths) if paths is not None else configured_paths()
    if not paths:
        raise VectorFileError(f"{ENV_VAR} names no vector file")
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    num_layers, hidden = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    merged = VectorSet()
    origin: dict[str, str] = {}
    for path in paths:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            vs = VectorSet.load(path, model=cfg)  # raises naming the file and the mismatch
        if caught:  # one line per file, not one per trait and process
            warnings.warn(f"{path}: {caught[0].message}" if len(caught) == 1 else
                          f"{caught[0].message} (and {len(caught) - 1} more traits of this file)", stacklevel=2)
        for trait in vs.traits:
            if trait in origin:
                raise VectorFileError(f"{path}: trait {trait!r} is also in {origin[trait]}; "
                                      f"trait names must be unique across {ENV_VAR}")
            pv = vs[trait]
            if tuple(pv.vectors.shape) != (num_layers, hidden):
                raise VectorFileError(f"{path}: trait {trait!r} has shape {list(pv.vectors.shape)}, the model "
                                      f"expects [num_hidden_layers, hidden_size] = {[num_layers, hidden]}")
            origin[trait] = path
            merged.add(pv)
    stacked = torch.stack([merged[t].vectors for t in merged.traits], dim=1).contiguous()  # [L, T, D]
    return EngineVectors(paths, tuple(merged.traits), stacked, catalog_from_vectors(merged, num_layers))


def engine_vectors(hf_config) -> EngineVectors:
    """The vectors of an engine started now: ``$PERSONAKERN_VECTORS``'s, or none (an engine that
    only gathers activations, ``$PERSONAKERN_VLLM_CAPTURE=1``); the catalog says whether the
    engine captures."""
    from dataclasses import replace
    from .capture import capture_enabled
    if configured_paths():
        ev = load_engine_vectors(hf_config)
    else:
        cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        L, D = int(cfg.num_hidden_layers), int(cfg.hidden_size)
        ev = EngineVectors((), (), torch.zeros(L, 0, D), Catalog((), L, {}, {}))
    spare = spare_columns()
    if spare:   # zero columns after the files' traits, named when set_vector fills them
        L, _, D = ev.vectors.shape
        ev.vectors = torch.cat([ev.vectors, torch.zeros(L, spare, D)], dim=1).contiguous()
    ev.catalog = replace(ev.catalog, capture=capture_enabled(), spare=spare)
    return ev


def spare_columns(environ=None) -> int:
    """``$PERSONAKERN_VLLM_SPARE_TRAITS``: trait columns an engine keeps free for vectors set
    while it runs (:func:`personakern.vllm.set_vector`); default 0."""
    value = (environ if environ is not None else os.environ).get(SPARE_ENV, "").strip() or "0"
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{SPARE_ENV} must be a count, got {value!r}") from None
    if n < 0:
        raise ValueError(f"{SPARE_ENV} must be >= 0, got {n}")
    return n


def plugin_wanted(environ=None) -> bool:
    """Whether an engine started now runs personakern's model classes: it has vectors, or it
    gathers activations."""
    from .capture import capture_enabled
    return bool(configured_paths(environ)) or capture_enabled(environ) or spare_columns(environ) > 0


def check_architecture(hf_config) -> None:
    archs = list(getattr(hf_config, "architectures", None) or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(f"personakern: {ENV_VAR} or PERSONAKERN_VLLM_CAPTURE is set but the model's architecture {archs or '(none)'} is "
                         f"not supported inside vLLM; supported: {list(SUPPORTED_ARCHITECTURES)}. "
                         f"Unset both to serve this model without personakern.")
