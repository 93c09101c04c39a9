"""Wall time of the likelihood and LLM judges on Hugging Face vs on the vLLM engine (SmolLM2, CPU).

The answers are the labelled set's (personakern/data/judges/labelled.jsonl), each judged for its
own trait (the specs of the shipped traits). Per round: the HF judge and the vLLM judge score the
same answers (trait score + coherence), in an order that alternates between rounds; the medians
and every round's times go to the JSON. The vLLM engine is started once (not timed; its start
time is reported) with the judge engine's settings, in its own process as vLLM does by default.

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 python benchmarks/judges_vllm_bench.py \\
        --answers 64 --llm-answers 8 --rounds 3 --out benchmarks/results/cpu/judges-vllm.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_items(n: int):
    rows = [json.loads(l) for l in (ROOT / "personakern/data/judges/labelled.jsonl").read_text().splitlines() if l.strip()]
    rows = rows[:n] if n <= len(rows) else (rows * (n // len(rows) + 1))[:n]
    by_trait = {}
    for r in rows:
        by_trait.setdefault(r["trait"], []).append(r)
    return by_trait


def judge_all(judge, specs, by_trait):
    t = time.perf_counter()
    scores = []
    for trait, rows in by_trait.items():
        qs, ans = [r["question"] for r in rows], [r["answer"] for r in rows]
        scores += list(zip(judge.score(specs[trait], qs, ans), judge.coherence(qs, ans)))
    return time.perf_counter() - t, scores


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--answers", type=int, default=64)
    ap.add_argument("--llm-answers", type=int, default=8, help="answers for the llm judge (0: skip it)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cpu/judges-vllm.json"))
    args = ap.parse_args()

    import torch
    import personakern
    from personakern.extraction.spec import load_spec
    from personakern.judges import make_judge
    from personakern.judges.vllm_engine import judge_engine

    model, tok = personakern.load_model("smollm2")
    t = time.perf_counter()
    llm = judge_engine("smollm2")
    engine_start = time.perf_counter() - t
    arms = {("likelihood", "hf"): make_judge("likelihood", model, tok),
            ("likelihood", "vllm"): make_judge("likelihood", model, tok, engine="vllm", llm=llm)}
    if args.llm_answers:
        arms[("llm", "hf")] = make_judge("llm", model, tok, min_mass=0.0)
        arms[("llm", "vllm")] = make_judge("llm", model, tok, engine="vllm", llm=llm, min_mass=0.0)
    items = {"likelihood": load_items(args.answers), "llm": load_items(args.llm_answers)}
    specs = {t: load_spec(t) for t in set(items["likelihood"]) | set(items["llm"])}
    for (kind, engine), judge in arms.items():   # warm-up, untimed
        judge_all(judge, specs, {k: v[:1] for k, v in list(items[kind].items())[:1]})
    times = {f"{k}/{e}": [] for k, e in arms}
    diffs = {}
    for r in range(args.rounds):
        for kind in ("likelihood", "llm"):
            if (kind, "hf") not in arms:
                continue
            order = ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")
            got = {}
            for engine in order:
                dt, got[engine] = judge_all(arms[(kind, engine)], specs, items[kind])
                times[f"{kind}/{engine}"].append(dt)
                print(f"round {r} {kind}/{engine}: {dt:.1f} s", flush=True)
            d = [abs(a - b) for x, y in zip(got["hf"], got["vllm"]) for a, b in zip(x, y)
                 if a is not None and b is not None]
            diffs[kind] = max(d + [diffs.get(kind, 0.0)])
    res = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads(), "model": "SmolLM2-135M-Instruct fp32",
           "answers": {"likelihood": args.answers, "llm": args.llm_answers}, "rounds": args.rounds,
           "vllm_engine_start_s": round(engine_start, 1), "times_s": times,
           "median_s": {k: round(statistics.median(v), 2) for k, v in times.items()},
           "max_abs_score_difference_points": diffs}
    for kind in ("likelihood", "llm"):
        if f"{kind}/hf" in res["median_s"]:
            res.setdefault("speedup_vllm_over_hf", {})[kind] = round(
                res["median_s"][f"{kind}/hf"] / res["median_s"][f"{kind}/vllm"], 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("median_s", "speedup_vllm_over_hf", "max_abs_score_difference_points")}))


if __name__ == "__main__":   # vLLM starts its engine process with spawn
    main()
