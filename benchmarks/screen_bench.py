"""``personakern screen`` on the toy set, Hugging Face engine vs vLLM engine: wall time of the
whole command (fresh process, fresh output folder, model load and engine start included),
interleaved rounds, and the largest dP difference between the engines' rankings.

    HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 python benchmarks/screen_bench.py [--rounds 1]

Writes ``benchmarks/results/cpu/screen-vllm.json``.
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
CMD = ["screen", "--data", "benchmarks/screen_toy.jsonl", "--vectors",
       "personakern/data/vectors/smollm2-traits.safetensors", "--traits", "evil", "humorous", "--no-progress"]


def one(engine: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "personakern"] + CMD + ["--engine", engine, "--out", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{engine}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu" / "screen-vllm.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    times = {"hf": [], "vllm": []}
    worst = 0.0
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            rows = {}
            for engine in (("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")):
                times[engine].append(one(engine, Path(tmp) / engine))
                rows[engine] = {x["id"]: x for x in map(json.loads, (Path(tmp) / engine / "ranked.jsonl").read_text().splitlines())}
                print(f"round {r + 1} {engine}: {times[engine][-1]:.1f} s", flush=True)
            for i, h in rows["hf"].items():
                for k in ("dP_evil", "dP_humorous"):
                    worst = max(worst, abs(rows["vllm"][i][k] - h[k]))
    med = {e: statistics.median(v) for e, v in times.items()}
    res = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cores": os.cpu_count(),
           "command": "personakern " + " ".join(CMD) + " --engine E", "samples": 40, "base_answer_tokens": 64,
           "rounds": args.rounds, "times_s": times, "median_s": med, "speedup": med["hf"] / med["vllm"],
           "max_abs_dP_difference": worst}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("median_s", "speedup", "max_abs_dP_difference")}))


if __name__ == "__main__":
    main()
