"""Persona vectors: in-memory containers and the on-disk file format.

Layer convention
----------------
``layer l`` means the *output of decoder block l*, 0-based, i.e. the residual
stream right after ``model.model.layers[l]``.  With
``output_hidden_states=True`` HF returns ``num_hidden_layers + 1`` tensors
whose index 0 is the embedding output, so index ``l + 1`` is block l's output.
A vector tensor therefore has shape ``[num_hidden_layers, hidden_size]`` and
row ``l`` belongs to block ``l``.

File format
-----------
One safetensors file holds one or more traits (a single PersonaVector is saved
as a set with one trait).  Tensors are named ``persona.<trait>`` (float32,
``[num_layers, hidden]``); the safetensors string metadata carries ``format``,
``format_version``, ``layer_convention``, ``library_version``, ``traits`` (JSON
list, defines the order) and ``meta.<trait>`` (JSON of that trait's meta).
Loading never unpickles anything: only safetensors readers are used.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _st_save_bytes

from .utils import atomic_write_bytes

FORMAT_NAME = "personakern.vectors"
FORMAT_VERSION = "1"
LAYER_CONVENTION = "block_output_0based"
TENSOR_PREFIX = "persona."
META_PREFIX = "meta."

_TRAIT_RE = re.compile(r"[A-Za-z0-9_.-]+")
# A different value of these means the vectors cannot apply to the model.
HARD_FIELDS = ("model_type", "hidden_size", "num_hidden_layers")
# These may legitimately differ (e.g. a fine-tune reusing its base model's vectors).
_SOFT_FIELDS = ("name_or_path", "vocab_size", "intermediate_size", "num_attention_heads")

PathLike = Union[str, "os.PathLike[str]"]


class VectorFileError(ValueError):
    """Any problem with a vector file or a vector tensor."""


def model_fingerprint(model_or_config) -> dict:
    """Architecture summary of a HF model or config, stored with each vector."""
    top = getattr(model_or_config, "config", model_or_config)
    cfg = top
    # Multimodal configs (e.g. gemma3) keep the decoder's sizes in text_config.
    # Vectors live in the text decoder's residual stream, so all architecture
    # fields (model_type included) come from that config; this way the same
    # decoder loaded via *ForCausalLM or *ForConditionalGeneration matches.
    if getattr(top, "hidden_size", None) is None and getattr(top, "text_config", None) is not None:
        cfg = top.text_config
    name = getattr(top, "name_or_path", None) or getattr(cfg, "name_or_path", None) or None
    return {
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "intermediate_size": getattr(cfg, "intermediate_size", None),
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "name_or_path": name,
    }


def check_fingerprint(fp_file: dict, model, what: str) -> None:
    """Raise if the file's fingerprint cannot fit ``model``; warn on soft differences.

    Fields missing (None) on either side are not compared.
    """
    if not isinstance(fp_file, dict):
        raise VectorFileError(f"{what}: model fingerprint must be a dict, got {type(fp_file).__name__}")
    fp_model = model_fingerprint(model)

    def diffs(fields):
        out = []
        for key in fields:
            a, b = fp_file.get(key), fp_model.get(key)
            if a is not None and b is not None and a != b:
                out.append(f"{key}: file has {a!r}, model has {b!r}")
        return out

    hard = diffs(HARD_FIELDS)
    if hard:
        raise VectorFileError(f"{what}: vectors were made for a different model ({'; '.join(hard)})")
    soft = diffs(_SOFT_FIELDS)
    if soft:
        warnings.warn(f"{what}: vectors were made for a different checkpoint of the same "
                      f"architecture ({'; '.join(soft)}); using them anyway", stacklevel=2)


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _nonfinite_layers(t: torch.Tensor) -> list:
    return (~torch.isfinite(t)).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten().tolist()


def _check_tensor(t, name: str, shape=None) -> torch.Tensor:
    """Checks shared by PersonaVector and as_layer_tensor; returns float32 (same device)."""
    if not isinstance(t, torch.Tensor):
        raise VectorFileError(f"{name}: expected a torch.Tensor or PersonaVector, got {type(t).__name__}")
    if not t.is_floating_point():
        raise VectorFileError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise VectorFileError(f"{name}: expected {_shape_str(shape)}, got {_shape_str(t.shape)}")
    if t.dim() != 2 or 0 in t.shape:
        raise VectorFileError(f"{name}: expected a non-empty 2-D tensor [num_layers, hidden], "
                              f"got {_shape_str(t.shape)}")
    # Convert before the finiteness check: a huge float64 value only becomes inf in float32.
    t = t.to(torch.float32)
    bad = _nonfinite_layers(t)
    if bad:
        raise VectorFileError(f"{name}: non-finite values (NaN/Inf) in layers {bad}")
    return t


def as_layer_tensor(vector, num_layers: int, hidden_size: int, name: str = "vector") -> torch.Tensor:
    """Return ``vector`` (PersonaVector or tensor) as float32 ``[num_layers, hidden_size]``.
    Keeps the tensor's device; the caller moves it where it needs it."""
    t = vector.vectors if isinstance(vector, PersonaVector) else vector
    return _check_tensor(t, name, (num_layers, hidden_size))


@dataclass
class PersonaVector:
    """One trait's direction per layer: ``vectors[l]`` is for block l's output."""

    trait: str
    vectors: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        # Trait-name syntax is checked on save only, so a bad name never blocks in-memory work.
        if not isinstance(self.trait, str):
            raise VectorFileError(f"trait name must be a str, got {type(self.trait).__name__}")
        v = _check_tensor(self.vectors, f"trait {self.trait!r}")
        self.vectors = v.detach().cpu().contiguous()
        if not isinstance(self.meta, dict):
            raise VectorFileError(f"trait {self.trait!r}: meta must be a dict, got {type(self.meta).__name__}")

    @property
    def num_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.vectors.shape[1])

    def norms(self) -> torch.Tensor:
        return self.vectors.norm(dim=1)

    def __getitem__(self, layer: int) -> torch.Tensor:
        # Negative indices are refused: "layer -1" is too easy to confuse with
        # the embedding output in hidden_states numbering.
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise IndexError(f"trait {self.trait!r}: layer must be an int in [0, {self.num_layers - 1}], "
                             f"got {layer!r}")
        return self.vectors[layer]

    def unit(self, layer: int) -> torch.Tensor:
        v = self[layer]
        n = v.norm()
        if n == 0:
            raise VectorFileError(f"trait {self.trait!r}: layer {layer} vector has zero norm")
        return v / n

    def save(self, path: PathLike) -> None:
        VectorSet([self]).save(path)

    @classmethod
    def load(cls, path: PathLike, model=None, trait: Optional[str] = None) -> "PersonaVector":
        vs = VectorSet.load(path, model=model)
        if trait is None:
            if len(vs) != 1:
                raise VectorFileError(f"{path}: file holds {len(vs)} traits {vs.traits}; "
                                      f"pass trait= to choose one")
            return vs[vs.traits[0]]
        if trait not in vs:
            raise VectorFileError(f"{path}: trait {trait!r} not in file; available traits: {vs.traits}")
        return vs[trait]


class VectorSet(Mapping):
    """Ordered mapping trait -> PersonaVector; all vectors share one shape."""

    def __init__(self, vectors: Iterable[PersonaVector] = ()):
        self._items: dict = {}
        for pv in vectors:
            self.add(pv)

    def add(self, pv: PersonaVector) -> None:
        if not isinstance(pv, PersonaVector):
            raise VectorFileError(f"VectorSet.add expects a PersonaVector, got {type(pv).__name__}")
        if pv.trait in self._items:
            raise VectorFileError(f"trait {pv.trait!r} is already in the set")
        if self._items:
            first = next(iter(self._items.values()))
            if pv.vectors.shape != first.vectors.shape:
                raise VectorFileError(f"shape mismatch: trait {pv.trait!r} has {_shape_str(pv.vectors.shape)}, "
                                      f"trait {first.trait!r} has {_shape_str(first.vectors.shape)}")
        self._items[pv.trait] = pv

    def __getitem__(self, trait: str) -> PersonaVector:
        try:
            return self._items[trait]
        except KeyError:
            raise KeyError(f"trait {trait!r} not in set; available traits: {self.traits}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"VectorSet(traits={self.traits})"

    @property
    def traits(self) -> list:
        return list(self._items)

    # ---- saving

    def save(self, path: PathLike) -> None:
        """Write atomically: everything is validated and serialised in memory
        first, then written to a temp file beside ``path`` and moved into place,
        so an existing file is either untouched or fully replaced."""
        path = os.fspath(path)
        if not self._items:
            raise VectorFileError(f"{path}: refusing to save an empty VectorSet")
        tensors, metadata = {}, {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "layer_convention": LAYER_CONVENTION,
            "library_version": _library_version(),
            "traits": json.dumps(self.traits),
        }
        for trait, pv in self._items.items():
            if not _TRAIT_RE.fullmatch(trait):
                raise VectorFileError(f"{path}: invalid trait name {trait!r} "
                                      f"(use letters, digits, '_', '.', '-')")
            try:
                metadata[META_PREFIX + trait] = json.dumps(pv.meta, allow_nan=False, sort_keys=True)
            except (TypeError, ValueError) as e:
                raise VectorFileError(f"{path}: meta of trait {trait!r} is not JSON-serialisable: {e}") from e
            tensors[TENSOR_PREFIX + trait] = pv.vectors
        data = _st_save_bytes(tensors, metadata=metadata)

        try:
            atomic_write_bytes(path, data)
        except OSError as e:
            raise VectorFileError(f"{path}: cannot write vector file: {e}") from e

    # ---- loading

    @classmethod
    def load(cls, path: PathLike, model=None) -> "VectorSet":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise VectorFileError(f"{path}: file not found")
        if not os.path.isfile(path):
            raise VectorFileError(f"{path}: not a regular file")
        try:
            # safe_open checks the header and that the data section is complete.
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                keys = set(f.keys())
                header = _parse_header(path, metadata)
                raw = {}
                for trait in header:
                    name = TENSOR_PREFIX + trait
                    if name not in keys:
                        raise VectorFileError(f"{path}: trait {trait!r} is listed but tensor {name!r} is missing")
                    raw[trait] = f.get_tensor(name)
        except SafetensorError as e:
            raise VectorFileError(f"{path}: not a valid safetensors file (truncated or wrong format): {e}") from e
        except OSError as e:
            raise VectorFileError(f"{path}: cannot read file: {e}") from e

        vs = cls()
        for trait, tensor in raw.items():
            try:
                vs.add(PersonaVector(trait, tensor, header[trait]))
            except VectorFileError as e:
                raise VectorFileError(f"{path}: {e}") from None
        if model is not None:
            _check_against_model(vs, model, path)
        return vs


def _parse_header(path: str, md: dict) -> dict:
    """Validate our metadata and return {trait: meta dict} in file order."""
    if md.get("format") != FORMAT_NAME:
        raise VectorFileError(f"{path}: not a personakern vector file (metadata 'format' is "
                              f"{md.get('format')!r}, expected {FORMAT_NAME!r})")
    if md.get("format_version") != FORMAT_VERSION:
        raise VectorFileError(f"{path}: unsupported format_version {md.get('format_version')!r} "
                              f"(this library reads version {FORMAT_VERSION!r})")
    if md.get("layer_convention") != LAYER_CONVENTION:
        raise VectorFileError(f"{path}: layer_convention {md.get('layer_convention')!r} is not "
                              f"{LAYER_CONVENTION!r}; rows would be applied to the wrong layers")
    try:
        traits = json.loads(md.get("traits", ""))
    except ValueError:
        traits = None
    if not isinstance(traits, list) or not traits or not all(isinstance(t, str) for t in traits):
        raise VectorFileError(f"{path}: metadata 'traits' must be a non-empty JSON list of names, "
                              f"got {md.get('traits')!r}")
    if len(set(traits)) != len(traits):
        raise VectorFileError(f"{path}: metadata 'traits' has duplicate names: {traits}")
    out = {}
    for trait in traits:
        key = META_PREFIX + trait
        try:
            out[trait] = json.loads(md.get(key, "{}"))
        except ValueError as e:
            raise VectorFileError(f"{path}: metadata {key!r} is not valid JSON: {e}") from None
        if not isinstance(out[trait], dict):
            raise VectorFileError(f"{path}: metadata {key!r} must be a JSON object")
    return out


def _check_against_model(vs: VectorSet, model, path: str) -> None:
    # Fingerprint first: its message names the differing field (hidden_size, ...).
    for trait, pv in vs.items():
        if isinstance(pv.meta.get("model"), dict):
            check_fingerprint(pv.meta["model"], model, f"{path} (trait {trait!r})")
    fp = model_fingerprint(model)
    want = (fp["num_hidden_layers"], fp["hidden_size"])
    if None in want:  # model config does not say; nothing to compare against
        return
    for trait, pv in vs.items():
        if tuple(pv.vectors.shape) != want:
            raise VectorFileError(f"{path}: trait {trait!r} has shape {_shape_str(pv.vectors.shape)}, model "
                                  f"expects [num_hidden_layers, hidden_size] = {list(want)}")


def _library_version() -> str:
    try:  # lazy: personakern/__init__ may import this module
        from personakern import __version__
        return str(__version__)
    except Exception:
        return "unknown"


def load_vectors(path: PathLike, model=None) -> VectorSet:
    """Load every trait in a vector file (see VectorSet.load)."""
    return VectorSet.load(path, model=model)


__all__ = [
    "VectorFileError", "PersonaVector", "VectorSet", "load_vectors", "model_fingerprint",
    "check_fingerprint", "as_layer_tensor", "FORMAT_NAME", "FORMAT_VERSION", "LAYER_CONVENTION",
]
