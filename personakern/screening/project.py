"""Projections of teacher-forced (prompt, response) sequences on persona unit vectors.

The engine's capture (:mod:`personakern.state.capture`) gathers, at each block that carries a
trait's vector, the mean block output over the response tokens and the output at the last
prompt token; those are projected on the unit vectors (projection is linear, so the projection
of the mean activation is the mean of the projections). Blocks after the deepest such block are
skipped: they cannot change these values.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ..extraction.collect import capture_sequences


def chat_prompt_ids(tok, messages: Sequence[dict]) -> List[int]:
    return chat_prompts_ids(tok, [messages])[0]


def chat_prompts_ids(tok, conversations: Sequence[Sequence[dict]]) -> List[List[int]]:
    """Token ids of each conversation's chat template with the generation prompt (one
    tokenizer call for the lot: the fast tokenizer batches in Rust)."""
    texts = [tok.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in conversations]
    return texts_ids(tok, texts)


def texts_ids(tok, texts: Sequence[str]) -> List[List[int]]:
    return tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def project_sequences(model, seqs: Sequence[Tuple[List[int], int]], units: Dict[int, torch.Tensor],
                      batch_size: int = 16, max_tokens_per_batch: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each ``(ids, prompt_len)``: ``(response_mean [N, M], last_prompt [N, M])``.

    ``units`` maps a block index (0-based, the block's output) to ``[M_l, D]`` unit vectors;
    the ``M`` columns are the blocks' rows in ascending block order."""
    for ids, plen in seqs:
        if not 0 < plen < len(ids):
            raise ValueError("each sequence needs at least one prompt and one response token")
    order_l = sorted(units)
    if not seqs:
        M = sum(units[l].shape[0] for l in order_l)
        return torch.empty(0, M), torch.empty(0, M)
    pad_id = getattr(model.config, "pad_token_id", None)
    pad_id = 0 if pad_id is None or isinstance(pad_id, list) else pad_id
    means = capture_sequences(model, seqs, ("response", "last_prompt"), order_l, batch_size, max_tokens_per_batch,
                              pad_id, skip_rest=True)                          # [N, Lc, 2, D]
    return project_means(means, units)


def project_means(means: torch.Tensor, units: Dict[int, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[N, Lc, 2, D]`` response / last-prompt means at the blocks of ``units`` (ascending) as
    ``(response [N, M], last_prompt [N, M])`` projections on their unit vectors."""
    proj = [means[:, i] @ units[l].to(device='cpu', dtype=torch.float32).T for i, l in enumerate(sorted(units))]
    proj = torch.cat(proj, dim=-1)                                             # [N, 2, M]
    return proj[:, 0].contiguous(), proj[:, 1].contiguous()
