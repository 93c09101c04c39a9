"""Batched, resumable answer generation.

A *job* is one answer to produce: a system prompt (or none), a question, and a stable ``id``.
Jobs are cut into fixed batches in the order given; batch ``b`` samples with the seed
``hash(seed, b)``, so an answer depends only on the job list, the settings and the seed — not on
how often the run was interrupted. Each finished batch is appended to a JSONL cache
(:class:`~personakern.utils.JsonlLog`, fsync per batch); a rerun skips batches whose ids are
all there and regenerates the rest (a partly written batch regenerates identically and only
its missing records are added). A kill at any moment therefore never corrupts the cache and a
resumed run gives the same answers as an uninterrupted one (same machine and versions).

Several processes (``torchrun`` / ``accelerate launch``, see :mod:`personakern.distributed`):
with ``shard=True`` rank ``r`` of ``W`` generates batches ``b`` with ``b % W == r`` — the seed
still comes from ``b``, so the answers are those of a one-process run — and appends them to a
:class:`RankedLog`, a cache with one file per rank that is read as the union of all of them.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..handle import engine
from ..utils import JsonlLog


@dataclass(frozen=True)
class GenSettings:
    max_new_tokens: int = 64
    temperature: float = 0.8       # 0 = greedy
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    batch_size: int = 32
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def settings_hash(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def chat_ids(tok, system: Optional[str], question: str) -> List[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def left_pad(seqs: Sequence[List[int]], pad_id: int, device) -> tuple:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def eos_ids(model, tok) -> set:
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return set(eos) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def decode_answer(tok, row: Sequence[int], eos) -> str:
    """A generated row of token ids as the answer: up to (not including) the first EOS id,
    decoded without special tokens, stripped."""
    cut = next((k for k, t in enumerate(row) if t in eos), len(row))
    return tok.decode(list(row[:cut]), skip_special_tokens=True).strip()


def batch_seed(seed: int, b: int) -> int:
    """The sampling seed of batch ``b`` of a run seeded ``seed`` (a rerun or another rank
    draws the same answers for that batch)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{b}".encode()).digest()[:7], "little")


@torch.no_grad()
def generate_batch(model, tok, jobs: Sequence[dict], settings: GenSettings, seed: int,
                   capture: bool = False):
    """Answers (decoded, special tokens skipped, stripped) for ``jobs`` in one ``generate``,
    run on the patched engine (the model's own handle if it has one).

    ``capture=True`` also returns ``[B, 3, L, D]`` activation means (kinds in
    :data:`~personakern.state.KINDS` order) gathered by the engine while it generates
    (:mod:`personakern.state.capture`): the prefill adds the prompt, each decode step the token
    it feeds, for rows still answering. The last answer token is fed only if one more step runs,
    so a capture generates ``max_new_tokens + 1`` tokens and keeps the first ``max_new_tokens``
    (sampling is sequential: the same tokens a ``max_new_tokens`` run samples). What is averaged
    are the generated ids up to (not including) the first EOS, the answer's exact tokens; KV-cached
    decoding matches a full forward to float rounding (tested)."""
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = left_pad([chat_ids(tok, j.get("system"), j["question"]) for j in jobs], pad_id, device)
    eos = eos_ids(model, tok)
    kw = dict(max_new_tokens=settings.max_new_tokens + int(capture), pad_token_id=pad_id,
              repetition_penalty=settings.repetition_penalty)
    if settings.temperature > 0:
        kw.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    else:
        kw.update(do_sample=False)
    means = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), engine(model) as handle:
        torch.manual_seed(seed)
        if capture:
            with handle.capture(eos=eos, limit=settings.max_new_tokens) as cap:
                out = model.generate(input_ids=ids, attention_mask=mask, **kw)
                means = cap.means().transpose(1, 2).cpu()
        else:
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    answers = [decode_answer(tok, row, eos)
               for row in out[:, ids.shape[1]:ids.shape[1] + settings.max_new_tokens].tolist()]
    return (answers, means) if capture else answers


class ActStore:
    """Per-batch safetensors files ``<dir>/b<index>.safetensors`` mapping answer id ->
    ``[3, L, D]`` means. Written atomically *before* the batch's JSONL records, so a record in
    the cache always has its activations on disk."""

    def __init__(self, folder):
        from pathlib import Path
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)

    def ids(self) -> set:
        from safetensors import safe_open
        out = set()
        for f in self.dir.glob("b*.safetensors"):
            with safe_open(str(f), "pt") as sf:
                out.update(sf.keys())
        return out

    def next_index(self) -> int:
        """An index no file of this store has yet (for writers whose units are not fixed batches)."""
        taken = [int(f.stem[1:]) for f in self.dir.glob("b*.safetensors") if f.stem[1:].isdigit()]
        return max(taken, default=-1) + 1

    def write(self, b: int, rows: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save
        from ..utils import atomic_write_bytes
        atomic_write_bytes(self.dir / f"b{b:05d}.safetensors",
                           save({k: v.contiguous() for k, v in rows.items()}))

    def load(self, ids: Sequence[str]) -> torch.Tensor:
        """``[len(ids), 3, L, D]`` in the order of ``ids``."""
        from safetensors import safe_open
        want, got = set(ids), {}
        for f in sorted(self.dir.glob("b*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                for k in sf.keys():
                    if k in want:
                        got[k] = sf.get_tensor(k)
        missing = [i for i in ids if i not in got]
        if missing:
            raise KeyError(f"{self.dir}: no activations for {missing[:3]} (and {max(0, len(missing) - 3)} more)")
        return torch.stack([got[i] for i in ids])


class RankedLog:
    """A JSONL cache that several processes fill at once without sharing a file.

    Rank 0 (and a run without a launcher) appends to ``path`` itself, rank ``r > 0`` to
    ``<stem>.rank<r>.jsonl`` beside it; reading yields the records of all of them, so a run on
    any number of processes resumes from what any earlier run cached. Only the own file is
    repaired on open (:class:`~personakern.utils.JsonlLog`); another rank's file may be in the
    middle of an append, so its unterminated or unparsable last line is skipped, not cut.
    """

    def __init__(self, path, rank: Optional[int] = None):
        self.path = Path(path)
        r = distributed.rank() if rank is None else rank
        self.own = JsonlLog(self.path if r == 0 else self._rank_path(r))

    def _rank_path(self, r: int) -> Path:
        return self.path.with_name(f"{self.path.stem}.rank{r}{self.path.suffix}")

    def files(self) -> List[Path]:
        pat = re.compile(re.escape(self.path.stem) + r"\.rank(\d+)" + re.escape(self.path.suffix) + "$")
        ranked = sorted((int(m.group(1)), f) for f in self.path.parent.iterdir() if (m := pat.match(f.name)))
        return ([self.path] if self.path.exists() else []) + [f for _, f in ranked]

    def __iter__(self) -> Iterator[dict]:
        for f in self.files():
            if f == self.own.path:
                yield from self.own
            else:
                yield from _complete_lines(f)

    def read(self) -> List[dict]:
        return list(self)

    def append(self, records) -> None:
        self.own.append(records)


def _complete_lines(path: Path) -> Iterator[dict]:
    lines = path.read_bytes().split(b"\n")   # the last piece is b"" or a line still being written
    for i, line in enumerate(lines[:-1]):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except ValueError:
            if i == len(lines) - 2:          # a torn last record its writer has not repaired yet
                return
            raise ValueError(f"{path}:{i + 1}: not a JSON line (the cache is damaged; delete it to "
                             f"start over)") from None


def generate_cached(model, tok, jobs: Sequence[dict], cache: JsonlLog, settings: GenSettings,
                    progress: bool = True, desc: str = "generating",
                    acts: Optional[ActStore] = None, shard: bool = False) -> Dict[str, dict]:
    """Generate every job not yet in ``cache``; returns ``{id: record}`` for all jobs.

    Records are the job dict plus ``"answer"``; whatever steering the model carries applies.
    With ``acts``, activation means are captured during generation and stored there; a job
    counts as done only when both its record and its activations exist.

    ``shard=True`` under a launcher: this rank generates only batches ``b % world == rank`` and
    every rank returns all records (gathered; a collective call, so every rank must make it).
    Then ``cache`` should be a :class:`RankedLog` and ``acts`` a folder all ranks see.
    """
    ids = [j["id"] for j in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError("job ids must be unique")
    done = {r["id"]: r for r in cache if "id" in r}
    have = acts.ids() if acts is not None else None
    ok = lambda i: i in done and (have is None or i in have)
    batches = [list(jobs[i:i + settings.batch_size]) for i in range(0, len(jobs), settings.batch_size)]
    mine = distributed.my_indices(len(batches)) if shard else range(len(batches))
    todo = [(b, batches[b]) for b in mine if not all(ok(j["id"]) for j in batches[b])]
    if todo:
        bar = tqdm(total=sum(len(bt) for _, bt in todo), desc=desc, unit="answer", disable=not progress)
        for b, batch in todo:
            res = generate_batch(model, tok, batch, settings, batch_seed(settings.seed, b), capture=acts is not None)
            answers = res[0] if acts is not None else res
            if acts is not None:
                acts.write(b, {j["id"]: m for j, m in zip(batch, res[1])})
                have.update(j["id"] for j in batch)
            new = [dict(j, answer=a) for j, a in zip(batch, answers) if j["id"] not in done]
            cache.append(new)
            done.update((r["id"], r) for r in new)
            bar.update(len(batch))
        bar.close()
    if shard:  # each batch's records as its owner has them
        for part in distributed.gather({j["id"]: done[j["id"]] for b in mine for j in batches[b]}):
            done.update(part)
    return {i: done[i] for i in ids}
