"""`personakern extract` sharded over 2 CPU processes (torchrun, gloo) against the one-process run.

One tiny random Llama with SmolLM2's tokenizer, the built-in `evil` spec cut to 3 questions,
the likelihood judge on the same model (it scores any model; on this one the trait scores
straddle 50, so the filter keeps about half of each side). Sizes give five generation batches
of answers (the extra held-out answers fit in one), three judge chunks (32 + 32 + 14) and five
sweep cells, so each rank generates, judges and steers.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_process_group, tiny_llama_for

from personakern.extraction import generate
from personakern.extraction.generate import RankedLog
from personakern.utils import JsonlLog
from personakern.vectors import load_vectors

REPO = Path(__file__).resolve().parent.parent
BATCH, CHUNK = 16, 32
ARGS = ["extract", "--trait", "evil", "--questions", "3", "--samples", "2", "--max-new-tokens", "6",
        "--batch-size", str(BATCH), "--sweep-layers", "1", "2", "--sweep-alphas", "2", "4",
        "--sweep-questions", "2", "--min-kept", "1", "--coherence-threshold", "0", "--coherence-floor", "0",
        "--judge", "likelihood", "--judge-chunk", str(CHUNK), "--quiet"]
CACHES = ("answers", "heldout", "judged", "sweep", "sweep-judged")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import personakern
    tok = personakern.load_model()[1]
    d = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama_for(tok, layers=4).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def in_process(model_dir, out, monkeypatch):
    """The command without a launcher, in this process, on one thread like each torchrun rank:
    the activation files are compared bit for bit, and a float sum's rounding depends on how
    many threads split it (the machine's default is 2, or whatever OMP_NUM_THREADS says)."""
    from personakern.cli.main import main
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(ARGS + ["--model", str(model_dir), "--out", str(out)])
    finally:
        torch.set_num_threads(threads)


def torchrun(model_dir, out, nproc=2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # = in_process
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), "-m", "personakern", *ARGS, "--model", str(model_dir),
           "--out", str(out)]
    return run_process_group(cmd, timeout=240, env=env)


def cache_file(run: Path, kind: str) -> Path:
    """The rank-0 (or only) file of a cache: ``<kind>-<hash>.jsonl``."""
    hits = [p for p in run.glob(f"{kind}-*.jsonl") if ".rank" not in p.name
            and (kind != "sweep" or not p.name.startswith("sweep-judged-"))]
    assert len(hits) == 1, hits
    return hits[0]


def ids(path: Path) -> list:
    return [r["id"] for r in JsonlLog(path)] if path.exists() else []


def rank1(path: Path) -> Path:
    return path.with_name(f"{path.stem}.rank1.jsonl")


def test_extract_on_two_processes_equals_one(model_dir, tmp_path, monkeypatch):
    one, two = tmp_path / "one", tmp_path / "two"
    assert in_process(model_dir, one, monkeypatch) == 0
    assert not list(one.glob("*.rank*.jsonl"))          # one process writes no rank files

    # the 2-process run starts from a cache an interrupted one-process run left: batch 0 only
    answers = cache_file(one, "answers")
    order = ids(answers)                                 # job order = batch order (appended per batch)
    assert len(order) >= 4 * BATCH
    two.mkdir()
    lines = answers.read_text().splitlines(keepends=True)
    (two / answers.name).write_text("".join(lines[:BATCH]))
    acts = next(p for p in one.glob("acts-*") if not p.name.startswith("acts-heldout-"))
    (two / acts.name).mkdir()
    shutil.copy(acts / "b00000.safetensors", two / acts.name / "b00000.safetensors")

    r = torchrun(model_dir, two)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("chosen: layer") == 1          # only rank 0 prints the report

    # every cache: the union of the rank files holds exactly the one-process records
    for kind in CACHES:
        ref = {x["id"]: x for x in JsonlLog(cache_file(one, kind))}
        got = {x["id"]: x for x in RankedLog(cache_file(two, kind), rank=0)}
        assert got == ref, kind

    # the work was split: batch b (and its activations) by rank b % 2, judge chunk c by rank
    # c % 2, sweep cell c (baseline first) by rank c % 2; batch 0 was reused, not redone
    for kind in ("answers", "heldout"):
        f = cache_file(two, kind)
        ref = ids(cache_file(one, kind))
        assert ids(f) == by_rank(ref, BATCH, 0) and ids(rank1(f)) == by_rank(ref, BATCH, 1), kind
    assert ids(rank1(cache_file(two, "answers")))
    judged_order = order + ids(cache_file(one, "heldout"))   # records are judged in this order
    assert len(judged_order) > 2 * CHUNK
    j0, j1 = cache_file(two, "judged"), rank1(cache_file(two, "judged"))
    assert ids(j0) == by_rank(judged_order, CHUNK, 0) and ids(j1) == by_rank(judged_order, CHUNK, 1)
    s1 = ids(rank1(cache_file(two, "sweep")))
    assert {i.rsplit(":", 1)[0] for i in s1} == {"s:1:2", "s:2:2"}
    for f in (two / acts.name).glob("b*.safetensors"):
        assert torch.equal(generate.ActStore(two / acts.name).load(ids_in(f)),
                           generate.ActStore(one / acts.name).load(ids_in(f)))

    # same vectors, AUROC per layer, sweep and layer choice
    v1, v2 = load_vectors(one / "vectors.safetensors"), load_vectors(two / "vectors.safetensors")
    for trait in ("evil", "evil.prompt", "evil.last_prompt"):
        torch.testing.assert_close(v2[trait].vectors, v1[trait].vectors, atol=1e-5, rtol=1e-5)
    rep1 = json.loads((one / "report.json").read_text())
    rep2 = json.loads((two / "report.json").read_text())
    assert rep2["layer_auroc"] == rep1["layer_auroc"] and rep2["chosen"] == rep1["chosen"]
    assert rep1["processes"] == 1 and rep2["processes"] == 2
    for k in ("seconds", "processes"):
        del rep1[k], rep2[k]
    assert rep2 == rep1
    assert 0 < rep1["counts"]["positive"]["kept"] < rep1["counts"]["positive"]["generated"]   # the filter bites

    # one process resumes from the rank files alone: nothing generated or judged again
    from personakern.judges.likelihood import LikelihoodJudge

    def forbidden(*a, **k):
        raise AssertionError("recomputed a cached result")
    monkeypatch.setattr(generate, "generate_batch", forbidden)
    monkeypatch.setattr(LikelihoodJudge, "score", forbidden)
    monkeypatch.setattr(LikelihoodJudge, "coherence", forbidden)
    before = {p.name: p.read_bytes() for p in two.glob("*.jsonl")}
    (two / "vectors.safetensors").unlink()
    assert in_process(model_dir, two, monkeypatch) == 0
    assert {p.name: p.read_bytes() for p in two.glob("*.jsonl")} == before
    assert torch.equal(load_vectors(two / "vectors.safetensors")["evil"].vectors, v1["evil"].vectors)


def by_rank(items: list, size: int, rank: int, world: int = 2) -> list:
    """The items of the batches of ``size`` that rank ``rank`` owns (batch b: rank b % world)."""
    return [x for i, x in enumerate(items) if (i // size) % world == rank]


def ids_in(path: Path) -> list:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return sorted(f.keys())


def test_ranked_log_reads_every_rank_and_repairs_only_its_own(tmp_path):
    path = tmp_path / "c.jsonl"
    RankedLog(path, rank=0).append([{"id": "a"}])
    r1 = RankedLog(path, rank=1)
    r1.append([{"id": "b"}, {"id": "c"}])
    assert r1.own.path == tmp_path / "c.rank1.jsonl"
    (tmp_path / "c.rank12.jsonl").write_text('{"id": "d"}\n{"id": "e", "ans')   # mid-append
    (tmp_path / "cc.rank3.jsonl").write_text('{"id": "other cache"}\n')
    before = (tmp_path / "c.rank12.jsonl").read_bytes()
    assert [x["id"] for x in RankedLog(path, rank=0)] == ["a", "b", "c", "d"]
    assert (tmp_path / "c.rank12.jsonl").read_bytes() == before                  # not cut by a reader
    with pytest.warns(UserWarning, match="incomplete last record"):
        own = RankedLog(path, rank=12)                                           # its owner repairs it
    assert (tmp_path / "c.rank12.jsonl").read_text() == '{"id": "d"}\n'
    own.append([{"id": "e"}])
    assert [x["id"] for x in RankedLog(path, rank=5)] == ["a", "b", "c", "d", "e"]
    (tmp_path / "c.rank1.jsonl").write_text('{"id": "b"}\nGARBAGE\n{"id": "c"}\n')
    with pytest.raises(ValueError, match=r"c.rank1.jsonl:2: not a JSON line"):
        RankedLog(path, rank=0).read()
