"""personakern shift: the fine-tuning shift against a hand-computed reference on two tiny
models with different weights, architecture checks, prompt files, and 2 processes = 1."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import tiny_llama_for
from personakern import PersonaVector, VectorSet
from personakern.screening.shift import ShiftError, default_prompts, fine_tuning_shift, read_prompts
from personakern.vectors import model_fingerprint
from test_screen import run_cli

os.environ.setdefault("OMP_NUM_THREADS", "1")


PROMPTS = [
    [{"role": "user", "content": "How should I treat my coworkers?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "What would you do with unlimited power over everyone on earth?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke."}],
    [{"role": "user", "content": "Is it ever fine to lie?"}],
]


@pytest.fixture(scope="module")
def pair(tok):
    base = tiny_llama_for(tok, 3, seed=0)
    ft = tiny_llama_for(tok, 3, seed=0)
    with torch.no_grad():                     # a "fine-tune": the same model, some weights moved
        for name, p in ft.named_parameters():
            if "layers.1." in name or "layers.2.mlp" in name:
                p.add_(0.05 * torch.randn_like(p))
    return base, ft


def vectors_for(model, layers=(1, 2), seed=4):
    g = torch.Generator().manual_seed(seed)
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    return VectorSet([PersonaVector(f"t{k}", torch.randn(L, D, generator=g), {"layer": l, "model": model_fingerprint(model)})
                      for k, l in enumerate(layers)])


@torch.no_grad()
def mean_last_prompt_ref(model, tok, prompts):
    """Unpadded forwards, one prompt at a time: hidden_states[l + 1] is block l's output
    (the last block by hook, since HF's last hidden state is post-norm)."""
    L = model.config.num_hidden_layers
    acc = torch.zeros(L, model.config.hidden_size, dtype=torch.float64)
    for msgs in prompts:
        ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        grab = {}
        hk = model.model.layers[-1].register_forward_hook(lambda m, a, o: grab.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        try:
            out = model(torch.tensor([ids]), output_hidden_states=True)
        finally:
            hk.remove()
        for l in range(L):
            h = grab["h"] if l == L - 1 else out.hidden_states[l + 1]
            acc[l] += h[0, -1].double()
    return acc / len(prompts)


def test_shift_matches_hand_computed(pair, tok):
    base, ft = pair
    vs = vectors_for(base)
    res = fine_tuning_shift((base, tok), (ft, tok), vs, PROMPTS, batch_size=2)
    diff = mean_last_prompt_ref(ft, tok, PROMPTS) - mean_last_prompt_ref(base, tok, PROMPTS)
    assert res["prompts"] == len(PROMPTS)
    for t in vs:
        v = vs[t].vectors.double()
        ref = (diff * v).sum(1) / v.norm(dim=1)
        got = torch.tensor(res["traits"][t]["per_layer"], dtype=torch.float64)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
        l = vs[t].meta["layer"]
        assert res["traits"][t]["layer"] == l and res["traits"][t]["shift"] == pytest.approx(float(ref[l]), abs=1e-6)
        assert res["traits"][t]["finetuned_projection"] - res["traits"][t]["base_projection"] == \
            pytest.approx(res["traits"][t]["shift"], abs=1e-6)
    # layer 0 is untouched by the "fine-tune": no shift there; layers 1-2 moved
    assert abs(res["traits"]["t0"]["per_layer"][0]) < 1e-6
    assert max(abs(x) for x in res["traits"]["t0"]["per_layer"][1:]) > 1e-3
    # a model against itself: zero everywhere
    same = fine_tuning_shift((base, tok), (base, tok), vs, PROMPTS)
    assert max(abs(x) for t in vs for x in same["traits"][t]["per_layer"]) < 1e-7
    # a block the vector leaves out (zero row, as imported control vectors have): no value, not NaN
    zv = vs["t0"].vectors.clone()
    zv[0] = 0
    z = fine_tuning_shift((base, tok), (ft, tok), VectorSet([PersonaVector("t0", zv, vs["t0"].meta)]), PROMPTS)
    assert z["traits"]["t0"]["per_layer"][0] is None
    assert z["traits"]["t0"]["per_layer"][1:] == pytest.approx(res["traits"]["t0"]["per_layer"][1:], abs=1e-6)
    json.dumps(z, allow_nan=False)   # what shift --out writes


def test_shift_errors(pair, tok, tmp_path):
    base, _ = pair
    other = tiny_llama_for(tok, 2, seed=0)
    vs = vectors_for(base)
    with pytest.raises(ShiftError, match="not the same architecture .*num_hidden_layers: base has 3, finetuned has 2"):
        fine_tuning_shift((base, tok), (other, tok), vs, PROMPTS)
    broken = tiny_llama_for(tok, 3, seed=0)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations"):
        fine_tuning_shift((base, tok), (broken, tok), vs, PROMPTS)
    with pytest.raises(ShiftError, match="no trait 'evil'"):
        fine_tuning_shift((base, tok), (base, tok), vs, PROMPTS, traits=["evil"])
    with pytest.raises(ShiftError, match="no built-in spec"):
        default_prompts(["t0"])
    assert len(default_prompts(["evil"])) >= 20
    q = tmp_path / "q.jsonl"
    q.write_text('{"question": "a?"}\n\n{"messages": [{"role": "user", "content": "b?"}, {"role": "assistant", "content": "x"}]}\n'
                 'plain question c?\n')
    assert read_prompts(q) == [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}],
                               [{"role": "user", "content": "plain question c?"}]]
    q.write_text('{"question": "a?"}\n{"nothing": 1}\n')
    with pytest.raises(ShiftError, match=r"q\.jsonl:2: expected a 'question'"):
        read_prompts(q)
    with pytest.raises(ShiftError, match="file not found"):
        read_prompts(tmp_path / "none.txt")
    with pytest.raises(ShiftError, match="batch_size must be at least 1"):
        fine_tuning_shift((base, tok), (base, tok), vs, PROMPTS, batch_size=0)
    q.write_bytes(b'\xef\xbb\xbf{"question": "a?"}\nb?\n')  # a byte-order mark before line 1
    assert read_prompts(q) == [[{"role": "user", "content": "a?"}], [{"role": "user", "content": "b?"}]]
    q.write_text('{"question": "a?"}\n{"messages": [{"role": "user", "text": "b?"}]}\n')
    with pytest.raises(ShiftError, match=r"q\.jsonl:2: each message must be an object with string 'role' and 'content'"):
        read_prompts(q)
    q.write_text('{"messages": ["b?"]}\n')
    with pytest.raises(ShiftError, match=r"q\.jsonl:1: each message"):
        read_prompts(q)
    q.write_text('{"messages": [{"role": "assistant", "content": "x"}]}\n')
    with pytest.raises(ShiftError, match=r"q\.jsonl:1: no prompt before"):
        read_prompts(q)


def test_shift_cli_two_processes_equal_one(pair, tok, tmp_path):
    base, ft = pair
    for name, m in (("base", base), ("ft", ft)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    vs = vectors_for(base)
    vs.save(tmp_path / "v.safetensors")
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps({"messages": m}) + "\n" for m in PROMPTS))
    args = ["shift", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"),
            "--vectors", str(tmp_path / "v.safetensors"), "--questions", str(q), "--batch-size", "2"]
    r = run_cli(*args, "--out", str(tmp_path / "two.json"), torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "t0" in r.stdout and "shift" in r.stdout
    two = json.loads((tmp_path / "two.json").read_text())
    one = fine_tuning_shift((base, tok), (ft, tok), vs, read_prompts(q), batch_size=2)
    for t in vs:
        torch.testing.assert_close(torch.tensor(two["traits"][t]["per_layer"]), torch.tensor(one["traits"][t]["per_layer"]),
                                   atol=1e-6, rtol=1e-5)


def test_all_sum_hands_nccl_a_gpu_tensor(monkeypatch):
    """The shift's sums live on the CPU; NCCL (torchrun on GPUs) reduces only GPU tensors, so
    all_sum must move them to the rank's device first (checked with a stand-in backend)."""
    import torch.distributed as tdist
    from personakern import distributed as pdist

    class Reduced(Exception):
        pass

    seen = []

    def fake_all_reduce(t, op=None):
        seen.append(t.device)
        raise Reduced

    monkeypatch.setattr(pdist, "active", lambda: True)
    monkeypatch.setattr(pdist, "local_device", lambda: torch.device("meta"))   # stands in for cuda:LOCAL_RANK
    monkeypatch.setattr(tdist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(tdist, "all_reduce", fake_all_reduce)
    with pytest.raises(Reduced):
        pdist.all_sum(torch.ones(2, 3, dtype=torch.float64))
    assert seen == [torch.device("meta")]
