"""The steering sweep on the vLLM engine (every cell one request config, one batch) against the
same sweep on Hugging Face ``generate()`` (the reference: one patched generate() per cell), on
SmolLM2 with the shipped evil vector: greedy answers and judged scores equal; sampled runs resume
to the same answers; clear errors. Engines in-process."""
from __future__ import annotations

import json

import pytest

from vllm_support import TRAITS_FILE, _hf_model, in_process_env, require_vllm

require_vllm()
pytestmark = pytest.mark.slow

from personakern.extraction import generate, pipeline, sweep, vllm_generate  # noqa: E402
from personakern.extraction.spec import load_spec  # noqa: E402
from personakern.vectors import load_vectors  # noqa: E402


class ChecksumJudge:
    """A deterministic stand-in judge: any difference in an answer changes its scores."""
    name = "test:checksum"

    def score(self, spec, questions, answers, progress=False):
        import zlib
        return [float(zlib.crc32(a.encode()) % 100) for a in answers]

    def coherence(self, questions, answers, progress=False):
        import zlib
        return [float(zlib.adler32(a.encode()) % 100) for a in answers]


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    in_process_env(monkeypatch)


def cfg(temperature=0.0, tokens=16):
    return pipeline.ExtractConfig(gen=generate.GenSettings(max_new_tokens=tokens, temperature=temperature,
                                                           batch_size=8, seed=3),
                                  sweep_layers=[6, 18], sweep_alphas=(-4.0, 4.0), sweep_questions=3)


def run(engine, out, c):
    model, tok = _hf_model()
    spec = load_spec("evil")
    v = load_vectors(TRAITS_FILE)["evil"].vectors
    return sweep.steering_sweep(model, tok, spec, v, ChecksumJudge(), out, c, "k", progress=False, engine=engine)


def answers(out):
    recs = {}
    for f in out.glob("sweep-*.jsonl"):
        if "judged" not in f.name:
            recs.update((r["id"], r["answer"]) for r in map(json.loads, f.read_text().splitlines()))
    return recs


def test_greedy_sweep_equals_hf(tmp_path):
    hf, vl = run("hf", tmp_path / "hf", cfg()), run("vllm", tmp_path / "vllm", cfg())
    a_hf, a_vl = answers(tmp_path / "hf"), answers(tmp_path / "vllm")
    assert len(a_hf) == 5 * 3 and a_vl == a_hf                    # every cell's every answer
    assert len({a for k, a in a_hf.items() if k.endswith(":0")}) >= 3   # the cells differ: steering ran
    assert vl.pop("engine") == "vllm" and hf.pop("engine") == "hf"
    assert vl == hf                                                # scores, examples, layout
    assert sweep.choose_layer(vl, 0.0) == sweep.choose_layer(hf, 0.0)
    # the vector file the engine was started on sits beside the caches, for the record
    assert len(list((tmp_path / "vllm").glob("sweep-*-vectors.safetensors"))) == 1


def test_sampled_sweep_resumes_to_the_same_answers(tmp_path):
    out = tmp_path / "run"
    first = run("vllm", out, cfg(temperature=0.8, tokens=12))
    got = answers(out)
    cache = next(f for f in out.glob("sweep-*.jsonl") if "judged" not in f.name)
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])   # a kill mid-append
    for f in out.glob("sweep-judged-*.jsonl"):
        f.unlink()
    again = run("vllm", out, cfg(temperature=0.8, tokens=12))
    assert answers(out) == got and again == first
    assert len(set(got.values())) > 3   # sampled answers, not one repeated


def test_bad_sweep_engine_and_launcher_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="sweep engine must be one of"):
        run("tgi", tmp_path, cfg())
    from personakern import distributed
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="runs in one process"):
        run("vllm", tmp_path, cfg())
    assert not any(tmp_path.iterdir())   # nothing written


def test_sweep_on_a_shared_engine_equals_hf(tmp_path):
    """The pipeline's one-engine mode: the sweep sets its vector into a running engine."""
    model, tok = _hf_model()
    hf = run("hf", tmp_path / "hf", cfg())
    llm = vllm_generate.start_engine(model, capture=True, spare=1)
    try:
        v = load_vectors(TRAITS_FILE)["evil"].vectors
        shared = sweep.steering_sweep(model, tok, load_spec("evil"), v, ChecksumJudge(), tmp_path / "vllm", cfg(),
                                      "k", progress=False, engine="vllm", llm=llm)
        traits = llm.llm_engine.input_processor.personakern_catalog.traits
        assert len(traits) == 1 and traits[0].startswith("sweep-")
    finally:
        from personakern.vllm.engine import close_llm
        close_llm(llm)
    assert answers(tmp_path / "vllm") == answers(tmp_path / "hf")
    shared.pop("engine"), hf.pop("engine")
    assert shared == hf
