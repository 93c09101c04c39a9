"""Model patching: one small module per model family, chosen by ``config.model_type``."""
from __future__ import annotations

from types import ModuleType

import transformers
from torch import nn

from . import gemma, llama, phi3
from .common import ATTR, install_decoder_forward, install_generate, install_layer_forward, norm_spec, restore_forward

FAMILIES: dict[str, ModuleType] = {t: m for m in (llama, gemma, phi3) for t in m.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))

_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2])


def _returns_tuple(family: ModuleType) -> bool:
    """Decoder layers return a bare tensor, except Gemma 2/3 layers before transformers 5
    (and every family before 4.54), which return ``(hidden_states, ...)``."""
    return _VERSION < (4, 54) or (_VERSION < (5, 0) and family is gemma)


class UnsupportedModelError(ValueError):
    pass


def find_decoder(model: nn.Module) -> nn.Module:
    """The module holding ``.layers`` (``model.model`` for ``*ForCausalLM``)."""
    for candidate in (getattr(model, "model", None), model):
        if candidate is not None and isinstance(getattr(candidate, "layers", None), nn.ModuleList):
            return candidate
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder stack (`model.model.layers`); "
        f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def family_of(model: nn.Module) -> ModuleType:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


def apply(model: nn.Module, state, handle) -> list:
    """Install the patched forwards. Checks everything first, so a failure changes nothing.

    Returns what :func:`remove` needs to restore: ``(module, method name, previous instance attribute)``.
    """
    family = family_of(model)
    decoder = find_decoder(model)
    if getattr(decoder, ATTR, None) is not None:
        raise RuntimeError(
            "this model is already patched by personakern; use the existing handle or call "
            "handle.unpatch() first"
        )
    layers = list(decoder.layers)
    # build every body first: a layer the family cannot handle raises before anything changes
    bodies = [family.make_forward(layer, state, i) for i, layer in enumerate(layers)]
    saved = [(m, "forward", m.__dict__.get("forward")) for m in (*layers, decoder)]
    if callable(getattr(model, "generate", None)):
        saved.append((model, "generate", model.__dict__.get("generate")))
    state.layer_modules = layers
    state.next_norms = [norm_spec(layers[i + 1].input_layernorm) if i + 1 < len(layers) else None
                        for i in range(len(layers))]
    for i, (layer, body) in enumerate(zip(layers, bodies)):
        install_layer_forward(layer, body, _returns_tuple(family), state, i)
    install_decoder_forward(decoder, state)
    if callable(getattr(model, "generate", None)):
        install_generate(model, state)
    setattr(decoder, ATTR, handle)
    return saved


def remove(model: nn.Module, saved: list) -> None:
    for module, name, previous in saved:
        restore_forward(module, previous, name)
    find_decoder(model).__dict__.pop(ATTR, None)


def is_patched(model: nn.Module) -> bool:
    try:
        return getattr(find_decoder(model), ATTR, None) is not None
    except UnsupportedModelError:
        return False
