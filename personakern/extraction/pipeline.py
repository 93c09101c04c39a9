"""The full extraction pipeline: trait spec -> judged answers -> vectors -> layer choice -> report.

Stages (each cached in ``out_dir``, so an interrupted run resumes where it stopped):

1. **generate**: every extraction question under every positive and every negative system
   prompt of the spec, ``n_per_question`` samples each (batched, sampled); the evaluation
   questions under ``heldout_pairs`` instruction pairs per side (held-out set; the first pair
   chosen round-robin and cached with the extraction answers, the others in a cache of their
   own).
2. **judge**: trait score and coherence of every answer (a pluggable :mod:`personakern.judges`).
3. **filter**: keep positive answers with trait >= ``pos_threshold``, negative answers with
   trait < ``neg_threshold``, and only answers with coherence >= ``coherence_threshold``
   (answers the judge could not score are dropped and counted).
4. **vectors**: response / prompt / last-prompt-token means of every block's output for the
   kept answers — captured by the engine while the answers were generated (no second forward
   pass, see :mod:`personakern.state.capture`); vector = mean(positive) - mean(negative), per layer.
5. **layers**: per layer, the AUROC of the held-out answers' projections (response means on the
   unit response vector; positive vs negative: judge-filtered like the training answers when at
   least :data:`HELDOUT_MIN` per side pass, else labelled by instruction side); a steering sweep over layers and alphas on the
   evaluation questions (no system prompt), each answer judged; the chosen layer is the one with
   the largest rise of the mean trait score over the unsteered baseline while mean coherence
   stays >= ``coherence_floor``.

Outputs: ``vectors.safetensors`` (traits ``<name>`` = response average, ``<name>.prompt``,
``<name>.last_prompt``; metadata holds counts, judge, spec hash, chosen layer and the whole
report), ``report.json`` and ``report.png``.

Under a launcher (``torchrun`` / ``accelerate launch``; :mod:`personakern.distributed`) every
rank runs :func:`extract` with its own copy of the model: generation batches, judge chunks and
steering-sweep cells go round robin to the ranks, each unit with the seed of its index, so the
results equal a one-process run's; each rank appends to caches of its own
(:class:`~personakern.extraction.generate.RankedLog`; activations are one file per batch).
Rank 0 computes the vectors, AUROC and layer choice and writes the outputs; ``out_dir`` must be
a folder every rank sees (one machine, or a shared file system).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import distributed
from ..utils import atomic_write_json
from ..vectors import PersonaVector, VectorSet, model_fingerprint
from ..state import KINDS
from .generate import ActStore, GenSettings, RankedLog, generate_cached, settings_hash
from .spec import TraitSpec, load_spec
from .vllm_generate import check_engine
from .sweep import choose_layer, default_sweep_layers, steering_sweep  # noqa: F401 (re-exported)


# The held-out AUROC uses judge-filtered answers when at least this many per side pass the
# filter; otherwise all held-out answers, labelled by the side of their instruction (an AUROC
# over a handful of answers is noise).
HELDOUT_MIN = 10


@dataclass
class ExtractConfig:
    n_per_question: int = 1               # samples per (instruction pair, extraction question)
    gen: GenSettings = field(default_factory=GenSettings)
    pos_threshold: float = 50.0
    neg_threshold: float = 50.0
    coherence_threshold: float = 50.0
    min_kept: int = 5                     # fewer kept answers on a side is an error
    sweep_layers: Optional[List[int]] = None   # default: 6 layers spread over 15-85% of depth
    sweep_alphas: Tuple[float, ...] = (2.0, 4.0, 6.0, 8.0)
    sweep_questions: int = 20             # first k evaluation questions
    heldout_pairs: int = 3                # held-out answers per (evaluation question, side): one per
                                          # instruction pair, up to this many pairs
    coherence_floor: float = 50.0
    sweep: bool = True
    engine: str = "hf"                    # what generates the answers and gathers activations: "hf" | "vllm"
    sweep_engine: str = "hf"              # "vllm": every cell in one batch on a vLLM engine
    judge_chunk: int = 64                 # answers per judge call; under a launcher, the unit the
                                          # ranks share (smaller: finer balance, smaller judge batches)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sweep_alphas"] = list(self.sweep_alphas)
        return d


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a positive's score > a negative's), ties count one half (Mann-Whitney U / (n_p n_n))."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def filter_answers(records: Sequence[dict], side: str, cfg: ExtractConfig) -> Tuple[List[dict], dict]:
    """Records kept by the paper's rule, and counts of why the rest were dropped."""
    kept, why = [], {"no_score": 0, "trait": 0, "incoherent": 0}
    for r in records:
        t, c = r.get("trait_score"), r.get("coherence")
        if t is None or c is None or (isinstance(t, float) and math.isnan(t)):
            why["no_score"] += 1
        elif (t < cfg.pos_threshold) if side == "positive" else (t >= cfg.neg_threshold):
            why["trait"] += 1
        elif c < cfg.coherence_threshold:
            why["incoherent"] += 1
        else:
            kept.append(r)
    return kept, why


def _jobs(spec: TraitSpec, n: int) -> List[dict]:
    jobs = []
    for side, k in (("positive", 0), ("negative", 1)):
        for p, pair in enumerate(spec.instructions):
            for s in range(n):
                for q, question in enumerate(spec.questions):
                    jobs.append({"id": f"x:{side[:3]}:{p}:{q}:{s}", "split": "extract", "side": side,
                                 "pair": p, "q": q, "sample": s, "system": pair[k], "question": question})
        for q, question in enumerate(spec.eval_questions):
            p = q % len(spec.instructions)
            jobs.append({"id": f"h:{side[:3]}:{p}:{q}", "split": "heldout", "side": side, "pair": p,
                         "q": q, "sample": 0, "system": spec.instructions[p][k], "question": question})
    return jobs


def _heldout_extra(spec: TraitSpec, pairs: int) -> List[dict]:
    """Held-out jobs beyond the one per (evaluation question, side) of :func:`_jobs`: the next
    instruction pairs in turn, ``pairs`` in all per question and side. They live in their own
    cache, so raising ``heldout_pairs`` never invalidates a run's answers."""
    P = len(spec.instructions)
    jobs = []
    for side, k in (("positive", 0), ("negative", 1)):
        for q, question in enumerate(spec.eval_questions):
            for extra in range(1, min(pairs, P)):
                p = (q + extra) % P
                jobs.append({"id": f"h:{side[:3]}:{p}:{q}", "split": "heldout", "side": side, "pair": p,
                             "q": q, "sample": 0, "system": spec.instructions[p][k], "question": question})
    return jobs


def judge_cached(judge, spec: TraitSpec, records: Sequence[dict], cache, progress: bool,
                 chunk: int = 64, shard: bool = False) -> None:
    """Adds ``trait_score`` and ``coherence`` to each record (in place), judging only the ones
    not yet in ``cache`` (a JsonlLog or RankedLog; chunks appended as they finish).

    ``shard=True`` under a launcher (a collective call): chunk ``c`` of the records left to
    judge goes to rank ``c % world`` — the same chunks a one-process run judges, so a judge
    that batches gets the same batches — and every rank ends with every score."""
    done = {r["id"]: r for r in cache}
    todo = [r for r in records if r["id"] not in done]
    chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
    if shard:
        distributed.barrier()  # every rank has read the cache (and so agrees on the chunks) before any appends
        chunks = distributed.shard(chunks)
    new_all = {}
    for part in chunks:
        qs, ans = [r["question"] for r in part], [r["answer"] for r in part]
        ts = judge.score(spec, qs, ans, progress=progress)
        cs = judge.coherence(qs, ans, progress=progress)
        new = [{"id": r["id"], "trait_score": _num(t), "coherence": _num(c)} for r, t, c in zip(part, ts, cs)]
        cache.append(new)
        new_all.update((n["id"], n) for n in new)
    for got in distributed.gather(new_all) if shard else [new_all]:
        done.update(got)
    for r in records:
        r["trait_score"], r["coherence"] = done[r["id"]]["trait_score"], done[r["id"]]["coherence"]


def _num(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 3)


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def extract(model, tok, trait: Union[str, dict, TraitSpec], judge, out_dir: Union[str, Path],
            cfg: Optional[ExtractConfig] = None, progress: bool = True, log=print, llm=None) -> Optional[VectorSet]:
    """Run the pipeline (see the module docstring); returns the VectorSet also saved to
    ``out_dir/vectors.safetensors`` — on rank 0; other ranks of a launched run return None
    once rank 0 has written the outputs. ``llm``: one running vLLM engine on the model for the
    stages that run on vLLM (:func:`~personakern.extraction.vllm_generate.start_engine` with
    ``capture=True`` for ``engine="vllm"``, ``spare=1`` for ``sweep_engine="vllm"``; pass the
    same one to a vLLM judge); without it each such stage starts and closes an engine."""
    cfg = cfg or ExtractConfig()
    if cfg.judge_chunk < 1:   # checked here, not after generating everything
        raise ValueError(f"judge_chunk must be at least 1, got {cfg.judge_chunk}")
    check_engine(cfg.engine)
    check_engine(cfg.sweep_engine, "sweep engine")
    main = distributed.is_main()
    if not main:
        progress, log = False, (lambda s: None)
    spec = load_spec(trait)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = model_fingerprint(model)
    L = int(fp["num_hidden_layers"])
    times = {}
    t0 = time.perf_counter()
    key = settings_hash(fp, spec.hash, cfg.gen.to_dict(), cfg.n_per_question)
    if cfg.engine != "hf":   # sampled answers depend on the engine: a cache of its own
        key = settings_hash(key, cfg.engine)

    # 1. generate (answers and their activation means)
    store = ActStore(out / f"acts-{key}")
    runs = [(_jobs(spec, cfg.n_per_question), RankedLog(out / f"answers-{key}.jsonl"), cfg.gen,
             f"{spec.name}: answers", store)]
    extra = _heldout_extra(spec, cfg.heldout_pairs)
    if extra:
        hkey = settings_hash(key, "heldout-extra", cfg.heldout_pairs)
        hgen = replace(cfg.gen, seed=cfg.gen.seed + 1)  # other batch seeds than the main cache's
        runs.append((extra, RankedLog(out / f"heldout-{hkey}.jsonl"), hgen, f"{spec.name}: more held-out answers",
                     ActStore(out / f"acts-heldout-{hkey}")))
    if cfg.engine == "vllm":
        from .vllm_generate import generate_runs_vllm
        results = generate_runs_vllm(model, tok, runs, progress, llm=llm)
    else:
        results = [generate_cached(model, tok, jobs, cache, gen, progress, desc=desc, acts=st, shard=True)
                   for jobs, cache, gen, desc, st in runs]
    recs, stores = {}, {}
    for got, run in zip(results, runs):
        recs.update(got)
        stores.update((r, run[4]) for r in got)
    records = [r for r in recs.values()]
    times["generate_s"] = time.perf_counter() - t0

    def load_acts(ids):
        """[N, 3, L, D] activation means of ``ids``, from whichever store holds each."""
        groups = {}
        for i, rid in enumerate(ids):
            groups.setdefault(id(stores[rid]), (stores[rid], []))[1].append((i, rid))
        out_t = None
        for st, items in groups.values():
            a = st.load([rid for _, rid in items])
            if out_t is None:
                out_t = a.new_empty((len(ids),) + tuple(a.shape[1:]))
            out_t[torch.tensor([i for i, _ in items])] = a
        return out_t

    # 2. judge
    t1 = time.perf_counter()
    jkey = settings_hash(key, judge.name)
    judge_cached(judge, spec, records, RankedLog(out / f"judged-{jkey}.jsonl"), progress,
                 chunk=cfg.judge_chunk, shard=True)
    times["judge_s"] = time.perf_counter() - t1

    # 3. filter
    def part(split, side):
        return [r for r in records if r["split"] == split and r["side"] == side and r["answer"]]
    counts, kept = {}, {}
    for side in ("positive", "negative"):
        gen = [r for r in records if r["split"] == "extract" and r["side"] == side]
        k, why = filter_answers(part("extract", side), side, cfg)
        why["empty"] = len(gen) - len(part("extract", side))
        kept[side] = k
        counts[side] = {"generated": len(gen), "kept": len(k), "dropped": why,
                        "mean_trait_score": _mean(r["trait_score"] for r in gen),
                        "mean_coherence": _mean(r["coherence"] for r in gen)}
    log(f"{spec.name}: kept {counts['positive']['kept']}/{counts['positive']['generated']} positive and "
        f"{counts['negative']['kept']}/{counts['negative']['generated']} negative answers")
    for side in ("positive", "negative"):
        if len(kept[side]) < cfg.min_kept:
            c = counts[side]
            raise RuntimeError(
                f"{spec.name}: only {c['kept']} {side} answers passed the filter (dropped: {c['dropped']}; "
                f"need {cfg.min_kept}). Sample more (n_per_question), loosen the thresholds, or use "
                f"another judge. Answers and scores are cached in {out}, so a rerun resumes.")

    # 4. vectors, on rank 0; every rank steers with them in the sweep, so they are broadcast
    t1 = time.perf_counter()
    vecs = None
    if main:
        acts = store.load([r["id"] for r in kept["positive"] + kept["negative"]])     # [N, 3, L, D]
        n_pos = len(kept["positive"])
        vecs = {k: acts[:n_pos, i].mean(0) - acts[n_pos:, i].mean(0) for i, k in enumerate(KINDS)}
    vecs = distributed.broadcast(vecs)
    times["collect_s"] = time.perf_counter() - t1

    # 5b. steering sweep, before 5a because every rank takes part (cells shared out among the ranks)
    sweep = None
    if cfg.sweep:
        t1 = time.perf_counter()
        sweep = steering_sweep(model, tok, spec, vecs["response"], judge, out, cfg, key, progress,
                               engine=cfg.sweep_engine, llm=llm)
        times["sweep_s"] = time.perf_counter() - t1
    if not main:
        distributed.barrier()  # until rank 0 has written the outputs
        return None

    # 5a. held-out AUROC per layer
    held = {s: filter_answers(part("heldout", s), s, cfg)[0] for s in ("positive", "negative")}
    held_rule = "judge-filtered like the training answers"
    if min(len(v) for v in held.values()) < HELDOUT_MIN:
        held = {s: part("heldout", s) for s in ("positive", "negative")}
        held_rule = f"labelled by instruction side (fewer than {HELDOUT_MIN} per side passed the judge filter)"
    hacts = load_acts([r["id"] for r in held["positive"] + held["negative"]])
    hacts = {k: hacts[:, i] for i, k in enumerate(KINDS)}
    hp = len(held["positive"])
    layer_auroc = {}
    for kind, basis in (("response", "response"), ("last_prompt", "last_prompt")):
        unit = vecs[kind] / vecs[kind].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        proj = (hacts[basis] * unit).sum(-1)                                  # [N, L]
        layer_auroc[kind] = [round(auroc(proj[:hp, l], proj[hp:, l]), 4) for l in range(L)]

    report = {
        "trait": spec.name, "description": spec.description, "spec_hash": spec.hash,
        "spec_source": spec.source, "model": fp, "judge": judge.name, "config": cfg.to_dict(),
        "counts": counts, "heldout": {"positive": len(held["positive"]), "negative": len(held["negative"]),
                                      "rule": held_rule},
        "layer_auroc": layer_auroc, "norms": [round(float(x), 4) for x in vecs["response"].norm(dim=-1)],
    }

    # the layer: by the sweep, else by held-out AUROC
    if sweep is not None:
        report["sweep"] = sweep
        layer, alpha, reason = choose_layer(sweep, cfg.coherence_floor)
    else:
        best = max(range(L), key=lambda l: layer_auroc["response"][l])
        layer, alpha, reason = best, None, "no steering sweep: the layer with the best held-out AUROC"
    report["chosen"] = {"layer": layer, "alpha": alpha, "reason": reason,
                        "auroc": layer_auroc["response"][layer]}
    times["total_s"] = time.perf_counter() - t0
    report["seconds"] = {k: round(v, 1) for k, v in times.items()}
    report["processes"] = distributed.world_size()

    meta = {"model": fp, "trait_spec": spec.name, "trait_spec_hash": spec.hash, "judge": judge.name,
            "n_positive": counts["positive"]["kept"], "n_negative": counts["negative"]["kept"],
            "n_generated": {s: counts[s]["generated"] for s in counts},
            "thresholds": {"positive": cfg.pos_threshold, "negative": cfg.neg_threshold,
                           "coherence": cfg.coherence_threshold},
            "layer": layer, "source": "personakern.extraction.pipeline.extract",
            "trait_description": spec.description}
    if alpha is not None:
        meta["demo_alpha"] = alpha
    vs = VectorSet()
    vs.add(PersonaVector(spec.name, vecs["response"], dict(meta, averaged_over="response", report=report)))
    vs.add(PersonaVector(f"{spec.name}.prompt", vecs["prompt"], dict(meta, averaged_over="prompt")))
    vs.add(PersonaVector(f"{spec.name}.last_prompt", vecs["last_prompt"],
                         dict(meta, averaged_over="last_prompt_token")))
    vs.save(out / "vectors.safetensors")
    atomic_write_json(out / "report.json", report)
    from .report import render_png
    render_png(report, out / "report.png")
    log(f"{spec.name}: layer {layer} (held-out AUROC {report['chosen']['auroc']}); wrote {out}/vectors.safetensors, "
        f"report.json, report.png")
    distributed.barrier()
    return vs
