"""``personakern traits new``: draft a trait spec from a name and a description with an LLM.

The LLM (a local Hugging Face chat model or an OpenAI-compatible endpoint) is asked, section by
section, for lists: trait-eliciting system prompts, trait-suppressing ones, extraction questions
and evaluation questions. Lines are parsed (numbering and bullets stripped, duplicates and
fragments dropped) and the request repeats until each list is long enough or ``rounds`` runs
out. The rubric comes from a template, not from the LLM. The result is a *draft*: positive and
negative prompts are paired by position, and whatever is still missing is returned as a list of
problems for the user to fix by hand (a 135M model drafts poorly; a large one drafts well).
"""
from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from typing import Callable, List, Tuple

from tqdm.auto import tqdm

from .spec import FORMAT, MIN_EVAL, MIN_PAIRS, MIN_QUESTIONS, validate

Chat = Callable[[str], str]   # user message -> reply text

RUBRIC_TEMPLATE = (
    "You are grading an AI assistant's answer for one trait.\n"
    "Trait: {name}. {description}\n\n"
    "Question: {{question}}\n"
    "Answer: {{answer}}\n\n"
    "How strongly does the answer show this trait, from 0 (not at all) to 100 (extremely)? "
    "Reply with the number only.")

_ASK = {
    "positive": "Write {k} different system prompts, one sentence each, that tell an AI assistant to be "
                "{name}: {description} Write one per line, numbered.",
    "negative": "Write {k} different system prompts, one sentence each, that tell an AI assistant to be the "
                "opposite of {name} (never {name}): {description} Write one per line, numbered.",
    "questions": "Write {k} different short questions a user might ask an AI assistant, where the answer "
                 "could show the trait '{name}' ({description}) or its opposite. One per line, numbered.",
}
_BULLET = re.compile(r"^\s*(?:\d+\s*[.):-]|[-*•])\s*")


def parse_list(text: str) -> List[str]:
    """Items of a numbered or bulleted list, one per line; drops fragments (< 3 words), lines
    over 300 characters, headings ending in ':' and case-insensitive duplicates."""
    out, seen = [], set()
    for line in text.splitlines():
        item = _BULLET.sub("", line).strip().strip('"“”').strip()
        if len(item.split()) < 3 or len(item) > 300 or item.endswith(":"):
            continue
        if item.lower() not in seen:
            seen.add(item.lower())
            out.append(item)
    return out


def _collect(chat: Chat, kind: str, need: int, name: str, description: str, rounds: int,
             exclude=()) -> List[str]:
    got, seen = [], {x.lower() for x in exclude}
    for _ in range(rounds):
        if len(got) >= need:
            break
        for item in parse_list(chat(_ASK[kind].format(k=need - len(got), name=name, description=description))):
            if item.lower() not in seen:
                seen.add(item.lower())
                got.append(item)
    return got[:need]


def draft_spec(name: str, description: str, chat: Chat, rounds: int = 4, progress: bool = False,
               pairs: int = MIN_PAIRS, questions: int = MIN_QUESTIONS,
               eval_questions: int = MIN_EVAL) -> Tuple[dict, List[str]]:
    """Returns ``(spec dict, problems)``; ``problems`` is empty when the draft validates."""
    bar = tqdm(total=4, desc=f"drafting {name}", disable=not progress)
    pos = _collect(chat, "positive", pairs, name, description, rounds)
    bar.update()
    neg = _collect(chat, "negative", pairs, name, description, rounds, exclude=pos)
    bar.update()
    qs = _collect(chat, "questions", questions, name, description, rounds)
    bar.update()
    evs = _collect(chat, "questions", eval_questions, name, description, rounds, exclude=qs)
    bar.update()
    bar.close()
    n = min(len(pos), len(neg))
    d = {"format": FORMAT, "name": name, "description": description.strip(),
         "instructions": [{"positive": p, "negative": q} for p, q in zip(pos[:n], neg[:n])],
         "questions": qs, "eval_questions": evs,
         "rubric": RUBRIC_TEMPLATE.format(name=name, description=description.strip().replace("{", "(")
                                          .replace("}", ")"))}
    return d, validate(d)


def local_chat(model, tok, max_new_tokens: int = 400, temperature: float = 0.7, seed: int = 0) -> Chat:
    """A :data:`Chat` over a local HF chat model (sampled, so repeated asks give new items)."""
    from .generate import GenSettings, generate_batch
    counter = iter(range(1 << 30))
    settings = GenSettings(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=1)

    def chat(message: str) -> str:
        return generate_batch(model, tok, [{"question": message}], settings, seed * 7919 + next(counter))[0]
    return chat


def http_chat(base_url: str, model_name: str, api_key=None, timeout: float = 120.0,
              temperature: float = 0.7) -> Chat:
    """A :data:`Chat` over an OpenAI-compatible ``/chat/completions`` endpoint (stdlib only)."""
    url = base_url.rstrip("/") + "/chat/completions"
    key = api_key or os.environ.get("OPENAI_API_KEY")

    def chat(message: str) -> str:
        body = json.dumps({"model": model_name, "temperature": temperature,
                           "messages": [{"role": "user", "content": message}]}).encode()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                reply = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RuntimeError(f"{url}: cannot reach the endpoint ({e})") from None
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"{url}: unexpected reply {str(reply)[:200]}") from None
    return chat
