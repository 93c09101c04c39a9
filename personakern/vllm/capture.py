"""Activation capture inside the engine: per request and per block, running sums of the block's
output over the request's response tokens, its prompt tokens and its last prompt token.

The same three means as the Hugging Face engine's capture (:mod:`personakern.state.capture`,
:data:`~personakern.state.KINDS`), gathered while vLLM generates, in continuous batching: no
token's hidden state ever goes to the host, only each finished request's ``[L, 3, D]`` means.

Layout, allocated once at engine start (before the model is traced) when the engine is started
with ``PERSONAKERN_VLLM_CAPTURE=1``:

- ``sums [L, (C + 1) * 3, D]`` float32: rows ``3c .. 3c + 2`` are capture slot ``c``'s
  response / prompt / last-prompt sums; slot 0 is a sink that takes every row nobody captures;
- ``index [2, N]`` int64: per token row of the step, the sum row it adds to (its response or
  prompt row; its last-prompt row, or the sink).

Each block output is added with two ``index_add_`` over the step's rows (the same code in eager
mode and in the compiled graph; nothing branches on a value). The step fill (host, once per step)
gives each capturing request a slot, writes ``index`` and counts the tokens per kind; a position
fed twice (a preempted request recomputed) counts once. When the request has finished, its means
are read once (``take``) and the slot is zeroed and freed.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Iterable, Optional

import numpy as np
import torch

from ..state import KINDS

CAPTURE_ENV = "PERSONAKERN_VLLM_CAPTURE"
RPC_TAKE_CAPTURE = "personakern_take_capture"
K = len(KINDS)
RESPONSE, PROMPT, LAST = (KINDS.index(k) for k in ("response", "prompt", "last_prompt"))


def capture_enabled(environ=None) -> bool:
    """Whether engines started now gather activations (``$PERSONAKERN_VLLM_CAPTURE`` = 1)."""
    value = (environ if environ is not None else os.environ).get(CAPTURE_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no", "off")


class _Slot:
    __slots__ = ("slot", "plan", "counts", "covered", "prompt_len")

    def __init__(self, slot: int, plan, prompt_len: int):
        self.slot, self.plan, self.prompt_len = slot, plan, int(prompt_len)
        self.counts = np.zeros(K, dtype=np.int64)
        self.covered = 0


class CaptureTables:
    def __init__(self, num_layers: int, hidden: int, slots: int, max_tokens: int, device, keep: int = 1024):
        self.num_layers, self.hidden, self.slots, self.keep = num_layers, hidden, int(slots), keep
        self.sums = torch.zeros(num_layers, (self.slots + 1) * K, hidden, dtype=torch.float32, device=device)
        self.index = torch.zeros(2, int(max_tokens), dtype=torch.long, device=device)
        self.free = list(range(self.slots, 0, -1))
        self.active: dict[str, _Slot] = {}
        self.finished: "OrderedDict[str, dict]" = OrderedDict()
        self.step_active = False

    # ------------------------------------------------------------------ per step (host)
    def fill(self, req_ids, plans, counts: np.ndarray, start: np.ndarray, prompt: np.ndarray, total: int) -> None:
        rows = np.zeros((2, total), dtype=np.int64)
        first = 0
        any_capture = False
        for rid, plan, n, s, p in zip(req_ids, plans, counts, start, prompt):
            n, s, p = int(n), int(s), int(p)
            if plan is not None and plan.captures:
                e = self.active.get(rid)
                if e is None:
                    if not self.free:  # cannot happen with slots >= max_num_seqs
                        raise RuntimeError("personakern: no free capture slot (more capturing requests "
                                           "than the engine's max_num_seqs)")
                    e = self.active[rid] = _Slot(self.free.pop(), plan, plan.capture_prompt_length or p)
                p = e.prompt_len
                pos = np.arange(s, s + n)
                new = pos >= e.covered
                e.covered = max(e.covered, s + n)
                is_prompt = pos < p
                base = 3 * e.slot
                rows[0, first:first + n] = np.where(new, base + np.where(is_prompt, PROMPT, RESPONSE), 0)
                last = new & (pos == p - 1)
                rows[1, first:first + n] = np.where(last, base + LAST, 0)
                e.counts[PROMPT] += int((new & is_prompt).sum())
                e.counts[RESPONSE] += int((new & ~is_prompt).sum())
                e.counts[LAST] += int(last.sum())
                any_capture = True
            first += n
        self.step_active = any_capture
        if any_capture:
            self.index[:, :total].copy_(torch.from_numpy(rows))
        elif total:
            self.index[:, :total].zero_()

    def retire(self, live: Iterable[str]) -> None:
        """Read out and free the slots of requests that left the batch."""
        live = set(live)
        for rid in [r for r in self.active if r not in live]:
            self.finished[rid] = self._read(self.active.pop(rid))
        while len(self.finished) > self.keep:
            self.finished.popitem(last=False)

    def take(self, ids: Iterable[str]) -> dict:
        from .results import external_id
        want = set(ids)
        out = {}
        # a request preempted and recomputed left a partial entry in ``finished``: the later
        # (complete) one wins, so finished entries first (oldest first), then the active one
        for rid in [r for r in self.finished if r in want or external_id(r) in want]:
            out[rid if rid in want else external_id(rid)] = self.finished.pop(rid)
        for rid in [r for r in self.active if r in want or external_id(r) in want]:
            out[rid if rid in want else external_id(rid)] = self._read(self.active.pop(rid))
        return out

    def _read(self, e: _Slot) -> dict:
        rows = slice(3 * e.slot, 3 * e.slot + 3)
        plan = e.plan
        layers = list(plan.capture_layers)
        kinds = [KINDS.index(k) for k in plan.capture_kinds]
        sums = self.sums[:, rows]                                      # [L, 3, D]
        means = sums[layers][:, kinds].to("cpu", torch.float32)       # [Lc, Kc, D]
        cnt = torch.from_numpy(e.counts[kinds].astype(np.float32))
        means = (means / cnt.clamp_min(1)[None, :, None]).numpy()
        sums.zero_()
        self.free.append(e.slot)
        return {"kinds": list(plan.capture_kinds), "layers": layers, "prompt_length": e.prompt_len,
                "counts": [int(c) for c in e.counts[kinds]], "shape": list(means.shape),
                "means": np.ascontiguousarray(means).tobytes()}

    # ------------------------------------------------------------------ called by the layers
    def add(self, block: int, out: torch.Tensor) -> None:
        n = out.shape[0]
        s = self.sums[block]
        f = out.float()
        s.index_add_(0, self.index[0, :n], f)
        s.index_add_(0, self.index[1, :n], f)


def to_capture(p: dict) -> dict:
    """A worker payload as ``{"kinds", "layers", "counts", "prompt_length", "means"}`` with
    ``means`` a float32 tensor ``[len(layers), len(kinds), D]`` (zeros where a kind had no token)."""
    vals = np.frombuffer(p["means"], dtype=np.float32).reshape(p["shape"]).copy()
    return {"kinds": list(p["kinds"]), "layers": list(p["layers"]), "counts": dict(zip(p["kinds"], p["counts"])),
            "prompt_length": int(p["prompt_length"]), "means": torch.from_numpy(vals)}


__all__ = ["CAPTURE_ENV", "RPC_TAKE_CAPTURE", "CaptureTables", "capture_enabled", "to_capture"]
