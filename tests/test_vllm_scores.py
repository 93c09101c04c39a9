"""The engine's prompt-token scores (personakern/vllm/scores.py) without an engine: the step
bookkeeping against log-softmax of whole sequences computed by hand (prompts split over steps, a
prefix-cache start, decode rows, a plain request beside, a preempted request coming back), and
the request value's validation. The engine path is tested against vLLM's prompt
log-probabilities and the Hugging Face judge in test_judges_vllm.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from personakern.vllm.scores import SCORE_KEY, ScoreStore, score_start, to_scores

V, D = 37, 12


@pytest.fixture()
def head():
    g = torch.Generator().manual_seed(0)
    return torch.randn(V, D, generator=g) * 2


def _oracle(head, hidden_rows, ids, start):
    """log P(ids[i] | < i) for i >= start, from the rows of positions 0..len-1 (row i - 1 for i)."""
    lp = torch.log_softmax(hidden_rows @ head.T, dim=-1)
    return np.array([float(lp[i - 1, ids[i]]) for i in range(start, len(ids))], dtype=np.float32)


def _run(store, head, steps):
    """``steps``: lists of (rid, extra, ids, first position, rows) with the rows' hidden states
    ``[rows, D]``; one plan + compute per step."""
    for step in steps:
        hidden = torch.cat([h for *_, h in step])
        store.plan([s[0] for s in step], [s[1] for s in step], [s[2] for s in step],
                   np.array([len(h) for *_, h in step]), np.array([s[3] for s in step]))
        store.compute(hidden, lambda h: h @ head.T)
        store.retire({s[0] for s in step})


def test_entries_equal_log_softmax_by_hand(head):
    g = torch.Generator().manual_seed(1)
    a_ids, b_ids, c_ids = [int(t) for t in torch.randint(0, V, (23,), generator=g)], \
        [int(t) for t in torch.randint(0, V, (9,), generator=g)], [int(t) for t in torch.randint(0, V, (15,), generator=g)]
    a_h, b_h, c_h = torch.randn(23, D, generator=g), torch.randn(9, D, generator=g), torch.randn(15, D, generator=g)
    plain = torch.randn(5, D, generator=g)
    store = ScoreStore()
    # a: 23-token prompt scored from 7, split 10 + 13 over two steps, then a decode row;
    # b: scored from 3 with positions 0..4 from the prefix cache (only 5..8 run);
    # c: scored from 15 = its length (nothing to score); a plain request beside them
    _run(store, head, [
        [("a", {SCORE_KEY: 7}, a_ids, 0, a_h[:10]), ("p", None, [1] * 5, 0, plain),
         ("b", {SCORE_KEY: 3, "other": 1}, b_ids, 5, b_h[5:])],
        [("c", {SCORE_KEY: 15}, c_ids, 0, c_h), ("a", {SCORE_KEY: 7}, a_ids, 10, a_h[10:])],
        [("a", {SCORE_KEY: 7}, a_ids, 23, torch.randn(1, D, generator=g))],   # decode: no entry
    ])
    got = {k: to_scores(v) for k, v in store.take(["a", "b", "c", "p"]).items()}
    assert set(got) == {"a", "b", "c"}
    np.testing.assert_allclose(got["a"], _oracle(head, a_h, a_ids, 7), rtol=1e-5, atol=1e-5)
    want_b = _oracle(head, b_h, b_ids, 3)
    assert np.isnan(got["b"][:3]).all()               # entries 3, 4, 5 need rows 2, 3, 4: cached
    np.testing.assert_allclose(got["b"][3:], want_b[3:], rtol=1e-5, atol=1e-5)
    assert got["c"].shape == (0,)
    assert store.take(["a"]) == {}                     # taken once


def test_preempted_request_keeps_what_it_computed(head):
    g = torch.Generator().manual_seed(2)
    ids = [int(t) for t in torch.randint(0, V, (20,), generator=g)]
    h = torch.randn(20, D, generator=g)
    store = ScoreStore()
    _run(store, head, [[("r-abcdefgh", {SCORE_KEY: 4}, ids, 0, h[:12])]])
    store.retire(set())   # preempted: left the batch
    # back, with its first 8 positions from the prefix cache: rows 8..19 run again
    _run(store, head, [[("r-abcdefgh", {SCORE_KEY: 4}, ids, 8, h[8:])]])
    got = to_scores(store.take(["r"])["r"])            # the caller's id, without vLLM's suffix
    np.testing.assert_allclose(got, _oracle(head, h, ids, 4), rtol=1e-5, atol=1e-5)


def test_chunks_and_kept_requests(head, monkeypatch):
    from personakern.vllm import scores
    monkeypatch.setattr(scores, "CHUNK_ROWS", 3)       # several vocabulary projections per step
    g = torch.Generator().manual_seed(3)
    ids = [int(t) for t in torch.randint(0, V, (11,), generator=g)]
    h = torch.randn(11, D, generator=g)
    store = ScoreStore(keep=2)
    _run(store, head, [[(f"q{k}", {SCORE_KEY: 1}, ids, 0, h) for k in range(4)]])
    store.retire(set())
    left = store.take([f"q{k}" for k in range(4)])
    assert sorted(left) == ["q2", "q3"]                 # oldest finished dropped past keep
    np.testing.assert_allclose(to_scores(left["q3"]), _oracle(head, h, ids, 1), rtol=1e-5, atol=1e-5)


def test_score_value():
    assert score_start(None) is None and score_start({"x": 1}) is None
    assert score_start({SCORE_KEY: 5}) == 5 and score_start({SCORE_KEY: np.int64(2)}) == 2
    for bad in (0, -3, 1.5, "4", True, None):
        with pytest.raises(ValueError, match="positive integer"):
            score_start({SCORE_KEY: bad})
    store = ScoreStore()   # an unvalidated bad value reaching a worker scores nothing
    assert not store.plan(["r"], [{SCORE_KEY: "x"}], [[1, 2, 3]], np.array([3]), np.array([0]))
