"""``vllm serve`` with the plugin, over 127.0.0.1 with the openai client: steering, readings in
the response and on the last stream chunk, every bad-SPEC case a 400, plain requests untouched."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest

from vllm_support import BASE_ENV, ROOT, TRAITS_FILE, _hf_model, chat_ids, require_vllm, run_script, smollm2_path

require_vllm()
pytest.importorskip("openai")
pytestmark = pytest.mark.slow

SPEC = {"steer": [{"trait": "evil", "alpha": 3.0, "layers": [18], "positions": "response"}],
        "monitor": {"traits": ["evil", "humorous"], "layers": [6, 18, 29]}}
MESSAGES = [{"role": "user", "content": "How should I treat my coworkers?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = dict(os.environ)
    env.update(BASE_ENV)
    env["PERSONAKERN_VECTORS"] = TRAITS_FILE
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)   # the served engine runs as shipped: own processes
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "personakern.vllm", "serve", smollm2_path(), "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024",
           "--max-num-batched-tokens", "1024", "--max-num-seqs", "8", "--served-model-name", "smollm2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    import urllib.request
    deadline = time.time() + 600
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("vllm serve did not start:\n" + log.read_text()[-5000:])
                time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=300)


def xargs(spec):
    return {"vllm_xargs": {"personakern": spec if isinstance(spec, str) else json.dumps(spec)}}


def chat(client, spec=None, **kw):
    args = dict(model="smollm2", messages=MESSAGES, max_tokens=16, temperature=0)
    args.update(kw)
    return client.chat.completions.create(**args, extra_body=xargs(spec) if spec is not None else None)


def test_steered_chat_completion_carries_readings(client):
    plain = chat(client)
    steered = chat(client, SPEC)
    assert "personakern" not in (plain.model_extra or {})
    pk = steered.model_extra["personakern"]
    assert pk["traits"] == ["evil", "humorous"] and pk["layers"] == [6, 18, 29]
    n_out = steered.usage.completion_tokens
    assert pk["num_tokens"] == pk["prompt_length"] + n_out - 1 == steered.usage.prompt_tokens + n_out - 1
    assert len(pk["readings"]) == pk["num_tokens"] and len(pk["readings"][0]) == 3
    assert steered.choices[0].message.content != plain.choices[0].message.content
    # a second identical request (prefix cache warm) reads the same
    again = chat(client, SPEC)
    assert again.model_extra["personakern"] == pk


def test_stream_has_readings_on_its_last_chunk(client):
    full = chat(client, SPEC)
    chunks = list(chat(client, SPEC, stream=True))
    extras = [c.model_extra.get("personakern") for c in chunks]
    assert extras[-1] is not None and all(e is None for e in extras[:-1])
    assert extras[-1] == full.model_extra["personakern"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content


BAD = [
    ({"steer": [{"trait": "wicked", "alpha": 1.0, "layers": [3]}]}, "unknown trait 'wicked'"),
    ({"steer": [{"trait": "evil", "alpha": 1.0, "layers": [42]}]}, "layer 42 out of range"),
    ('{"steer": [{"trait": "evil", "alpha": NaN, "layers": [3]}]}', "alpha is not finite"),
    ('{"steer": [{"trait": "evil", "alpha": Infinity, "layers": [3]}]}', "alpha is not finite"),
    ({"steer": [{"trait": "evil", "alpha": 1.0, "positions": "sometimes"}]}, "positions must be one of"),
    ('{"steer": [{"trait": ', "not valid JSON"),
]


@pytest.mark.parametrize("spec,message", BAD)
def test_bad_spec_is_a_400_and_the_server_keeps_serving(client, spec, message):
    import openai
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, spec)
    assert err.value.status_code == 400
    assert message in str(err.value)
    ok = chat(client, max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_requests_without_spec_are_plain_vllm(client):
    """Completions of the same prompt tokens: the served plugin engine and a plain engine (no
    plugin) give the same tokens and bit-identical logprobs."""
    _, tok = _hf_model()
    ids = chat_ids(tok, ["How should I treat my coworkers?", "Tell me about cats."])
    served = [client.completions.create(model="smollm2", prompt=i, max_tokens=16, temperature=0, logprobs=0,
                                        extra_body={"return_tokens_as_token_ids": True}) for i in ids]
    job = {"model": smollm2_path(), "batches": [[{"ids": i, "max_tokens": 16}] for i in ids]}
    plain = run_script("plain_engine.py", {"PK_JOB": json.dumps(job)})["results"]
    for s, p in zip(served, plain):
        lp = s.choices[0].logprobs
        tokens = [int(t.split(":", 1)[1]) for t in lp.tokens]
        assert tokens == p["tokens"]
        assert lp.token_logprobs == p["logprobs"]
        assert not any(math.isnan(x) for x in lp.token_logprobs)


# ------------------------------------------------------------------------------ scoring requests
LONG = ("Describe, step by step and in plain words, how a bicycle's gears let a rider climb a steep hill "
        "without standing on the pedals, and what changes when the chain jumps to a larger sprocket. ") * 3


def score(client, ids, f, **kw):
    body = {"vllm_xargs": {"personakern_score": f}}
    body.update(kw.pop("extra_body", {}))
    return client.completions.create(model="smollm2", prompt=ids, max_tokens=1, temperature=0, extra_body=body, **kw)


def hf_logprobs(ids):
    """log P(token_i | < i) for i >= 1 from the Hugging Face model (float32, no engine)."""
    import torch
    model, _ = _hf_model()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_scoring_request_returns_its_prompt_logprobs(client):
    """A scored completion carries log P(token_i | < i) from position f on: equal to the same
    server's prompt_logprobs (1e-4 nats) and to Hugging Face's (2e-3); asked again, the rows the
    prefix cache served are null and the rest unchanged."""
    _, tok = _hf_model()
    ids = chat_ids(tok, [LONG + "(scored once)"])[0]
    f = 7
    first = score(client, ids, f).model_extra["personakern_scores"]
    assert first["start"] == f and len(first["logprobs"]) == len(ids) - f
    assert all(x is not None for x in first["logprobs"])   # a new prompt: nothing came from the cache
    ref = client.completions.create(model="smollm2", prompt=ids, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 0}).choices[0].model_extra["prompt_logprobs"]
    served = [ref[i][str(ids[i])]["logprob"] for i in range(f, len(ids))]
    assert max(abs(a - b) for a, b in zip(first["logprobs"], served)) < 1e-4
    hf = hf_logprobs(ids)[f - 1:]
    assert max(abs(a - b) for a, b in zip(first["logprobs"], hf)) < 2e-3
    again = score(client, ids, f).model_extra["personakern_scores"]["logprobs"]
    cached = sum(x is None for x in again)
    assert all(x is None for x in again[:cached]) and all(x is not None for x in again[cached:])
    assert again[cached:] == first["logprobs"][cached:]


def test_scores_of_several_prompts_stream_and_spec(client):
    """A completion of two prompts carries one object per prompt, in order; a chat stream carries
    them on its last data chunk; a request with a SPEC and a score gets readings and scores."""
    _, tok = _hf_model()
    a, b = chat_ids(tok, [LONG + "(pair a)", "Why do cats purr? (pair b)"])
    both = score(client, [a, b], 3).model_extra["personakern_scores"]
    assert [len(x["logprobs"]) for x in both] == [len(a) - 3, len(b) - 3]
    for got, ids in zip(both, (a, b)):
        ref = hf_logprobs(ids)[2:]
        assert max(abs(x - y) for x, y in zip(got["logprobs"], ref) if x is not None) < 2e-3
    xa = {"vllm_xargs": {"personakern_score": 2}}
    msgs = [{"role": "user", "content": "Name three rivers. (streamed score)"}]
    full = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=4, temperature=0,
                                          extra_body=xa).model_extra["personakern_scores"]
    chunks = list(client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=4, temperature=0,
                                                 stream=True, extra_body=xa))
    extras = [c.model_extra.get("personakern_scores") for c in chunks]
    assert all(e is None for e in extras[:-1]) and extras[-1]["start"] == 2
    assert len(extras[-1]["logprobs"]) == len(full["logprobs"])
    # the streamed request read the first one's blocks from the cache: its computed entries match
    assert all(x is None or x == y for x, y in zip(extras[-1]["logprobs"], full["logprobs"]))
    mixed = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=4, temperature=0,
                                           extra_body={"vllm_xargs": {"personakern": json.dumps(SPEC),
                                                                      "personakern_score": 1}})
    assert mixed.model_extra["personakern"]["traits"] == ["evil", "humorous"]
    assert mixed.model_extra["personakern_scores"]["start"] == 1


@pytest.mark.parametrize("value,extra,message", [
    (0, {}, "must be a positive integer"),
    ("2", {}, "must be a positive integer"),
    (1.5, {}, "must be a positive integer"),
    (-3, {}, "must be a positive integer"),   # (a JSON true arrives as 1: vLLM's field has no bool)
    (2, {"n": 2}, "needs n=1"),
])
def test_bad_scoring_request_is_a_400(client, value, extra, message):
    import openai
    _, tok = _hf_model()
    ids = chat_ids(tok, ["Hello."])[0]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt=ids, max_tokens=1, temperature=0,
                                  extra_body={"vllm_xargs": {"personakern_score": value}}, **extra)
    assert err.value.status_code == 400 and message in str(err.value)
    ok = chat(client, max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")
