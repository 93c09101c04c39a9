"""Answers generated on a vLLM engine, with per-request steering: the pipeline's vLLM engine.

``steering_engine(model, vector_file)`` starts a ``vllm.LLM`` on the Hugging Face model's folder
(same dtype) with personakern's plugin serving the traits of ``vector_file``;
``generate_vllm_cached(llm, tok, model, jobs, cache, settings)`` answers every job not yet in ``cache``
(each job may carry ``"spec"``, a personakern SPEC, and ``"seed"``, its sampling seed), in chunks
appended to the cache as they finish, so a killed run resumes. Prompts are the same chat-template
ids as the HF engine's; answers are cut at the first EOS and decoded the same way, and the
sampling settings (temperature, top-p, repetition penalty, max tokens) mean what they mean there.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional, Sequence

from tqdm.auto import tqdm

from ..state import KINDS
from .generate import GenSettings, batch_seed, chat_ids, decode_answer, eos_ids

#: what may generate a pipeline stage's answers
ENGINES = ("hf", "vllm")


def check_engine(engine: str, what: str = "engine") -> None:
    """Refuse an unknown engine, and the vLLM engine under a launcher: it runs in one process
    (one engine batches the whole stage; for more hardware, vLLM's own tensor parallelism)."""
    from .. import distributed
    if engine not in ENGINES:
        raise ValueError(f"{what} must be one of {ENGINES}, got {engine!r}")
    if engine == "vllm" and distributed.world_size() > 1:
        raise ValueError(f"{what} 'vllm' runs in one process (vLLM batches the work itself); run it without "
                         f"torchrun/accelerate, or use the HF engine under a launcher")


#: requests per ``generate`` call: what a kill can lose; vLLM batches within a call
CHUNK = 512


def _model_folder(model) -> str:
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path or not os.path.isdir(path):
        raise ValueError(f"the vLLM engine loads the model from its folder, and this model's "
                         f"name_or_path ({path!r}) is not a local folder; load the model with "
                         f"personakern.models.load or from a local folder")
    return path


def start_engine(model, vector_file=None, capture: bool = False, spare: int = 0, **overrides):
    """A vLLM engine on ``model``'s folder and dtype (close it with
    :func:`personakern.vllm.engine.close_llm`), started with ``$PERSONAKERN_VECTORS`` =
    ``vector_file`` (None: no vectors), ``$PERSONAKERN_VLLM_CAPTURE`` = ``capture`` and
    ``$PERSONAKERN_VLLM_SPARE_TRAITS`` = ``spare`` (the plugin reads them while the engine starts;
    they are restored after). With prefix caching on and, on CPUs, 32-token KV blocks, as the
    vLLM judges want, so one engine serves generation, activations, judging and the sweep; on
    CPUs also with personakern's top-p processor (:mod:`personakern.vllm.nucleus`: vLLM's own CPU
    top-p sorts the whole vocabulary every step), which :func:`sampling_params` then uses.

    Chunked prefill is off and a step holds a whole prompt: vLLM 0.32 on CPUs fails on a seeded
    request whose prompt is split over two steps ("CPU Generator does not use offset", when it
    rewinds the request's generator for the token it discards), and an unsplit prompt also keeps
    each request's random draws independent of what else is in the batch."""
    from ..judges.vllm_engine import CPU_BLOCK_SIZE
    from ..vllm.capture import CAPTURE_ENV
    from ..vllm.engine import DEFAULTS, make_llm, require_vllm
    from ..vllm.nucleus import FQCN as NUCLEUS_FQCN
    from ..vllm.vectors import ENV_VAR, SPARE_ENV
    require_vllm()
    from vllm.platforms import current_platform
    overrides.setdefault("enable_chunked_prefill", False)
    overrides.setdefault("max_num_batched_tokens", overrides.get("max_model_len", DEFAULTS["max_model_len"]))
    overrides.setdefault("enable_prefix_caching", True)
    if current_platform.is_cpu():
        overrides.setdefault("block_size", CPU_BLOCK_SIZE)
        # top-p without a full sort of the vocabulary per step (vLLM's CPU top-p sorts)
        overrides["logits_processors"] = [*(overrides.get("logits_processors") or ()), NUCLEUS_FQCN]
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    folder = _model_folder(model)
    env = {ENV_VAR: None if vector_file is None else str(vector_file),
           CAPTURE_ENV: "1" if capture else None, SPARE_ENV: str(int(spare)) if spare else None}
    return make_llm(folder, dtype=dtype, env=env, **overrides)


@contextlib.contextmanager
def steering_engine(model, vector_file=None, capture: bool = False, spare: int = 0, **overrides):
    """:func:`start_engine` as a context: the engine is shut down on exit."""
    from ..vllm.engine import close_llm
    llm = start_engine(model, vector_file, capture, spare, **overrides)
    try:
        yield llm
    finally:
        close_llm(llm)
        del llm


def sampling_params(settings: GenSettings, eos: set, seed: Optional[int], spec: Optional[dict],
                    extra_tokens: int = 0, nucleus: bool = False):
    """One request's ``SamplingParams``. ``nucleus``: the engine has personakern's top-p processor
    (:func:`personakern.vllm.nucleus.engine_has_nucleus`), which then applies ``settings.top_p``
    in place of vLLM's own, sorted, top-p."""
    from vllm import SamplingParams
    from ..vllm.nucleus import sampling_kwargs
    kw = dict(max_tokens=settings.max_new_tokens + extra_tokens, repetition_penalty=settings.repetition_penalty,
              stop_token_ids=sorted(eos), skip_special_tokens=True, detokenize=False)
    extra = {}
    if settings.temperature > 0:
        top = sampling_kwargs(settings.top_p, nucleus)
        extra.update(top.pop("extra_args", {}))
        kw.update(temperature=settings.temperature, seed=seed, **top)
    else:
        kw.update(temperature=0.0)
    if spec is not None:
        extra["personakern"] = spec
    if extra:
        kw["extra_args"] = extra
    return SamplingParams(**kw)


def generate_vllm_cached(llm, tok, model, jobs: Sequence[dict], cache, settings: GenSettings, progress: bool = True,
                         desc: str = "generating (vLLM)", acts=None) -> Dict[str, dict]:
    """Answer every job not yet in ``cache`` on ``llm`` (an engine on ``model``'s folder: its
    EOS ids are the HF engine's); returns ``{id: record}`` for all jobs (records: the job minus
    ``spec``/``seed``, plus ``"answer"``).

    ``acts`` (an :class:`~personakern.extraction.generate.ActStore`; the engine started with
    ``capture=True``): each answer's ``[3, L, D]`` activation means (response, prompt, last prompt
    token; :data:`~personakern.state.KINDS`) are gathered by the engine while it generates and
    stored per chunk, before the chunk's records; a job is done when both exist. As on the HF
    engine, one token more than ``max_new_tokens`` is generated so that the last answer token is
    fed (and averaged); the answer is the first ``max_new_tokens``."""
    from vllm import TokensPrompt
    from ..vllm import captured
    from ..vllm.nucleus import engine_has_nucleus
    ids = [j["id"] for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("job ids must be unique")
    done = {r["id"]: r for r in cache if "id" in r}
    have = acts.ids() if acts is not None else None
    todo = [j for j in jobs if j["id"] not in done or (have is not None and j["id"] not in have)]
    eos = eos_ids(model, tok)
    nucleus = engine_has_nucleus(llm)
    M = settings.max_new_tokens
    bar = tqdm(total=len(todo), desc=desc, unit="answer", disable=not progress or not todo)
    for i in range(0, len(todo), CHUNK):
        part = todo[i:i + CHUNK]
        prompts = [TokensPrompt(prompt_token_ids=chat_ids(tok, j.get("system"), j["question"])) for j in part]
        params = [sampling_params(settings, eos, j.get("seed"), _with_capture(j.get("spec"), acts is not None),
                                  extra_tokens=int(acts is not None), nucleus=nucleus) for j in part]
        outs = llm.generate(prompts, params, use_tqdm=False)
        if acts is not None:
            rows = {}
            for j, o in zip(part, outs):
                got = captured(o)
                if got is None:
                    raise RuntimeError("personakern: the vLLM engine returned no activations; start it with "
                                       "steering_engine(..., capture=True)")
                rows[j["id"]] = got["means"].transpose(0, 1).contiguous()       # [3, L, D]
            acts.write(acts.next_index(), rows)
        new = []
        for j, o in zip(part, outs):
            rec = {k: v for k, v in j.items() if k not in ("spec", "seed")}
            rec["answer"] = decode_answer(tok, o.outputs[0].token_ids[:M], eos)
            if j["id"] not in done:
                new.append(rec)
        cache.append(new)
        done.update((r["id"], r) for r in new)
        bar.update(len(part))
    bar.close()
    return {i: done[i] for i in ids}


def _with_capture(spec: Optional[dict], capture: bool) -> Optional[dict]:
    if not capture:
        return spec
    return dict(spec or {}, capture={"kinds": list(KINDS), "layers": "all"})


def generate_runs_vllm(model, tok, runs, progress: bool = True, llm=None) -> list:
    """The extraction's generation on one vLLM engine that gathers activations: ``runs`` are
    ``(jobs, cache, settings, desc, acts)`` as for :func:`generate_vllm_cached`; returns each
    run's ``{id: record}``. Sampled answers take per-request seeds, ``batch_seed(settings.seed,
    i)`` for the run's ``i``-th job, so a resumed run draws what an uninterrupted one did. On
    ``llm`` (a running engine that captures), else on an engine started here (none when every
    answer is already cached)."""
    def pending(jobs, cache, acts):
        done, have = {r["id"] for r in cache if "id" in r}, acts.ids()
        return any(j["id"] not in done or j["id"] not in have for j in jobs)

    def seeded(jobs, settings):
        if settings.temperature <= 0:
            return jobs
        return [dict(j, seed=batch_seed(settings.seed, i)) for i, j in enumerate(jobs)]

    if llm is not None or not any(pending(jobs, cache, acts) for jobs, cache, _, _, acts in runs):
        return [generate_vllm_cached(llm, tok, model, seeded(jobs, st), cache, st, progress, desc, acts)
                for jobs, cache, st, desc, acts in runs]
    with steering_engine(model, capture=True) as engine:
        return [generate_vllm_cached(engine, tok, model, seeded(jobs, st), cache, st, progress, desc, acts)
                for jobs, cache, st, desc, acts in runs]
