"""The vLLM engine's activation capture without vLLM: SPEC validation of ``capture``, and the
capture tables' per-request means over steps (prefill in two chunks, decode, a plain request, a
preempted request recomputed) checked against means computed by hand from the fed rows."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from personakern.vllm.capture import CaptureTables, capture_enabled, to_capture
from personakern.vllm.plan import build_plan
from personakern.vllm.spec import Catalog, SpecError, parse_spec

CAT = Catalog(("evil",), 4, {"evil": 2}, {}, capture=True)


@pytest.mark.parametrize("raw,message", [
    ({"capture": 1}, "must be true or an object"),
    ({"capture": {"kinds": ["answer"]}}, "unknown kind"),
    ({"capture": {"kinds": []}}, "non-empty list"),
    ({"capture": {"layers": [4]}}, "layer 4 out of range"),
    ({"capture": {"what": 1}}, "unknown field"),
])
def test_bad_capture_specs_name_the_problem(raw, message):
    with pytest.raises(SpecError, match=message):
        parse_spec(raw, CAT)


def test_capture_needs_an_engine_that_captures():
    with pytest.raises(SpecError, match="PERSONAKERN_VLLM_CAPTURE=1"):
        parse_spec({"capture": True}, replace(CAT, capture=False))
    assert parse_spec({"capture": False}, replace(CAT, capture=False)).empty


def test_capture_canonical_form():
    s = parse_spec({"capture": True}, CAT)
    assert s.captures and not s.steers and not s.monitors and not s.empty
    assert s.to_json() == {"capture": {"kinds": ["response", "prompt", "last_prompt"], "layers": [0, 1, 2, 3]}}
    assert parse_spec(s.to_json(), CAT) == s
    s = parse_spec({"capture": {"kinds": "prompt", "layers": [-1]}}, CAT)
    assert (s.capture_kinds, s.capture_layers) == (("prompt",), (3,))


def test_capture_enabled_reads_the_variable():
    assert not capture_enabled({}) and not capture_enabled({"PERSONAKERN_VLLM_CAPTURE": "0"})
    assert capture_enabled({"PERSONAKERN_VLLM_CAPTURE": "1"})


def _plan(raw):
    return build_plan(parse_spec(raw, CAT), CAT, 0)


def test_means_over_steps_equal_the_hand_computed_ones():
    L, D = 4, 5
    g = torch.Generator().manual_seed(0)
    tabs = CaptureTables(L, D, slots=3, max_tokens=16, device="cpu")
    a, b = _plan({"capture": True}), _plan({"capture": {"kinds": ["last_prompt", "response"], "layers": [1, 3]}})
    fed = {"a": {}, "b": {}}   # request -> position -> [L, D] block outputs fed there

    def step(reqs):
        """``reqs``: (id, plan, start, count, prompt_len); one step of random block outputs."""
        counts = np.array([r[3] for r in reqs])
        total = int(counts.sum()) + 2     # 2 padding rows
        tabs.fill([r[0] for r in reqs], [r[1] for r in reqs], counts, np.array([r[2] for r in reqs]),
                  np.array([r[4] for r in reqs]), total)
        outs = torch.randn(L, total, D, generator=g)
        for layer in range(L):
            tabs.add(layer, outs[layer])
        row = 0
        for rid, plan, start, n, _ in reqs:
            for k in range(n):
                if rid in fed:
                    fed[rid].setdefault(start + k, outs[:, row + k])   # a re-fed position counts once
            row += n

    # a: prompt 5 in two chunks, then decode; b: prompt 3; p: plain
    step([("a", a, 0, 3, 5), ("p", None, 0, 4, 4)])
    step([("a", a, 3, 2, 5), ("b", b, 0, 3, 3), ("p", None, 4, 1, 4)])
    step([("a", a, 5, 1, 5), ("b", b, 3, 1, 3)])
    step([("b", b, 0, 5, 3)])                 # b preempted and recomputed: positions 0..4 again
    step([("a", a, 6, 1, 5), ("b", b, 5, 1, 3)])
    tabs.retire(["b"])                         # a left the batch: read out, slot freed
    assert "a" not in tabs.active and len(tabs.free) == 2
    got = {**tabs.take(["a"]), **tabs.take(["b"])}
    assert tabs.take(["a", "b"]) == {} and len(tabs.free) == 3 and not tabs.sums[:, 3:].any()

    def expect(rid, prompt_len):
        pos = fed[rid]
        mean = lambda ps: torch.stack([pos[p] for p in ps]).mean(0) if ps else torch.zeros(L, D)
        return {"response": mean([p for p in pos if p >= prompt_len]), "prompt": mean([p for p in pos if p < prompt_len]),
                "last_prompt": mean([prompt_len - 1])}
    ea, eb = expect("a", 5), expect("b", 3)
    ca, cb = to_capture(got["a"]), to_capture(got["b"])
    assert ca["counts"] == {"response": 2, "prompt": 5, "last_prompt": 1} and ca["layers"] == [0, 1, 2, 3]
    assert cb["counts"] == {"last_prompt": 1, "response": 3} and cb["layers"] == [1, 3]
    for i, k in enumerate(ca["kinds"]):
        torch.testing.assert_close(ca["means"][:, i], ea[k], rtol=1e-6, atol=1e-6)
    for i, k in enumerate(cb["kinds"]):
        torch.testing.assert_close(cb["means"][:, i], eb[k][[1, 3]], rtol=1e-6, atol=1e-6)


def test_no_free_slot_is_an_error_and_a_plain_step_writes_the_sink_only():
    tabs = CaptureTables(2, 3, slots=1, max_tokens=8, device="cpu")
    p = _plan({"capture": True})
    with pytest.raises(RuntimeError, match="no free capture slot"):
        tabs.fill(["x", "y"], [p, p], np.array([1, 1]), np.array([0, 0]), np.array([1, 1]), 2)
    tabs.fill(["q"], [None], np.array([4]), np.array([0]), np.array([4]), 4)
    assert not tabs.step_active and not tabs.index.any()
