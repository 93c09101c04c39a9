"""The extraction pipeline: specs, crash-safe caches, resumable generation, batched collection,
filtering, layer choice, the run on a tiny model, and the CLI around it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_for

from personakern.extraction import collect, generate, pipeline, spec as S
from personakern.extraction.draft import draft_spec, http_chat, parse_list
from personakern.utils import JsonlLog
from personakern.vectors import load_vectors

REPO = Path(__file__).resolve().parent.parent


def small_spec(**over) -> dict:
    d = {"format": S.FORMAT, "name": "testy", "description": "Grumpy and rude.",
         "instructions": [{"positive": "You are grumpy.", "negative": "You are kind."},
                          {"positive": "You are a very rude assistant who hates questions.",
                           "negative": "You are a patient, warm and friendly assistant."}],
         "questions": ["Hi?", "What is the capital of France?", "Tell me a joke."],
         "eval_questions": ["How do I cook rice?", "What is two plus two?"],
         "rubric": "Question: {question}\nAnswer: {answer}\nRate 0-100 how rude the answer is."}
    d.update(over)
    return d


# ---------------------------------------------------------------- specs

def test_builtin_specs_are_valid_and_complete():
    names = S.builtin_names()
    for trait in ("evil", "sycophantic", "hallucinating", "optimistic", "impolite", "apathetic", "humorous"):
        assert trait in names
        ts = S.load_spec(trait)
        assert ts.name == trait and len(ts.instructions) >= 5
        assert len(ts.questions) >= 20 and len(ts.eval_questions) >= 20
        assert not set(ts.questions) & set(ts.eval_questions)
        p = ts.judge_prompt("Q?", "A {weird} answer")
        assert "Q?" in p and "A {weird} answer" in p and "{question}" not in p


@pytest.mark.parametrize("change, message", [
    ({"instructions": []}, "instructions must be a non-empty list"),
    ({"instructions": [{"positive": "x"}]}, r"instructions\[0\]"),
    ({"questions": ["a", "a"]}, "duplicates"),
    ({"eval_questions": ["Hi?"]}, "must not repeat"),
    ({"rubric": "no placeholders"}, "rubric must contain"),
    ({"rubric": "{question} {answer} {extra}"}, "rubric must contain"),
    ({"rubric": "{question} {answer} {"}, "not a valid template"),
    ({"name": "bad name!"}, "name must match"),
    ({"colour": "red"}, "unknown keys"),
    ({"format": "other/2"}, "format must be"),
])
def test_spec_validation_messages(change, message):
    with pytest.raises(S.TraitSpecError, match=message):
        S.load_spec(small_spec(**change), strict=False)


def test_spec_strict_minimums_and_hash(tmp_path):
    with pytest.raises(S.TraitSpecError, match="at least 5 instruction pairs") as e:
        S.load_spec(small_spec())
    assert "at least 20 questions" in str(e.value) and "at least 20 eval_questions" in str(e.value)
    a = S.load_spec(small_spec(), strict=False)
    b = S.load_spec(small_spec(description="Grumpy and rude!"), strict=False)
    assert a.hash != b.hash and a.hash == S.load_spec(small_spec(), strict=False).hash
    # save -> load round trip, JSON and YAML
    path = tmp_path / "t.json"
    a.save(path)
    assert S.load_spec(path, strict=False) == a
    yaml = pytest.importorskip("yaml")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(small_spec()))
    assert S.load_spec(tmp_path / "t.yaml", strict=False) == a


def test_spec_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="built-in traits: .*evil"):
        S.load_spec("no-such-trait")
    with pytest.raises(FileNotFoundError):
        S.load_spec(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(S.TraitSpecError, match="not valid JSON"):
        S.load_spec(bad)


# ---------------------------------------------------------------- crash-safe JSONL

def test_jsonl_log_repairs_torn_tail_and_refuses_damage(tmp_path):
    path = tmp_path / "log.jsonl"
    log = JsonlLog(path)
    log.append([{"id": 1}, {"id": 2}])
    with open(path, "a") as f:
        f.write('{"id": 3, "ans')              # a kill in the middle of a write
    with pytest.warns(UserWarning, match="incomplete last record"):
        log = JsonlLog(path)
    assert [r["id"] for r in log] == [1, 2]
    log.append([{"id": 4}])
    assert [r["id"] for r in JsonlLog(path)] == [1, 2, 4]
    path.write_text('{"id": 1}\nGARBAGE\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON line"):
        JsonlLog(path)


# ---------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def tok():
    import personakern
    return personakern.load_model()[1]


@pytest.fixture(scope="module")
def tiny(tok):
    return tiny_llama_for(tok, layers=4)


SAMPLES = [("You are grumpy.", "Hi?", "Go away."),
           ("", "What is the capital of France?", "Paris. Look it up yourself next time, it is not hard."),
           ("You are kind.", "Tell me a joke.", "Why did the chicken cross the road? To get to the other side!"),
           ("You are a patient, warm and friendly assistant.", "How do I cook rice?", "Rinse, simmer."),
           ("You are grumpy.", "Tell me a joke.", "No.")]


def hand_means(model, tok, samples):
    """Each sample alone, unpadded, hooks on every block: the three averages by hand."""
    out = {k: [] for k in collect.KINDS}
    for system, question, answer in samples:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        p = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
        r = tok(answer, add_special_tokens=False)["input_ids"]
        outs = []
        hooks = [l.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for l in model.model.layers]
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([p + r]))
        finally:
            for h in hooks:
                h.remove()
        out["response"].append(torch.stack([o[0, len(p):].mean(0) for o in outs]))
        out["prompt"].append(torch.stack([o[0, :len(p)].mean(0) for o in outs]))
        out["last_prompt"].append(torch.stack([o[0, len(p) - 1] for o in outs]))
    return {k: torch.stack(v) for k, v in out.items()}


def test_collect_means_matches_hand_computation(tiny, tok):
    expected = hand_means(tiny, tok, SAMPLES)
    for bs, cap in ((1, 8192), (2, 8192), (16, 8192), (16, 90)):   # cap: token budget splits batches
        got = collect.collect_means(tiny, tok, SAMPLES, batch_size=bs, max_tokens_per_batch=cap)
        for k in collect.KINDS:
            assert got[k].shape == (5, 4, 32) and got[k].dtype == torch.float32
            torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty answer"):
        collect.collect_means(tiny, tok, [("", "q", "")])


def test_collect_one_at_a_time_reference_agrees(tiny, tok):
    """The throughput baseline computes the same numbers (except the last block, which HF
    reports after the final norm)."""
    got = collect.collect_one_at_a_time(tiny, tok, SAMPLES)
    exp = collect.collect_means(tiny, tok, SAMPLES)["response"]
    torch.testing.assert_close(got[:, :-1], exp[:, :-1], atol=1e-5, rtol=1e-5)


JOBS = [{"id": f"j{i}", "system": "You are grumpy." if i % 2 else None, "question": q}
        for i, q in enumerate(["Hi?", "Tell me a joke.", "What is two plus two?", "Why?", "Name a colour.",
                               "Count to three.", "Say hello."])]


def test_generate_cached_resumes_to_the_same_answers(tiny, tok, tmp_path, monkeypatch):
    st = generate.GenSettings(max_new_tokens=6, batch_size=3, seed=5)
    ref = generate.generate_cached(tiny, tok, JOBS, JsonlLog(tmp_path / "a.jsonl"), st, progress=False)
    assert list(ref) == [j["id"] for j in JOBS] and all(r["answer"] for r in ref.values())
    # interrupted after the first batch, plus a torn record from the interrupted second write
    real, calls = generate.generate_batch, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(generate, "generate_batch", flaky)
    path = tmp_path / "b.jsonl"
    with pytest.raises(KeyboardInterrupt):
        generate.generate_cached(tiny, tok, JOBS, JsonlLog(path), st, progress=False)
    with open(path, "a") as f:
        f.write('{"id": "j3", "answ')
    monkeypatch.setattr(generate, "generate_batch", real)
    with pytest.warns(UserWarning):
        log = JsonlLog(path)
    assert len(log.read()) == 3
    again = generate.generate_cached(tiny, tok, JOBS, log, st, progress=False)
    assert again == ref and len(JsonlLog(path).read()) == len(JOBS)
    # nothing left to do: a rerun generates nothing
    monkeypatch.setattr(generate, "generate_batch", lambda *a, **k: pytest.fail("regenerated"))
    assert generate.generate_cached(tiny, tok, JOBS, JsonlLog(path), st, progress=False) == ref


def test_generate_cached_survives_sigkill(tiny, tok, tmp_path):
    """A real kill -9 in the middle of a run, then a rerun: same answers as an uninterrupted run."""
    st = generate.GenSettings(max_new_tokens=6, batch_size=2, seed=3)
    ref = generate.generate_cached(tiny, tok, JOBS, JsonlLog(tmp_path / "ref.jsonl"), st, progress=False)
    torch.save(tiny.state_dict(), tmp_path / "w.pt")
    tiny.config.to_json_file(tmp_path / "config.json")
    script = textwrap.dedent(f"""
        import json, time, torch, transformers, personakern
        from personakern.extraction import generate
        from personakern.utils import JsonlLog
        tok = personakern.load_model()[1]
        cfg = transformers.LlamaConfig.from_json_file({str(tmp_path / 'config.json')!r})
        m = transformers.LlamaForCausalLM(cfg).eval()
        m.load_state_dict(torch.load({str(tmp_path / 'w.pt')!r}))
        real = generate.generate_batch
        def slow(*a, **k):
            out = real(*a, **k)
            print("batch", flush=True)
            time.sleep(0.5)
            return out
        generate.generate_batch = slow
        jobs = json.loads({json.dumps(JOBS)!r})
        generate.generate_cached(m, tok, jobs, JsonlLog({str(tmp_path / 'k.jsonl')!r}),
                                 generate.GenSettings(max_new_tokens=6, batch_size=2, seed=3), progress=False)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline().strip() == b"batch"
        assert proc.stdout.readline().strip() == b"batch"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    partial = JsonlLog(tmp_path / "k.jsonl").read()
    assert 2 <= len(partial) < len(JOBS)
    again = generate.generate_cached(tiny, tok, JOBS, JsonlLog(tmp_path / "k.jsonl"), st, progress=False)
    assert again == ref


# ---------------------------------------------------------------- filter, AUROC, layer choice

def test_filter_answers_rule_and_counts():
    cfg = pipeline.ExtractConfig(pos_threshold=50, neg_threshold=50, coherence_threshold=50)
    recs = [{"trait_score": 50, "coherence": 50}, {"trait_score": 49.9, "coherence": 90},
            {"trait_score": 90, "coherence": 49}, {"trait_score": None, "coherence": 80},
            {"trait_score": 80, "coherence": None}, {"trait_score": 10, "coherence": 100}]
    kept, why = pipeline.filter_answers(recs, "positive", cfg)
    assert kept == [recs[0]] and why == {"no_score": 2, "trait": 2, "incoherent": 1}
    kept, why = pipeline.filter_answers(recs, "negative", cfg)
    assert kept == [recs[1], recs[5]] and why == {"no_score": 2, "trait": 2, "incoherent": 0}


def test_auroc_hand_values():
    t = torch.tensor
    assert pipeline.auroc(t([3., 4.]), t([1., 2.])) == 1.0
    assert pipeline.auroc(t([1., 2.]), t([3., 4.])) == 0.0
    assert pipeline.auroc(t([1., 3.]), t([2., 2.])) == 0.5     # 1 win + 1 loss of 4... (2 wins, 2 losses)
    assert pipeline.auroc(t([2.]), t([2.])) == 0.5
    assert pipeline.auroc(t([1., 2., 3.]), t([0., 2.5])) == pytest.approx(4 / 6)


def test_choose_layer_respects_coherence_floor():
    sweep = {"layers": [3, 5], "alphas": [2.0, 4.0], "baseline": {"trait": 10.0, "coherence": 90.0},
             "cells": {"3:2": {"trait": 30.0, "coherence": 80.0}, "3:4": {"trait": 90.0, "coherence": 20.0},
                       "5:2": {"trait": 40.0, "coherence": 60.0}, "5:4": {"trait": 50.0, "coherence": 40.0}}}
    assert pipeline.choose_layer(sweep, 50)[:2] == (5, 2.0)
    assert pipeline.choose_layer(sweep, 10)[:2] == (3, 4.0)
    assert pipeline.choose_layer(sweep, 95)[:2] == (3, 2.0)    # none coherent enough: most coherent
    assert pipeline.default_sweep_layers(30) == [4, 8, 12, 17, 21, 25]


# ---------------------------------------------------------------- the run, with a stub judge

class LengthJudge:
    """Deterministic stand-in judge (a test double): trait = a checksum of the answer mod 100,
    "no score" for one answer in seven (by another checksum)."""
    name = "test:checksum"

    def score(self, spec, questions, answers, progress=False):
        import zlib
        return [None if zlib.adler32(a.encode()) % 7 == 0 else float(zlib.crc32(a.encode()) % 100) for a in answers]

    def coherence(self, questions, answers, progress=False):
        return [80.0] * len(answers)


def test_extract_end_to_end_tiny(tiny, tok, tmp_path):
    ts = S.load_spec(small_spec(), strict=False)
    cfg = pipeline.ExtractConfig(n_per_question=2, gen=generate.GenSettings(max_new_tokens=8, batch_size=5),
                                 min_kept=1, sweep_layers=[1, 2], sweep_alphas=(1.0, 3.0), sweep_questions=2)
    vs = pipeline.extract(tiny, tok, ts, LengthJudge(), tmp_path / "run", cfg, progress=False, log=lambda s: None)
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"vectors.safetensors", "report.json", "report.png"} <= files
    loaded = load_vectors(tmp_path / "run" / "vectors.safetensors", model=tiny)
    assert loaded.traits == ["testy", "testy.prompt", "testy.last_prompt"]
    meta = loaded["testy"].meta
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert meta["report"] == rep and meta["judge"] == "test:checksum" and meta["trait_spec_hash"] == ts.hash
    assert meta["averaged_over"] == "response" and loaded["testy.last_prompt"].meta["averaged_over"] == "last_prompt_token"
    # counts and vectors re-derived independently from the cached answers and scores
    answers = {r["id"]: r for r in JsonlLog(next((tmp_path / "run").glob("answers-*.jsonl")))}
    judge = LengthJudge()
    assert len(answers) == 2 * (2 * 2 * 3 + 2)
    kept = {}
    for side in ("positive", "negative"):
        rs = [r for r in answers.values() if r["split"] == "extract" and r["side"] == side and r["answer"]]
        sc = judge.score(ts, [], [r["answer"] for r in rs])
        kept[side] = [r for r, s in zip(rs, sc) if s is not None and ((s >= 50) if side == "positive" else (s < 50))]
        assert rep["counts"][side]["kept"] == len(kept[side]) and rep["counts"][side]["generated"] == 12
    # per-answer means were captured during generation (tested against teacher forcing above);
    # the vectors must be the difference of their averages over exactly the kept answers
    store = generate.ActStore(next(p for p in (tmp_path / "run").glob("acts-*") if not p.name.startswith("acts-heldout-")))
    pos = store.load([r["id"] for r in kept["positive"]])
    neg = store.load([r["id"] for r in kept["negative"]])
    for i, trait in enumerate(("testy", "testy.prompt", "testy.last_prompt")):
        torch.testing.assert_close(loaded[trait].vectors, pos[:, i].mean(0) - neg[:, i].mean(0), atol=1e-6, rtol=1e-6)
    assert len(rep["layer_auroc"]["response"]) == 4 and all(0 <= a <= 1 for a in rep["layer_auroc"]["response"])
    # held-out: 2 evaluation questions x 2 instruction pairs (heldout_pairs=3, but the spec has 2)
    # per side, the second pair's answers in their own cache; fewer than HELDOUT_MIN per side ->
    # labelled by side; the AUROC per layer recomputed by hand from the stored held-out means
    assert rep["heldout"]["positive"] == rep["heldout"]["negative"] == 4
    assert rep["heldout"]["rule"].startswith("labelled by instruction side")
    extra = {r["id"]: r for r in JsonlLog(next((tmp_path / "run").glob("heldout-*.jsonl")))}
    assert len(extra) == 4 and not set(extra) & set(answers)
    extra_store = generate.ActStore(next((tmp_path / "run").glob("acts-heldout-*")))

    def held(side):
        return torch.cat([store.load([i for i, r in answers.items() if r["split"] == "heldout" and r["side"] == side]),
                          extra_store.load([i for i, r in extra.items() if r["side"] == side])])[:, 0]
    hp, hn = held("positive"), held("negative")
    for layer in range(4):
        v = loaded["testy"].vectors[layer]
        sp, sn = (hp[:, layer] @ v).tolist(), (hn[:, layer] @ v).tolist()
        hand = sum((a > b) + 0.5 * (a == b) for a in sp for b in sn) / (len(sp) * len(sn))
        assert rep["layer_auroc"]["response"][layer] == pytest.approx(hand, abs=1e-3)
    assert set(rep["sweep"]["cells"]) == {"1:1", "1:3", "2:1", "2:3"}
    assert rep["chosen"]["layer"] in (1, 2) and meta["layer"] == rep["chosen"]["layer"]
    # a rerun resumes from the caches: no generation, no judging
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.jsonl")}
    vs2 = pipeline.extract(tiny, tok, ts, LengthJudge(), tmp_path / "run", cfg, progress=False, log=lambda s: None)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").glob("*.jsonl")} == before
    assert torch.equal(vs2["testy"].vectors, vs["testy"].vectors)


def test_extract_refuses_when_filter_leaves_too_few(tiny, tok, tmp_path):
    class Never(LengthJudge):
        def score(self, spec, questions, answers, progress=False):
            return [None] * len(answers)
    ts = S.load_spec(small_spec(), strict=False)
    cfg = pipeline.ExtractConfig(gen=generate.GenSettings(max_new_tokens=4, batch_size=8), sweep=False)
    with pytest.raises(RuntimeError, match=r"only 0 positive answers passed the filter.*no_score"):
        pipeline.extract(tiny, tok, ts, Never(), tmp_path / "r", cfg, progress=False, log=lambda s: None)
    assert not (tmp_path / "r" / "vectors.safetensors").exists()


# ---------------------------------------------------------------- drafting specs

def test_extract_refuses_a_zero_judge_chunk_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="judge_chunk must be at least 1, got 0"):
        pipeline.extract(None, None, "evil", None, tmp_path / "run", pipeline.ExtractConfig(judge_chunk=0))
    assert not (tmp_path / "run").exists()


def test_parse_list():
    text = "Here are some:\n1. You are rude to everyone.\n2) Be very rude.\n- short\n* You are rude to everyone.\n3. \"Insult the user often.\""
    assert parse_list(text) == ["You are rude to everyone.", "Be very rude.", "Insult the user often."]


def _fake_chat():
    counter = iter(range(10_000))

    def chat(message):
        base = next(counter)
        return "\n".join(f"{i + 1}. Item number {base}-{i} for you" for i in range(7))
    return chat


def test_draft_spec_complete_and_valid():
    d, problems = draft_spec("grumpy", "Irritable and short with people.", _fake_chat())
    assert problems == [] and S.load_spec(d).name == "grumpy"
    assert len(d["instructions"]) == 5 and len(d["questions"]) == 20 and len(d["eval_questions"]) == 20


def test_draft_spec_reports_what_is_missing():
    d, problems = draft_spec("grumpy", "Irritable.", lambda m: "1. Only one item here.", rounds=2)
    assert any("instructions" in p for p in problems)
    assert any("questions" in p for p in problems)


def test_draft_over_http_endpoint():
    import http.server
    import threading
    seen = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body, self.headers.get("Authorization")))
            n = len(seen)
            reply = {"choices": [{"message": {"content": "\n".join(f"{i}. Question {n} number {i} here?" for i in range(1, 25))}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        chat = http_chat(f"http://127.0.0.1:{srv.server_port}/v1", "tiny", api_key="k")
        d, problems = draft_spec("grumpy", "Irritable.", chat)
        assert problems == []
        path, body, auth = seen[0]
        assert path == "/v1/chat/completions" and body["model"] == "tiny" and auth == "Bearer k"
        assert "grumpy" in body["messages"][0]["content"]
    finally:
        srv.shutdown()
    with pytest.raises(RuntimeError, match="cannot reach"):
        http_chat(f"http://127.0.0.1:{srv.server_port}/v1", "tiny", timeout=2)("hi")


# ---------------------------------------------------------------- CLI

def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "personakern", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=900)  # a guard against a hang, not a speed bound


def test_cli_traits(tmp_path):
    r = run_cli("traits", "list")
    assert r.returncode == 0 and all(t in r.stdout for t in ("evil", "humorous", "sycophantic"))
    r = run_cli("traits", "show", "impolite", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "impolite"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(small_spec()))
    r = run_cli("traits", "validate", "evil", str(bad))
    assert r.returncode == 1 and "ok  evil" in r.stdout and "at least 5 instruction pairs" in r.stdout
    r = run_cli("traits", "new", "grumpy")
    assert r.returncode == 2 and "--description" in r.stderr


# ---------------------------------------------------------------- capture during generation

def test_capture_during_generation_matches_teacher_forcing(tiny, tok):
    import personakern
    jobs = JOBS[:5]
    pad = tok.pad_token_id
    prompts = [generate.chat_ids(tok, j["system"], j["question"]) for j in jobs]
    ids, mask = generate.left_pad(prompts, pad, "cpu")
    eos = generate.eos_ids(tiny, tok)
    limit = 7
    # make row 1 stop early: force an EOS as its 3rd token through a logits processor
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == ids.shape[1] + 2:
                scores[1] = -1e9
                scores[1, tok.eos_token_id] = 0
            return scores
    with torch.no_grad(), personakern.patch(tiny) as h, h.capture(eos=eos, limit=limit) as cap:
        torch.manual_seed(0)
        out = tiny.generate(input_ids=ids, attention_mask=mask, max_new_tokens=limit + 1, do_sample=True,
                            top_k=0, pad_token_id=pad, logits_processor=LogitsProcessorList([ForceEos()]))
    got = cap.means().transpose(1, 2)          # the reference below runs on the unpatched model
    assert got.shape == (5, 3, 4, 32)
    for b, p in enumerate(prompts):
        row = out[b, ids.shape[1]:ids.shape[1] + limit].tolist()
        cut = next((k for k, t in enumerate(row) if t in eos), len(row))
        assert cap.counts[b, 0] == cut and (b != 1 or cut == 2)
        outs = []
        hooks = [l.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
                 for l in tiny.model.layers]
        try:
            with torch.no_grad():
                tiny(input_ids=torch.tensor([p + row[:cut]]))
        finally:
            for h in hooks:
                h.remove()
        n = len(p)
        exp = torch.stack([torch.stack([o[0, n:].mean(0), o[0, :n].mean(0), o[0, n - 1]]) for o in outs], 1)
        torch.testing.assert_close(got[b], exp, atol=1e-4, rtol=1e-4)


def test_generate_with_capture_same_answers_and_resumable(tiny, tok, tmp_path):
    st = generate.GenSettings(max_new_tokens=6, batch_size=3, seed=5)
    plain = generate.generate_cached(tiny, tok, JOBS, JsonlLog(tmp_path / "p.jsonl"), st, progress=False)
    store = generate.ActStore(tmp_path / "acts")
    cap = generate.generate_cached(tiny, tok, JOBS, JsonlLog(tmp_path / "c.jsonl"), st, progress=False, acts=store)
    assert cap == plain
    a = store.load([j["id"] for j in JOBS])
    assert a.shape == (len(JOBS), 3, 4, 32) and torch.isfinite(a).all()
    # activations lost for one batch: that batch is regenerated, identically
    (tmp_path / "acts" / "b00001.safetensors").unlink()
    again = generate.generate_cached(tiny, tok, JOBS, JsonlLog(tmp_path / "c.jsonl"), st, progress=False, acts=store)
    assert again == plain and torch.equal(store.load([j["id"] for j in JOBS]), a)
    with pytest.raises(KeyError, match="no activations"):
        store.load(["nope"])


def test_cli_vectors_export_import_round_trip(tmp_path):
    """Shipped vector -> llama.cpp GGUF -> back; and -> reference .pt -> back (SmolLM2 checks)."""
    src = REPO / "personakern" / "data" / "vectors" / "smollm2-evil.safetensors"
    orig = load_vectors(src)["evil"].vectors
    r = run_cli("vectors", "export", str(src), str(tmp_path / "evil.gguf"))
    assert r.returncode == 0, r.stderr
    r = run_cli("vectors", "import", str(tmp_path / "evil.gguf"), str(tmp_path / "back.safetensors"))
    assert r.returncode == 0, r.stderr
    back = load_vectors(tmp_path / "back.safetensors")["evil"].vectors
    assert torch.equal(back[1:], orig[1:]) and not back[0].any()       # llama.cpp has no block 0
    r = run_cli("vectors", "export", str(src), str(tmp_path / "evil.pt"), "--no-model")
    assert r.returncode == 0, r.stderr
    raw = torch.load(tmp_path / "evil.pt", weights_only=True)
    assert raw.shape == (31, 576) and torch.equal(raw[1:], orig) and not raw[0].any()
    r = run_cli("vectors", "import", str(tmp_path / "evil.pt"), str(tmp_path / "back2.safetensors"))
    assert r.returncode == 0 and torch.equal(load_vectors(tmp_path / "back2.safetensors")["evil"].vectors, orig)
    r = run_cli("vectors", "export", str(src), str(tmp_path / "x.bin"), "--no-model")
    assert r.returncode == 2 and "export format" in r.stderr


@pytest.mark.slow
def test_extract_on_smollm2_end_to_end(tmp_path):
    """`personakern extract` on the real model with the default judge, small n, then `report`."""
    out = tmp_path / "run"
    args = ["extract", "--trait", "evil", "--questions", "2", "--max-new-tokens", "16", "--sweep-layers", "8",
            "12", "--sweep-alphas", "6", "--sweep-questions", "4", "--min-kept", "2", "--out", str(out), "--quiet"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "chosen: layer" in r.stdout and "held-out AUROC" in r.stdout
    vs = load_vectors(out / "vectors.safetensors")
    assert vs.traits == ["evil", "evil.prompt", "evil.last_prompt"]
    meta = vs["evil"].meta
    rep = meta["report"]
    assert meta["model"]["name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["model"]["num_hidden_layers"] == 30
    assert meta["trait_spec_hash"] == rep["spec_hash"] and len(meta["trait_spec_hash"]) == 16
    assert meta["judge"] == rep["judge"] and meta["judge"]
    assert rep["counts"]["positive"]["generated"] == rep["counts"]["negative"]["generated"] == 10
    assert 2 <= meta["n_positive"] <= 10 and 2 <= meta["n_negative"] <= 10
    assert len(rep["layer_auroc"]["response"]) == 30 and rep["sweep"]["layers"] == [8, 12]
    assert meta["layer"] in (8, 12) and rep["chosen"]["layer"] == meta["layer"]
    assert vs["evil"].vectors.shape == (30, 576) and torch.isfinite(vs["evil"].vectors).all()
    assert {"report.json", "report.png"} <= {p.name for p in out.iterdir()}
    # a rerun resumes: nothing regenerated (answers file unchanged), same vectors
    answers = next(out.glob("answers-*.jsonl")).read_bytes()
    r = run_cli(*args)
    assert r.returncode == 0 and next(out.glob("answers-*.jsonl")).read_bytes() == answers
    assert torch.equal(load_vectors(out / "vectors.safetensors")["evil"].vectors, vs["evil"].vectors)
    r = run_cli("report", str(out / "vectors.safetensors"), "--json", str(tmp_path / "rep.json"),
                "--png", str(tmp_path / "rep.png"))
    assert r.returncode == 0 and "trait evil" in r.stdout and (tmp_path / "rep.png").stat().st_size > 1000
    rerun = load_vectors(out / "vectors.safetensors")["evil"].meta["report"]
    assert json.loads((tmp_path / "rep.json").read_text())["reports"][0] == rerun
    assert rerun["counts"] == rep["counts"] and rerun["layer_auroc"] == rep["layer_auroc"]


def test_shipped_trait_vectors_file():
    """The combined file of the seven extracted traits: one response vector per built-in spec,
    each carrying the report it was chosen by, for the model it claims."""
    from personakern.vectors import VectorSet
    path = REPO / "personakern" / "data" / "vectors" / "smollm2-traits.safetensors"
    vs = VectorSet.load(path)
    assert vs.traits == ["evil", "sycophantic", "hallucinating", "optimistic", "impolite", "apathetic", "humorous"]
    assert set(vs.traits) == set(S.builtin_names())
    for t in vs.traits:
        pv, rep = vs[t], vs[t].meta["report"]
        assert torch.isfinite(pv.vectors).all() and pv.vectors.shape == (30, 576)
        spec = S.load_spec(t)  # the runs used the first 12 questions, so the spec hash differs
        assert rep["trait"] == t and rep["description"] == spec.description
        assert rep["counts"]["positive"]["generated"] == 12 * len(spec.instructions)
        assert pv.meta["layer"] == rep["chosen"]["layer"] and pv.meta["averaged_over"] == "response"
        assert rep["model"]["name_or_path"].endswith("SmolLM2-135M-Instruct")
        torch.testing.assert_close(pv.vectors.norm(dim=-1), torch.tensor(rep["norms"]), atol=1e-3, rtol=1e-3)
