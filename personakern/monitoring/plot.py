"""PNG of per-token projection traces: one panel per trait, one line per layer, x = tokens from
the last prompt token through the answer."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..readings import Readings


def trace_series(readings: Readings, row: int, traits: Sequence[str], layers: Sequence[int]
                 ) -> Dict[Tuple[str, int], List[float]]:
    """``{(trait, layer): [projection at the last prompt token, then at each answer token]}``
    for one batch row (the values the plot draws)."""
    start = int(readings.prompt_lengths[row]) - 1          # the last prompt token
    valid = readings.valid[row]
    cols = [c for c in range(max(start, 0), readings.values.shape[1]) if bool(valid[c])]
    out = {}
    for t in traits:
        for layer in layers:
            v = readings.get(t, layer)[row]
            out[(t, layer)] = [float(v[c]) for c in cols]
    return out


def plot_traces(readings: Readings, path, row: int = 0, traits: Optional[Sequence[str]] = None,
                layers: Optional[Sequence[int]] = None, tokens: Optional[Sequence[str]] = None,
                title: Optional[str] = None) -> Dict[Tuple[str, int], List[float]]:
    """Write the traces of ``row`` to ``path`` (PNG) and return what was drawn (see
    :func:`trace_series`). ``traits``/``layers`` default to every monitored one; ``tokens``
    (the answer's token strings) label the x axis when there are few enough."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traits = list(traits or readings.traits)
    layers = list(layers if layers is not None else readings.layers)
    series = trace_series(readings, row, traits, layers)  # KeyError naming what was monitored, before any file
    fig, axes = plt.subplots(len(traits), 1, figsize=(10, 2.4 * len(traits) + 0.6), squeeze=False, sharex=True)
    for ax, t in zip(axes[:, 0], traits):
        for layer in layers:
            ys = series[(t, layer)]
            ax.plot(range(len(ys)), ys, marker=".", lw=1.2, label=f"block {layer}")
        ax.axvline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylabel(f"{t}\nprojection")
        ax.grid(alpha=0.3)
        if len(layers) > 1 or ax is axes[0, 0]:
            ax.legend(fontsize=7, loc="upper right", ncol=min(len(layers), 4))
    ax = axes[-1, 0]
    n = len(next(iter(series.values()))) if series else 0
    if tokens is not None and 0 < n <= 60:
        ax.set_xticks(range(n))
        ax.set_xticklabels(["<prompt>"] + [repr(s)[1:-1] for s in tokens][:n - 1], rotation=90, fontsize=7)
    else:
        ax.set_xlabel("token (0 = last prompt token)")
    fig.suptitle(title or "per-token projection")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return series
