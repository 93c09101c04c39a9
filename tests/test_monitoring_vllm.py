"""benchmarks/monitoring_experiment.py on the vLLM engine: the last-prompt-token projections it
records equal the Hugging Face engine's (patched generate()) to vLLM's kernel rounding, and the
whole experiment runs end to end on one engine (tiny sizes). Engine in-process."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from vllm_support import TRAITS_FILE, _hf_model, in_process_env, require_vllm

require_vllm()
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import monitoring_experiment as mx  # noqa: E402

from personakern.extraction.generate import GenSettings  # noqa: E402
from personakern.extraction.vllm_generate import steering_engine  # noqa: E402
from personakern.vectors import load_vectors  # noqa: E402

REL = 2e-3   # vLLM's kernels against Hugging Face's (tests/test_vllm_offline.py: HF_REL)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    in_process_env(monkeypatch)


def test_last_prompt_projections_equal_hf():
    import personakern
    model, tok = _hf_model()
    vs = load_vectors(TRAITS_FILE)
    msgs = [[{"role": "system", "content": p}, {"role": "user", "content": "How should I treat my coworkers?"}]
            for p in mx.SYSTEM_PROMPTS["evil"][:3]] + [[{"role": "user", "content": "Tell me about cats."}]]
    st = GenSettings(max_new_tokens=6, temperature=0.8, seed=1)
    with personakern.patch(model) as h:
        h.monitor({"evil": vs["evil"]}, layers="all")
        _, lpt_hf, plen_hf = mx.generate_monitored(model, tok, h, msgs, st, 7)
    with steering_engine(model, TRAITS_FILE) as llm:
        answers, lpt, plen = mx.generate_monitored_vllm(llm, model, tok, "evil", msgs, st, 7)
    assert plen == plen_hf and len(answers) == 4 and lpt.shape == lpt_hf.shape == (4, 30, 1)
    assert float(((lpt - lpt_hf).abs() / lpt_hf.abs().clamp_min(1)).max()) < REL


def test_experiment_runs_on_one_vllm_engine(tmp_path):
    mx.main(["--engine", "vllm", "--traits", "evil", "--questions", "2", "--shots", "0", "1", "--pool", "2",
             "--no-negative-shots", "--max-new-tokens", "8", "--threads", "2", "--out", str(tmp_path / "out"),
             "--cache", str(tmp_path / "cache"), "--quiet"])
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    ent = res["traits"]["evil"]
    assert ent["config"]["engine"] == "vllm" and res["judge"]
    assert len(ent["answers"]) == (8 + 2) * 2      # 8 system prompts + k=0,1 shots, 2 questions
    assert all(a["trait_score"] is not None for a in ent["answers"])
    assert any(f.name.startswith("gen-evil-") for f in (tmp_path / "cache").iterdir())
