"""Steering tables: the named steering entries a handle holds, the per-layer vector tables built
from them when they change, and the per-token coefficient and bound matrices built once per
forward. The fused op reads these tensors; nothing here branches on a tensor's value."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

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


class SteeringTables:
    def __init__(self, num_layers: int, device: torch.device):
        self.num_layers = num_layers
        self.device = device
        # structure, rebuilt by steer()/clear()
        self.slots: dict[str, SteerSlot] = {}
        self.add_slots: list[SteerSlot] = []     # slots with additive steering, in coef column order
        self.clamp_slots: list[SteerSlot] = []   # slots with a cap or an ablation
        self.layer_steer: list[Optional[Tensor]] = [None] * num_layers    # [S, D] per layer
        self.layer_gate: list[Optional[Tensor]] = [None] * num_layers     # [S, D] per layer
        self.layer_clamp: list[Optional[Tensor]] = [None] * num_layers    # [C, D] per layer
        self.gated = False
        # per forward
        self.coef: Optional[Tensor] = None
        self.gate_thr: Optional[Tensor] = None   # [N, S]
        self.clamp_lo: Optional[Tensor] = None   # [N, C]
        self.clamp_hi: Optional[Tensor] = None

    def rebuild(self) -> None:
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

    def begin_forward(self, batch: int, seqlen: int, real: Tensor, is_prompt: Tensor) -> None:
        """Per-token tables of this forward: ``coef [N, S]`` (and ``gate_thr``) for additive
        steering, ``clamp_lo/hi [N, C]`` for caps and ablations; tokens outside a slot's
        positions (and padding) get a zero coefficient and no bound."""
        self.coef = self.gate_thr = self.clamp_lo = self.clamp_hi = None
        if not self.slots:
            return

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

    def for_layer(self, layer: int) -> tuple:
        """The fused op's steering arguments at ``layer``: ``(steer, coef, clamp, lo, hi, gate, gate_thr)``."""
        steer, clamp, gate = self.layer_steer[layer], self.layer_clamp[layer], self.layer_gate[layer]
        lo, hi = (self.clamp_lo, self.clamp_hi) if clamp is not None else (None, None)
        return (steer, self.coef if steer is not None else None, clamp, lo, hi, gate,
                self.gate_thr if gate is not None else None)
