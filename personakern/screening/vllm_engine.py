"""Screening on a vLLM engine: the base model's answers and the teacher-forced projections, the
same numbers as :mod:`.base_answers` and :func:`.project.project_sequences` on Hugging Face.

Projections: each ``(ids, prompt_len)`` sequence is one request whose prompt is the whole
sequence (``max_tokens=1``: the sampled token is never fed) with ``"capture": {"kinds":
["response", "last_prompt"], "layers": [...], "prompt_length": prompt_len}``: the engine averages
the answer's block outputs and keeps the last prompt token's while it runs the prefill, and only
those means come back. Base answers: one request per prompt, greedy or with the per-sample seed
``batch_seed(seed, key)`` (a resumed run draws the same answers); cached like the HF engine's.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ..extraction.generate import GenSettings, batch_seed, decode_answer, eos_ids
from ..utils import JsonlLog
from .project import project_means


def project_sequences_vllm(llm, seqs: Sequence[Tuple[List[int], int]], units: Dict[int, torch.Tensor]):
    """:func:`~personakern.screening.project.project_sequences` on ``llm`` (an engine started
    with capture, e.g. ``start_engine(model, capture=True)``)."""
    from vllm import SamplingParams, TokensPrompt
    from ..vllm import captured
    for ids, plen in seqs:
        if not 0 < plen < len(ids):
            raise ValueError("each sequence needs at least one prompt and one response token")
    order_l = sorted(units)
    M = sum(units[l].shape[0] for l in order_l)
    if not seqs:
        return torch.empty(0, M), torch.empty(0, M)
    params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args={"personakern": {
        "capture": {"kinds": ["response", "last_prompt"], "layers": order_l, "prompt_length": plen}}})
        for _, plen in seqs]
    outs = llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids, _ in seqs], params, use_tqdm=False)
    means = []
    for o in outs:
        got = captured(o)
        if got is None:
            raise RuntimeError("personakern: the vLLM engine returned no activations; start it with capture=True")
        means.append(got["means"])                                          # [Lc, 2, D]
    return project_means(torch.stack(means), units)                         # means [N, Lc, 2, D]


def base_answers_vllm(llm, tok, model, keys: Sequence[int], prompts: Sequence[List[int]], cache: JsonlLog,
                      settings: GenSettings, bar=None) -> Dict[int, str]:
    """:func:`~personakern.screening.base_answers.base_answers` on ``llm``: ``{key: answer}``."""
    from vllm import TokensPrompt
    from ..extraction.vllm_generate import sampling_params
    from ..vllm.nucleus import engine_has_nucleus
    done = {r["k"]: r["answer"] for r in cache}
    todo = [(k, p) for k, p in zip(keys, prompts) if k not in done]
    if todo:
        eos = eos_ids(model, tok)
        seeded = settings.temperature > 0
        nucleus = engine_has_nucleus(llm)
        params = [sampling_params(settings, eos, batch_seed(settings.seed, k) if seeded else None, None,
                                  nucleus=nucleus) for k, _ in todo]
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for _, p in todo], params, use_tqdm=False)
        new = [{"k": k, "answer": decode_answer(tok, o.outputs[0].token_ids, eos)} for (k, _), o in zip(todo, outs)]
        cache.append(new)
        done.update((r["k"], r["answer"]) for r in new)
    if bar is not None:
        bar.update(len(todo))
    return {k: done[k] for k in keys}
