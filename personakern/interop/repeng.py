"""repeng ``ControlVector`` objects and files.

repeng (0.4) keeps ``directions: dict[int, np.ndarray]`` keyed by decoder-block index: it trains
layer ``l`` from ``hidden_states[l + 1]`` and its ``ControlModel`` adds it to the output of
``model.layers[l]`` — personakern row ``l``, no shift.  repeng normalises negative indices to
non-negative ones before storing them, so a negative key here is an error.  repeng's files are
GGUF control vectors (see :mod:`personakern.interop.gguf`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from personakern.vectors import PersonaVector, VectorFileError, LAYER_CONVENTION
from ._io import check_layers, model_shape, model_types, vector_model_type
from .gguf import import_gguf

FORMAT = "repeng"
REPENG_CONVENTION = "directions[l] is added to the output of decoder block l = personakern row l (no shift)"


def from_repeng(control_vector, model=None, trait: str = "repeng") -> PersonaVector:
    """Convert a live repeng ``ControlVector`` (anything with ``.model_type`` and
    ``.directions: dict[int, array]``) into a PersonaVector; absent layers are zero rows.
    With ``model``: ``num_hidden_layers`` rows and checks of model_type, hidden size and indices;
    without: ``max layer + 1`` rows."""
    what = f"repeng ControlVector ({trait!r})"
    model_type = getattr(control_vector, "model_type", None)
    directions = getattr(control_vector, "directions", None)
    if not isinstance(directions, dict):
        raise VectorFileError(f"{what}: expected an object with a .directions dict, got "
                              f"{type(control_vector).__name__}")
    if not directions:
        raise VectorFileError(f"{what}: .directions is empty")
    if model_type is not None and not isinstance(model_type, str):
        raise VectorFileError(f"{what}: .model_type must be a str, got {type(model_type).__name__}")
    rows = {}
    for k, v in directions.items():
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise VectorFileError(f"{what}: direction keys must be int block indices, got {k!r}")
        k = int(k)
        if k < 0:
            raise VectorFileError(f"{what}: negative layer key {k}; repeng stores non-negative block indices "
                                  f"(normalise with num_hidden_layers + {k} first)")
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if a.ndim != 1 or a.size == 0 or a.dtype.kind not in "fiu":
            raise VectorFileError(f"{what}: direction {k} must be a 1-D numeric vector, got shape "
                                  f"{list(a.shape)} dtype {a.dtype}")
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise VectorFileError(f"{what}: direction {k} has non-finite values (NaN/Inf)")
        rows[k] = a
    sizes = {k: int(a.shape[0]) for k, a in rows.items()}
    if len(set(sizes.values())) != 1:
        raise VectorFileError(f"{what}: directions have different sizes: {dict(sorted(sizes.items()))}")
    hidden = next(iter(sizes.values()))
    layers = sorted(rows)
    fp = None
    num_layers = layers[-1] + 1
    if model is not None:
        n, want_hidden, fp = model_shape(model)
        names = model_types(model)
        if model_type and names and model_type not in names:
            raise VectorFileError(f"{what}: made for model_type {model_type!r} but the model is "
                                  f"{' / '.join(sorted(names))}")
        if want_hidden is not None and hidden != want_hidden:
            raise VectorFileError(f"{what}: directions have size {hidden}, the model's hidden_size is {want_hidden}")
        if n is not None:
            bad = [l for l in layers if l >= n]
            if bad:
                raise VectorFileError(f"{what}: directions for blocks {bad} but the model has {n} layers "
                                      f"(0..{n - 1})")
            num_layers = n
    t = torch.zeros(num_layers, hidden, dtype=torch.float32)
    for l, a in rows.items():
        t[l] = torch.from_numpy(a)
    meta = {
        "source": {"format": FORMAT, "layers": layers, "model_hint": model_type,
                   "layer_convention": REPENG_CONVENTION},
        "layer_convention": LAYER_CONVENTION,
    }
    if fp is not None:
        meta["model"] = fp
    elif model_type:
        meta["model"] = {"model_type": model_type, "hidden_size": hidden}
    return PersonaVector(trait, t, meta)


def to_repeng_directions(vector: PersonaVector, layers=None,
                         model_type: Optional[str] = None) -> tuple:
    """``(model_type, {block: float32 np.ndarray})`` for
    ``repeng.ControlVector(model_type=..., directions=...)``.

    ``layers`` default: every non-zero row (layer 0 included: repeng can steer block 0).
    ``model_type`` default: the vector's ``meta["model"]["model_type"]``; one is required."""
    if not isinstance(vector, PersonaVector):
        raise VectorFileError(f"to_repeng_directions expects a PersonaVector, got {type(vector).__name__}")
    mt = model_type if model_type is not None else vector_model_type(vector)
    if not isinstance(mt, str) or not mt:
        raise VectorFileError(f"trait {vector.trait!r}: meta does not record the model_type; pass model_type=")
    v = vector.vectors.to(torch.float32)
    if layers is None:
        layers = [l for l in range(vector.num_layers) if bool(v[l].ne(0).any())]
        if not layers:
            raise VectorFileError(f"trait {vector.trait!r}: every row is zero; nothing to convert")
    else:
        layers = check_layers(layers, vector.num_layers, f"trait {vector.trait!r}")
    return mt, {l: v[l].numpy().astype(np.float32, copy=True) for l in layers}


def import_repeng(path, model=None, trait: Optional[str] = None,
                  num_layers: Optional[int] = None) -> PersonaVector:
    """repeng's ``export_gguf`` files are GGUF control vectors: same as :func:`import_gguf`."""
    return import_gguf(path, model=model, trait=trait, num_layers=num_layers)
