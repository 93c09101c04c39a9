"""Patched models on a CUDA device, every GPU backend (native, triton, cuda), every family:
idle patch equals the unpatched model, steering equals a forward-hook reference on the same
device, readings equal projections of the block outputs, and bf16 generation with steering and
monitoring agrees across backends. Skipped without a GPU (run by benchmarks/gpu_check.sh)."""
from __future__ import annotations

import pytest
import torch

import personakern
from conftest import FAMILIES, padded_batch, tiny_model
from reference import capture_block_outputs, hook_steering

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ATOL = 1e-5


def gpu_backends():
    if not torch.cuda.is_available():
        return ["native"]
    from personakern import ops
    return ops.available_backends("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 matmuls would make the fp32 comparisons meaningless."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def on_gpu(family, dtype=torch.float32):
    return tiny_model(family).to("cuda", dtype)


def gpu_batch():
    return {k: v.cuda() for k, v in padded_batch().items()}


def greedy(model, batch, n=6):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", gpu_backends())
def test_idle_patch_equals_unpatched(family, backend):
    model, batch = on_gpu(family), gpu_batch()
    ref = greedy(model, batch)
    with personakern.patch(model, backend=backend) as handle:
        assert handle.backend == backend
        got = greedy(model, batch)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max() <= ATOL


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steering_equals_hook_reference(family, backend, positions):
    model, batch = on_gpu(family), gpu_batch()
    vector = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    alpha = torch.tensor([1.5, -2.0, 0.7])
    with hook_steering(model, vector.cuda(), 1, alpha.cuda(), batch["attention_mask"], positions):
        ref = greedy(model, batch)
    with personakern.patch(model, backend=backend) as handle:
        handle.steer(vector, alpha, layers=1, positions=positions)
        got = greedy(model, batch)
    plain = greedy(model, batch)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max() <= ATOL
    if positions != "prompt":
        assert (plain.logits[-1] - got.logits[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", gpu_backends())
def test_readings_equal_projections_of_block_outputs(family, backend):
    model, batch = on_gpu(family), gpu_batch()
    g = torch.Generator().manual_seed(5)
    traits = {"a": torch.randn(3, 40, generator=g), "b": torch.randn(3, 40, generator=g)}
    with personakern.patch(model, backend=backend) as handle:
        handle.steer(traits["a"], 2.0, layers=1)
        handle.monitor(traits, layers="all")
        with torch.no_grad(), capture_block_outputs(model) as outs:
            model(**batch)
        readings = handle.readings
    valid = batch["attention_mask"].bool().cpu()
    for layer in range(3):
        for name, vec in traits.items():
            expected = (outs[layer][0].float().cpu() @ (vec[layer] / vec[layer].norm()))
            got = readings.get(name, layer).cpu()
            torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_bf16_backends_agree(family):
    """bf16, steering + cap + monitoring, one padded forward: each kernel backend against native
    on the GPU (logits and readings within bf16 rounding of each other)."""
    batch = gpu_batch()
    valid = batch["attention_mask"].bool().cpu()
    g = torch.Generator().manual_seed(7)
    v, w = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    runs = {}
    for backend in gpu_backends():
        model = on_gpu(family, torch.bfloat16)
        with personakern.patch(model, backend=backend) as handle:
            handle.steer(v, 1.5, layers="all").steer(w, cap=0.5, layers=[0, 2], name="capped")
            handle.monitor({"v": v, "w": w}, layers="all")
            with torch.no_grad():
                logits = model(**batch).logits.float().cpu()
            runs[backend] = (logits[valid], handle.readings.values.float().cpu()[valid])
    plain = on_gpu(family, torch.bfloat16)
    with torch.no_grad():
        unsteered = plain(**batch).logits.float().cpu()[valid]
    ref_logits, ref_read = runs["native"]
    assert (ref_logits - unsteered).abs().max() > 0.05  # the steering did something
    for backend, (logits, read) in runs.items():
        assert (logits - ref_logits).abs().max() <= 0.05, backend
        scale = ref_read.abs().max().clamp(min=1)
        assert ((read - ref_read).abs().max() / scale) <= 2e-2, backend
