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


def _median(stmt, globals_, threads, min_run_time):
    # benchmark.Timer runs on ONE thread unless told otherwise: pass the count being measured
    return benchmark.Timer(stmt, globals=globals_, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time).median


def copy_bandwidth(device="cpu", nbytes=256 << 20, threads=None) -> float:
    """Bytes/s of a large device copy (read + write counted), on ``threads`` threads (default:
    torch's current count) on the CPU."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    threads = threads or torch.get_num_threads()
    return 2 * nbytes / _median("dst.copy_(src)", {"dst": dst, "src": src}, threads, 0.5)


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
            min_run_time=0.2, log=print, dtypes=None, threads=None) -> dict:
    """Every op at every (dtype, rows, dim), on each thread count in ``threads`` (CPU; default
    torch's current one): fused (each backend) against unfused (native, op by op), and the share
    of the copy bandwidth measured on the same number of threads. Ops take 1 steering vector
    and 8 read-outs; ``bytes`` counts the rows each op must read and write."""
    dtypes = tuple(dtypes or (dtype,))
    device = torch.device(device)
    threads = tuple(threads or (torch.get_num_threads(),)) if device.type == "cpu" else (torch.get_num_threads(),)
    results = {"device": str(device), "dtypes": [str(dt) for dt in dtypes], "threads": list(threads),
               "copy_bandwidth_GBps": {}, "rows": []}
    before = torch.get_num_threads()
    try:
        for th in threads:
            torch.set_num_threads(th)
            bw = copy_bandwidth(device, threads=th)
            results["copy_bandwidth_GBps"][str(th)] = bw / 1e9
            for dt in dtypes:
                mods = {b: ops_dispatch.select_backend(device, dt, b) for b in backends}
                for d in dims:
                    for n in rows:
                        t = _inputs(n, d, dt, device)
                        for op, (fn, passes) in _cases(t).items():
                            moved = passes * n * d * t["hidden"].element_size()
                            unfused = _median("fn(o)", {"fn": fn, "o": native}, th, min_run_time)
                            for b, mod in mods.items():
                                if b == "native":
                                    continue
                                fused = _median("fn(o)", {"fn": fn, "o": mod}, th, min_run_time)
                                results["rows"].append({
                                    "op": op, "backend": b, "dtype": str(dt), "threads": th, "rows": n, "dim": d,
                                    "fused_us": fused * 1e6, "unfused_us": unfused * 1e6, "speedup": unfused / fused,
                                    "bytes": moved, "bandwidth_fraction": moved / fused / bw})
                        log(f"  ops: {dt} threads={th} D={d} N={n} done")
    finally:
        torch.set_num_threads(before)
    return results
