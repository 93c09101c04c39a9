"""Screening outputs from the per-chunk result files, in bounded memory.

Each chunk file holds its rows (scalars only) already sorted by the ranking key, and a small
``.range.json`` beside it the min/max of each column; the ranked JSONL/CSV is their k-way
merge (``heapq.merge``, at most ``FANOUT`` files open at once, in passes if there are more),
streamed straight to disk. Dataset means (running sums) and histogram counts (bins fixed
beforehand from the chunks' ranges) are taken during that same merge.
"""
from __future__ import annotations

import csv
import heapq
import json
import math
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from ..utils import atomic_write

FIELDS = ("dP", "approx", "response", "base", "last_prompt")
FANOUT = 64


def col(field: str, trait: str) -> str:
    return f"{field}_{trait}"


def rank_key(column: str):
    """Descending by ``column``; rows without a value (no base answer) last; ties by line."""
    def key(row):
        v = row.get(column)
        return (math.inf if v is None else -v, row["line"])
    return key


def _read(path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def write_rows(path, rows: Sequence[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    atomic_write(path, write)


def merged(paths: List[Path], key, tmp_dir: Path) -> Iterator[dict]:
    """The rows of every (sorted) file in ``paths``, in ``key`` order."""
    paths = list(paths)
    level = 0
    while len(paths) > FANOUT:      # reduce to FANOUT files by merging groups into temp files
        tmp_dir.mkdir(parents=True, exist_ok=True)
        nxt = []
        for g in range(0, len(paths), FANOUT):
            out = tmp_dir / f"merge{level}-{g // FANOUT:05d}.jsonl"
            with ExitStack() as st:
                its = [_read(p) for p in paths[g:g + FANOUT]]
                st.callback(lambda its=its: [it.close() for it in its])
                write_rows(out, heapq.merge(*its, key=key))
            nxt.append(out)
        paths, level = nxt, level + 1
    its = [_read(p) for p in paths]
    try:
        yield from heapq.merge(*its, key=key)
    finally:
        for it in its:
            it.close()


class Stats:
    """Running count / sum / sum of squares / min / max of one column."""

    def __init__(self):
        self.n, self.s, self.ss, self.lo, self.hi = 0, 0.0, 0.0, math.inf, -math.inf

    def add(self, v: Optional[float]) -> None:
        if v is None:
            return
        self.n += 1
        self.s += v
        self.ss += v * v
        self.lo, self.hi = min(self.lo, v), max(self.hi, v)

    def to_dict(self) -> dict:
        if not self.n:
            return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
        mean = self.s / self.n
        var = max(self.ss / self.n - mean * mean, 0.0)
        return {"n": self.n, "mean": mean, "std": math.sqrt(var), "min": self.lo, "max": self.hi}


def column_ranges(rows: Sequence[dict], columns: Sequence[str]) -> dict:
    """``{column: [min, max]}`` of one chunk's rows (written beside the chunk, so rank 0 knows
    the histogram bins before the merge and bins while merging: no second pass)."""
    out = {}
    for c in columns:
        vals = [r[c] for r in rows if r.get(c) is not None]
        if vals:
            out[c] = [min(vals), max(vals)]
    return out


def histogram_edges(range_files: List[Path], traits: Sequence[str], shown: Sequence[str], bins: int = 40) -> dict:
    """``{(trait, field): edges}``, one set of bins per trait shared by the fields shown."""
    import numpy as np
    lo, hi = {}, {}
    for p in range_files:
        p = Path(p)
        if p.exists():
            ranges = json.loads(p.read_text())
        else:       # a chunk finished by a version that wrote no ranges: one pass over its rows
            ranges = {}
            for r in _read(p.with_name(p.name.replace(".range.json", ".jsonl"))):
                for c, v in r.items():
                    if isinstance(v, float):
                        a, b = ranges.get(c, (v, v))
                        ranges[c] = (min(a, v), max(b, v))
        for c, (a, b) in ranges.items():
            lo[c], hi[c] = min(lo.get(c, a), a), max(hi.get(c, b), b)
    edges = {}
    for t in traits:
        have = [f for f in shown if col(f, t) in lo]
        if have:
            a, b = min(lo[col(f, t)] for f in have), max(hi[col(f, t)] for f in have)
            for f in have:
                edges[t, f] = np.linspace(a, b if b > a else a + 1.0, bins + 1)
    return edges


class _Binner:
    """Histogram counts over fixed edges, fed row by row, binned a thousand rows at a time."""

    def __init__(self, edges: dict):
        import numpy as np
        self.np, self.edges = np, edges
        self.counts = {k: np.zeros(len(e) - 1, dtype=np.int64) for k, e in edges.items()}
        self.buf = {k: [] for k in edges}

    def add(self, row: dict) -> None:
        for (t, f), b in self.buf.items():
            v = row.get(col(f, t))
            if v is not None:
                b.append(v)
                if len(b) >= 1000:
                    self._flush((t, f))

    def _flush(self, k) -> None:
        e = self.edges[k]
        # np.histogram's last bin is closed, so the maximum lands inside
        self.counts[k] += self.np.histogram(self.np.clip(self.buf[k], e[0], e[-1]), bins=e)[0]
        self.buf[k].clear()

    def done(self) -> dict:
        for k in self.buf:
            self._flush(k)
        return self.counts


def write_ranked(chunk_files: List[Path], traits: Sequence[str], rank_column: str, out: Path,
                 edges: Optional[dict] = None) -> tuple:
    """``ranked.jsonl`` and ``ranked.csv`` in ``out``, in one streaming merge that also takes
    the running statistics and (given ``edges``) the histogram counts. Returns
    ``({column: Stats}, {(trait, field): counts})``."""
    columns = ["rank", "line", "id"] + [col(f, t) for t in traits for f in FIELDS]
    stats = {c: Stats() for c in columns[3:]}
    binner = _Binner(edges or {})

    def write_both(tmp_jsonl):
        def write_csv(tmp_csv):
            with open(tmp_jsonl, "w", encoding="utf-8") as fj, open(tmp_csv, "w", encoding="utf-8", newline="") as fc:
                w = csv.writer(fc)
                w.writerow(columns)
                for rank, row in enumerate(merged(chunk_files, rank_key(rank_column), out / "chunks" / "merge"), 1):
                    row = {"rank": rank, **row}
                    for c, s in stats.items():
                        s.add(row.get(c))
                    binner.add(row)
                    fj.write(json.dumps({c: row.get(c) for c in columns}, ensure_ascii=False, allow_nan=False) + "\n")
                    w.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
        atomic_write(out / "ranked.csv", write_csv)
    atomic_write(out / "ranked.jsonl", write_both)
    return stats, binner.done()


def histogram(counts: dict, edges: dict, traits: Sequence[str], stats: dict, layers: dict, png: Path) -> bool:
    """One panel per trait: the per-sample dP and its last-prompt-token approximation. Returns
    False (and draws nothing) without matplotlib, which personakern does not depend on."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(traits), 1, figsize=(7, 2.6 * len(traits)), squeeze=False)
    for ax, t in zip(axes[:, 0], traits):
        for f, color in (("dP", "tab:red"), ("approx", "tab:gray")):
            if (t, f) not in counts:
                continue
            label = ("projection difference dP" if f == "dP" else "approximation (response − last prompt token)")
            mean = stats[col(f, t)].to_dict()["mean"]
            ax.stairs(counts[t, f], edges[t, f], color=color, fill=f == "dP", alpha=0.5 if f == "dP" else 1.0,
                      label=f"{label}, mean {mean:+.2f}")
            ax.axvline(mean, color=color, lw=1, ls="--")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{t} (block {layers[t]})", fontsize=10)
        ax.set_ylabel("samples")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("projection on the unit persona vector")
    fig.tight_layout()
    tmp = str(png) + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return True
