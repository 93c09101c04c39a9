"""``personakern extract`` on the Hugging Face engine vs the vLLM engine: wall time of the whole
command, interleaved rounds, each in a fresh process and a fresh run folder (nothing cached).

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/extract_bench.py [--rounds 2]

Sizes: what ``benchmarks/extract_traits.sh`` runs per trait (12 extraction and 12 evaluation
questions, 5 instruction pairs, 1 sample, 48 new tokens, held-out answers under all 5 pairs:
240 generated answers; the default likelihood judge; a steering sweep of 5 layers x 2 alphas + the
baseline on 10 questions). Arms: ``--engine hf`` (generate(), judges and sweep on Hugging Face in
the process) and ``--engine vllm`` (answers and their activations from a vLLM engine, the judges
and the sweep on vLLM engines). Reported per arm: the median wall time (model load and engine
starts included, Python start and imports included), the pipeline's own stage times from
``report.json``, and generation throughput with activation capture (answers/s of the generate
stage) beside the reference implementation's one-at-a-time loop (4.25 answers/s on this machine,
``benchmarks/results/cpu/collect.json``). Writes ``benchmarks/results/cpu/extract-vllm.json``.
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
SIZE = ["--n", "1", "--questions", "12", "--max-new-tokens", "48", "--heldout-pairs", "5", "--batch-size", "32",
        "--sweep-layers", "6", "10", "14", "18", "22", "--sweep-alphas", "3", "6", "--sweep-questions", "10"]


def one(engine: str, trait: str, extra: list) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "personakern", "extract", "--trait", trait, "--engine", engine,
               "--out", out, "--quiet"] + SIZE + extra
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"{engine}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
        rep = json.loads((Path(out) / "report.json").read_text())
    return {"wall_s": wall, "stages_s": rep["seconds"], "chosen_layer": rep["chosen"]["layer"],
            "kept": {s: rep["counts"][s]["kept"] for s in rep["counts"]},
            "heldout_auroc_at_chosen": rep["chosen"]["auroc"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--trait", default="evil")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu" / "extract-vllm.json"))
    ap.add_argument("--extra", default="", help="more extract options for both arms (one string)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    runs = {"hf": [], "vllm": []}
    for r in range(args.rounds):
        for engine in (("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")):
            res = one(engine, args.trait, args.extra.split())
            runs[engine].append(res)
            print(f"round {r + 1} {engine}: {res['wall_s']:.1f} s  stages {res['stages_s']}", flush=True)
    med = {e: statistics.median(x["wall_s"] for x in v) for e, v in runs.items()}
    gen = {e: statistics.median(x["stages_s"]["generate_s"] for x in v) for e, v in runs.items()}
    total_answers = 240   # 12 questions x 5 pairs x 2 sides, + 12 evaluation questions x 5 pairs x 2 sides
    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "trait": args.trait,
        "command": "personakern extract --trait T --engine E " + " ".join(SIZE) + " " + args.extra,
        "rounds": args.rounds, "runs": runs, "median_wall_s": med,
        "speedup_whole_extract": med["hf"] / med["vllm"],
        "stage_medians_s": {e: {k: statistics.median(x["stages_s"][k] for x in v) for k in v[0]["stages_s"]}
                            for e, v in runs.items()},
        "generate_answers_per_s_with_capture": {e: total_answers / gen[e] for e in gen},
        "reference_one_at_a_time_answers_per_s": 4.25,
    }
    summary["speedup_sweep"] = (summary["stage_medians_s"]["hf"]["sweep_s"]
                                / summary["stage_medians_s"]["vllm"]["sweep_s"])
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("median_wall_s", "speedup_whole_extract", "speedup_sweep",
                                              "stage_medians_s", "generate_answers_per_s_with_capture")}, indent=1))


if __name__ == "__main__":
    main()
