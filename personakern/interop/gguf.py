"""llama.cpp / repeng GGUF control vectors.

File layout (repeng 0.4 ``ControlVector.export_gguf``, llama.cpp ``--control-vector``):
``general.architecture = "controlvector"``, string ``controlvector.model_hint`` (the HF
``model_type``, e.g. ``"llama"``), integer ``controlvector.layer_count`` (number of direction
tensors) and one float32 tensor ``direction.{l}`` of shape ``[hidden]`` per steered layer.

Layer convention: ``direction.{l}`` belongs to decoder block ``l`` (0-based): llama.cpp adds it to
the output of layer ``il == l``, and repeng trains it from ``hidden_states[l + 1]`` and controls
``model.layers[l]``.  That is exactly personakern's row ``l``, so no shift is applied.
llama.cpp never steers block 0 and refuses a file holding ``direction.0``.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import numpy as np
import torch

from personakern.vectors import PersonaVector, VectorFileError, LAYER_CONVENTION
from ._io import atomic_write, check_layers, model_shape, model_types, vector_model_type

ARCH = "controlvector"
KEY_ARCH = "general.architecture"
KEY_HINT = f"{ARCH}.model_hint"
KEY_COUNT = f"{ARCH}.layer_count"
TENSOR_PREFIX = "direction."
FORMAT = "gguf-controlvector"
GGUF_CONVENTION = ("direction.{l} is added to the output of decoder block l (0-based), "
                   "= personakern row l (no shift)")

_NAME_RE = re.compile(r"direction\.(0|[1-9][0-9]*)")


def export_gguf(vector: PersonaVector, path, layers=None, scale: float = 1.0,
                model_hint: Optional[str] = None) -> list:
    """Write ``vector`` as a llama.cpp / repeng GGUF control vector; returns the layers written.

    ``layers``: block indices to write.  Default: every layer whose row is non-zero **except
    layer 0**: llama.cpp applies ``direction.{l}`` after block ``l`` for ``l >= 1`` only (its
    control-vector buffer has no slot for block 0) and refuses to load a file that holds
    ``direction.0``.  Asking for layer 0 explicitly writes it with a warning (repeng can use it,
    llama.cpp cannot).  ``scale`` multiplies every written row (llama.cpp also scales at load time
    with ``--control-vector-scaled``).

    ``model_hint``: the ``controlvector.model_hint`` string; default is the vector's
    ``meta["model"]["model_type"]``.  One of the two is required.

    The file is float32 and written atomically (temp file in the same folder, then
    ``os.replace``): on any failure an existing file at ``path`` is left as it was.
    """
    path = os.fspath(path)
    if not isinstance(vector, PersonaVector):
        raise VectorFileError(f"{path}: export_gguf expects a PersonaVector, got {type(vector).__name__}")
    hint = model_hint if model_hint is not None else vector_model_type(vector)
    if not isinstance(hint, str) or not hint:
        raise VectorFileError(f"{path}: the vector's meta does not record its model_type; pass "
                              f"model_hint= (the HF config.model_type, e.g. 'llama')")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise VectorFileError(f"{path}: scale must be a number, got {scale!r}") from None
    rows = vector.vectors.to(torch.float32) * scale
    if layers is None:
        nonzero = rows.ne(0).any(dim=1)
        layers = [l for l in range(1, vector.num_layers) if bool(nonzero[l])]
        if not layers:
            raise VectorFileError(f"{path}: trait {vector.trait!r} has no non-zero row in layers "
                                  f"1..{vector.num_layers - 1}; nothing to export (pass layers= to force)")
    else:
        layers = check_layers(layers, vector.num_layers, path)
        if 0 in layers:
            warnings.warn(f"{path}: writing direction.0 (block 0); llama.cpp refuses control vectors "
                          f"with a layer-0 direction (repeng can use it)", stacklevel=2)
    arrays = {}
    for l in layers:
        a = rows[l].numpy().astype(np.float32, copy=True)
        if not np.isfinite(a).all():
            raise VectorFileError(f"{path}: trait {vector.trait!r} layer {l} has non-finite values "
                                  f"(NaN/Inf) after scaling by {scale}")
        arrays[l] = np.ascontiguousarray(a)

    import gguf

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_string(KEY_HINT, hint)
            writer.add_uint32(KEY_COUNT, len(arrays))
            for l, a in arrays.items():
                writer.add_tensor(f"{TENSOR_PREFIX}{l}", a)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)
    return layers


def _field_value(field):
    if field is None or not len(field.parts):
        return None
    try:
        return field.contents()
    except Exception:
        return None


def import_gguf(path, model=None, trait: Optional[str] = None,
                num_layers: Optional[int] = None) -> PersonaVector:
    """Read a llama.cpp / repeng GGUF control vector into a PersonaVector.

    ``direction.{l}`` becomes row ``l`` (block l's output, no shift); layers the file lacks are
    zero rows.  With ``model`` the vector has ``num_hidden_layers`` rows and the file is checked
    against it (layer indices, hidden size, ``model_hint`` vs ``model_type``); without, it has
    ``num_layers`` rows if given (a file never says how many layers the model has), else
    ``max layer + 1``.  ``trait`` defaults to the file name's stem.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VectorFileError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise VectorFileError(f"{path}: not a regular file")
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated header, empty file, ...
        raise VectorFileError(f"{path}: not a valid GGUF file: {e}") from None

    arch = _field_value(reader.get_field(KEY_ARCH))
    if arch is None:
        warnings.warn(f"{path}: GGUF file has no {KEY_ARCH} field; assuming a control vector", stacklevel=2)
    elif arch != ARCH:
        raise VectorFileError(f"{path}: GGUF architecture is {arch!r}, not {ARCH!r}: this is not a "
                              f"control-vector file (a model file?)")
    hint = _field_value(reader.get_field(KEY_HINT))
    if not isinstance(hint, str) or not hint:
        raise VectorFileError(f"{path}: GGUF control vector lacks a string {KEY_HINT} field")
    count = _field_value(reader.get_field(KEY_COUNT))

    directions, ignored = {}, []
    for t in reader.tensors:
        name = t.name
        if not name.startswith(TENSOR_PREFIX):
            ignored.append(name)
            continue
        m = _NAME_RE.fullmatch(name)
        if m is None:
            raise VectorFileError(f"{path}: bad tensor name {name!r}; expected 'direction.<block index>' "
                                  f"with a non-negative integer index")
        layer = int(m.group(1))
        if layer in directions:
            raise VectorFileError(f"{path}: tensor {name!r} appears twice")
        data = np.asarray(t.data)
        if data.ndim != 1 or data.size == 0:
            raise VectorFileError(f"{path}: tensor {name!r} has shape {list(data.shape)}; expected a "
                                  f"1-D [hidden] vector")
        if data.dtype.kind != "f":
            raise VectorFileError(f"{path}: tensor {name!r} has type "
                                  f"{getattr(t.tensor_type, 'name', t.tensor_type)}; expected F32 (or F16)")
        data = data.astype(np.float32)  # copies, so nothing keeps the memmap alive
        if not np.isfinite(data).all():
            raise VectorFileError(f"{path}: tensor {name!r} has non-finite values (NaN/Inf)")
        directions[layer] = data
    del reader
    if ignored:
        warnings.warn(f"{path}: ignoring non-direction tensors {ignored}", stacklevel=2)
    if not directions:
        raise VectorFileError(f"{path}: GGUF control vector holds no 'direction.<l>' tensors")
    sizes = {l: int(a.shape[0]) for l, a in directions.items()}
    if len(set(sizes.values())) != 1:
        raise VectorFileError(f"{path}: direction tensors have different sizes: "
                              f"{dict(sorted(sizes.items()))}")
    hidden = next(iter(sizes.values()))
    layers = sorted(directions)

    fp = None
    want_layers = num_layers
    if model is not None:
        num_layers, want_hidden, fp = model_shape(model)
        if want_layers is not None and num_layers is not None and want_layers != num_layers:
            raise VectorFileError(f"{path}: num_layers={want_layers} but the model has {num_layers} layers")
        names = model_types(model)
        if names and hint not in names:
            raise VectorFileError(f"{path}: file's model_hint is {hint!r} but the model's model_type is "
                                  f"{' / '.join(sorted(names))!s}: the vector was made for another model")
        if want_hidden is not None and hidden != want_hidden:
            raise VectorFileError(f"{path}: direction vectors have size {hidden}, the model's hidden_size "
                                  f"is {want_hidden}")
        if num_layers is None:
            num_layers = want_layers if want_layers is not None else layers[-1] + 1
        if layers[-1] >= num_layers:
            bad = [l for l in layers if l >= num_layers]
            raise VectorFileError(f"{path}: direction tensors for blocks {bad} but the model has "
                                  f"{num_layers} layers (0..{num_layers - 1})")
    elif num_layers is not None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or layers[-1] >= num_layers:
            raise VectorFileError(f"{path}: direction tensors for blocks {layers} do not fit "
                                  f"num_layers={num_layers!r}")
    else:
        num_layers = layers[-1] + 1

    rows = torch.zeros(num_layers, hidden, dtype=torch.float32)
    for l, a in directions.items():
        rows[l] = torch.from_numpy(a)
    meta = {
        "source": {"format": FORMAT, "path": os.path.abspath(path), "layers": layers,
                   "model_hint": hint, "layer_count_field": count if isinstance(count, int) else None,
                   "layer_convention": GGUF_CONVENTION},
        "layer_convention": LAYER_CONVENTION,
        "model": fp if fp is not None else {"model_type": hint, "hidden_size": hidden},
    }
    if trait is None:
        trait = os.path.splitext(os.path.basename(path))[0]
    try:
        return PersonaVector(trait, rows, meta)
    except VectorFileError as e:
        raise VectorFileError(f"{path}: {e}") from None
