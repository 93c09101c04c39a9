"""Read-outs on their way back: kept per request in the worker, fetched by request id.

``RequestOutput`` has no field for extra results, so the worker keeps each monitored request's
readings (host memory, filled once per step) until the process that accepted the request takes
them with one ``collective_rpc`` (offline: after ``generate()``; served: when the request ends).
Finished requests whose readings nobody takes are dropped oldest first past ``keep``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Optional

import numpy as np
import torch

from ..readings import Readings

RPC_TAKE = "personakern_take_readings"


def external_id(internal: str) -> str:
    """The caller's request id: vLLM appends ``-`` and 8 random characters inside the engine."""
    head, sep, tail = internal.rpartition("-")
    return head if sep and len(tail) == 8 else internal


class _Entry:
    __slots__ = ("plan", "prompt_len", "values", "length")

    def __init__(self, plan, prompt_len: int, num_layers: int, num_traits: int, capacity: int):
        self.plan = plan
        self.prompt_len = int(prompt_len)
        self.values = np.full((capacity, num_layers, num_traits), np.nan, dtype=np.float32)
        self.length = 0


class RequestPool:
    """Per-request entries of a worker: ``active`` while the request is in the batch, then
    ``finished`` (the last ``keep``) until taken. A request that left the batch and came back
    (preempted, recomputed) gets its finished entry back, so what it computed before stays and
    what it computes again overwrites the same positions."""

    def __init__(self, keep: int):
        self.keep = keep
        self.active: dict = {}
        self.finished: "OrderedDict[str, object]" = OrderedDict()

    def entry(self, rid: str, make):
        e = self.active.get(rid)
        if e is None:
            e = self.active[rid] = self.finished.pop(rid, None) or make()
        return e

    def retire(self, live: Iterable[str]) -> None:
        """Move requests that left the batch (finished or aborted) out of the active set."""
        live = set(live)
        for rid in [r for r in self.active if r not in live]:
            self.finished[rid] = self.active.pop(rid)
        while len(self.finished) > self.keep:
            self.finished.popitem(last=False)

    def take(self, ids: Iterable[str]) -> dict:
        """Payloads of the requests with these ids (external or internal), removed from the pool."""
        want = set(ids)
        out = {}
        for pool in (self.finished, self.active):
            for rid in [r for r in pool if r in want or external_id(r) in want]:
                out[rid if rid in want else external_id(rid)] = self.payload(pool.pop(rid))
        return out

    def payload(self, entry) -> dict:   # pragma: no cover - every pool defines it
        raise NotImplementedError


class ReadingsStore(RequestPool):
    def __init__(self, num_layers: int, num_traits: int, keep: int = 1024):
        super().__init__(keep)
        self.num_layers, self.num_traits = num_layers, num_traits

    def record(self, rid: str, plan, prompt_len: int, start: int, values: np.ndarray) -> None:
        """``values [n, L, T]``: readings of positions ``start .. start + n - 1``."""
        e = self.entry(rid, lambda: _Entry(plan, prompt_len, self.num_layers, self.num_traits, prompt_len + 64))
        end = start + values.shape[0]
        if end > e.values.shape[0]:
            grow = np.full((max(end, 2 * e.values.shape[0]) - e.values.shape[0],) + e.values.shape[1:],
                           np.nan, dtype=np.float32)
            e.values = np.concatenate([e.values, grow])
        e.values[start:end] = values
        e.length = max(e.length, end)

    def payload(self, e: _Entry) -> dict:
        plan = e.plan
        vals = e.values[:e.length][:, list(plan.monitor_layers)][:, :, list(plan.monitor_traits)]
        vals = np.ascontiguousarray(vals, dtype=np.float32)
        return {"traits": list(plan.spec.monitor_traits), "layers": list(plan.monitor_layers),
                "prompt_length": e.prompt_len, "shape": list(vals.shape), "values": vals.tobytes()}


def to_readings(p: dict) -> Readings:
    """A worker payload as :class:`personakern.Readings` of one request: ``values [1, T, L, M]``."""
    vals = np.frombuffer(p["values"], dtype=np.float32).reshape(p["shape"]).copy()
    values = torch.from_numpy(vals)[None]
    valid = ~torch.isnan(values).all(dim=-1).all(dim=-1)
    return Readings(values=values, valid=valid, layers=list(p["layers"]), traits=list(p["traits"]),
                    prompt_lengths=torch.tensor([int(p["prompt_length"])]))


def to_json(p: dict) -> dict:
    """A worker payload as the JSON object a served response carries under ``"personakern"``:
    ``readings[t][i][m]`` is token ``t``'s projection at ``layers[i]`` on ``traits[m]``."""
    vals = np.frombuffer(p["values"], dtype=np.float32).reshape(p["shape"])
    return {"traits": list(p["traits"]), "layers": list(p["layers"]), "prompt_length": int(p["prompt_length"]),
            "num_tokens": int(vals.shape[0]),
            "readings": [[[None if np.isnan(x) else float(x) for x in row] for row in tok] for tok in vals]}


def first_rank(results) -> Optional[dict]:
    """``collective_rpc`` answers once per worker; with tensor parallelism every rank holds the same
    readings (the residual stream is replicated), rank 0's are taken."""
    if isinstance(results, list):
        return results[0] if results else {}
    return results
