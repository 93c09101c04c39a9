"""Persistent per-step tables the steered layers read, and the step fill that writes them.

Allocated once, before the model is traced, sized by the engine's token budget; the layers read
``[:num_tokens]`` slices and never branch on a value, so the same code serves eager mode and the
compiled graph, plain and steered tokens alike. Layout (L layers, T traits, S = T + G columns):

- ``steer [L, S, D]``: columns 0..T-1 are the traits' vectors, T.. the conditional columns
  assigned per step; ``gate [L, S, D]`` their unit condition vectors (zero for the trait columns,
  whose threshold is -inf: always open); ``thr [N, S]`` the thresholds (one value per column).
- ``coef [L, N, S]`` per-token alphas; ``lo/hi [L, N, T]`` per-token clamp bounds on the unit
  trait directions (``unit [L, T, D]``), +-inf where nothing is capped.
- ``readings [L, N, T]``: every block's projection on every trait, written by the layers.

A plain step (no steered request) writes nothing once the rows it uses are clean.
"""
from __future__ import annotations

import logging
import weakref
from typing import Optional, Sequence

import numpy as np
import torch

from .plan import RESPONSE, RequestPlan

log = logging.getLogger("personakern.vllm")


class StepTables:
    def __init__(self, vectors: torch.Tensor, max_tokens: int, gated_slots: int, device, ops):
        L, T, D = vectors.shape
        self.num_layers, self.num_traits, self.hidden = L, T, D
        self.gated_slots = G = int(gated_slots)
        self.columns = S = T + G
        self.max_tokens = N = int(max_tokens)
        self.ops = ops
        f32 = dict(dtype=torch.float32, device=device)
        vec = vectors.to(**f32)
        self.unit = _unit(vec).contiguous()
        self.steer = torch.zeros(L, S, D, **f32)
        self.steer[:, :T] = vec
        self.gate = torch.zeros(L, S, D, **f32) if G else None
        self.thr = torch.full((N, S), -torch.inf, **f32) if G else None
        self.coef = torch.zeros(L, N, S, **f32)
        self.lo = torch.full((L, N, T), -torch.inf, **f32)
        self.hi = torch.full((L, N, T), torch.inf, **f32)
        self.readings = torch.zeros(L, N, T, **f32)
        self._vectors = vec
        self._gated_keys: list = [None] * G     # key held by each conditional column
        self._dirty_coef = 0                    # rows [0, dirty) may hold non-plain values
        self._dirty_bounds = 0
        self._warned_overflow = False
        self.handle = self._step_handle()
        self._step_op = torch.ops.personakern.cpu_step_add_rms_norm.default if self.handle is not None else None

    def _step_handle(self) -> Optional[int]:
        """On the cpu backend the tables are registered with the extension's step op, which
        reads them by handle (no per-call views, read-outs written in place, steering and
        read-outs switched off in steps without them); other backends take them as arguments."""
        if getattr(self.ops, "NAME", None) != "cpu" or self.coef.device.type != "cpu" or not self.num_traits:
            return None
        from ..backends import cpu
        handle = cpu.step_table(self.steer, self.coef, self.unit, self.lo, self.hi, self.gate, self.thr,
                                self.readings)
        if handle is not None:
            weakref.finalize(self, cpu.step_table_release, handle)
        return handle

    # ------------------------------------------------------------------ per step (host)
    def fill(self, plans: Sequence[Optional[RequestPlan]], num_tokens: np.ndarray, start: np.ndarray,
             prompt_lens: np.ndarray, total: int) -> None:
        """Write the tables for a step of ``len(plans)`` requests: request ``r`` contributes
        ``num_tokens[r]`` consecutive rows at positions ``start[r]...``; rows past
        ``sum(num_tokens)`` up to ``total`` (padding) are plain."""
        steered = [r for r, p in enumerate(plans) if p is not None and p.steers]
        if self.handle is not None:
            from ..backends import cpu
            cpu.step_flags(self.handle, bool(steered), any(p is not None and p.monitors for p in plans))
        if not steered:
            self._clean(total)
            return
        if total > self.max_tokens:
            raise RuntimeError(f"personakern: step of {total} tokens exceeds the table size {self.max_tokens}")
        L, T, S = self.num_layers, self.num_traits, self.columns
        column = self._assign_columns([plans[r] for r in steered])
        K = len(steered)
        coef_tab = np.zeros((1 + 2 * K, L, S), dtype=np.float32)
        bounded = any(plans[r].lo is not None for r in steered)
        if bounded:
            lo_tab = np.full((1 + 2 * K, L, T), -np.inf, dtype=np.float32)
            hi_tab = np.full((1 + 2 * K, L, T), np.inf, dtype=np.float32)
        base = np.zeros(len(plans), dtype=np.int64)
        for k, r in enumerate(steered):
            p = plans[r]
            rows = slice(1 + 2 * k, 3 + 2 * k)
            base[r] = 1 + 2 * k
            coef_tab[rows, :, :T] = p.coef
            for g in p.gated:
                col = column.get(g.key)
                if col is not None:
                    coef_tab[rows, :, col] = g.coef
            if bounded and p.lo is not None:
                lo_tab[rows] = p.lo
                hi_tab[rows] = p.hi
        counts = np.asarray(num_tokens, dtype=np.int64)
        used = int(counts.sum())
        req = np.repeat(np.arange(len(plans)), counts)
        first = np.cumsum(counts) - counts
        pos = np.asarray(start, dtype=np.int64)[req] + (np.arange(used) - first[req])
        phase = (pos >= np.asarray(prompt_lens, dtype=np.int64)[req]) * (base[req] > 0)
        idx = np.zeros(total, dtype=np.int64)
        idx[:used] = base[req] + phase * RESPONSE
        idx_t = torch.from_numpy(idx)
        dev = self.coef.device
        self.coef[:, :total].copy_(torch.from_numpy(coef_tab)[idx_t].transpose(0, 1).to(dev, non_blocking=True))
        self._dirty_coef = max(self._dirty_coef, total)
        if bounded:
            self.lo[:, :total].copy_(torch.from_numpy(lo_tab)[idx_t].transpose(0, 1).to(dev, non_blocking=True))
            self.hi[:, :total].copy_(torch.from_numpy(hi_tab)[idx_t].transpose(0, 1).to(dev, non_blocking=True))
            self._dirty_bounds = max(self._dirty_bounds, total)
        else:
            self._clean_bounds(total)

    def _clean(self, total: int) -> None:
        if self._dirty_coef:
            self.coef[:, :self._dirty_coef].zero_()
            self._dirty_coef = 0
        self._clean_bounds(total)

    def _clean_bounds(self, total: int) -> None:
        if self._dirty_bounds:
            self.lo[:, :self._dirty_bounds].fill_(-torch.inf)
            self.hi[:, :self._dirty_bounds].fill_(torch.inf)
            self._dirty_bounds = 0

    def _assign_columns(self, plans: list) -> dict:
        """Map this step's conditional keys to columns, keeping columns that already hold a
        key (their vectors and threshold stay written)."""
        keys = list(dict.fromkeys(g.key for p in plans for g in p.gated))
        if not keys:
            return {}
        T = self.num_traits
        held = {k: j for j, k in enumerate(self._gated_keys) if k is not None}
        column = {}
        free = [j for j, k in enumerate(self._gated_keys) if k is None or k not in keys]
        for key in keys:
            if key in held:
                column[key] = T + held[key]
                continue
            if not free:
                if not self._warned_overflow:
                    log.error("personakern: this step has more distinct conditional (when) steering entries "
                              "than PERSONAKERN_VLLM_WHEN_SLOTS=%d; the extra ones are not applied in such steps",
                              self.gated_slots)
                    self._warned_overflow = True
                continue
            j = free.pop(0)
            self._gated_keys[j] = key
            trait, when, threshold = key
            self.steer[:, T + j] = self._vectors[:, trait]
            self.gate[:, T + j] = self.unit[:, when]
            self.thr[:, T + j] = threshold
            column[key] = T + j
        return column

    def set_trait(self, t: int, vectors: torch.Tensor) -> None:
        """Column ``t``'s vectors ``[L, D]`` replaced in place (the compiled graph and the step op
        read these tensors, so they see it); conditional columns built on trait ``t`` are freed."""
        vec = vectors.to(self._vectors)
        self._vectors[:, t] = vec
        self.steer[:, t] = vec
        self.unit[:, t] = _unit(vec)
        for j, key in enumerate(self._gated_keys):
            if key is not None and t in (key[0], key[1]):
                self._gated_keys[j] = None

    # ------------------------------------------------------------------ called by the layers
    def apply(self, block: int, residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float):
        """Block ``block``'s output ``residual + x``, steered, clamped and read, and its RMSNorm
        (the next block's input norm, or the final norm): vLLM's fused add+RMSNorm slot."""
        if self._step_op is not None:
            return self._step_op(residual, x, weight, eps, self.handle, block)
        if not self.num_traits:   # an engine without vectors (it only gathers activations)
            return self.ops.add_rms_norm(residual, x, weight, eps)
        n = x.shape[0]
        normed, out, readings = self.ops.add_rms_norm_steer_project(
            residual, x, weight, eps, False,
            self.steer[block], self.coef[block, :n], self.unit[block], self.lo[block, :n], self.hi[block, :n],
            self.unit[block], self.gate[block] if self.gate is not None else None,
            self.thr[:n] if self.thr is not None else None)
        self.readings[block, :n].copy_(readings)
        return normed, out


def _unit(vec: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dimension (zero vectors stay zero)."""
    return vec / vec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
