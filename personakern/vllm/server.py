"""``vllm serve`` with personakern: SPECs over HTTP, readings in the response.

A request carries its SPEC in ``vllm_xargs`` (``{"personakern": "<SPEC as JSON text>"}``: the
field takes only scalars). The chat and completion handlers are wrapped so that

- a bad SPEC is an HTTP 400 naming the problem, answered before anything reaches the engine;
- a monitored request's response has a top-level ``"personakern"`` object (``results.to_json``;
  a completion of several prompts: a list, one per prompt); a stream carries it on its last
  data chunk (the one before ``[DONE]``).

Requests without a SPEC go through vLLM's handlers untouched.
"""
from __future__ import annotations

import functools
import json
import logging
import os

from .results import RPC_TAKE, first_rank, to_json
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
        if KEY not in xargs:
            return await original(self, request, raw_request, *args, **kwargs)
        try:
            spec = _validate(self, xargs[KEY])
        except SpecError as e:
            return self.create_error_response(str(e))
        result = await original(self, request, raw_request, *args, **kwargs)
        if not spec.monitors or not hasattr(result, "__aiter__") and not hasattr(result, "id"):
            return result  # not monitored, or an error response
        num_prompts = _num_prompts(request)
        if hasattr(result, "__aiter__"):
            return _stream(self, result, num_prompts)
        got = await _take(self, result.id, num_prompts)
        if got is not None:
            result.personakern = got
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


def _num_prompts(request) -> int:
    prompt = getattr(request, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


async def _take(serving, response_id: str, num_prompts: int):
    # chat names its engine request "<id>", a completion "<id>-<prompt index>"
    ids = [response_id, f"{response_id}-0"] if num_prompts == 1 else [f"{response_id}-{i}" for i in range(num_prompts)]
    got = first_rank(await serving.engine_client.collective_rpc(RPC_TAKE, args=(ids,)))
    if num_prompts == 1:
        p = got.get(response_id) or got.get(f"{response_id}-0")
        return None if p is None else to_json(p)
    return [None if got.get(i) is None else to_json(got[i]) for i in ids]


async def _stream(serving, chunks, num_prompts: int):
    """Pass the stream through, holding one chunk back: the last data chunk gets the readings."""
    held = None
    async for chunk in chunks:
        if isinstance(chunk, str) and chunk.startswith("data: [DONE]"):
            if held is not None:
                held = await _with_readings(serving, held, num_prompts)
                yield held
                held = None
            yield chunk
            continue
        if held is not None:
            yield held
        held = chunk
    if held is not None:
        yield held


async def _with_readings(serving, chunk: str, num_prompts: int) -> str:
    try:
        body = json.loads(chunk[len("data: "):])
        response_id = body.get("id")
        if not response_id:
            return chunk
        got = await _take(serving, response_id, num_prompts)
        if got is None:
            return chunk
        body[KEY] = got
        return f"data: {json.dumps(body)}\n\n"
    except (ValueError, KeyError):  # an error chunk, not a response chunk
        return chunk
