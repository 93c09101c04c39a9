"""Activation collection: per-sample means of every block's output, batched.

For each sample (system prompt, question, answer) the text is the chat template of
(system, question) with the generation prompt, followed by the answer's tokens (teacher-forced).
Three averages per decoder block (row ``l`` = output of block ``l``):

- ``response``: mean over the answer's tokens (the paper's persona vector),
- ``prompt``: mean over the prompt's tokens,
- ``last_prompt``: the last prompt token (what predicts the coming answer, used for monitoring).

Padding never enters a mean: samples are sorted by length, left-padded per batch, and the
engine's capture (:mod:`personakern.state.capture`) sums each block's output over per-row token
masks inside the forward, so the ``[B, T, D]`` activations of all layers are never kept.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..handle import engine
from ..state import KINDS
from .generate import chat_ids, left_pad

Sample = Tuple[str, str, str]  # (system or "", question, answer)


def _tokenize(tok, samples: Sequence[Sample]) -> List[Tuple[List[int], int]]:
    out = []
    for s, q, a in samples:
        p = chat_ids(tok, s or None, q)
        r = tok(a, add_special_tokens=False)["input_ids"]
        if not r:
            raise ValueError(f"empty answer to {q!r}: no response tokens to average")
        out.append((p + r, len(p)))
    return out


def token_batches(order: Sequence[int], width, batch_size: int, max_tokens_per_batch: int) -> List[List[int]]:
    """Cut ``order`` (indices, shortest first) into batches of at most ``batch_size`` rows whose
    padded size (rows x the widest row, ``width(i)``) stays within ``max_tokens_per_batch``."""
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) >= batch_size or width(i) * (len(cur) + 1) > max_tokens_per_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def capture_sequences(model, seqs: Sequence[Tuple[List[int], int]], kinds: Sequence[str] = KINDS,
                      layers: Optional[Sequence[int]] = None, batch_size: int = 16,
                      max_tokens_per_batch: int = 8192, pad_id: int = 0, skip_rest: bool = False,
                      progress: bool = False, desc: str = "collecting activations") -> torch.Tensor:
    """Teacher-forced ``(ids, prompt_len)`` sequences through the engine's capture:
    ``[N, len(layers), len(kinds), D]`` float32 means on the CPU, in the order of ``seqs``
    (``layers`` default: every block). Sequences are sorted by length and batched by
    :func:`token_batches`; the model's steering, if it is patched, applies. ``skip_rest``: no
    block after the deepest captured one runs."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    batches = token_batches(order, lambda i: len(seqs[i][0]), batch_size, max_tokens_per_batch)
    out = None
    with engine(model) as handle, handle.capture(kinds, "all" if layers is None else layers,
                                                 skip_rest=skip_rest) as cap:
        bar = tqdm(total=len(seqs), desc=desc, unit="answer", disable=not progress)
        for idx in batches:
            ids, mask = left_pad([seqs[i][0] for i in idx], pad_id, device)
            T = ids.shape[1]
            handle.new_sequence(torch.tensor([T - len(seqs[i][0]) + seqs[i][1] for i in idx]))
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                  use_cache=False, logits_to_keep=1)
            means = cap.means().cpu()
            if out is None:
                out = means.new_empty((len(seqs),) + tuple(means.shape[1:]))
            out[idx] = means
            bar.update(len(idx))
        bar.close()
    return out


def collect_means(model, tok, samples: Sequence[Sample], batch_size: int = 16, progress: bool = False,
                  max_tokens_per_batch: int = 8192) -> Dict[str, torch.Tensor]:
    """``{kind: float32 [N, num_layers, hidden]}`` for the kinds in :data:`KINDS` (on the CPU).

    Batches hold up to ``batch_size`` samples and ``max_tokens_per_batch`` padded tokens.
    Works on patched models too (the averages then include the handle's steering)."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    means = capture_sequences(model, _tokenize(tok, samples), KINDS, None, batch_size, max_tokens_per_batch,
                              pad_id, progress=progress)
    return {k: means[:, :, j].contiguous() for j, k in enumerate(KINDS)}


@torch.no_grad()
def collect_one_at_a_time(model, tok, samples: Sequence[Sample]) -> torch.Tensor:
    """The reference implementation's way, for the throughput comparison: one forward per
    sample with ``output_hidden_states=True``, then each layer's response mean copied to the
    host. Returns ``[N, num_layers, hidden]`` response means. (HF's last hidden state is
    post-final-norm, so the last row differs from :func:`collect_means` by design.)"""
    device = next(model.parameters()).device
    rows = []
    for ids, plen in _tokenize(tok, samples):
        out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True)
        rows.append(torch.stack([h[0, plen:].float().mean(0).cpu() for h in out.hidden_states[1:]]))
    return torch.stack(rows)


def throughput(model, tok, samples: Sequence[Sample], batch_size: int = 16, rounds: int = 3) -> dict:
    """answers/s of :func:`collect_means` vs :func:`collect_one_at_a_time` on the same answers,
    rounds interleaved, medians reported."""
    batched, single = [], []
    collect_means(model, tok, samples[:2], batch_size)  # warm-up
    for _ in range(rounds):
        t0 = time.perf_counter()
        collect_means(model, tok, samples, batch_size)
        batched.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        collect_one_at_a_time(model, tok, samples)
        single.append(time.perf_counter() - t0)
    med = lambda xs: sorted(xs)[len(xs) // 2]
    n = len(samples)
    return {"answers": n, "batch_size": batch_size, "rounds": rounds,
            "batched_answers_per_s": n / med(batched), "one_at_a_time_answers_per_s": n / med(single),
            "speedup": med(single) / med(batched), "batched_s": batched, "one_at_a_time_s": single}
