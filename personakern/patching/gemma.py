"""Gemma 2 / Gemma 3 decoder blocks: "sandwich" norms around both sublayers.

    r = h + norm_post_attn(attn(norm_in(h)));  out = r + norm_post_ff(mlp(norm_pre_ff(r)))

Gemma's RMSNorm multiplies by ``1 + w`` in fp32 (the ``gemma=True`` flag of the ops). The
sublayer outputs are normalised before the residual add, so the add cannot be fused into the
preceding norm; the block output is still one ``steer_project``.
"""
from __future__ import annotations

from .common import fuse_allowed, make_add_norm, make_norm

MODEL_TYPES = ("gemma2", "gemma3_text")


def make_forward(layer, state, index: int):
    input_norm = make_norm(state, layer.input_layernorm)
    post_attn_norm = make_norm(state, layer.post_attention_layernorm)
    pre_ff = make_add_norm(state, layer.pre_feedforward_layernorm)
    post_ff_norm = make_norm(state, layer.post_feedforward_layernorm)
    attn, mlp = layer.self_attn, layer.mlp
    select_rope = _rope_selector(layer)

    def body(hidden_states, kwargs):
        select_rope(kwargs)
        attn_out = attn(hidden_states=state.input_norm(hidden_states, input_norm), **kwargs)[0]
        normed, residual = pre_ff(hidden_states, post_attn_norm(attn_out))
        return state.block_output(index, residual, post_ff_norm(mlp(normed)), fuse_allowed(layer))

    return body


def _rope_selector(layer):
    """transformers 4.5x passes Gemma 3 layers both rotary tables and lets the layer pick one."""
    def select(kwargs):
        if "position_embeddings_global" in kwargs:
            glob = kwargs.pop("position_embeddings_global")
            local = kwargs.pop("position_embeddings_local")
            kwargs["position_embeddings"] = local if layer.self_attn.is_sliding else glob
    return select
