"""Pieces shared by the per-family patch modules.

Patching replaces methods, not hooks: each decoder layer gets an instance-level ``forward``
(shadowing the class method) and the decoder stack gets a thin ``forward`` that prepares the
per-forward state once. Unpatching deletes those instance attributes, which restores the
original bound methods exactly (the class was never touched).
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import nn

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # transformers < 4.52
    GradientCheckpointingLayer = None

# Up to transformers 5.2x ``GradientCheckpointingLayer.__call__`` checkpoints whatever
# ``forward`` it finds, ours included. From 5.24 the class wraps its own ``forward`` at class
# creation instead, which an instance-level forward bypasses, so we checkpoint ourselves.
_CHECKPOINT_IN_CALL = GradientCheckpointingLayer is None or "__call__" in GradientCheckpointingLayer.__dict__

ATTR = "_personakern_handle"

# RMSNorm classes whose arithmetic the fused ops reproduce (see backends.native.rms_norm).
# Any other norm module (a kernel-hub replacement, a user's own) is called as a module.
LLAMA_STYLE_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
GEMMA_STYLE_NORMS = {"Gemma2RMSNorm", "Gemma3RMSNorm"}


def norm_eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else norm.eps)


def norm_spec(norm: nn.Module):
    """``(module, eps, gemma)`` for an RMSNorm the fused ops reproduce exactly, else None."""
    name = type(norm).__name__
    if name in LLAMA_STYLE_NORMS or name in GEMMA_STYLE_NORMS:
        return norm, norm_eps(norm), name in GEMMA_STYLE_NORMS
    return None


def fuse_allowed(layer: nn.Module) -> bool:
    return not (layer.training and getattr(layer, "gradient_checkpointing", False))


def make_norm(state, norm: nn.Module) -> Callable:
    """A callable ``x -> norm(x)`` that uses the backend's fused RMSNorm when it is exact."""
    spec = norm_spec(norm)
    if spec is None:
        return norm
    _, eps, gemma = spec
    return lambda x: state.ops.rms_norm(x, norm.weight, eps, gemma)


def make_add_norm(state, norm: nn.Module) -> Callable:
    """A callable ``(residual, x) -> (norm(residual + x), residual + x)``."""
    spec = norm_spec(norm)
    if spec is not None:
        _, eps, gemma = spec
        return lambda residual, x: state.ops.add_rms_norm(residual, x, norm.weight, eps, gemma)

    def fallback(residual, x):
        r = residual + x
        return norm(r), r
    return fallback


def positional_names(fn: Callable) -> list[str]:
    """Parameter names of a bound method, to map stray positional arguments to keywords."""
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _cache_of(kwargs: dict, output):
    """The cache this forward used: the caller's, or the one the model created (its output's
    ``cache``, ``past_key_values`` up to transformers 5.2x)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None:
        return cache
    for name in ("cache", "past_key_values"):
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def install_decoder_forward(decoder: nn.Module, state) -> None:
    """Wrap the decoder stack's forward so the state sees each forward's shape, mask and cache
    first (and tags the cache after, see :mod:`personakern.sequence`)."""
    original = decoder.forward
    names = positional_names(original)

    def forward(*args, **kwargs):
        if args:
            kwargs.update(zip(names, args))
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        compiling = torch.compiler.is_compiling()
        if not compiling:  # dynamo cannot trace a lock; compiled callers are on their own
            state.guard.enter("a forward was called")
        try:
            state.begin_forward(ref.shape[0], ref.shape[1], kwargs.get("attention_mask"), cache,
                                kwargs.get("input_ids"))
            output = original(**kwargs)
            state.seq.end(_cache_of(kwargs, output))
            return output
        finally:
            if not compiling:
                state.guard.exit()

    decoder.forward = forward


def install_generate(model: nn.Module, state) -> None:
    """Wrap ``model.generate`` so each call is one sequence whose prompt is its input (see
    :mod:`personakern.sequence`): ``positions="response"`` then means the generated tokens,
    with or without a cache, however the prompt is prefilled."""
    original = model.generate

    def generate(*args, **kwargs):
        state.guard.enter("generate() was called")
        seq = state.seq
        outer = seq.generating
        try:
            prompt = args[0] if args else next((kwargs[k] for k in ("inputs", "input_ids", "inputs_embeds")
                                                if kwargs.get(k) is not None), None)
            if seq.pending is None:  # prompt lengths the caller gave explicitly win
                seq.new_sequence(prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2
                                 else None)
            seq.generating = True    # the first forward starts the sequence, the others continue it
            return original(*args, **kwargs)
        finally:
            seq.generating = outer
            state.guard.exit()

    model.generate = generate


def install_layer_forward(layer: nn.Module, body: Callable, returns_tuple: bool, state, index: int) -> None:
    names = positional_names(layer.forward)[1:]  # first one is hidden_states

    checkpoint_here = not _CHECKPOINT_IN_CALL and hasattr(layer, "gradient_checkpointing")

    def forward(hidden_states, *args, **kwargs):
        if state.skips(index):  # a capture that reads no logits needs no block after its deepest
            return (hidden_states,) if returns_tuple else hidden_states
        if args:
            kwargs.update(zip(names, args))
        if checkpoint_here and layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            # what transformers does for its own layers: no cache inside a checkpointed block
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
            kwargs["use_cache"] = False
            out = layer._gradient_checkpointing_func(functools.partial(body, kwargs=kwargs), hidden_states)
        else:
            out = body(hidden_states, kwargs)
        return (out,) if returns_tuple else out

    layer.forward = forward


def restore_forward(module: nn.Module, previous, name: str = "forward") -> None:
    """Put back what ``module.__dict__[name]`` held before patching (usually nothing)."""
    if previous is None:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = previous
