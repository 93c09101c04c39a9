"""How well a judge agrees with human labels, and the calibration data of the judges' constants.

``measure_agreement(judge)`` scores every answer of the labelled set
(``personakern/data/judges/labelled.jsonl``: ``{trait, question, answer, trait_score,
coherence}`` per line, scores 0-100 given by a person) for its trait and for coherence, and
reports per trait and overall (pooled over traits):

* ``spearman``: rank correlation of the judge's scores with the human scores,
* ``auroc``: how well the judge's score separates human >= 50 from human < 50
  (P(score of a positive > score of a negative), ties 1/2),
* ``macro_auroc`` (overall only): the mean of the per-trait AUROCs,
* ``accuracy_at_50``: how often judge and human fall on the same side of 50 (the extraction
  pipeline's filter threshold),
* ``no_score``: the fraction of answers the judge returned None for (the correlations and
  AUROCs are over the scored answers; ``n`` says how many),
* ``seconds_per_item``,

for the trait scores and for coherence alike.

Command line::

    python -m personakern.judges.agreement --judges llm,embedding,likelihood \\
        --out benchmarks/results/judges/agreement.json

:func:`calibrate` computes the statistics that the embedding and likelihood judges' constants
were chosen from; it uses SmolLM2's own answers to the trait specs' *extraction* questions
(under the positive and the negative instructions), never the labelled set.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

LABELLED = Path(__file__).resolve().parent.parent / "data" / "judges" / "labelled.jsonl"
DEFAULT_OUT = Path("benchmarks/results/judges/agreement.json")


# ---------------------------------------------------------------------------------------------
# statistics (no scipy)

def ranks(xs: Sequence[float]) -> List[float]:
    """1-based ranks, ties get the mean of their ranks."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for t in range(i, j + 1):
            r[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return r


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None  # a constant: no correlation defined
    return sxy / math.sqrt(sxx * syy)


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    return pearson(ranks(x), ranks(y))


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> Optional[float]:
    """P(score of a positive > score of a negative), ties count 1/2; None without both classes."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def metrics(pred: Sequence[Optional[float]], human: Sequence[float], threshold: float = 50.0) -> dict:
    keep = [i for i, p in enumerate(pred) if p is not None and math.isfinite(p)]
    p = [float(pred[i]) for i in keep]
    h = [float(human[i]) for i in keep]
    rnd = lambda v: None if v is None else round(v, 4)
    acc = sum((a >= threshold) == (b >= threshold) for a, b in zip(p, h)) / len(p) if p else None
    return {"n": len(pred), "n_scored": len(keep),
            "no_score": round(1 - len(keep) / len(pred), 4) if pred else None,
            "spearman": rnd(spearman(p, h)), "auroc": rnd(auroc(p, [v >= threshold for v in h])),
            "accuracy_at_50": rnd(acc), "mean_score": rnd(sum(p) / len(p)) if p else None}


# ---------------------------------------------------------------------------------------------

def load_labelled(path=LABELLED, traits: Optional[Sequence[str]] = None) -> List[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            missing = {"trait", "question", "answer", "trait_score", "coherence"} - set(r)
            if missing:
                raise ValueError(f"{path}:{n}: missing {sorted(missing)}")
            if traits is None or r["trait"] in traits:
                rows.append(r)
    return rows


def measure_agreement(judge, labelled_path=LABELLED, traits: Optional[Sequence[str]] = None,
                      progress: bool = False, coherence: bool = True) -> dict:
    """Agreement of ``judge`` with the labelled set, per trait and overall (module docstring)."""
    from ..extraction.spec import load_spec

    rows = load_labelled(labelled_path, traits)
    if not rows:
        raise ValueError(f"no labelled rows in {labelled_path} for traits {traits}")
    names = list(dict.fromkeys(r["trait"] for r in rows))
    result = {"judge": judge.name, "labelled": str(labelled_path), "n_items": len(rows), "per_trait": {}}
    all_t, all_h, all_c, all_hc = [], [], [], []
    t_trait = t_coh = 0.0
    for name in names:
        sub = [r for r in rows if r["trait"] == name]
        qs, ans = [r["question"] for r in sub], [r["answer"] for r in sub]
        spec = load_spec(name)
        t0 = time.perf_counter()
        ts = judge.score(spec, qs, ans, progress=progress)
        t1 = time.perf_counter()
        cs = judge.coherence(qs, ans, progress=progress) if coherence else [None] * len(sub)
        t2 = time.perf_counter()
        t_trait, t_coh = t_trait + t1 - t0, t_coh + t2 - t1
        hs, hc = [r["trait_score"] for r in sub], [r["coherence"] for r in sub]
        entry = {"trait": metrics(ts, hs), "coherence": metrics(cs, hc) if coherence else None,
                 "scores": [None if s is None else round(s, 2) for s in ts],
                 "coherence_scores": [None if s is None else round(s, 2) for s in cs]}
        entry["trait"]["seconds_per_item"] = round((t1 - t0) / len(sub), 4)
        if coherence:
            entry["coherence"]["seconds_per_item"] = round((t2 - t1) / len(sub), 4)
        result["per_trait"][name] = entry
        all_t += ts
        all_h += hs
        all_c += cs
        all_hc += hc
    overall = {"trait": metrics(all_t, all_h), "coherence": metrics(all_c, all_hc) if coherence else None}
    per = [result["per_trait"][n]["trait"]["auroc"] for n in names]
    per = [a for a in per if a is not None]
    overall["trait"]["macro_auroc"] = round(sum(per) / len(per), 4) if per else None
    overall["trait"]["seconds_per_item"] = round(t_trait / len(rows), 4)
    if coherence:
        overall["coherence"]["seconds_per_item"] = round(t_coh / len(rows), 4)
    result["overall"] = overall
    return result


def format_table(results: Sequence[dict]) -> str:
    """Per trait and overall: trait AUROC / Spearman / no-score, coherence AUROC / Spearman."""
    def f(v, w=6):
        return f"{'-':>{w}}" if v is None else f"{v:>{w}.3f}"
    head = (f"{'judge':<44} {'trait':<14} {'AUROC':>6} {'rho':>6} {'none':>6} {'s/it':>6} | "
            f"{'cAUROC':>6} {'c-rho':>6} {'cnone':>6} {'s/it':>6}")
    lines = [head, "-" * len(head)]
    for res in results:
        items = list(res["per_trait"].items()) + [("OVERALL", res["overall"])]
        for name, e in items:
            t, c = e["trait"], e["coherence"] or {}
            lines.append(f"{res['judge'][:44]:<44} {name:<14} {f(t['auroc'])} {f(t['spearman'])} "
                         f"{f(t['no_score'])} {f(t.get('seconds_per_item'))} | {f(c.get('auroc'))} "
                         f"{f(c.get('spearman'))} {f(c.get('no_score'))} {f(c.get('seconds_per_item'))}")
        lines.append(f"{'':<44} {'macro AUROC':<14} {f(res['overall']['trait']['macro_auroc'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# calibration (not the labelled set)

def calibration_answers(model, tok, traits: Sequence[str], cache: Optional[Path] = None,
                        max_new_tokens: int = 64, seed: int = 0, progress: bool = False) -> List[dict]:
    """SmolLM2's (or ``model``'s) sampled answers to each trait spec's extraction questions
    under its positive and negative instructions (round-robin over the pairs), as
    ``{trait, side, system, question, answer}``; cached in ``cache`` (JSONL) when given."""
    from ..extraction.quick import generate_contrastive

    rows = []
    if cache is not None and Path(cache).exists():
        rows = [json.loads(l) for l in Path(cache).read_text().splitlines() if l.strip()]
    have = {r["trait"] for r in rows}
    for t in traits:
        if t in have:
            continue
        pos, neg = generate_contrastive(model, tok, t, n_per_question=1, max_new_tokens=max_new_tokens,
                                        batch_size=20, seed=seed, progress=progress, temperature=0.8)
        new = [{"trait": t, "side": side, "system": s, "question": q, "answer": a}
               for side, part in (("positive", pos), ("negative", neg)) for s, q, a in part]
        rows += new
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            with open(cache, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in new)
    return [r for r in rows if r["trait"] in traits]


def _shuffled(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    return " ".join(words)


def _looped(text: str) -> str:
    words = text.split()[:4] or ["the"]
    return " ".join((words * 12)[:24])


def _stats(xs: Sequence[float]) -> dict:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return {}
    n = len(xs)
    mean = sum(xs) / n
    return {"n": n, "mean": round(mean, 4), "sd": round(math.sqrt(sum((x - mean) ** 2 for x in xs) / n), 4),
            "median": round(xs[n // 2], 4), "p10": round(xs[n // 10], 4), "p90": round(xs[(9 * n) // 10], 4)}


def calibrate(answers: Sequence[dict], judges: Dict[str, object]) -> dict:
    """Statistics of the raw (pre-logistic) quantities of the embedding and likelihood judges on
    calibration answers: the trait margin on positive- vs negative-instruction answers (and the
    AUROC separating them), and the coherence inputs on the answers vs word-shuffled copies,
    looped copies and answers paired with another trait's question."""
    from ..extraction.spec import load_spec

    rng = random.Random(0)
    out = {"n_answers": len(answers)}
    traits = list(dict.fromkeys(r["trait"] for r in answers))
    qs = [r["question"] for r in answers]
    ans = [r["answer"] for r in answers]
    shuffled = [_shuffled(a, rng) for a in ans]
    looped = [_looped(a) for a in ans]
    other_q = qs[len(qs) // 2:] + qs[:len(qs) // 2]  # a question of another trait
    for name, judge in judges.items():
        entry = {}
        margins, labels = [], []
        for t in traits:
            sub = [r for r in answers if r["trait"] == t]
            spec = load_spec(t)
            if hasattr(judge, "margins"):
                if name == "embedding":
                    m = judge.margins(spec, [r["answer"] for r in sub]).tolist()
                else:
                    m = judge.margins(spec, [r["question"] for r in sub], [r["answer"] for r in sub])
                margins += m
                labels += [r["side"] == "positive" for r in sub]
        if margins:
            keep = [i for i, m in enumerate(margins) if m is not None]
            entry["trait_margin"] = {
                "positive": _stats([margins[i] for i in keep if labels[i]]),
                "negative": _stats([margins[i] for i in keep if not labels[i]]),
                "all": _stats([margins[i] for i in keep]),
                "auroc_positive_vs_negative": round(auroc([margins[i] for i in keep], [labels[i] for i in keep]), 4)}
        if name == "likelihood":
            entry["neutral_logprob"] = {
                "answers": _stats(judge.neutral_logprobs(qs, ans)),
                "shuffled": _stats(judge.neutral_logprobs(qs, shuffled)),
                "looped": _stats(judge.neutral_logprobs(qs, looped))}
        if name == "embedding":
            entry["question_answer_cosine"] = {
                "answers": _stats(judge.relevance(qs, ans).tolist()),
                "other_question": _stats(judge.relevance(other_q, ans).tolist())}
        out[name] = entry
    return out


# ---------------------------------------------------------------------------------------------

def llm_diagnostics(judge, labelled_path, traits, progress=False) -> dict:
    """For an LLM judge measured with ``cache_distributions``: how much probability the integer
    replies got, and the agreement of its unthresholded scores (``min_mass=0``), recomputed from
    the cached distributions (no new forwards)."""
    masses = [float(d.sum()) for d in judge.cache.values()]
    saved, name = judge.min_mass, judge.name
    judge.min_mass, judge.name = 0.0, name + " (min_mass=0)"
    try:
        raw = measure_agreement(judge, labelled_path, traits, progress=progress)
    finally:
        judge.min_mass, judge.name = saved, name
    return {"integer_mass": _stats(masses), "min_mass": saved,
            "unthresholded": {"overall": raw["overall"],
                              "per_trait": {t: {"trait": e["trait"], "coherence": e["coherence"]}
                                            for t, e in raw["per_trait"].items()}}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m personakern.judges.agreement",
                                 description="agreement of judges with the labelled set")
    ap.add_argument("--judges", default="llm,embedding,likelihood",
                    help="comma-separated kinds (llm, embedding, likelihood, default, http)")
    ap.add_argument("--labelled", default=str(LABELLED))
    ap.add_argument("--traits", default=None, help="comma-separated subset of traits")
    ap.add_argument("--model", default="smollm2", help="model for the llm/likelihood judges")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--calibrate", default=None, metavar="JSONL",
                    help="also compute the calibration statistics, caching the calibration answers here")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--http-base-url", default=None)
    ap.add_argument("--http-model", default=None)
    args = ap.parse_args(argv)

    import torch
    from . import make_judge

    traits = args.traits.split(",") if args.traits else None
    kinds = [k.strip() for k in args.judges.split(",") if k.strip()]
    model = tok = None
    if {"llm", "likelihood", "default"} & set(kinds) or args.calibrate:
        from ..models import load_model
        model, tok = load_model(args.model)
    kw = {} if args.batch_size is None else {"batch_size": args.batch_size}
    results, judges = [], {}
    for kind in kinds:
        if kind == "http":
            judge = make_judge("http", base_url=args.http_base_url, model_name=args.http_model)
        elif kind == "llm":
            judge = make_judge("llm", model, tok, cache_distributions=True, **kw)
        else:
            judge = make_judge(kind, model, tok, **kw)
        judges[kind] = judge
        print(f"measuring {judge.name} ...", file=sys.stderr, flush=True)
        results.append(measure_agreement(judge, args.labelled, traits, progress=args.progress))
        if kind == "llm":
            results[-1].update(llm_diagnostics(judge, args.labelled, traits, args.progress))
    print(format_table(results))
    for res in results:
        if "unthresholded" in res:
            o = res["unthresholded"]["overall"]
            print(f"{res['judge']}: integer mass {res['integer_mass']}; with min_mass=0: trait AUROC "
                  f"{o['trait']['auroc']} rho {o['trait']['spearman']}, coherence AUROC "
                  f"{o['coherence']['auroc']} rho {o['coherence']['spearman']}")
    doc = {"format": "personakern.judges.agreement.v1", "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
           "model": args.model, "results": results}
    if args.calibrate:
        answers = calibration_answers(model, tok, traits or list(dict.fromkeys(
            r["trait"] for r in load_labelled(args.labelled))), cache=Path(args.calibrate), progress=args.progress)
        cal_judges = {k: judges.get(k) or make_judge(k, model, tok) for k in ("embedding", "likelihood")}
        doc["calibration"] = calibrate(answers, cal_judges)
        print(json.dumps(doc["calibration"], indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
