"""The SPEC, request plans and per-step tables of personakern.vllm, without vLLM: validation
messages, and the tables a step writes checked against per-token values computed by hand and
the fused op's result against the native oracle applied token by token."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from personakern.backends import native
from personakern.vllm.plan import build_plan
from personakern.vllm.results import ReadingsStore, external_id, to_json, to_readings
from personakern.vllm.spec import Catalog, SpecError, parse_spec
from personakern.vllm.tables import StepTables

CAT = Catalog(("evil", "humorous", "flat"), 6, {"evil": 4, "humorous": None, "flat": 1},
              {"flat": frozenset({2})})


@pytest.mark.parametrize("raw,message", [
    ('{"steer": [', "not valid JSON"),
    ([1], "must be a JSON object"),
    ({"steer": [], "extra": 1}, "unknown SPEC field"),
    ({"steer": [{"trait": "kind", "alpha": 1}]}, "unknown trait 'kind'"),
    ({"steer": [{"trait": "evil", "alpha": 1, "layers": [6]}]}, "layer 6 out of range"),
    ({"steer": [{"trait": "evil", "alpha": 1, "layers": [-7]}]}, "layer -7 out of range"),
    ({"steer": [{"trait": "evil", "alpha": 1, "layers": [True]}]}, "is not an int"),
    ({"steer": [{"trait": "evil", "alpha": math.nan}]}, "alpha is not finite"),
    ({"steer": [{"trait": "evil", "alpha": -math.inf}]}, "alpha is not finite"),
    ({"steer": [{"trait": "evil", "alpha": "2"}]}, "alpha must be a number"),
    ({"steer": [{"trait": "evil", "alpha": 1, "positions": "middle"}]}, "positions must be one of"),
    ({"steer": [{"trait": "evil"}]}, "give alpha, cap or ablate"),
    ({"steer": [{"trait": "evil", "cap": 1, "ablate": True}]}, "exclude each other"),
    ({"steer": [{"trait": "evil", "cap": "-inf"}]}, "cap is -inf"),
    ({"steer": [{"trait": "evil", "cap": math.nan}]}, "cap is not finite"),
    ({"steer": [{"trait": "evil", "cap": 1.0, "when": {"threshold": 1}}]}, "give alpha too"),
    ({"steer": [{"trait": "evil", "alpha": 1, "when": {"threshold": math.nan}}]}, "threshold is not finite"),
    ({"steer": [{"trait": "evil", "alpha": 1, "when": 3}]}, "when must be"),
    ({"steer": [{"trait": "humorous", "alpha": 1}]}, "no recommended layer"),
    ({"steer": [{"trait": "flat", "ablate": True, "layers": [1, 2]}]}, "zero vector at layers [2]"),
    ({"steer": [{"trait": "evil", "alpha": 1, "colour": "red"}]}, "unknown field(s) ['colour']"),
    ({"monitor": {"traits": []}}, "non-empty list"),
    ({"monitor": {"traits": ["flat"], "layers": "all"}}, "zero vector at layers [2]"),
    ({"monitor": {"traits": "all", "layers": "some"}}, "'all'"),
])
def test_bad_specs_name_the_problem(raw, message):
    with pytest.raises(SpecError) as e:
        parse_spec(raw, CAT)
    assert message in str(e.value)


def test_defaults_canonical_form_and_salt():
    spec = parse_spec(json.dumps({"steer": [{"trait": "evil", "alpha": 2}, {"trait": "evil", "cap": "inf",
                                                                               "layers": -1}],
                                  "monitor": {"traits": ["humorous", "evil", "evil"]}}), CAT)
    assert spec.steer[0].layers == (4,) and spec.steer[0].positions == "all"
    assert spec.steer[1].layers == (5,) and spec.steer[1].cap == math.inf
    assert spec.monitor_traits == ("humorous", "evil") and spec.monitor_layers == tuple(range(6))
    again = parse_spec(json.dumps(spec.to_json()), CAT)          # the canonical form parses to itself
    assert again == spec
    assert spec.steering_salt() == again.steering_salt()
    other = parse_spec({"steer": [{"trait": "evil", "alpha": 2.5}]}, CAT)
    assert other.steering_salt() != spec.steering_salt()
    assert parse_spec({"monitor": {"traits": ["evil"]}}, CAT).steering_salt() is None
    assert parse_spec(None, CAT).empty and parse_spec({}, CAT).empty


def test_two_bounds_on_one_trait_and_layer_are_refused():
    spec = parse_spec({"steer": [{"trait": "evil", "cap": 1, "layers": [1, 2]},
                                 {"trait": "evil", "ablate": True, "layers": [2]}]}, CAT)
    with pytest.raises(SpecError, match="already has a cap or ablation at layer 2"):
        build_plan(spec, CAT, 2)
    many = parse_spec({"steer": [{"trait": "evil", "alpha": 1, "when": {"threshold": t}} for t in range(3)]}, CAT)
    with pytest.raises(SpecError, match="3 distinct conditional"):
        build_plan(many, CAT, 2)


def _backend(name):
    if name == "native":
        return native
    from personakern.backends import cpu
    if not cpu.available():
        pytest.skip(cpu.unavailable_reason())
    from personakern import ops
    return ops.select_backend(torch.device("cpu"), torch.float32, "cpu")


def _tables(seed=0, gated=2, max_tokens=64, backend="native"):
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(6, 3, 16, generator=g)      # [L, T, D]
    vectors[2, 2] = 0.0
    tables = StepTables(vectors, max_tokens, gated, torch.device("cpu"), _backend(backend))
    assert (tables.handle is not None) == (backend == "cpu")   # cpu: the extension's step op
    return vectors, tables


BACKENDS = pytest.mark.parametrize("backend", ["native", "cpu"])


def _oracle_row(h, layer, spec, vectors, prompt_len, pos):
    """One token's block output through the native op, from the SPEC's own meaning."""
    units = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    phase_ok = lambda e: e.positions == "all" or (e.positions == "prompt") == (pos < prompt_len)
    steer, coef, gates, thr, clamps, lo, hi = [], [], [], [], [], [], []
    for e in spec.steer:
        t = CAT.index(e.trait)
        on = phase_ok(e) and layer in e.layers
        if e.alpha is not None:
            steer.append(vectors[layer, t])
            coef.append(e.alpha if on else 0.0)
            w = CAT.index(e.when_trait) if e.when_trait else None
            gates.append(units[layer, w] if w is not None else torch.zeros(16))
            thr.append(e.when_threshold if w is not None else -math.inf)
        if (e.cap is not None or e.ablate) and on:
            clamps.append(units[layer, t])
            lo.append(0.0 if e.ablate else -math.inf)
            hi.append(0.0 if e.ablate else e.cap)
    t = lambda xs: torch.stack(xs) if xs else None
    row = lambda xs: torch.tensor([xs]) if xs else None
    out, _ = native.steer_project(h[None], None, t(steer), row(coef), t(clamps), row(lo), row(hi), None,
                                  t(gates) if steer else None, row(thr) if steer else None)
    return out[0]


@BACKENDS
def test_step_tables_equal_the_spec_token_by_token(backend):
    vectors, tables = _tables(backend=backend)
    specs = [
        {"steer": [{"trait": "evil", "alpha": 2.0, "layers": [1, 3], "positions": "response"},
                   {"trait": "humorous", "alpha": -1.5, "layers": [3], "positions": "prompt"}]},
        None,
        {"steer": [{"trait": "humorous", "cap": 0.25, "layers": [3], "positions": "all"},
                   {"trait": "evil", "alpha": 3.0, "layers": [3], "when": {"trait": "humorous", "threshold": 0.1}},
                   {"trait": "evil", "alpha": 1.0, "layers": [3], "when": {"trait": "evil", "threshold": -0.2}}]},
        {"monitor": {"traits": ["evil"]}},
        {"steer": [{"trait": "flat", "ablate": True, "layers": [3], "positions": "prompt"}]},
    ]
    parsed = [parse_spec(s, CAT) for s in specs]
    plans = [None if p.empty else build_plan(p, CAT, 2) for p in parsed]
    counts = np.array([3, 1, 4, 2, 5])             # a mixed step: decode rows and prompt chunks
    start = np.array([5, 9, 0, 3, 2])
    prompt = np.array([6, 4, 2, 10, 4])
    total = int(counts.sum()) + 3                 # three padding rows
    tables.fill(plans, counts, start, prompt, total)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(total, 16, generator=g) * 0.3
    x = torch.randn(total, 16, generator=g) * 0.3
    weight = torch.rand(16, generator=g) + 0.5
    layer = 3
    normed, out = tables.apply(layer, h, x, weight, 1e-6)
    n = 0
    for r, c in enumerate(counts):
        for k in range(c):
            ref = h[n] + x[n] if plans[r] is None or not parsed[r].steers else _oracle_row(
                h[n] + x[n], layer, parsed[r], vectors, prompt[r], start[r] + k)
            torch.testing.assert_close(out[n], ref, rtol=1e-6, atol=1e-6)
            n += 1
    assert torch.equal(out[n:], h[n:] + x[n:])    # padding is plain
    torch.testing.assert_close(normed, native.rms_norm(out, weight, 1e-6))
    torch.testing.assert_close(tables.readings[layer, :total], out @ tables.unit[layer].t())
    # the next step is plain: nothing is left in the tables
    tables.fill([None, None], np.array([4, 4]), np.array([0, 0]), np.array([4, 4]), 8)
    assert not tables.coef.any() and torch.isneginf(tables.lo).all() and torch.isposinf(tables.hi).all()


@BACKENDS
def test_plain_rows_are_bit_identical_to_the_unsteered_op(backend):
    vectors, tables = _tables(seed=4, backend=backend)
    plan = build_plan(parse_spec({"steer": [{"trait": "evil", "alpha": 5.0, "layers": [2]}]}, CAT), CAT, 2)
    tables.fill([plan, None], np.array([2, 3]), np.array([0, 7]), np.array([2, 7]), 5)
    h, x = torch.randn(5, 16), torch.randn(5, 16)
    w = torch.rand(16)
    normed, out = tables.apply(2, h, x, w, 1e-5)
    plain_normed, plain_out = tables.ops.add_rms_norm(h, x, w, 1e-5)
    assert torch.equal(out[2:], plain_out[2:]) and torch.equal(normed[2:], plain_normed[2:])
    assert not torch.equal(out[:2], plain_out[:2])


def test_readings_store_and_payloads():
    spec = parse_spec({"monitor": {"traits": ["humorous", "evil"], "layers": [4, 1]}}, CAT)
    plan = build_plan(spec, CAT, 0)
    store = ReadingsStore(6, 3, keep=1)
    vals = np.arange(5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    store.record("req-7-abcdefgh", plan, 3, 0, vals[:3])        # the prompt
    store.record("req-7-abcdefgh", plan, 3, 3, vals[3:4])       # one decode step
    assert external_id("req-7-abcdefgh") == "req-7" and external_id("plain") == "plain"
    store.retire([])
    store.record("other-12345678", plan, 1, 0, vals[:1])
    store.retire([])                                            # keep=1: the oldest finished one goes
    assert store.take(["req-7"]) == {}
    got = store.take(["other"])["other"]
    r = to_readings(got)
    assert r.values.shape == (1, 1, 2, 2) and r.layers == [1, 4] and r.traits == ["humorous", "evil"]
    assert torch.equal(r.values[0, 0], torch.tensor(vals[0][[1, 4]][:, [1, 0]]))
    assert to_json(got)["readings"] == r.values[0].tolist()
    assert store.take(["other"]) == {}                          # taken once


def test_readings_of_a_preempted_request():
    """A monitored request preempted after its prompt and recomputed from token 0 (monitored
    requests never read the prefix cache): one payload, with every position of the second pass."""
    spec = parse_spec({"monitor": {"traits": ["evil"], "layers": [2]}}, CAT)
    plan = build_plan(spec, CAT, 0)
    store = ReadingsStore(6, 3)
    first = np.full((3, 6, 3), 1.0, dtype=np.float32)
    again = np.arange(5 * 6 * 3, dtype=np.float32).reshape(5, 6, 3)
    store.record("req-9-abcdefgh", plan, 3, 0, first)
    store.retire([])                                            # preempted: left the batch
    store.record("req-9-abcdefgh", plan, 3, 0, again[:3])       # back: the prompt again
    store.record("req-9-abcdefgh", plan, 3, 3, again[3:])       # and two decode steps
    got = store.take(["req-9"])
    assert list(got) == ["req-9"]
    r = to_readings(got["req-9"])
    assert r.values.shape == (1, 5, 1, 1)
    assert torch.equal(r.values[0, :, 0, 0], torch.tensor(again[:, 2, 0]))   # block 2, column 0: evil
    assert store.take(["req-9"]) == {}
