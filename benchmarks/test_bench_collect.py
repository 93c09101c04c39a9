"""pytest-benchmark: activation collection on SmolLM2, batched (personakern) vs one answer at a
time with ``output_hidden_states`` (the reference implementation's loop), same 48 answers.

``python benchmarks/test_bench_collect.py`` runs interleaved rounds instead and writes
``benchmarks/results/cpu/collect.json`` (answers/s of both and their ratio).
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pytest

import personakern
from personakern.extraction import collect
from personakern.extraction.spec import load_spec


def answers(n=48):
    """Realistic lengths: built-in questions and system prompts, 20-90-word answers."""
    spec = load_spec("evil")
    words = ("the of and to a in that it is was for on are as with his they at be this have from or one "
             "had by word but not what all were we when your can said there use an each which she do how "
             "their if will up other about out many then them these so some her would make like him").split()
    out = []
    for i in range(n):
        sys_prompt = spec.instructions[i % len(spec.instructions)][i % 2]
        k = 20 + (i * 37) % 70
        out.append((sys_prompt, spec.questions[i % len(spec.questions)],
                    " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(k)) + "."))
    return out


@pytest.fixture(scope="module")
def smollm2():
    return personakern.load_model()


@pytest.mark.parametrize("way", ["batched", "one_at_a_time"])
def test_collect(benchmark, smollm2, way):
    model, tok = smollm2
    samples = answers()
    benchmark.group = "collect 48 answers"
    fn = (lambda: collect.collect_means(model, tok, samples, batch_size=16)) if way == "batched" else \
         (lambda: collect.collect_one_at_a_time(model, tok, samples))
    fn()
    benchmark.pedantic(fn, rounds=3, iterations=1)


if __name__ == "__main__":
    import torch
    model, tok = personakern.load_model()
    res = collect.throughput(model, tok, answers(), batch_size=16, rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 5)
    res.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    out = Path(__file__).parent / "results" / "cpu" / "collect.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"batched {res['batched_answers_per_s']:.2f} answers/s, one at a time "
          f"{res['one_at_a_time_answers_per_s']:.2f} answers/s: {res['speedup']:.2f}x  -> {out}")
