"""Top-p (nucleus) sampling without sorting the vocabulary: a vLLM logits processor for
personakern's own engines (the pipeline's generation: extract, screen, the sweep, monitoring).

vLLM 0.32 applies ``top_p`` on CPUs by sorting every row of the batch's logits over the whole
vocabulary (``apply_top_k_top_p_pytorch``): 110 requests x 49 152 logits take ~200 ms per decode
step on 2 cores, a third of the steering sweep's generation. The nucleus of a top-p of 0.95 is
almost always a few dozen tokens, so :func:`nucleus_mask_` finds it with a ``topk`` of
:data:`FIRST_K` (~5 ms for the same batch) and widens the ``topk`` only for the rows whose
nucleus is larger (the whole row sorted as the last resort).

Same definition as vLLM's and Hugging Face's top-p: after temperature (and penalties), with
``q`` the row's softmax, token ``j`` is kept unless the probability of the tokens ranked below it,
``j`` included, is at most ``1 - p``; the most likely token is always kept. Equivalently: ``j`` is
kept iff the mass ranked strictly above it is below ``p`` (the same up to float32 rounding of the
two sums, ~1e-6: a row whose boundary token sits that close to the threshold may keep one token
more or less; ties at the boundary are all kept). A request asks for it with
``SamplingParams(top_p=1.0, extra_args={"personakern_top_p": p})``, which
:func:`sampling_kwargs` builds, on an engine started with ``logits_processors=[FQCN]``
(:func:`engine_has_nucleus`). Requests without the key are untouched.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

#: the SamplingParams.extra_args key a request's top-p travels under
KEY = "personakern_top_p"
#: the processor's fully qualified class name, for ``LLM(logits_processors=[FQCN])``
FQCN = "personakern.vllm.nucleus:NucleusProcessor"
#: the first ``topk`` per row; rows whose nucleus is larger get ``WIDEN`` times more, then all
FIRST_K = 64
WIDEN = 16


def check_top_p(p) -> float:
    """``p`` as a float in (0, 1], or ValueError."""
    try:
        f = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"{KEY} must be a number in (0, 1], got {p!r}") from None
    if not 0.0 < f <= 1.0:   # also refuses NaN
        raise ValueError(f"{KEY} must be in (0, 1], got {p!r}")
    return f


def nucleus_mask_(logits: torch.Tensor, rows: torch.Tensor, top_p: torch.Tensor,
                  first_k: int = FIRST_K) -> torch.Tensor:
    """Set to ``-inf``, in place, the logits of ``logits[rows]`` (``[B, V]`` float32, after
    temperature) outside each row's nucleus of mass ``top_p`` (``[len(rows)]``); returns
    ``logits``. Rows not in ``rows`` are left alone."""
    if rows.numel() == 0:
        return logits
    x = logits.index_select(0, rows)                                   # [R, V]
    V = x.shape[1]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    p = top_p.to(x.dtype).unsqueeze(1)
    threshold = torch.empty(x.shape[0], 1, dtype=x.dtype, device=x.device)
    todo = torch.arange(x.shape[0], device=x.device)
    k = min(first_k, V)
    while todo.numel():
        sub = x.index_select(0, todo)
        vals = sub.topk(k, dim=-1).values if k < V else sub.sort(dim=-1, descending=True).values
        q = (vals - lse.index_select(0, todo)).exp()
        above = q.cumsum(dim=-1) - q                                  # mass ranked above each token
        keep = (above < p.index_select(0, todo)).sum(dim=-1)         # >= 1: the first token's is 0
        found = (keep < k) | (k >= V)
        idx = todo[found]
        threshold[idx] = vals[found].gather(1, (keep[found] - 1).clamp(min=0).unsqueeze(1))
        todo = todo[~found]
        k = min(k * WIDEN, V)
    x.masked_fill_(x < threshold, float("-inf"))
    return logits.index_copy_(0, rows, x)


def sampling_kwargs(top_p: float, nucleus: bool) -> dict:
    """``SamplingParams`` keywords for a top-p of ``top_p``: vLLM's own ``top_p``, or (``nucleus``:
    the engine has :class:`NucleusProcessor`) ``top_p=1.0`` and the processor's extra arg."""
    p = check_top_p(top_p)
    if not nucleus or p >= 1.0:
        return {"top_p": p}
    return {"top_p": 1.0, "extra_args": {KEY: p}}


def engine_has_nucleus(llm) -> bool:
    """Whether the engine ``llm`` was started with :data:`FQCN` among its logits processors."""
    try:
        procs = llm.llm_engine.vllm_config.model_config.logits_processors or ()
    except AttributeError:
        return False
    return any(p == FQCN or getattr(p, "__name__", None) == "NucleusProcessor" for p in procs)


try:   # the processor itself needs vLLM; the function above does not
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
except ImportError:   # pragma: no cover - vLLM absent: nothing can load the processor anyway
    LogitsProcessor = object


class NucleusProcessor(LogitsProcessor):
    """vLLM's logits processor for :data:`KEY`: argmax-invariant, so vLLM applies it after
    temperature and penalties, where its own top-p would run."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self._p: Dict[int, float] = {}   # batch row -> top-p
        self._rows: Optional[tuple] = None   # (rows, top-p) tensors, rebuilt after a batch change

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        extra = getattr(sampling_params, "extra_args", None) or {}
        if KEY in extra:
            check_top_p(extra[KEY])

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: "Optional[BatchUpdate]") -> None:
        if not batch_update:
            return
        p = self._p
        for index in batch_update.removed:
            p.pop(index, None)
        for index, params, _, _ in batch_update.added:
            extra = getattr(params, "extra_args", None) or {}
            if KEY in extra and float(extra[KEY]) < 1.0:
                p[index] = float(extra[KEY])
            else:
                p.pop(index, None)
        for a, b, direction in batch_update.moved:
            pa, pb = p.pop(a, None), p.pop(b, None)
            if pa is not None:
                p[b] = pa
            if direction == MoveDirectionality.SWAP and pb is not None:
                p[a] = pb
        self._rows = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._p:
            return logits
        if self._rows is None:
            order = sorted(self._p)
            self._rows = (torch.tensor(order, dtype=torch.long, device=logits.device),
                          torch.tensor([self._p[i] for i in order], dtype=torch.float32, device=logits.device))
        rows, top_p = self._rows
        return nucleus_mask_(logits, rows, top_p)
