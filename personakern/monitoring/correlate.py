"""How well a projection predicts a judged trait score: the statistic of the paper's monitoring
experiment (last-prompt-token projection vs the judged trait score of the answer that follows).

The paper plots one point per prompt variant (system prompt or number of shots): the mean
projection against the mean score over that variant's answers. :func:`correlate` reports that
and the per-sample correlation, each with its n, since a correlation over 8 means and one over
80 answers are different claims.
"""
from __future__ import annotations

import math
from typing import Hashable, Optional, Sequence

import torch


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r of two equal-length sequences (NaN when n < 2 or either is constant)."""
    a = torch.as_tensor(x, dtype=torch.float64).flatten()
    b = torch.as_tensor(y, dtype=torch.float64).flatten()
    if a.shape != b.shape:
        raise ValueError(f"pearson: lengths differ ({a.numel()} vs {b.numel()})")
    if a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else float("nan")


def fisher_ci(r: float, n: int, z: float = 1.959964) -> Optional[tuple]:
    """Approximate 95 % interval of a Pearson r from n pairs (Fisher z; None when n < 4)."""
    if n < 4 or not math.isfinite(r):
        return None
    r = max(min(r, 1 - 1e-12), -1 + 1e-12)
    c, half = math.atanh(r), z / math.sqrt(n - 3)
    return (math.tanh(c - half), math.tanh(c + half))


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def correlate(projection: Sequence[float], score: Sequence[Optional[float]],
              groups: Optional[Sequence[Hashable]] = None) -> dict:
    """Correlation between projections and judged scores.

    Pairs where either value is missing (None/NaN, e.g. an answer the judge could not score) are
    dropped. With ``groups`` (one label per pair, e.g. the system prompt) the result also has the
    correlation over per-group means (the paper's plot) and the means themselves, in order of
    first appearance.

    Returns ``{"n", "r", "ci95"}`` plus, with groups, ``{"n_groups", "r_means", "means": [{"group",
    "n", "projection", "score"}]}``.
    """
    projection, score = list(projection), list(score)
    if len(projection) != len(score):
        raise ValueError(f"correlate: {len(projection)} projections but {len(score)} scores")
    if groups is not None and len(groups) != len(score):
        raise ValueError(f"correlate: {len(groups)} group labels for {len(score)} scores")
    keep = [i for i in range(len(score)) if _finite(projection[i]) and _finite(score[i])]
    xs = [float(projection[i]) for i in keep]
    ys = [float(score[i]) for i in keep]
    r = pearson(xs, ys)
    ci = fisher_ci(r, len(keep))
    out = {"n": len(keep), "r": r, "ci95": list(ci) if ci else None}
    if groups is None:
        return out
    sums: dict = {}
    for i in keep:
        s = sums.setdefault(groups[i], [0, 0.0, 0.0])
        s[0] += 1
        s[1] += float(projection[i])
        s[2] += float(score[i])
    means = [{"group": g, "n": c, "projection": px / c, "score": py / c} for g, (c, px, py) in sums.items()]
    out.update(n_groups=len(means), r_means=pearson([m["projection"] for m in means],
                                                    [m["score"] for m in means]), means=means)
    return out
