"""personakern's top-p logits processor (``personakern.vllm.nucleus``) against vLLM's own top-p
(the sort-based ``apply_top_k_top_p_pytorch``), Hugging Face's ``TopPLogitsWarper`` and
hand-computed nuclei; its batch bookkeeping against hand-built batch updates; and, on a
SmolLM2 engine, seeded sampling with it against vLLM's top-p: the same tokens."""
from __future__ import annotations

import pytest
import torch

from vllm_support import _hf_model, in_process_env, require_vllm

require_vllm()

from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch  # noqa: E402

from personakern.vllm import nucleus  # noqa: E402
from personakern.vllm.nucleus import KEY, NucleusProcessor, nucleus_mask_, sampling_kwargs  # noqa: E402


def hf_top_p(logits, p):
    from transformers.generation.logits_process import TopPLogitsWarper
    rows = [TopPLogitsWarper(float(pi))(None, logits[i:i + 1].clone()) for i, pi in enumerate(p)]
    return torch.cat(rows)


def lm_like(rows, vocab, scale, seed):
    """Logits shaped like a language model's: a heavy tail and a few dominant tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * scale
    top = torch.randint(0, vocab, (rows, 3), generator=g)
    return x.scatter_add_(1, top, torch.rand(rows, 3, generator=g) * 4 * scale)


def test_a_hand_computed_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    cases = {0.45: [1], 0.6: [1, 3], 0.85: [1, 2, 3], 0.99: [0, 1, 2, 3], 0.01: [1]}
    for p, kept in cases.items():
        out = nucleus_mask_(logits.clone(), torch.tensor([0]), torch.tensor([p]))
        assert torch.isfinite(out[0]).nonzero().flatten().tolist() == kept, p
        assert torch.equal(out[0, kept], logits[0, kept])


@pytest.mark.parametrize("vocab,first_k", [(49152, nucleus.FIRST_K), (1000, 3), (37, 1), (5, 64)])
@pytest.mark.parametrize("scale", [0.7, 2.5, 6.0])
def test_the_same_mask_as_vllm_and_hugging_face(vocab, first_k, scale):
    rows = 13
    logits = lm_like(rows, vocab, scale, seed=vocab + int(scale * 10))
    p = torch.linspace(0.3, 0.98, rows)
    ours = nucleus_mask_(logits.clone(), torch.arange(rows), p, first_k=first_k)
    theirs = apply_top_k_top_p_pytorch(logits.clone(), None, p.clone(), allow_cpu_sync=True)
    hf = hf_top_p(logits, p)
    kept, kept_vllm, kept_hf = (torch.isfinite(t) for t in (ours, theirs, hf))
    # float32 rounding of the two cumulative sums may move the boundary of a wide nucleus by a
    # token; anything more is a different definition
    assert int((kept != kept_vllm).sum(dim=1).max()) <= 1
    assert int((kept != kept_hf).sum(dim=1).max()) <= 1
    if scale >= 2.5:    # peaked rows: no token near the boundary
        assert torch.equal(kept, kept_vllm)
    assert torch.equal(ours[kept], logits[kept])
    assert bool(kept.any(dim=1).all())


def test_only_the_listed_rows_change_and_inf_is_kept():
    logits = lm_like(6, 300, 3.0, seed=1)
    logits[2, :290] = float("-inf")          # a row already narrowed (bad words, allowed ids)
    before = logits.clone()
    rows, p = torch.tensor([0, 2, 5]), torch.tensor([0.9, 0.999, 0.5])
    out = nucleus_mask_(logits, rows, p, first_k=4)
    assert out is logits
    for r in (1, 3, 4):
        assert torch.equal(out[r], before[r])
    ref = apply_top_k_top_p_pytorch(before[rows].clone(), None, p.clone(), allow_cpu_sync=True)
    assert torch.equal(torch.isfinite(out[rows]), torch.isfinite(ref))


def test_sampling_kwargs_and_bad_values():
    assert sampling_kwargs(0.95, nucleus=True) == {"top_p": 1.0, "extra_args": {KEY: 0.95}}
    assert sampling_kwargs(0.95, nucleus=False) == {"top_p": 0.95}
    assert sampling_kwargs(1.0, nucleus=True) == {"top_p": 1.0}
    for bad in (0, -0.1, 1.5, float("nan"), "x", None):
        with pytest.raises(ValueError, match=KEY):
            sampling_kwargs(bad, nucleus=True)
        with pytest.raises(ValueError, match=KEY):
            NucleusProcessor.validate_params(type("P", (), {"extra_args": {KEY: bad}})())
    NucleusProcessor.validate_params(type("P", (), {"extra_args": None})())


class Params:
    def __init__(self, p=None):
        self.extra_args = None if p is None else {KEY: p}


def test_batch_bookkeeping():
    proc = NucleusProcessor(None, torch.device("cpu"), False)
    logits = lm_like(4, 200, 1.0, seed=3)
    assert proc.apply(logits) is logits and torch.equal(logits, lm_like(4, 200, 1.0, seed=3))
    proc.update_state(BatchUpdate(batch_size=4, removed=[], moved=[],
                                  added=[(0, Params(0.5), None, []), (1, Params(), None, []),
                                         (2, Params(0.9), None, []), (3, Params(1.0), None, [])]))
    assert proc._p == {0: 0.5, 2: 0.9}
    proc.update_state(BatchUpdate(batch_size=4, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert proc._p == {1: 0.5, 2: 0.9}
    proc.update_state(BatchUpdate(batch_size=3, removed=[1], added=[],
                                  moved=[(3, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc._p == {2: 0.9}
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[(1, Params(0.3), None, [])],
                                  moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert proc._p == {0: 0.9, 1: 0.3}
    proc.update_state(None)
    x = lm_like(3, 200, 1.0, seed=4)
    out = proc.apply(x.clone())
    ref = apply_top_k_top_p_pytorch(x[:2].clone(), None, torch.tensor([0.9, 0.3]), allow_cpu_sync=True)
    assert torch.equal(torch.isfinite(out[:2]), torch.isfinite(ref))
    assert torch.equal(out[2], x[2])


@pytest.mark.slow
def test_seeded_sampling_equals_vllms_top_p(monkeypatch):
    """Same seeds, same prompts: vLLM's sorted top-p and the processor draw the same tokens (the
    sampler draws its noise whatever the mask; equal masks give equal tokens)."""
    in_process_env(monkeypatch)
    from vllm import TokensPrompt
    from personakern.extraction.generate import GenSettings, chat_ids, eos_ids
    from personakern.extraction.vllm_generate import sampling_params, start_engine
    from personakern.vllm.engine import close_llm
    from personakern.vllm.nucleus import engine_has_nucleus
    model, tok = _hf_model()
    llm = start_engine(model)
    try:
        assert engine_has_nucleus(llm)
        questions = ["Tell me about cats.", "How do I bake bread?", "What is the best way to learn?",
                     "Write a short poem about rain.", "Why is the sky blue?", "Give me advice."]
        prompts = [TokensPrompt(prompt_token_ids=chat_ids(tok, None, q)) for q in questions] * 2
        eos = eos_ids(model, tok)
        st = GenSettings(max_new_tokens=24, temperature=1.0, top_p=0.9)
        out = {}
        for nuc in (False, True):
            params = [sampling_params(st, eos, 100 + i, None, nucleus=nuc) for i in range(len(prompts))]
            if nuc:
                assert params[0].top_p == 1.0 and params[0].extra_args == {KEY: 0.9}
            out[nuc] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        assert out[True] == out[False]
        assert len({tuple(t) for t in out[True]}) > len(questions)     # sampled: repeats differ
        bad = sampling_params(st, eos, 1, None, nucleus=True)
        bad.extra_args[KEY] = 1.5
        from vllm.exceptions import VLLMValidationError
        with pytest.raises(VLLMValidationError, match=KEY):     # refused before it is queued
            llm.generate(prompts[:1], [bad], use_tqdm=False)
        again = llm.generate(prompts[:2], [sampling_params(st, eos, 100 + i, None, nucleus=True) for i in range(2)],
                             use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in again] == out[True][:2]
    finally:
        close_llm(llm)
