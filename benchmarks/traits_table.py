"""Markdown table of extraction reports, and optionally one combined vector file.

    python benchmarks/traits_table.py RUNS_DIR/*/vectors.safetensors [--save combined.safetensors]

``--save`` writes the response-averaged vector of every run (with its metadata, report
included) into one file, in the order given.
"""
import argparse

from personakern.extraction.report import reports_in
from personakern.vectors import VectorSet, load_vectors

ap = argparse.ArgumentParser()
ap.add_argument("files", nargs="+")
ap.add_argument("--save", default=None, help="combined vector file of the response-averaged traits")
args = ap.parse_args()

print("| trait | answers kept (pos / neg) | mean judged trait, pos vs neg answers | held-out AUROC at chosen layer (best layer: AUROC) [held-out answers] | chosen layer, alpha | judged trait: unsteered → steered (coherence) |")
print("|---|---|---|---|---|---|")
combined = VectorSet()
for path in args.files:
    vs = load_vectors(path)
    for r in reports_in(vs):
        c, ch, sw, h = r["counts"], r["chosen"], r.get("sweep"), r["heldout"]
        au = r["layer_auroc"]["response"]
        best = max(range(len(au)), key=lambda l: au[l])
        cell = sw["cells"].get(f"{ch['layer']}:{ch['alpha']:g}") if sw and ch["alpha"] is not None else None
        eff = (f"{sw['baseline']['trait']:.0f} → {cell['trait']:.0f} ({sw['baseline']['coherence']:.0f} → "
               f"{cell['coherence']:.0f})") if cell else "—"
        rule = "judge-filtered" if h["rule"].startswith("judge") else "by side"
        print(f"| {r['trait']} | {c['positive']['kept']}/{c['positive']['generated']} / "
              f"{c['negative']['kept']}/{c['negative']['generated']} | {c['positive']['mean_trait_score']:.0f} vs "
              f"{c['negative']['mean_trait_score']:.0f} | {ch['auroc']:.2f} (layer {best}: {au[best]:.2f}) "
              f"[{h['positive']}+{h['negative']}, {rule}] | {ch['layer']}, {ch['alpha']:g} | {eff} |")
        combined.add(vs[r["trait"]])
if args.save:
    combined.save(args.save)
    print(f"\nwrote {len(combined.traits)} traits to {args.save}")
