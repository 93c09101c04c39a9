"""Reading a chat-format training set line by line, with every bad line accounted for.

Accepted records (one JSON object per line):

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: the last message must be the
  assistant's response; the messages before it are the prompt (roles ``system``, ``user``,
  ``assistant``; at least one ``user``);
- ``{"prompt": "...", "response": "..."}``, optionally with ``"system"``.

An optional ``"id"`` names the sample (default ``line<N>``). Line numbers are 1-based, as an
editor shows them. A line that is not one of these — bad JSON, not UTF-8, a missing field, an
empty response, an unknown role — is *malformed*: the reader yields it as a
:class:`Malformed` with the reason, so the caller decides whether to skip or stop. Nothing is
ever dropped without a record.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator, List, Optional, Union

ROLES = ("system", "user", "assistant")


class ScreenDataError(ValueError):
    """A problem with the training-set file (missing, unreadable, a malformed line under
    ``on_error="stop"``)."""


@dataclass
class Sample:
    line: int
    id: str
    prompt: List[dict]      # chat messages before the response
    response: str


@dataclass
class Malformed:
    line: int
    reason: str


def _check_messages(msgs) -> Optional[str]:
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {k} must be an object with string 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"message {k} has role {m['role']!r} (expected one of {', '.join(ROLES)})"
    if msgs[-1]["role"] != "assistant":
        return f"the last message must be the assistant's response, got role {msgs[-1]['role']!r}"
    if not any(m["role"] == "user" for m in msgs[:-1]):
        return "no user message before the response"
    return None


def parse_line(raw: bytes, line: int) -> Union[Sample, Malformed]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Malformed(line, f"not UTF-8 ({e.reason} at byte {e.start})")
    if not text.strip():
        return Malformed(line, "empty line")
    try:
        rec = json.loads(text)
    except ValueError as e:
        return Malformed(line, f"not valid JSON ({e})")
    if not isinstance(rec, dict):
        return Malformed(line, f"expected a JSON object, got {type(rec).__name__}")
    sid = rec.get("id")
    sid = f"line{line}" if sid is None else str(sid)
    if "messages" in rec:
        why = _check_messages(rec["messages"])
        if why:
            return Malformed(line, why)
        prompt = [{"role": m["role"], "content": m["content"]} for m in rec["messages"][:-1]]
        response = rec["messages"][-1]["content"]
    elif "prompt" in rec or "response" in rec:
        missing = [k for k in ("prompt", "response") if not isinstance(rec.get(k), str)]
        if missing:
            return Malformed(line, f"missing or non-string field {missing[0]!r}")
        if not rec["prompt"].strip():
            return Malformed(line, "empty prompt")
        system = rec.get("system")
        if system is not None and not isinstance(system, str):
            return Malformed(line, "'system' must be a string")
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": rec["prompt"]}]
        response = rec["response"]
    else:
        return Malformed(line, "neither 'messages' nor 'prompt'/'response' fields")
    if not response.strip():
        return Malformed(line, "empty response")
    return Sample(line, sid, prompt, response)


def iter_records(path) -> Iterator[Union[Sample, Malformed]]:
    """Every line of ``path`` parsed, one at a time (the file is never held in memory)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ScreenDataError(f"{path}: file not found") from None
    except OSError as e:
        raise ScreenDataError(f"{path}: cannot read: {e}") from None
    with f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark (some editors write one)
            yield parse_line(raw.rstrip(b"\r\n"), n)


def iter_chunks(path, chunk_size: int) -> Iterator[tuple]:
    """``(chunk_index, [Sample, ...])`` of consecutive valid samples, ``chunk_size`` each
    (the last may be shorter); malformed lines are passed over (:func:`scan` reports them)."""
    cur, c = [], 0
    for r in iter_records(path):
        if isinstance(r, Sample):
            cur.append(r)
            if len(cur) == chunk_size:
                yield c, cur
                cur, c = [], c + 1
    if cur:
        yield c, cur
