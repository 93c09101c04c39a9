"""Shared fixtures: tiny random models of every supported family, and the real SmolLM2."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on the CPU under its interpreter; it must be set before triton is imported.
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass

import pytest
import torch
import transformers

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

# (config class, model class, extra config) per model_type; hidden 40 is not a multiple of
# any vector width, on purpose.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 10}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 10, "sliding_window": 8,
                                                     "query_pre_attn_scalar": 10}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 10, "sliding_window": 8,
                                                              "query_pre_attn_scalar": 10}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def tiny_model(family: str, seed: int = 0, layers: int = 3) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = dict(COMMON, **extra, num_hidden_layers=layers)
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    return _perturb_norms(model)


def _perturb_norms(model):
    """Random init leaves norm weights at exactly 1 (or 0 for Gemma): perturb them so a wrong
    norm formula cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_llama_for(tok, layers: int, seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama that speaks ``tok``'s vocabulary (for tests that generate or
    tokenize chat text with the real SmolLM2 tokenizer); norm weights perturbed."""
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=layers, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                      max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    return _perturb_norms(transformers.LlamaForCausalLM(config).eval())


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def usable_backends(device="cpu"):
    from personakern import ops
    return ops.available_backends(device)


# The Triton interpreter runs kernels in Python: one family per patch module keeps CI short.
INTERPRETED_FAMILIES = ("llama", "gemma2", "phi3")


@pytest.fixture(params=usable_backends())
def backend(request):
    """Every backend usable on this machine (native always; cpu once built; triton under the
    interpreter): the end-to-end equivalence tests run on each."""
    if request.param == "triton" and "family" in request.fixturenames:
        if request.getfixturevalue("family") not in INTERPRETED_FAMILIES and not _cuda():
            pytest.skip("interpreted Triton: covered by one family per patch module")
    return request.param


def _cuda():
    import torch
    return torch.cuda.is_available()


def padded_batch(lengths=(7, 4, 9), seed=1):
    """Left-padded ``input_ids``/``attention_mask`` with the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="session")
def smollm2():
    import personakern
    return personakern.load_model()


def run_process_group(cmd, timeout, **kw):
    """``subprocess.run(cmd, capture_output=True, text=True, ...)`` in a session of its own: on a
    timeout the whole process group is killed (torchrun's workers too, not just the launcher)."""
    import signal
    import subprocess
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session")
def tok():
    """SmolLM2's tokenizer, left-padding (a module may define its own ``tok``)."""
    from transformers import AutoTokenizer
    from personakern.models import resolve
    t = AutoTokenizer.from_pretrained(resolve("smollm2"))
    t.padding_side = "left"
    return t
