"""Model classes that put personakern's fused op in vLLM's decoder: Llama, Mistral, Qwen2, Qwen3.

vLLM's decoder layers pass ``(hidden, residual)`` on and fuse the residual add into the next
layer's input RMSNorm, so Hugging Face's block-``l`` output first exists inside layer ``l+1``'s
``input_layernorm(hidden, residual)`` (block ``L-1``'s inside the final norm). Those norms are
replaced by :class:`PersonaNorm`, which runs ``add_rms_norm_steer_project`` from the persistent
:class:`~personakern.vllm.tables.StepTables`. The tables are filled by the top-level ``forward``
(not compiled; it runs once per step) from the model runner's request map, and the step's
readings go to the host there, once, after the decoder ran.
"""
from __future__ import annotations

import os
import weakref
from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import ops as ops_dispatch
from .plan import build_plan
from .results import ReadingsStore
from .spec import SpecError, spec_of
from .tables import StepTables
from .capture import CaptureTables
from .scores import ScoreStore
from .vectors import engine_vectors

WHEN_SLOTS_ENV = "PERSONAKERN_VLLM_WHEN_SLOTS"


class PersonaNorm(nn.Module):
    """The fused residual-add + RMSNorm after block ``block``; holds the same ``weight``
    parameter (and name) as the norm it replaces, so checkpoints load unchanged."""

    def __init__(self, norm: nn.Module, block: int, tables: StepTables, capture: Optional[CaptureTables] = None):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)
        self.block = block
        self.tables = tables
        self.capture = capture

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        if residual is None:  # not a block output (first layer's input): plain norm
            return self.tables.ops.rms_norm(x, self.weight, self.variance_epsilon)
        normed, out = self.tables.apply(self.block, residual, x, self.weight, self.variance_epsilon)
        cap = self.capture
        # the compiled graph always holds the capture (a trace cannot branch per step); eager
        # mode skips it in steps where no request captures
        if cap is not None and (cap.step_active or torch.compiler.is_compiling()):
            cap.add(self.block, out)
        return normed, out


class PersonaEngine:
    """Per-engine state in a worker: vectors, tables, request plans and the readings store."""

    def __init__(self, vllm_config, device: torch.device, dtype: torch.dtype):
        hf_config = vllm_config.model_config.hf_config
        self.vectors = engine_vectors(hf_config)
        self.catalog = self.vectors.catalog
        self.gated_slots = int(os.environ.get(WHEN_SLOTS_ENV, str(self.vectors.num_traits)))
        sched = vllm_config.scheduler_config
        max_tokens = max(int(sched.max_num_batched_tokens), int(sched.max_num_seqs))
        self.ops = ops_dispatch.select_backend(device, dtype)
        self.tables = StepTables(self.vectors.vectors, max_tokens, self.gated_slots, device, self.ops)
        self.store = ReadingsStore(self.catalog.num_layers, self.catalog.columns)
        # capture slots: one per request the scheduler may run at once
        self.capture = CaptureTables(self.catalog.num_layers, self.vectors.vectors.shape[-1],
                                     int(sched.max_num_seqs), max_tokens, device) if self.catalog.capture else None
        self.scores = ScoreStore()
        self._runner = None
        self._plans: dict[str, tuple] = {}   # req id -> (extra_args object, plan or None)
        self._step = None                    # what end_step needs from begin_step

    def attach(self, runner) -> None:
        self._runner = weakref.ref(runner)

    # ------------------------------------------------------------------ per step
    def begin_step(self, num_tokens: int) -> None:
        runner = self._runner() if self._runner is not None else None
        self._step = None
        batch = getattr(runner, "input_batch", None)
        n_reqs = int(getattr(batch, "num_reqs", 0) or 0)
        if runner is None or n_reqs == 0 or int(runner.query_start_loc.np[n_reqs]) > num_tokens:
            # no request, or a dummy/profile run reusing stale runner state
            self.tables.fill([], np.zeros(0), np.zeros(0), np.zeros(0), num_tokens)
            if self.capture is not None:
                self.capture.fill([], [], np.zeros(0), np.zeros(0), np.zeros(0), num_tokens)
            self.scores.plan([], [], [], np.zeros(0), np.zeros(0))
            return
        qsl = np.asarray(runner.query_start_loc.np[:n_reqs + 1], dtype=np.int64)
        req_ids = list(batch.req_ids[:n_reqs])
        states = [runner.requests.get(rid) for rid in req_ids]
        plans = [self._plan(rid, st) for rid, st in zip(req_ids, states)]
        counts = np.diff(qsl)
        start = np.asarray(batch.num_computed_tokens_cpu[:n_reqs], dtype=np.int64)
        prompt = np.array([getattr(st, "num_prompt_tokens", 0) for st in states], dtype=np.int64)
        self.tables.fill(plans, counts, start, prompt, num_tokens)
        if self.capture is not None:
            self.capture.fill(req_ids, plans, counts, start, prompt, num_tokens)
        if any(p is not None and p.monitors for p in plans):
            self._step = (req_ids, plans, qsl, start, prompt)
        self.scores.plan(req_ids, [getattr(getattr(st, "sampling_params", None), "extra_args", None) for st in states],
                         [getattr(st, "prompt_token_ids", None) for st in states], counts, start)
        live = set(runner.requests)
        if len(self._plans) > len(live):
            for rid in [r for r in self._plans if r not in live]:
                del self._plans[rid]
        self.store.retire(live)
        self.scores.retire(live)
        if self.capture is not None:
            self.capture.retire(live)

    def set_trait(self, name: str, vectors: np.ndarray, layer) -> int:
        """A vector set while the engine runs (:func:`personakern.vllm.set_vector`): the trait's
        column (its own if ``name`` was set before, else the next free one)."""
        from .live import catalog_with
        self.catalog, t = catalog_with(self.catalog, name, vectors, layer)
        self.tables.set_trait(t, torch.from_numpy(np.array(vectors, dtype=np.float32)))
        self._plans.clear()
        return t

    def take_scores(self, ids) -> dict:
        return self.scores.take(ids)

    def take_capture(self, ids) -> dict:
        if self.capture is None:
            return {}
        return self.capture.take(ids)

    def end_step(self) -> None:
        if self._step is None:
            return
        req_ids, plans, qsl, start, prompt = self._step
        self._step = None
        used = int(qsl[-1])
        host = self.tables.readings[:, :used].to("cpu").numpy()  # the one host copy of the step
        for r, (rid, plan) in enumerate(zip(req_ids, plans)):
            if plan is None or not plan.monitors:
                continue
            a, b = int(qsl[r]), int(qsl[r + 1])
            self.store.record(rid, plan, int(prompt[r]), int(start[r]), host[:, a:b].transpose(1, 0, 2))

    def _plan(self, rid: str, state):
        params = getattr(state, "sampling_params", None)
        extra = getattr(params, "extra_args", None)
        cached = self._plans.get(rid)
        if cached is not None and cached[0] is extra:
            return cached[1]
        try:
            spec = spec_of(extra, self.catalog)
            plan = None if spec.empty else build_plan(spec, self.catalog, self.gated_slots)
        except SpecError:
            # validated where the request was accepted; a request that reached the worker
            # unvalidated (a custom entry point) runs plain rather than stopping the engine
            plan = None
        self._plans[rid] = (extra, plan)
        return plan


class PersonaModelMixin:
    """Put before a vLLM ``*ForCausalLM`` class: replaces the block-output norms, fills the
    tables once per step around the (possibly compiled) decoder."""

    personakern: PersonaEngine

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise ValueError("personakern inside vLLM does not support pipeline parallelism "
                             "(pipeline_parallel_size must be 1)")
        param = next(self.parameters())
        self.personakern = PersonaEngine(vllm_config, param.device, param.dtype)
        tables, capture = self.personakern.tables, self.personakern.capture
        decoder = self.model
        layers = decoder.layers
        n = len(layers)
        if n != self.personakern.catalog.num_layers:
            raise ValueError(f"personakern: the model has {n} decoder layers, the vectors "
                             f"{self.personakern.catalog.num_layers}")
        for i in range(1, n):
            layers[i].input_layernorm = PersonaNorm(layers[i].input_layernorm, i - 1, tables, capture)
        decoder.norm = PersonaNorm(decoder.norm, n - 1, tables, capture)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        ref = input_ids if input_ids is not None else inputs_embeds
        self.personakern.begin_step(int(ref.shape[0]))
        out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        self.personakern.end_step()
        # requests that score prompt tokens (scores.py): their rows' log-probabilities, eager
        self.personakern.scores.compute(out, self.compute_logits)
        return out


def _family(module: str, name: str):
    mod = __import__(f"vllm.model_executor.models.{module}", fromlist=[name])
    base = getattr(mod, name)
    return type(f"Persona{name}", (PersonaModelMixin, base), {"__module__": __name__,
                                                                "__qualname__": f"Persona{name}"})


_CLASSES: dict[str, type] = {}
FAMILIES = {"LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
            "MistralForCausalLM": ("mistral", "MistralForCausalLM"),
            "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
            "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM")}


def __getattr__(name: str):
    # vLLM's registry imports "personakern.vllm.model:PersonaLlamaForCausalLM" lazily; the
    # classes are built on first access so importing this module does not import every family
    if name.startswith("Persona") and name[len("Persona"):] in FAMILIES:
        arch = name[len("Persona"):]
        if arch not in _CLASSES:
            _CLASSES[arch] = _family(*FAMILIES[arch])
        return _CLASSES[arch]
    raise AttributeError(name)
