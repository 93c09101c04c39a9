"""Shared helpers of the interop modules: atomic writes and model facts."""
from __future__ import annotations

from typing import Callable, Optional

from personakern.utils import atomic_write as _atomic_write
from personakern.vectors import VectorFileError, model_fingerprint


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)`` on a fresh temp file beside ``path``, then move it into place.

    If ``write`` (or anything after it) fails, the temp file is removed and an existing file at
    ``path`` is left untouched; on success ``path`` is fully replaced in one ``os.replace``.
    OSErrors become VectorFileError naming ``path``; other exceptions propagate unchanged.
    """
    try:
        _atomic_write(path, write)
    except OSError as e:
        raise VectorFileError(f"{path}: cannot write file: {e}") from e


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write)


def model_shape(model) -> tuple:
    """(num_hidden_layers, hidden_size, fingerprint) of a HF model or config."""
    fp = model_fingerprint(model)
    return fp["num_hidden_layers"], fp["hidden_size"], fp


def model_types(model) -> set:
    """Every model_type a producer may call ``model``: the decoder's (what personakern's
    fingerprint records) and the top-level config's (what repeng writes, ``model.config.model_type``;
    they differ for multimodal wrappers such as gemma3 vs gemma3_text)."""
    top = getattr(model, "config", model)
    out = {model_fingerprint(model)["model_type"], getattr(top, "model_type", None)}
    out.discard(None)
    return out


def vector_model_type(vector) -> Optional[str]:
    m = vector.meta.get("model") if isinstance(vector.meta, dict) else None
    mt = m.get("model_type") if isinstance(m, dict) else None
    return mt if isinstance(mt, str) and mt else None


def check_layers(layers, num_layers: int, what: str) -> list:
    """Validate an explicit layer list: ints in [0, num_layers), no duplicates; returns it sorted."""
    try:
        layers = list(layers)
    except TypeError:
        raise VectorFileError(f"{what}: layers must be a list of block indices, got {layers!r}") from None
    if not layers:
        raise VectorFileError(f"{what}: layers is empty; nothing to write")
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, int) and not hasattr(l, "__index__"):
            raise VectorFileError(f"{what}: layer indices must be ints, got {l!r}")
    layers = [int(l) for l in layers]
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise VectorFileError(f"{what}: layers {bad} out of range; the vector has blocks 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise VectorFileError(f"{what}: duplicate layers in {layers}")
    return sorted(layers)
