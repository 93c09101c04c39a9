"""Collect activation means *while* ``generate()`` runs, so extraction needs no second pass.

Generating an answer already computes every block's output at every prompt token (prefill) and
at every answer token as it is fed back (decode steps). :class:`GenerationCapture` reduces them
on the fly into the same three per-answer averages as
:func:`personakern.extraction.collect.collect_means` (``response``, ``prompt``,
``last_prompt``): the prefill is reduced with per-row weights (left padding excluded), and each
decode step adds the fed token's block outputs to a running sum for rows still answering. The
last answer token is fed only if one more step runs, so callers generate ``max_new_tokens + 1``
tokens and keep the first ``max_new_tokens`` (sampling is sequential, so those are the same
tokens a ``max_new_tokens`` run samples).

What is averaged are the generated token ids up to (not including) the first EOS — the exact
tokens of the answer, where a teacher-forced pass would re-tokenize the decoded text (almost
always the same ids). KV-cached decoding matches a full forward to float rounding (tested).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..patching import find_decoder


class GenerationCapture:
    """Context manager: hooks the decoder blocks of ``model`` for one ``generate`` call.

    ``limit`` = number of answer tokens to count (``max_new_tokens`` of the caller);
    ``eos`` = token ids that end an answer; ``attention_mask`` = the prompt batch's mask.
    After the call, :meth:`means` gives ``[B, 3, L, D]`` float32 (kinds in KINDS order) and
    :attr:`counts` the answer tokens averaged per row.
    """

    def __init__(self, model, attention_mask: torch.Tensor, eos: Iterable[int], limit: int):
        self.model = model
        self.layers = find_decoder(model).layers
        self.mask = attention_mask
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long, device=attention_mask.device)
        self.limit = limit
        B = attention_mask.shape[0]
        self.step = 0
        self.finished = torch.zeros(B, dtype=torch.bool, device=attention_mask.device)
        self.active: Optional[torch.Tensor] = None
        self.weights: Optional[torch.Tensor] = None
        self.prompt_parts = [None] * len(self.layers)   # [B, 2, D] per layer
        self.response_sum = [None] * len(self.layers)   # [B, D] per layer
        self.counts = torch.zeros(B, device=attention_mask.device)
        self._handles = []

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RuntimeError("GenerationCapture needs input_ids (not inputs_embeds)")
        if self.step == 0:
            T = ids.shape[1]
            m = self.mask.to(torch.float32)
            if m.shape[1] != T:
                raise RuntimeError(f"prefill has {T} columns but the attention mask {m.shape[1]}")
            w = torch.zeros(ids.shape[0], 2, T, device=ids.device)
            w[:, 0] = m / m.sum(-1, keepdim=True).clamp_min(1)
            w[:, 1, -1] = 1.0                                  # left padding: last column is the last prompt token
            self.weights = w
        else:
            tok = ids[:, -1]
            self.finished |= torch.isin(tok, self.eos)
            self.active = (~self.finished) & (self.step - 1 < self.limit)
            self.counts += self.active.float()
        self.step += 1

    def _hook(self, l):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if self.active is None:                            # prefill
                self.prompt_parts[l] = torch.bmm(self.weights, h.float())
            else:
                add = h[:, -1].float() * self.active[:, None].float()
                self.response_sum[l] = add if self.response_sum[l] is None else self.response_sum[l] + add
        return hook

    def __enter__(self):
        self._handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
        self._handles += [layer.register_forward_hook(self._hook(l)) for l, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def means(self) -> torch.Tensor:
        """``[B, 3, L, D]``: response mean (zeros for an empty answer), prompt mean, last prompt token."""
        pp = torch.stack(self.prompt_parts, dim=2)                      # [B, 2, L, D]
        if self.response_sum[0] is None:
            resp = torch.zeros_like(pp[:, 0])
        else:
            resp = torch.stack(self.response_sum, dim=1) / self.counts.clamp_min(1)[:, None, None]
        return torch.cat([resp[:, None], pp], dim=1).cpu()
