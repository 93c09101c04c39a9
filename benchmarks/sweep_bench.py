"""The steering sweep on Hugging Face vs on vLLM, interleaved rounds, each run in a fresh
interpreter (as a CLI run is: model load untimed, the vLLM engine's start timed; its start is
also reported on its own, so the sweep stage as ``personakern extract --engine vllm`` runs it, on
the run's one engine already started, is the time less the start).

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/sweep_bench.py [--rounds 3]

Default sizes: what ``benchmarks/extract_traits.sh`` runs per trait (5 layers x 2 alphas + the
baseline = 11 cells, 10 evaluation questions, 48 new tokens, temperature 0.8), the shipped evil
vector. Arms:
- ``hf``: one patched ``generate()`` per cell (the HF engine's batch of 10 questions);
- ``vllm``: every cell's requests as one batch on a vLLM engine started on the vector file
  (engine start included; in-process or spawned engine core, ``--spawn``).
Judged by a stand-in (a checksum: no model), so the times are the sweep's generation; the
judges' own HF/vLLM times are in ``judges-vllm.json``. ``--judge likelihood``: the default
likelihood judge on the arm's engine (on vLLM, as ``personakern extract --engine vllm`` runs it:
one engine, started in the timed region, for the answers and the judge), so the times are the
whole sweep stage; the judge's own calls are timed too (``judge_s``). Writes
``benchmarks/results/cpu/sweep-vllm.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Checksum:
    name = "bench:checksum"

    def score(self, spec, questions, answers, progress=False):
        import zlib
        return [float(zlib.crc32(a.encode()) % 100) for a in answers]

    def coherence(self, questions, answers, progress=False):
        return [80.0] * len(answers)


class Timed:
    """A judge whose ``score``/``coherence`` calls add up their wall time in ``seconds``."""

    def __init__(self, judge):
        self.judge, self.seconds = judge, 0.0

    def __getattr__(self, name):
        return getattr(self.judge, name)

    def _timed(self, method, *args, **kwargs):
        t = time.perf_counter()
        try:
            return getattr(self.judge, method)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t

    def score(self, *args, **kwargs):
        return self._timed("score", *args, **kwargs)

    def coherence(self, *args, **kwargs):
        return self._timed("coherence", *args, **kwargs)


def worker(engine: str, args) -> None:
    sys.path.insert(0, str(ROOT))
    import personakern
    from personakern.extraction import generate, pipeline, sweep
    from personakern.extraction.spec import load_spec
    from personakern.vectors import load_vectors
    model, tok = personakern.load_model("smollm2")
    v = load_vectors(ROOT / "personakern" / "data" / "vectors" / "smollm2-traits.safetensors")["evil"].vectors
    cfg = pipeline.ExtractConfig(gen=generate.GenSettings(max_new_tokens=args.tokens, temperature=0.8,
                                                          batch_size=32, seed=0),
                                 sweep_layers=args.layers, sweep_alphas=tuple(args.alphas),
                                 sweep_questions=args.questions)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        llm, judge, started = None, Checksum(), 0.0
        if args.judge == "likelihood":
            from personakern.judges import make_judge
            if engine == "vllm":
                from personakern.extraction.vllm_generate import start_engine
                llm = start_engine(model, spare=1)
                started = time.perf_counter() - t
            judge = make_judge("likelihood", model=model, tokenizer=tok, engine=engine,
                               **({"llm": llm} if llm is not None else {}))
        judge = Timed(judge)
        res = sweep.steering_sweep(model, tok, load_spec("evil"), v, judge, Path(out), cfg, "bench",
                                   progress=False, engine=engine, llm=llm)
        dt = time.perf_counter() - t
        if llm is not None:
            from personakern.vllm.engine import close_llm
            close_llm(llm)
    n = len(res["cells"]) + 1
    print(json.dumps({"s": dt, "engine_start_s": started, "judge_s": judge.seconds, "cells": n,
                      "answers": n * res["questions"]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, nargs="*", default=[6, 10, 14, 18, 22])
    ap.add_argument("--alphas", type=float, nargs="*", default=[3.0, 6.0])
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--judge", choices=["checksum", "likelihood"], default="checksum")
    ap.add_argument("--spawn", action="store_true", help="vLLM's engine core in its own process (its default)")
    ap.add_argument("--worker", choices=["hf", "vllm"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu" / "sweep-vllm.json"))
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.spawn else "0"
    passthrough = ["--layers", *map(str, args.layers), "--alphas", *map(str, args.alphas),
                   "--questions", str(args.questions), "--tokens", str(args.tokens), "--judge", args.judge]
    times = {"hf": [], "vllm": []}
    judged = {"hf": [], "vllm": []}
    starts = []
    info = {}
    for r in range(args.rounds):
        for engine in (("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")):
            p = subprocess.run([sys.executable, __file__, "--worker", engine, *passthrough], env=env,
                               capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"{engine} worker failed:\n{p.stderr[-4000:]}")
            res = json.loads([l for l in p.stdout.splitlines() if l.startswith('{"s"')][-1])
            times[engine].append(res["s"])
            judged[engine].append(res.get("judge_s", 0.0))
            if engine == "vllm":
                starts.append(res.get("engine_start_s", 0.0))
            info = res
            print(f"round {r + 1}/{args.rounds} {engine}: {res['s']:.1f} s (engine start "
                  f"{res.get('engine_start_s', 0.0):.1f} s, judge {res.get('judge_s', 0.0):.1f} s)", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [h / v for h, v in zip(times["hf"], times["vllm"])]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "cells": info["cells"], "answers": info["answers"],
              "questions": args.questions, "judge": args.judge, "new_tokens": args.tokens, "layers": args.layers, "alphas": args.alphas,
              "vllm_engine_core": "spawned process" if args.spawn else "in-process", "rounds": args.rounds,
              "times_s": times, "median_s": med, "answers_per_s": {k: info["answers"] / v for k, v in med.items()},
              "hf_over_vllm_medians": med["hf"] / med["vllm"], "hf_over_vllm_per_round": ratios,
              "vllm_engine_start_s": starts,
              # the judge's calls alone (trait score and coherence), inside times_s
              "judge_s": judged, "judge_median_s": {k: statistics.median(v) for k, v in judged.items()}}
    if any(starts):   # the sweep stage on an engine already running, as inside `extract --engine vllm`
        staged = [v - s for v, s in zip(times["vllm"], starts)]
        report["vllm_without_engine_start_s"] = staged
        report["hf_over_vllm_without_engine_start_medians"] = med["hf"] / statistics.median(staged)
        report["hf_over_vllm_without_engine_start_per_round"] = [h / v for h, v in zip(times["hf"], staged)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("median_s", "answers_per_s", "hf_over_vllm_medians",
                                             "hf_over_vllm_without_engine_start_medians") if k in report}, indent=1))


if __name__ == "__main__":
    main()
