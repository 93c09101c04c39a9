"""The monitoring experiment's pieces: the correlation statistic, the last-prompt-token
projection taken during monitored generation (vs hooks on the unpatched model, left padding),
the many-shot/system-prompt variants, and Readings.to_dataframe."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_llama_for
from personakern.monitoring import correlate, fisher_ci, pearson
from personakern.readings import Readings

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "monitoring_experiment.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("monitoring_experiment", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------- correlation

def test_pearson_matches_numpy():
    g = np.random.default_rng(0)
    x = g.normal(size=50)
    y = 0.6 * x + g.normal(size=50)
    assert pearson(x.tolist(), y.tolist()) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson(x.tolist(), (-3 * x + 2).tolist()) == pytest.approx(-1.0, abs=1e-12)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))   # constant: undefined, not 0
    assert math.isnan(pearson([1.0], [2.0]))
    with pytest.raises(ValueError, match="lengths differ"):
        pearson([1.0, 2.0], [1.0, 2.0, 3.0])


def test_correlate_drops_missing_pairs_and_averages_per_group():
    proj = [1.0, 2.0, 3.0, 4.0, float("nan"), 6.0, 7.0, 9.0]
    score = [10.0, 30.0, None, 20.0, 50.0, 70.0, 60.0, 95.0]
    groups = ["a", "a", "a", "b", "b", "c", "c", "c"]
    out = correlate(proj, score, groups)
    keep = [0, 1, 3, 5, 6, 7]  # index 2 has no score, index 4 no projection
    assert out["n"] == 6
    assert out["r"] == pytest.approx(np.corrcoef([proj[i] for i in keep], [score[i] for i in keep])[0, 1])
    # per-group means by hand over the kept pairs: a = {0, 1}, b = {3}, c = {5, 6, 7}
    means = {"a": (1.5, 20.0, 2), "b": (4.0, 20.0, 1), "c": (22 / 3, 225 / 3, 3)}
    assert [m["group"] for m in out["means"]] == ["a", "b", "c"]
    for m in out["means"]:
        px, sy, n = means[m["group"]]
        assert (m["projection"], m["score"], m["n"]) == (pytest.approx(px), pytest.approx(sy), n)
    assert out["n_groups"] == 3
    assert out["r_means"] == pytest.approx(np.corrcoef([1.5, 4.0, 22 / 3], [20.0, 20.0, 75.0])[0, 1])
    assert "r_means" not in correlate(proj, score)
    with pytest.raises(ValueError, match="scores"):
        correlate([1.0, 2.0], [1.0])


def test_fisher_interval_textbook_value():
    # r = 0.5 from n = 28: z = atanh(0.5) = 0.5493, se = 1/5; tanh(z -+ 1.96 se) = 0.156, 0.736
    lo, hi = fisher_ci(0.5, 28)
    assert (lo, hi) == (pytest.approx(0.1558, abs=1e-3), pytest.approx(0.7362, abs=1e-3))
    assert fisher_ci(0.5, 3) is None
    wide, narrow = fisher_ci(0.5, 10), fisher_ci(0.5, 1000)
    assert wide[1] - wide[0] > narrow[1] - narrow[0]


# ---------------------------------------------------------------- monitored generation

@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    from personakern.models import resolve
    t = AutoTokenizer.from_pretrained(resolve("smollm2"))
    if t.pad_token is None:
        t.pad_token = t.eos_token
    t.padding_side = "left"
    return t


def _block_outputs_at_last_column(model, ids, mask):
    """Block outputs at the last column, from forward hooks on the unpatched model."""
    got = {}

    def hook(i):
        def f(_mod, _inp, out):
            got[i] = (out[0] if isinstance(out, tuple) else out)[:, -1].detach().clone()
        return f

    hs = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    try:
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
    finally:
        for h in hs:
            h.remove()
    return torch.stack([got[i] for i in range(len(got))], 1)  # [B, L, D]


def test_last_prompt_token_projection_matches_hooks_with_left_padding(experiment, tok):
    import personakern
    from personakern.extraction.generate import GenSettings, left_pad

    model = tiny_llama_for(tok, layers=3, seed=3)
    L, D = 3, model.config.hidden_size
    vec = torch.randn(L, D, generator=torch.Generator().manual_seed(5)) * torch.tensor([[0.5], [2.0], [7.0]])
    messages = [  # very different prompt lengths: rows 0 and 2 are left-padded
        [{"role": "user", "content": "Hi?"}],
        [{"role": "user", "content": "An example question that is long."}, {"role": "assistant", "content": "An answer, " * 6},
         {"role": "user", "content": "And now the real question?"}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Why?"}],
    ]
    handle = personakern.patch(model)
    try:
        handle.monitor({"t": vec}, layers="all")
        answers, lpt, plen = experiment.generate_monitored(model, tok, handle, messages, GenSettings(max_new_tokens=3), seed=1)
    finally:
        handle.unpatch()
    assert len(answers) == 3 and len(set(plen)) == 3 and lpt.shape == (3, L, 1)

    seqs = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for m in messages]
    assert [len(s) for s in seqs] == plen
    ids, mask = left_pad(seqs, tok.pad_token_id, "cpu")
    assert int(mask[0].sum()) < ids.shape[1]  # padding really present
    h = _block_outputs_at_last_column(model, ids, mask)
    want = (h * (vec / vec.norm(dim=-1, keepdim=True))).sum(-1)  # [B, L]
    torch.testing.assert_close(lpt[:, :, 0], want, atol=2e-4, rtol=1e-4)
    # a row's reading does not depend on the other rows' padding
    handle = personakern.patch(model)
    try:
        handle.monitor({"t": vec}, layers="all")
        _, alone, _ = experiment.generate_monitored(model, tok, handle, messages[:1], GenSettings(max_new_tokens=2), seed=1)
    finally:
        handle.unpatch()
    torch.testing.assert_close(alone[0], lpt[0], atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------- variants and analysis

def test_variants_order_and_shot_counts(experiment):
    args = type("A", (), {"shots": [0, 1, 2, 4], "negative_shots": True})()
    pos = [{"question": f"pq{i}", "answer": f"pa{i}"} for i in range(4)]
    neg = [{"question": f"nq{i}", "answer": f"na{i}"} for i in range(4)]
    vs = experiment.variants("evil", pos, neg, args)
    sp = [v for v in vs if v[0] == "system_prompt"]
    assert [v[3][0]["content"] for v in sp] == experiment.SYSTEM_PROMPTS["evil"]
    assert [v[2] for v in sp] == sorted(v[2] for v in sp) and sp[0][2] < 0 < sp[-1][2]
    ms = {v[1]: v for v in vs if v[0] == "many_shot"}
    assert sorted(ms) == sorted(["k0", "+1", "-1", "+2", "-2", "+4", "-4"])
    assert ms["k0"][3] == []
    four = ms["+4"][3]
    assert [m["role"] for m in four] == ["user", "assistant"] * 4
    assert [m["content"] for m in four[1::2]] == ["pa0", "pa1", "pa2", "pa3"]
    assert [m["content"] for m in ms["-2"][3][1::2]] == ["na0", "na1"]
    assert ms["-4"][2] < ms["-1"][2] < ms["k0"][2] == 0 < ms["+1"][2] < ms["+4"][2]


def test_analyse_reports_vector_layer_and_best_layer(experiment):
    g = np.random.default_rng(1)
    recs = []
    for i in range(40):
        score = float(g.uniform(0, 100))
        proj = [float(g.normal()), score + float(g.normal(scale=30)), score + float(g.normal(scale=5))]
        recs.append({"variant": f"v{i % 4}", "level": i % 4, "trait_score": score, "coherence": 80.0, "projection": proj})
    res = experiment.analyse(recs, layer=1, layer_count=3)
    scores = [r["trait_score"] for r in recs]
    assert res["r"] == pytest.approx(np.corrcoef([r["projection"][1] for r in recs], scores)[0, 1])
    assert res["best_layer"] == 2 and res["best_r"] == pytest.approx(max(res["r_by_layer"]), abs=1e-4)
    assert res["n"] == 40 and res["n_variants"] == 4 and len(res["r_by_layer"]) == 3


# ---------------------------------------------------------------- dataframe export

def _readings():
    values = torch.arange(2 * 3 * 2 * 1, dtype=torch.float32).view(2, 3, 2, 1)
    valid = torch.tensor([[False, True, True], [True, True, True]])
    values[~valid] = float("nan")
    return Readings(values=values, valid=valid, layers=[4, 7], traits=["evil"], prompt_lengths=torch.tensor([2, 2]))


def test_to_dataframe_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        _readings().to_dataframe()


def test_to_dataframe_rows_are_the_records():
    pd = pytest.importorskip("pandas")
    r = _readings()
    df = r.to_dataframe()
    assert isinstance(df, pd.DataFrame) and len(df) == 5 * 2
    assert df.to_dict("records") == r.to_records()
    assert df[(df.row == 1) & (df.position == 2) & (df.layer == 7)].projection.item() == float(r.get("evil", 7)[1, 2])
