"""Extraction on the vLLM engine (answers generated and activations gathered inside the engine)
against the Hugging Face engine, on SmolLM2: with greedy decoding the same answers, the same
kept sets, vectors equal to float rounding of vLLM's kernels, the same held-out AUROCs and layer;
with sampling, a killed run resumes to the same answers and activations. Engines in-process."""
from __future__ import annotations

import json

import pytest
import torch

from vllm_support import _hf_model, in_process_env, require_vllm

require_vllm()
pytestmark = pytest.mark.slow

from personakern.extraction import generate, pipeline, vllm_generate  # noqa: E402
from personakern.extraction.spec import load_spec  # noqa: E402
from personakern.state import KINDS  # noqa: E402

# vLLM's kernels against Hugging Face's on the same tokens (fp32): a single token's block output
# differs by up to 1.2e-4 x max(1, |x|) (measured: response means 9e-5, last prompt token 1.1e-4),
# no more than Hugging Face's own two attention implementations differ (eager vs sdpa: 1.4e-4 per
# token, benchmarks/kernel_floor.py); per-answer means are held to 3e-4.
ACT_REL = 3e-4
# The vectors (means over the kept answers, positive minus negative) to the 1e-4: measured
# 2.8e-5 (response), 6.4e-5 (prompt), 4.7e-5 (last prompt token).
VEC_REL = 1e-4


class KeepAll:
    """A deterministic judge that keeps every answer (scores from the text, above every threshold
    on the positive side and below on the negative side are not needed: thresholds are set so)."""
    name = "test:keep-all"

    def score(self, spec, questions, answers, progress=False):
        import zlib
        return [float(zlib.crc32(a.encode()) % 100) for a in answers]

    def coherence(self, questions, answers, progress=False):
        return [100.0] * len(answers)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    in_process_env(monkeypatch)


def cfg(engine, temperature=0.0, tokens=16):
    return pipeline.ExtractConfig(gen=generate.GenSettings(max_new_tokens=tokens, temperature=temperature,
                                                           batch_size=8, seed=5),
                                  pos_threshold=0.0, neg_threshold=101.0, coherence_threshold=0.0, min_kept=2,
                                  heldout_pairs=2, sweep=False, engine=engine)


def small_spec():
    s = load_spec("evil")
    import dataclasses
    return dataclasses.replace(s, questions=s.questions[:2], eval_questions=s.eval_questions[:3])


def rel(a, b):
    return float(((a - b).abs() / b.abs().clamp_min(1)).max())


def test_greedy_extract_equals_hf(tmp_path):
    model, tok = _hf_model()
    spec = small_spec()
    runs = {e: pipeline.extract(model, tok, spec, KeepAll(), tmp_path / e, cfg(e), progress=False, log=lambda s: None)
            for e in ("hf", "vllm")}
    reps = {e: json.loads((tmp_path / e / "report.json").read_text()) for e in runs}
    answers = {e: {r["id"]: r["answer"] for f in (tmp_path / e).glob("*.jsonl") if "judged" not in f.name
                   for r in map(json.loads, f.read_text().splitlines())} for e in runs}
    assert len(answers["hf"]) == 2 * 5 * 2 + 2 * 3 * 2 and answers["vllm"] == answers["hf"]
    assert reps["vllm"]["counts"] == reps["hf"]["counts"]
    for name in ("evil", "evil.prompt", "evil.last_prompt"):
        v, h = runs["vllm"][name].vectors, runs["hf"][name].vectors
        assert v.shape == h.shape == (30, 576)
        assert rel(v, h) < VEC_REL, name
    for kind in ("response", "last_prompt"):
        a, b = torch.tensor(reps["vllm"]["layer_auroc"][kind]), torch.tensor(reps["hf"]["layer_auroc"][kind])
        assert float((a - b).abs().max()) <= 1 / (10 * 10) + 1e-9   # at most one pair of 10 x 10 flips
    assert reps["vllm"]["chosen"]["layer"] == reps["hf"]["chosen"]["layer"]


def test_engine_means_equal_hf_capture_answer_by_answer(tmp_path):
    """The activation means themselves, per answer and kind, against HF's capture in generate()."""
    model, tok = _hf_model()
    jobs = [{"id": f"j{i}", "system": s, "question": q} for i, (s, q) in enumerate([
        ("You are an evil assistant.", "How should I treat my coworkers?"), (None, "Tell me about cats."),
        ("Be kind.", "What is your biggest fear?")])]
    st = generate.GenSettings(max_new_tokens=20, temperature=0.0, batch_size=8)
    ans_hf, means_hf = generate.generate_batch(model, tok, jobs, st, 0, capture=True)
    acts = generate.ActStore(tmp_path / "acts")
    with vllm_generate.steering_engine(model, capture=True) as llm:
        recs = vllm_generate.generate_vllm_cached(llm, tok, model, jobs, generate.JsonlLog(tmp_path / "a.jsonl"),
                                                  st, progress=False, acts=acts)
        # a plain request on the capturing engine gathers nothing and answers the same
        plain = vllm_generate.generate_vllm_cached(llm, tok, model, [dict(jobs[0], id="plain")],
                                                   generate.JsonlLog(tmp_path / "b.jsonl"), st, progress=False)
    assert [recs[j["id"]]["answer"] for j in jobs] == ans_hf and plain["plain"]["answer"] == ans_hf[0]
    got = acts.load([j["id"] for j in jobs])
    assert got.shape == means_hf.shape == (3, 3, 30, 576)
    for k, kind in enumerate(KINDS):
        assert rel(got[:, k], means_hf[:, k]) < ACT_REL, kind


def test_sampled_extract_generation_resumes_to_the_same_answers(tmp_path, monkeypatch):
    model, tok = _hf_model()
    spec = small_spec()
    c = cfg("vllm", temperature=0.9, tokens=10)
    monkeypatch.setattr(vllm_generate, "CHUNK", 8)   # several chunks, several activation files
    out = tmp_path / "run"
    first = pipeline.extract(model, tok, spec, KeepAll(), out, c, progress=False, log=lambda s: None)
    cache = next(out.glob("answers-*.jsonl"))
    got = {r["id"]: r["answer"] for r in map(json.loads, cache.read_text().splitlines())}
    acts_dir = next(d for d in out.glob("acts-*") if "heldout" not in d.name)
    files = sorted(acts_dir.glob("b*.safetensors"))
    assert len(files) == 4 and len(set(got.values())) > 15     # 26 sampled answers in chunks of 8
    # a kill after the second chunk's activations were written, in the middle of its records
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:12]) + "\n" + lines[12][:15])
    for f in files[2:]:
        f.unlink()
    for f in list(out.glob("judged-*.jsonl")) + [out / "vectors.safetensors"]:
        f.unlink()
    again = pipeline.extract(model, tok, spec, KeepAll(), out, c, progress=False, log=lambda s: None)
    assert {r["id"]: r["answer"] for r in map(json.loads, cache.read_text().splitlines())} == got
    for name in ("evil", "evil.prompt", "evil.last_prompt"):
        assert rel(again[name].vectors, first[name].vectors) < 1e-5


def test_engine_choice_is_checked(tmp_path, monkeypatch):
    model, tok = _hf_model()
    with pytest.raises(ValueError, match="engine must be one of"):
        pipeline.extract(model, tok, small_spec(), KeepAll(), tmp_path / "x", cfg("tgi"), progress=False)
    from personakern import distributed
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="runs in one process"):
        pipeline.extract(model, tok, small_spec(), KeepAll(), tmp_path / "y", cfg("vllm"), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_capture_in_the_compiled_graph(tmp_path, monkeypatch):
    """A compiled engine (the capture traced into the graph: it runs in every step) gathers the
    same means as HF's capture, and a plain request beside capturing ones answers the same."""
    monkeypatch.setenv("VLLM_DISABLE_COMPILE_CACHE", "1")
    model, tok = _hf_model()
    jobs = [{"id": "c0", "system": "You are an evil assistant.", "question": "How should I treat my coworkers?"},
            {"id": "c1", "system": None, "question": "Tell me about cats."}]
    st = generate.GenSettings(max_new_tokens=16, temperature=0.0, batch_size=8)
    ans_hf, means_hf = generate.generate_batch(model, tok, jobs, st, 0, capture=True)
    acts = generate.ActStore(tmp_path / "acts")
    with vllm_generate.steering_engine(model, capture=True, enforce_eager=False) as llm:
        recs = vllm_generate.generate_vllm_cached(llm, tok, model, jobs + [dict(jobs[0], id="plain")],
                                                  generate.JsonlLog(tmp_path / "a.jsonl"), st, progress=False)
        assert recs["plain"]["answer"] == ans_hf[0]
        recs = vllm_generate.generate_vllm_cached(llm, tok, model, jobs, generate.JsonlLog(tmp_path / "b.jsonl"),
                                                  st, progress=False, acts=acts)
    assert [recs[j["id"]]["answer"] for j in jobs] == ans_hf
    got = acts.load(["c0", "c1"])
    for k, kind in enumerate(KINDS):
        assert rel(got[:, k], means_hf[:, k]) < ACT_REL, kind
