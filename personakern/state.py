"""Run-time steering and monitoring state shared by the patched layers of one model.

Everything the forward reads lives in tensors prepared by ``steer()``/``monitor()`` (vectors,
unit read-out vectors, per-row alphas) or once per forward by :meth:`PersonaState.begin_forward`
(the per-token coefficient matrix, the reading buffer). The layers take no Python branch on a
tensor's *value* and never move data to the host, so decoding stays asynchronous and the
patched model can be traced by ``torch.compile``. Python-level structure (which layers are
steered or monitored, how many vectors) changes only when the user calls the handle.

Positions are absolute columns of the token sequence, counting left padding: column ``c`` of
``generate()``'s output is position ``c`` of the readings.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .sequence import SequenceTracker

POSITION_MODES = ("all", "prompt", "response")


@dataclass
class SteerSlot:
    """One named steering entry: an additive vector (``alpha``), optionally conditional on a
    projection (``gate``), and/or a bound on the projection on the vector's direction (``cap``
    or ``ablate``). Per-row values are ``[1]`` (every row) or ``[B]`` float32 tensors."""
    name: str
    vectors: Tensor                     # [L, D] float32 on the model's device
    alpha: Optional[Tensor]             # additive coefficient, None: no additive steering
    layers: tuple[int, ...]
    positions: str
    cap: Optional[Tensor] = None        # ceiling on <h, v_hat>
    ablate: bool = False                # <h, v_hat> := 0
    gate: Optional[Tensor] = None       # [L, D] unit condition vectors
    gate_thr: Optional[Tensor] = None   # steer only where <h, gate> > gate_thr

    @property
    def units(self) -> Tensor:
        return self.vectors / self.vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    @property
    def clamps(self) -> bool:
        return self.cap is not None or self.ablate

    def structure(self) -> tuple:
        """Everything but the per-row values: equal structure means a value update is enough."""
        shape = lambda t: None if t is None else tuple(t.shape)
        return (self.layers, self.positions, self.ablate, shape(self.alpha), shape(self.cap),
                shape(self.gate_thr))


class PersonaState:
    def __init__(self, num_layers: int, hidden_size: int, device: torch.device, ops):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.device = device
        self.ops = ops
        # structure, rebuilt by steer()/monitor()
        self.slots: dict[str, SteerSlot] = {}
        self.add_slots: list[SteerSlot] = []     # slots with additive steering, in coef column order
        self.clamp_slots: list[SteerSlot] = []   # slots with a cap or an ablation
        self.layer_steer: list[Optional[Tensor]] = [None] * num_layers    # [S, D] per layer
        self.layer_gate: list[Optional[Tensor]] = [None] * num_layers     # [S, D] per layer
        self.layer_clamp: list[Optional[Tensor]] = [None] * num_layers    # [C, D] per layer
        self.gated = False
        self.layer_readout: list[Optional[Tensor]] = [None] * num_layers  # [M, D] per layer
        self.layer_slot: list[int] = [-1] * num_layers                    # index in the buffer
        self.monitor_traits: list[str] = []
        self.monitor_units: dict[str, Tensor] = {}
        self.monitor_layers: list[int] = []
        # counts, not the lists themselves, are what the forward branches on: under
        # torch.compile a branch on a list guards on its contents (renaming a trait would
        # recompile), a branch on an int only on its value
        self.n_monitored = 0
        # per sequence: positions, prompt ends, the readings buffer
        self.seq = SequenceTracker(device)
        self.guard = ThreadGuard()
        # per forward
        self.coef: Optional[Tensor] = None
        self.gate_thr: Optional[Tensor] = None   # [N, S]
        self.clamp_lo: Optional[Tensor] = None   # [N, C]
        self.clamp_hi: Optional[Tensor] = None
        # cross-layer fusion: block l's output op also computes block l+1's input RMSNorm
        self.next_norms: list = [None] * num_layers   # (norm module, eps, gemma) or None
        self.layer_modules: list = []
        self.stash = NormStash()

    # ------------------------------------------------------------------ structure
    def rebuild_steering(self) -> None:
        slots = list(self.slots.values())
        self.add_slots = [s for s in slots if s.alpha is not None]
        self.clamp_slots = [s for s in slots if s.clamps]
        self.gated = any(s.gate is not None for s in self.add_slots)
        # Vectors of slots not active at a layer are zero rows: one [N,S]x[S,D] product per
        # layer whatever the mix, with coefficient (and bound) matrices shared by all layers.
        self.layer_steer = self._per_layer(self.add_slots, lambda s: s.vectors)
        self.layer_gate = (self._per_layer(self.add_slots, lambda s: s.gate, always=self.layer_steer)
                           if self.gated else [None] * self.num_layers)
        self.layer_clamp = self._per_layer(self.clamp_slots, lambda s: s.units)

    def _per_layer(self, slots: list, table, always=None) -> list:
        out: list[Optional[Tensor]] = [None] * self.num_layers
        for layer in sorted({l for s in slots for l in s.layers}):
            if always is not None and always[layer] is None:
                continue
            rows = []
            for s in slots:
                t = table(s)
                rows.append(t[layer] if t is not None and layer in s.layers else
                            torch.zeros_like(s.vectors[layer]))
            out[layer] = torch.stack(rows).contiguous()
        return out

    def set_monitors(self, units: dict[str, Tensor], layers: list[int]) -> None:
        """``units``: trait -> unit vectors ``[L, D]`` (float32, model device)."""
        self.monitor_traits = list(units)
        self.monitor_units = dict(units)
        self.monitor_layers = list(layers)
        self.n_monitored = len(self.monitor_traits)
        self.layer_readout = [None] * self.num_layers
        self.layer_slot = [-1] * self.num_layers
        if units:
            stacked = torch.stack(list(units.values()), dim=1)  # [L, M, D]
            for i, layer in enumerate(self.monitor_layers):
                self.layer_readout[layer] = stacked[layer].contiguous()
                self.layer_slot[layer] = i
        self.seq.drop_buffer()

    # ------------------------------------------------------------------ per forward
    def begin_forward(self, batch: int, seqlen: int, attention_mask: Optional[Tensor], cache) -> None:
        """Called by the patched decoder once per forward, before the first layer."""
        seq = self.seq
        fresh = seq.begin(batch, seqlen, attention_mask, cache)
        self.stash.clear()
        past = seq.past
        mask2d = attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[0] == batch
        if mask2d:
            real = attention_mask[:, past:past + seqlen].to(device=self.device, dtype=torch.bool)
        else:
            real = torch.ones(batch, seqlen, dtype=torch.bool, device=self.device)
        columns = torch.arange(past, past + seqlen, device=self.device)
        is_prompt = columns[None, :] < seq.prompt_end[:, None]  # [B, T]

        self.coef = self.gate_thr = self.clamp_lo = self.clamp_hi = None
        if self.slots:
            self._coefficients(batch, seqlen, real, is_prompt)
        if self.n_monitored:
            seq.prepare_buffer(fresh, len(self.monitor_layers), self.n_monitored, real)

    def _coefficients(self, batch: int, seqlen: int, real: Tensor, is_prompt: Tensor) -> None:
        """Per-token tables of this forward: ``coef [N, S]`` (and ``gate_thr``) for additive
        steering, ``clamp_lo/hi [N, C]`` for caps and ablations; tokens outside a slot's
        positions (and padding) get a zero coefficient and no bound."""
        def rows(slot, name, t):
            if t.numel() not in (1, batch):
                raise ValueError(f"steering {slot.name!r}: {name} has {t.numel()} rows but the batch has {batch}")
            return t.view(-1, 1).expand(batch, seqlen)

        def mask_of(slot):
            if slot.positions == "prompt":
                return real & is_prompt
            if slot.positions == "response":
                return real & ~is_prompt
            return real

        n = batch * seqlen
        if self.add_slots:
            self.coef = torch.stack([rows(s, "alpha", s.alpha) * mask_of(s) for s in self.add_slots],
                                    dim=-1).reshape(n, -1)
            if self.gated:
                ninf = torch.full((1,), -torch.inf, device=self.device)
                self.gate_thr = torch.stack(
                    [rows(s, "the when= threshold", s.gate_thr if s.gate is not None else ninf)
                     for s in self.add_slots], dim=-1).reshape(n, -1).contiguous()
        if self.clamp_slots:
            los, his = [], []
            for s in self.clamp_slots:
                mask = mask_of(s)
                off = torch.full((batch, seqlen), torch.inf, device=self.device)
                if s.ablate:
                    lo = hi = torch.zeros((batch, seqlen), device=self.device)
                else:
                    lo, hi = -off, rows(s, "cap", s.cap)
                los.append(torch.where(mask, lo, -off))
                his.append(torch.where(mask, hi, off))
            self.clamp_lo = torch.stack(los, dim=-1).reshape(n, -1)
            self.clamp_hi = torch.stack(his, dim=-1).reshape(n, -1)

    # ------------------------------------------------------------------ called by layers
    def input_norm(self, hidden: Tensor, norm) -> Tensor:
        """Block input RMSNorm, taken from the previous block's fused output op when it is the
        normalisation of this very tensor (identity check: a user hook that replaced the
        output gets a fresh norm)."""
        normed = self.stash.take(hidden)
        return norm(hidden) if normed is None else normed

    def block_output(self, layer: int, hidden: Tensor, delta: Tensor, fuse_next: bool = True) -> Tensor:
        """Block ``layer``'s output ``hidden + delta``, steered, with readings recorded; fused
        with the next block's input RMSNorm where there is one (``fuse_next`` is off under
        gradient checkpointing, whose recomputation must not see a stashed tensor)."""
        steer = self.layer_steer[layer]
        readout = self.layer_readout[layer]
        clamp = self.layer_clamp[layer]
        gate = self.layer_gate[layer]
        coef = self.coef if steer is not None else None
        gate_thr = self.gate_thr if gate is not None else None
        lo, hi = (self.clamp_lo, self.clamp_hi) if clamp is not None else (None, None)
        shape = hidden.shape
        d = shape[-1]
        nxt = self.next_norms[layer] if fuse_next and not self._hooked_between(layer) else None
        if nxt is None:
            out, readings = self.ops.steer_project(
                hidden.reshape(-1, d), delta.reshape(-1, d), steer, coef, clamp, lo, hi, readout,
                gate, gate_thr)
        else:
            norm, eps, gemma = nxt
            normed, out, readings = self.ops.add_rms_norm_steer_project(
                hidden.reshape(-1, d), delta.reshape(-1, d), norm.weight, eps, gemma,
                steer, coef, clamp, lo, hi, readout, gate, gate_thr)
        if readings is not None:
            self.record(layer, readings)
        out = out.view(shape)
        if nxt is not None:
            self.stash.put(out, normed.view(shape))
        return out

    def record(self, layer: int, readings: Tensor) -> None:
        self.seq.record(self.layer_slot[layer], readings)

    def _hooked_between(self, layer: int) -> bool:
        """Where the stash cannot see an in-place edit (see :func:`version_blind`): no fusion if a
        hook sits between block ``layer`` and the next."""
        if not version_blind() or layer + 1 >= len(self.layer_modules):
            return False
        from torch.nn.modules import module as nn_module
        return bool(self.layer_modules[layer]._forward_hooks or self.layer_modules[layer + 1]._forward_pre_hooks
                    or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


def version_blind() -> bool:
    """True where a tensor's version counter cannot be read: under torch.compile (dynamo does not
    trace it) and for inference-mode tensors (which have none)."""
    return torch.compiler.is_compiling() or torch.is_inference_mode_enabled()


class NormStash:
    """Block l's fused output op also computes block l+1's input RMSNorm; block l+1 takes it
    when it receives that very tensor, unedited. An in-place edit in between (another
    library's forward hook writing ``out[...] = ...``) bumps the tensor's version counter, and
    the norm is computed afresh."""

    def __init__(self):
        self.item: Optional[tuple[Tensor, int, Tensor]] = None

    def put(self, out: Tensor, normed: Tensor) -> None:
        self.item = (out, None if version_blind() else out._version, normed)

    def take(self, hidden: Tensor) -> Optional[Tensor]:
        item, self.item = self.item, None
        if item is not None and item[0] is hidden and (item[1] is None or hidden._version == item[1]):
            return item[2]
        return None

    def clear(self) -> None:
        self.item = None


class ThreadGuard:
    """One patched model runs one ``generate()`` or forward at a time: its steering tables, the
    sequence and the readings are one state per model, so a second thread would silently mix
    its alphas and readings with the first one's. The second thread gets a clear error instead
    (the same thread may nest: ``generate()`` calls the forward)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: Optional[int] = None
        self._depth = 0

    def enter(self, what: str) -> None:
        me = threading.get_ident()
        with self._lock:
            if self._owner is not None and self._owner != me:
                raise RuntimeError(
                    f"personakern: {what} while this patched model is running in another thread; its "
                    f"steering, sequence and readings are one state per model. Run one generate()/forward "
                    f"at a time, or give each thread its own model (and patch)")
            self._owner = me
            self._depth += 1

    def exit(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None

    def check(self, what: str) -> None:
        """For a call that changes the state: refused while another thread runs the model."""
        with self._lock:
            if self._owner is not None and self._owner != threading.get_ident():
                raise RuntimeError(f"personakern: {what} while this patched model is running in another "
                                   f"thread; wait for its generate()/forward to return")
