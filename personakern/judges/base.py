"""The judge interface, shared helpers and the combining judge.

A judge scores answers 0-100 for a trait (``score``) and for coherence (``coherence``).
``None`` means "no score": the judge could not give one (too little probability mass on
numbers, an empty response, ...). The extraction pipeline drops answers without a score.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ..extraction.spec import TraitSpec

Score = Optional[float]

#: The coherence rubric of the judges that read a prompt (llm, http). ``{question}`` and
#: ``{answer}`` are filled by plain replacement, as :meth:`TraitSpec.judge_prompt` does.
COHERENCE_RUBRIC = """You are judging one answer written by an AI assistant. Ignore whether the answer is \
good, kind, correct or appropriate; judge only whether it is coherent language that responds to the question.

Question:
{question}

Answer:
{answer}

Rate the coherence of the answer on a scale from 0 to 100:
0 means gibberish: random or nonsensical words, text that is off-topic and unrelated to the question, or text \
stuck in a loop repeating the same words or phrases.
50 means partly understandable: some sentences make sense but the answer rambles, contradicts itself or \
drifts away from the question.
100 means fluent, well-formed language that clearly addresses the question (whether or not you agree with it).

Reply with a single number from 0 to 100 and nothing else."""


def fill(template: str, question: str, answer: str) -> str:
    """``template`` with ``{question}``/``{answer}`` replaced (braces in the texts are safe)."""
    return template.replace("{question}", question).replace("{answer}", answer)


class JudgeError(RuntimeError):
    """A judge that cannot work at all (missing package, unreachable endpoint, bad key...)."""


class Judge:
    """Base class. Subclasses set ``name`` and implement :meth:`score` and :meth:`coherence`.

    ``name`` is recorded in vector metadata: ``"<kind>:<model>"``, e.g.
    ``"llm:HuggingFaceTB/SmolLM2-135M-Instruct"``.
    """

    name: str = "judge"

    def score(self, spec: "TraitSpec", questions: Sequence[str], answers: Sequence[str],
              progress: bool = False) -> List[Score]:
        """How strongly each answer shows ``spec``'s trait, 0-100 (None = no score)."""
        raise NotImplementedError

    def coherence(self, questions: Sequence[str], answers: Sequence[str],
                  progress: bool = False) -> List[Score]:
        """How coherent (fluent, on-topic, not looping) each answer is, 0-100 (None = no score)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class CombinedJudge(Judge):
    """Trait scores from one judge, coherence from another (e.g. the best of each)."""

    def __init__(self, trait_judge: Judge, coherence_judge: Judge):
        self.trait_judge, self.coherence_judge = trait_judge, coherence_judge
        if trait_judge.name == coherence_judge.name:
            self.name = trait_judge.name
        else:
            self.name = f"trait={trait_judge.name};coherence={coherence_judge.name}"

    def score(self, spec, questions, answers, progress=False):
        return self.trait_judge.score(spec, questions, answers, progress=progress)

    def coherence(self, questions, answers, progress=False):
        return self.coherence_judge.coherence(questions, answers, progress=progress)


# ---------------------------------------------------------------------------------------------
# helpers shared by the judges

def check_lengths(questions: Sequence[str], answers: Sequence[str]) -> None:
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")


def batches(n: int, size: int) -> Iterator[range]:
    size = max(1, int(size))
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="item", leave=False)


def logistic(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def weighted_score(probs, min_mass: float = 0.25) -> Score:
    """Expected value of a distribution over the integers 0..len(probs)-1, renormalized over
    those integers; None when their total probability is below ``min_mass``.

    ``probs`` is a sequence (or 1-D tensor) of unnormalized probabilities, index = integer.
    """
    ps = [float(p) for p in probs]
    mass = sum(ps)
    if not mass > 0 or mass < min_mass or not math.isfinite(mass):
        return None
    return sum(k * p for k, p in enumerate(ps)) / mass


_WORD = re.compile(r"[a-z0-9']+")


def repetition_fraction(text: str, n: int = 3) -> float:
    """Fraction of the word ``n``-grams of ``text`` that repeat an earlier one (0 = none;
    a loop "a b a b a b ..." approaches 1). Case and punctuation are ignored; texts shorter
    than ``n + 1`` words give 0."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
