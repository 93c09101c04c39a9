"""The likelihood and LLM judges on a vLLM engine: the same numbers as on Hugging Face, from
vLLM's log-probabilities, every item of a call in one ``generate``.

Both judges tokenize with the Hugging Face tokenizer of the model folder (the chat template,
:func:`~.likelihood.answer_sequences`, :meth:`~.llm.LLMJudge.prompt_ids`) and hand vLLM token
ids, so the engine scores exactly the sequences the Hugging Face judges score.

Likelihood judge
    One request per ``(system, question, answer)`` with ``max_tokens=1``. On an engine that runs
    personakern's model classes (every engine :func:`personakern.extraction.vllm_generate.start_engine`
    starts), the request asks ``extra_args={"personakern_score": answer start}`` and the engine
    computes ``log P(token_i | tokens < i)`` for the answer's tokens only
    (:mod:`personakern.vllm.scores`); on any other engine it asks ``prompt_logprobs=0``, and vLLM
    computes the vocabulary projection, a full log-softmax and a rank for every computed prompt
    token and returns each as a Python dict. Either way the answer's tokens are summed.
    vLLM 0.32 by default never reads the prefix cache for a request that asks for prompt
    log-probabilities (``SamplingParams.skip_reading_prefix_cache`` defaults to True for them);
    made to read it, it leaves the entries of the cached tokens *uninitialised* (garbage token ids
    and values, measured) but computes every entry after them exactly (bit for bit the values of
    an uncached request, measured on 431 sequences). The answer's entries need only the rows from
    the last prompt token on, and the prompts of one question share their system prompt and
    question (each answer is scored under the same 11 system prompts), so the requests read the
    cache (1.8x faster measured on SmolLM2's judge sequences); the scoring requests read it as any
    request does and leave the cached entries NaN. Where the cached prefix reaches into
    the answer (two answers with a common beginning), the
    skipped entries are the same as those of the request that computed the cached tokens (an entry
    depends only on the tokens up to it), so every computed entry is kept under its token prefix
    and looked up; an entry nobody computed (typically the first token after the cached blocks,
    where two answers part) comes from a request on the context up to it (``logprob_token_ids``,
    as the LLM judge asks; from the cache but its last partial block, usually one token), and a request missing more than
    :data:`FEW_MISSING` entries is sent again without reading the cache.

LLM judge
    ``p_k = P(tokens of str(k), then an end token)`` needs, at the prompt and after every node of
    the integers' token trie (SmolLM2: 1 + 101 contexts), the log-probabilities of that node's
    children and of the end tokens. Each context is one request ``prompt + node's tokens`` with
    ``max_tokens=1`` and ``logprob_token_ids=[children..., end ids...]``: vLLM returns the raw
    (unprocessed, fp32 log-softmax) log-probability of exactly those ids at the next position.
    These requests read the prefix cache, and the 102 contexts of a prompt share all of it but
    the last partial KV block and their 1-3 number tokens: on CPU the judge engine uses 32-token
    blocks (vLLM's CPU default is 128) so at most 32 + 3 tokens are recomputed per context.
    Why not the alternatives: top-k ``logprobs=`` on the first token misses every integer past
    9 (two or three tokens each) and any id outside the top k; ``prompt_logprobs`` over
    ``prompt + integer + end`` sequences is exact too, but those requests never read the prefix
    cache, so each of the 101 would recompute the whole rubric prompt (~100x the work).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .base import COHERENCE_RUBRIC, JudgeError
from .likelihood import (COHERENCE_MID, COHERENCE_SCALE, NEUTRAL_SYSTEM, TRAIT_SCALE, LikelihoodJudge,
                         answer_sequences)
from .llm import LLMJudge, model_id

#: KV block size of a judge engine on CPU (see the module docstring; vLLM wants multiples of 32).
CPU_BLOCK_SIZE = 32
#: vLLM 0.32's limit on ``logprob_token_ids`` per request (``vllm.sampling_params``).
MAX_IDS_PER_REQUEST = 128
ALL_AT_ONCE = 1 << 30   # batch_size of the vLLM judges: every item of a call in one generate()


def judge_engine(model_path: str = "smollm2", **overrides):
    """A ``vllm.LLM`` for judging: :func:`personakern.vllm.engine.make_llm` with prefix caching
    on and, on CPU, :data:`CPU_BLOCK_SIZE`-token KV blocks. For a model personakern runs inside
    vLLM (Llama, Mistral, Qwen2/3), and unless the environment already names vectors, capture or
    spare columns, the engine runs personakern's model classes (one spare trait column, no
    vectors), so the likelihood judge takes its scoring requests instead of vLLM's prompt
    log-probabilities (:func:`engine_scores`); any other model gets a plain engine. Raises
    :class:`JudgeError` when vLLM cannot run here or the model folder is missing."""
    from ..vllm.engine import EngineUnavailable, make_llm, require_vllm
    from ..vllm.vectors import SPARE_ENV
    try:
        require_vllm()
        from vllm.platforms import current_platform
        args = dict(enable_prefix_caching=True)
        if current_platform.is_cpu():
            args["block_size"] = CPU_BLOCK_SIZE
        args.update(overrides)
        env = {SPARE_ENV: "1"} if _personakern_classes_fit(model_path) else {}
        return make_llm(model_path, env=env, **args)
    except EngineUnavailable as e:
        raise JudgeError(f"vLLM judge engine: {e}") from e


def _personakern_classes_fit(model_path: str) -> bool:
    """Whether a judge engine on ``model_path`` should run personakern's model classes: its
    architecture is one they cover and nothing in the environment chose already."""
    from ..models import resolve
    from ..vllm.capture import CAPTURE_ENV
    from ..vllm.vectors import ENV_VAR, SPARE_ENV, SUPPORTED_ARCHITECTURES
    if any(os.environ.get(k) for k in (ENV_VAR, SPARE_ENV, CAPTURE_ENV)):
        return False
    try:
        config = json.loads((Path(resolve(model_path)) / "config.json").read_text())
    except (OSError, ValueError, KeyError):   # a hub id, an unreadable folder: make_llm says what is wrong
        return False
    return any(a in SUPPORTED_ARCHITECTURES for a in config.get("architectures") or [])


def _max_model_len(llm) -> Optional[int]:
    try:
        return int(llm.llm_engine.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - another vLLM layout
        return None


def _generate(llm, prompts: Sequence[List[int]], params, what: str):
    """``llm.generate`` on token ids, after checking every prompt fits the engine."""
    from vllm import TokensPrompt
    limit = _max_model_len(llm)
    if limit is not None:
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise JudgeError(f"a {what} sequence has {longest} tokens; the judge engine's max_model_len is "
                             f"{limit}: start the engine with a larger max_model_len (engine_args=) or shorten it")
    return llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)


def answer_logprob_sums(llm, seqs: Sequence[Tuple[List[int], int]]) -> List[Tuple[float, int]]:
    """``(sum of log P(token_i | tokens < i) over i >= prefix length, number of such tokens)`` per
    ``(token ids, prefix length)``, in one call (plus, where the prefix cache reached into an
    answer, the few entries it skipped; see the module docstring). On an engine that runs
    personakern's model classes the entries are computed inside the engine for the answer tokens
    only (:mod:`personakern.vllm.scores`), else they are vLLM's prompt log-probabilities."""
    if not seqs:
        return []
    scored = engine_scores(llm)
    outs = _generate(llm, [ids for ids, _ in seqs], _answer_params(seqs, scored, False), "likelihood")
    # entry i of a request is computed iff position i - 1 was; every computed entry of the
    # answers is kept under its token prefix, which alone determines it
    known: Dict[tuple, float] = {}
    keys = [_prefix_keys(ids) for ids, _ in seqs]
    for out, (ids, start), key in zip(outs, seqs, keys):
        for i, lp in _computed(out, ids, start, scored):
            known[key[i]] = lp
    missing = {k: [i for i in range(start, len(ids)) if key[i] not in known]
               for k, ((ids, start), key) in enumerate(zip(seqs, keys))}
    missing = {k: m for k, m in missing.items() if m}
    few = [(k, i) for k, m in missing.items() if len(m) <= FEW_MISSING for i in m]
    if few:   # the context up to the entry, from the cache but its last partial block (usually one token)
        got = next_token_logprobs(llm, [seqs[k][0][:i] for k, i in few], [[seqs[k][0][i]] for k, i in few])
        for (k, i), d in zip(few, got):
            known[keys[k][i]] = d[seqs[k][0][i]]
    redo = [k for k, m in missing.items() if len(m) > FEW_MISSING]
    if redo:      # the rest again, without reading the cache
        again = _generate(llm, [seqs[k][0] for k in redo], _answer_params([seqs[k] for k in redo], scored, True),
                          "likelihood")
        for k, out in zip(redo, again):
            ids, start = seqs[k]
            if _hit(out, start):
                raise JudgeError(f"vLLM served {out.num_cached_tokens} prompt tokens from its prefix cache to a "
                                 f"request told not to read it; their log-probabilities are not computed")
            for i, lp in _computed(out, ids, start, scored):
                known[keys[k][i]] = lp
    return [(float(sum(known[key[i]] for i in range(start, len(ids)))), len(ids) - start)
            for (ids, start), key in zip(seqs, keys)]


def engine_scores(llm) -> bool:
    """Whether ``llm`` runs personakern's model classes, which score prompt tokens in the engine."""
    from ..vllm.plugin import runs_personakern
    return runs_personakern(llm)


def _answer_params(seqs, scored: bool, skip_cache: bool):
    from vllm import SamplingParams
    kw = dict(max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=skip_cache)
    if not scored:
        return SamplingParams(prompt_logprobs=0, **kw)
    from ..vllm.scores import SCORE_KEY
    return [SamplingParams(extra_args={SCORE_KEY: max(1, int(start))}, **kw) for _, start in seqs]


def _computed(out, ids, start: int, scored: bool):
    """``(i, log P(ids[i] | ids[:i]))`` for the answer entries the request computed."""
    if scored:
        vals = getattr(out, "personakern_scores", None)
        if vals is None:
            raise JudgeError("the engine returned no scores for a scoring request (personakern's plugin "
                             "did not run in this engine)")
        first = max(1, int(start))
        return [(first + j, float(v)) for j, v in enumerate(vals) if v == v]   # NaN: from the cache
    lps = out.prompt_logprobs
    return [(i, lps[i][ids[i]].logprob) for i in range(max(start, (out.num_cached_tokens or 0) + 1), len(ids))]


#: a request whose cached prefix reached into its answer and left at most this many of the
#: answer's entries unknown gets them from one-token requests, else it is sent again uncached
FEW_MISSING = 4


def _hit(out, start: int) -> bool:
    """Whether the prefix cache served a token whose entry the answer needs (entry ``start``
    needs position ``start - 1`` computed)."""
    return (out.num_cached_tokens or 0) >= max(start, 1)


def _prefix_keys(ids: Sequence[int]) -> List[tuple]:
    """``keys[i]``: ``ids[:i + 1]`` as two chained 64-bit hashes and its length (equal prefixes
    give equal keys; two different ones the same key with odds of ~2^-128)."""
    keys, a, b = [], 0, 1
    for n, t in enumerate(ids):
        a, b = hash((a, int(t))), hash((int(t), b, 0x9E3779B97F4A7C15))
        keys.append((n, a, b))
    return keys


def next_token_logprobs(llm, contexts: Sequence[List[int]], wanted: Sequence[Sequence[int]]) -> List[Dict[int, float]]:
    """``{id: log P(id | context)}`` for the ids ``wanted[i]`` after ``contexts[i]`` (raw,
    unprocessed log-probabilities), one ``generate`` for all; lists longer than vLLM allows per
    request are split over several requests on the same context."""
    from vllm import SamplingParams
    prompts, params, owner = [], [], []
    for i, (ctx, ids) in enumerate(zip(contexts, wanted)):
        ids = sorted(set(int(t) for t in ids))
        for s in range(0, len(ids), MAX_IDS_PER_REQUEST):
            chunk = ids[s:s + MAX_IDS_PER_REQUEST]
            prompts.append(ctx)
            params.append(SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=chunk,
                                         detokenize=False))
            owner.append((i, chunk))
    res: List[Dict[int, float]] = [{} for _ in contexts]
    if not prompts:
        return res
    for out, (i, chunk) in zip(_generate(llm, prompts, params, "judge"), owner):
        got = out.outputs[0].logprobs[0]
        missing = [t for t in chunk if t not in got]
        if missing:
            raise JudgeError(f"vLLM returned no log-probability for token ids {missing[:5]}")
        res[i].update({t: float(got[t].logprob) for t in chunk})
    return res


def _engine_and_tokenizer(model, tokenizer, model_path, llm, engine_args):
    """The engine, its tokenizer and the judged model's name; ``model`` (a Hugging Face model,
    optional) only names the folder and the judge."""
    from ..models import DEFAULT_MODEL, SMOLLM2_ID, load_tokenizer, resolve
    if model_path is not None:   # a judge model of its own: the given pair is the judged model's
        model, tokenizer = None, None
    elif model is not None:
        # a loaded Hugging Face model: its folder (personakern's SmolLM2 is named by its hub id)
        model_path = str(getattr(model.config, "name_or_path", "") or "") or None
    model_path = model_path or DEFAULT_MODEL
    if llm is None:
        llm = judge_engine(model_path, **(engine_args or {}))
    elif engine_args:
        raise ValueError("engine_args applies only when the judge starts its own engine (llm=None)")
    if tokenizer is None:
        tokenizer = load_tokenizer(model_path)
    if model is not None:
        name = model_id(model)
    else:
        folder = str(resolve(model_path))
        name = SMOLLM2_ID if folder.endswith("smollm2-135m-instruct") else model_path
    return llm, tokenizer, str(resolve(model_path)), name


class VLLMLikelihoodJudge(LikelihoodJudge):
    """:class:`~.likelihood.LikelihoodJudge` on a vLLM engine: the same scores (and ``name``), the
    log-probabilities from vLLM. ``llm``: a ``vllm.LLM`` to use (else one is started on
    ``model_path`` or the given model's folder, default SmolLM2, with ``engine_args``)."""

    engine = "vllm"

    def __init__(self, model=None, tokenizer=None, model_path: Optional[str] = None, llm=None,
                 engine_args: Optional[dict] = None, batch_size: int = ALL_AT_ONCE, scale: float = TRAIT_SCALE,
                 coherence_mid: float = COHERENCE_MID, coherence_scale: float = COHERENCE_SCALE,
                 neutral_system: str = NEUTRAL_SYSTEM, max_answer_tokens: int = 256):
        self.llm, tok, self.model_path, mid = _engine_and_tokenizer(model, tokenizer, model_path, llm, engine_args)
        self.model = None
        self._configure(tok, batch_size, scale, coherence_mid, coherence_scale, neutral_system, max_answer_tokens)
        self.name = f"likelihood:{mid}"

    def _answer_logprobs(self, samples, bar) -> List[Tuple[float, int]]:
        seqs = answer_sequences(self.tok, samples, self.max_answer_tokens)
        out: List[Tuple[float, int]] = []
        for s in range(0, len(seqs), max(1, int(self.batch_size))):
            part = seqs[s:s + max(1, int(self.batch_size))]
            out += answer_logprob_sums(self.llm, part)
            if bar is not None:
                bar.update(len(part))
        return out


class VLLMLLMJudge(LLMJudge):
    """:class:`~.llm.LLMJudge` on a vLLM engine (``end="eos"`` only): the same distributions over
    0..100, scores and ``name``. ``llm``/``model_path``/``engine_args`` as
    :class:`VLLMLikelihoodJudge`; ``batch_size``: prompts per ``generate`` (default: all)."""

    engine = "vllm"

    def __init__(self, model=None, tokenizer=None, model_path: Optional[str] = None, llm=None,
                 engine_args: Optional[dict] = None, batch_size: int = ALL_AT_ONCE, min_mass: float = 0.25,
                 end: str = "eos", coherence_rubric: str = COHERENCE_RUBRIC,
                 end_ids: Optional[Sequence[int]] = None, name: Optional[str] = None,
                 cache_distributions: bool = False):
        if end != "eos":
            raise JudgeError(f"the LLM judge on vLLM supports end='eos' only (end={end!r} needs the "
                             f"probability of every digit-initial token); use the Hugging Face engine")
        self.llm, tok, self.model_path, mid = _engine_and_tokenizer(model, tokenizer, model_path, llm, engine_args)
        self.model = None
        eos_source = model if model is not None else SimpleNamespace(generation_config=_generation_config(self.model_path))
        self._configure(tok, eos_source, batch_size, min_mass, end, coherence_rubric, end_ids, cache_distributions)
        self.name = name or f"llm:{mid}"
        trie = self.trie
        self._children: List[List[int]] = [[] for _ in range(len(trie) + 1)]   # index: node + 1
        self._path: List[List[int]] = []                                        # node -> its tokens
        for i, (t, par) in enumerate(zip(trie.token, trie.parent)):
            self._children[par + 1].append(t)
            self._path.append((self._path[par] if par >= 0 else []) + [t])
        self._ends_integer = set(trie.node_of)

    def integer_distributions(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[len(prompts), 101]`` float64, as :meth:`LLMJudge.integer_distributions`, from one
        ``generate`` over every (prompt, trie context) pair."""
        trie, n = self.trie, len(self.trie)
        contexts, wanted = [], []
        for p in prompts:
            ids = self.prompt_ids(p)
            for node in range(-1, n):   # the prompt, then every node of the trie
                want = list(self._children[node + 1]) + (self.end_ids if node in self._ends_integer else [])
                contexts.append(ids + (self._path[node] if node >= 0 else []))
                wanted.append(want)
        lps = next_token_logprobs(self.llm, contexts, wanted)
        out = torch.zeros(len(prompts), len(trie.node_of), dtype=torch.float64)
        for b in range(len(prompts)):
            row = lps[b * (n + 1):(b + 1) * (n + 1)]        # row[node + 1]: after the prompt + node
            cum = [0.0] * n                                   # log P(prefix of node)
            for i, (t, par) in enumerate(zip(trie.token, trie.parent)):
                cum[i] = row[par + 1][t] + (cum[par] if par >= 0 else 0.0)
            for k, node in enumerate(trie.node_of):
                end = _logsumexp([row[node + 1][e] for e in self.end_ids])
                out[b, k] = math.exp(cum[node] + end)
        return out


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    if m == -math.inf:
        return m
    return m + math.log(sum(math.exp(x - m) for x in xs))


def _generation_config(folder: str):
    try:
        from transformers import GenerationConfig
        return GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError):
        return None
