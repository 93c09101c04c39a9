"""A first persona vector without the full pipeline.

The model answers a set of questions under contrasting system prompts (trait-eliciting vs.
trait-suppressing); the vector is the per-layer difference of the mean block outputs over the
*response* tokens (positive minus negative). No judge filters the answers, so it is cruder than
the paper's pipeline, but it is real and cheap: a few minutes on a CPU for SmolLM2-135M.

Layer convention: row ``l`` of a vector is for the output of decoder block ``l`` (0-based).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..vectors import PersonaVector, VectorFileError, VectorSet, model_fingerprint
from .collect import capture_sequences
from .generate import decode_answer, eos_ids, left_pad

DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TRAIT = "evil"
LAYER_START, LAYER_FRAC = 0.25, 0.45  # see choose_layer
Sample = tuple  # (system, question, answer)


def load_trait(spec: Union[str, dict] = DEFAULT_TRAIT) -> dict:
    """A trait definition as ``{trait, description, positive, negative, questions}``: a built-in
    name or path of a trait spec (see :mod:`personakern.extraction.spec`; its extraction
    questions are used), or a dict with ``trait``, ``positive`` and ``negative`` (system prompts)
    and ``questions``."""
    if not (isinstance(spec, dict) and "trait" in spec):
        from .spec import load_spec
        ts = load_spec(spec)
        return {"trait": ts.name, "description": ts.description, "positive": ts.positive,
                "negative": ts.negative, "questions": list(ts.questions)}
    d = dict(spec)
    for key in ("trait", "positive", "negative", "questions"):
        if not d.get(key):
            raise ValueError(f"trait definition needs a non-empty {key!r}")
    return d


def _prompt_ids(tok, system: str, question: str) -> list:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _answer_ids(tok, answer: str) -> list:
    return tok(answer, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_contrastive(model, tok, trait_spec: Union[str, dict] = DEFAULT_TRAIT, n_per_question: int = 1,
                         max_new_tokens: int = 48, batch_size: int = 16, seed: int = 0, progress: bool = True,
                         temperature: float = 1.0, top_p: float = 0.95) -> tuple:
    """Sample the model's answers under each positive and each negative system prompt.

    Question ``i``'s ``k``-th sample uses prompt ``(i + k) % len(prompts)`` (round-robin), so
    every prompt is used about equally. Returns ``(positive, negative)``: lists of
    ``(system, question, answer)``. Answers that come back empty are dropped.
    """
    spec = load_trait(trait_spec)
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = eos_ids(model, tok)
    sides = []
    for side in ("positive", "negative"):
        prompts = spec[side]
        jobs = [(prompts[(i + k) % len(prompts)], q)
                for k in range(n_per_question) for i, q in enumerate(spec["questions"])]
        out = []
        for b, start in enumerate(tqdm(range(0, len(jobs), batch_size), desc=f"{spec['trait']} {side}",
                                       disable=not progress, unit="batch")):
            batch = jobs[start:start + batch_size]
            ids, mask = left_pad([_prompt_ids(tok, s, q) for s, q in batch], pad_id, device)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed * 1_000_003 + b * 2 + (side == "negative"))
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0,
                                     temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad_id)
            for (s, q), row in zip(batch, gen[:, ids.shape[1]:].tolist()):
                answer = decode_answer(tok, row, eos)
                if answer:
                    out.append((s, q, answer))
        sides.append(out)
    return sides[0], sides[1]


def response_mean_activations(model, tok, samples: Sequence[Sample], batch_size: int = 16) -> torch.Tensor:
    """``[num_samples, num_layers, hidden]`` float32: each decoder block's output averaged over
    the response tokens of chat-template(system, question) + answer (teacher-forced; prompt and
    padding excluded), by the engine's capture (exact for every layer, and including any
    steering the model's personakern handle applies)."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = []
    for s, q, a in samples:
        p, r = _prompt_ids(tok, s, q), _answer_ids(tok, a)
        if not r:
            raise ValueError(f"empty answer for question {q!r}: no response tokens to average")
        seqs.append((p + r, len(p)))
    return capture_sequences(model, seqs, ("response",), batch_size=batch_size, pad_id=pad_id)[:, :, 0].contiguous()


def _auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties count one half."""
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def choose_layer(acts_pos: torch.Tensor, acts_neg: torch.Tensor, held_pos: torch.Tensor,
                 held_neg: torch.Tensor, start: float = LAYER_START, frac: float = LAYER_FRAC) -> tuple:
    """Steering layer from a held-out split: the vector comes from the training split, the
    held-out response means are projected on it, and each layer gets a held-out AUROC and a
    separation ``d' = (mean_pos - mean_neg) / pooled std``. The choice is the *earliest* layer at
    or after ``start`` of depth whose d' reaches ``frac`` of the best d' of any layer (0.45: on
    SmolLM2 d' plateaus over layers 10-14 at about half its maximum, and the plateau's start is
    the layer that steers best).

    Why the earliest and not the best: separation keeps growing with depth, but steering a late
    layer mostly makes the model repeat itself, while steering the first layer where the trait
    is clearly readable leaves the later blocks room to turn it into fluent text (measured on
    SmolLM2-135M: layers 8-10 give coherent in-character answers, layers >= 14 loop).
    Returns ``(layer, [(auroc, d') per layer])``."""
    L = acts_pos.shape[1]
    v = acts_pos.mean(0) - acts_neg.mean(0)
    unit = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    pp, pn = (held_pos * unit).sum(-1), (held_neg * unit).sum(-1)               # [N, L]
    scores = []
    for l in range(L):
        sd = ((pp[:, l].var(unbiased=False) + pn[:, l].var(unbiased=False)) / 2).sqrt().clamp_min(1e-12)
        scores.append((_auroc(pp[:, l], pn[:, l]), float((pp[:, l].mean() - pn[:, l].mean()) / sd)))
    first = min(int(start * L), L - 1)
    best = max(d for _, d in scores)
    layer = next((l for l in range(first, L) if scores[l][1] >= frac * best), first)
    return layer, scores


def mean_difference_vector(model, tok, trait_spec: Union[str, dict] = DEFAULT_TRAIT, n_per_question: int = 1,
                           max_new_tokens: int = 48, batch_size: int = 16, seed: int = 0, progress: bool = True,
                           samples: Optional[tuple] = None, holdout_every: int = 4) -> PersonaVector:
    """mean(positive) - mean(negative) of the response-mean block outputs, per layer.

    ``samples``: ``(positive, negative)`` from :func:`generate_contrastive` to skip generation.
    Questions ``i`` with ``i % holdout_every == holdout_every - 1`` form a held-out split used
    only to choose ``meta["layer"]`` (see :func:`choose_layer`); the vector uses all samples.
    """
    spec = load_trait(trait_spec)
    t0 = time.time()
    if samples is None:
        samples = generate_contrastive(model, tok, spec, n_per_question, max_new_tokens, batch_size, seed, progress)
    pos, neg = samples
    if not pos or not neg:
        raise ValueError("need at least one positive and one negative sample")
    acts = response_mean_activations(model, tok, list(pos) + list(neg), batch_size)
    a_pos, a_neg = acts[:len(pos)], acts[len(pos):]
    vectors = a_pos.mean(0) - a_neg.mean(0)

    qidx = {q: i for i, q in enumerate(spec["questions"])}
    held = lambda side: torch.tensor([qidx.get(q, 0) % holdout_every == holdout_every - 1 for _, q, _ in side])
    hp, hn = held(pos), held(neg)
    L = vectors.shape[0]
    if holdout_every > 1 and hp.any() and hn.any() and (~hp).any() and (~hn).any():
        layer, scores = choose_layer(a_pos[~hp], a_neg[~hn], a_pos[hp], a_neg[hn])
        choice = (f"earliest layer >= {int(LAYER_START * L)} whose held-out separation d' of response-mean "
                  f"projections reaches {LAYER_FRAC} of the best layer's (choose_layer); held-out = every "
                  f"{holdout_every}th question, vector for scoring from the others")
        scores = {"auroc": [round(s[0], 4) for s in scores], "separation": [round(s[1], 3) for s in scores]}
    else:
        layer, scores, choice = L // 2, None, "mid-depth (too few samples for a held-out split)"
    meta = {
        "model": model_fingerprint(model), "averaged_over": "response", "n_positive": len(pos),
        "n_negative": len(neg), "source": "personakern.extraction.quick.mean_difference_vector",
        "judge": "none: unfiltered mean difference", "layer": int(layer), "layer_choice": choice,
        "trait_description": spec.get("description", ""), "n_per_question": n_per_question,
        "max_new_tokens": max_new_tokens, "seed": seed, "seconds": round(time.time() - t0, 1),
    }
    if scores is not None:
        meta["layer_scores"] = scores
    return PersonaVector(spec["trait"], vectors, meta)


def _same_model(fp_file: dict, model) -> bool:
    fp = model_fingerprint(model)
    name = lambda n: str(n or "").rstrip("/").rsplit("/", 1)[-1].lower()
    return (all(fp_file.get(k) == v for k, v in fp.items() if k != "name_or_path")
            and name(fp_file.get("name_or_path")) == name(fp.get("name_or_path")))


def _try_load(path: Path, model, trait: Optional[str] = None) -> Optional[PersonaVector]:
    """The vector in ``path`` (``trait`` of a file holding several) if it exists and was made for
    exactly this model, else None."""
    if not path.exists():
        return None
    try:
        if trait is not None and trait not in VectorSet.load(path):
            return None
        if not _same_model(PersonaVector.load(path, trait=trait).meta.get("model") or {}, model):
            return None  # another model's vectors: not an error, just not ours
        return PersonaVector.load(path, model=model, trait=trait)
    except VectorFileError as e:
        warnings.warn(f"ignoring {path}: {e}")
        return None


def default_vector(model, tok, trait: str = DEFAULT_TRAIT, progress: bool = True, **kwargs) -> PersonaVector:
    """The shipped vector for ``trait`` if it was made for this model, else one computed with
    :func:`mean_difference_vector` (``kwargs`` go there) and cached under
    ``$PERSONAKERN_CACHE/vectors/`` (default ``~/.cache/personakern``)."""
    from ..paths import cache_dir

    pv = _try_load(DATA / "vectors" / f"smollm2-{trait}.safetensors", model)
    if pv is not None:
        return pv
    fp = model_fingerprint(model)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(fp.get("name_or_path") or fp["model_type"])
                   .rstrip("/").rsplit("/", 1)[-1].lower())
    path = cache_dir() / "vectors" / f"{slug}-{fp['num_hidden_layers']}x{fp['hidden_size']}-{trait}.safetensors"
    pv = _try_load(path, model)
    if pv is None:
        kwargs.setdefault("n_per_question", 4)  # as the shipped vector: 80 answers per side
        pv = mean_difference_vector(model, tok, trait, progress=progress, **kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        pv.save(path)
    return pv


def best_vector(model, tok, trait: str = DEFAULT_TRAIT, progress: bool = True, **kwargs) -> PersonaVector:
    """The best vector the package ships for ``trait`` and this model: the judged pipeline's
    (``data/vectors/smollm2-traits.safetensors``, made by ``personakern extract``; its
    ``meta["layer"]`` and ``meta["demo_alpha"]`` are its steering sweep's choice), else
    :func:`default_vector` (the unjudged quick vector, shipped or computed)."""
    pv = _try_load(DATA / "vectors" / "smollm2-traits.safetensors", model, trait)
    return pv if pv is not None else default_vector(model, tok, trait, progress=progress, **kwargs)
