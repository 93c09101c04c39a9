"""torch.compile(fullgraph=True) of a patched, steered, monitored model: matches eager, and
changing alpha or the monitored vectors between calls does not recompile."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import personakern
from conftest import padded_batch, tiny_model


def eager_reference(model, batch, vec, alpha, monitored):
    with personakern.patch(model, backend="native") as h:
        h.steer(vec, alpha, layers=1)
        h.monitor(monitored, layers="all")
        with torch.no_grad():
            logits = model(**batch).logits
        return logits, h.readings.values


@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_compiled_matches_eager_without_recompiling(backend, compiler):
    if backend == "triton" and compiler == "inductor":
        pytest.skip("inductor cannot lower interpreted Triton kernels on the CPU")
    torch._dynamo.reset()
    model = tiny_model("llama")
    batch = padded_batch()
    g = torch.Generator().manual_seed(0)
    vec, other = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler)
    with personakern.patch(model, backend=backend) as h:
        compiled = torch.compile(model, fullgraph=True, backend=counter)
        for alpha, monitored in (([1.0, 2.0, -1.0], {"a": vec, "b": other}),
                                 ([-3.0, 0.5, 0.0], {"a": other, "b": vec}),   # new alphas, new vectors
                                 ([0.0, 0.0, 4.0], {"x": vec, "y": -vec})):
            h.steer(vec, alpha, layers=1)
            h.monitor(monitored, layers="all")
            with torch.no_grad():
                logits = compiled(**batch).logits
            readings = h.readings.values
            ref_logits, ref_readings = eager_reference(tiny_model("llama"), batch, vec, alpha, monitored)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(readings, ref_readings, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} compilations"
