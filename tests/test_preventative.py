"""Preventative steering (personakern.training): the context manager, PEFT LoRA and the Trainer
callback, each against a forward hook that adds alpha * v at the block output of an unpatched model."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers

import personakern
from conftest import padded_batch, tiny_model
from personakern.patching import is_patched
from personakern.training import PreventativeSteeringCallback, base_model, preventative_steering
from reference import hook_steering

LAYER, ALPHA = 1, 3.0


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(grads, ref):
    assert grads.keys() == ref.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def assert_grads_differ(grads, other):
    assert max(float((grads[n] - other[n]).abs().max()) for n in grads) > 1e-3


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@contextlib.contextmanager
def always_steer(model, vector, layer, alpha):
    """The reference for training: a hook that adds ``alpha * vector[layer]`` at every token of
    every forward (padding included, which no real token attends to)."""
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        new = out + alpha * vector[layer].to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    h = base_model(model).model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


# ---------------------------------------------------------------------- context manager
def test_context_manager_gradients_equal_hook_reference(backend):
    model = no_dropout(tiny_model("llama").train())
    batch = padded_batch((6, 4, 6))
    vec = torch.randn(3, 40, requires_grad=True)  # must stay frozen all the same
    plain_loss, plain = loss_and_grads(model, batch)
    with hook_steering(model, vec.detach(), LAYER, ALPHA, batch["attention_mask"]):
        ref_loss, ref = loss_and_grads(model, batch)
    with preventative_steering(model, vec, ALPHA, layers=LAYER, backend=backend) as ps:
        assert is_patched(model) and ps.handle.backend == backend
        loss, grads = loss_and_grads(model, batch)
    assert abs(float(loss - ref_loss)) <= 1e-5 and abs(float(loss - plain_loss)) > 1e-3
    assert_grads_close(grads, ref)
    assert_grads_differ(grads, plain)
    assert vec.grad is None
    assert not is_patched(model)


def test_exit_leaves_bit_identical_logits():
    model = tiny_model("qwen2")
    batch = padded_batch((7, 4, 9))
    before = logits(model, batch)
    with preventative_steering(model, torch.randn(3, 40), 4.0, layers=[0, 2]):
        steered = logits(model, batch)
    assert not torch.allclose(steered, before)
    assert torch.equal(logits(model, batch), before)
    assert not is_patched(model)


def test_existing_handle_is_reused_and_kept():
    model = tiny_model("llama")
    batch = padded_batch((5, 8))
    user_vec = torch.randn(3, 40)
    with personakern.patch(model) as handle:
        handle.steer(user_vec, 2.0, layers=2, name="user")
        before = logits(model, batch)
        pv = personakern.PersonaVector("evil", torch.randn(3, 40), {"layer": 1})
        with preventative_steering(model, pv, 5.0) as ps:  # the model, not the handle: found by patch state
            assert ps.handle is handle
            assert set(handle.steering) == {"user", "preventative/evil"}
            assert handle.steering["preventative/evil"]["layers"] == (1,)  # the recommended layer
            inside = logits(model, batch)
        assert handle.active and set(handle.steering) == {"user"}
        assert torch.equal(logits(model, batch), before)
        assert not torch.allclose(inside, before)
        with preventative_steering(handle, pv, 5.0):  # a handle works as well
            assert torch.equal(logits(model, batch), inside)
        assert torch.equal(logits(model, batch), before)


def test_several_vectors_and_per_vector_alpha_equal_two_hooks():
    model = no_dropout(tiny_model("llama").train())
    batch = padded_batch((6, 6))
    a, b = torch.randn(3, 40), torch.randn(3, 40)
    with hook_steering(model, a, 0, 2.0, batch["attention_mask"]), \
            hook_steering(model, b, 2, -1.5, batch["attention_mask"]):
        ref_loss, ref = loss_and_grads(model, batch)
    vs = personakern.VectorSet([personakern.PersonaVector("a", a, {"layer": 0}),
                                personakern.PersonaVector("b", b, {"layer": 2})])
    with preventative_steering(model, vs, {"a": 2.0, "b": -1.5}):
        loss, grads = loss_and_grads(model, batch)
    assert abs(float(loss - ref_loss)) <= 1e-5
    assert_grads_close(grads, ref)


def test_bad_input_is_refused_clearly():
    model = tiny_model("llama")
    v = torch.randn(3, 40)
    with pytest.raises(ValueError, match="finite number"):
        preventative_steering(model, v, float("nan"), layers=1)
    with pytest.raises(ValueError, match="finite number"):
        preventative_steering(model, v, [1.0, 2.0], layers=1)
    with pytest.raises(ValueError, match="missing"):
        preventative_steering(model, {"a": v, "b": v}, {"a": 1.0}, layers=1)
    with pytest.raises(ValueError, match="positions"):
        preventative_steering(model, v, 1.0, layers=1, positions="answers")
    with pytest.raises(TypeError, match="PersonaVector"):
        preventative_steering(model, "evil", 1.0, layers=1)
    with pytest.raises(ValueError, match="say which layers"):  # a bare tensor has no recommended layer
        with preventative_steering(model, v, 1.0):
            pass
    assert not is_patched(model)  # a failed entry unpatches what it patched
    with pytest.raises(Exception, match=r"\[3, 40\]"):
        with preventative_steering(model, torch.randn(3, 41), 1.0, layers=1):
            pass
    with preventative_steering(model, v, 1.0, layers=1):
        with pytest.raises(RuntimeError, match="already in use"):
            with preventative_steering(model, v, 1.0, layers=1):
                pass
        assert is_patched(model)
    assert not is_patched(model)
    cb = PreventativeSteeringCallback(v, 1.0)   # no layers: on_train_begin fails...
    with pytest.raises(ValueError, match="say which layers"):
        cb.on_train_begin(None, None, None, model=model)
    assert not is_patched(model) and not cb.is_on   # ...and leaves nothing patched


# ---------------------------------------------------------------------- PEFT LoRA
try:
    import peft
except ImportError:  # pragma: no cover - peft is in the test extra
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="needs peft (pip install peft)")


def lora(model, seed=0):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # random A and B: every LoRA grad is non-zero
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config)


@needs_peft
@pytest.mark.parametrize("patch_first", [False, True], ids=["patch-after-peft", "patch-before-peft"])
def test_lora_gradients_equal_hook_reference(patch_first):
    model = no_dropout(tiny_model("llama"))
    ref_pm = lora(copy.deepcopy(model)).train()  # the reference: an unpatched twin
    batch = padded_batch((6, 4, 6))
    vec = torch.randn(3, 40)
    plain_loss, plain = loss_and_grads(ref_pm, batch)
    with hook_steering(base_model(ref_pm), vec, LAYER, ALPHA, batch["attention_mask"]):
        ref_loss, ref = loss_and_grads(ref_pm, batch)

    handle = personakern.patch(model) if patch_first else None
    pm = lora(model).train()  # LoRA layers injected into (possibly) patched blocks
    with preventative_steering(pm, vec, ALPHA, layers=LAYER) as ps:
        assert ps.handle.model is model and (handle is None or ps.handle is handle)
        loss, grads = loss_and_grads(pm, batch)
    assert all("lora_" in n for n in grads) and len(grads) == 2 * 3 * 3  # A, B x 3 modules x 3 layers
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
    assert abs(float(loss - ref_loss)) <= 1e-5
    assert_grads_close(grads, ref)
    assert_grads_differ(grads, plain)
    assert is_patched(model) == patch_first  # unpatched only what it patched
    if handle is not None:
        handle.unpatch()


# ---------------------------------------------------------------------- Trainer callback
def _dataset(n=6, length=10, seed=3):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 128, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()})
    return rows


def _train(model, tmp_path, callbacks=(), steps=3, eval_steps=None, accumulation=1):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        learning_rate=5e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=0,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
        eval_strategy="steps" if eval_steps else "no", eval_steps=eval_steps, disable_tqdm=True,
        gradient_accumulation_steps=accumulation)
    data = _dataset()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   eval_dataset=data[:2] if eval_steps else None, callbacks=list(callbacks))
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@needs_peft
@pytest.mark.parametrize("accumulation", [1, 2])  # steering must stay on across micro-batches
def test_trainer_callback_equals_hook_reference(tmp_path, accumulation):
    start = lora(no_dropout(tiny_model("llama")))
    vec = torch.randn(3, 40)
    runs = {}
    for kind in ("callback", "hook", "none"):
        pm = copy.deepcopy(start)
        cbs = [PreventativeSteeringCallback(vec, ALPHA, layers=LAYER)] if kind == "callback" else []
        ctx = always_steer(pm, vec, LAYER, ALPHA) if kind == "hook" else contextlib.nullcontext()
        with ctx:
            runs[kind] = (_train(pm, tmp_path / kind, cbs, accumulation=accumulation), pm, cbs)
    weights, pm, (cb,) = runs["callback"]
    ref = runs["hook"][0]
    assert len(weights) == 18
    for n in weights:
        torch.testing.assert_close(weights[n], ref[n], rtol=1e-4, atol=1e-5, msg=n)
    moved = max(float((weights[n] - runs["none"][0][n]).abs().max()) for n in weights)
    assert moved > 1e-3  # steering changed what was learned
    # after training: steering off, model unpatched, same function as an untouched copy
    assert not cb.is_on and not is_patched(base_model(pm))
    twin = copy.deepcopy(pm)
    batch = padded_batch((6, 3))
    assert torch.equal(logits(pm.eval(), batch), logits(twin.eval(), batch))


class _EvalProbe(transformers.TrainerCallback):
    def __init__(self, steering_cb):
        self.cb, self.seen = steering_cb, []

    def on_prediction_step(self, args, state, control, **kw):
        self.seen.append(self.cb.is_on)


@needs_peft
@pytest.mark.parametrize("steer_evaluation", [False, True])
def test_trainer_evaluation_steering_is_a_choice(tmp_path, steer_evaluation):
    model = no_dropout(tiny_model("llama"))
    pm = lora(model)
    cb = PreventativeSteeringCallback(torch.randn(3, 40), ALPHA, layers=LAYER, steer_evaluation=steer_evaluation)
    probe = _EvalProbe(cb)
    _train(pm, tmp_path, [cb, probe], steps=2, eval_steps=1)
    assert probe.seen and all(s == steer_evaluation for s in probe.seen)
    assert not cb.is_on and not is_patched(model)
