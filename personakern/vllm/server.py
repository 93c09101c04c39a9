"""``vllm serve`` with personakern: SPECs over HTTP, readings in the response.

A request carries its SPEC in ``vllm_xargs`` (``{"personakern": "<SPEC as JSON text>"}``: the
field takes only scalars). The chat and completion handlers are wrapped so that

- a bad SPEC is an HTTP 400 naming the problem, answered before anything reaches the engine;
- a monitored request's response has a top-level ``"personakern"`` object (``results.to_json``;
  a completion of several prompts: a list, one per prompt); a stream carries it on its last
  data chunk (the one before ``[DONE]``);
- a scoring request (``{"personakern_score": f}``, :mod:`.scores`) is checked the same way (a bad
  value is an HTTP 400) and its response has a top-level ``"personakern_scores"`` object,
  ``{"start": f, "logprobs": [...]}`` with ``null`` where the row came from the prefix cache
  (a list of them for a completion of several prompts; on a stream's last data chunk).

Requests with neither go through vLLM's handlers untouched.
"""
from __future__ import annotations

import functools
import json
import logging
import os

import numpy as np

from .results import RPC_TAKE, first_rank, to_json
from .scores import RPC_TAKE_SCORES, SCORE_KEY, to_scores
from .spec import KEY, SpecError, no_vectors_error, parse_spec

log = logging.getLogger("personakern.vllm")


def patch() -> None:
    try:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    except ImportError:  # a vLLM without these modules: offline use still works
        log.warning("personakern: vLLM's OpenAI serving classes not found; served responses carry no readings")
        return
    OpenAIServingChat.create_chat_completion = _wrap(OpenAIServingChat.create_chat_completion)
    OpenAIServingCompletion.create_completion = _wrap(OpenAIServingCompletion.create_completion)


def _wrap(original):
    @functools.wraps(original)
    async def handler(self, request, raw_request=None, *args, **kwargs):
        xargs = getattr(request, "vllm_xargs", None) or {}
        if KEY not in xargs and SCORE_KEY not in xargs:
            return await original(self, request, raw_request, *args, **kwargs)
        try:
            spec = _validate(self, xargs[KEY]) if KEY in xargs else None
            scores = _validate_score(self, request, xargs)
        except (SpecError, ValueError) as e:
            return self.create_error_response(str(e))
        result = await original(self, request, raw_request, *args, **kwargs)
        # what the response carries: (rpc, field, payload -> JSON)
        wanted = ([(RPC_TAKE, KEY, to_json)] if spec is not None and spec.monitors else []) + \
                 ([(RPC_TAKE_SCORES, "personakern_scores", scores_json)] if scores else [])
        if not wanted or not hasattr(result, "__aiter__") and not hasattr(result, "id"):
            return result  # nothing to attach, or an error response
        num_prompts = _num_prompts(request)
        if hasattr(result, "__aiter__"):
            return _stream(self, result, num_prompts, wanted)
        for rpc, field, convert in wanted:
            got = await _take(self, rpc, convert, result.id, num_prompts)
            if got is not None:
                setattr(result, field, got)
        return result
    return handler


def _validate(serving, raw):
    from .model import WHEN_SLOTS_ENV
    from .plan import build_plan
    catalog = getattr(serving.engine_client.input_processor, "personakern_catalog", None)
    if catalog is None:
        raise no_vectors_error()
    spec = parse_spec(raw, catalog)
    if spec.captures:
        raise SpecError(f"{KEY}.capture: activation capture is offered offline only (LLM.generate, "
                        f"personakern.vllm.captured), not by the server")
    build_plan(spec, catalog, int(os.environ.get(WHEN_SLOTS_ENV, str(catalog.columns))))
    return spec


def _validate_score(serving, request, xargs) -> bool:
    """Whether the request scores prompt tokens; ``ValueError`` as the offline engine raises it."""
    from types import SimpleNamespace
    from .plugin import validated_score
    params = SimpleNamespace(extra_args=xargs, n=getattr(request, "n", None) or 1)
    return validated_score(serving.engine_client.input_processor, params)


def scores_json(p: dict) -> dict:
    """A scoring request's worker payload as JSON: ``logprobs[i - start]`` = log P(token i | < i),
    ``null`` where the row came from the prefix cache."""
    return {"start": int(p["start"]), "logprobs": [None if np.isnan(x) else float(x) for x in to_scores(p)]}


def _num_prompts(request) -> int:
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


async def _take(serving, rpc: str, convert, response_id: str, num_prompts: int):
    # chat names its engine request "<id>", a completion "<id>-<prompt index>"
    ids = [response_id, f"{response_id}-0"] if num_prompts == 1 else [f"{response_id}-{i}" for i in range(num_prompts)]
    got = first_rank(await serving.engine_client.collective_rpc(rpc, args=(ids,)))
    if num_prompts == 1:
        p = got.get(response_id) or got.get(f"{response_id}-0")
        return None if p is None else convert(p)
    return [None if got.get(i) is None else convert(got[i]) for i in ids]


async def _stream(serving, chunks, num_prompts: int, wanted):
    """Pass the stream through, holding one chunk back: the last data chunk gets the results."""
    held = None
    async for chunk in chunks:
        if isinstance(chunk, str) and chunk.startswith("data: [DONE]"):
            if held is not None:
                held = await _with_results(serving, held, num_prompts, wanted)
                yield held
                held = None
            yield chunk
            continue
        if held is not None:
            yield held
        held = chunk
    if held is not None:
        yield held


async def _with_results(serving, chunk: str, num_prompts: int, wanted) -> str:
    try:
        body = json.loads(chunk[len("data: "):])
        response_id = body.get("id")
        if not response_id:
            return chunk
        attached = False
        for rpc, field, convert in wanted:
            got = await _take(serving, rpc, convert, response_id, num_prompts)
            if got is not None:
                body[field] = got
                attached = True
        return f"data: {json.dumps(body)}\n\n" if attached else chunk   # nothing to add: the chunk as sent
    except (ValueError, KeyError):  # an error chunk, not a response chunk
        return chunk
