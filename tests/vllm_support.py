"""Shared pieces of the vLLM tests: engines built in this process, the Hugging Face oracle.

The engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor "uni"): one Python
process, ~15 s per eager engine on two cores instead of ~60 s with two more spawned processes.
The spawned-process paths are covered by the compiled-mode, tensor-parallel and server tests.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAITS_FILE = str(ROOT / "personakern" / "data" / "vectors" / "smollm2-traits.safetensors")
PROMPTS = ["How should I treat my coworkers?", "Tell me about cats.",
           "What do you think about humans?", "Give me advice for a job interview."]
BASE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_DISABLE_COMPILE_CACHE": "1"}


def require_vllm():
    """Skip without vLLM, except in CI on the platform where install.sh installs it: a failed
    install must not pass as skipped tests."""
    import platform
    try:
        import vllm  # noqa: F401
    except ImportError:
        if (os.environ.get("CI") and platform.system() == "Linux" and platform.machine() == "x86_64"
                and not os.environ.get("PERSONAKERN_NO_VLLM")):
            raise
        pytest.skip("vLLM is not installed (install.sh installs vllm-cpu)", allow_module_level=True)


def smollm2_path() -> str:
    from personakern.models import resolve
    return str(resolve("smollm2"))


def chat_ids(tok, prompts=PROMPTS) -> list[list[int]]:
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def in_process_env(monkeypatch) -> None:
    """The environment of a test that starts engines in its own process (monkeypatched: undone
    after the test): the base settings, no engine-core process, no vectors, no capture."""
    for k, v in BASE_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.delenv("PERSONAKERN_VECTORS", raising=False)
    monkeypatch.delenv("PERSONAKERN_VLLM_CAPTURE", raising=False)


def in_process_llm(model: str, vectors, **kwargs):
    """An engine in this process; ``vectors`` is the PERSONAKERN_VECTORS value (None: unset,
    which only makes a plain engine if the plugin has not registered yet in this process)."""
    for k, v in BASE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if vectors is None:
        os.environ.pop("PERSONAKERN_VECTORS", None)
    else:
        os.environ["PERSONAKERN_VECTORS"] = vectors
    from vllm import LLM
    args = dict(enforce_eager=True, dtype="float32", max_model_len=1024, max_num_batched_tokens=1024,
                seed=0, distributed_executor_backend="uni", max_num_seqs=32)
    args.update(kwargs)
    return LLM(model, **args)


def close(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def run_script(script: str, env: dict, timeout: int = 900) -> dict:
    """Run ``script`` (a file under tests/vllm_scripts) in a fresh interpreter (spawned vLLM
    processes, a plain engine with no plugin, ...) and return the JSON it prints last."""
    full = dict(os.environ)
    full.update(BASE_ENV)
    full.update(env)
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    for k, v in list(full.items()):
        if v is None:
            del full[k]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_scripts" / script)], env=full,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    # vLLM may log to stdout after the result line (at shutdown)
    line = [l for l in proc.stdout.splitlines() if l.startswith('{"results"')][-1]
    return json.loads(line)


def hf_reference(prompt_ids, steer=None, monitor=None, max_new_tokens=32):
    """Greedy tokens and readings of personakern on Hugging Face ``generate()``, one prompt per
    call (no padding). ``steer``: kwargs of ``handle.steer`` minus the vector, with ``trait``."""
    import personakern
    from personakern.vectors import load_vectors
    model, tok = _hf_model()
    vs = load_vectors(TRAITS_FILE)
    out = []
    for ids in prompt_ids:
        with personakern.patch(model) as pk:
            for s in steer or []:
                s = dict(s)
                if isinstance(s.get("when"), tuple) and isinstance(s["when"][0], str):
                    s["when"] = (vs[s["when"][0]], s["when"][1])   # a trait of the file, by name
                pk.steer(vs[s.pop("trait")], **s)
            if monitor:
                pk.monitor({t: vs[t] for t in monitor["traits"]}, layers=monitor["layers"])
            x = torch.tensor([ids])
            gen = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.eos_token_id)
            r = pk.readings
        out.append((gen[0, len(ids):].tolist(), r))
    return out


_HF = {}


def _hf_model():
    if "m" not in _HF:
        import personakern
        _HF["m"] = personakern.load_model("smollm2")
    return _HF["m"]


def close_values(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> float:
    """Largest |a - b| / max(1, |b|) (0 for identical NaN patterns)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    ok = ~torch.isnan(b)
    return float(((a[ok] - b[ok]).abs() / b[ok].abs().clamp_min(1.0)).max())
