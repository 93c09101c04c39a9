"""The reference persona-vector code's ``.pt`` layout.

The reference implementation (``persona_vectors``) saves ``torch.save(tensor)`` with shape
``[num_hidden_layers + 1, hidden]``, indexed like HF ``output_hidden_states``: row 0 is the
embedding output and row ``l + 1`` is the output of decoder block ``l``.  personakern row ``l``
is block ``l``'s output, so importing drops row 0 and shifts by one (personakern row l = file
row l + 1); exporting writes a zero row 0 in front.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Optional

import torch

from personakern.vectors import PersonaVector, VectorFileError, LAYER_CONVENTION
from ._io import atomic_write_bytes, model_shape

FORMAT = "reference-pt"
REFERENCE_CONVENTION = ("file row 0 = embedding output (dropped); file row l+1 = output of decoder "
                        "block l = personakern row l (output_hidden_states indexing)")


def _unpickler_reason(e: Exception) -> str:
    """The informative line of torch's long weights_only error (e.g. 'Unsupported global: ...'),
    without its advice on how to allow-list the object."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reason = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("WeightsUnpickler error:")), None)
    if not reason:
        boiler = ("Weights only load failed", "Check the documentation", "Please file an issue", "(")
        reason = next((ln for ln in lines if not ln.startswith(boiler)), type(e).__name__)
    return reason.split(" Please use ", 1)[0]


def _looks_like_torch_file(path: str) -> bool:
    """torch.save writes a zip archive (default) or, legacy, a raw pickle (protocol byte 0x80)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _load_tensor(path: str) -> torch.Tensor:
    if not _looks_like_torch_file(path):
        raise VectorFileError(f"{path}: not a readable torch .pt file (neither a torch zip archive nor a pickle)")
    try:
        # weights_only: only tensors and plain containers; never runs arbitrary pickled code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VectorFileError(f"{path}: refused to load: the file holds objects other than tensors and "
                              f"plain containers (loaded with weights_only=True, nothing is unpickled "
                              f"blindly): {_unpickler_reason(e)}") from None
    except Exception as e:  # not a torch file, truncated zip, ...
        raise VectorFileError(f"{path}: not a readable torch .pt file: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(obj) != 1 or len(tensors) != 1:
            raise VectorFileError(f"{path}: expected a tensor or a dict holding one tensor, got a dict "
                                  f"with keys {list(obj)[:10]}")
        obj = next(iter(tensors.values()))
    if not isinstance(obj, torch.Tensor):
        raise VectorFileError(f"{path}: expected a tensor [num_layers+1, hidden], got {type(obj).__name__}")
    if obj.dim() != 2 or 0 in obj.shape:
        raise VectorFileError(f"{path}: expected a 2-D tensor [num_layers+1, hidden], got shape "
                              f"{list(obj.shape)}")
    if not obj.is_floating_point():
        raise VectorFileError(f"{path}: expected a floating-point tensor, got dtype {obj.dtype}")
    return obj


def import_reference_pt(path, model=None, trait: Optional[str] = None,
                        layer_offset: int = 1) -> PersonaVector:
    """Read a reference-layout ``.pt`` persona vector.

    ``layer_offset=1`` (the reference layout): the file is ``[num_layers+1, hidden]`` indexed like
    ``output_hidden_states``; row 0 (embedding output) is dropped and personakern row ``l`` = file
    row ``l + 1``.  ``layer_offset=0``: the file is already block-indexed ``[num_layers, hidden]``
    and is taken as is.  With ``model`` the row count and hidden size are checked; a file with
    exactly ``num_hidden_layers`` rows is ambiguous under ``layer_offset=1`` and is refused.
    Loads with ``weights_only=True``; a dict holding a single tensor is accepted too.
    """
    path = os.fspath(path)
    if layer_offset not in (0, 1) or isinstance(layer_offset, bool):
        raise VectorFileError(f"{path}: layer_offset must be 1 (reference layout, row 0 = embeddings) "
                              f"or 0 (already block-indexed), got {layer_offset!r}")
    if not os.path.exists(path):
        raise VectorFileError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise VectorFileError(f"{path}: not a regular file")
    t = _load_tensor(path)
    rows, hidden = int(t.shape[0]), int(t.shape[1])

    fp = None
    if model is not None:
        num_layers, want_hidden, fp = model_shape(model)
        if want_hidden is not None and hidden != want_hidden:
            raise VectorFileError(f"{path}: vectors have size {hidden}, the model's hidden_size is {want_hidden}")
        if num_layers is not None:
            if layer_offset == 1 and rows == num_layers:
                raise VectorFileError(
                    f"{path}: the file has {rows} rows = the model's num_hidden_layers; the reference layout "
                    f"has num_hidden_layers+1 = {num_layers + 1} rows (row 0 = embedding output, row l+1 = "
                    f"block l). If this file is already indexed by decoder block (row l = block l), pass "
                    f"layer_offset=0 to accept it as is")
            want_rows = num_layers + layer_offset
            if rows != want_rows:
                raise VectorFileError(
                    f"{path}: the file has {rows} rows; the model has {num_layers} layers, so "
                    f"{'the reference layout expects' if layer_offset else 'layer_offset=0 expects'} "
                    f"{want_rows} rows")
    if rows - layer_offset < 1:
        raise VectorFileError(f"{path}: the file has {rows} row(s): no decoder-block rows after dropping "
                              f"the embedding row")
    vectors = t[layer_offset:].to(torch.float32).clone()
    meta = {
        "source": {"format": FORMAT, "path": os.path.abspath(path), "file_shape": [rows, hidden],
                   "layer_offset": layer_offset,
                   "layer_convention": REFERENCE_CONVENTION if layer_offset else
                   "file row l = output of decoder block l (layer_offset=0: taken as is)"},
        "layer_convention": LAYER_CONVENTION,
    }
    if fp is not None:
        meta["model"] = fp
    if trait is None:
        trait = os.path.splitext(os.path.basename(path))[0]
    try:
        return PersonaVector(trait, vectors, meta)
    except VectorFileError as e:
        raise VectorFileError(f"{path}: {e}") from None


def export_reference_pt(vector: PersonaVector, path) -> None:
    """Write ``vector`` in the reference layout: a plain tensor ``[num_layers+1, hidden]``
    (float32) whose row 0 (the embedding-output slot) is zero and row ``l + 1`` = personakern
    row ``l``.  Written atomically (temp file beside ``path`` + ``os.replace``)."""
    path = os.fspath(path)
    if not isinstance(vector, PersonaVector):
        raise VectorFileError(f"{path}: export_reference_pt expects a PersonaVector, got "
                              f"{type(vector).__name__}")
    v = vector.vectors.to(torch.float32)
    if not torch.isfinite(v).all():
        raise VectorFileError(f"{path}: trait {vector.trait!r} has non-finite values (NaN/Inf)")
    out = torch.cat([torch.zeros(1, v.shape[1], dtype=torch.float32), v], dim=0).contiguous()
    buf = io.BytesIO()
    torch.save(out, buf)
    atomic_write_bytes(path, buf.getvalue())
