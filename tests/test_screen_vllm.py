"""``screen`` on the vLLM engine against the Hugging Face engine on SmolLM2 with the shipped
vectors and the toy set (benchmarks/screen_toy.jsonl): greedy base answers equal, dP per sample
within 1e-3, the approximation and the ranking the same. Engine in-process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_support import TRAITS_FILE, _hf_model, in_process_env, require_vllm

require_vllm()
pytestmark = pytest.mark.slow

from personakern.screening import ScreenSettings, screen  # noqa: E402
from personakern.vectors import load_vectors  # noqa: E402

TOY = Path(__file__).resolve().parents[1] / "benchmarks" / "screen_toy.jsonl"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    in_process_env(monkeypatch)


def _rows(out):
    return {r["id"]: r for r in map(json.loads, (out / "ranked.jsonl").read_text().splitlines())}


def test_screen_on_vllm_equals_hf(tmp_path):
    model, tok = _hf_model()
    vs = load_vectors(TRAITS_FILE)
    runs = {}
    for engine in ("hf", "vllm"):
        s = ScreenSettings(traits=["evil", "humorous"], max_new_tokens=24, batch_size=8, chunk_batches=2,
                           progress=False, engine=engine)
        runs[engine] = screen(model, tok, TOY, vs, tmp_path / engine, s)
    hf, vl = _rows(tmp_path / "hf"), _rows(tmp_path / "vllm")
    assert len(hf) == len(vl) == 40
    ans = {e: {r["k"]: r["answer"] for f in sorted((tmp_path / e / "answers").glob("*.jsonl"))
               for r in map(json.loads, f.read_text().splitlines())} for e in runs}
    assert ans["vllm"] == ans["hf"] and len(ans["hf"]) == 40
    worst = 0.0
    for i, h in hf.items():
        for k, v in h.items():
            if k.startswith(("dP", "approx", "response", "base", "last_prompt")):
                worst = max(worst, abs(vl[i][k] - v))
    assert worst < 1e-3, worst
    assert [r for r in hf] == [r for r in vl]          # the same ranking
    assert runs["vllm"]["samples"] == runs["hf"]["samples"] == 40


def test_screen_engine_is_checked(tmp_path, monkeypatch):
    model, tok = _hf_model()
    vs = load_vectors(TRAITS_FILE)
    with pytest.raises(ValueError, match="engine must be"):
        screen(model, tok, TOY, vs, tmp_path / "a", ScreenSettings(engine="tgi", progress=False))
    from personakern import distributed
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="runs in one process"):
        screen(model, tok, TOY, vs, tmp_path / "b", ScreenSettings(engine="vllm", progress=False))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
