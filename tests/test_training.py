"""Autograd through the patched layers: steering during training (preventative steering)."""
from __future__ import annotations

import torch

import personakern
from conftest import padded_batch, tiny_model
from reference import hook_steering


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradients_with_steering_equal_hook_reference(family, backend):
    model = tiny_model(family).train()
    for m in model.modules():  # dropout off: compare the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    batch = padded_batch((6, 6))
    vec = torch.randn(3, 40)
    with hook_steering(model, vec, 1, 3.0, batch["attention_mask"]):
        ref_loss, ref_grads = loss_and_grads(model, batch)
    with personakern.patch(model, backend=backend) as handle:
        handle.steer(vec, 3.0, layers=1)
        loss, grads = loss_and_grads(model, batch)
    assert abs(loss - ref_loss) <= 1e-5
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
    assert not vec.requires_grad


def test_gradient_checkpointing_still_checkpoints():
    model = tiny_model("llama").train()
    model.gradient_checkpointing_enable()
    calls = []
    batch = padded_batch((5, 5))
    ref_loss, ref_grads = loss_and_grads(model, batch)
    with personakern.patch(model) as handle:
        for layer in model.model.layers:
            inner = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: (calls.append(1), _f(*a, **k))[1]
        loss, grads = loss_and_grads(model, batch)
    assert len(calls) == 3  # one checkpointed call per layer
    assert abs(loss - ref_loss) <= 1e-5
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)
