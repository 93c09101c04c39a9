"""pytest-benchmark: SmolLM2 decode (batch 1, 32 new tokens) and prefill (8 x 256).

For interleaved rounds and ratios against peers use ``personakern bench`` (``--peers``), which
alternates variants within each round; this file gives pytest-benchmark's statistics per variant.
"""
from __future__ import annotations

import pytest

import personakern
from personakern import ops
from personakern.benchmark import e2e

BACKENDS = ["native"] + [b for b in ("cpu",) if ops.backend_usable(b, "cpu")]
VARIANTS = [("unpatched", e2e.unpatched, {}), ("hooks", e2e.forward_hooks, {})] + [
    (f"{b}-{what}", e2e.personakern_variant, dict(backend=b, **kw))
    for b in BACKENDS for what, kw in (("idle", {}), ("steer", {"steer": True}),
                                       ("steer+monitor8", {"steer": True, "monitor": True}))]


@pytest.fixture(scope="module")
def smollm2():
    return personakern.load_model()


@pytest.mark.parametrize("kind", ["decode", "prefill"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v[0])
def test_e2e(benchmark, smollm2, kind, variant):
    model, tok = smollm2
    name, factory, kw = variant
    inputs = e2e.make_inputs(tok)
    benchmark.group = kind
    with factory(model, tok, inputs, 32, **kw) as run:
        run(kind)  # warm-up
        benchmark.pedantic(run, args=(kind,), rounds=5, iterations=1)
