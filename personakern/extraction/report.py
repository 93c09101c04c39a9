"""Quality report of extracted vectors: text table, PNG, cosine similarities between traits.

The whole report of an extraction is stored in the vector file's metadata (``meta["report"]``
of the response-averaged trait), so ``personakern report VECTORS`` re-renders it from the file
alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..vectors import VectorSet, load_vectors


def reports_in(vs: VectorSet) -> List[dict]:
    return [vs[t].meta["report"] for t in vs.traits if isinstance(vs[t].meta.get("report"), dict)]


def cosine_table(vs: VectorSet, layer: Optional[int] = None) -> dict:
    """Cosine similarity between the response-averaged traits of ``vs`` at ``layer`` (default:
    the median of their chosen layers) and averaged over all layers."""
    names = [t for t in vs.traits if vs[t].meta.get("averaged_over", "response") == "response"]
    if len(names) < 2:
        return {}
    if layer is None:
        chosen = sorted(int(vs[t].meta.get("layer", vs[t].num_layers // 2)) for t in names)
        layer = chosen[len(chosen) // 2]
    V = torch.stack([vs[t].vectors for t in names])                       # [T, L, D]
    U = V / V.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    at = torch.einsum("ad,bd->ab", U[:, layer], U[:, layer])
    mean = torch.einsum("ald,bld->ab", U, U) / U.shape[1]
    r = lambda m: [[round(float(x), 3) for x in row] for row in m]
    return {"traits": names, "layer": layer, "at_layer": r(at), "mean_over_layers": r(mean)}


def render_text(report: dict) -> str:
    c = report["counts"]
    lines = [f"trait {report['trait']}  (judge: {report['judge']}, spec {report['spec_hash']})",
             f"  answers kept: positive {c['positive']['kept']}/{c['positive']['generated']}, "
             f"negative {c['negative']['kept']}/{c['negative']['generated']}  "
             f"(mean judged trait score pos {c['positive']['mean_trait_score']}, "
             f"neg {c['negative']['mean_trait_score']})"]
    au = report["layer_auroc"]["response"]
    best = max(range(len(au)), key=lambda l: au[l])
    ch = report["chosen"]
    lines.append(f"  held-out AUROC ({report['heldout']['positive']}+{report['heldout']['negative']} answers, "
                 f"{report['heldout']['rule']}): best {au[best]:.3f} at layer {best}; "
                 f"chosen layer {ch['layer']}: {ch['auroc']:.3f}")
    lines.append("  AUROC by layer: " + " ".join(f"{a:.2f}" for a in au))
    sw = report.get("sweep")
    if sw:
        b = sw["baseline"]
        lines.append(f"  steering sweep on {sw['questions']} evaluation questions (no system prompt), "
                     f"baseline trait {b['trait']} coherence {b['coherence']}")
        lines.append("  layer " + "".join(f"   alpha {a:g}: trait/coh" for a in sw["alphas"]))
        for l in sw["layers"]:
            cells = [sw["cells"][f"{l}:{a:g}"] for a in sw["alphas"]]
            lines.append(f"  {l:5d} " + "".join(f"{_f(x['trait']):>14}/{_f(x['coherence']):<5}" for x in cells))
    lines.append(f"  chosen: layer {ch['layer']}, alpha {ch['alpha']} — {ch['reason']}")
    return "\n".join(lines)


def _f(x) -> str:
    return "—" if x is None else f"{x:.0f}"


def render_png(report: dict, path, title: Optional[str] = None) -> Optional[Path]:
    """AUROC by layer (left) and dose-response curves of the sweep (right). Returns the path, or
    None if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sw = report.get("sweep")
    fig, axes = plt.subplots(1, 2 if sw else 1, figsize=(11 if sw else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    for kind, style in (("response", "-o"), ("last_prompt", "--.")):
        if kind in report["layer_auroc"]:
            ax.plot(report["layer_auroc"][kind], style, ms=3, label=f"{kind} projection")
    ax.axvline(report["chosen"]["layer"], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="layer (output of block l)", ylabel="held-out AUROC", ylim=(0, 1.02),
           title="separation of held-out answers")
    ax.legend(fontsize=8)
    if sw:
        ax = axes[0][1]
        alphas = [0.0] + sw["alphas"]
        for l in sw["layers"]:
            tr = [sw["baseline"]["trait"]] + [sw["cells"][f"{l}:{a:g}"]["trait"] for a in sw["alphas"]]
            co = [sw["baseline"]["coherence"]] + [sw["cells"][f"{l}:{a:g}"]["coherence"] for a in sw["alphas"]]
            line, = ax.plot(alphas, [float("nan") if v is None else v for v in tr], "-o", ms=3, label=f"layer {l}")
            ax.plot(alphas, [float("nan") if v is None else v for v in co], ":", color=line.get_color(), lw=1)
        ax.set(xlabel="alpha", ylabel="judged score (0-100)", ylim=(0, 100),
               title="steering: trait (solid), coherence (dotted)")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title or f"{report['trait']} — {report['model'].get('name_or_path') or report['model']['model_type']}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_files(paths: Sequence, out_png: Optional[str] = None, out_json: Optional[str] = None) -> str:
    """Text report for one or more vector files; cosine similarities when they hold several
    traits. Optionally re-renders the PNG (one file per trait: ``<out_png stem>-<trait>.png``)
    and writes a JSON summary."""
    merged = VectorSet()
    for p in paths:
        for t, pv in load_vectors(p).items():
            if t not in merged:
                merged.add(pv)
    reps = reports_in(merged)
    parts = [render_text(r) for r in reps] or ["(no extraction report in these files: they were not made by "
                                               "`personakern extract`)"]
    cos = cosine_table(merged)
    if cos:
        w = max(len(t) for t in cos["traits"])
        rows = [f"cosine similarity at layer {cos['layer']} (response vectors):",
                " " * (w + 2) + " ".join(f"{t[:6]:>6}" for t in cos["traits"])]
        rows += [f"  {t:<{w}} " + " ".join(f"{x:6.2f}" for x in row) for t, row in zip(cos["traits"], cos["at_layer"])]
        parts.append("\n".join(rows))
    if out_png:
        stem = Path(out_png)
        for r in reps:
            target = stem if len(reps) == 1 else stem.with_name(f"{stem.stem}-{r['trait']}{stem.suffix or '.png'}")
            render_png(r, target)
    if out_json:
        from ..utils import atomic_write_json
        atomic_write_json(out_json, {"reports": reps, "cosine": cos})
    return "\n\n".join(parts)
