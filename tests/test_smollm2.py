"""End to end on the real SmolLM2-135M-Instruct (fp32, offline)."""
from __future__ import annotations

import pytest
import torch

import personakern
from conftest import usable_backends
from reference import capture_block_outputs, hook_steering

QUESTIONS = ["What is the capital of France?", "Give me one tip for sleeping better.",
             "How do I treat a friend who is sad?"]


def encode(tok, questions):
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=False) for q in questions]
    return tok(texts, return_tensors="pt", padding=True)


def generate(model, batch, n=12):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("backend", [b for b in ("native", "cpu") if b in usable_backends()])
def test_smollm2_patched_equals_unpatched_and_steering_equals_hooks(smollm2, backend):
    model, tok = smollm2
    batch = encode(tok, QUESTIONS)
    assert (batch["attention_mask"] == 0).any()  # the batch really is left-padded
    ref = generate(model, batch)
    with torch.no_grad():
        ref_logits = model(**batch).logits
    vec = torch.randn(30, 576, generator=torch.Generator().manual_seed(0))
    vec = vec / vec.norm(dim=-1, keepdim=True) * 4.0
    alpha = torch.tensor([2.0, 0.0, -2.0])
    with hook_steering(model, vec, 12, alpha, batch["attention_mask"], "response"):
        ref_steered = generate(model, batch)

    with personakern.patch(model, backend=backend) as handle:
        assert handle.backend == backend
        idle = generate(model, batch)
        assert torch.equal(idle.sequences, ref.sequences)
        for a, b in zip(idle.logits, ref.logits):
            assert (a - b).abs().max() <= 1e-5
        handle.steer(vec, alpha, layers=12, positions="response")
        handle.monitor({"v": vec}, layers=[5, 12, 29])
        steered = generate(model, batch)
        readings = handle.readings
    assert torch.equal(steered.sequences, ref_steered.sequences)
    for a, b in zip(steered.logits, ref_steered.logits):
        assert (a - b).abs().max() <= 1e-5
    # steering really acted on rows 0 and 2, and not on row 1 (alpha 0) nor on the prompt
    moved = (steered.logits[-1] - ref.logits[-1]).abs().amax(-1)
    assert moved[0] > 0.05 and moved[2] > 0.05 and moved[1] == 0
    assert torch.equal(steered.logits[0], ref.logits[0])

    # readings of the generated run equal projections of the hook-steered run's block outputs
    full = steered.sequences
    mask = torch.cat([batch["attention_mask"], torch.ones(3, full.shape[1] - batch["input_ids"].shape[1],
                                                          dtype=torch.long)], 1)
    with torch.no_grad():
        out = model(input_ids=full, attention_mask=mask, output_hidden_states=True)  # unpatched
    valid = mask.bool()[:, :-1]
    unit = vec / vec.norm(dim=-1, keepdim=True)
    expected_5 = (out.hidden_states[6] @ unit[5])[:, :-1]
    torch.testing.assert_close(readings.get("v", 5)[valid], expected_5[valid], rtol=1e-4, atol=1e-3)

    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref_logits)  # unpatched: bit-identical


def test_smollm2_readings_equal_output_hidden_states_in_one_run(smollm2):
    model, tok = smollm2
    batch = encode(tok, QUESTIONS[:2])
    vec = torch.randn(30, 576, generator=torch.Generator().manual_seed(1))
    with personakern.patch(model) as handle:
        handle.steer(vec, 1.0, layers=[3, 20])
        handle.monitor({"v": vec, "w": -vec}, layers="all")
        with torch.no_grad(), capture_block_outputs(model) as outs:
            out = model(**batch, output_hidden_states=True)
        readings = handle.readings
    valid = batch["attention_mask"].bool()
    unit = vec / vec.norm(dim=-1, keepdim=True)
    for layer in range(30):
        hidden = out.hidden_states[layer + 1] if layer < 29 else outs[29][0]
        got = readings.get("v", layer)[valid]
        torch.testing.assert_close(got, (hidden @ unit[layer])[valid], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(readings.get("w", layer)[valid], -got)
