"""Run-time state shared by the patched layers of one model: the engine's one place to look.

Everything the forward reads lives in tensors prepared by ``steer()``/``monitor()``/``capture()``
(vectors, unit read-out vectors, per-row alphas) or once per forward by
:meth:`PersonaState.begin_forward` (the per-token coefficient matrix, the reading buffer, the
capture masks). The layers take no Python branch on a tensor's *value* and never move data to
the host, so decoding stays asynchronous and the patched model can be traced by
``torch.compile``. Python-level structure (which layers are steered, monitored or captured, how
many vectors) changes only when the user calls the handle.

Three jobs, one module each: :mod:`.steering` (the steering tables), :mod:`personakern.sequence`
(positions and the readings buffer), :mod:`.capture` (running sums of block outputs), and
:mod:`.runtime` (the cross-layer norm stash and the thread guard).

Positions are absolute columns of the token sequence, counting left padding: column ``c`` of
``generate()``'s output is position ``c`` of the readings.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..sequence import SequenceTracker
from .capture import KINDS, Capture
from .runtime import NormStash, ThreadGuard, version_blind
from .steering import POSITION_MODES, SteeringTables, SteerSlot

__all__ = ["POSITION_MODES", "KINDS", "Capture", "NormStash", "PersonaState", "SteerSlot", "SteeringTables",
           "ThreadGuard", "version_blind"]


class PersonaState:
    def __init__(self, num_layers: int, hidden_size: int, device: torch.device, ops):
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.device = device
        self.ops = ops
        self.steering = SteeringTables(num_layers, device)
        # monitoring, rebuilt by monitor()
        self.layer_readout: list[Optional[Tensor]] = [None] * num_layers  # [M, D] per layer
        self.layer_slot: list[int] = [-1] * num_layers                    # index in the buffer
        self.monitor_traits: list[str] = []
        self.monitor_units: dict[str, Tensor] = {}
        self.monitor_layers: list[int] = []
        # counts, not the lists themselves, are what the forward branches on: under
        # torch.compile a branch on a list guards on its contents (renaming a trait would
        # recompile), a branch on an int only on its value
        self.n_monitored = 0
        self.capture: Optional[Capture] = None
        # per sequence: positions, prompt ends, the readings buffer
        self.seq = SequenceTracker(device)
        self.guard = ThreadGuard()
        # cross-layer fusion: block l's output op also computes block l+1's input RMSNorm
        self.next_norms: list = [None] * num_layers   # (norm module, eps, gemma) or None
        self.layer_modules: list = []
        self.stash = NormStash()

    # the steering entries and tables, where the handle and tests have always found them
    @property
    def slots(self) -> dict[str, SteerSlot]:
        return self.steering.slots

    @property
    def layer_steer(self) -> list:
        return self.steering.layer_steer

    def rebuild_steering(self) -> None:
        self.steering.rebuild()

    # ------------------------------------------------------------------ structure
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

    def skips(self, layer: int) -> bool:
        """True for blocks after the deepest one a ``skip_rest`` capture reads."""
        return self.capture is not None and layer > self.capture.skip_after

    # ------------------------------------------------------------------ per forward
    def begin_forward(self, batch: int, seqlen: int, attention_mask: Optional[Tensor], cache,
                      input_ids: Optional[Tensor] = None) -> None:
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

        self.steering.begin_forward(batch, seqlen, real, is_prompt)
        if self.n_monitored:
            seq.prepare_buffer(fresh, len(self.monitor_layers), self.n_monitored, real)
        if self.capture is not None:
            self.capture.begin_forward(fresh, batch, past, seqlen, self.hidden_size, real, is_prompt,
                                       seq.prompt_end, input_ids)

    # ------------------------------------------------------------------ called by layers
    def input_norm(self, hidden: Tensor, norm) -> Tensor:
        """Block input RMSNorm, taken from the previous block's fused output op when it is the
        normalisation of this very tensor (identity check: a user hook that replaced the
        output gets a fresh norm)."""
        normed = self.stash.take(hidden)
        return norm(hidden) if normed is None else normed

    def block_output(self, layer: int, hidden: Tensor, delta: Tensor, fuse_next: bool = True) -> Tensor:
        """Block ``layer``'s output ``hidden + delta``, steered, with readings recorded and
        captured; fused with the next block's input RMSNorm where there is one (``fuse_next`` is
        off under gradient checkpointing, whose recomputation must not see a stashed tensor)."""
        steer, coef, clamp, lo, hi, gate, gate_thr = self.steering.for_layer(layer)
        readout = self.layer_readout[layer]
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
        if self.capture is not None:
            self.capture.add(layer, out)
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
