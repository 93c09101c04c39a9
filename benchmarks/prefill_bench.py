"""SmolLM2 prefill 8 x 256 (fp32, no cache): unpatched vs personakern's cpu backend idle, steering
all layers, and steering + monitoring 8 traits at all layers, in interleaved rounds
(personakern.benchmark.e2e), plus the fused ops' share of the forward: the op timed alone at the
forward's size, times the calls one forward makes, over the forward's median.

    python benchmarks/prefill_bench.py [--rounds 9] [--threads 2] [--out benchmarks/results/cpu/prefill-8x256.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def op_share(model, backend_mod, forward_s, rows, monitor: bool) -> dict:
    """Seconds the fused ops take in one steered (+ monitored) forward, timed alone."""
    from torch.utils import benchmark
    cfg = model.config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    h, x = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
    w = 1 + 0.1 * torch.randn(d, generator=g)
    vec, coef = torch.randn(1, d, generator=g), torch.full((rows, 1), 0.5)
    ro = torch.nn.functional.normalize(torch.randn(8, d, generator=g), dim=-1) if monitor else None
    threads = torch.get_num_threads()

    def t(stmt, **kw):
        return benchmark.Timer(stmt, globals={"o": backend_mod, **kw}, num_threads=threads).blocked_autorange(
            min_run_time=0.5).median
    # per block: the mid-block add+norm (steer_project-free add_rms_norm) and the block output op
    mid = t("o.add_rms_norm(h, x, w, 1e-5)", h=h, x=x, w=w)
    out = t("o.add_rms_norm_steer_project(h, x, w, 1e-5, False, v, c, None, None, None, r)", h=h, x=x, w=w, v=vec,
            c=coef, r=ro)
    total = layers * (mid + out)
    return {"mid_block_us": mid * 1e6, "block_output_us": out * 1e6, "per_forward_ms": total * 1e3,
            "share_of_forward": total / forward_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/cpu/prefill-8x256.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from personakern import models, ops
    from personakern.backends import cpu
    from personakern.benchmark import e2e, report
    path = models.resolve("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    res = e2e.run_e2e(model, tok, backends=("cpu",), rounds=args.rounds, kinds=("prefill",),
                      log=lambda m: print(m, file=sys.stderr))
    print(report.e2e_table(res))
    rows = 8 * 256
    mod = ops.select_backend(torch.device("cpu"), torch.float32, "cpu")
    fwd = res["prefill"]["personakern[cpu] steer + monitor 8"]["median_s"]
    share = op_share(model, mod, fwd, rows, monitor=True)
    print(f"fused ops in one steered + monitored forward (timed alone): {share['per_forward_ms']:.1f} ms of "
          f"{fwd * 1e3:.0f} ms = {share['share_of_forward']:.1%} (per block: add_rms_norm {share['mid_block_us']:.0f} us, "
          f"block output {share['block_output_us']:.0f} us)")
    out = {"machine": report.machine(), "rounds": args.rounds, "prefill": [8, 256], "dtype": "float32",
           "e2e": res, "op_share": share, "cpu_buffers": cpu.buffers()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
