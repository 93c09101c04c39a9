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

from .generate import GenSettings, chat_ids, eos_ids

#: requests per ``generate`` call: what a kill can lose; vLLM batches within a call
CHUNK = 512


def _model_folder(model) -> str:
    path = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not path or not os.path.isdir(path):
        raise ValueError(f"the vLLM engine loads the model from its folder, and this model's "
                         f"name_or_path ({path!r}) is not a local folder; load the model with "
                         f"personakern.models.load or from a local folder")
    return path


@contextlib.contextmanager
def steering_engine(model, vector_file, **overrides):
    """A vLLM engine on ``model``'s folder and dtype with ``$PERSONAKERN_VECTORS`` = ``vector_file``
    while it starts (the plugin reads it then; the variable is restored after), shut down on exit.

    Chunked prefill is off and a step holds a whole prompt: vLLM 0.32 on CPUs fails on a seeded
    request whose prompt is split over two steps ("CPU Generator does not use offset", when it
    rewinds the request's generator for the token it discards), and an unsplit prompt also keeps
    each request's random draws independent of what else is in the batch."""
    from ..vllm.engine import DEFAULTS, make_llm
    overrides.setdefault("enable_chunked_prefill", False)
    overrides.setdefault("max_num_batched_tokens", overrides.get("max_model_len", DEFAULTS["max_model_len"]))
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    folder = _model_folder(model)
    old = os.environ.get("PERSONAKERN_VECTORS")
    os.environ["PERSONAKERN_VECTORS"] = str(vector_file)
    try:
        llm = make_llm(folder, dtype=dtype, **overrides)
    finally:
        if old is None:
            os.environ.pop("PERSONAKERN_VECTORS", None)
        else:
            os.environ["PERSONAKERN_VECTORS"] = old
    try:
        yield llm
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:   # pragma: no cover - an engine already gone
            pass
        del llm


def sampling_params(settings: GenSettings, eos: set, seed: Optional[int], spec: Optional[dict]):
    from vllm import SamplingParams
    kw = dict(max_tokens=settings.max_new_tokens, repetition_penalty=settings.repetition_penalty,
              stop_token_ids=sorted(eos), skip_special_tokens=True, detokenize=False)
    if settings.temperature > 0:
        kw.update(temperature=settings.temperature, top_p=settings.top_p, seed=seed)
    else:
        kw.update(temperature=0.0)
    if spec is not None:
        kw["extra_args"] = {"personakern": spec}
    return SamplingParams(**kw)


def generate_vllm_cached(llm, tok, model, jobs: Sequence[dict], cache, settings: GenSettings, progress: bool = True,
                         desc: str = "generating (vLLM)") -> Dict[str, dict]:
    """Answer every job not yet in ``cache`` on ``llm`` (an engine on ``model``'s folder: its
    EOS ids are the HF engine's); returns ``{id: record}`` for all jobs (records: the job minus
    ``spec``/``seed``, plus ``"answer"``)."""
    from vllm import TokensPrompt
    ids = [j["id"] for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("job ids must be unique")
    done = {r["id"]: r for r in cache if "id" in r}
    todo = [j for j in jobs if j["id"] not in done]
    eos = eos_ids(model, tok)
    bar = tqdm(total=len(todo), desc=desc, unit="answer", disable=not progress or not todo)
    for i in range(0, len(todo), CHUNK):
        part = todo[i:i + CHUNK]
        prompts = [TokensPrompt(prompt_token_ids=chat_ids(tok, j.get("system"), j["question"])) for j in part]
        params = [sampling_params(settings, eos, j.get("seed"), j.get("spec")) for j in part]
        outs = llm.generate(prompts, params, use_tqdm=False)
        new = []
        for j, o in zip(part, outs):
            row = list(o.outputs[0].token_ids)
            cut = next((k for k, t in enumerate(row) if t in eos), len(row))
            rec = {k: v for k, v in j.items() if k not in ("spec", "seed")}
            rec["answer"] = tok.decode(row[:cut], skip_special_tokens=True).strip()
            new.append(rec)
        cache.append(new)
        done.update((r["id"], r) for r in new)
        bar.update(len(part))
    bar.close()
    return {i: done[i] for i in ids}

