"""Cosine similarity, per trait and block, between two sets of persona vectors for the same model
(e.g. the shipped SmolLM2 vectors and a re-extraction on the vLLM engine).

    python benchmarks/compare_vectors.py personakern/data/vectors/smollm2-traits.safetensors \\
        RUNS/smollm2-traits.safetensors --out benchmarks/results/cpu/traits-vllm.json

Per trait in both files: the cosine at each file's recommended block, the median, minimum and
maximum over blocks 1..L-1 (block 0's output is mostly the embedding), the norm ratio at the
reference's block, and both files' recommended blocks.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("other")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from personakern.vectors import load_vectors
    ref, oth = load_vectors(args.reference), load_vectors(args.other)
    rows = {}
    for t in ref.traits:
        if t not in oth.traits or "." in t:
            continue
        a, b = ref[t].vectors.float(), oth[t].vectors.float()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        la, lb = ref[t].meta.get("layer"), oth[t].meta.get("layer")
        inner = cos[1:].tolist()
        rows[t] = {"cos_at_reference_layer": round(float(cos[la]), 4) if la is not None else None,
                   "cos_at_other_layer": round(float(cos[lb]), 4) if lb is not None else None,
                   "cos_median": round(statistics.median(inner), 4), "cos_min": round(min(inner), 4),
                   "cos_max": round(max(inner), 4),
                   "norm_ratio_at_reference_layer": round(float(b[la].norm() / a[la].norm()), 4) if la is not None else None,
                   "reference_layer": la, "other_layer": lb}
        print(f"{t:14s} cos@ref-layer {rows[t]['cos_at_reference_layer']}  median {rows[t]['cos_median']}  "
              f"min {rows[t]['cos_min']}  layers {la} / {lb}")
    if args.out:
        Path(args.out).write_text(json.dumps({"reference": args.reference, "other": args.other, "traits": rows},
                                             indent=1) + "\n")


if __name__ == "__main__":
    main()
