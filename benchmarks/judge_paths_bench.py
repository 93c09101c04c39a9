"""The vLLM likelihood judge's two ways to get answer-token log-probabilities, on one engine:
scoring requests computed inside the engine (``personakern_score``, personakern/vllm/scores.py)
against vLLM's prompt log-probabilities. Same engine (``start_engine``, as ``extract --engine
vllm`` starts it), prefix cache reset before each arm, arms in alternating order per round.

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
        python benchmarks/judge_paths_bench.py [--rounds 4] [--trait evil]

Answers: the labelled set's for the trait (personakern/data/judges/labelled.jsonl), trait score
and coherence (11 scored sequences per answer). Writes
``benchmarks/results/cpu/judge-paths.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--trait", default="evil")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu" / "judge-paths.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import personakern
    import personakern.judges.vllm_engine as ve
    from personakern.extraction.spec import load_spec
    from personakern.extraction.vllm_generate import start_engine
    from personakern.judges import make_judge
    from personakern.vllm.engine import close_llm
    rows = [json.loads(l) for l in (ROOT / "personakern/data/judges/labelled.jsonl").read_text().splitlines()
            if l.strip()]
    rows = [r for r in rows if r["trait"] == args.trait]
    qs, ans = [r["question"] for r in rows], [r["answer"] for r in rows]
    model, tok = personakern.load_model("smollm2")
    llm = start_engine(model, spare=1)
    judge = make_judge("likelihood", model=model, tokenizer=tok, engine="vllm", llm=llm)
    spec = load_spec(args.trait)
    has_scores = ve.engine_scores
    times = {"scores": [], "prompt_logprobs": []}
    results = {}
    try:
        for r in range(args.rounds):
            for arm in (("scores", "prompt_logprobs") if r % 2 == 0 else ("prompt_logprobs", "scores")):
                ve.engine_scores = has_scores if arm == "scores" else (lambda llm_: False)
                llm.reset_prefix_cache()
                t = time.perf_counter()
                results[arm] = judge.score(spec, qs, ans) + judge.coherence(qs, ans)
                times[arm].append(time.perf_counter() - t)
                print(f"round {r + 1} {arm}: {times[arm][-1]:.2f} s", flush=True)
    finally:
        ve.engine_scores = has_scores
        close_llm(llm)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "trait": args.trait,
              "answers": len(ans), "sequences": len(ans) * (2 * len(spec.instructions) + 1), "rounds": args.rounds,
              "times_s": times, "median_s": med, "prompt_logprobs_over_scores": med["prompt_logprobs"] / med["scores"],
              "max_score_difference": max(abs(a - b) for a, b in zip(results["scores"], results["prompt_logprobs"])
                                          if a is not None and b is not None)}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("median_s", "prompt_logprobs_over_scores", "max_score_difference")}))


if __name__ == "__main__":
    main()
