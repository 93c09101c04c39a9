"""The per-request SPEC: what a vLLM request asks personakern to steer and monitor, as data.

A SPEC is a JSON object (or its text; over HTTP ``vllm_xargs`` takes only scalars)::

    {"steer": [{"trait": "evil", "alpha": -3.0, "layers": [18], "positions": "response",
                "cap": null, "ablate": false, "when": {"trait": "evil", "threshold": -21.4}}],
     "monitor": {"traits": ["evil", "humorous"] or "all", "layers": [6, 18] or "all"}}

Every field means exactly what it means for :meth:`personakern.PersonaHandle.steer` and
:meth:`~personakern.PersonaHandle.monitor`, with one value per request where the handle takes one
per batch row. ``layers`` omitted or null is the vector's recommended layer. Validation happens in
the process that accepts the request (before it reaches the engine): every problem is a
:class:`SpecError` (a ``ValueError``) naming the field, so a server answers HTTP 400 and carries on.

This module does not import vLLM: it is tested, and usable, without it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..state import KINDS as CAPTURE_KINDS
from ..state import POSITION_MODES

KEY = "personakern"  # the key in SamplingParams.extra_args / vllm_xargs
_STEER_FIELDS = {"trait", "alpha", "layers", "positions", "cap", "ablate", "when"}
_MONITOR_FIELDS = {"traits", "layers"}
_CAPTURE_FIELDS = {"kinds", "layers", "prompt_length"}


class SpecError(ValueError):
    """A SPEC that cannot be served; the message names the field and the problem."""


def no_vectors_error() -> SpecError:
    """The error for a SPEC sent to an engine started without persona vectors."""
    return SpecError("personakern: this engine was started without $PERSONAKERN_VECTORS, so it has no "
                     "persona vectors and cannot serve a SPEC; start it with "
                     "PERSONAKERN_VECTORS=<vectors.safetensors>")


@dataclass(frozen=True)
class Catalog:
    """What the engine's vector files offer: trait names (file order), the model's layer count,
    each trait's recommended layer and the layers where a trait's vector is zero."""
    traits: tuple[str, ...]
    num_layers: int
    recommended: dict            # trait -> int or None
    zero_layers: dict            # trait -> frozenset of layers with a zero vector
    capture: bool = False        # the engine gathers activations ($PERSONAKERN_VLLM_CAPTURE=1)
    spare: int = 0               # trait columns held free for vectors set at run time (set_vector)
    runtime: frozenset = frozenset()   # traits set at run time (replaceable)

    @property
    def columns(self) -> int:
        """Trait columns of the engine's tables: the named traits, then the free ones."""
        return len(self.traits) + self.spare

    def index(self, trait: str) -> int:
        return self.traits.index(trait)


@dataclass(frozen=True)
class SteerEntry:
    trait: str
    layers: tuple[int, ...]
    positions: str
    alpha: Optional[float] = None
    cap: Optional[float] = None        # +inf stands for "no cap" only when given as such
    ablate: bool = False
    when_trait: Optional[str] = None
    when_threshold: Optional[float] = None

    def to_json(self) -> dict:
        return {"trait": self.trait, "layers": list(self.layers), "positions": self.positions,
                "alpha": self.alpha, "cap": _num_out(self.cap), "ablate": self.ablate,
                "when": None if self.when_trait is None else
                {"trait": self.when_trait, "threshold": _num_out(self.when_threshold)}}


@dataclass(frozen=True)
class Spec:
    steer: tuple[SteerEntry, ...] = ()
    monitor_traits: tuple[str, ...] = ()
    monitor_layers: tuple[int, ...] = ()
    capture_kinds: tuple[str, ...] = ()
    capture_layers: tuple[int, ...] = ()
    capture_prompt_length: Optional[int] = None   # None: the request's prompt

    @property
    def steers(self) -> bool:
        return bool(self.steer)

    @property
    def monitors(self) -> bool:
        return bool(self.monitor_traits)

    @property
    def captures(self) -> bool:
        return bool(self.capture_kinds)

    @property
    def empty(self) -> bool:
        return not self.steers and not self.monitors and not self.captures

    def to_json(self) -> dict:
        out: dict[str, Any] = {}
        if self.steer:
            out["steer"] = [e.to_json() for e in self.steer]
        if self.monitor_traits:
            out["monitor"] = {"traits": list(self.monitor_traits), "layers": list(self.monitor_layers)}
        if self.capture_kinds:
            out["capture"] = {"kinds": list(self.capture_kinds), "layers": list(self.capture_layers)}
            if self.capture_prompt_length is not None:
                out["capture"]["prompt_length"] = self.capture_prompt_length
        return out

    def steering_salt(self) -> Optional[str]:
        """A prefix-cache salt for the steering part (None when nothing is steered): KV blocks
        computed under one steering config are never reused by a request under another."""
        if not self.steer:
            return None
        text = json.dumps([e.to_json() for e in self.steer], sort_keys=True, allow_nan=True)
        return "personakern:" + hashlib.sha256(text.encode()).hexdigest()[:32]


def _num_out(x):
    # JSON has no inf; the canonical form keeps infinities as strings, which parse back
    if x is None or math.isfinite(x):
        return x
    return "inf" if x > 0 else "-inf"


def parse_spec(raw: Any, catalog: Catalog) -> Spec:
    """Validate ``raw`` (a dict, or a JSON string of one) against ``catalog``."""
    if isinstance(raw, (str, bytes)):
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise SpecError(f"{KEY}: the SPEC is not valid JSON: {e}") from None
    if raw is None:
        return Spec()
    if not isinstance(raw, dict):
        raise SpecError(f"{KEY}: the SPEC must be a JSON object with 'steer', 'monitor' and/or 'capture', "
                        f"got {type(raw).__name__}")
    unknown = set(raw) - {"steer", "monitor", "capture"}
    if unknown:
        raise SpecError(f"{KEY}: unknown SPEC field(s) {sorted(unknown)}; known: 'steer', 'monitor', 'capture'")
    steer = raw.get("steer") or []
    if isinstance(steer, dict):
        steer = [steer]
    if not isinstance(steer, list):
        raise SpecError(f"{KEY}.steer must be a list of steering entries, got {type(steer).__name__}")
    entries = tuple(_steer_entry(e, i, catalog) for i, e in enumerate(steer))
    traits: tuple[str, ...] = ()
    layers: tuple[int, ...] = ()
    mon = raw.get("monitor")
    if mon is not None:
        traits, layers = _monitor(mon, catalog)
    kinds: tuple[str, ...] = ()
    cap_layers: tuple[int, ...] = ()
    cap_plen = None
    cap = raw.get("capture")
    if cap is not None and cap is not False:
        kinds, cap_layers, cap_plen = _capture(cap, catalog)
    return Spec(entries, traits, layers, kinds, cap_layers, cap_plen)


def _steer_entry(e: Any, i: int, cat: Catalog) -> SteerEntry:
    where = f"{KEY}.steer[{i}]"
    if not isinstance(e, dict):
        raise SpecError(f"{where} must be an object, got {type(e).__name__}")
    unknown = set(e) - _STEER_FIELDS
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_STEER_FIELDS)}")
    trait = _trait(e.get("trait"), f"{where}.trait", cat)
    positions = e.get("positions", "all")
    if positions is None:
        positions = "all"
    if positions not in POSITION_MODES:
        raise SpecError(f"{where}.positions must be one of {list(POSITION_MODES)}, got {positions!r}")
    layers = e.get("layers")
    if layers is None:
        rec = cat.recommended.get(trait)
        if rec is None:
            raise SpecError(f"{where}: trait {trait!r} has no recommended layer in its file; give 'layers'")
        layers = rec
    layer_t = _layers(layers, f"{where}.layers", cat)
    alpha = _number(e.get("alpha"), f"{where}.alpha", allow_inf=False)
    cap = _number(e.get("cap"), f"{where}.cap", allow_inf=True)
    ablate = e.get("ablate", False)
    if ablate is None:
        ablate = False
    if not isinstance(ablate, bool):
        raise SpecError(f"{where}.ablate must be true or false, got {ablate!r}")
    if alpha is None and cap is None and not ablate:
        raise SpecError(f"{where} ({trait!r}): give alpha, cap or ablate=true")
    if ablate and cap is not None:
        raise SpecError(f"{where} ({trait!r}): cap and ablate exclude each other (ablation is cap=floor=0)")
    if cap is not None and cap == -math.inf:
        raise SpecError(f"{where}.cap is -inf: no hidden state has a projection that low (the output "
                        f"would be inf/NaN); inf means no cap")
    if cap is not None or ablate:
        zero = sorted(set(layer_t) & cat.zero_layers.get(trait, frozenset()))
        if zero:
            raise SpecError(f"{where}: {trait!r} has a zero vector at layers {zero}: no direction to cap or ablate")
    when_trait = when_thr = None
    when = e.get("when")
    if when is not None:
        if alpha is None:
            raise SpecError(f"{where} ({trait!r}): when makes the alpha steering conditional; give alpha too")
        if not isinstance(when, dict) or set(when) - {"trait", "threshold"} or "threshold" not in when:
            raise SpecError(f"{where}.when must be {{\"trait\": name, \"threshold\": number}}, got {when!r}")
        when_trait = _trait(when.get("trait", trait), f"{where}.when.trait", cat)
        when_thr = _number(when.get("threshold"), f"{where}.when.threshold", allow_inf=True)
        if when_thr is None:
            raise SpecError(f"{where}.when.threshold must be a number")
    return SteerEntry(trait, layer_t, positions, alpha, cap, ablate, when_trait, when_thr)


def _monitor(mon: Any, cat: Catalog) -> tuple[tuple[str, ...], tuple[int, ...]]:
    where = f"{KEY}.monitor"
    if not isinstance(mon, dict):
        raise SpecError(f"{where} must be an object {{\"traits\": ..., \"layers\": ...}}, got {type(mon).__name__}")
    unknown = set(mon) - _MONITOR_FIELDS
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_MONITOR_FIELDS)}")
    traits = mon.get("traits", "all")
    if traits == "all" or traits is None:
        traits = list(cat.traits)
    elif isinstance(traits, str):
        traits = [traits]
    if not isinstance(traits, list) or not traits:
        raise SpecError(f"{where}.traits must be 'all' or a non-empty list of trait names, got {traits!r}")
    names = []
    for j, t in enumerate(traits):
        t = _trait(t, f"{where}.traits[{j}]", cat)
        if t not in names:
            names.append(t)
    layers = mon.get("layers", "all")
    if layers is None:
        layers = "all"
    layer_t = _layers(layers, f"{where}.layers", cat)
    for t in names:
        zero = sorted(set(layer_t) & cat.zero_layers.get(t, frozenset()))
        if zero:
            raise SpecError(f"{where}: {t!r} has a zero vector at layers {zero}: nothing to project on")
    return tuple(names), layer_t


def _capture(cap: Any, cat: Catalog) -> tuple[tuple[str, ...], tuple[int, ...], Optional[int]]:
    where = f"{KEY}.capture"
    if cap is True:
        cap = {}
    # "capture" with "prompt_length": a teacher-forced answer sent as the prompt (max_tokens=1)
    if not isinstance(cap, dict):
        raise SpecError(f"{where} must be true or an object {{\"kinds\": ..., \"layers\": ...}}, got {cap!r}")
    unknown = set(cap) - _CAPTURE_FIELDS
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_CAPTURE_FIELDS)}")
    if not cat.capture:
        raise SpecError(f"{where}: this engine does not gather activations; start it with "
                        f"PERSONAKERN_VLLM_CAPTURE=1")
    kinds = cap.get("kinds", "all")
    if kinds == "all" or kinds is None:
        kinds = list(CAPTURE_KINDS)
    elif isinstance(kinds, str):
        kinds = [kinds]
    if not isinstance(kinds, list) or not kinds:
        raise SpecError(f"{where}.kinds must be 'all' or a non-empty list of {list(CAPTURE_KINDS)}, got {kinds!r}")
    bad = [k for k in kinds if k not in CAPTURE_KINDS]
    if bad:
        raise SpecError(f"{where}.kinds: unknown kind(s) {bad}; kinds: {list(CAPTURE_KINDS)}")
    layers = cap.get("layers", "all")
    plen = cap.get("prompt_length")
    if plen is not None and (isinstance(plen, bool) or not isinstance(plen, int) or plen < 1):
        raise SpecError(f"{where}.prompt_length must be a positive int (tokens that count as prompt; the rest "
                        f"of the fed tokens count as response), got {plen!r}")
    return (tuple(dict.fromkeys(kinds)), _layers("all" if layers is None else layers, f"{where}.layers", cat),
            plen)


def _trait(t: Any, where: str, cat: Catalog) -> str:
    if not isinstance(t, str):
        raise SpecError(f"{where} must be a trait name (a string), got {t!r}")
    if t not in cat.traits:
        raise SpecError(f"{where}: unknown trait {t!r}; the engine's vector files hold {list(cat.traits)}")
    return t


def _layers(layers: Any, where: str, cat: Catalog) -> tuple[int, ...]:
    n = cat.num_layers
    if isinstance(layers, str):
        if layers != "all":
            raise SpecError(f"{where} must be an int, a list of ints or 'all', got {layers!r}")
        return tuple(range(n))
    if isinstance(layers, bool):
        raise SpecError(f"{where} must be an int, a list of ints or 'all', got {layers!r}")
    if isinstance(layers, int):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise SpecError(f"{where} must be an int, a non-empty list of ints or 'all', got {layers!r}")
    out = set()
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, int):
            raise SpecError(f"{where}: layer {l!r} is not an int")
        k = l + n if l < 0 else l
        if not 0 <= k < n:
            raise SpecError(f"{where}: layer {l} out of range: the model has {n} decoder blocks (0-based)")
        out.add(k)
    return tuple(sorted(out))


def _number(x: Any, where: str, allow_inf: bool) -> Optional[float]:
    """A JSON number (``"inf"``/``"-inf"`` strings accepted where infinities are meaningful:
    JSON itself has none). NaN is always refused."""
    if x is None:
        return None
    if isinstance(x, str) and allow_inf and x.strip().lower() in ("inf", "+inf", "-inf", "infinity", "-infinity"):
        return -math.inf if x.strip().startswith("-") else math.inf
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise SpecError(f"{where} must be a number, got {x!r}")
    x = float(x)
    if math.isnan(x) or (not allow_inf and math.isinf(x)):
        raise SpecError(f"{where} is not finite: {x!r}")
    return x


def catalog_from_vectors(vector_set, num_layers: int) -> Catalog:
    """A :class:`Catalog` of a loaded :class:`~personakern.VectorSet`."""
    rec, zeros = {}, {}
    for trait in vector_set.traits:
        pv = vector_set[trait]
        layer = pv.meta.get("layer")
        rec[trait] = int(layer) if isinstance(layer, int) and not isinstance(layer, bool) else None
        zeros[trait] = frozenset((pv.vectors.norm(dim=1) == 0).nonzero().flatten().tolist())
    return Catalog(tuple(vector_set.traits), int(num_layers), rec, zeros)


def spec_of(extra_args: Optional[dict], catalog: Catalog) -> Spec:
    """The parsed SPEC in ``SamplingParams.extra_args`` (an empty Spec when there is none)."""
    if not extra_args or KEY not in extra_args:
        return Spec()
    return parse_spec(extra_args[KEY], catalog)


__all__ = ["KEY", "SpecError", "Catalog", "SteerEntry", "Spec", "parse_spec", "catalog_from_vectors", "spec_of"]

