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


def install_decoder_forward(decoder: nn.Module, state) -> None:
    """Wrap the decoder stack's forward so the state sees each forward's shape and mask first."""
    original = decoder.forward
    names = positional_names(original)

    def forward(*args, **kwargs):
        if args:
            kwargs.update(zip(names, args))
        ref = kwargs.get("input_ids")
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state.begin_forward(ref.shape[0], ref.shape[1], kwargs.get("attention_mask"), cache)
        return original(**kwargs)

    decoder.forward = forward


def install_layer_forward(layer: nn.Module, body: Callable, returns_tuple: bool) -> None:
    names = positional_names(layer.forward)[1:]  # first one is hidden_states

    checkpoint_here = not _CHECKPOINT_IN_CALL and hasattr(layer, "gradient_checkpointing")

    def forward(hidden_states, *args, **kwargs):
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


def restore_forward(module: nn.Module, previous) -> None:
    """Put back what ``module.__dict__['forward']`` held before patching (usually nothing)."""
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.__dict__["forward"] = previous
