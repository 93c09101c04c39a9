"""Monitoring plots: the traces drawn equal the projections of the block outputs, computed
independently with forward hooks on an unpatched copy of the model."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import personakern
from conftest import tiny_model
from personakern.monitoring import plot_traces, trace_series

REPO = Path(__file__).resolve().parent.parent


def test_plot_traces_match_hooked_projections(tmp_path):
    model = tiny_model("llama", layers=3)
    reference = copy.deepcopy(model)
    torch.manual_seed(3)
    vecs = personakern.VectorSet([personakern.PersonaVector(t, torch.randn(3, 40)) for t in ("a", "b")])
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with personakern.patch(model) as h:
        h.monitor(vecs, layers="all")
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        r = h.readings
    series = plot_traces(r, tmp_path / "t.png", row=0, tokens=["x"] * 4, title="test")
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert set(series) == {(t, l) for t in ("a", "b") for l in (0, 1, 2)}
    # independent: one full forward of the generated row (unpadded) with hooks on every block
    seq = out[0][2:]
    outs = {}
    hooks = [blk.register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, (o[0] if isinstance(o, tuple) else o)[0]))
             for l, blk in enumerate(reference.model.layers)]
    with torch.no_grad():
        reference(seq[None])
    for hk in hooks:
        hk.remove()
    for (t, l), ys in series.items():
        v = vecs[t].vectors[l]
        # last prompt token (index 2), then every answer token but the last (generate never feeds it)
        expect = (outs[l][2:-1] @ v / v.norm()).tolist()
        assert len(ys) == len(expect) == 4
        torch.testing.assert_close(torch.tensor(ys), torch.tensor(expect), atol=1e-4, rtol=1e-4)
    with pytest.raises(KeyError, match="not monitored"):
        plot_traces(r, tmp_path / "u.png", traits=["nope"])
    assert not (tmp_path / "u.png").exists()
    assert trace_series(r, 1, ["a"], [2])[("a", 2)][0] == pytest.approx(float(r.get("a", 2)[1, 4]))


@pytest.mark.slow
def test_cli_monitor_several_traits_png(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    vec = REPO / "personakern" / "data" / "vectors" / "smollm2-traits.safetensors"
    cmd = [sys.executable, "-m", "personakern", "monitor", "Tell me about cats.", "--vector", str(vec),
           "--traits", "evil", "humorous", "--max-new-tokens", "6", "--png", str(tmp_path / "m.png"), "--no-color"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "traces of evil, humorous at blocks [18]" in r.stdout and (tmp_path / "m.png").stat().st_size > 1000
    r = subprocess.run(cmd[:-5] + ["--traits", "nope"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0 and "has no trait 'nope'" in r.stderr
