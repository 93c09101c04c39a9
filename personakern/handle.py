"""The public handle returned by :func:`personakern.patch`.

Layer index convention: ``layer l`` is the output of decoder block ``l``, 0-based
(``model.model.layers[l]``); ``output_hidden_states[l + 1]`` in Hugging Face terms.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import ops as ops_dispatch
from . import patching
from .readings import Readings
from .state import KINDS, POSITION_MODES, Capture, PersonaState, SteerSlot
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
    def steer(self, vector: VectorLike, alpha: Union[float, Sequence[float], Tensor, None] = None,
              layers: Layers = None, positions: str = "all", name: Optional[str] = None, *,
              cap: Union[float, Sequence[float], Tensor, None] = None, ablate: bool = False,
              when: Optional[tuple] = None) -> "PersonaHandle":
        """Steer the output of every block ``l`` in ``layers`` with ``vector[l]``.

        ``vector``: a :class:`PersonaVector` or a tensor ``[num_layers, hidden]``.
        ``alpha``: add ``alpha * vector[l]``; a float, or one value per batch row (a sequence or
        a 1-D tensor).
        ``cap``: clamp the projection ``<h, v_hat>`` to at most ``cap`` (per row like alpha),
        after any ``alpha`` of this call: ``h -= relu(<h, v_hat> - cap) * v_hat``.
        ``ablate=True``: remove the component of ``h`` along ``v_hat``.
        ``when=(condition, threshold)``: add ``alpha * vector[l]`` only at tokens whose
        projection on ``condition`` (a vector, or the name of a monitored trait or of another
        steering entry) exceeds ``threshold`` (per row like alpha), read on the block output
        before any steering.
        ``layers``: an int, an iterable of ints, ``"all"``, or None for the vector's
        recommended layer (``meta["layer"]``). ``positions``: ``"all"``, ``"prompt"`` or
        ``"response"`` (tokens after the prompt of the current ``generate()`` call).
        ``name`` defaults to the trait (or "vector" for a tensor); calling again with the same name
        replaces that entry (only the per-row values, in place, if nothing else changed).

        All of it runs inside the fused op, per row and per token, from tensors prepared here:
        no host sync and no recompilation when only values change.
        """
        self._check_idle("steer")
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        name = name or (vector.trait if isinstance(vector, PersonaVector) else "vector")
        if alpha is None and cap is None and not ablate:
            raise ValueError(f"steer({name!r}): give alpha, cap or ablate=True")
        if ablate and cap is not None:
            raise ValueError(f"steer({name!r}): cap and ablate exclude each other (ablation is cap=floor=0)")
        if when is not None and alpha is None:
            raise ValueError(f"steer({name!r}): when= makes the alpha steering conditional; give alpha too")
        vectors = self._layer_tensor(vector, name)
        layer_tuple = self._resolve_layers(layers, vector)
        alpha_t = None if alpha is None else _alpha_tensor(alpha, name).to(self.device)
        cap_t = None if cap is None else _alpha_tensor(cap, name, "cap", allow_inf=True).to(self.device)
        if cap_t is not None and bool(torch.isneginf(cap_t).any()):
            raise ValueError(f"cap for {name!r} is -inf: no hidden state has a projection that low (the "
                             f"output would be inf/NaN); inf means no cap")
        if cap_t is not None or ablate:
            zero = [l for l in layer_tuple if float(vectors[l].norm()) == 0.0]
            if zero:
                raise ValueError(f"{name!r} has a zero vector at layers {zero}: no direction to cap or ablate")
        gate = thr = None
        if when is not None:
            gate, thr = self._condition(when, name)
        new = SteerSlot(name, vectors, alpha_t, layer_tuple, positions, cap_t, bool(ablate), gate, thr)
        old = self._state.slots.get(name)
        if (old is not None and old.structure() == new.structure() and torch.equal(old.vectors, vectors)
                and (old.gate is None) == (gate is None) and (gate is None or torch.equal(old.gate, gate))):
            for mine, given in ((old.alpha, alpha_t), (old.cap, cap_t), (old.gate_thr, thr)):
                if mine is not None:
                    mine.copy_(given)  # the cheap path: only per-row values change
            return self
        self._state.slots[name] = new
        self._state.rebuild_steering()
        return self

    def _condition(self, when, name: str) -> tuple[Tensor, Tensor]:
        if not isinstance(when, (tuple, list)) or len(when) != 2:
            raise ValueError(f"steer({name!r}): when must be (condition, threshold), got {when!r}")
        cond, threshold = when
        if isinstance(cond, str):
            s = self._state
            if cond in s.monitor_units:
                units = s.monitor_units[cond]
            elif cond in s.slots:
                units = s.slots[cond].units
            else:
                raise KeyError(f"steer({name!r}): condition {cond!r} is neither a monitored trait "
                               f"({s.monitor_traits}) nor a steering entry ({list(s.slots)}); pass a vector")
        else:
            t = self._layer_tensor(cond, f"{name} condition")
            norms = t.norm(dim=-1, keepdim=True)
            units = t / norms.clamp_min(torch.finfo(torch.float32).tiny)
        return units.contiguous(), _alpha_tensor(threshold, name, "the when= threshold", allow_inf=True).to(self.device)

    def clear(self, name: Optional[str] = None) -> "PersonaHandle":
        """Remove one steering vector by name, or all of them."""
        self._state.guard.check("clear() was called")
        if name is None:
            self._state.slots.clear()
        elif self._state.slots.pop(name, None) is None:
            raise KeyError(f"no steering vector named {name!r}; active: {list(self._state.slots)}")
        self._state.rebuild_steering()
        return self

    @property
    def steering(self) -> dict[str, dict]:
        out = {}
        for s in self._state.slots.values():
            d = {"layers": s.layers, "positions": s.positions,
                 "alpha": None if s.alpha is None else s.alpha.tolist()}
            if s.cap is not None:
                d["cap"] = s.cap.tolist()
            if s.ablate:
                d["ablate"] = True
            if s.gate_thr is not None:
                d["when_threshold"] = s.gate_thr.tolist()
            out[s.name] = d
        return out

    # ------------------------------------------------------------------ monitoring
    def monitor(self, vectors: Union[VectorLike, VectorSet, Mapping[str, VectorLike], Sequence[PersonaVector], None],
                layers: Layers = "all") -> "PersonaHandle":
        """Record ``<h, v>/||v||`` of every monitored block output, per token, for each trait.

        Replaces the monitored set; ``monitor(None)`` stops monitoring. Readings of the latest
        forward/``generate()`` call are in :attr:`readings`.
        """
        self._check_idle("monitor")
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
        s, seq = self._state, self._state.seq
        if not s.monitor_traits or seq.buffer is None:
            return None
        values = seq.buffer[:, :seq.length].float().cpu()
        valid = seq.valid[:, :seq.length].cpu()
        values[~valid] = float("nan")
        return Readings(values=values, valid=valid, layers=list(s.monitor_layers),
                        traits=list(s.monitor_traits), prompt_lengths=seq.prompt_end.cpu().clone())

    def new_sequence(self, prompt_lengths: Union[int, Sequence[int], Tensor, None] = None) -> "PersonaHandle":
        """The next forward starts a new sequence (fresh readings, new prompt boundary).

        ``prompt_lengths``: where each row's response begins (an absolute column, left padding
        included): one int for every row, or one per row (a teacher-forced prompt+response batch,
        or a prompt fed in several forwards: those up to the boundary count as prompt). None: the
        whole first forward is the prompt. They apply to the next forward only; if they do not
        fit its batch it raises and they are dropped. ``generate()`` calls this by itself (its
        prompt is its input), so it is only needed for forwards called directly.
        """
        self._check_active()
        self._state.guard.check("new_sequence() was called")
        if prompt_lengths is not None and not isinstance(prompt_lengths, int):
            t = torch.as_tensor(prompt_lengths)
            if t.dim() > 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"prompt_lengths must be an int or a 1-D sequence of ints, got {prompt_lengths!r}")
            prompt_lengths = t.to(torch.long).reshape(-1)
            if prompt_lengths.numel() == 0:
                raise ValueError("prompt_lengths is empty")
            if bool((prompt_lengths < 0).any()):
                raise ValueError(f"prompt_lengths must be >= 0, got {prompt_lengths.tolist()}")
        elif isinstance(prompt_lengths, int) and prompt_lengths < 0:
            raise ValueError(f"prompt_lengths must be >= 0, got {prompt_lengths}")
        self._state.seq.new_sequence(prompt_lengths)
        return self

    def set_prompt_lengths(self, lengths: Union[int, Sequence[int], Tensor]) -> "PersonaHandle":
        """``new_sequence(lengths)``: per-row prompt ends for the next forward."""
        return self.new_sequence(lengths)

    # ------------------------------------------------------------------ capture
    @contextmanager
    def capture(self, kinds: Sequence[str] = KINDS, layers: Layers = "all", *, eos: Optional[Iterable[int]] = None,
                limit: Optional[int] = None, skip_rest: bool = False) -> Iterator[Capture]:
        """Per-row means of block outputs over the response, the prompt and/or the last prompt
        token (``kinds``), gathered inside the engine by the forwards and ``generate()`` calls run
        in the ``with`` block; after each, ``cap.means()`` is ``[B, len(layers), len(kinds), D]``
        for the latest sequence. ``eos``/``limit``: a generated answer ends before its first
        ``eos`` token and after ``limit`` tokens. ``skip_rest``: blocks after the deepest captured
        one are skipped (the logits are then meaningless). See :mod:`personakern.state.capture`."""
        self._check_idle("capture")
        if self._state.capture is not None:
            raise RuntimeError("a capture is already running on this model; one at a time")
        cap = Capture(self.num_layers, self.device, kinds, self._resolve_layers(layers, None), eos, limit, skip_rest)
        self._state.capture = cap
        try:
            yield cap
        finally:
            self._state.capture = None

    # ------------------------------------------------------------------ helpers
    def _check_active(self) -> None:
        if not self._active:
            raise RuntimeError("this handle was unpatched; call personakern.patch(model) again")

    def _check_idle(self, what: str) -> None:
        self._check_active()
        self._state.guard.check(f"{what}() was called")

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


def _alpha_tensor(alpha, name: str, what: str = "alpha", allow_inf: bool = False) -> Tensor:
    """Per-row values as a 1-D float32 tensor; ``allow_inf`` admits +-inf (an absent cap, an
    always-open or never-open gate) but never NaN."""
    t = torch.as_tensor(alpha, dtype=torch.float32).detach().clone()
    if t.dim() > 1:
        raise ValueError(f"{what} for {name!r} must be a number or one value per batch row, got shape {tuple(t.shape)}")
    t = t.reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{what} for {name!r} is empty")
    if not (~torch.isnan(t) if allow_inf else torch.isfinite(t)).all():
        raise ValueError(f"{what} for {name!r} is not finite: {t.tolist()}")
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


@contextmanager
def engine(model: nn.Module) -> Iterator[PersonaHandle]:
    """The handle of ``model``: its own if it is patched (its steering then applies), else a
    fresh patch, removed on exit. How workflows reach the engine's capture."""
    handle = getattr(patching.find_decoder(model), patching.ATTR, None)
    if handle is not None:
        yield handle
        return
    with patch(model) as handle:
        yield handle


def patch(model: nn.Module, backend: Optional[str] = None) -> PersonaHandle:
    """Patch ``model``'s decoder layers in place and return the handle that steers and monitors it.

    Raises if the model type is unsupported or the model is already patched; in both cases
    nothing is changed.
    """
    return PersonaHandle(model, backend=backend)
