"""Llama-style decoder blocks: Llama (SmolLM2), Mistral, Qwen2, Qwen3.

    r = h + attn(norm1(h));  out = r + mlp(norm2(r))

The mid-block add and ``norm2`` become one ``add_rms_norm``; the block output is one fused op
(residual add + steering + read-out + the *next* block's ``norm1``, see ``PersonaState``).
"""
from __future__ import annotations

from .common import fuse_allowed, make_add_norm, make_norm

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def make_forward(layer, state, index: int):
    input_norm = make_norm(state, layer.input_layernorm)
    add_norm = make_add_norm(state, layer.post_attention_layernorm)
    attn, mlp = layer.self_attn, layer.mlp

    def body(hidden_states, kwargs):
        attn_out = attn(hidden_states=state.input_norm(hidden_states, input_norm), **kwargs)[0]
        normed, residual = add_norm(hidden_states, attn_out)
        return state.block_output(index, residual, mlp(normed), fuse_allowed(layer))

    return body
