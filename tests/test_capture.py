"""The engine's capture facility (personakern.state.capture) against forward hooks on the
unpatched model (the reference), for every family; re-fed columns, skipped blocks, errors."""
from __future__ import annotations

import pytest
import torch

import personakern
from conftest import FAMILIES, tiny_model
from reference import capture_block_outputs


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0          # left padding
    mask[2, :4] = 0
    return ids, mask


@torch.no_grad()
def _reference(model, ids, mask, ends):
    with capture_block_outputs(model) as outs:
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    want = []
    for b in range(ids.shape[0]):
        first, end = int((mask[b] == 0).sum()), int(ends[b])
        per_layer = [torch.stack([outs[l][0][b, end:].mean(0), outs[l][0][b, first:end].mean(0),
                                  outs[l][0][b, end - 1]]) for l in sorted(outs)]
        want.append(torch.stack(per_layer))
    return torch.stack(want)                     # [B, L, 3, D]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_teacher_forced_means_match_hooks(family):
    model = tiny_model(family)
    ids, mask = _batch(model.config.vocab_size)
    ends = torch.tensor([5, 6, 7])               # per-row first response column
    want = _reference(model, ids, mask, ends)
    with torch.no_grad(), personakern.patch(model) as h, h.capture() as cap:
        h.new_sequence(ends)
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
        got = cap.means()
        counts = cap.counts.clone()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [[4, 5, 1], [3, 4, 1], [2, 3, 1]]


def test_generation_without_cache_counts_each_column_once():
    """use_cache=False re-feeds the whole sequence at every step: the sums must equal the cached
    run's (each column added once)."""
    model = tiny_model("llama")
    ids, mask = _batch(model.config.vocab_size, seed=1)
    res = {}
    for use_cache in (True, False):
        with torch.no_grad(), personakern.patch(model) as h, h.capture(limit=4) as cap:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                 use_cache=use_cache, pad_token_id=0)
            res[use_cache] = (out, cap.means(), cap.counts.clone())
    assert torch.equal(res[True][0], res[False][0])
    torch.testing.assert_close(res[True][1], res[False][1], atol=1e-5, rtol=1e-5)
    assert torch.equal(res[True][2], res[False][2]) and res[True][2][:, 0].tolist() == [4, 4, 4]
    # the reference: one teacher-forced forward of the generated sequence
    full = res[True][0]
    fmask = torch.cat([mask, torch.ones(3, 5, dtype=mask.dtype)], 1)
    want = _reference(model, full[:, :13], fmask[:, :13], torch.full((3,), 9))
    torch.testing.assert_close(res[True][1], want, atol=1e-5, rtol=1e-5)


def test_skip_rest_skips_later_blocks_and_keeps_the_values():
    model = tiny_model("llama", layers=4)
    ids, mask = _batch(model.config.vocab_size)
    ends = torch.tensor([5, 6, 7])
    want = _reference(model, ids, mask, ends)[:, :2]
    ran = []
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
             for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad(), personakern.patch(model) as h, h.capture(("response", "prompt", "last_prompt"),
                                                                         [0, 1], skip_rest=True) as cap:
            h.new_sequence(ends)
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
            got = cap.means()
    finally:
        for hk in hooks:
            hk.remove()
    assert ran == [0, 1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_capture_errors():
    model = tiny_model("llama")
    with personakern.patch(model) as h:
        with pytest.raises(ValueError, match="capture kinds"):
            with h.capture(("answer",)):
                pass
        with pytest.raises(ValueError, match="out of range"):
            with h.capture(layers=[7]):
                pass
        with h.capture():
            with pytest.raises(RuntimeError, match="already running"):
                with h.capture():
                    pass
        assert h._state.capture is None
        with h.capture(eos=[2]) as cap, torch.no_grad():
            with pytest.raises(RuntimeError, match="input_ids"):
                model(inputs_embeds=torch.randn(1, 3, model.config.hidden_size))
            with pytest.raises(RuntimeError, match="nothing captured"):
                cap.means()
