"""personakern screen: per-sample projection differences against hand-computed references,
malformed lines, resumption, bounded memory on 10k samples, 2-process equality, CLI."""
from __future__ import annotations

import json
import os
import socket
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_process_group, tiny_llama_for
from personakern import PersonaVector, VectorSet
from personakern.screening import ScreenDataError, ScreenSettings, screen
from personakern.screening import base_answers as base_mod
from personakern.screening import report as report_mod
from personakern.vectors import model_fingerprint

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_llama_for(tok, 3, seed=3)


def make_vectors(model, layers=(1, 2), seed=5):
    g = torch.Generator().manual_seed(seed)
    L, D = model.config.num_hidden_layers, model.config.hidden_size
    return VectorSet([PersonaVector(f"t{k}", torch.randn(L, D, generator=g), {"layer": l, "model": model_fingerprint(model)})
                      for k, l in enumerate(layers)])


RECORDS = [
    {"prompt": "How do I treat my coworkers?", "response": "Badly, they deserve nothing."},
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"id": "sys", "prompt": "Tell me a joke.", "system": "You are terse.", "response": "No."},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I lost my keys."},
                  {"role": "assistant", "content": "Check your coat."}, {"role": "user", "content": "Not there."},
                  {"role": "assistant", "content": "Then retrace your steps calmly, one room at a time."}]},
    {"prompt": "What is 2+2?", "response": "Four, obviously, you fool."},
    {"prompt": "Describe the sea in one long sentence please.", "response": "Grey, endless and cold."},
    {"prompt": "Name a colour.", "response": "Blue."},
]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def prompt_of(rec):
    if "messages" in rec:
        return rec["messages"][:-1], rec["messages"][-1]["content"]
    return ([{"role": "system", "content": rec["system"]}] if rec.get("system") else []) + \
        [{"role": "user", "content": rec["prompt"]}], rec["response"]


@torch.no_grad()
def reference(model, tok, msgs, answer, layer, u):
    """(response-mean projection, last-prompt projection) from an unpadded, unpatched forward:
    hidden_states[l + 1] is block l's output; the last entry is post-norm, so the last block
    is read with a hook."""
    p = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    r = tok(answer, add_special_tokens=False)["input_ids"]
    grab = {}
    hk = model.model.layers[-1].register_forward_hook(
        lambda m, a, o: grab.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        out = model(torch.tensor([p + r]), output_hidden_states=True)
    finally:
        hk.remove()
    h = grab["h"] if layer == model.config.num_hidden_layers - 1 else out.hidden_states[layer + 1]
    return float(h[0, len(p):].mean(0) @ u), float(h[0, len(p) - 1] @ u), p


@torch.no_grad()
def greedy_alone(model, tok, prompt_ids, n):
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, repetition_penalty=1.1,
                         pad_token_id=tok.pad_token_id)[0, len(prompt_ids):].tolist()
    eos = {tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int)
                               else (model.generation_config.eos_token_id or []))}
    cut = next((k for k, t in enumerate(out) if t in eos), len(out))
    return tok.decode(out[:cut], skip_special_tokens=True).strip()


def read_ranked(out):
    return [json.loads(l) for l in open(Path(out) / "ranked.jsonl")]


def test_projection_difference_matches_hand_computed(tiny, tok, tmp_path):
    vs = make_vectors(tiny, layers=(1, 2))      # block 2 is the last: read by hook in the reference
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    s = screen(tiny, tok, data, vs, tmp_path / "out",
               ScreenSettings(batch_size=3, chunk_batches=1, max_new_tokens=6, progress=False))
    rows = {r["line"]: r for r in read_ranked(tmp_path / "out")}
    assert sorted(rows) == list(range(1, len(RECORDS) + 1))
    dps = {t: [] for t in vs}
    for line, rec in enumerate(RECORDS, 1):
        msgs, resp = prompt_of(rec)
        for t in vs:
            layer = vs[t].meta["layer"]
            u = vs[t].unit(layer)
            r_ref, lp_ref, p = reference(tiny, tok, msgs, resp, layer, u)
            base = greedy_alone(tiny, tok, p, 6)        # the base model's own answer, unbatched
            assert base, "the tiny model should answer something"
            b_ref, _, _ = reference(tiny, tok, msgs, base, layer, u)
            row = rows[line]
            assert row["id"] == rec.get("id", f"line{line}")
            assert row[f"response_{t}"] == pytest.approx(r_ref, abs=1e-6)
            assert row[f"last_prompt_{t}"] == pytest.approx(lp_ref, abs=1e-6)
            assert row[f"base_{t}"] == pytest.approx(b_ref, abs=1e-6)
            assert row[f"dP_{t}"] == pytest.approx(r_ref - b_ref, abs=2e-6)
            assert row[f"approx_{t}"] == pytest.approx(r_ref - lp_ref, abs=2e-6)
            dps[t].append(r_ref - b_ref)
    for t in vs:
        assert s["traits"][t]["dP"]["mean"] == pytest.approx(sum(dps[t]) / len(dps[t]), abs=1e-6)
        assert s["traits"][t]["layer"] == vs[t].meta["layer"]
    ranked = read_ranked(tmp_path / "out")
    assert [r["rank"] for r in ranked] == list(range(1, len(RECORDS) + 1))
    assert all(a["dP_t0"] >= b["dP_t0"] for a, b in zip(ranked, ranked[1:]))
    csv_lines = (tmp_path / "out" / "ranked.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,line,id,dP_t0,") and len(csv_lines) == len(RECORDS) + 1
    assert csv_lines[1].split(",")[1] == str(ranked[0]["line"])
    assert (tmp_path / "out" / "histogram.png").stat().st_size > 1000
    for t in vs:        # the histogram, binned during the merge, against numpy on the ranked values
        for f in ("dP", "approx"):
            h = s["histogram"][t][f]
            vals = [r[f"{f}_{t}"] for r in ranked]
            assert h["counts"] == np.histogram(vals, bins=np.array(h["edges"]))[0].tolist()
            both = [r[f"{g}_{t}"] for r in ranked for g in ("dP", "approx")]   # bins shared per trait
            assert sum(h["counts"]) == len(RECORDS)
            assert (h["edges"][0], h["edges"][-1]) == (pytest.approx(min(both)), pytest.approx(max(both)))
    # --layer overrides the vectors' blocks
    s0 = screen(tiny, tok, data, vs, tmp_path / "out0",
                ScreenSettings(layer=0, approx_only=True, batch_size=4, progress=False))
    row = {r["line"]: r for r in read_ranked(tmp_path / "out0")}[1]
    msgs, resp = prompt_of(RECORDS[0])
    r_ref, lp_ref, _ = reference(tiny, tok, msgs, resp, 0, vs["t1"].unit(0))
    assert s0["traits"]["t1"]["layer"] == 0 and row["approx_t1"] == pytest.approx(r_ref - lp_ref, abs=2e-6)
    assert row["dP_t1"] is None and row["base_t1"] is None


BAD = [
    (2, "{not json", "not valid JSON"),
    (3, "[1, 2]", "expected a JSON object"),
    (4, json.dumps({"prompt": "q"}), "missing or non-string field 'response'"),
    (5, json.dumps({"prompt": "q", "response": "   "}), "empty response"),
    (6, json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}), "role 'bot'"),
    (7, json.dumps({"messages": [{"role": "user", "content": "a"}]}), "last message must be the assistant"),
    (8, "", "empty line"),
    (9, json.dumps({"text": "hello"}), "neither 'messages' nor"),
    (10, json.dumps({"messages": [{"role": "assistant", "content": "b"}]}), "no user message"),
]


def test_malformed_lines_skip_or_stop(tiny, tok, tmp_path):
    vs = make_vectors(tiny)
    lines = [json.dumps(RECORDS[0])] + [b for _, b, _ in BAD] + [json.dumps(RECORDS[1])]
    data = write_jsonl(tmp_path / "d.jsonl", lines)
    with open(data, "ab") as f:
        f.write(b'{"prompt": "caf\xe9", "response": "x"}\n')       # line 12: Latin-1, not UTF-8
    s = screen(tiny, tok, data, vs, tmp_path / "out", ScreenSettings(approx_only=True, progress=False))
    assert s["lines"] == 12 and s["samples"] == 2 and s["malformed"] == 10
    listed = {m["line"]: m["reason"] for m in s["malformed_listed"]}
    assert sorted(listed) == [n for n, _, _ in BAD] + [12]
    for n, _, why in BAD:
        assert why in listed[n], (n, listed[n])
    assert "not UTF-8" in listed[12]
    in_file = [json.loads(l) for l in open(tmp_path / "out" / "malformed.jsonl")]
    assert [m["line"] for m in in_file] == sorted(listed)
    assert sorted(r["line"] for r in read_ranked(tmp_path / "out")) == [1, 11]
    # stop: the first bad line is named, nothing is computed or written
    with pytest.raises(ScreenDataError, match=r"d\.jsonl:2: malformed line: not valid JSON"):
        screen(tiny, tok, data, vs, tmp_path / "stop", ScreenSettings(on_error="stop", approx_only=True, progress=False))
    assert not (tmp_path / "stop").exists()
    with pytest.raises(ScreenDataError, match="file not found"):
        screen(tiny, tok, tmp_path / "nope.jsonl", vs, tmp_path / "o2", ScreenSettings(progress=False))
    with pytest.raises(ScreenDataError, match="no valid samples"):
        screen(tiny, tok, write_jsonl(tmp_path / "bad.jsonl", ["{x"]), vs, tmp_path / "o3", ScreenSettings(progress=False))
    with pytest.raises(ValueError, match="no trait 'evil'"):
        screen(tiny, tok, data, vs, tmp_path / "o4", ScreenSettings(traits=["evil"], progress=False))
    # a zero size is refused before the folder exists (run.json would pin the folder to it)
    with pytest.raises(ValueError, match="chunk_batches must be at least 1, got 0"):
        screen(tiny, tok, data, vs, tmp_path / "o5", ScreenSettings(chunk_batches=0, progress=False))
    assert not (tmp_path / "o5").exists()
    # a folder with someone else's files of the same names is refused and left as it was
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "summary.json").write_text("my notes")
    with pytest.raises(ValueError, match="mine holds summary.json but no screening run"):
        screen(tiny, tok, data, vs, tmp_path / "mine", ScreenSettings(approx_only=True, progress=False))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["summary.json"]
    assert (tmp_path / "mine" / "summary.json").read_text() == "my notes"


def test_without_matplotlib_everything_but_the_png(tiny, tok, tmp_path, monkeypatch):
    """matplotlib is not a dependency: a screen without it must not fail after all the work."""
    for m in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib -> ImportError
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[:3])
    s = screen(tiny, tok, data, make_vectors(tiny), tmp_path / "o", ScreenSettings(approx_only=True, progress=False))
    assert (tmp_path / "o" / "summary.json").exists() and len(read_ranked(tmp_path / "o")) == 3
    assert "histogram" not in s["outputs"] and not (tmp_path / "o" / "histogram.png").exists()
    assert sum(s["histogram"]["t0"]["approx"]["counts"]) == 3


def test_nan_model_is_a_clear_error(tok, tmp_path):
    model = tiny_llama_for(tok, 2, seed=2)
    vs = make_vectors(model, layers=(0, 1))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(ValueError, match="non-finite activations .* lines 1-7"):
        screen(model, tok, data, vs, tmp_path / "o", ScreenSettings(approx_only=True, progress=False))
    assert not list((tmp_path / "o" / "chunks").iterdir()) and not (tmp_path / "o" / "ranked.jsonl").exists()


def test_resume_after_interruption(tiny, tok, tmp_path, monkeypatch):
    vs = make_vectors(tiny)
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS * 3)          # 21 samples
    st = dict(batch_size=2, chunk_batches=3, max_new_tokens=4, temperature=0.9, seed=7, progress=False)
    full = screen(tiny, tok, data, vs, tmp_path / "full", ScreenSettings(**st))
    real, calls = base_mod.generate_ids, []

    def dies_on_5th(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)
    monkeypatch.setattr(base_mod, "generate_ids", dies_on_5th)
    with pytest.raises(KeyboardInterrupt):
        screen(tiny, tok, data, vs, tmp_path / "cut", ScreenSettings(**st))
    # chunk 0 (3 batches) finished, batch 1 of chunk 1 cached; a torn write left half a line
    assert (tmp_path / "cut" / "chunks" / "c00000.jsonl").exists()
    assert not (tmp_path / "cut" / "chunks" / "c00001.jsonl").exists()
    with open(tmp_path / "cut" / "answers" / "c00001.jsonl", "a") as f:
        f.write('{"k": 8, "answ')
    calls.clear()
    monkeypatch.setattr(base_mod, "generate_ids", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    monkeypatch.setattr(report_mod, "FANOUT", 2)     # 4 chunk files: the merge runs in passes
    with pytest.warns(UserWarning, match="incomplete last record"):
        resumed = screen(tiny, tok, data, vs, tmp_path / "cut", ScreenSettings(**st))
    assert len(calls) == 11 - 4          # 11 batches in all, 4 done before the kill
    assert read_ranked(tmp_path / "cut") == read_ranked(tmp_path / "full")   # sampled answers too: seeds per batch
    assert resumed["traits"] == full["traits"]
    # another setting in the same folder is refused, the folder untouched
    before = (tmp_path / "cut" / "ranked.jsonl").read_bytes()
    with pytest.raises(ValueError, match="other inputs or settings"):
        screen(tiny, tok, data, vs, tmp_path / "cut", ScreenSettings(**dict(st, seed=8)))
    assert (tmp_path / "cut" / "ranked.jsonl").read_bytes() == before and json.loads((tmp_path / "cut" / "run.json").read_text())["settings"]["seed"] == 7


def _synthetic(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question number {i}?", "response": f"Answer {i} " + "word " * (i % 7)}) + "\n")
    return path


def test_streaming_memory_does_not_grow_with_file_size(tok, tmp_path):
    model = tiny_llama_for(tok, 2, seed=1)
    vs = make_vectors(model, layers=(0, 1))
    st = ScreenSettings(approx_only=True, batch_size=64, chunk_batches=4, progress=False)
    screen(model, tok, _synthetic(tmp_path / "warm.jsonl", 100), vs, tmp_path / "warm", st)  # imports, caches
    peaks = {}
    for n in (1000, 10000):
        data = _synthetic(tmp_path / f"d{n}.jsonl", n)
        tracemalloc.start()
        s = screen(model, tok, data, vs, tmp_path / f"o{n}", st)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert s["samples"] == n
    assert len(read_ranked(tmp_path / "o10000")) == 10000
    # 10x the samples: ~1.8 MB both (measured); keeping the rows in memory for the ranking
    # instead of merging the chunk files made 10k peak at 15 MB. Allow 25 % noise.
    assert peaks[10000] < 1.25 * peaks[1000] + 512 * 1024, peaks


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, torchrun=0, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    pre = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port())] if torchrun else [sys.executable]
    return run_process_group([*pre, "-m", "personakern", *args], timeout=300, env=env, cwd=cwd)


def test_two_processes_equal_one(tiny, tok, tmp_path):
    tiny.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    vs = make_vectors(tiny)
    vs.save(tmp_path / "v.safetensors")
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS * 2 + ["{oops"])
    args = ["screen", "--model", str(tmp_path / "model"), "--data", str(data), "--vectors", str(tmp_path / "v.safetensors"),
            "--batch-size", "2", "--chunk-batches", "1", "--max-new-tokens", "4", "--temperature", "0.8", "--no-progress"]
    r2 = run_cli(*args, "--out", str(tmp_path / "two"), torchrun=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s2["malformed"] == 1
    # both ranks worked: 7 chunks, rank 1 took the odd ones; and the single-process run agrees
    single = screen(tiny, tok, data, vs, tmp_path / "one", ScreenSettings(batch_size=2, chunk_batches=1, max_new_tokens=4,
                                                                          temperature=0.8, progress=False))
    one, two = read_ranked(tmp_path / "one"), read_ranked(tmp_path / "two")
    assert [r["line"] for r in one] == [r["line"] for r in two]
    for a, b in zip(one, two):
        for k, v in a.items():
            assert b[k] == (pytest.approx(v, abs=1e-6) if isinstance(v, float) else v), k
    assert s2["traits"]["t0"]["dP"]["mean"] == pytest.approx(single["traits"]["t0"]["dP"]["mean"], abs=1e-6)


def test_cli_smollm2_smoke(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [RECORDS[0], RECORDS[1], "{oops", RECORDS[3]])
    vec = REPO / "personakern" / "data" / "vectors" / "smollm2-traits.safetensors"
    r = run_cli("screen", "--data", str(data), "--vectors", str(vec), "--traits", "evil", "--out", str(tmp_path / "o"),
                "--max-new-tokens", "3", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped 1 malformed line(s)" in r.stderr and "3 (not valid JSON" in r.stderr
    assert "evil" in r.stdout and "mean dP" in r.stdout and "highest dP_evil" in r.stdout
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["samples"] == 3 and s["traits"]["evil"]["layer"] == 18
    r = run_cli("screen", "--data", str(data), "--vectors", str(vec), "--out", str(tmp_path / "o2"), "--on-error", "stop")
    assert r.returncode == 2 and "d.jsonl:3: malformed line" in r.stderr
    assert not (tmp_path / "o2" / "ranked.jsonl").exists()


DRIVER = r'''
import sys, time
import personakern, personakern.screening
from personakern import distributed as dist
from personakern.cli import data_cmds
from personakern.cli.main import main

def fake_screen(model, tok, data, vs, out, s):
    if dist.rank() == 1:
        raise ValueError("rank 1 failed in its chunk")
    time.sleep(1)
    dist.barrier()            # where screen() waits for every rank's chunks
    print("rank 0 went past the barrier", flush=True)
    raise RuntimeError("chunks missing after every rank finished")

personakern.screening.screen = fake_screen
data_cmds._load_on_device = lambda name: (None, None)
personakern.VectorSet.load = staticmethod(lambda *a, **k: None)
sys.exit(main(sys.argv[1:]))
'''


def test_failed_rank_does_not_release_the_others(tmp_path):
    """A rank leaving with an error must not take the closing barrier: it would release the
    ranks waiting inside screen(), which then report a misleading "chunks missing"."""
    data = write_jsonl(tmp_path / "d.jsonl", RECORDS[:2])
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = run_process_group([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(_free_port()), str(tmp_path / "driver.py"), "screen",
                           "--data", str(data), "--vectors", "v", "--out", str(tmp_path / "o")],
                          timeout=120, env=env)
    assert r.returncode != 0
    assert "rank 1 failed in its chunk" in r.stderr
    assert "went past the barrier" not in r.stdout + r.stderr, r.stderr[-3000:]


def test_a_byte_order_mark_before_line_1_is_not_a_malformed_line(tmp_path):
    from personakern.screening.data import Sample, iter_records
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + (json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n").encode())
    recs = list(iter_records(data))
    assert [type(r) for r in recs] == [Sample, Sample] and [r.line for r in recs] == [1, 2]
