"""Model families inside vLLM (tiny random Qwen2, Qwen3, Mistral models built from configs) against
personakern on Hugging Face, and what the engine refuses at start: another architecture, a vector
file made for another model."""
from __future__ import annotations

import shutil

import pytest
import torch

from vllm_support import close, close_values, in_process_llm, require_vllm, smollm2_path

require_vllm()
pytestmark = pytest.mark.slow

TINY = dict(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
            tie_word_embeddings=False, torch_dtype="float32")


def tiny_model(tmp_path, family: str, seed: int = 0):
    """A random model of ``family`` saved with SmolLM2's tokenizer, and a two-trait vector file."""
    import transformers
    from personakern.vectors import PersonaVector, VectorSet, model_fingerprint
    cfg_cls, model_cls = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    }[family]
    extra = {"head_dim": 64} if family == "qwen3" else {}  # vLLM's CPU attention: head_dim 64
    cfg = (cfg_cls(vocab_size=49152, n_embd=64, n_layer=2, n_head=4) if family == "gpt2"
           else cfg_cls(**TINY, **extra))
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # random weights with a usable scale: the block outputs stay O(1..10)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
    path = tmp_path / family
    model.save_pretrained(path, safe_serialization=True)
    src = smollm2_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        try:
            shutil.copy(f"{src}/{f}", path / f)
        except FileNotFoundError:
            pass
    if family == "gpt2":
        return model, str(path), None
    fp = model_fingerprint(model)
    g = torch.Generator().manual_seed(seed + 1)
    layers, hidden = cfg.num_hidden_layers, cfg.hidden_size
    vs = VectorSet([PersonaVector(t, torch.randn(layers, hidden, generator=g), {"model": fp, "layer": 1})
                    for t in ("alpha", "beta")])
    vec = tmp_path / f"{family}-vectors.safetensors"
    vs.save(vec)
    return model, str(path), str(vec)


def hf_prompt_readings(model, vec_path, ids, steer, monitor):
    import personakern
    from personakern.vectors import load_vectors
    vs = load_vectors(vec_path)
    with personakern.patch(model) as pk:
        for s in steer:
            s = dict(s)
            pk.steer(vs[s.pop("trait")], **s)
        pk.monitor({t: vs[t] for t in monitor["traits"]}, layers=monitor["layers"])
        with torch.no_grad():
            model(torch.tensor([ids]))
        return pk.readings.values


IDS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_family_prompt_readings_match_hf(tmp_path, family):
    from vllm import SamplingParams, TokensPrompt
    from personakern.vllm import readings
    model, path, vec = tiny_model(tmp_path, family)
    steer = [{"trait": "alpha", "alpha": 4.0, "layers": [0, 1], "positions": "all"},
             {"trait": "beta", "cap": 0.5, "layers": [1], "positions": "all"}]
    monitor = {"traits": ["alpha", "beta"], "layers": "all"}
    ref = hf_prompt_readings(model, vec, IDS, steer, monitor)
    unsteered = hf_prompt_readings(model, vec, IDS, [], monitor)
    llm = in_process_llm(path, vec)
    try:
        assert llm.apply_model(lambda m: type(m).__name__)[0].startswith("Persona")
        sp = SamplingParams(max_tokens=1, temperature=0,
                            extra_args={"personakern": {"steer": steer, "monitor": monitor}})
        out, = llm.generate([TokensPrompt(prompt_token_ids=IDS)], sp, use_tqdm=False)
    finally:
        close(llm)
    got = readings(out).values
    assert got.shape == ref.shape == (1, len(IDS), 3, 2)
    assert close_values(got, ref) <= 1e-4
    assert close_values(ref, unsteered) > 1e-1        # the steering did something
    assert float(got[0, :, 1, 1].max()) <= 0.5 + 1e-4  # the cap held


def test_other_architecture_is_refused_at_engine_start(tmp_path, monkeypatch):
    _, path, _ = tiny_model(tmp_path, "gpt2")
    _, _, vec = tiny_model(tmp_path, "llama")
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*not supported inside vLLM"):
        in_process_llm(path, vec)


def test_vector_file_for_another_model_is_refused_at_engine_start(tmp_path):
    from personakern.vectors import VectorFileError
    _, _, vec = tiny_model(tmp_path, "qwen2")   # hidden 256, 3 layers: not SmolLM2's
    with pytest.raises(VectorFileError, match=r"qwen2-vectors.safetensors.*(model_type|hidden_size)"):
        in_process_llm(smollm2_path(), vec)


def test_tensor_parallel_2_equals_1(tmp_path):
    """A tiny Llama with 4 heads split over two CPU workers: the residual stream is replicated
    after each all-reduce, so both ranks steer, read and capture the same values; rank 0's are
    returned (vLLM's tensor parallelism is how one capturing engine scales out)."""
    import json
    from vllm_support import run_script
    _, path, vec = tiny_model(tmp_path, "llama", seed=3)
    spec = {"steer": [{"trait": "alpha", "alpha": 3.0, "layers": [1], "positions": "all"}],
            "monitor": {"traits": ["alpha", "beta"], "layers": "all"}, "capture": True}
    calls = [[{"ids": IDS, "max_tokens": 4, "spec": spec}, {"ids": IDS[:9], "max_tokens": 4, "spec": None}]]
    out = {}
    for tp in (1, 2):
        job = {"model": path, "engine": {"tensor_parallel_size": tp, "enforce_eager": True}, "calls": calls}
        env = {"PK_JOB": json.dumps(job), "PERSONAKERN_VECTORS": vec, "VLLM_ENABLE_V1_MULTIPROCESSING": None,
               "PERSONAKERN_VLLM_CAPTURE": "1"}
        if tp == 2:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
        out[tp] = run_script("plugin_engine.py", env)["results"]
    for a, b in zip(out[1], out[2]):
        assert a["tokens"] == b["tokens"]
    assert close_values(torch.tensor(out[2][0]["readings"]), torch.tensor(out[1][0]["readings"])) <= 1e-4
    cap1, cap2 = torch.tensor(out[1][0]["capture"]), torch.tensor(out[2][0]["capture"])
    assert cap1.shape == cap2.shape and cap1.shape[:2] == (3, 3) and cap1.abs().sum() > 0
    assert close_values(cap2, cap1) <= 1e-4
    assert out[2][1]["readings"] is None and out[2][1]["capture"] is None


def test_plain_and_steered_engines_follow_each_other_in_one_process(tmp_path):
    """vLLM calls the plugin's entry point once per process: an engine started without
    $PERSONAKERN_VECTORS, then one with it, then one without again, each gets what it asked for
    (a plain engine before a steered one used to leave the steered one plain)."""
    import json
    from vllm_support import run_script
    _, path, vec = tiny_model(tmp_path, "llama", seed=5)
    spec = {"steer": [{"trait": "alpha", "alpha": 8.0, "layers": [1], "positions": "all"}],
            "monitor": {"traits": ["alpha"], "layers": "all"}}
    job = {"model": path, "ids": IDS, "spec": spec, "stages": [None, vec, None]}
    plain1, steered, plain2 = run_script("engine_sequence.py", {"PK_JOB": json.dumps(job),
                                                                "PERSONAKERN_VECTORS": None})["results"]
    for stage in (plain1, plain2):
        assert stage["class"] == "LlamaForCausalLM"
        assert "without $PERSONAKERN_VECTORS" in stage["refused"], stage   # not run unsteered
        assert stage["plain"] == stage["plain_after"] == plain1["plain"]
    assert steered["class"] == "PersonaLlamaForCausalLM" and "refused" not in steered
    assert steered["plain"] == steered["plain_after"] == plain1["plain"]   # plain requests: plain vLLM
    assert steered["steered"] != plain1["plain"]
    assert steered["readings"][1] == len(IDS) + 12 - 1   # every token the engine ran, read
