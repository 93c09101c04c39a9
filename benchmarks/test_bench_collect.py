"""pytest-benchmark: activation collection on SmolLM2, batched (personakern) vs one answer at a
time with ``output_hidden_states`` (the reference implementation's loop), same 48 answers.

``python benchmarks/test_bench_collect.py`` runs interleaved rounds instead, adds the
pipeline's capture during generation, and writes ``benchmarks/results/cpu/collect.json``.
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


def capture_comparison(model, tok, n=48, rounds=5, max_new_tokens=64, batch_size=16) -> dict:
    """The pipeline's way (means captured during generation) against the reference way (generate,
    then one teacher-forced forward per answer) and a batched teacher-forced pass, on the same
    answers. Rounds interleave: generate, generate+capture, one-at-a-time, batched. The cost of
    capture is the median paired difference of the two generation times."""
    import statistics
    import time
    from personakern.extraction import generate
    spec = load_spec("evil")
    jobs = [{"id": str(i), "system": spec.instructions[i % 5][i % 2], "question": spec.questions[i % 20]}
            for i in range(n)]
    st = generate.GenSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=0)
    batches = [jobs[i:i + batch_size] for i in range(0, n, batch_size)]

    def gen(capture):
        outs = [generate.generate_batch(model, tok, b, st, k, capture=capture) for k, b in enumerate(batches)]
        return [a for o in outs for a in (o[0] if capture else o)]
    answers = gen(False)
    samples = [(j["system"], j["question"], a or ".") for j, a in zip(jobs, answers)]
    t = {"generate": [], "generate+capture": [], "one_at_a_time": [], "batched_teacher_forced": []}
    for _ in range(rounds):
        for name, fn in (("generate", lambda: gen(False)), ("generate+capture", lambda: gen(True)),
                         ("one_at_a_time", lambda: collect.collect_one_at_a_time(model, tok, samples)),
                         ("batched_teacher_forced", lambda: collect.collect_means(model, tok, samples, batch_size))):
            t0 = time.perf_counter()
            fn()
            t[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in t.items()}
    overhead = statistics.median([c - g for c, g in zip(t["generate+capture"], t["generate"])])
    return {"answers": n, "max_new_tokens": max_new_tokens, "batch_size": batch_size, "rounds": rounds,
            "seconds": t, "median_s": med, "capture_overhead_s": overhead,
            "capture_overhead_pct_of_generation": 100 * overhead / med["generate"],
            "answers_per_s": {"one_at_a_time": n / med["one_at_a_time"],
                              "batched_teacher_forced": n / med["batched_teacher_forced"],
                              "captured_during_generation": (n / overhead) if overhead > 0 else float("inf")},
            "speedup_vs_one_at_a_time": {"batched_teacher_forced": med["one_at_a_time"] / med["batched_teacher_forced"],
                                         "captured_during_generation": (med["one_at_a_time"] / overhead)
                                         if overhead > 0 else float("inf")}}


if __name__ == "__main__":
    import torch
    model, tok = personakern.load_model()
    res = capture_comparison(model, tok, rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 5)
    res.update(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    out = Path(__file__).parent / "results" / "cpu" / "collect.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    a, s = res["answers_per_s"], res["speedup_vs_one_at_a_time"]
    print(f"one at a time {a['one_at_a_time']:.2f} answers/s; batched teacher-forced {a['batched_teacher_forced']:.2f} "
          f"({s['batched_teacher_forced']:.2f}x); captured during generation: overhead "
          f"{res['capture_overhead_s']:.2f} s = {res['capture_overhead_pct_of_generation']:.1f}% of generation "
          f"({s['captured_during_generation']:.1f}x)  -> {out}")
