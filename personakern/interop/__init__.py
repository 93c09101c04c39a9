"""Import/export of persona vectors in other projects' formats.

Every converter maps explicitly to personakern's layer convention (row ``l`` = output of decoder
block ``l``, 0-based):

- llama.cpp / repeng GGUF control vectors: ``direction.{l}`` = block ``l`` (no shift; llama.cpp
  never uses block 0) — :func:`export_gguf`, :func:`import_gguf`.
- the reference implementation's ``.pt``: ``[num_layers+1, hidden]`` indexed like
  ``output_hidden_states`` (row 0 = embeddings, row ``l+1`` = block ``l``) —
  :func:`import_reference_pt`, :func:`export_reference_pt`.
- live repeng ``ControlVector`` objects: ``directions[l]`` = block ``l`` — :func:`from_repeng`,
  :func:`to_repeng_directions`.
"""
from __future__ import annotations

import os
from typing import Optional

from personakern.vectors import VectorFileError
from .gguf import export_gguf, import_gguf
from .reference import export_reference_pt, import_reference_pt
from .repeng import from_repeng, import_repeng, to_repeng_directions

# format name -> (aliases, extensions)
FORMATS = {
    "gguf": ((".gguf",), "llama.cpp / repeng GGUF control vector"),
    "reference": ((".pt", ".pth"), "reference persona_vectors .pt, [num_layers+1, hidden]"),
    "safetensors": ((".safetensors",), "personakern vector file"),
}
_ALIASES = {"gguf": "gguf", "repeng": "gguf", "llama.cpp": "gguf", "controlvector": "gguf",
            "reference": "reference", "pt": "reference", "pth": "reference",
            "safetensors": "safetensors", "personakern": "safetensors"}


def _formats_text() -> str:
    return "; ".join(f"{name} ({', '.join(ext)}): {desc}" for name, (ext, desc) in FORMATS.items())


def import_vector(path, model=None, trait: Optional[str] = None, format: Optional[str] = None):
    """Read a vector file of any supported format.

    ``format``: ``gguf`` (alias ``repeng``), ``reference`` or ``safetensors``; default by extension.
    Returns a PersonaVector, except for a personakern ``.safetensors`` file without ``trait``,
    which returns the whole VectorSet.
    """
    path = os.fspath(path)
    if format is None:
        ext = os.path.splitext(path)[1].lower()
        fmt = next((name for name, (exts, _) in FORMATS.items() if ext in exts), None)
        if fmt is None:
            raise VectorFileError(f"{path}: cannot tell the format from the extension {ext!r}; pass "
                                  f"format=. Supported: {_formats_text()}")
    else:
        fmt = _ALIASES.get(str(format).lower())
        if fmt is None:
            raise VectorFileError(f"{path}: unknown format {format!r}. Supported: {_formats_text()}")
    if fmt == "gguf":
        return import_gguf(path, model=model, trait=trait)
    if fmt == "reference":
        return import_reference_pt(path, model=model, trait=trait)
    from personakern.vectors import PersonaVector, load_vectors
    if trait is not None:
        return PersonaVector.load(path, model=model, trait=trait)
    return load_vectors(path, model=model)


__all__ = ["import_vector", "export_gguf", "import_gguf", "import_reference_pt", "export_reference_pt",
           "from_repeng", "to_repeng_directions", "import_repeng", "FORMATS"]
