"""Per-token projections recorded while a patched model runs.

``values[b, t, i, m]`` is the scalar projection ``<h, v_m>/||v_m||`` of block ``layers[i]``'s
output (after steering) at absolute column ``t`` of batch row ``b`` for trait ``traits[m]``.
Column ``t`` is the same column as in ``generate()``'s output, left padding included; padding
columns hold NaN. The last token ``generate()`` returns is never fed back through the model, so
readings stop one column short of the output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Readings:
    values: Tensor          # [B, T, L, M] float32, NaN where there is no token
    valid: Tensor           # [B, T] bool
    layers: list[int]
    traits: list[str]
    prompt_lengths: Tensor  # [B] absolute column where each row's response begins

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not monitored; monitored layers: {self.layers}")
        return self.layers.index(layer)

    def trait_index(self, trait: str) -> int:
        if trait not in self.traits:
            raise KeyError(f"trait {trait!r} was not monitored; monitored: {self.traits}")
        return self.traits.index(trait)

    def get(self, trait: Optional[str] = None, layer: Optional[int] = None) -> Tensor:
        """Slice by trait and/or layer: ``get(trait, layer)`` is ``[B, T]``."""
        v = self.values
        if layer is not None:
            v = v[:, :, self.layer_index(layer)]
            if trait is not None:
                return v[..., self.trait_index(trait)]
            return v
        if trait is not None:
            return v[..., self.trait_index(trait)]
        return v

    def last_prompt_token(self) -> Tensor:
        """``[B, L, M]`` readings at each row's last prompt token (the paper's predictor)."""
        idx = (self.prompt_lengths - 1).clamp_min(0)
        return self.values[torch.arange(self.values.shape[0]), idx]

    def response_mask(self) -> Tensor:
        cols = torch.arange(self.values.shape[1])
        return (cols[None, :] >= self.prompt_lengths[:, None]) & self.valid

    def response_mean(self) -> Tensor:
        """``[B, L, M]`` mean reading over each row's response tokens (NaN if none)."""
        mask = self.response_mask()[..., None, None]
        total = torch.where(mask, self.values, 0.0).sum(1)
        return total / mask.sum(1)

    def to_records(self) -> list[dict]:
        """One dict per (row, column, layer, trait): ready for ``pandas.DataFrame(records)``."""
        out = []
        for b, t in self.valid.nonzero().tolist():
            is_prompt = t < int(self.prompt_lengths[b])
            for i, layer in enumerate(self.layers):
                for m, trait in enumerate(self.traits):
                    out.append({"row": b, "position": t, "layer": layer, "trait": trait,
                                "projection": float(self.values[b, t, i, m]), "prompt": is_prompt})
        return out

    def to_dataframe(self):
        """:meth:`to_records` as a ``pandas.DataFrame`` (columns row, position, layer, trait,
        projection, prompt). Needs pandas, which personakern does not depend on."""
        try:
            import pandas
        except ImportError as e:
            raise ImportError("Readings.to_dataframe() needs pandas (pip install pandas); "
                              "Readings.to_records() gives the same rows as dicts") from e
        return pandas.DataFrame(self.to_records(),
                                columns=["row", "position", "layer", "trait", "projection", "prompt"])

    def to_html(self, tokens=None, *, tokenizer=None, ids=None, row: Optional[int] = None,
                trait: Optional[str] = None, layer: Optional[int] = None, traits=None, layers=None,
                title: Optional[str] = None, row_labels=None):
        """One self-contained HTML page (no network): the tokens of ``row`` (default: every row,
        with a row selector) shaded by projection, a trait and block selector, each token's reading
        at every block on hover or click, and a token x block heatmap. Returns the page as a
        ``str`` (which a notebook displays); write it with ``Path(p).write_text(page)``.

        Token text: ``tokens`` gives one string per column for each row (``tokens[b][t]`` is column
        ``t`` of ``generate()``'s output, padding included), or ``tokenizer`` with ``ids`` (that
        output) decodes them; without either, tokens are labelled by column. ``trait``/``layer``:
        what the tokens are shaded by first (default: the first trait, the middle layer);
        ``traits``/``layers``: what the page holds (default: everything monitored)."""
        from .monitoring.html import page
        return page(self, tokens, tokenizer=tokenizer, ids=ids, row=row, trait=trait, layer=layer,
                    traits=traits, layers=layers, title=title, row_labels=row_labels)

    def _repr_html_(self) -> str:
        from .monitoring.html import REPR_VALUES, iframe, page
        return iframe(page(self, title="Readings (tokens labelled by column: to_html(tokenizer=, ids=) "
                                       "shows their text)", max_values=REPR_VALUES))

    def save(self, path: str) -> None:
        from safetensors.torch import save_file
        save_file({"values": self.values.contiguous(), "valid": self.valid.to(torch.uint8).contiguous(),
                   "prompt_lengths": self.prompt_lengths.contiguous()}, path,
                  metadata={"format": "personakern.readings", "layers": json.dumps(self.layers),
                            "traits": json.dumps(self.traits)})

    @classmethod
    def load(cls, path: str) -> "Readings":
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "personakern.readings":
                raise ValueError(f"{path}: not a personakern readings file")
            return cls(values=f.get_tensor("values"), valid=f.get_tensor("valid").bool(),
                       layers=json.loads(meta["layers"]), traits=json.loads(meta["traits"]),
                       prompt_lengths=f.get_tensor("prompt_lengths"))
