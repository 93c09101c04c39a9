"""``steer(..., cap=)``, ``steer(..., ablate=True)`` and ``steer(..., when=)`` on patched models
against forward hooks on the unpatched model that do the same arithmetic in plain torch.

The hooks see the block output (the residual stream after block ``l``), as the fused op does;
the first hook call is the prompt (padding excluded), each later call one generated token.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing

import personakern
from conftest import padded_batch, tiny_model
from reference import capture_block_outputs, hook_edit

ATOL = 1e-5


def greedy(model, batch, n=5):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                              return_dict_in_generate=True, output_logits=True)


def rowwise(values):
    return torch.as_tensor(values, dtype=torch.float32).reshape(-1, 1, 1)


def unit(v):
    return v / v.norm()


def cap_edit(u, tau, alpha=None, v=None):
    def edit(h):
        if alpha is not None:
            h = h + rowwise(alpha) * v
        p = (h * u).sum(-1, keepdim=True)
        return h - torch.relu(p - rowwise(tau)) * u
    return edit


def block_projections(model, batch, layer, u):
    with torch.no_grad(), capture_block_outputs(model) as outs:
        model(**batch)
    return (outs[layer][0] * u).sum(-1)[batch["attention_mask"].bool()]


def differs(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits)) > 1e-4


def assert_same_generation(got, ref):
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max() <= ATOL


@pytest.mark.parametrize("positions", ["all", "response"])
def test_cap_equals_hook_reference(family, backend, positions):
    if (positions != "all" or backend == "triton") and family != "llama" and not torch.cuda.is_available():
        pytest.skip("position masks and the (slow, interpreted) triton kernel: checked on llama")
    model = tiny_model(family)
    batch = padded_batch()
    layer = 1
    vector = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    u = unit(vector[layer])
    p = block_projections(model, batch, layer, u)
    tau = [float(p.quantile(0.1)), float(p.quantile(0.4)), math.inf]  # binding for some tokens only
    with hook_edit(model, layer, cap_edit(u, tau), batch["attention_mask"], positions):
        ref = greedy(model, batch)
    with personakern.patch(model, backend=backend) as pk:
        pk.steer(vector, layers=layer, positions=positions, cap=tau)
        got = greedy(model, batch)
    assert_same_generation(got, ref)
    plain = greedy(model, batch)
    assert differs(plain, got)  # the cap did something


def test_alpha_then_cap_and_readings_respect_the_cap(backend):
    model = tiny_model("llama")
    batch = padded_batch()
    layer = 2
    vector = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    u = unit(vector[layer])
    alpha, tau = [4.0, 4.0, -1.0], [0.5, 2.0, 0.5]
    with hook_edit(model, layer, cap_edit(u, tau, alpha, vector[layer]), batch["attention_mask"]):
        ref = greedy(model, batch)
    with personakern.patch(model, backend=backend) as pk:
        pk.steer(vector, alpha, layers=layer, cap=tau)
        pk.monitor({"v": vector}, layers=[layer])
        got = greedy(model, batch)
        r = pk.readings
    assert_same_generation(got, ref)
    vals = r.get("v", layer)
    ok = r.valid
    assert (vals[ok] <= torch.tensor(tau)[:, None].expand_as(vals)[ok] + 1e-4).all()
    assert (vals[ok] >= torch.tensor(tau)[:, None].expand_as(vals)[ok] - 1e-3).any()  # binding


def test_ablation_equals_hook_reference_and_zeroes_the_projection(family, backend):
    model = tiny_model(family)
    batch = padded_batch()
    vector = torch.randn(3, 40, generator=torch.Generator().manual_seed(6))
    units = [unit(v) for v in vector]

    def edit_for(l):
        return lambda h: h - (h * units[l]).sum(-1, keepdim=True) * units[l]

    with hook_edit(model, 0, edit_for(0), batch["attention_mask"]), \
            hook_edit(model, 2, edit_for(2), batch["attention_mask"]):
        ref = greedy(model, batch)
    with personakern.patch(model, backend=backend) as pk:
        pk.steer(vector, layers=[0, 2], ablate=True)
        pk.monitor({"v": vector}, layers=[0, 2])
        got = greedy(model, batch)
        r = pk.readings
    assert_same_generation(got, ref)
    assert r.get("v")[r.valid].abs().max() <= 1e-4


@pytest.mark.parametrize("positions", ["all", "response"])
def test_when_equals_hook_reference(family, backend, positions):
    if (positions != "all" or backend == "triton") and family != "llama" and not torch.cuda.is_available():
        pytest.skip("position masks and the (slow, interpreted) triton kernel: checked on llama")
    model = tiny_model(family)
    batch = padded_batch()
    layer = 1
    g = torch.Generator().manual_seed(7)
    vector, condition = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    c = unit(condition[layer])
    p = block_projections(model, batch, layer, c)
    srt = p.sort().values  # thresholds halfway between two tokens' projections: no near-ties
    mid = lambda q: float((srt[int(q * (len(srt) - 1))] + srt[int(q * (len(srt) - 1)) + 1]) / 2)
    thr = [mid(0.5), -math.inf, mid(0.75)]
    alpha = [3.0, -2.0, 5.0]

    def edit(h):
        gate = ((h * c).sum(-1, keepdim=True) > rowwise(thr)).to(h.dtype)
        return h + gate * rowwise(alpha) * vector[layer]

    with hook_edit(model, layer, edit, batch["attention_mask"], positions):
        ref = greedy(model, batch)
    with personakern.patch(model, backend=backend) as pk:
        pk.steer(vector, alpha, layers=layer, positions=positions, when=(condition, thr))
        got = greedy(model, batch)
        # the same with the condition named as a monitored trait
        pk.monitor({"cond": condition}, layers=[layer])
        pk.steer(vector, alpha, layers=layer, positions=positions, when=("cond", thr))
        named = greedy(model, batch)
        # gates closed everywhere: no steering at all
        pk.steer(vector, alpha, layers=layer, positions=positions, when=(condition, math.inf))
        closed = greedy(model, batch)
    assert_same_generation(got, ref)
    assert_same_generation(named, ref)
    plain = greedy(model, batch)
    assert_same_generation(closed, plain)
    assert differs(plain, got)


def test_changing_cap_and_threshold_is_cheap_and_takes_effect():
    model = tiny_model("llama")
    batch = padded_batch()
    g = torch.Generator().manual_seed(8)
    vector, condition = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    with personakern.patch(model) as pk:
        pk.steer(vector, 2.0, layers=1, cap=1.0, when=(condition, 0.0))
        slot = pk._state.slots["vector"]
        steer_before = pk._state.layer_steer[1]
        pk.steer(vector, 2.0, layers=1, cap=0.25, when=(condition, -0.5))
        assert pk._state.slots["vector"] is slot and pk._state.layer_steer[1] is steer_before
        assert slot.cap.tolist() == [0.25] and slot.gate_thr.tolist() == [-0.5]
        got = greedy(model, batch)
    u, c = unit(vector[1]), unit(condition[1])

    def edit(h):
        gate = ((h * c).sum(-1, keepdim=True) > -0.5).to(h.dtype)
        h = h + gate * 2.0 * vector[1]
        return h - torch.relu((h * u).sum(-1, keepdim=True) - 0.25) * u

    with hook_edit(model, 1, edit, batch["attention_mask"]):
        ref = greedy(model, batch)
    assert_same_generation(got, ref)


def test_compiled_cap_and_when_equal_eager():
    model = tiny_model("llama")
    batch = padded_batch((6, 6))
    g = torch.Generator().manual_seed(9)
    vector, condition = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    with personakern.patch(model) as pk:
        pk.steer(vector, 3.0, layers=[0, 1], when=(condition, 0.0))
        pk.steer(condition, layers=2, cap=0.5, name="capped")
        with torch.no_grad():
            eager = model(**batch).logits
            counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
            compiled = torch.compile(model, fullgraph=True, backend=counter)
            first = compiled(**batch).logits
            pk.steer(condition, layers=2, cap=-0.5, name="capped")  # value changes: no recompile
            pk.steer(vector, 3.0, layers=[0, 1], when=(condition, 0.25))
            second = compiled(**batch).logits
            eager2 = model(**batch).logits
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations"
    assert (first - eager).abs().max() <= 1e-5
    assert (second - eager2).abs().max() <= 1e-5
    assert (second - first).abs().max() > 1e-4


def test_bad_arguments_raise_and_change_nothing():
    model = tiny_model("llama")
    batch = padded_batch()
    vector = torch.randn(3, 40)
    with torch.no_grad():
        before = model(**batch).logits
    with personakern.patch(model) as pk:
        with pytest.raises(ValueError, match="alpha, cap or ablate"):
            pk.steer(vector, layers=1)
        with pytest.raises(ValueError, match="exclude"):
            pk.steer(vector, layers=1, cap=1.0, ablate=True)
        with pytest.raises(ValueError, match="give alpha"):
            pk.steer(vector, layers=1, cap=1.0, when=(vector, 0.0))
        with pytest.raises(ValueError, match="not finite"):
            pk.steer(vector, 1.0, layers=1, cap=float("nan"))
        with pytest.raises(ValueError, match=r"cap for 'vector' is -inf.*inf means no cap"):
            pk.steer(vector, 1.0, layers=1, cap=[1.0, -float("inf"), 2.0])   # would make that row inf/NaN
        with pytest.raises(KeyError, match="neither a monitored trait"):
            pk.steer(vector, 1.0, layers=1, when=("nope", 0.0))
        with pytest.raises(ValueError, match=r"\(condition, threshold\)"):
            pk.steer(vector, 1.0, layers=1, when=vector)
        zero = torch.zeros(3, 40)
        with pytest.raises(ValueError, match="zero vector"):
            pk.steer(zero, layers=1, ablate=True)
        assert pk.steering == {}
        pk.steer(vector, 1.0, layers=1, cap=[1.0, 2.0])  # 2 rows, batch of 3
        with pytest.raises(ValueError, match="cap has 2 rows"):
            model(**batch)
        pk.clear()
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, before)
