"""Data screening (docs/design.md#the-method, step 6): the projection difference of a training
set, per sample.

For sample i with prompt x_i and response y_i, and y'_i the base model's own answer to x_i::

    dP_i = (a(x_i, y_i) - a(x_i, y'_i)) · v_hat

where ``a`` is the mean of block ``l``'s output over the response tokens (teacher-forced) and
``v_hat`` the unit persona vector of block ``l`` (the vector's recommended block, or
``layer``). The dataset value is the mean of dP_i. The cheap approximation needs no
generation: ``approx_i = a(x_i, y_i) · v_hat - h_last(x_i) · v_hat`` — the base answer's
projection replaced by that of the last prompt token, which predicts it
(docs/design.md#the-method, step 3).

The file is streamed: a first pass validates every line (and writes ``malformed.jsonl``), then
consecutive valid samples are cut into chunks; chunk ``c`` is processed by rank ``c % world``
(:mod:`personakern.distributed`) and leaves only scalars on disk (``chunks/cNNNNN.jsonl``,
written atomically), so a rerun skips finished chunks and, inside a chunk, finished generation
batches. Rank 0 then merges the sorted chunk files into the ranked outputs.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import distributed as dist
from ..extraction.generate import GenSettings
from ..extraction.vllm_generate import check_engine
from ..utils import JsonlLog, atomic_write, atomic_write_json
from ..vectors import VectorSet, model_fingerprint
from .base_answers import base_answers
from .data import Sample, ScreenDataError, iter_chunks, iter_records
from .project import chat_prompts_ids, project_sequences, texts_ids
from .report import FIELDS, col, column_ranges, histogram, histogram_edges, rank_key, write_ranked, write_rows

MAX_LISTED = 100  # malformed lines listed in summary.json (all of them are in malformed.jsonl)
WRITES = ("malformed.jsonl", "ranked.jsonl", "ranked.csv", "summary.json", "histogram.png", "chunks",
          "answers")   # what a run puts in its folder besides run.json


@dataclass
class ScreenSettings:
    traits: Optional[Sequence[str]] = None    # default: every trait of the vector file
    layer: Optional[int] = None               # default: each trait's meta["layer"]
    approx_only: bool = False
    on_error: str = "skip"                    # or "stop"
    rank_by: Optional[str] = None             # trait to rank by (default: the first)
    batch_size: int = 16
    chunk_batches: int = 8                    # a chunk is batch_size * chunk_batches samples
    max_new_tokens: int = 64
    temperature: float = 0.0                  # 0 = greedy base answers
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    seed: int = 0
    progress: bool = True
    engine: str = "hf"                        # or "vllm": base answers and projections on a vLLM engine

    def gen(self) -> GenSettings:
        return GenSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                           repetition_penalty=self.repetition_penalty, batch_size=self.batch_size, seed=self.seed)


def _plan(vectors: VectorSet, s: ScreenSettings):
    traits = list(s.traits) if s.traits else vectors.traits
    for t in traits:
        if t not in vectors:
            raise ValueError(f"no trait {t!r} in the vector file; it has {', '.join(vectors.traits)}")
    layers = {}
    for t in traits:
        pv = vectors[t]
        l = s.layer if s.layer is not None else pv.meta.get("layer")
        if l is None:
            raise ValueError(f"trait {t!r} has no recommended layer in its file; pass --layer")
        if not 0 <= int(l) < pv.num_layers:
            raise ValueError(f"layer {l} out of range for trait {t!r} (blocks 0..{pv.num_layers - 1})")
        layers[t] = int(l)
    units = {}
    order = []   # trait order of the projection columns: by block, then as given
    for l in sorted(set(layers.values())):
        ts = [t for t in traits if layers[t] == l]
        units[l] = torch.stack([vectors[t].unit(l) for t in ts])
        order += ts
    rank_by = s.rank_by or traits[0]
    if rank_by not in traits:
        raise ValueError(f"--rank-by {rank_by!r} is not one of the screened traits {traits}")
    return traits, layers, units, order, rank_by


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_data(path, on_error: str = "skip", sink=None):
    """Validate every line of ``path`` (one streaming pass, no model needed); returns
    ``(lines, valid samples, malformed count, the first MAX_LISTED malformed)``. With ``sink``
    (a text file), every malformed line is written there as a JSON line. Raises
    :class:`ScreenDataError` for a missing file, a file without valid samples, and (with
    ``on_error="stop"``) at the first malformed line."""
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise ScreenDataError(f"{path}: file not found" if not path.exists() else f"{path}: not a regular file")
    n_lines = n_valid = n_bad = 0
    listed = []
    for r in iter_records(path):
        n_lines += 1
        if isinstance(r, Sample):
            n_valid += 1
            continue
        if on_error == "stop":
            raise ScreenDataError(f"{path}:{r.line}: malformed line: {r.reason} (stopped by --on-error stop; "
                                  f"fix the line or use --on-error skip)")
        n_bad += 1
        if len(listed) < MAX_LISTED:
            listed.append({"line": r.line, "reason": r.reason})
        if sink is not None:
            sink.write(json.dumps({"line": r.line, "reason": r.reason}) + "\n")
    if not n_valid:
        raise ScreenDataError(f"{path}: no valid samples in {n_lines} lines" + (f" (first problem: line "
                              f"{listed[0]['line']}: {listed[0]['reason']})" if listed else ""))
    return n_lines, n_valid, n_bad, listed


def _claim(out: Path, manifest: dict) -> None:
    """Make ``out`` this run's folder: a folder holding a run with other inputs or settings is
    refused (and left as it is); rank 0 writes ``run.json``."""
    manifest = json.loads(json.dumps(manifest))
    mpath = out / "run.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(f"{out} holds a screening run with other inputs or settings ({', '.join(diff)}); "
                             f"use another --out or delete that folder")
    else:   # never overwrite files that are not a screening run's (e.g. --out pointing at a data folder)
        clash = [n for n in WRITES if (out / n).exists()]
        if clash:
            raise ValueError(f"{out} holds {', '.join(clash)} but no screening run (run.json); "
                             f"use another --out")
    dist.barrier()
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(mpath, manifest)
    dist.barrier()
    for sub in ("chunks", "answers"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def _copy(src, dst_path) -> None:
    with open(dst_path, "w", encoding="utf-8") as f:
        shutil.copyfileobj(src, f)


def _process_chunk(model, tok, c: int, samples: Sequence[Sample], first_key: int, units, order, s: ScreenSettings,
                   rank_column: str, out: Path, bar, llm=None) -> None:
    if llm is not None:
        from .vllm_engine import project_sequences_vllm
        project = lambda seqs: project_sequences_vllm(llm, seqs, units)
    else:
        project = lambda seqs: project_sequences(model, seqs, units, s.batch_size)
    prompts = chat_prompts_ids(tok, [x.prompt for x in samples])
    seqs = [(p + r, len(p)) for p, r in zip(prompts, texts_ids(tok, [x.response for x in samples]))]
    resp, last = project(seqs)
    base = torch.full_like(resp, float("nan"))
    if not s.approx_only:
        keys = list(range(first_key, first_key + len(samples)))
        n0 = bar.n if bar is not None else 0
        cache = JsonlLog(out / "answers" / f"c{c:05d}.jsonl")
        if llm is not None:
            from .vllm_engine import base_answers_vllm
            answers = base_answers_vllm(llm, tok, model, keys, prompts, cache, s.gen(), bar=bar)
        else:
            answers = base_answers(model, tok, keys, prompts, cache, s.gen(), first_key // s.batch_size,
                                   bar=bar)   # the bar moves per generated batch
        if bar is not None:
            bar.update(len(samples) - (bar.n - n0))
            bar = None
        # an empty base answer has no response tokens: its dP is undefined (reported, ranked last)
        base_ids = texts_ids(tok, [answers[k] for k in keys])
        have = [i for i, ids in enumerate(base_ids) if ids]
        if have:
            b, _ = project([(prompts[i] + base_ids[i], len(prompts[i])) for i in have])
            base[have] = b
    answered = ~torch.isnan(base)          # NaN only where the base answer was empty
    if not (torch.isfinite(resp).all() and torch.isfinite(last).all() and torch.isfinite(base[answered]).all()):
        raise ValueError(f"non-finite activations (NaN/Inf) from the model on lines {samples[0].line}-"
                         f"{samples[-1].line}; nothing was written for them")
    num = lambda v: None if v != v else float(v)
    rows = []
    for i, x in enumerate(samples):
        row = {"line": x.line, "id": x.id}
        for j, t in enumerate(order):
            r, b, lp = float(resp[i, j]), float(base[i, j]), float(last[i, j])
            row.update({col("dP", t): num(r - b), col("approx", t): r - lp, col("response", t): r,
                        col("base", t): num(b), col("last_prompt", t): lp})
        rows.append(row)
    rows.sort(key=rank_key(rank_column))
    # the range first: the chunk file's existence is what marks the chunk done
    atomic_write_json(out / "chunks" / f"c{c:05d}.range.json", column_ranges(rows, list(rows[0])[2:]))
    write_rows(out / "chunks" / f"c{c:05d}.jsonl", rows)
    if bar is not None:
        bar.update(len(samples))


def screen(model, tok, data, vectors: VectorSet, out, settings: Optional[ScreenSettings] = None,
           llm=None) -> Optional[dict]:
    """Screen the JSONL training set ``data``; writes into folder ``out`` and returns the
    summary (on rank 0; other ranks return None). Rerunning with the same folder resumes.
    ``settings.engine="vllm"``: on ``llm`` (a running engine started with capture), else on an
    engine started and closed here; one process."""
    s = settings or ScreenSettings()
    check_engine(s.engine)
    for k in ("batch_size", "chunk_batches", "max_new_tokens"):   # before run.json pins a folder to them
        if getattr(s, k) < 1:
            raise ValueError(f"{k} must be at least 1, got {getattr(s, k)}")
    data, out = Path(data), Path(out)
    traits, layers, units, order, rank_by = _plan(vectors, s)
    rank_column = col("approx" if s.approx_only else "dP", rank_by)
    chunk = s.batch_size * s.chunk_batches
    main = dist.is_main()
    manifest = {"data": str(data.resolve()) if data.exists() else str(data), "traits": traits, "layers": layers,
                "model": model_fingerprint(model), "chunk": chunk, "rank_by": rank_column,
                "settings": {k: v for k, v in asdict(s).items() if k not in ("progress", "on_error")
                             and not (k == "engine" and v == "hf")}}   # run folders of older versions resume
    with tempfile.TemporaryFile("w+", encoding="utf-8") as bad:
        # the data are validated before anything is created or computed, and the malformed
        # list moves into the output folder only once the folder is known to be this run's
        n_lines, n_valid, n_bad, listed = check_data(data, s.on_error, bad)
        manifest["data_sha256"] = _sha256(data)
        _claim(out, manifest)
        if main:
            bad.seek(0)
            atomic_write(out / "malformed.jsonl", lambda tmp: _copy(bad, tmp))
    if main and n_bad:
        shown = ", ".join(f"{m['line']} ({m['reason']})" for m in listed[:20])
        print(f"personakern screen: skipped {n_bad} malformed line(s) of {data}: {shown}"
              f"{' ...' if n_bad > 20 else ''} (all listed in {out / 'malformed.jsonl'})", file=sys.stderr)

    rank, world = dist.rank(), dist.world_size()
    n_chunks = (n_valid + chunk - 1) // chunk
    todo = [c for c in range(rank, n_chunks, world) if not (out / "chunks" / f"c{c:05d}.jsonl").exists()]
    bar = tqdm(total=sum(min(chunk, n_valid - c * chunk) for c in todo), desc="screening", unit="sample",
               disable=not (s.progress and main))
    todo_set = set(todo)
    own = None
    if s.engine == "vllm" and llm is None and todo:
        from ..extraction.vllm_generate import start_engine
        llm = own = start_engine(model, capture=True)
    try:
        for c, samples in iter_chunks(data, chunk):
            if c in todo_set:
                _process_chunk(model, tok, c, samples, c * chunk, units, order, s, rank_column, out, bar,
                               llm if s.engine == "vllm" else None)
    finally:
        if own is not None:
            from ..vllm.engine import close_llm
            close_llm(own)
    bar.close()
    dist.barrier()
    if not main:
        return None
    files = [out / "chunks" / f"c{c:05d}.jsonl" for c in range(n_chunks)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise RuntimeError(f"{out}/chunks: {missing[:3]} missing after every rank finished; with several "
                           f"machines --out must be on a filesystem they all see")
    edges = histogram_edges([f.with_suffix(".range.json") for f in files], traits,
                            ("approx",) if s.approx_only else ("dP", "approx"))
    stats, counts = write_ranked(files, traits, rank_column, out, edges)
    shutil.rmtree(out / "chunks" / "merge", ignore_errors=True)
    drawn = histogram(counts, edges, traits, stats, layers, out / "histogram.png")
    summary = {
        "data": str(data), "lines": n_lines, "samples": n_valid, "malformed": n_bad,
        "malformed_listed": listed, "malformed_file": str(out / "malformed.jsonl"),
        "ranked_by": rank_column, "approx_only": s.approx_only, "world_size": world,
        "traits": {t: {"layer": layers[t], **{f: stats[col(f, t)].to_dict() for f in FIELDS},
                       "base_answer_empty": 0 if s.approx_only else n_valid - stats[col("dP", t)].n}
                   for t in traits},
        "histogram": {t: {f: {"edges": edges[t, f].tolist(), "counts": counts[t, f].tolist()}
                          for (t2, f) in counts if t2 == t} for t in traits},
        "outputs": {k: str(out / v) for k, v in (("ranked_jsonl", "ranked.jsonl"), ("ranked_csv", "ranked.csv"),
                                                 ("histogram", "histogram.png"), ("summary", "summary.json"))
                    if k != "histogram" or drawn},   # no PNG without matplotlib (the counts are above)
        "settings": manifest["settings"], "model": manifest["model"],
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
