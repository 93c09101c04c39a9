"""Vectors set while an engine runs: ``personakern.vllm.set_vector(llm, name, vectors)``.

An engine started with ``PERSONAKERN_VLLM_SPARE_TRAITS=k`` keeps ``k`` trait columns of its tables
free (zero vectors, not in the catalog). ``set_vector`` checks a ``[num_layers, hidden]`` vector
against the engine, writes it into the next free column of every worker's tables (in place: the
compiled graph and the step op read those tensors) and names the column in the catalogs of the
workers and of the process that validates requests; from then on SPECs may steer with and monitor
that trait like one loaded from a file. Setting a name again replaces its vector in the same
column; a trait from a vector file cannot be replaced. A bad call changes nothing.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from .spec import Catalog

RPC_SET_TRAIT = "personakern_set_trait"


def catalog_with(cat: Catalog, name: str, vectors: np.ndarray, layer: Optional[int]) -> tuple:
    """The catalog with trait ``name`` (set at run time) and its column; raises ``ValueError``
    without a change when the name belongs to a vector file or no column is free."""
    if name in cat.traits:
        if name not in cat.runtime:
            raise ValueError(f"trait {name!r} comes from the engine's vector files; set_vector adds or "
                             f"replaces traits set at run time only")
        t = cat.traits.index(name)
        traits, spare = cat.traits, cat.spare
    else:
        if cat.spare < 1:
            raise ValueError("the engine has no free trait column: start it with PERSONAKERN_VLLM_SPARE_TRAITS=k "
                             f"(it has {len(cat.traits)} traits and 0 free)")
        t = len(cat.traits)
        traits, spare = cat.traits + (name,), cat.spare - 1
    rec = dict(cat.recommended)
    rec[name] = layer
    zeros = dict(cat.zero_layers)
    zeros[name] = frozenset(np.flatnonzero(np.linalg.norm(vectors, axis=-1) == 0).tolist())
    return replace(cat, traits=traits, spare=spare, recommended=rec, zero_layers=zeros,
                   runtime=cat.runtime | {name}), t


def set_vector(llm, name: str, vectors, layer: Optional[int] = None) -> None:
    """Give a running offline engine (``vllm.LLM``, started with ``PERSONAKERN_VLLM_SPARE_TRAITS``)
    the trait ``name`` with ``vectors [num_layers, hidden]`` (``layer``: its recommended layer,
    used where a SPEC omits ``layers``). Requests submitted afterwards may use it."""
    from .results import first_rank
    processor = getattr(llm.llm_engine, "input_processor", None)
    cat = getattr(processor, "personakern_catalog", None)
    if cat is None:
        raise ValueError("this engine runs without personakern (start it with PERSONAKERN_VLLM_SPARE_TRAITS=k)")
    if not isinstance(name, str) or not name:
        raise ValueError(f"a trait name must be a non-empty string, got {name!r}")
    v = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
    hidden = _hidden(llm)
    if tuple(v.shape) != (cat.num_layers, hidden):
        raise ValueError(f"vectors for {name!r} have shape {list(v.shape)}, the engine's model expects "
                         f"[num_layers, hidden] = {[cat.num_layers, hidden]}")
    if not torch.isfinite(v).all():
        raise ValueError(f"vectors for {name!r} hold NaN or inf")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                              or not 0 <= layer < cat.num_layers):
        raise ValueError(f"layer must be a block index in [0, {cat.num_layers - 1}] or None, got {layer!r}")
    arr = np.ascontiguousarray(v.numpy())
    new, t = catalog_with(cat, name, arr, layer)       # raises before anything changes
    got = llm.collective_rpc(RPC_SET_TRAIT, args=(name, arr.tobytes(), list(arr.shape), layer))
    if first_rank(got) != t:
        raise RuntimeError(f"personakern: the workers put {name!r} in column {first_rank(got)}, expected {t}")
    processor.personakern_catalog = new


def _hidden(llm) -> int:
    cfg = llm.llm_engine.model_config.hf_config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.hidden_size)


__all__ = ["RPC_SET_TRAIT", "catalog_with", "set_vector"]
