"""Tables, JSON and a PNG plot of benchmark results."""
from __future__ import annotations

import json
import platform
from pathlib import Path


def machine() -> dict:
    import torch
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def e2e_table(results: dict) -> str:
    lines = []
    for kind, rows in results.items():
        lines.append(f"\n{kind}: median of interleaved rounds, ratio vs unpatched (lower is better)")
        lines.append(f"  {'variant':44s} {'median':>10s} {'ratio':>7s}")
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"  {name:44s} {'failed':>10s}   {r['error']}")
            elif "median_s" in r:
                lines.append(f"  {name:44s} {r['median_s'] * 1e3:8.1f}ms {r['ratio']:7.3f}")
    return "\n".join(lines)


def ops_table(results: dict) -> str:
    bw = ", ".join(f"{v:.1f} GB/s on {k} thread{'s' if k != '1' else ''}"
                   for k, v in results["copy_bandwidth_GBps"].items())
    lines = [f"\nops ({results['device']}), copy bandwidth {bw}; speedup = unfused PyTorch / fused; "
             f"of BW = bytes the op must move / time / copy bandwidth on as many threads"]
    lines.append(f"  {'op':28s} {'backend':8s} {'dtype':9s} {'thr':>3s} {'rows':>6s} {'D':>5s} {'fused':>10s} "
                 f"{'unfused':>10s} {'speedup':>8s} {'of BW':>6s}")
    for r in results["rows"]:
        lines.append(f"  {r['op']:28s} {r['backend']:8s} {r['dtype'].replace('torch.', ''):9s} {r['threads']:3d} "
                     f"{r['rows']:6d} {r['dim']:5d} {r['fused_us']:8.1f}us {r['unfused_us']:8.1f}us "
                     f"{r['speedup']:8.2f} {r['bandwidth_fraction']:6.1%}")
    return "\n".join(lines)


def write(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench.json"]
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    e2e = results.get("e2e") or {}
    if e2e:
        fig, axes = plt.subplots(1, len(e2e), figsize=(7 * len(e2e), 5), squeeze=False)
        for ax, (kind, rows) in zip(axes[0], e2e.items()):
            names = [n for n, r in rows.items() if "ratio" in r]
            ratios = [rows[n]["ratio"] for n in names]
            colors = ["tab:green" if n.startswith("personakern") else "tab:gray" for n in names]
            ax.barh(names, ratios, color=colors)
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xlabel("time / unpatched time")
            ax.set_title(kind)
            ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(out / "bench_e2e.png", dpi=110)
        written.append(out / "bench_e2e.png")
    ops = results.get("ops")
    if ops and ops["rows"]:
        fig, ax = plt.subplots(figsize=(8, 5))
        for (op, b) in sorted({(r["op"], r["backend"]) for r in ops["rows"]}):
            for d in sorted({r["dim"] for r in ops["rows"]}):
                rows = [r for r in ops["rows"] if r["op"] == op and r["backend"] == b and r["dim"] == d]
                ax.plot([r["rows"] for r in rows], [r["speedup"] for r in rows], marker="o", label=f"{op} {b} D={d}")
        ax.set_xscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xlabel("rows (tokens)")
        ax.set_ylabel("speedup vs unfused PyTorch")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "bench_ops.png", dpi=110)
        written.append(out / "bench_ops.png")
    return written
