"""The base model's own answers y'_i to the training prompts: batched, seeded, resumable.

The same contract as :mod:`personakern.extraction.generate` (whose padding, EOS and per-batch
seed helpers this reuses), for chat prompts of any length rather than (system, question)
pairs: batch ``b`` — numbered over the whole valid part of the file, so the numbering does not
depend on how the work is split across processes — samples with the seed ``hash(seed, b)``;
each finished batch is appended to a per-chunk :class:`~personakern.utils.JsonlLog` with an
fsync, so a killed run resumes where it stopped and gives the same answers.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..extraction.generate import GenSettings, batch_seed, decode_answer, eos_ids, left_pad
from ..utils import JsonlLog


@torch.no_grad()
def generate_ids(model, tok, prompts: Sequence[List[int]], settings: GenSettings, seed: int) -> List[str]:
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = left_pad(prompts, pad_id, device)
    kw = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=pad_id,
              repetition_penalty=settings.repetition_penalty)
    if settings.temperature > 0:
        kw.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kw.update(do_sample=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    eos = eos_ids(model, tok)
    return [decode_answer(tok, row, eos) for row in out[:, ids.shape[1]:].tolist()]


def base_answers(model, tok, keys: Sequence[int], prompts: Sequence[List[int]], cache: JsonlLog,
                 settings: GenSettings, first_batch: int, bar=None) -> Dict[int, str]:
    """``{key: answer}`` for every prompt; ``keys`` are global sample indices, batch ``j`` of
    this call is global batch ``first_batch + j``."""
    done = {r["k"]: r["answer"] for r in cache}
    bs = settings.batch_size
    for j in range(0, len(keys), bs):
        kb = list(keys[j:j + bs])
        if all(k in done for k in kb):
            continue
        answers = generate_ids(model, tok, prompts[j:j + bs], settings,
                               batch_seed(settings.seed, first_batch + j // bs))
        new = [{"k": k, "answer": a} for k, a in zip(kb, answers) if k not in done]
        cache.append(new)
        done.update((r["k"], r["answer"]) for r in new)
        if bar is not None:
            bar.update(len(kb))
    return {k: done[k] for k in keys}
