"""Markdown table of extraction reports: python benchmarks/traits_table.py RUNS_DIR/*/vectors.safetensors"""
import sys

from personakern.extraction.report import reports_in
from personakern.vectors import load_vectors

print("| trait | answers kept (pos / neg) | mean judged trait, pos vs neg answers | held-out AUROC at chosen layer (best layer: AUROC) | chosen layer, alpha | judged trait: unsteered → steered (coherence) |")
print("|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    for r in reports_in(load_vectors(path)):
        c, ch, sw = r["counts"], r["chosen"], r.get("sweep")
        au = r["layer_auroc"]["response"]
        best = max(range(len(au)), key=lambda l: au[l])
        cell = sw["cells"].get(f"{ch['layer']}:{ch['alpha']:g}") if sw and ch["alpha"] is not None else None
        eff = (f"{sw['baseline']['trait']:.0f} → {cell['trait']:.0f} ({sw['baseline']['coherence']:.0f} → "
               f"{cell['coherence']:.0f})") if cell else "—"
        print(f"| {r['trait']} | {c['positive']['kept']}/{c['positive']['generated']} / "
              f"{c['negative']['kept']}/{c['negative']['generated']} | {c['positive']['mean_trait_score']:.0f} vs "
              f"{c['negative']['mean_trait_score']:.0f} | {ch['auroc']:.2f} (layer {best}: {au[best]:.2f}) | "
              f"{ch['layer']}, {ch['alpha']:g} | {eff} |")
