"""Log-probabilities of chosen prompt tokens, computed inside the engine: the likelihood judge's
``log P(token_i | tokens < i)`` over an answer, without vLLM's prompt log-probabilities.

vLLM's ``prompt_logprobs`` compute, for every computed prompt token of a request, the vocabulary
projection, a full log-softmax and the token's rank, and hand each position back as a Python
dict. A request that asks ``extra_args={"personakern_score": f}`` gets instead, on a personakern
engine, ``log P(token_i | tokens < i)`` for ``i >= f`` only: the final hidden state of the rows
at positions ``f - 1 .. len - 2`` through the model's own ``compute_logits`` (its head, scaling
and soft-capping) and a float32 log-softmax (as vLLM's), gathered at the next prompt token, for
the whole step at once. The request reads the prefix cache as any other: entries whose row came
from the cache are not computed (NaN), as with vLLM's prompt log-probabilities; a preempted
request recomputed writes the same entries again (an entry depends only on the tokens up to it).

The values reach the caller as the readings do (kept per request in the worker, taken by id with
one ``collective_rpc`` after ``generate()``): ``RequestOutput.personakern_scores``, a float32 array
with entry ``i - f`` for token ``i`` (NaN where not computed).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .results import RequestPool

SCORE_KEY = "personakern_score"
RPC_TAKE_SCORES = "personakern_take_scores"
#: rows projected on the vocabulary at once (SmolLM2: 512 x 49 152 float32 logits, 100 MB)
CHUNK_ROWS = 512


def score_start(extra_args: Optional[dict]) -> Optional[int]:
    """The first scored token of a request (None: the request scores nothing); raises
    ``ValueError`` for a value that is not a positive integer."""
    if not extra_args or SCORE_KEY not in extra_args:
        return None
    value = extra_args[SCORE_KEY]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"personakern: {SCORE_KEY} must be a positive integer (the position of the first "
                         f"prompt token to score; token 0 has no log-probability), got {value!r}")
    return int(value)


class _Entry:
    __slots__ = ("start", "values")

    def __init__(self, start: int, prompt_len: int):
        self.start = start
        self.values = np.full(max(0, prompt_len - start), np.nan, dtype=np.float32)


class ScoreStore(RequestPool):
    """Worker side: which rows of a step are scored (``plan``, on the host before the forward),
    their log-probabilities (``compute``, after it), kept per request until taken
    (``{id: {"start", "values" (bytes)}}``)."""

    def __init__(self, keep: int = 65536):
        super().__init__(keep)
        self._step = None

    def plan(self, req_ids: Sequence[str], extras: Sequence[Optional[dict]], prompts: Sequence,
             counts: np.ndarray, start: np.ndarray) -> bool:
        """Rows of this step to score: request ``r`` runs ``counts[r]`` rows at positions
        ``start[r]...``; ``prompts[r]`` its prompt token ids. Whether any row is scored."""
        rows, targets, owners = [], [], []
        first = 0
        for rid, extra, ids, n, s in zip(req_ids, extras, prompts, counts, start):
            n, s = int(n), int(s)
            try:
                f = score_start(extra)
            except ValueError:   # validated where the request was accepted; unvalidated: unscored
                f = None
            if f is not None and ids is not None:
                P = len(ids)
                lo, hi = max(f, s + 1), min(s + n + 1, P)   # entry i needs the row at position i - 1
                e = self.entry(rid, lambda: _Entry(f, P))
                if hi > lo:
                    rows.append(np.arange(first + lo - 1 - s, first + hi - 1 - s, dtype=np.int64))
                    targets.append(np.asarray(ids[lo:hi], dtype=np.int64))
                    owners.append((e, lo - f, hi - f))
            first += n
        self._step = (np.concatenate(rows), np.concatenate(targets), owners) if rows else None
        return self._step is not None

    def compute(self, hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], Optional[torch.Tensor]]) -> None:
        """The planned rows' log-probabilities from the step's final hidden states."""
        if self._step is None:
            return
        rows, targets, owners = self._step
        self._step = None
        if not isinstance(hidden, torch.Tensor):   # pragma: no cover - another model output layout
            return
        dev = hidden.device
        rows_t, tgt_t = torch.from_numpy(rows).to(dev), torch.from_numpy(targets).to(dev)
        parts = []
        for c in range(0, len(rows), CHUNK_ROWS):
            logits = compute_logits(hidden.index_select(0, rows_t[c:c + CHUNK_ROWS]))
            if logits is None:   # a tensor-parallel rank that does not hold the gathered logits
                return
            # vLLM's own log-softmax (Sampler.compute_logprobs): the values its prompt
            # log-probabilities give; faster here than logsumexp (31 vs 44 ms at 512 x 49 152)
            lp = logits.log_softmax(dim=-1, dtype=torch.float32)
            parts.append(lp.gather(1, tgt_t[c:c + CHUNK_ROWS, None])[:, 0])
        host = torch.cat(parts).to("cpu").numpy()
        at = 0
        for e, a, b in owners:
            e.values[a:b] = host[at:at + b - a]
            at += b - a

    def payload(self, entry) -> dict:
        return {"start": entry.start, "values": entry.values.tobytes()}


def to_scores(p: dict) -> np.ndarray:
    """A worker payload as the float32 array ``values[i - start]`` = log P(token i | tokens < i)
    (NaN where the row came from the prefix cache)."""
    return np.frombuffer(p["values"], dtype=np.float32).copy()


__all__ = ["SCORE_KEY", "RPC_TAKE_SCORES", "ScoreStore", "score_start", "to_scores"]
