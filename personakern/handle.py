"""The public handle returned by :func:`personakern.patch`.

Layer index convention: ``layer l`` is the output of decoder block ``l``, 0-based
(``model.model.layers[l]``); ``output_hidden_states[l + 1]`` in Hugging Face terms.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import ops as ops_dispatch
from . import patching
from .readings import Readings
from .state import POSITION_MODES, PersonaState, SteerSlot
from .vectors import PersonaVector, VectorSet, as_layer_tensor, check_fingerprint

VectorLike = Union[PersonaVector, Tensor]
Layers = Union[int, Iterable[int], str, None]


class PersonaHandle:
    """Steer and monitor a patched model. Use as a context manager or call :meth:`unpatch`."""

    def __init__(self, model: nn.Module, backend: Optional[str] = None):
        family = patching.family_of(model)
        decoder = patching.find_decoder(model)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        param = next(model.parameters())
        self.model = model
        self.family = family.__name__.rsplit(".", 1)[-1]
        self.num_layers = len(decoder.layers)
        self.hidden_size = int(config.hidden_size)
        self.device = param.device
        self.dtype = param.dtype
        self._ops = ops_dispatch.select_backend(self.device, self.dtype, backend)
        self._state = PersonaState(self.num_layers, self.hidden_size, self.device, self._ops)
        self._saved = patching.apply(model, self._state, self)
        self._active = True

    # ------------------------------------------------------------------ lifecycle
    @property
    def backend(self) -> str:
        return self._ops.NAME

    @property
    def active(self) -> bool:
        return self._active

    def unpatch(self) -> None:
        """Restore the model's original forward methods (idempotent)."""
        if self._active:
            patching.remove(self.model, self._saved)
            self._active = False

    def __enter__(self) -> "PersonaHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self._active else "unpatched"
        return (f"PersonaHandle({self.family}, {self.num_layers} layers, backend={self.backend}, {state}, "
                f"steering={list(self._state.slots)}, monitoring={self._state.monitor_traits})")

    # ------------------------------------------------------------------ steering
    def steer(self, vector: VectorLike, alpha: Union[float, Sequence[float], Tensor],
              layers: Layers = None, positions: str = "all", name: Optional[str] = None) -> "PersonaHandle":
        """Add ``alpha * vector[l]`` to the output of every block ``l`` in ``layers``.

        ``vector``: a :class:`PersonaVector` or a tensor ``[num_layers, hidden]``.
        ``alpha``: a float, or one value per batch row (a sequence or a 1-D tensor).
        ``layers``: an int, an iterable of ints, ``"all"``, or None for the vector's
        recommended layer (``meta["layer"]``). ``positions``: ``"all"``, ``"prompt"`` or
        ``"response"`` (tokens after the prompt of the current ``generate()`` call).
        ``name`` defaults to the trait (or "vector" for a tensor); calling again with the same name
        replaces that vector's settings (only the coefficient, in place, if nothing else changed).
        """
        self._check_active()
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        name = name or (vector.trait if isinstance(vector, PersonaVector) else "vector")
        vectors = self._layer_tensor(vector, name)
        layer_tuple = self._resolve_layers(layers, vector)
        alpha_t = _alpha_tensor(alpha, name).to(self.device)
        slot = self._state.slots.get(name)
        if (slot is not None and slot.layers == layer_tuple and slot.positions == positions
                and slot.alpha.shape == alpha_t.shape and torch.equal(slot.vectors, vectors)):
            slot.alpha.copy_(alpha_t)  # the cheap path: only the coefficient changes
            return self
        self._state.slots[name] = SteerSlot(name, vectors, alpha_t, layer_tuple, positions)
        self._state.rebuild_steering()
        return self

    def clear(self, name: Optional[str] = None) -> "PersonaHandle":
        """Remove one steering vector by name, or all of them."""
        if name is None:
            self._state.slots.clear()
        elif self._state.slots.pop(name, None) is None:
            raise KeyError(f"no steering vector named {name!r}; active: {list(self._state.slots)}")
        self._state.rebuild_steering()
        return self

    @property
    def steering(self) -> dict[str, dict]:
        return {s.name: {"layers": s.layers, "positions": s.positions, "alpha": s.alpha.tolist()}
                for s in self._state.slots.values()}

    # ------------------------------------------------------------------ monitoring
    def monitor(self, vectors: Union[VectorLike, VectorSet, Mapping[str, VectorLike], Sequence[PersonaVector], None],
                layers: Layers = "all") -> "PersonaHandle":
        """Record ``<h, v>/||v||`` of every monitored block output, per token, for each trait.

        Replaces the monitored set; ``monitor(None)`` stops monitoring. Readings of the latest
        forward/``generate()`` call are in :attr:`readings`.
        """
        self._check_active()
        if vectors is None:
            self._state.set_monitors({}, [])
            return self
        named = _named_vectors(vectors)
        layer_tuple = self._resolve_layers(layers, None)
        units = {}
        for trait, vec in named.items():
            t = self._layer_tensor(vec, trait)
            norms = t.norm(dim=-1)
            zero = [l for l in layer_tuple if float(norms[l]) == 0.0]
            if zero:
                raise ValueError(f"{trait!r} has a zero vector at layers {zero}: nothing to project on")
            units[trait] = t / norms.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
        self._state.set_monitors(units, list(layer_tuple))
        return self

    @property
    def readings(self) -> Optional[Readings]:
        """Readings of the latest sequence (prompt and generated tokens), or None."""
        s = self._state
        if not s.monitor_traits or s.buffer is None:
            return None
        values = s.buffer[:, :s.length].float().cpu()
        valid = s.valid[:, :s.length].cpu()
        values[~valid] = float("nan")
        return Readings(values=values, valid=valid, layers=list(s.monitor_layers),
                        traits=list(s.monitor_traits), prompt_lengths=s.prompt_end.cpu().clone())

    def set_prompt_lengths(self, lengths: Union[Sequence[int], Tensor]) -> "PersonaHandle":
        """Per-row prompt end (absolute column) for the next fresh forward, for teacher-forced
        prompt+response batches; by default the whole first forward of a sequence is the prompt."""
        self._state.pending_prompt_lengths = torch.as_tensor(lengths, dtype=torch.long).view(-1)
        return self

    # ------------------------------------------------------------------ helpers
    def _check_active(self) -> None:
        if not self._active:
            raise RuntimeError("this handle was unpatched; call personakern.patch(model) again")

    def _layer_tensor(self, vector: VectorLike, name: str) -> Tensor:
        if isinstance(vector, PersonaVector) and isinstance(vector.meta.get("model"), dict):
            check_fingerprint(vector.meta["model"], self.model, f"persona vector {vector.trait!r}")
        return as_layer_tensor(vector, self.num_layers, self.hidden_size, name).to(self.device)

    def _resolve_layers(self, layers: Layers, vector) -> tuple[int, ...]:
        if layers is None:
            rec = vector.meta.get("layer") if isinstance(vector, PersonaVector) else None
            if rec is None:
                raise ValueError("say which layers to steer: layers=int, a list of ints, or 'all'")
            layers = rec
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"layers must be an int, a list of ints or 'all', got {layers!r}")
            return tuple(range(self.num_layers))
        if isinstance(layers, int):
            layers = [layers]
        out = []
        for l in layers:
            l = int(l)
            if l < 0:
                l += self.num_layers
            if not 0 <= l < self.num_layers:
                raise ValueError(f"layer {l} out of range: the model has {self.num_layers} decoder blocks (0-based)")
            out.append(l)
        if not out:
            raise ValueError("layers is empty")
        return tuple(sorted(set(out)))


def _alpha_tensor(alpha, name: str) -> Tensor:
    t = torch.as_tensor(alpha, dtype=torch.float32).detach().clone()
    if t.dim() > 1:
        raise ValueError(f"alpha for {name!r} must be a number or one value per batch row, got shape {tuple(t.shape)}")
    t = t.reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"alpha for {name!r} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"alpha for {name!r} is not finite: {t.tolist()}")
    return t


def _named_vectors(vectors) -> dict:
    if isinstance(vectors, VectorSet):
        return {t: vectors[t] for t in vectors.traits}
    if isinstance(vectors, PersonaVector):
        return {vectors.trait: vectors}
    if isinstance(vectors, Tensor):
        if vectors.dim() == 3:
            return {f"vector{i}": v for i, v in enumerate(vectors)}
        return {"vector": vectors}
    if isinstance(vectors, Mapping):
        return dict(vectors)
    out = {}
    for v in vectors:
        if not isinstance(v, PersonaVector):
            raise TypeError("a list given to monitor() must hold PersonaVector objects; use a dict for tensors")
        out[v.trait] = v
    return out


def patch(model: nn.Module, backend: Optional[str] = None) -> PersonaHandle:
    """Patch ``model``'s decoder layers in place and return the handle that steers and monitors it.

    Raises if the model type is unsupported or the model is already patched; in both cases
    nothing is changed.
    """
    return PersonaHandle(model, backend=backend)
