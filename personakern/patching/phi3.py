"""Phi-3 decoder blocks: Llama-style with residual dropouts on both sublayer outputs
(identity in eval; kept so preventative steering trains the same graph as the original)."""
from __future__ import annotations

from .common import fuse_allowed, make_add_norm, make_norm

MODEL_TYPES = ("phi3",)


def make_forward(layer, state, index: int):
    input_norm = make_norm(state, layer.input_layernorm)
    add_norm = make_add_norm(state, layer.post_attention_layernorm)
    attn, mlp = layer.self_attn, layer.mlp
    drop_attn, drop_mlp = layer.resid_attn_dropout, layer.resid_mlp_dropout

    def body(hidden_states, kwargs):
        attn_out = attn(hidden_states=state.input_norm(hidden_states, input_norm), **kwargs)[0]
        normed, residual = add_norm(hidden_states, drop_attn(attn_out))
        return state.block_output(index, residual, drop_mlp(mlp(normed)), fuse_allowed(layer))

    return body
