"""Conditional steering, capping and ablation on SmolLM2-135M-Instruct (the shipped evil vector).

Ten evaluation questions of the evil spec, answered greedily (48 tokens) under two prompt sets:
no system prompt ("neutral") and the spec's first evil-eliciting system prompt ("evil prompt").
Variants, all at the vector's chosen block L (18) and on response tokens:

- none:          no steering
- always -a:     steer(evil, -a)                       (suppress everywhere)
- when -a:       steer(evil, -a, when=(evil, tau))     (suppress only where the projection > tau)
- cap tau:       steer(evil, cap=tau)
- ablate:        steer(evil, ablate=True)

tau is the midpoint between the neutral and the evil-prompt mean response projections at block L
(measured in the first pass). Reported per prompt set and variant: the likelihood judge's mean
evil score and coherence, the mean response projection at blocks L and L+6, and how many answers
are word-for-word the unsteered ones.

    python benchmarks/conditional_demo.py [--out benchmarks/results/cpu/conditional_demo.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(model, tok, pk, questions, system, max_new_tokens, later):
    from personakern.extraction.generate import chat_ids, left_pad
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = left_pad([chat_ids(tok, system, q) for q in questions], pad, "cpu")
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, repetition_penalty=1.1, pad_token_id=pad)
    answers = [tok.decode(o[ids.shape[1]:], skip_special_tokens=True).strip() for o in out]
    r = pk.readings
    means = r.response_mean()[:, :, 0]  # [B, layers]
    return answers, {l: float(means[:, i].nanmean()) for i, l in enumerate(r.layers)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="conditional steering / capping / ablation demo")
    ap.add_argument("--out", default="benchmarks/results/cpu/conditional_demo.json")
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=3.0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    import personakern
    from personakern.extraction.spec import load_spec
    from personakern.judges import make_judge
    from personakern.vectors import load_vectors

    model, tok = personakern.load_model()
    evil = load_vectors(Path(personakern.__file__).parent / "data" / "vectors" / "smollm2-traits.safetensors",
                        model=model)["evil"]
    spec = load_spec("evil")
    L = int(evil.meta["layer"])
    later = min(L + 6, evil.num_layers - 1)
    questions = spec.eval_questions[:args.questions]
    sets = {"neutral": None, "evil prompt": spec.instructions[0][0]}
    judge = make_judge(model=model, tokenizer=tok)
    results = {"layer": L, "later_layer": later, "alpha": args.alpha, "questions": len(questions),
               "max_new_tokens": args.max_new_tokens, "judge": judge.name, "sets": {}}

    with personakern.patch(model) as pk:
        pk.monitor(evil, layers=[L, later])
        base = {}
        for name, system in sets.items():
            pk.clear()
            base[name] = run(model, tok, pk, questions, system, args.max_new_tokens, later)
        tau = (base["neutral"][1][L] + base["evil prompt"][1][L]) / 2
        results["tau"] = tau
        variants = {
            "none": None,
            f"always -{args.alpha:g}": lambda: pk.steer(evil, -args.alpha, layers=L, positions="response"),
            f"when -{args.alpha:g}": lambda: pk.steer(evil, -args.alpha, layers=L, positions="response",
                                                      when=(evil, tau)),
            "cap tau": lambda: pk.steer(evil, layers=L, positions="response", cap=tau),
            "ablate": lambda: pk.steer(evil, layers=L, positions="response", ablate=True),
        }
        for name, system in sets.items():
            rows = {}
            for vname, setup in variants.items():
                pk.clear()
                if setup is None:
                    answers, proj = base[name]
                else:
                    setup()
                    answers, proj = run(model, tok, pk, questions, system, args.max_new_tokens, later)
                rows[vname] = {"answers": answers, "projection": proj}
                print(f"  {name:<12} {vname:<12} proj@{L} {proj[L]:+7.2f}  proj@{later} {proj[later]:+7.2f}",
                      flush=True)
            results["sets"][name] = rows
    pk.unpatch()

    # judge everything after the runs (the judge is the same, unpatched model)
    for name, rows in results["sets"].items():
        ref = rows["none"]["answers"]
        for vname, row in rows.items():
            traits = judge.score(spec, questions, row["answers"])
            coh = judge.coherence(questions, row["answers"])
            mean = lambda xs: sum(x for x in xs if x is not None) / max(1, sum(x is not None for x in xs))
            row["trait"] = mean(traits)
            row["coherence"] = mean(coh)
            row["unchanged"] = sum(a == b for a, b in zip(row["answers"], ref))

    lines = [f"| prompts | variant | judged evil | coherence | proj @ block {L} | proj @ block {later} | "
             f"answers unchanged |", "|---|---|---|---|---|---|---|"]
    for name, rows in results["sets"].items():
        for vname, row in rows.items():
            lines.append(f"| {name} | {vname} | {row['trait']:.1f} | {row['coherence']:.1f} | "
                         f"{row['projection'][L]:+.2f} | {row['projection'][later]:+.2f} | "
                         f"{row['unchanged']}/{len(questions)} |")
    table = "\n".join(lines)
    print(f"\ntau = {tau:.2f} (midpoint of the unsteered neutral and evil-prompt means at block {L})\n{table}")
    results["table"] = table
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
