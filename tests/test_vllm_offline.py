"""personakern inside vLLM, offline, eager mode: SmolLM2 against two independent references.

- personakern on Hugging Face ``generate()`` (the package's own path): greedy tokens must be
  identical; readings agree to what vLLM's kernels allow against Hugging Face's (a plain vLLM
  engine differs from HF by the same amount: see ``test_oracle_matches_hf_as_closely``);
- a plain vLLM engine with forward hooks that steer and record block outputs (no plugin loaded):
  readings within 2e-4 x max(1, |x|), plain requests bit-identical.
"""
from __future__ import annotations

import math

import pytest
import torch

from vllm_support import (PROMPTS, TRAITS_FILE, _hf_model, chat_ids, close, close_values, hf_reference,
                          in_process_llm, require_vllm, run_script, smollm2_path)

require_vllm()
pytestmark = pytest.mark.slow

MON = {"traits": ["evil", "humorous"], "layers": [6, 18, 29]}
HF_REL = 2e-3   # vLLM's own kernels vs Hugging Face's, measured 3.5e-4 at block 29 (fp32)
ORACLE_REL = 2e-4  # measured 1e-5 .. 8.1e-5 (fp32), depending on what ran before in the process (thread state): see docs/vllm.md
COMPILED_REL = 5e-4  # compiled vs eager: inductor's fused graph rounds differently (measured 1.9e-4 after 30 blocks)


def steer18(alpha):
    return {"trait": "evil", "alpha": alpha, "layers": [18], "positions": "response"}


# the 8 configs of one batch: traits, alphas, positions, cap, when, ablation, monitor-only, 2 plain
MIXED = [
    {"steer": [{"trait": "evil", "alpha": 4.0, "layers": [10, 18], "positions": "response"}],
     "monitor": {"traits": ["evil"], "layers": [18, 29]}},
    {"steer": [{"trait": "humorous", "alpha": 2.5, "layers": [6], "positions": "all"}],
     "monitor": {"traits": "all", "layers": [6]}},
    {"steer": [{"trait": "evil", "cap": -25.0, "layers": [18, 20], "positions": "all"}],
     "monitor": {"traits": ["evil"], "layers": [18, 20]}},
    {"steer": [{"trait": "evil", "alpha": 6.0, "layers": [18], "positions": "response",
                "when": {"trait": "evil", "threshold": -30.0}}],
     "monitor": {"traits": ["evil"], "layers": [18]}},
    {"steer": [{"trait": "sycophantic", "ablate": True, "layers": [12], "positions": "prompt"},
               {"trait": "optimistic", "alpha": -3.0, "layers": [14]}],
     "monitor": {"traits": ["sycophantic", "optimistic"], "layers": [12, 14]}},
    {"monitor": {"traits": "all", "layers": "all"}},
    None,
    {},
]


@pytest.fixture(scope="module")
def ids():
    _, tok = _hf_model()
    return chat_ids(tok, PROMPTS + ["Write a short poem about the sea.", "What is your biggest fear?",
                                    "How do I bake bread?", "Why is the sky blue?"])


@pytest.fixture(scope="module")
def oracle(ids):
    """The plain engine with hooks, started once in a fresh interpreter for every job below."""
    singles = [[{"ids": i, "max_tokens": 32, "steer": [dict(steer18(a), layer=18)], "monitor": MON}]
               for a in (3.0, -3.0) for i in ids[:2]]
    plain_batch = [[{"ids": i, "max_tokens": 16, "ignore_eos": True} for i in ids]]
    job = {"model": smollm2_path(), "vectors": TRAITS_FILE, "batches": singles + plain_batch}
    import json
    res = run_script("plain_engine.py", {"PK_JOB": json.dumps(job)})["results"]
    return {"singles": res[:4], "plain_batch": res[4:]}


@pytest.fixture(scope="module")
def llm():
    engine = in_process_llm(smollm2_path(), TRAITS_FILE)
    yield engine
    close(engine)


def generate(llm, ids, specs, max_tokens=32, ignore_eos=False):
    from vllm import SamplingParams, TokensPrompt
    sps = [SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=ignore_eos,
                          extra_args=None if s is None else {"personakern": s}) for s in specs]
    return llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], sps, use_tqdm=False)


def logprobs(out):
    c = out.outputs[0]
    return [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]


def test_steering_and_readings_match_hf_and_the_hook_oracle(llm, ids, oracle):
    from personakern.vllm import readings
    for k, alpha in enumerate((3.0, -3.0)):
        ref = hf_reference(ids[:4], steer=[steer18(alpha)], monitor=MON)
        outs = generate(llm, ids[:4], [{"steer": [steer18(alpha)], "monitor": MON}] * 4)
        for j, (out, (hf_tokens, hf_r)) in enumerate(zip(outs, ref)):
            tokens = list(out.outputs[0].token_ids)
            assert tokens == hf_tokens, (alpha, j)
            r = readings(out)
            assert r.traits == MON["traits"] and r.layers == MON["layers"]
            assert r.values.shape == (1, len(ids[j]) + 32 - 1, 3, 2)
            assert int(r.prompt_lengths[0]) == len(ids[j])
            assert close_values(r.values, hf_r.values) <= HF_REL
            if j < 2:
                hooked = oracle["singles"][2 * k + j]
                assert hooked["tokens"] == tokens
                assert close_values(r.values[0], torch.tensor(hooked["readings"])) <= ORACLE_REL


def test_oracle_matches_hf_as_closely(ids, oracle):
    """The tolerance against Hugging Face is vLLM's, not personakern's: the plugin-free engine
    with hooks is as far from HF as the plugin is."""
    ref = hf_reference(ids[:1], steer=[steer18(3.0)], monitor=MON)
    (_, hf_r), = ref
    hooked = torch.tensor(oracle["singles"][0]["readings"])
    err = close_values(hooked, hf_r.values[0])
    assert 1e-6 < err <= HF_REL


def test_mixed_batch_equals_each_request_alone_and_plain_is_bit_identical(llm, ids, oracle):
    from personakern.vllm import readings
    together = generate(llm, ids, MIXED, max_tokens=16, ignore_eos=True)
    for j, spec in enumerate(MIXED):
        alone, = generate(llm, [ids[j]], [spec], max_tokens=16, ignore_eos=True)
        assert list(together[j].outputs[0].token_ids) == list(alone.outputs[0].token_ids), j
        if spec and "monitor" in spec:
            assert close_values(readings(together[j]).values, readings(alone).values, ORACLE_REL) <= 1e-4, j
        else:
            assert readings(together[j]) is None
    for j in (6, 7):  # plain requests beside six steered ones = a plain engine's same batch
        plain = oracle["plain_batch"][j]
        assert list(together[j].outputs[0].token_ids) == plain["tokens"]
        assert logprobs(together[j]) == plain["logprobs"]
    # the configs did something, and what each promises
    for j in range(5):
        assert list(together[j].outputs[0].token_ids) != oracle["plain_batch"][j]["tokens"], j
    capped = readings(together[2]).values
    assert float(capped.max()) <= -25.0 + 1e-3
    ablated = readings(together[4])
    prompt_len = int(ablated.prompt_lengths[0])
    syc = ablated.get("sycophantic", layer=12)[0]
    assert float(syc[:prompt_len].abs().max()) < 1e-3     # ablated on prompt tokens ...
    assert float(syc[prompt_len:].abs().min()) > 1e-2     # ... only
    full = readings(together[5])
    assert full.values.shape[2:] == (30, 7)


def test_conditional_cap_and_ablation_match_hf(llm, ids):
    """Tokens of the cap, when= and ablation configs equal personakern on Hugging Face."""
    cases = {2: [{"trait": "evil", "cap": -25.0, "layers": [18, 20], "positions": "all"}],
             3: [{"trait": "evil", "alpha": 6.0, "layers": [18], "positions": "response",
                  "when": ("evil", -30.0)}],
             4: [{"trait": "sycophantic", "ablate": True, "layers": [12], "positions": "prompt"},
                 {"trait": "optimistic", "alpha": -3.0, "layers": [14]}]}
    for j, steer in cases.items():
        (hf_tokens, _), = hf_reference([ids[j]], steer=steer, max_new_tokens=16)
        out, = generate(llm, [ids[j]], [{"steer": MIXED[j]["steer"]}], max_tokens=16)
        assert list(out.outputs[0].token_ids) == hf_tokens, j


BAD = [
    ({"steer": [{"trait": "wicked", "alpha": 1.0, "layers": [3]}]}, "unknown trait 'wicked'"),
    ({"steer": [{"trait": "evil", "alpha": 1.0, "layers": [30]}]}, "layer 30 out of range"),
    ({"steer": [{"trait": "evil", "alpha": math.nan, "layers": [3]}]}, "alpha is not finite"),
    ({"steer": [{"trait": "evil", "alpha": math.inf, "layers": [3]}]}, "alpha is not finite"),
    ({"steer": [{"trait": "evil", "alpha": 1.0, "positions": "middle"}]}, "positions must be one of"),
    ('{"steer": [', "not valid JSON"),
    ({"monitor": {"traits": ["evil"], "layers": [-31]}}, "layer -31 out of range"),
    ({"steer": [{"trait": "evil", "cap": 1.0, "ablate": True}]}, "cap and ablate exclude each other"),
]


@pytest.mark.parametrize("spec,message", BAD)
def test_bad_spec_is_refused_and_the_engine_carries_on(llm, ids, spec, message):
    from personakern.vllm import SpecError
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        generate(llm, ids[:2], [None, spec], max_tokens=2)
    assert not llm.llm_engine.has_unfinished_requests()   # the good request was not left behind
    out, = generate(llm, ids[:1], [None], max_tokens=2)
    assert len(out.outputs[0].token_ids) == 2


def long_prompt(tok, n=300):
    text = " ".join(f"Item {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    assert len(ids) == n
    return ids


def test_prefix_cache_never_leaks_between_steering_configs(llm):
    from personakern.vllm import readings
    _, tok = _hf_model()
    ids = long_prompt(tok)
    spec = {"steer": [{"trait": "evil", "alpha": 3.0, "layers": [4], "positions": "all"}],
            "monitor": {"traits": ["evil"], "layers": [4, 20]}}
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    llm.reset_prefix_cache()
    plain1, = generate(llm, [ids], [None], max_tokens=8)
    steered, = generate(llm, [ids], [spec], max_tokens=8)          # same 300 tokens, cache warm
    assert steered.num_cached_tokens == 0
    llm.reset_prefix_cache()
    cold, = generate(llm, [ids], [spec], max_tokens=8)
    assert list(steered.outputs[0].token_ids) == list(cold.outputs[0].token_ids)
    assert torch.equal(readings(steered).values, readings(cold).values)
    # steered from token 0: the first prompt token already carries the shift at block 4
    plain_r, = generate(llm, [ids], [{"monitor": spec["monitor"]}], max_tokens=8)
    shift = readings(steered).get("evil", layer=4)[0] - readings(plain_r).get("evil", layer=4)[0]
    assert float(shift[0]) > 1.0
    # the steered blocks are not served to a plain request, nor plain ones to a steered one
    plain2, = generate(llm, [ids], [None], max_tokens=8)
    assert plain2.num_cached_tokens > 0
    assert list(plain2.outputs[0].token_ids) == list(plain1.outputs[0].token_ids)
    assert logprobs(plain2) == logprobs(plain1)
    steer_only = {"steer": spec["steer"]}
    a, = generate(llm, [ids], [steer_only], max_tokens=8)
    b, = generate(llm, [ids], [steer_only], max_tokens=8)   # same config: its own blocks are reusable
    assert b.num_cached_tokens > 0
    assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids) == list(cold.outputs[0].token_ids)


def test_chunked_prefill_equals_the_unsplit_prompt(llm):
    from personakern.vllm import readings
    _, tok = _hf_model()
    ids = long_prompt(tok)
    spec = {"steer": [{"trait": "evil", "alpha": 3.0, "layers": [4], "positions": "all"},
                      {"trait": "humorous", "alpha": 2.0, "layers": [8], "positions": "response"}],
            "monitor": {"traits": ["evil", "humorous"], "layers": [4, 8, 29]}}
    import json
    whole, = generate(llm, [ids], [spec], max_tokens=8, ignore_eos=True)
    # a second engine in a fresh interpreter: closing an in-process engine tears down vLLM's
    # process-wide parallel state under the module's engine
    job = {"model": smollm2_path(), "calls": [[{"ids": ids, "max_tokens": 8, "spec": spec}]],
           "engine": {"enforce_eager": True, "max_num_batched_tokens": 64, "max_num_seqs": 4}}
    split, = run_script("plugin_engine.py", {"PK_JOB": json.dumps(job), "PERSONAKERN_VECTORS": TRAITS_FILE,
                                             "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})["results"]
    assert split["tokens"] == list(whole.outputs[0].token_ids)
    assert close_values(torch.tensor(split["readings"]), readings(whole).values[0]) <= 1e-4


def test_compiled_mode_equals_eager(llm, ids):
    """vLLM's default mode traces the model once at engine start: the tables exist before the
    trace and are refilled every step, so steering changed between calls (another alpha, another
    trait) reaches the compiled graph. Spawned processes, as shipped."""
    import json
    from personakern.vllm import readings
    calls = [[{"ids": ids[0], "max_tokens": 12, "spec": {"steer": [steer18(3.0)], "monitor": MON}},
              {"ids": ids[1], "max_tokens": 12, "spec": {"monitor": MON}},
              {"ids": ids[2], "max_tokens": 12, "spec": None}],
             [{"ids": ids[0], "max_tokens": 12, "spec": {"steer": [steer18(-3.0)], "monitor": MON}},
              {"ids": ids[1], "max_tokens": 12,
               "spec": {"steer": [{"trait": "humorous", "alpha": 4.0, "layers": [6, 7]}], "monitor": MON}}]]
    job = {"model": smollm2_path(), "engine": {}, "calls": calls}
    compiled = run_script("plugin_engine.py", {"PK_JOB": json.dumps(job), "PERSONAKERN_VECTORS": TRAITS_FILE,
                                               "VLLM_ENABLE_V1_MULTIPROCESSING": None})["results"]
    eager = [o for call in calls for o in generate(llm, [r["ids"] for r in call], [r["spec"] for r in call],
                                                    max_tokens=12, ignore_eos=True)]
    for c, e in zip(compiled, eager):
        assert c["tokens"] == list(e.outputs[0].token_ids)
        r = readings(e)
        assert (c["readings"] is None) == (r is None)
        if r is not None:
            assert close_values(torch.tensor(c["readings"]), r.values[0]) <= COMPILED_REL
    assert compiled[0]["tokens"] != compiled[3]["tokens"]   # +3 and -3 differ: the values reached the graph
