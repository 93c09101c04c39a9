"""Independent references: plain forward hooks on an unpatched model."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def hook_edit(model, layer, edit, attention_mask, positions="all"):
    """Replace block ``layer``'s output ``h`` [B, T, D] by ``edit(h)`` at the tokens selected by
    ``positions``, never at padding, the way a user would with a hook: the first call is the
    prompt (padding from ``attention_mask``), every later call one generated token."""
    calls = {"n": 0}

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        prompt = calls["n"] == 0
        calls["n"] += 1
        if prompt:
            mask = attention_mask[:, -out.shape[1]:].bool().to(out.device)
        else:
            mask = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
        on = positions == "all" or (positions == "prompt") == prompt
        new = torch.where((mask & on)[:, :, None], edit(out), out)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def hook_steering(model, vector, layer, alpha, attention_mask, positions="all"):
    """Add ``alpha[b] * vector[layer]`` to block ``layer``'s output (see :func:`hook_edit`)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1, 1, 1)
    return hook_edit(model, layer, lambda h: h + (alpha * vector[layer]).to(h.device, h.dtype), attention_mask, positions)


@contextlib.contextmanager
def capture_block_outputs(model):
    """Collect every decoder block's output (exact for the last block too, unlike
    ``output_hidden_states`` whose last entry is after the final norm)."""
    outs: dict[int, list] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, output, i=i):
            o = output[0] if isinstance(output, tuple) else output
            outs.setdefault(i, []).append(o.detach().clone())
        handles.append(layer.register_forward_hook(hook))
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()
