"""Fine-tuning shift (docs/design.md#the-method, step 7): how far fine-tuning moved the model
along each persona vector.

``shift_l = (mean_p h_l^ft(p) - mean_p h_l^base(p)) · v_hat_l`` where ``h_l(p)`` is block
``l``'s output at the last token of prompt ``p`` (chat template with the generation prompt,
i.e. just before the answer would start). Positive: the fine-tuned model leans toward the
trait before it says anything. Prompts are split round robin across ranks; each rank sums its
rows and the sums are added (:func:`personakern.distributed.all_sum`), so the result does not
depend on the number of processes (up to float summation order).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from .. import distributed as dist
from ..extraction.collect import capture_sequences
from ..patching import find_decoder
from ..vectors import HARD_FIELDS, VectorSet, model_fingerprint
from .project import chat_prompt_ids


class ShiftError(ValueError):
    pass


def last_prompt_sum(model, tok, prompts: Sequence[List[dict]], batch_size: int = 16,
                    progress: bool = False) -> torch.Tensor:
    """Sum over ``prompts`` of every block's output at the last prompt token, ``[L, D]`` float64,
    gathered by the engine's capture."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = [(ids, len(ids)) for ids in (chat_prompt_ids(tok, p) for p in prompts)]
    last = capture_sequences(model, seqs, ("last_prompt",), batch_size=batch_size, max_tokens_per_batch=1 << 62,
                             pad_id=pad_id, progress=progress, desc="last-prompt activations")
    return last[:, :, 0].double().sum(0)


def check_same_architecture(a, b, name_a: str = "base", name_b: str = "finetuned") -> None:
    fa, fb = model_fingerprint(a), model_fingerprint(b)
    bad = [f"{k}: {name_a} has {fa.get(k)!r}, {name_b} has {fb.get(k)!r}" for k in HARD_FIELDS if fa.get(k) != fb.get(k)]
    if bad:
        raise ShiftError(f"{name_a} and {name_b} are not the same architecture ({'; '.join(bad)}); a fine-tuning "
                         f"shift compares a model with a fine-tune of it")


def mean_last_prompt(model, tok, prompts: Sequence[List[dict]], batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """Mean last-prompt-token activation ``[L, D]`` over ``prompts``, computed on this rank's
    share (prompt ``i`` on rank ``i % world``) and summed over ranks."""
    mine = [prompts[i] for i in dist.my_indices(len(prompts))]
    s = last_prompt_sum(model, tok, mine, batch_size, progress) if mine else None
    if s is None:
        L = len(find_decoder(model).layers)
        s = torch.zeros(L, model.get_input_embeddings().weight.shape[1], dtype=torch.float64)
    return dist.all_sum(s) / len(prompts)


def project_shift(diff: torch.Tensor, vectors: VectorSet, traits: Sequence[str]) -> Dict[str, List[float]]:
    """Per trait, ``diff[l] · v_hat_l`` for every block ``l`` (None where the vector is zero, as
    in imported control vectors that leave blocks out)."""
    out = {}
    for t in traits:
        v = vectors[t].vectors.double()
        if diff.shape != v.shape:
            raise ShiftError(f"trait {t!r}: vectors are {list(v.shape)}, the models' activations {list(diff.shape)}")
        norms = v.norm(dim=1)
        out[t] = [None if n == 0 else x for x, n in zip(((diff * v).sum(1) / norms).tolist(), norms.tolist())]
    return out


def default_prompts(traits: Sequence[str]) -> List[List[dict]]:
    """The evaluation questions of the traits' built-in specs (each question once)."""
    from ..extraction.spec import load_spec
    seen, out = set(), []
    for t in traits:
        try:
            qs = load_spec(t).eval_questions
        except Exception as e:
            raise ShiftError(f"trait {t!r} has no built-in spec to take evaluation questions from ({e}); "
                             f"pass --questions FILE") from None
        for q in qs:
            if q not in seen:
                seen.add(q)
                out.append([{"role": "user", "content": q}])
    return out


def read_prompts(path) -> List[List[dict]]:
    """A questions file: JSONL (``question``, ``prompt`` or ``messages`` per line) or plain
    text, one question per line. Empty lines are ignored; anything else unreadable is an error."""
    path = Path(path)
    if not path.is_file():
        raise ShiftError(f"{path}: file not found")
    out = []
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of line 1
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ShiftError(f"{path}:{n}: not valid JSON ({e})") from None
                if isinstance(rec.get("messages"), list) and rec["messages"]:
                    msgs = rec["messages"]
                    if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in msgs):
                        raise ShiftError(f"{path}:{n}: each message must be an object with string 'role' "
                                         f"and 'content'")
                    if msgs[-1]["role"] == "assistant":
                        msgs = msgs[:-1]
                    if not msgs:
                        raise ShiftError(f"{path}:{n}: no prompt before the assistant's message")
                    out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
                elif isinstance(rec.get("question", rec.get("prompt")), str):
                    out.append([{"role": "user", "content": rec.get("question", rec.get("prompt"))}])
                else:
                    raise ShiftError(f"{path}:{n}: expected a 'question', 'prompt' or 'messages' field")
            else:
                out.append([{"role": "user", "content": line}])
    if not out:
        raise ShiftError(f"{path}: no questions")
    return out


def fine_tuning_shift(base, finetuned, vectors: VectorSet, prompts: Sequence[List[dict]], traits=None,
                      batch_size: int = 16, progress: bool = False) -> dict:
    """``base`` / ``finetuned``: ``(model, tokenizer)`` pairs. Returns per-trait shifts at
    every block and at the trait's recommended block."""
    if batch_size < 1:
        raise ShiftError(f"batch_size must be at least 1, got {batch_size}")
    (mb, tb), (mf, tf) = base, finetuned
    check_same_architecture(mb, mf)
    traits = list(traits) if traits else vectors.traits
    for t in traits:
        if t not in vectors:
            raise ShiftError(f"no trait {t!r} in the vector file; it has {', '.join(vectors.traits)}")
    if not prompts:
        raise ShiftError("no prompts")
    a = mean_last_prompt(mb, tb, prompts, batch_size, progress)
    b = mean_last_prompt(mf, tf, prompts, batch_size, progress)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("non-finite activations (NaN/Inf) from one of the models")
    shift = project_shift(b - a, vectors, traits)
    pa, pb = project_shift(a, vectors, traits), project_shift(b, vectors, traits)
    res = {"prompts": len(prompts), "traits": {}}
    for t in traits:
        l = vectors[t].meta.get("layer")
        res["traits"][t] = {"layer": l, "shift": None if l is None else shift[t][int(l)],
                            "base_projection": None if l is None else pa[t][int(l)],
                            "finetuned_projection": None if l is None else pb[t][int(l)],
                            "per_layer": shift[t]}
    return res
