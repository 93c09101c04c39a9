"""Projections of teacher-forced (prompt, response) sequences on persona unit vectors.

Only what screening needs leaves the forward pass: at each block that carries a trait's
vector, the per-token projections ``h @ u`` (``[B, T, M]``), reduced at once to the mean over
the response tokens and the value at the last prompt token (projection is linear, so the
projection of the mean activation is the mean of the projections). The forward stops after
the deepest such block: later blocks cannot change these values.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ..extraction.collect import token_batches
from ..extraction.generate import left_pad
from ..patching import find_decoder


class _Done(Exception):
    pass


def chat_prompt_ids(tok, messages: Sequence[dict]) -> List[int]:
    return chat_prompts_ids(tok, [messages])[0]


def chat_prompts_ids(tok, conversations: Sequence[Sequence[dict]]) -> List[List[int]]:
    """Token ids of each conversation's chat template with the generation prompt (one
    tokenizer call for the lot: the fast tokenizer batches in Rust)."""
    texts = [tok.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True) for m in conversations]
    return texts_ids(tok, texts)


def texts_ids(tok, texts: Sequence[str]) -> List[List[int]]:
    return tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []


@torch.no_grad()
def project_sequences(model, seqs: Sequence[Tuple[List[int], int]], units: Dict[int, torch.Tensor],
                      batch_size: int = 16, max_tokens_per_batch: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
    """For each ``(ids, prompt_len)``: ``(response_mean [N, M], last_prompt [N, M])``.

    ``units`` maps a block index (0-based, the block's output) to ``[M_l, D]`` unit vectors;
    the ``M`` columns are the blocks' rows in ascending block order."""
    layers = find_decoder(model).layers
    order_l = sorted(units)
    cols, start = {}, 0
    for l in order_l:
        cols[l] = (start, start + units[l].shape[0])
        start += units[l].shape[0]
    M = start
    device = next(model.parameters()).device
    U = {l: units[l].to(device=device, dtype=torch.float32) for l in order_l}
    pad_id = getattr(model.config, "pad_token_id", None)
    pad_id = 0 if pad_id is None or isinstance(pad_id, list) else pad_id
    resp = torch.full((len(seqs), M), float("nan"))
    last = torch.full((len(seqs), M), float("nan"))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    batches = token_batches(order, lambda i: len(seqs[i][0]), batch_size, max_tokens_per_batch)
    sink = {}

    def make_hook(l):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            p = h.float() @ U[l].T                                  # [B, T, M_l]
            sink[l] = torch.bmm(sink["w"], p)                        # [B, 2, M_l]
            if l == order_l[-1]:
                raise _Done
        return hook

    handles = [layers[l].register_forward_hook(make_hook(l)) for l in order_l]
    try:
        for idx in batches:
            ids, mask = left_pad([seqs[i][0] for i in idx], pad_id, device)
            T = ids.shape[1]
            w = torch.zeros(len(idx), 2, T, device=device)
            for b, i in enumerate(idx):
                n, plen = len(seqs[i][0]), seqs[i][1]
                if not 0 < plen < n:
                    raise ValueError("each sequence needs at least one prompt and one response token")
                s = T - n
                w[b, 0, s + plen:] = 1.0 / (n - plen)
                w[b, 1, s + plen - 1] = 1.0
            sink["w"] = w
            try:
                model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                      use_cache=False)
            except _Done:
                pass
            for l in order_l:
                a, b_ = cols[l]
                r = sink[l].cpu()
                resp[idx, a:b_] = r[:, 0]
                last[idx, a:b_] = r[:, 1]
    finally:
        for h in handles:
            h.remove()
        sink.clear()
    return resp, last
