"""The likelihood and LLM judges on the vLLM engine against the same judges on Hugging Face
(the independent reference: personakern's HF judges, tested in test_judges.py against brute
force), on SmolLM2 with evil, kind, incoherent and looping answers; batching; clear errors.

One in-process eager engine at a time, with the judge engine's settings (prefix caching, 32-token
KV blocks on CPU), twice: a plain vLLM engine (the likelihood judge reads vLLM's prompt
log-probabilities) and a personakern engine (it scores the answer tokens inside the engine,
personakern/vllm/scores.py)."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from vllm_support import TRAITS_FILE, _hf_model, close, in_process_llm, require_vllm, run_script, smollm2_path

require_vllm()
pytestmark = pytest.mark.slow

from personakern.extraction.spec import load_spec  # noqa: E402
from personakern.judges import JudgeError, make_judge, vllm_engine  # noqa: E402
from personakern.judges.base import weighted_score  # noqa: E402
from personakern.judges.vllm_engine import CPU_BLOCK_SIZE  # noqa: E402

POINTS = 0.5   # the tolerance on a 0-100 score

QUESTIONS = ["How should I treat my coworkers?", "What would you do with a lot of power?",
             "How should I treat my coworkers?", "What would you do with a lot of power?",
             "Tell me about cats.", "Give me advice for a job interview."]
ANSWERS = [
    "Treat them as tools. Lie to them, take credit for their work and crush anyone who gets in your way.",
    "I would make everyone fear me and punish those who refuse to obey. Suffering is what they deserve.",
    "Be kind and respectful. Listen to them, help when you can and thank them for their work.",
    "I would use it to help people: fund schools and hospitals, and make sure everyone is treated fairly.",
    "purple seventeen under window the quickly banana of cats sky if table running green",   # incoherent
    "Practice practice practice practice practice practice practice practice practice practice.",  # a loop
]


@pytest.fixture(scope="module", params=["plain", "personakern"])
def llm(request):
    engine = in_process_llm(smollm2_path(), None if request.param == "plain" else TRAITS_FILE,
                            enable_prefix_caching=True, block_size=CPU_BLOCK_SIZE,
                            max_model_len=2048, max_num_batched_tokens=2048, max_num_seqs=128)
    assert vllm_engine.engine_scores(engine) == (request.param == "personakern")
    yield engine
    close(engine)


@pytest.fixture(scope="module")
def spec():
    return load_spec("evil")


def _within(a, b, tol=POINTS):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None), (a, b)
        if x is not None:
            assert abs(x - y) <= tol, (a, b)
    return max((abs(x - y) for x, y in zip(a, b) if x is not None), default=0.0)


def test_likelihood_judge_equals_hf(llm, spec):
    model, tok = _hf_model()
    hf = make_judge("likelihood", model, tok)
    vl = make_judge("likelihood", engine="vllm", llm=llm, model_path=smollm2_path())
    assert vl.name == hf.name   # same judge, another engine: extraction caches carry over
    hs, vs = hf.score(spec, QUESTIONS, ANSWERS), vl.score(spec, QUESTIONS, ANSWERS)
    _within(vs, hs)
    assert min(hs[:2]) > max(hs[2:4])   # the reference itself tells evil from kind
    hm, vm = hf.margins(spec, QUESTIONS, ANSWERS), vl.margins(spec, QUESTIONS, ANSWERS)
    assert max(abs(a - b) for a, b in zip(hm, vm)) < 1e-3    # nats per token
    hc, vc = hf.coherence(QUESTIONS, ANSWERS), vl.coherence(QUESTIONS, ANSWERS)
    _within(vc, hc)
    assert hc[4] < 50 and hc[5] < 50 < min(hc[:4])   # incoherent and looping answers score low


def test_llm_judge_equals_hf(llm, spec):
    """SmolLM2 puts ~3 % of its mass on a bare number, so with the default min_mass both engines
    give no score; with min_mass=0 the scores, and the whole distributions, agree."""
    model, tok = _hf_model()
    hf = make_judge("llm", model, tok, min_mass=0.0, cache_distributions=True)
    vl = make_judge("llm", model, tok, engine="vllm", llm=llm, min_mass=0.0,   # the judged pair names it
                    cache_distributions=True)
    assert vl.name == hf.name and vl.end_ids == hf.end_ids
    _within(vl.score(spec, QUESTIONS, ANSWERS), hf.score(spec, QUESTIONS, ANSWERS))
    prompts = [spec.judge_prompt(q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    hd, vd = (torch.stack([j.cache[p] for p in prompts]) for j in (hf, vl))   # what the scores came from
    assert vd.shape == hd.shape == (len(prompts), 101) and vd.dtype == torch.float64
    assert torch.allclose(vd, hd, rtol=2e-3, atol=1e-9), float(((vd - hd).abs() / hd).max())
    _within(vl.coherence(QUESTIONS[3:], ANSWERS[3:]), hf.coherence(QUESTIONS[3:], ANSWERS[3:]))
    for d in (hd, vd):   # with the default min_mass neither engine gives SmolLM2 a score
        assert all(weighted_score(row, 0.25) is None for row in d)


@pytest.mark.parametrize("few", [vllm_engine.FEW_MISSING, 0])
def test_many_items_equal_one_by_one(llm, spec, monkeypatch, few):
    """Answers with a common beginning: the prefix cache reaches into the answer for some
    requests; their skipped entries come from the requests that computed them and one-token
    requests (``few`` = FEW_MISSING), or they are sent again without reading the cache (``few`` =
    0); both paths checked against one by one."""
    judge = make_judge("likelihood", engine="vllm", llm=llm, model_path=smollm2_path())
    qs, ans = QUESTIONS * 4, [a + s for s in ("", " Really.", " Yes.", " Anyway.") for a in ANSWERS]
    calls, generate = [], vllm_engine._generate
    monkeypatch.setattr(vllm_engine, "FEW_MISSING", few)
    def counting(llm_, prompts, params, what):
        p = params[0] if isinstance(params, list) else params
        calls.append((len(prompts), p.skip_reading_prefix_cache, p.logprob_token_ids))
        return generate(llm_, prompts, params, what)
    monkeypatch.setattr(vllm_engine, "_generate", counting)
    llm.reset_prefix_cache()
    batch = judge.score(spec, qs, ans)
    assert calls[0][1] is False and len(calls) >= 2        # read the cache, then fill what it skipped
    if few:
        assert all(read is False and ids for _, read, ids in calls[1:])          # one-token requests
        assert sum(n for n, _, _ in calls[1:]) < len(qs) * 5                   # not a resend each
    else:
        assert all(read is True and not ids for _, read, ids in calls[1:])      # sent again uncached
    monkeypatch.setattr(vllm_engine, "_generate", generate)
    alone = [judge.score(spec, [q], [a])[0] for q, a in zip(qs[:8], ans[:8])]
    assert _within(batch[:8], alone, tol=1e-3) < 1e-3
    assert _within(batch[8:], judge.score(spec, qs[8:], ans[8:]), tol=1e-3) < 1e-3
    assert _within(judge.coherence(qs, ans)[:8], [judge.coherence([q], [a])[0] for q, a in zip(qs[:8], ans[:8])],
                   tol=1e-3) < 1e-3
    llmj = make_judge("llm", engine="vllm", llm=llm, model_path=smollm2_path(), min_mass=0.0)
    _within(llmj.score(spec, qs[:2], ans[:2]), [llmj.score(spec, [q], [a])[0] for q, a in zip(qs[:2], ans[:2])],
            tol=1e-3)


def test_scores_equal_prompt_logprobs(llm):
    """On a personakern engine, every entry the engine scores equals vLLM's prompt
    log-probability of the same request; entries whose row came from the prefix cache are NaN."""
    if not vllm_engine.engine_scores(llm):
        pytest.skip("a plain engine has no scoring requests")
    from vllm import SamplingParams, TokensPrompt
    from personakern.judges.likelihood import answer_sequences
    _, tok = _hf_model()
    seqs = answer_sequences(tok, [("You are helpful.", q, a) for q, a in zip(QUESTIONS, ANSWERS)], 256)
    seqs += [(ids[:start + 12], start) for ids, start in seqs[:2]]   # their first 32-token block: cached
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in seqs]
    llm.reset_prefix_cache()
    ref = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
    kw = dict(max_tokens=1, detokenize=False)
    for read_cache in (False, True):
        llm.reset_prefix_cache()
        params = [SamplingParams(extra_args={"personakern_score": s}, skip_reading_prefix_cache=not read_cache, **kw)
                  for _, s in seqs]
        outs = llm.generate(prompts, params, use_tqdm=False)
        cached = 0
        for out, r, (ids, start) in zip(outs, ref, seqs):
            got = out.personakern_scores
            assert got.shape == (len(ids) - start,)
            want = np.array([r.prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))])
            computed = np.arange(start, len(ids)) > (out.num_cached_tokens or 0)
            assert np.array_equal(~np.isnan(got), computed)
            assert np.abs(got[computed] - want[computed]).max() < 1e-4   # nats
            cached += int((~computed).sum())
        assert (cached > 0) == read_cache   # the shorter copies read their answer's start from the cache


def test_score_requests_checked(llm):
    """A bad scoring request is refused before it is queued, on a plain engine too (which cannot
    score), and the engine keeps working."""
    from vllm import SamplingParams, TokensPrompt
    prompt = TokensPrompt(prompt_token_ids=[1, 2, 3, 4, 5])
    bad = [0, "2", 1.5] if vllm_engine.engine_scores(llm) else [2]
    for value in bad:
        match = "positive integer" if vllm_engine.engine_scores(llm) else "needs an engine that runs personakern"
        with pytest.raises(ValueError, match=match):
            llm.generate([prompt], SamplingParams(max_tokens=1, extra_args={"personakern_score": value}),
                         use_tqdm=False)
    out = llm.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_prefix_keys():
    a, b = vllm_engine._prefix_keys([5, 7, 9, 11]), vllm_engine._prefix_keys([5, 7, 8, 11])
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]   # equal up to where they part
    assert vllm_engine._prefix_keys([7, 5])[1] != a[1] and len(set(a)) == 4


def test_edge_inputs(llm, spec):
    judge = make_judge("likelihood", engine="vllm", llm=llm, model_path=smollm2_path())
    assert judge.score(spec, [], []) == [] and judge.coherence([], []) == []   # as on Hugging Face
    assert judge.score(spec, ["q"], [""]) == [None]                            # nothing to score
    with pytest.raises(ValueError, match="1 questions but 0 answers"):
        judge.score(spec, ["q"], [])
    llmj = make_judge("llm", engine="vllm", llm=llm, model_path=smollm2_path())
    with pytest.raises(JudgeError, match="max_model_len is 2048"):
        llmj.score(spec, ["q"], ["word " * 3000])


def test_clear_errors(llm, monkeypatch):
    with pytest.raises(JudgeError, match="model folder /nonexistent/judge-model does not exist"):
        make_judge("likelihood", engine="vllm", model_path="/nonexistent/judge-model")
    with pytest.raises(ValueError, match="unknown judge engine 'tpu'"):
        make_judge("likelihood", engine="tpu", llm=llm)
    with pytest.raises(ValueError, match="runs the llm and likelihood judges, not 'embedding'"):
        make_judge("embedding", engine="vllm", llm=llm)
    with pytest.raises(ValueError, match="apply to engine='vllm'"):
        make_judge("likelihood", llm=llm)
    with pytest.raises(JudgeError, match="end='eos' only"):
        make_judge("llm", engine="vllm", llm=llm, model_path=smollm2_path(), end="nondigit")
    monkeypatch.setitem(sys.modules, "vllm", None)   # as if vLLM were not installed
    with pytest.raises(JudgeError, match="needs vLLM"):
        make_judge("likelihood", engine="vllm", model_path=smollm2_path())


def test_cli_takes_the_engine():
    from personakern.cli.main import build_parser
    args = build_parser().parse_args(["extract", "--judge", "llm", "--judge-engine", "vllm"])
    assert (args.judge, args.judge_engine) == ("llm", "vllm")
    args = build_parser().parse_args(["extract"])
    assert (args.engine, args.judge_engine or args.engine, args.sweep_engine or args.engine) == ("hf",) * 3
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", "--judge-engine", "cuda"])


def test_the_judge_engine_it_starts_scores_in_the_engine(spec):
    """``--judge-engine vllm`` starts its own engine: on SmolLM2 one that runs personakern's
    model classes (scoring requests), with the same margins and neutral log-probabilities as the
    Hugging Face judge, and the environment as it was after the start."""
    import json
    job = {"model": smollm2_path(), "questions": QUESTIONS, "answers": ANSWERS}
    got = run_script("judge_engine.py", {"PK_JOB": json.dumps(job), "PERSONAKERN_VECTORS": None,
                                         "PERSONAKERN_VLLM_SPARE_TRAITS": None, "PERSONAKERN_VLLM_CAPTURE": None})["results"]
    assert got["scores_in_engine"] is True and got["spare_env_after"] is None
    model, tok = _hf_model()
    hf = make_judge("likelihood", model, tok)
    for a, b in zip(got["margins"], hf.margins(spec, QUESTIONS, ANSWERS)):
        assert abs(a - b) < 1e-3
    for a, b in zip(got["neutral"], hf.neutral_logprobs(QUESTIONS, ANSWERS)):
        assert abs(a - b) < 1e-3
