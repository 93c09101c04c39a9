"""A judge behind an OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp server, Ollama, ...),
standard library only.

Each rubric is sent as ``POST {base_url}/chat/completions`` with one user message,
``max_tokens=1``, ``temperature=0``, ``logprobs=true`` and ``top_logprobs=20``. The score is read
from the first generated token's ``top_logprobs``: the probabilities of the tokens whose text,
stripped of whitespace, is an integer 0..100 written canonically ("7", " 42", "100"; not "07",
"7.5", "-3", "101") are summed per integer (" 42" and "42" both count for 42), and the score is
their weighted mean. It is None when those integers hold less than ``min_mass`` (0.25) of the
probability, or when the response carries no logprobs. (Large judge models such as GPT-4o have
single tokens for every integer up to 100 and beyond, so the first token *is* the number.)

Errors: 429 and 5xx responses and timeouts are retried with exponential backoff (``retries``,
``backoff`` seconds, doubled each time; a ``Retry-After`` header is honoured up to 60 s);
401/403/404 and a refused connection raise :class:`JudgeError` naming the URL at once.
Requests run ``workers`` (4) at a time.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import List, Optional

from .base import COHERENCE_RUBRIC, Judge, JudgeError, check_lengths, fill, progress_bar, weighted_score

_INT = re.compile(r"(?:0|[1-9][0-9]{0,2})\Z")


def token_integer(text: str) -> Optional[int]:
    """The integer 0..100 that a token's text spells (surrounding whitespace ignored), or None."""
    s = text.strip()
    if not _INT.match(s):
        return None
    k = int(s)
    return k if k <= 100 else None


def first_token_top_logprobs(response: dict) -> Optional[list]:
    """``[(token_text, logprob), ...]`` of the first generated token, from the chat format
    (``choices[0].logprobs.content[0].top_logprobs``) or the legacy completions format
    (``choices[0].logprobs.top_logprobs[0]`` as a dict); None if absent."""
    try:
        lp = response["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(lp, dict):
        return None
    content = lp.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        top = content[0].get("top_logprobs")
        if isinstance(top, list) and top:
            return [(str(t.get("token", "")), float(t["logprob"])) for t in top
                    if isinstance(t, dict) and t.get("logprob") is not None]
        if "token" in content[0] and content[0].get("logprob") is not None:  # no top list: the token itself
            return [(str(content[0]["token"]), float(content[0]["logprob"]))]
        return None
    legacy = lp.get("top_logprobs")
    if isinstance(legacy, list) and legacy and isinstance(legacy[0], dict):
        return [(str(t), float(v)) for t, v in legacy[0].items()]
    return None


def score_from_top_logprobs(top: Optional[list], min_mass: float = 0.25) -> Optional[float]:
    """Weighted mean of the integers 0..100 among ``top`` (see the module docstring)."""
    if not top:
        return None
    probs = [0.0] * 101
    for text, logprob in top:
        k = token_integer(text)
        if k is not None and math.isfinite(logprob):
            probs[k] += math.exp(logprob)
    return weighted_score(probs, min_mass)


class HTTPJudge(Judge):
    """Judge through an OpenAI-compatible ``/chat/completions`` endpoint.

    ``base_url`` like ``http://localhost:8000/v1`` or ``https://api.openai.com/v1``;
    ``model_name`` the served model; ``api_key`` (default: ``$OPENAI_API_KEY``; none sent if
    neither is set). ``max_tokens`` (1), ``top_logprobs`` (20), ``timeout`` (60 s per request),
    ``retries`` (4), ``backoff`` (1 s), ``workers`` (4), ``min_mass`` (0.25),
    ``extra_body``: more fields for the request (e.g. ``{"seed": 0}``).
    """

    def __init__(self, base_url: str, model_name: str, api_key: Optional[str] = None,
                 max_tokens: int = 1, top_logprobs: int = 20, timeout: float = 60.0, retries: int = 4,
                 backoff: float = 1.0, workers: int = 4, min_mass: float = 0.25,
                 coherence_rubric: str = COHERENCE_RUBRIC, extra_body: Optional[dict] = None,
                 name: Optional[str] = None):
        if not base_url:
            raise ValueError("the http judge needs base_url= (e.g. http://localhost:8000/v1)")
        if not model_name:
            raise ValueError("the http judge needs model_name= (the model the endpoint serves)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name = model_name
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.max_tokens, self.top_logprobs = max_tokens, top_logprobs
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.workers, self.min_mass = max(1, int(workers)), min_mass
        self.coherence_rubric, self.extra_body = coherence_rubric, dict(extra_body or {})
        self.name = name or f"http:{model_name}"

    # -- one request -----------------------------------------------------------------------
    def request(self, prompt: str) -> dict:
        """The endpoint's JSON response to ``prompt`` (retries included)."""
        body = {"model": self.model_name, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "temperature": 0, "logprobs": True,
                "top_logprobs": self.top_logprobs, **self.extra_body}
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            wait = self.backoff * (2 ** attempt)
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    text = resp.read().decode("utf-8", "replace")
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise JudgeError(f"judge endpoint {self.url} returned non-JSON: {text[:200]!r}") from None
            except urllib.error.HTTPError as e:
                detail = _body(e)
                if e.code in (401, 403):
                    raise JudgeError(f"judge endpoint {self.url} refused the request (HTTP {e.code}): "
                                     f"check api_key / $OPENAI_API_KEY. {detail}") from None
                if e.code == 404:
                    raise JudgeError(f"judge endpoint {self.url} not found (HTTP 404): base_url should end "
                                     f"with the API root, e.g. http://host:8000/v1; or model "
                                     f"{self.model_name!r} is unknown there. {detail}") from None
                if e.code != 429 and e.code < 500:
                    raise JudgeError(f"judge endpoint {self.url}: HTTP {e.code}. {detail}") from None
                last = f"HTTP {e.code} {detail}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after:
                    try:
                        wait = min(60.0, max(wait, float(retry_after)))
                    except ValueError:
                        pass
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, ConnectionRefusedError) or "refused" in str(reason).lower():
                    raise JudgeError(f"cannot connect to judge endpoint {self.url}: connection refused "
                                     f"(is the server running?)") from None
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    last = f"timed out after {self.timeout} s"
                else:
                    raise JudgeError(f"cannot reach judge endpoint {self.url}: {reason}") from None
            except (socket.timeout, TimeoutError):
                last = f"timed out after {self.timeout} s"
            except ConnectionError as e:  # reset mid-response: retry
                last = f"{type(e).__name__}: {e}"
            if attempt < self.retries:
                time.sleep(wait)
        raise JudgeError(f"judge endpoint {self.url} failed after {self.retries + 1} attempts: {last}")

    def score_prompt(self, prompt: str) -> Optional[float]:
        return score_from_top_logprobs(first_token_top_logprobs(self.request(prompt)), self.min_mass)

    def scores_for_prompts(self, prompts, progress=False, desc="judge") -> List[Optional[float]]:
        out: List[Optional[float]] = [None] * len(prompts)
        with progress_bar(len(prompts), desc, progress) as bar, \
                ThreadPoolExecutor(max_workers=self.workers) as pool:
            futures = {pool.submit(self.score_prompt, p): i for i, p in enumerate(prompts)}
            try:
                for fut in as_completed(futures):
                    out[futures[fut]] = fut.result()
                    bar.update(1)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return out

    def score(self, spec, questions, answers, progress=False):
        check_lengths(questions, answers)
        return self.scores_for_prompts([spec.judge_prompt(q, a) for q, a in zip(questions, answers)],
                                       progress, f"judge {spec.name}")

    def coherence(self, questions, answers, progress=False):
        check_lengths(questions, answers)
        return self.scores_for_prompts([fill(self.coherence_rubric, q, a) for q, a in zip(questions, answers)],
                                       progress, "judge coherence")


def _body(e: urllib.error.HTTPError) -> str:
    try:
        return e.read().decode("utf-8", "replace")[:300]
    except Exception:  # pragma: no cover - best effort
        return ""
