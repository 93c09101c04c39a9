"""Trait specifications: a trait described in words, the input of the extraction pipeline.

File format (JSON, ``format: "personakern.trait.v1"``)::

    {
      "format": "personakern.trait.v1",
      "name": "evil",                       # [A-Za-z0-9_.-]+, also the vector's trait name
      "description": "...",                 # what counts as the trait (shown to judges)
      "instructions": [                     # >= 5 contrasting system prompts
        {"positive": "...", "negative": "..."}, ...
      ],
      "questions": ["...", ...],            # >= 20 extraction questions
      "eval_questions": ["...", ...],       # >= 20 others, for layer choice and steering sweeps
      "rubric": "... {question} ... {answer} ... a number from 0 to 100 ..."
    }

``rubric`` is the judge's prompt: a template with ``{question}`` and ``{answer}`` exactly once
each (no other braces), asking for a 0-100 score of how strongly the answer shows the trait.
YAML files (``.yaml``/``.yml``) with the same keys are read too when PyYAML is installed.

Built-in specs live in ``personakern/data/traits/<name>.json``; ``load_spec("evil")`` finds
them, ``load_spec("path/to/file.json")`` reads any other.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Tuple, Union

FORMAT = "personakern.trait.v1"
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "data" / "traits"
MIN_PAIRS, MIN_QUESTIONS, MIN_EVAL = 5, 20, 20
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
_KEYS = ("format", "name", "description", "instructions", "questions", "eval_questions", "rubric")


class TraitSpecError(ValueError):
    """A trait spec that cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class TraitSpec:
    name: str
    description: str
    instructions: Tuple[Tuple[str, str], ...]   # (positive, negative) system prompts
    questions: Tuple[str, ...]
    eval_questions: Tuple[str, ...]
    rubric: str
    source: str = field(default="", compare=False)

    @property
    def positive(self) -> List[str]:
        return [p for p, _ in self.instructions]

    @property
    def negative(self) -> List[str]:
        return [n for _, n in self.instructions]

    def judge_prompt(self, question: str, answer: str) -> str:
        """The rubric filled in (plain replacement: braces inside question/answer are safe)."""
        return self.rubric.replace("{question}", question).replace("{answer}", answer)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "name": self.name, "description": self.description,
                "instructions": [{"positive": p, "negative": n} for p, n in self.instructions],
                "questions": list(self.questions), "eval_questions": list(self.eval_questions),
                "rubric": self.rubric}

    @property
    def hash(self) -> str:
        """sha256 (16 hex) of the canonical JSON of the content; stored with extracted vectors."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: Union[str, Path]) -> None:
        from ..utils import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")


def validate(d: dict, strict: bool = True) -> List[str]:
    """Problems with a spec dict, as messages (empty list = valid). ``strict=False`` waives the
    minimum counts (for drafts and tests); types and the rubric template are always checked."""
    errs = []
    if not isinstance(d, dict):
        return [f"a spec is a JSON object, got {type(d).__name__}"]
    if d.get("format", FORMAT) != FORMAT:
        errs.append(f"format must be {FORMAT!r}, got {d.get('format')!r}")
    unknown = sorted(set(d) - set(_KEYS))
    if unknown:
        errs.append(f"unknown keys {unknown} (allowed: {list(_KEYS)})")
    name = d.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        errs.append(f"name must match [A-Za-z0-9_.-]+, got {name!r}")
    if not isinstance(d.get("description"), str) or not d["description"].strip():
        errs.append("description must be a non-empty string")
    ins = d.get("instructions")
    if not isinstance(ins, list) or not ins:
        errs.append("instructions must be a non-empty list of {positive, negative} objects")
    else:
        for i, pair in enumerate(ins):
            if (not isinstance(pair, dict) or set(pair) != {"positive", "negative"}
                    or not all(isinstance(pair[k], str) and pair[k].strip() for k in pair)):
                errs.append(f"instructions[{i}] must be {{\"positive\": str, \"negative\": str}}, both non-empty")
        if strict and len(ins) < MIN_PAIRS:
            errs.append(f"need at least {MIN_PAIRS} instruction pairs, got {len(ins)}")
    for key, least in (("questions", MIN_QUESTIONS), ("eval_questions", MIN_EVAL)):
        qs = d.get(key)
        if not isinstance(qs, list) or not qs or not all(isinstance(q, str) and q.strip() for q in qs):
            errs.append(f"{key} must be a non-empty list of non-empty strings")
            continue
        if strict and len(qs) < least:
            errs.append(f"need at least {least} {key}, got {len(qs)}")
        dup = sorted({q for q in qs if qs.count(q) > 1})
        if dup:
            errs.append(f"{key} has duplicates: {dup[:3]}")
    if isinstance(d.get("questions"), list) and isinstance(d.get("eval_questions"), list):
        both = sorted(set(map(str, d["questions"])) & set(map(str, d["eval_questions"])))
        if both:
            errs.append(f"eval_questions must not repeat extraction questions: {both[:3]}")
    rub = d.get("rubric")
    if not isinstance(rub, str) or not rub.strip():
        errs.append("rubric must be a non-empty string")
    else:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(rub) if f is not None]
        except ValueError as e:
            fields = None
            errs.append(f"rubric is not a valid template ({e}); write literal braces as {{{{ }}}}")
        if fields is not None and sorted(fields) != ["answer", "question"]:
            errs.append(f"rubric must contain {{question}} and {{answer}} once each and no other "
                        f"{{...}} fields, found {fields}")
    return errs


def from_dict(d: dict, source: str = "", strict: bool = True) -> TraitSpec:
    errs = validate(d, strict=strict)
    if errs:
        where = f"{source}: " if source else ""
        raise TraitSpecError(f"{where}invalid trait spec:\n  - " + "\n  - ".join(errs))
    return TraitSpec(d["name"], d["description"].strip(),
                     tuple((p["positive"], p["negative"]) for p in d["instructions"]),
                     tuple(d["questions"]), tuple(d["eval_questions"]), d["rubric"], source)


def _read(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover - PyYAML is common but optional
            raise TraitSpecError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or use JSON")
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TraitSpecError(f"{path}: not valid YAML: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TraitSpecError(f"{path}: not valid JSON: {e}") from None


def builtin_names() -> List[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.json"))


def resolve(name_or_path: Union[str, Path]) -> Path:
    s = str(name_or_path)
    p = Path(s)
    if p.suffix in (".json", ".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"trait spec file {s!r} not found")
        return p
    p = BUILTIN_DIR / f"{s}.json"
    if not p.exists():
        raise FileNotFoundError(f"no built-in trait {s!r}; built-in traits: {', '.join(builtin_names())} "
                                f"(or give a path to a .json/.yaml spec)")
    return p


def load_spec(spec: Union[str, Path, dict, TraitSpec], strict: bool = True) -> TraitSpec:
    """A built-in trait name, a path to a spec file, a dict, or a TraitSpec (returned as is)."""
    if isinstance(spec, TraitSpec):
        return spec
    if isinstance(spec, dict):
        return from_dict(spec, strict=strict)
    path = resolve(spec)
    return from_dict(_read(path), source=str(path), strict=strict)
