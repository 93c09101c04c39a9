"""The engine's capture facility: per-row running sums of block outputs over token masks.

Every block's output passes through the fused op (``PersonaState.block_output``); right after it,
one batched matmul ``[B, K, T] @ [B, T, D]`` adds the forward's tokens to ``[B, L, K, D]``
float32 sums, one row of weights per mask kind:

- ``response``: tokens after the prompt (left padding excluded); while generating, only up to
  (not including) a row's first end-of-sequence token and at most ``limit`` answer tokens,
- ``prompt``: the prompt's tokens,
- ``last_prompt``: the prompt's last token (what predicts the coming answer).

Means are sums over counts, so a response mean needs no stored tokens, whether the sequence
is one teacher-forced forward or a prefill and many decode steps. The masks come from the
sequence's prompt ends and the forward's columns (:mod:`personakern.sequence`); a column is
added once per sequence even if a forward re-feeds it (``use_cache=False``). Everything is
torch ops on tensors allocated when a sequence starts: no host sync in the forward.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

KINDS = ("response", "prompt", "last_prompt")


class Capture:
    """What one capture gathers: ``kinds`` (a subset of :data:`KINDS`, in the order given) at
    ``layers`` (block indices; default all). ``eos`` (token ids) and ``limit`` bound the response
    of a generated answer. ``skip_rest=True``: blocks after the deepest captured one are skipped
    (their output is their input), for captures that read no logits."""

    def __init__(self, num_layers: int, device: torch.device, kinds: Sequence[str] = KINDS,
                 layers: Optional[Iterable[int]] = None, eos: Optional[Iterable[int]] = None,
                 limit: Optional[int] = None, skip_rest: bool = False):
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"capture kinds must be distinct names from {KINDS}, got {list(kinds)}")
        self.kinds = tuple(kinds)
        self.layers = sorted({int(l) for l in (range(num_layers) if layers is None else layers)})
        if not self.layers or not all(0 <= l < num_layers for l in self.layers):
            raise ValueError(f"capture layers must be in [0, {num_layers - 1}], got {self.layers}")
        self.slot = [-1] * num_layers      # layer -> index in the sums
        for i, l in enumerate(self.layers):
            self.slot[l] = i
        self.skip_after = self.layers[-1] if skip_rest else num_layers
        self.device = device
        self.eos = None if eos is None else torch.tensor(sorted(set(eos)), dtype=torch.long, device=device)
        self.limit = limit
        self.sums: Optional[Tensor] = None      # [B, Lc, K, D] float32
        self.counts: Optional[Tensor] = None    # [B, K] float32: tokens summed per row and kind
        self.finished: Optional[Tensor] = None  # [B] bool: the answer has ended (EOS seen)
        self.weights: Optional[Tensor] = None   # [B, K, T] this forward's masks
        self.covered = 0                        # columns of this sequence already summed

    def begin_forward(self, fresh: bool, batch: int, past: int, seqlen: int, hidden_size: int,
                      real: Tensor, is_prompt: Tensor, prompt_end: Tensor, input_ids: Optional[Tensor]) -> None:
        if self.eos is not None and input_ids is None:
            raise RuntimeError("capturing a generated answer needs input_ids (not inputs_embeds) to see "
                               "where it ends")
        if fresh or self.sums is None or self.sums.shape[0] != batch:
            self.sums = torch.zeros(batch, len(self.layers), len(self.kinds), hidden_size, device=self.device)
            self.counts = torch.zeros(batch, len(self.kinds), device=self.device)
            self.finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
            self.covered = 0
        columns = torch.arange(past, past + seqlen, device=self.device)
        new = columns >= self.covered                                   # re-fed columns count once
        self.covered = max(self.covered, past + seqlen)
        response = real & ~is_prompt
        if self.limit is not None:
            response &= columns[None, :] < prompt_end[:, None] + self.limit
        if self.eos is not None:
            hit = torch.isin(input_ids.to(self.device), self.eos) & response & new[None, :]
            ended = self.finished[:, None] | (hit.cumsum(1) > 0)      # the EOS itself is not answer
            response &= ~ended
            self.finished = ended[:, -1]
        masks = {"response": response, "prompt": real & is_prompt,
                 "last_prompt": columns[None, :] == (prompt_end - 1)[:, None]}
        self.weights = torch.stack([masks[k] & new[None, :] for k in self.kinds], dim=1).float()
        self.counts += self.weights.sum(-1)

    def add(self, layer: int, out: Tensor) -> None:
        """Block ``layer``'s output ``[B, T, D]`` into the sums (called right after the fused op)."""
        i = self.slot[layer]
        if i >= 0:
            self.sums[:, i].add_(torch.bmm(self.weights, out.detach().float()))

    def means(self) -> Tensor:
        """``[B, Lc, K, D]`` float32 on the model's device: sums over counts (zeros where a row
        has no token of a kind, e.g. an empty answer)."""
        if self.sums is None:
            raise RuntimeError("nothing captured: no forward ran inside the capture")
        return self.sums / self.counts.clamp_min(1)[:, None, :, None]
