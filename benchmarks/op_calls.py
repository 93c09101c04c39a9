"""Median time of single calls of the cpu backend's ops, for comparing two builds: run it from
two worktrees (each with its own library) in alternating processes and take the ratios per
cell. Only the public ops are called, so any commit since the op contract can be compared.

    python benchmarks/op_calls.py --threads 1 [--sizes decode|prefill|large]

decode: steer_project and add_rms_norm_steer_project (1 steering vector, 8 read-outs) and
rms_norm at N in {1, 16, 64} x D in {576, 2048, 4096}, float32 and bfloat16, microseconds.
prefill: steer_project bf16 with 0 and 8 read-outs at 256 x 2048 ... 8192 x 4096, milliseconds.
large: steer_project and add_rms_norm_steer_project (1 steering vector, 8 read-outs), bf16 and
float32, at N in {2048, 8192} x D in {2048, 4096} (personakern bench's prefill cells), milliseconds.
Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def median_time(f, reps: int, blocks: int) -> float:
    for _ in range(min(reps, 50)):
        f()
    ts = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(reps):
            f()
        ts.append((time.perf_counter() - t) / reps)
    return sorted(ts)[len(ts) // 2]


def decode(cpu) -> dict:
    res = {}
    for dt in (torch.float32, torch.bfloat16):
        for n in (1, 16, 64):
            for d in (576, 2048, 4096):
                h, x = torch.randn(n, d).to(dt), torch.randn(n, d).to(dt)
                w = (1 + 0.1 * torch.randn(d)).to(dt)
                sv = torch.nn.functional.normalize(torch.randn(1, d), dim=1)
                co = torch.full((n, 1), 3.0)
                ro = torch.nn.functional.normalize(torch.randn(8, d), dim=1)
                calls = {
                    "steer_project": lambda: cpu.steer_project(h, x, sv, co, None, None, None, ro),
                    "add_rms_norm_steer_project":
                        lambda: cpu.add_rms_norm_steer_project(h, x, w, 1e-5, False, sv, co, None, None, None, ro),
                    "rms_norm": lambda: cpu.rms_norm(h, w, 1e-5),
                }
                for name, f in calls.items():
                    reps = 400 if n * d < 100_000 else 100
                    res[f"{name} {str(dt)[6:]} {n}x{d}"] = round(median_time(f, reps, 9) * 1e6, 2)
    return res


def prefill(cpu) -> dict:
    res = {}
    for n, d in ((256, 2048), (2048, 2048), (2048, 4096), (8192, 4096)):
        h, x = torch.randn(n, d).bfloat16(), torch.randn(n, d).bfloat16()
        sv = torch.nn.functional.normalize(torch.randn(1, d), dim=1)
        co = torch.full((n, 1), 2.0)
        ro = torch.nn.functional.normalize(torch.randn(8, d), dim=1)
        for m in (0, 8):
            r = ro[:m] if m else None
            reps = max(3, int(2e8 // (n * d * 6)))
            t = median_time(lambda: cpu.steer_project(h, x, sv, co, None, None, None, r), reps, 15)
            res[f"{n}x{d} m{m}"] = round(t * 1e3, 3)
    return res


def large(cpu) -> dict:
    res = {}
    for dt, budget, blocks in ((torch.bfloat16, 1e8, 9), (torch.float32, 0.5e8, 7)):
        torch.manual_seed(0)
        for n, d in ((2048, 2048), (8192, 2048), (2048, 4096), (8192, 4096)):
            h, x = torch.randn(n, d).to(dt), torch.randn(n, d).to(dt)
            sv = torch.nn.functional.normalize(torch.randn(1, d), dim=1)
            co = torch.full((n, 1), 2.0)
            ro = torch.nn.functional.normalize(torch.randn(8, d), dim=1)
            w = torch.ones(d).to(dt)
            reps = max(3, int(budget // (n * d * 6)))
            calls = {
                "steer_project": lambda: cpu.steer_project(h, x, sv, co, None, None, None, ro),
                "add_rms_norm_steer_project":
                    lambda: cpu.add_rms_norm_steer_project(h, x, w, 1e-5, False, sv, co, None, None, None, ro),
            }
            for name, f in calls.items():
                res[f"{name} {str(dt)[6:]} {n}x{d}"] = round(median_time(f, reps, blocks) * 1e3, 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", choices=("decode", "prefill", "large"), default="decode")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from personakern.backends import cpu
    print(json.dumps({"decode": decode, "prefill": prefill, "large": large}[args.sizes](cpu)))


if __name__ == "__main__":
    main()
