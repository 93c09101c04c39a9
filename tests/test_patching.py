"""Patched models equal unpatched ones and independent hook references, for every family."""
from __future__ import annotations

import pytest
import torch

import personakern
from conftest import FAMILIES, padded_batch, tiny_model
from reference import capture_block_outputs, hook_steering

ATOL = 1e-5


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def greedy(model, batch, n=6, **kw):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                              return_dict_in_generate=True, output_logits=True, **kw)


def test_every_family_is_supported():
    assert set(FAMILIES) <= set(personakern.SUPPORTED_MODEL_TYPES)


def test_idle_patch_equals_unpatched_and_unpatch_is_exact(family, backend):
    model = tiny_model(family)
    batch = padded_batch()
    ref = logits(model, batch)
    ref_gen = greedy(model, batch)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with personakern.patch(model, backend=backend) as handle:
        assert handle.backend == backend
        assert handle.family in ("llama", "gemma", "phi3")
        assert all("forward" in layer.__dict__ for layer in model.model.layers)
        assert (logits(model, batch) - ref).abs().max() <= ATOL
        gen = greedy(model, batch)
        assert torch.equal(gen.sequences, ref_gen.sequences)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(logits(model, batch), ref)  # bit-identical after unpatch
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())


def test_double_patch_is_an_error_and_changes_nothing():
    model = tiny_model("llama")
    handle = personakern.patch(model)
    forwards = [layer.__dict__["forward"] for layer in model.model.layers]
    with pytest.raises(RuntimeError, match="already patched"):
        personakern.patch(model)
    assert [layer.__dict__["forward"] for layer in model.model.layers] == forwards
    handle.unpatch()
    handle.unpatch()  # idempotent
    personakern.patch(model).unpatch()  # patchable again


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steering_equals_hook_reference(family, positions, backend):
    model = tiny_model(family)
    batch = padded_batch()
    layer = 1
    vector = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    alpha = torch.tensor([1.5, -2.0, 0.7])
    with hook_steering(model, vector, layer, alpha, batch["attention_mask"], positions):
        ref = greedy(model, batch)
    with personakern.patch(model, backend=backend) as handle:
        handle.steer(vector, alpha, layers=layer, positions=positions)
        got = greedy(model, batch)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):  # prefill logits, then each cached decode step
        assert (a - b).abs().max() <= ATOL
    if positions != "prompt":  # a test that cannot fail is no test: steering must change something
        with torch.no_grad():
            plain = greedy(model, batch)
        assert (plain.logits[-1] - got.logits[-1]).abs().max() > 1e-3


def test_prefill_steering_skips_padding_and_changing_alpha_is_cheap():
    model = tiny_model("llama")
    batch = padded_batch()
    vector = torch.randn(3, 40)
    with personakern.patch(model) as handle:
        handle.steer(vector, [0.5, 1.0, -1.0], layers=[0, 2])
        slot_alpha = handle._state.slots["vector"].alpha
        handle.steer(vector, [2.0, -1.0, 3.0], layers=[0, 2])  # same vector: alpha updated in place
        assert handle._state.slots["vector"].alpha is slot_alpha
        with capture_block_outputs(model) as outs:
            logits(model, batch)
    with capture_block_outputs(model) as ref_outs:
        logits(model, batch)
    pad = batch["attention_mask"] == 0
    # block 0's output at padding columns is untouched; at real columns it moved by alpha*v
    assert torch.equal(outs[0][0][pad], ref_outs[0][0][pad])
    moved = outs[0][0] - ref_outs[0][0]
    expected = torch.tensor([2.0, -1.0, 3.0])[:, None, None] * vector[0]
    assert (moved[~pad] - expected.expand_as(moved)[~pad]).abs().max() <= 1e-5


def test_two_vectors_on_overlapping_layers_add_up():
    model = tiny_model("qwen3")
    batch = padded_batch((5, 5))
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    with hook_steering(model, v1, 1, 1.0, batch["attention_mask"]), \
            hook_steering(model, v2, 1, -0.5, batch["attention_mask"]), \
            hook_steering(model, v2, 2, -0.5, batch["attention_mask"]):
        ref = logits(model, batch)
    with personakern.patch(model) as handle:
        handle.steer(v1, 1.0, layers=1, name="a").steer(v2, -0.5, layers=[1, 2], name="b")
        assert (logits(model, batch) - ref).abs().max() <= ATOL
        handle.clear("a")
        handle.clear()
        assert (logits(model, batch) - logits_unpatched(family="qwen3", batch=batch)).abs().max() <= ATOL


def logits_unpatched(family, batch):
    return logits(tiny_model(family), batch)


def test_readings_equal_projections_of_hidden_states(family, backend):
    model = tiny_model(family)
    batch = padded_batch()
    g = torch.Generator().manual_seed(5)
    traits = {"a": torch.randn(3, 40, generator=g), "b": torch.randn(3, 40, generator=g)}
    with personakern.patch(model, backend=backend) as handle:
        handle.steer(traits["a"], 2.0, layers=1)
        handle.monitor(traits, layers="all")
        with torch.no_grad(), capture_block_outputs(model) as outs:
            out = model(**batch, output_hidden_states=True)
        readings = handle.readings
    valid = batch["attention_mask"].bool()
    assert readings.shape == (3, 9, 3, 2)
    assert torch.isnan(readings.values[~valid]).all()
    for layer in range(3):
        # output_hidden_states[l + 1] is block l's output, except the last (after the final norm)
        hidden = out.hidden_states[layer + 1] if layer < 2 else outs[layer][0]
        for name, vec in traits.items():
            expected = hidden @ (vec[layer] / vec[layer].norm())
            got = readings.get(name, layer)
            torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_readings_during_generate_align_with_output_columns():
    model = tiny_model("llama")
    batch = padded_batch((4, 6))
    vec = torch.randn(3, 40)
    with personakern.patch(model) as handle:
        handle.monitor({"t": vec}, layers=[0, 2])
        gen = greedy(model, batch, n=5)
        readings = handle.readings
        # the same sequence in one teacher-forced forward gives the same projections per column
        full_mask = torch.cat([batch["attention_mask"], torch.ones(2, 5, dtype=torch.long)], 1)
        with torch.no_grad(), capture_block_outputs(model) as outs:
            model(input_ids=gen.sequences, attention_mask=full_mask)
    # the last generated token is never fed back through the model, so it has no reading
    assert readings.shape[:2] == (2, gen.sequences.shape[1] - 1)
    assert readings.prompt_lengths.tolist() == [6, 6]
    valid = full_mask.bool()[:, :-1]
    for i, layer in enumerate([0, 2]):
        expected = (outs[layer][0] @ (vec[layer] / vec[layer].norm()))[:, :-1]
        torch.testing.assert_close(readings.values[:, :, i, 0][valid], expected[valid], rtol=1e-4, atol=1e-4)
    assert readings.last_prompt_token().shape == (2, 2, 1)
    assert torch.isfinite(readings.response_mean()).all()
