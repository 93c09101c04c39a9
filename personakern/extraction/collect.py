"""Activation collection: per-sample means of every block's output, batched.

For each sample (system prompt, question, answer) the text is the chat template of
(system, question) with the generation prompt, followed by the answer's tokens (teacher-forced).
Three averages per decoder block (row ``l`` = output of block ``l``):

- ``response``: mean over the answer's tokens (the paper's persona vector),
- ``prompt``: mean over the prompt's tokens,
- ``last_prompt``: the last prompt token (what predicts the coming answer, used for monitoring).

Padding never enters a mean: samples are sorted by length, left-padded per batch, and each
block's output is reduced in the forward pass by one batched matmul with per-row weights
(``[B, 3, T] @ [B, T, D]``), so the ``[B, T, D]`` activations of all layers are never kept.
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..patching import find_decoder
from .generate import chat_ids, left_pad

KINDS = ("response", "prompt", "last_prompt")
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


@torch.no_grad()
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


def collect_means(model, tok, samples: Sequence[Sample], batch_size: int = 16, progress: bool = False,
                  max_tokens_per_batch: int = 8192) -> Dict[str, torch.Tensor]:
    """``{kind: float32 [N, num_layers, hidden]}`` for the kinds in :data:`KINDS` (on the CPU).

    Batches hold up to ``batch_size`` samples and ``max_tokens_per_batch`` padded tokens.
    Works on patched models too (the averages then include the handle's steering)."""
    layers = find_decoder(model).layers
    L = len(layers)
    D = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else model.config.hidden_size
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    toks = _tokenize(tok, samples)
    order = sorted(range(len(toks)), key=lambda i: len(toks[i][0]))
    out = torch.empty(len(KINDS), len(toks), L, D)
    batches = token_batches(order, lambda i: len(toks[i][0]), batch_size, max_tokens_per_batch)

    sink = {}

    def make_hook(l):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            sink[l] = torch.bmm(sink["w"], h.float())                 # [B, 3, D]
        return hook

    handles = [layer.register_forward_hook(make_hook(l)) for l, layer in enumerate(layers)]
    try:
        bar = tqdm(total=len(toks), desc="collecting activations", unit="answer", disable=not progress)
        for idx in batches:
            seqs = [toks[i][0] for i in idx]
            ids, mask = left_pad(seqs, pad_id, device)
            T = ids.shape[1]
            w = torch.zeros(len(idx), len(KINDS), T, device=device)
            for b, i in enumerate(idx):
                n, plen = len(toks[i][0]), toks[i][1]
                start = T - n
                w[b, 0, start + plen:] = 1.0 / (n - plen)
                w[b, 1, start:start + plen] = 1.0 / plen
                w[b, 2, start + plen - 1] = 1.0
            sink["w"] = w
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                  use_cache=False)
            res = torch.stack([sink[l] for l in range(L)], dim=2).cpu()   # [B, 3, L, D]
            out[:, idx] = res.transpose(0, 1)
            bar.update(len(idx))
        bar.close()
    finally:
        for h in handles:
            h.remove()
        sink.clear()
    return {k: out[j] for j, k in enumerate(KINDS)}


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
