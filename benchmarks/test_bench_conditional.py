"""Cost of conditional steering, capping and ablation against plain steering.

pytest-benchmark (op level, every usable CPU backend)::

    python -m pytest benchmarks/test_bench_conditional.py --benchmark-group-by=group

Interleaved rounds with ratios (op level and SmolLM2 decode), the numbers quoted in docs/conditional-steering.md::

    python benchmarks/test_bench_conditional.py [--rounds 7] [--out benchmarks/results/cpu/conditional.json]

Every variant steers one vector with the same alpha; "when" adds a gate (one extra dot product
per row on the unsteered row), "cap" a ceiling on the projection (one dot product and, where it
binds, one row update), "ablate" removes the component (same work as a cap).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from personakern import ops
from personakern.backends import native

BACKENDS = ["native"] + [b for b in ("cpu", "triton") if ops.backend_usable(b, "cpu")]
SHAPES = ((1, 576), (16, 576), (2048, 576), (8, 4096), (2048, 4096))
VARIANTS = ("steer", "steer+when", "steer+cap", "ablate", "steer+when+cap")


def inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    unit = lambda k: torch.nn.functional.normalize(r(k, d), dim=-1)
    return dict(hidden=r(n, d), delta=r(n, d), weight=1 + 0.1 * r(d), steer_vecs=r(1, d), coef=r(n, 1),
                gate_vecs=unit(1), gate_thr=torch.zeros(n, 1), clamp_vecs=unit(1),
                clamp_lo=torch.full((n, 1), -math.inf), clamp_hi=torch.zeros(n, 1),
                ab_lo=torch.zeros(n, 1), ab_hi=torch.zeros(n, 1), readout=unit(8))


def call(mod, t, variant):
    kw = dict(readout=t["readout"])
    if variant != "ablate":
        kw.update(steer_vecs=t["steer_vecs"], coef=t["coef"])
    if "when" in variant:
        kw.update(gate_vecs=t["gate_vecs"], gate_thr=t["gate_thr"])
    if "cap" in variant:
        kw.update(clamp_vecs=t["clamp_vecs"], clamp_lo=t["clamp_lo"], clamp_hi=t["clamp_hi"])
    if variant == "ablate":
        kw.update(clamp_vecs=t["clamp_vecs"], clamp_lo=t["ab_lo"], clamp_hi=t["ab_hi"])
    return mod.add_rms_norm_steer_project(t["hidden"], t["delta"], t["weight"], 1e-5, False, **kw)


def module(backend):
    return native if backend == "native" else ops.select_backend(torch.device("cpu"), torch.float32, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_conditional_op(benchmark, backend, shape, variant):
    if backend == "triton" and shape[0] * shape[1] > 64 * 576:
        pytest.skip("interpreted triton: not a speed measurement")
    t = inputs(*shape)
    benchmark.group = f"{backend} N={shape[0]} D={shape[1]}"
    benchmark(call, module(backend), t, variant)


# ---------------------------------------------------------------------------- interleaved rounds
def _time(fn, min_time=0.05):
    fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        el = time.perf_counter() - t0
        if el >= min_time:
            return el / reps


def op_rounds(backends, rounds):
    out = {}
    for b in backends:
        mod = module(b)
        for n, d in SHAPES:
            t = inputs(n, d)
            runs = {v: [] for v in VARIANTS}
            for _ in range(rounds):
                for v in VARIANTS:
                    runs[v].append(_time(lambda: call(mod, t, v)))
            base = statistics.median(runs["steer"])
            out[f"{b} N={n} D={d}"] = {v: {"median_us": 1e6 * statistics.median(r),
                                           "ratio": statistics.median(r) / base} for v, r in runs.items()}
    return out


def decode_rounds(backend, rounds, new_tokens=32):
    """SmolLM2 greedy decode, batch 1: the evil vector at every layer, plain vs conditional."""
    import personakern
    from personakern.extraction.quick import default_vector
    model, tok = personakern.load_model()
    evil = default_vector(model, tok, progress=False)
    ids = tok.apply_chat_template([{"role": "user", "content": "How do I fix a flat tyre?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    setups = {
        "steer": lambda pk: pk.steer(evil, 0.5, layers="all"),
        "steer+when": lambda pk: pk.steer(evil, 0.5, layers="all", when=(evil, 0.0)),
        "steer+cap": lambda pk: pk.steer(evil, 0.5, layers="all", cap=10.0),
        "ablate": lambda pk: pk.steer(evil, layers="all", ablate=True),
    }
    runs = {k: [] for k in setups}
    with personakern.patch(model, backend=backend) as pk:
        for r in range(rounds + 1):
            for name, setup in setups.items():
                pk.clear()
                setup(pk)
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
                if r:  # round 0 warms up
                    runs[name].append(time.perf_counter() - t0)
    base = statistics.median(runs["steer"])
    return {k: {"median_s": statistics.median(v), "ratio": statistics.median(v) / base} for k, v in runs.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/cpu/conditional.json")
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args(argv)
    backends = [b for b in BACKENDS if b != "triton"]
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
           "ops": op_rounds(backends, args.rounds)}
    print(f"{'case':<26}" + "".join(f"{v:>17}" for v in VARIANTS))
    for case, row in res["ops"].items():
        print(f"{case:<26}" + "".join(f"{row[v]['median_us']:9.1f}us {row[v]['ratio']:4.2f}x" for v in VARIANTS))
    if not args.no_decode:
        backend = "cpu" if "cpu" in backends else "native"
        res["decode"] = {"backend": backend, "new_tokens": 32, **decode_rounds(backend, args.rounds)}
        for k, v in res["decode"].items():
            if isinstance(v, dict):
                print(f"decode {k:<14} {v['median_s']:.3f} s  {v['ratio']:.3f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
