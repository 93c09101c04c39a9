"""What personakern adds per block output inside vLLM's decoder, op level, on the CPU.

    python benchmarks/vllm_op_cost.py [--rows 32] [--rounds 7]

A stand-in for vLLM's decoder: 30 blocks of SmolLM2's width (576), each a matmul (the rest of
the block, identical in every arm) then the block-output slot, whose arms are
- ``inductor add+RMSNorm``: vLLM's own plain-PyTorch fused add + RMSNorm, as traced;
- ``step op``: personakern's step-table op (``personakern::cpu_step_add_rms_norm``), with the
  step's flags: a plain step (no steering, no read-outs), steering, steering + read-outs of 8
  traits;
- ``fused op with views``: the path before the step op (the backend's custom op given the
  table rows as argument views, read-outs copied into the step table), for comparison.
Each arm is compiled with torch.compile (fullgraph, as vLLM's default mode) and also run eager;
interleaved rounds, median microseconds per block over plain inductor's time.
Results: benchmarks/results/cpu/vllm/op-cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from personakern import ops as ops_dispatch  # noqa: E402
from personakern.backends import cpu  # noqa: E402
from personakern.vllm.tables import StepTables  # noqa: E402

L, T, D, EPS = 30, 8, 576, 1e-5


def plain_add_norm(x, residual, weight):
    # vLLM's RMSNorm.forward_native with a residual (what inductor traces in its place)
    x = x + residual
    residual = x
    var = x.pow(2).mean(dim=-1, keepdim=True)
    return x * torch.rsqrt(var + EPS) * weight, residual


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32, help="tokens in the step (decode: one per request)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu" / "vllm" / "op-cost.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    backend = ops_dispatch.select_backend(torch.device("cpu"), torch.float32, "cpu")
    tables = StepTables(torch.randn(L, T, D), 256, T, "cpu", backend)
    assert tables.handle is not None, cpu.unavailable_reason()
    old = StepTables(torch.randn(L, T, D), 256, T, "cpu", backend)
    old._step_op = None   # the argument path
    cpu.step_flags(old.handle, True, True)
    mats = [torch.randn(D, D) / D ** 0.5 for _ in range(L)]
    w = torch.rand(D) + 0.5
    res, x = torch.randn(args.rows, D), torch.randn(args.rows, D)

    def model(slot):
        def run(res, x):
            for b in range(L):
                x = x @ mats[b]
                x, res = slot(b, res, x)
            return x, res
        return run

    slots = {"inductor add+RMSNorm": lambda b, r, x: plain_add_norm(x, r, w),
             "step op": lambda b, r, x: tables.apply(b, r, x, w, EPS),
             "fused op with views": lambda b, r, x: old.apply(b, r, x, w, EPS)}
    flags = {"plain step": (False, False), "steering": (True, False), "steering + 8 read-outs": (True, True)}
    arms = [("inductor add+RMSNorm", None), *(("step op", f) for f in flags), ("fused op with views", None)]
    times = {}
    with torch.inference_mode():
        fns = {}
        for mode in ("compiled", "eager"):
            for name, fl in arms:
                fn = model(slots[name])
                fns[(mode, name, fl)] = torch.compile(fn, fullgraph=True, dynamic=False) if mode == "compiled" else fn
        for key, fn in fns.items():   # trace and warm up
            if key[2]:
                cpu.step_flags(tables.handle, *flags[key[2]])
            fn(res, x)
        for r in range(args.rounds):
            keys = list(fns)
            keys = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in keys:
                if key[2]:
                    cpu.step_flags(tables.handle, *flags[key[2]])
                t = time.perf_counter()
                for _ in range(args.calls):
                    fns[key](res, x)
                times.setdefault(key, []).append((time.perf_counter() - t) / args.calls / L * 1e6)
    rows = []
    for mode in ("compiled", "eager"):
        base = times[(mode, "inductor add+RMSNorm", None)]
        for name, fl in arms:
            ts = times[(mode, name, fl)]
            rows.append({"mode": mode, "arm": name + (f" ({fl})" if fl else ""), "us_per_block": statistics.median(ts),
                         "extra_us_per_block": statistics.median(a - b for a, b in zip(ts, base))})
    report = {"rows": args.rows, "hidden": D, "blocks": L, "traits": T, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "arms": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{args.rows} rows x {D}, {L} blocks, {torch.get_num_threads()} threads; us per block "
          f"(matmul included), and extra over vLLM's own add+RMSNorm (median of per-round differences)")
    for row in rows:
        print(f"{row['mode']:9s} {row['arm']:46s} {row['us_per_block']:8.2f} {row['extra_us_per_block']:+8.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
