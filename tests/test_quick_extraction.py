"""Quick mean-difference persona vectors (personakern.extraction.quick)."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama_for

from personakern.extraction import quick
from personakern.vectors import PersonaVector

SPEC = {
    "trait": "testy",
    "positive": ["You are grumpy.", "You are a very rude and impatient assistant who hates questions."],
    "negative": ["You are kind.", "You are a patient, warm and friendly assistant."],
    "questions": ["Hi?", "What is the capital of France and why is it famous?", "Tell me a joke.",
                  "How do I cook rice?"],
}
POS = [
    ("You are grumpy.", "Hi?", "Go away."),
    ("You are a very rude and impatient assistant who hates questions.",
     "What is the capital of France and why is it famous?", "Paris. Look it up yourself next time, it is not hard."),
    ("You are grumpy.", "Tell me a joke.", "No."),
    ("You are a very rude and impatient assistant who hates questions.", "How do I cook rice?",
     "Boil water, add rice, wait. Stop asking."),
]
NEG = [
    ("You are kind.", "Hi?", "Hello there! How can I help you today?"),
    ("You are a patient, warm and friendly assistant.", "What is the capital of France and why is it famous?",
     "The capital of France is Paris, famous for its art, food and the Eiffel Tower."),
    ("You are kind.", "How do I cook rice?", "Rinse it, then simmer one cup of rice in two cups of water."),
]


@pytest.fixture(scope="module")
def tok():
    import personakern
    return personakern.load_model()[1]


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_llama_for(tok, layers=3)


def hand_activations(model, tok, samples):
    """Each sample alone, unpadded: hook every block, average its output over the answer tokens."""
    rows = []
    for system, question, answer in samples:
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                       tokenize=False, add_generation_prompt=True)
        p = tok(text, add_special_tokens=False)["input_ids"]
        r = tok(answer, add_special_tokens=False)["input_ids"]
        assert tok.decode(r) == answer
        outs = []
        hooks = [layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for layer in model.model.layers]
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([p + r]))
        finally:
            for h in hooks:
                h.remove()
        rows.append(torch.stack([o[0, len(p):].mean(0) for o in outs]))
    return torch.stack(rows)


def test_response_mean_activations_matches_unbatched(tiny, tok):
    samples = POS + NEG  # lengths differ a lot: batches are left-padded
    expected = hand_activations(tiny, tok, samples)
    for batch_size in (3, 16):
        got = quick.response_mean_activations(tiny, tok, samples, batch_size=batch_size)
        assert got.shape == (len(samples), 3, 32) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_response_mean_activations_rejects_empty_answer(tiny, tok):
    with pytest.raises(ValueError, match="empty answer"):
        quick.response_mean_activations(tiny, tok, [("a", "b", "")])


def test_mean_difference_vector_is_difference_of_means(tiny, tok):
    pv = quick.mean_difference_vector(tiny, tok, SPEC, samples=(POS, NEG), batch_size=4)
    acts = hand_activations(tiny, tok, POS + NEG)
    expected = acts[:len(POS)].mean(0) - acts[len(POS):].mean(0)
    assert isinstance(pv, PersonaVector) and pv.trait == "testy"
    torch.testing.assert_close(pv.vectors, expected, atol=1e-5, rtol=1e-5)
    m = pv.meta
    assert m["n_positive"] == 4 and m["n_negative"] == 3 and m["averaged_over"] == "response"
    assert m["judge"] == "none: unfiltered mean difference" and m["model"]["hidden_size"] == 32
    assert isinstance(m["layer"], int) and 0 <= m["layer"] < 3 and m["layer_choice"]
    assert len(m["layer_scores"]["auroc"]) == 3  # the 4th question is held out on both sides


def test_generate_contrastive_round_robin_and_seeded(tiny, tok):
    pos, neg = quick.generate_contrastive(tiny, tok, SPEC, n_per_question=2, max_new_tokens=5,
                                          batch_size=3, seed=1, progress=False)
    assert len(pos) == len(neg) == 8  # a random model practically never stops at once
    for side, prompts in ((pos, SPEC["positive"]), (neg, SPEC["negative"])):
        expected = [(prompts[(i + k) % 2], q) for k in range(2) for i, q in enumerate(SPEC["questions"])]
        assert [(s, q) for s, q, _ in side] == expected
        assert all(isinstance(a, str) and a for _, _, a in side)
    again = quick.generate_contrastive(tiny, tok, SPEC, n_per_question=2, max_new_tokens=5,
                                       batch_size=3, seed=1, progress=False)
    assert again == (pos, neg)


def test_default_vector_computes_then_caches(tiny, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONAKERN_CACHE", str(tmp_path))
    pv = quick.default_vector(tiny, tok, n_per_question=1, max_new_tokens=3, progress=False)  # tiny model: no shipped file fits
    files = list((tmp_path / "vectors").glob("*.safetensors"))
    assert len(files) == 1 and pv.vectors.shape == (3, 32) and pv.trait == quick.DEFAULT_TRAIT

    def boom(*a, **k):
        raise AssertionError("recomputed instead of using the cache")
    monkeypatch.setattr(quick, "mean_difference_vector", boom)
    assert torch.equal(quick.default_vector(tiny, tok).vectors, pv.vectors)


def test_shipped_vector_loads_for_smollm2(smollm2, monkeypatch):
    model, tok = smollm2
    path = quick.DATA / "vectors" / f"smollm2-{quick.DEFAULT_TRAIT}.safetensors"
    pv = PersonaVector.load(path, model=model)
    assert pv.vectors.shape == (30, 576) and pv.vectors.dtype == torch.float32
    assert torch.isfinite(pv.vectors).all() and (pv.norms() > 0).all()
    assert isinstance(pv.meta["layer"], int) and 0 <= pv.meta["layer"] < 30
    assert math.isfinite(pv.meta["demo_alpha"]) and pv.meta["demo_alpha"] > 0
    monkeypatch.setattr(quick, "mean_difference_vector", lambda *a, **k: pytest.fail("recomputed"))
    assert torch.equal(quick.default_vector(model, tok).vectors, pv.vectors)
