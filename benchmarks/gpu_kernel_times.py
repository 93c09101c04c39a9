"""GPU time per fused-op call, launch overhead removed: K calls captured in one CUDA graph and
replayed, timed with CUDA events; the kernels each call launches (torch.profiler); the CUDA
kernel's registers and shared memory (cuobjdump). Separates what the kernels cost from what
the Python wrapper and launches cost (personakern bench measures both together).

Usage (GPU machine): python benchmarks/gpu_kernel_times.py   -> $OUT/gpu_kernel_times.json"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from personakern import ops
from personakern.backends import native
from personakern.benchmark.ops import _cases, _inputs, copy_bandwidth

K, REPLAYS = 20, 5


def graph_time(fn, mod):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(mod)  # warm-up: builds / compiles / caches launch plans
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(K):
            fn(mod)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (K * REPLAYS)  # microseconds


def kernels_per_call(fn, mod):
    fn(mod)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn(mod)
        torch.cuda.synchronize()
    return sorted({e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def resource_usage():
    from personakern.backends import cuda
    ext = cuda._load()
    path = getattr(ext, "__file__", None)
    if not path:
        return "no extension file"
    out = subprocess.run(["cuobjdump", "--dump-resource-usage", path], capture_output=True, text=True)
    return "\n".join(l.strip() for l in (out.stdout + out.stderr).splitlines() if "REG" in l or "Function" in l)[:4000]


def main():
    out_dir = Path(os.environ.get("OUT", "gpu-results"))
    bw = copy_bandwidth("cuda") / 1e9
    backends = [b for b in ("native", "cuda", "triton") if ops.backend_usable(b, "cuda")]
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        mods = {b: native if b == "native" else ops.select_backend("cuda", dtype, b) for b in backends}
        for d in (2048, 4096):
            for n in (1, 64, 4096, 16384):
                t = _inputs(n, d, dtype, "cuda")
                for op, (fn, passes) in _cases(t).items():
                    moved = passes * n * d * t["hidden"].element_size()
                    for b, mod in mods.items():
                        us = graph_time(fn, mod)
                        rows.append({"op": op, "backend": b, "dtype": str(dtype), "rows": n, "dim": d, "gpu_us": us,
                                     "bandwidth_fraction": moved / (us * 1e-6) / (bw * 1e9)})
    kernels = {}
    t = _inputs(64, 2048, torch.bfloat16, "cuda")
    for op, (fn, _) in _cases(t).items():
        for b in backends:
            mod = native if b == "native" else ops.select_backend("cuda", torch.bfloat16, b)
            kernels[f"{op} {b}"] = kernels_per_call(fn, mod)
    res = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bw, "rows": rows, "kernels": kernels,
           "cuda_resource_usage": resource_usage()}
    print(f"{res['gpu']}: copy bandwidth {bw:.0f} GB/s; GPU time per call (graph replay), share of copy bandwidth")
    print(f"{'op':28s} {'dtype':9s} {'rows':>6s} {'D':>5s} " + " ".join(f"{b:>16s}" for b in backends))
    for i in range(0, len(rows), len(backends)):
        grp = rows[i:i + len(backends)]
        r = grp[0]
        cells = " ".join(f"{x['gpu_us']:8.1f}us {100 * x['bandwidth_fraction']:4.0f}%" for x in grp)
        print(f"{r['op']:28s} {r['dtype'][6:]:9s} {r['rows']:6d} {r['dim']:5d} {cells}")
    for k, v in kernels.items():
        print(f"kernels per call, {k}: {len(v)}: {v}")
    print(res["cuda_resource_usage"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_kernel_times.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
