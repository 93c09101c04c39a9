"""Vectors set while a vLLM engine runs (``personakern.vllm.set_vector``, free trait columns from
``PERSONAKERN_VLLM_SPARE_TRAITS``) against the same vectors loaded from a file at engine start:
the same tokens and read-outs; bad calls change nothing; the steering sweep on a shared engine
equals the HF sweep. Engines in-process."""
from __future__ import annotations

import math

import pytest
import torch

from vllm_support import PROMPTS, TRAITS_FILE, _hf_model, chat_ids, in_process_env, require_vllm

require_vllm()
pytestmark = pytest.mark.slow

from personakern.extraction import vllm_generate  # noqa: E402
from personakern.vectors import load_vectors  # noqa: E402
from personakern.vllm import SpecError, readings, set_vector  # noqa: E402


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    in_process_env(monkeypatch)


def _run(llm, specs, tokens=20):
    from vllm import SamplingParams, TokensPrompt
    _, tok = _hf_model()
    ids = chat_ids(tok, PROMPTS[:2])
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                        [SamplingParams(max_tokens=tokens, temperature=0.0,
                                        extra_args=None if s is None else {"personakern": s}) for s in specs],
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [readings(o) for o in outs]


def steer(trait, alpha):
    return {"steer": [{"trait": trait, "alpha": alpha, "layers": [18], "positions": "response"}],
            "monitor": {"traits": "all", "layers": [6, 18]}}


def test_a_vector_set_at_run_time_steers_and_reads_like_one_from_a_file():
    model, _ = _hf_model()
    evil = load_vectors(TRAITS_FILE)["evil"].vectors
    with vllm_generate.steering_engine(model, TRAITS_FILE, spare=2) as llm:
        cat0 = llm.llm_engine.input_processor.personakern_catalog
        with pytest.raises(SpecError, match="unknown trait 'evil2'"):
            _run(llm, [steer("evil2", 6.0)] * 2)
        toks_file, reads_file = _run(llm, [steer("evil", 6.0), steer("evil", -6.0)])
        # the free columns are not traits: "all" reads the file's traits only
        assert reads_file[0].traits == list(cat0.traits) and len(cat0.traits) == 7
        # bad calls: nothing changes
        for args, msg in [(("evil2", evil[:-1]), "shape"), (("evil2", evil * math.nan), "NaN"),
                          (("evil", evil), "comes from the engine's vector files"), (("", evil), "non-empty"),
                          (("evil2", evil, 30), "layer must be")]:
            with pytest.raises(ValueError, match=msg):
                set_vector(llm, *args)
        assert llm.llm_engine.input_processor.personakern_catalog == cat0
        set_vector(llm, "evil2", evil, layer=18)
        toks, reads = _run(llm, [steer("evil2", 6.0), steer("evil", -6.0)])
        assert toks[0] == toks_file[0] and toks[1] == toks_file[1]
        assert reads[0].traits == list(cat0.traits) + ["evil2"]
        r = reads[0]
        torch.testing.assert_close(r.get("evil2", layer=18), r.get("evil", layer=18))
        torch.testing.assert_close(r.get("evil", layer=18), reads_file[0].get("evil", layer=18))
        # the recommended layer given at set time is the default layers of a SPEC
        toks_rec, _ = _run(llm, [{"steer": [{"trait": "evil2", "alpha": 6.0, "positions": "response"}]}] * 2)
        assert toks_rec[0] == toks_file[0]
        # setting the name again replaces the vector in the same column
        set_vector(llm, "evil2", -evil)
        toks, _ = _run(llm, [steer("evil2", 6.0), steer("evil2", -6.0)])
        assert toks == _run(llm, [steer("evil", -6.0), steer("evil", 6.0)])[0] and toks[0] != toks_file[0]
        set_vector(llm, "other", evil)
        with pytest.raises(ValueError, match="no free trait column"):
            set_vector(llm, "third", evil)
        cat = llm.llm_engine.input_processor.personakern_catalog
        assert cat.traits == cat0.traits + ("evil2", "other") and cat.spare == 0


def test_an_engine_without_free_columns_refuses():
    model, _ = _hf_model()
    evil = load_vectors(TRAITS_FILE)["evil"].vectors
    with vllm_generate.steering_engine(model, TRAITS_FILE) as llm:
        with pytest.raises(ValueError, match="PERSONAKERN_VLLM_SPARE_TRAITS"):
            set_vector(llm, "evil2", evil)
