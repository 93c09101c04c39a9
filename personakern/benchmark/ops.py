"""Op microbenchmarks: each backend's fused op against the unfused PyTorch sequence (the native
backend run op by op in eager mode), at decode and prefill shapes, with the bytes each op must
move and the fraction of measured copy bandwidth it reaches."""
from __future__ import annotations

import torch
from torch.utils import benchmark

from .. import ops as ops_dispatch
from ..backends import native

DECODE_ROWS = (1, 16, 64)
PREFILL_ROWS = (2048, 8192)
DIMS = (576, 2048, 4096)


def copy_bandwidth(device="cpu", nbytes=256 << 20) -> float:
    """Bytes/s of a large device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    t = benchmark.Timer("dst.copy_(src)", globals={"dst": dst, "src": src}).blocked_autorange(min_run_time=0.5)
    return 2 * nbytes / t.median


def _inputs(n, d, dtype, device, s=1, m=8):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device)
    return dict(hidden=r(n, d).to(dtype), delta=r(n, d).to(dtype), weight=(1 + 0.1 * r(d)).to(dtype),
                steer_vecs=r(s, d), coef=r(n, s), readout=torch.nn.functional.normalize(r(m, d), dim=-1))


def _cases(t):
    return {
        "steer_project": (lambda o: o.steer_project(t["hidden"], t["delta"], t["steer_vecs"], t["coef"],
                                                    None, None, None, t["readout"]), 3),
        "add_rms_norm_steer_project": (lambda o: o.add_rms_norm_steer_project(
            t["hidden"], t["delta"], t["weight"], 1e-5, False, t["steer_vecs"], t["coef"],
            None, None, None, t["readout"]), 4),
        "rms_norm": (lambda o: o.rms_norm(t["hidden"], t["weight"], 1e-5), 2),
    }


def run_ops(backends, rows=DECODE_ROWS + PREFILL_ROWS, dims=DIMS, dtype=torch.float32, device="cpu",
            min_run_time=0.2, log=print) -> dict:
    bw = copy_bandwidth(device)
    results = {"copy_bandwidth_GBps": bw / 1e9, "dtype": str(dtype), "device": str(device), "rows": []}
    mods = {b: ops_dispatch.select_backend(torch.device(device), dtype, b) for b in backends}
    for d in dims:
        for n in rows:
            t = _inputs(n, d, dtype, device)
            for op, (fn, passes) in _cases(t).items():
                moved = passes * n * d * t["hidden"].element_size()
                unfused = benchmark.Timer("fn(o)", globals={"fn": fn, "o": native}).blocked_autorange(
                    min_run_time=min_run_time).median
                for b, mod in mods.items():
                    if b == "native":
                        continue
                    fused = benchmark.Timer("fn(o)", globals={"fn": fn, "o": mod}).blocked_autorange(
                        min_run_time=min_run_time).median
                    results["rows"].append({
                        "op": op, "backend": b, "rows": n, "dim": d, "fused_us": fused * 1e6,
                        "unfused_us": unfused * 1e6, "speedup": unfused / fused, "bytes": moved,
                        "bandwidth_fraction": moved / fused / bw})
            log(f"  ops: D={d} N={n} done")
    return results
