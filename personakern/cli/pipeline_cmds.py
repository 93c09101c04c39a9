"""CLI commands of the extraction pipeline: ``traits``, ``extract``, ``report``, ``vectors``."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_traits(args):
    from personakern.extraction import spec as S
    if args.action == "list":
        for name in S.builtin_names():
            ts = S.load_spec(name)
            print(f"{name:<14} {len(ts.instructions)} pairs, {len(ts.questions)}+{len(ts.eval_questions)} "
                  f"questions  {ts.description[:70]}{'…' if len(ts.description) > 70 else ''}")
        return 0
    if args.action == "show":
        _need(args, "show")
        ts = S.load_spec(args.name)
        if args.json:
            print(json.dumps(ts.to_dict(), indent=2, ensure_ascii=False))
            return 0
        print(f"{ts.name}  ({ts.source}, hash {ts.hash})\n\n{ts.description}\n\ninstructions (positive / negative):")
        for i, (p, n) in enumerate(ts.instructions):
            print(f"  {i}+ {p}\n  {i}- {n}")
        print(f"\nextraction questions ({len(ts.questions)}):")
        print("\n".join(f"  - {q}" for q in ts.questions))
        print(f"\nevaluation questions ({len(ts.eval_questions)}):")
        print("\n".join(f"  - {q}" for q in ts.eval_questions))
        print(f"\nrubric:\n{ts.rubric}")
        return 0
    if args.action == "validate":
        _need(args, "validate")
        bad = 0
        for target in [args.name] + list(args.more or []):
            try:
                ts = S.load_spec(target)
                print(f"ok  {target}: {ts.name}, {len(ts.instructions)} pairs, {len(ts.questions)} + "
                      f"{len(ts.eval_questions)} questions, hash {ts.hash}")
            except (S.TraitSpecError, FileNotFoundError) as e:
                bad += 1
                print(f"BAD {target}: {e}")
        return 1 if bad else 0
    if args.action == "new":
        _need(args, "new")
        if not args.description:
            raise ValueError("traits new needs --description 'what the trait is'")
        from personakern.extraction.draft import draft_spec, http_chat, local_chat
        out = Path(args.out or f"{args.name}.json")
        if out.exists() and not args.force:
            raise FileExistsError(f"{out} exists; pass --force to overwrite it")
        if args.endpoint:
            chat = http_chat(args.endpoint, args.endpoint_model, args.api_key)
            who = f"{args.endpoint} ({args.endpoint_model})"
        else:
            from .common import load_model_of as _load
            model, tok = _load(args)
            chat = local_chat(model, tok)
            who = args.model
        d, problems = draft_spec(args.name, args.description, chat, progress=True)
        from personakern.utils import atomic_write_text
        atomic_write_text(out, json.dumps(d, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote draft {out} (drafted by {who})")
        if problems:
            print("the draft is not complete yet; edit it, then `personakern traits validate "
                  f"{out}`:\n  - " + "\n  - ".join(problems))
        return 0
    raise ValueError(f"unknown traits action {args.action!r}")


def _need(args, action):
    if not args.name:
        raise ValueError(f"traits {action} needs a trait name or spec path")


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s).rstrip("/").rsplit("/", 1)[-1].lower())


def cmd_extract(args):
    """Under ``torchrun``/``accelerate launch`` every rank runs this with the model on its own
    device and a share of the work (see :mod:`personakern.extraction.pipeline`); rank 0 prints
    the report, the others exit 0 once it is written."""
    from personakern import distributed
    from personakern.extraction.spec import load_spec
    from personakern.judges import make_judge
    from .common import load_model_of as _load

    spec = load_spec(args.trait)  # fail on a bad spec before loading anything
    if args.questions:
        import dataclasses
        spec = dataclasses.replace(spec, questions=spec.questions[:args.questions],
                                   eval_questions=spec.eval_questions[:args.questions])
    launched = distributed.init()
    model, tok = _load(args)
    if launched:
        model.to(distributed.local_device())
    engine, judge_engine = args.engine, args.judge_engine or args.engine
    sweep_engine = args.sweep_engine or args.engine
    kw = _judge_kw(args)
    llm = None   # one vLLM engine for every stage that runs on vLLM (two in one process cannot share it)
    if "vllm" in (engine, sweep_engine) or (judge_engine == "vllm" and not args.judge_model):
        from personakern.extraction.vllm_generate import start_engine
        llm = start_engine(model, capture=engine == "vllm", spare=int(sweep_engine == "vllm"))
        if judge_engine == "vllm" and not args.judge_model:
            kw["llm"] = llm
    try:
        return _extract(args, spec, model, tok, make_judge(args.judge, model=model, tokenizer=tok,
                                                           engine=judge_engine, **kw),
                        engine, sweep_engine, llm)
    finally:
        if llm is not None:
            from personakern.vllm.engine import close_llm
            close_llm(llm)


def _extract(args, spec, model, tok, judge, engine, sweep_engine, llm):
    from personakern import distributed
    from personakern.extraction.generate import GenSettings
    from personakern.extraction.pipeline import ExtractConfig, extract
    from personakern.extraction.report import render_text
    cfg = ExtractConfig(
        n_per_question=args.n, gen=GenSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                               batch_size=args.batch_size, seed=args.seed),
        pos_threshold=args.pos_threshold, neg_threshold=args.neg_threshold,
        coherence_threshold=args.coherence_threshold, min_kept=args.min_kept,
        sweep_layers=args.sweep_layers, sweep_alphas=tuple(args.sweep_alphas),
        sweep_questions=args.sweep_questions, heldout_pairs=args.heldout_pairs, coherence_floor=args.coherence_floor, sweep=not args.no_sweep,
        engine=engine, sweep_engine=sweep_engine, judge_chunk=args.judge_chunk)
    out = Path(args.out or f"personakern-runs/{spec.name}-{_slug(args.model)}")
    try:
        vs = extract(model, tok, spec, judge, out, cfg, progress=not args.quiet,
                     log=lambda s: print(s, file=sys.stderr), llm=llm)
    except BaseException:
        distributed.finish(ok=False)   # leave the group without the closing barrier
        raise
    if vs is not None:  # rank 0
        print(render_text(vs[spec.name].meta["report"]))
    distributed.finish()
    return 0


def _judge_kw(args) -> dict:
    kw = {}
    if getattr(args, "judge_url", None):
        kw["base_url"] = args.judge_url
    if getattr(args, "judge_model", None):
        # the http judge's model name; for llm / likelihood a local judge model to load
        kw["model_name" if "http" in str(args.judge) else "model_path"] = args.judge_model
        if not any(k in str(args.judge) for k in ("http", "llm", "likelihood", "default")):
            raise SystemExit(f"personakern: --judge-model applies to the http, llm and likelihood judges, "
                             f"not {args.judge!r}")
        if "http" in str(args.judge) and any(k in str(args.judge) for k in ("llm", "likelihood")):
            raise SystemExit("personakern: --judge-model names the http model; a local judge model "
                             "cannot be given as well")
    return kw


def cmd_report(args):
    from personakern.extraction.report import report_files
    print(report_files(args.vectors, out_png=args.png, out_json=args.json))
    return 0


def cmd_vectors(args):
    from personakern import interop
    from personakern.vectors import VectorSet, load_vectors
    model = None
    if not args.no_model:
        from .common import load_model_of as _load
        model, _ = _load(args)
    if args.action == "import":
        kw = {"num_layers": args.num_layers} if args.num_layers and model is None else {}
        fmt = (args.format or "").lower()
        if fmt in ("gguf", "repeng", "llama.cpp") or (not fmt and str(args.src).endswith(".gguf")):
            pv = interop.import_gguf(args.src, model=model, trait=args.trait, **kw)
        else:
            pv = interop.import_vector(args.src, model=model, trait=args.trait, format=args.format)
        vs = pv if isinstance(pv, VectorSet) else VectorSet([pv])
        vs.save(args.dst)
        print(f"wrote {args.dst}: traits {vs.traits}")
        return 0
    if args.action == "export":
        vs = load_vectors(args.src, model=model)
        trait = args.trait or (vs.traits[0] if len(vs) == 1 else None)
        if trait is None:
            raise ValueError(f"{args.src} holds {vs.traits}; pass --trait")
        dst = Path(args.dst)
        fmt = args.format or {".gguf": "gguf", ".pt": "reference", ".pth": "reference"}.get(dst.suffix)
        if fmt == "gguf":
            interop.export_gguf(vs[trait], dst, layers=args.layers or None, scale=args.scale,
                                model_hint=args.model_hint)
        elif fmt == "reference":
            interop.export_reference_pt(vs[trait], dst)
        else:
            raise ValueError(f"cannot tell the export format of {dst}: use .gguf or .pt, or --format gguf|reference")
        print(f"wrote {dst} ({fmt}) from trait {trait!r}")
        return 0
    raise ValueError(f"unknown vectors action {args.action!r}")


def register(sub) -> None:
    t = sub.add_parser("traits", help="list, show, validate or draft trait specs")
    t.add_argument("action", choices=["list", "show", "validate", "new"])
    t.add_argument("name", nargs="?", help="built-in trait name or spec path (new: the new trait's name)")
    t.add_argument("more", nargs="*", help="validate: more specs")
    t.add_argument("--json", action="store_true", help="show: print the spec as JSON")
    t.add_argument("--description", help="new: what the trait is, in words")
    t.add_argument("--out", help="new: where to write the draft (default NAME.json)")
    t.add_argument("--force", action="store_true", help="new: overwrite an existing file")
    t.add_argument("--model", default="smollm2", help="new: local model that drafts the spec")
    t.add_argument("--endpoint", help="new: OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1) instead")
    t.add_argument("--endpoint-model", default="gpt-4o-mini", help="new: model name at the endpoint")
    t.add_argument("--api-key", default=None, help="new: endpoint key (default: $OPENAI_API_KEY)")
    t.set_defaults(func=cmd_traits)

    e = sub.add_parser("extract", help="the full pipeline: generate, judge, filter, vectors, layer sweep, report")
    e.add_argument("--trait", default="evil", help="built-in trait or spec path (default: evil)")
    e.add_argument("--model", default="smollm2")
    e.add_argument("--backend", default=None)
    e.add_argument("--judge", default="default", help="default (likelihood) | llm | likelihood | embedding | http | 'trait=KIND;coherence=KIND'")
    e.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="what generates the answers and gathers their activations: hf (generate() in this "
                        "process, default) or vllm (a vLLM engine on the model folder: faster, needs vLLM); "
                        "also the default of --judge-engine and --sweep-engine")
    e.add_argument("--judge-engine", default=None, choices=["hf", "vllm"],
                   help="what runs the llm/likelihood judges: hf (the extracted model in this process) "
                        "or vllm (a vLLM engine on the same model folder, or --judge-model; same scores); "
                        "default: --engine")
    e.add_argument("--judge-url", default=None, help="http judge: OpenAI-compatible base URL")
    e.add_argument("--judge-model", default=None, help="http judge: model name; llm/likelihood judge: a local model to judge with "
                        "(default: the extracted model)")
    e.add_argument("--out", default=None, help="run folder (default personakern-runs/TRAIT-MODEL); reruns resume")
    e.add_argument("--n", "--samples", dest="n", type=int, default=1,
                   help="answers per (instruction pair, question) and side (under torchrun write --samples: "
                        "torchrun reads --n as an abbreviation of its own options)")
    e.add_argument("--questions", type=int, default=None,
                   help="use only the first K extraction and K evaluation questions (a quick run)")
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--temperature", type=float, default=0.8)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--pos-threshold", type=float, default=50.0)
    e.add_argument("--neg-threshold", type=float, default=50.0)
    e.add_argument("--coherence-threshold", type=float, default=50.0)
    e.add_argument("--min-kept", type=int, default=5)
    e.add_argument("--sweep-layers", type=int, nargs="*", default=None)
    e.add_argument("--sweep-alphas", type=float, nargs="*", default=[2.0, 4.0, 6.0, 8.0])
    e.add_argument("--sweep-questions", type=int, default=20)
    e.add_argument("--sweep-engine", default=None, choices=["hf", "vllm"],
                   help="what generates the steering sweep's answers: hf (one generate() per cell) or "
                        "vllm (every cell as one batch of per-request steering configs on a vLLM engine); "
                        "default: --engine")
    e.add_argument("--heldout-pairs", type=int, default=3,
                   help="held-out answers per evaluation question and side, one per instruction pair (default 3)")
    e.add_argument("--coherence-floor", type=float, default=50.0)
    e.add_argument("--judge-chunk", type=int, default=64,
                   help="answers per judge call; under torchrun/accelerate the unit shared among ranks (default 64)")
    e.add_argument("--no-sweep", action="store_true", help="choose the layer by held-out AUROC only")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_extract)

    r = sub.add_parser("report", help="re-render the quality report of extracted vector files")
    r.add_argument("vectors", nargs="+")
    r.add_argument("--png", default=None, help="also write the plot(s) here")
    r.add_argument("--json", default=None, help="also write a JSON summary (with cosine similarities)")
    r.set_defaults(func=cmd_report)

    v = sub.add_parser("vectors", help="import/export vectors: llama.cpp/repeng GGUF, reference .pt")
    v.add_argument("action", choices=["import", "export"])
    v.add_argument("src")
    v.add_argument("dst")
    v.add_argument("--trait", default=None)
    v.add_argument("--format", default=None, help="gguf | reference | safetensors (default: by extension)")
    v.add_argument("--layers", type=int, nargs="*", default=None, help="export: blocks to include (GGUF)")
    v.add_argument("--scale", type=float, default=1.0, help="export: multiply the vectors (GGUF)")
    v.add_argument("--model", default="smollm2", help="the model the vectors are checked against (default smollm2)")
    v.add_argument("--no-model", action="store_true", help="do not load a model (GGUF import: give --num-layers)")
    v.add_argument("--num-layers", type=int, default=None, help="import without a model: layers of the target model")
    v.add_argument("--model-hint", default=None, help="GGUF export: model_type when the vectors' metadata lacks it")
    v.add_argument("--backend", default=None)
    v.set_defaults(func=cmd_vectors)
