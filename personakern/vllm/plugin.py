"""The ``vllm.general_plugins`` entry point: what personakern installs in each vLLM process.

vLLM calls :func:`register` once in every process it starts (the one that accepts requests, the
engine core, each worker) before any model is built. It installs the patches below; each one
looks at ``$PERSONAKERN_VECTORS`` when an engine is created, so that an engine started without it
is plain vLLM (a request carrying a SPEC is refused with a clear error instead of running
unsteered), whatever engines the same process started before. With it:

- the four supported architectures resolve to personakern's model classes (``model.py``);
- a worker refuses to start if the built model is not one of them, and answers
  ``collective_rpc("personakern_take_readings", ids)``;
- the accepting process loads and checks the vectors when the engine is created (a bad file or an
  unsupported architecture: the engine does not start), validates every request's SPEC before it
  is queued (a bad one raises ``SpecError``, i.e. ``ValueError``, for that request only), salts the
  prefix cache of steered requests with their steering config and lets monitored requests compute
  every token (no prefix-cache reads), so steering and read-outs always start at token 0;
- ``LLM.generate``/``chat`` fetch the readings of their monitored requests in one call and attach
  them to the outputs (:func:`personakern.vllm.readings`); the server gets them per request
  (``server.py``).

The patches are applied once per process (a plain engine and a steered one may follow each other
in one process: the architectures are pointed at personakern's classes or back at vLLM's each
time an engine is created) and wrap vLLM 0.32's methods by name; nothing is patched
when the names are missing (another vLLM version): the failure is then loud at engine start.
"""
from __future__ import annotations

import functools
import logging
from collections import OrderedDict

from .results import RPC_TAKE
from .capture import RPC_TAKE_CAPTURE
from .scores import RPC_TAKE_SCORES
from .live import RPC_SET_TRAIT
from .vectors import SUPPORTED_ARCHITECTURES, check_architecture, engine_vectors, plugin_wanted

log = logging.getLogger("personakern.vllm")
_patched = False
_originals: dict = {}   # architecture -> vLLM's own registry entry, restored for a plain engine


def register() -> None:
    """vLLM's entry point, called once per process: installs the patches (each does nothing for
    an engine started without ``$PERSONAKERN_VECTORS``) and a hook that settles, each time an
    engine is created, whether the supported architectures resolve to personakern's classes. So
    a process may start a plain engine first and a steered one later, or the other way round
    (vLLM calls this entry point only once per process, however many engines it starts)."""
    global _patched
    if _patched:
        return
    _patched = True
    _patch_engine_args()
    _patch_worker()
    _patch_input_processor()
    _patch_offline()
    from . import server
    server.patch()
    sync_architectures()


def sync_architectures() -> None:
    """Point the supported architectures at personakern's classes if ``$PERSONAKERN_VECTORS`` is
    set now, back at vLLM's own classes if not."""
    from vllm import ModelRegistry
    models = getattr(ModelRegistry, "models", None)
    if models is None:   # another vLLM: register and never restore
        if plugin_wanted():
            for arch in SUPPORTED_ARCHITECTURES:
                ModelRegistry.register_model(arch, f"personakern.vllm.model:Persona{arch}")
        return
    want = plugin_wanted()
    if want == bool(_originals):
        return
    if want:
        for arch in SUPPORTED_ARCHITECTURES:
            _originals[arch] = models.get(arch)
            ModelRegistry.register_model(arch, f"personakern.vllm.model:Persona{arch}")
    else:
        for arch, entry in _originals.items():
            if entry is None:
                models.pop(arch, None)
            else:
                models[arch] = entry
        _originals.clear()
    try:   # vLLM caches the class it resolved per model folder
        from vllm.model_executor.model_loader import utils as loader_utils
        loader_utils._MODEL_ARCH_BY_HASH.clear()
    except (ImportError, AttributeError):
        pass


def _patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs
    original = EngineArgs.create_engine_config

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        sync_architectures()   # before vLLM resolves the architecture
        return original(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config


# ---------------------------------------------------------------------------- worker side
def _patch_worker() -> None:
    from vllm.v1.worker import gpu_worker, worker_base
    original = gpu_worker.Worker.load_model

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        from .model import PersonaModelMixin
        model = _persona_model(self.model_runner.get_model())
        if not isinstance(model, PersonaModelMixin):
            if not plugin_wanted():
                return out   # a plain engine
            raise RuntimeError(f"personakern: $PERSONAKERN_VECTORS or $PERSONAKERN_VLLM_CAPTURE is set but the model class is "
                               f"{type(model).__name__}, not a personakern class; supported architectures: "
                               f"{list(SUPPORTED_ARCHITECTURES)}")
        model.personakern.attach(self.model_runner)
        return out

    gpu_worker.Worker.load_model = load_model
    setattr(worker_base.WorkerBase, RPC_TAKE, _take_readings)
    setattr(worker_base.WorkerBase, RPC_TAKE_CAPTURE, _take_capture)
    setattr(worker_base.WorkerBase, RPC_TAKE_SCORES, _take_scores)
    setattr(worker_base.WorkerBase, RPC_SET_TRAIT, _set_trait)


def _persona_model(model):
    # on GPUs the runner may hand out a wrapper (CUDA-graph / compile wrappers keep the module
    # as .runnable or .model)
    for _ in range(4):
        if hasattr(model, "personakern"):
            return model
        model = getattr(model, "runnable", None) or getattr(model, "model", None)
        if model is None:
            break
    return model


def _take_readings(self, ids):
    model = _persona_model(self.model_runner.get_model())
    return model.personakern.store.take(list(ids))


def _set_trait(self, name, data, shape, layer):
    import numpy as np
    model = _persona_model(self.model_runner.get_model())
    return model.personakern.set_trait(name, np.frombuffer(data, dtype=np.float32).reshape(shape), layer)


def _take_capture(self, ids):
    model = _persona_model(self.model_runner.get_model())
    return model.personakern.take_capture(list(ids))


def _take_scores(self, ids):
    model = _persona_model(self.model_runner.get_model())
    return model.personakern.take_scores(list(ids))


# ---------------------------------------------------------------------------- accepting side
class _Monitored:
    """Request ids (external) whose SPEC monitors or captures, or that score prompt tokens,
    bounded: only to know what to fetch. ``pop`` answers ``(monitors, captures, scores)``."""

    def __init__(self, keep: int = 65536):
        self.ids: "OrderedDict[str, tuple]" = OrderedDict()
        self.keep = keep

    def add(self, rid: str, monitors: bool = True, captures: bool = False, scores: bool = False) -> None:
        old = self.ids.pop(rid, (False, False, False))
        self.ids[rid] = (old[0] or monitors, old[1] or captures, old[2] or scores)
        while len(self.ids) > self.keep:
            self.ids.popitem(last=False)

    def pop(self, rid: str) -> tuple:
        return self.ids.pop(rid, (False, False, False))


def _patch_input_processor() -> None:
    from vllm.v1.engine.input_processor import InputProcessor
    init, process = InputProcessor.__init__, InputProcessor.process_inputs

    @functools.wraps(init)
    def __init__(self, vllm_config, *args, **kwargs):
        self.personakern_catalog = self.personakern_monitored = None
        if plugin_wanted():
            hf_config = vllm_config.model_config.hf_config
            check_architecture(hf_config)
            self.personakern_catalog = engine_vectors(hf_config).catalog
            self.personakern_monitored = _Monitored()
        init(self, vllm_config, *args, **kwargs)

    @functools.wraps(process)
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        spec = _validated_spec(self, params)
        scores = validated_score(self, params)
        request = process(self, request_id, prompt, params, *args, **kwargs)
        if spec is not None:
            _mark(self, request, spec)
        if scores:
            self.personakern_monitored.add(request.request_id, False, False, True)
        return request

    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs


def _validated_spec(processor, params):
    from .spec import KEY, no_vectors_error, parse_spec
    extra = getattr(params, "extra_args", None)
    if not extra or KEY not in extra:
        return None
    if processor.personakern_catalog is None:
        raise no_vectors_error()
    spec = parse_spec(extra[KEY], processor.personakern_catalog)
    from .plan import build_plan
    from .model import WHEN_SLOTS_ENV
    import os
    build_plan(spec, processor.personakern_catalog,
               int(os.environ.get(WHEN_SLOTS_ENV, str(processor.personakern_catalog.columns))))
    if getattr(params, "n", 1) != 1 and (spec.monitors or spec.captures):
        raise ValueError("personakern: monitoring and capture need n=1 (one sequence per request)")
    return spec


def validated_score(processor, params) -> bool:
    """Whether the request scores prompt tokens (``scores.py``); a bad value, or an engine that
    does not run personakern's model classes, raises ``ValueError``. The server checks its
    requests with it too, before they reach the engine."""
    from .scores import SCORE_KEY, score_start
    if score_start(getattr(params, "extra_args", None)) is None:
        return False
    if getattr(processor, "personakern_catalog", None) is None:
        raise ValueError(f"personakern: {SCORE_KEY} needs an engine that runs personakern's model classes "
                         f"(started with $PERSONAKERN_VECTORS, $PERSONAKERN_VLLM_CAPTURE=1 or spare trait columns)")
    if getattr(params, "n", 1) != 1:
        raise ValueError(f"personakern: {SCORE_KEY} needs n=1 (one sequence per request)")
    return True


def _mark(processor, request, spec) -> None:
    from .spec import KEY
    params = request.params
    # the worker gets the canonical form: JSON text from HTTP becomes the validated object
    params.extra_args = dict(params.extra_args or {})
    params.extra_args[KEY] = spec.to_json()
    salt = spec.steering_salt()
    if salt is not None:
        request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
    if spec.monitors or spec.captures:
        params.skip_reading_prefix_cache = True
        processor.personakern_monitored.add(request.request_id, spec.monitors, spec.captures)


# ---------------------------------------------------------------------------- offline results
def _patch_offline() -> None:
    from vllm.entrypoints.llm import LLM
    original = LLM._run_engine

    @functools.wraps(original)
    def _run_engine(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        try:
            attach_readings(self, outputs)
        except Exception:  # the generated outputs must not be lost to a failed fetch
            log.exception("personakern: fetching readings failed")
        return outputs

    LLM._run_engine = _run_engine


def runs_personakern(llm) -> bool:
    """Whether the offline engine ``llm`` runs personakern's model classes (it takes SPECs and
    scoring requests and hands their results back)."""
    return _monitored(llm) is not None


def _monitored(llm):
    processor = getattr(getattr(llm, "llm_engine", None), "input_processor", None)
    return getattr(processor, "personakern_monitored", None)


def attach_readings(llm, outputs) -> None:
    from .results import first_rank, to_readings
    monitored = _monitored(llm)
    if monitored is None:
        return
    from .capture import to_capture
    from .scores import to_scores
    wants = {o.request_id: monitored.pop(o.request_id) for o in outputs}
    # readings (monitored requests), captured means and scores, each fetched with one call if any
    for which, rpc, convert, attr in ((0, RPC_TAKE, to_readings, "personakern"),
                                      (1, RPC_TAKE_CAPTURE, to_capture, "personakern_capture"),
                                      (2, RPC_TAKE_SCORES, to_scores, "personakern_scores")):
        ids = [r for r, want in wants.items() if want[which]]
        if not ids:
            continue
        got = first_rank(llm.collective_rpc(rpc, args=(ids,)))
        for o in outputs:
            if o.request_id in got:
                setattr(o, attr, convert(got[o.request_id]))
