"""A request's SPEC as per-phase tables, built once per request on the host.

The fused op takes, per layer, vectors ``[S, D]`` and per-token coefficient rows ``[N, S]``. In
the engine the columns are fixed: one per trait (ungated additive steering, alphas summed), then
``G`` columns that the step assigns to the distinct ``(trait, when-trait, threshold)`` triples of
conditional steering in the batch. A request's values depend only on its phase (prompt or
response token), so a plan is a handful of ``[2, L, ...]`` arrays; a step gathers them per token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .spec import Catalog, Spec, SpecError

PROMPT, RESPONSE = 0, 1
_PHASES = {"all": (PROMPT, RESPONSE), "prompt": (PROMPT,), "response": (RESPONSE,)}


@dataclass
class GatedEntry:
    key: tuple            # (trait index, when-trait index, threshold): what a shared column holds
    coef: np.ndarray      # [2, L] alpha where the entry is active


@dataclass
class RequestPlan:
    spec: Spec
    coef: np.ndarray                      # [2, L, T] ungated alphas
    gated: list = field(default_factory=list)
    lo: np.ndarray = None                 # [2, L, T] clamp bounds, None without caps/ablation
    hi: np.ndarray = None
    monitor_traits: tuple = ()            # indices into the catalog's traits
    monitor_layers: tuple = ()
    capture_kinds: tuple = ()             # names, personakern.state.KINDS order not required
    capture_layers: tuple = ()
    capture_prompt_length: int = None     # None: the request's own prompt length

    @property
    def steers(self) -> bool:
        return self.spec.steers

    @property
    def monitors(self) -> bool:
        return self.spec.monitors

    @property
    def captures(self) -> bool:
        return self.spec.captures


def build_plan(spec: Spec, catalog: Catalog, gated_slots: int) -> RequestPlan:
    """Tables of one request; raises :class:`SpecError` for what the engine's layout cannot hold
    (more conditional entries than ``gated_slots``, two bounds on one trait at one layer)."""
    L, T = catalog.num_layers, catalog.columns
    coef = np.zeros((2, L, T), dtype=np.float32)
    lo = hi = None
    gated: dict[tuple, np.ndarray] = {}
    bounded: dict[tuple, int] = {}
    for i, e in enumerate(spec.steer):
        t = catalog.index(e.trait)
        phases = list(_PHASES[e.positions])
        layers = list(e.layers)
        if e.alpha is not None and e.when_trait is None:
            coef[np.ix_(phases, layers, [t])] += np.float32(e.alpha)
        elif e.alpha is not None:
            key = (t, catalog.index(e.when_trait), float(e.when_threshold))
            g = gated.setdefault(key, np.zeros((2, L), dtype=np.float32))
            g[np.ix_(phases, layers)] += np.float32(e.alpha)
        if e.cap is not None or e.ablate:
            for layer in layers:
                for ph in phases:
                    if (ph, layer, t) in bounded:
                        raise SpecError(f"personakern.steer[{i}]: {e.trait!r} already has a cap or ablation at "
                                        f"layer {layer} (entry {bounded[(ph, layer, t)]}); one bound per trait "
                                        f"and layer")
                    bounded[(ph, layer, t)] = i
            if lo is None:
                lo = np.full((2, L, T), -np.inf, dtype=np.float32)
                hi = np.full((2, L, T), np.inf, dtype=np.float32)
            sel = np.ix_(phases, layers, [t])
            if e.ablate:
                lo[sel] = 0.0
                hi[sel] = 0.0
            else:
                hi[sel] = np.float32(e.cap)
    if len(gated) > gated_slots:
        raise SpecError(f"personakern: {len(gated)} distinct conditional (when) steering entries, the engine "
                        f"has {gated_slots} conditional columns (PERSONAKERN_VLLM_WHEN_SLOTS)")
    mon_t = tuple(catalog.index(t) for t in spec.monitor_traits)
    return RequestPlan(spec, coef, [GatedEntry(k, v) for k, v in gated.items()], lo, hi,
                       mon_t, tuple(spec.monitor_layers), tuple(spec.capture_kinds), tuple(spec.capture_layers),
                       spec.capture_prompt_length)
