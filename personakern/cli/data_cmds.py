"""CLI commands on training data and fine-tunes: ``screen`` and ``shift``."""
from __future__ import annotations

import json
from pathlib import Path


def _load_on_device(name):
    import personakern
    from personakern import distributed as dist
    from .common import step
    with step(f"loading model {name}"):
        model, tok = personakern.load_model(name)
    return model.to(dist.local_device()), tok


def _fmt(v, width=10):
    return f"{'—':>{width}}" if v is None else f"{v:>+{width}.3f}"


def cmd_screen(args):
    from personakern import VectorSet
    from personakern import distributed as dist
    from personakern.screening import ScreenSettings, check_data, screen
    dist.init()
    ok = False
    try:
        data = Path(args.data)
        check_data(data, args.on_error)       # fail fast, before the model loads
        model, tok = _load_on_device(args.model)
        vs = VectorSet.load(args.vectors, model=model)
        out = Path(args.out or f"screen-{data.stem}")
        s = ScreenSettings(traits=args.traits, layer=args.layer, approx_only=args.approx_only, on_error=args.on_error,
                           rank_by=args.rank_by, batch_size=args.batch_size, chunk_batches=args.chunk_batches,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                           progress=not args.no_progress, engine=args.engine)
        summary = screen(model, tok, data, vs, out, s)
        ok = True
    finally:
        dist.finish(ok)
    if summary is None:
        return 0
    print(f"\nscreened {summary['samples']} samples of {data} ({summary['malformed']} malformed line(s) skipped), "
          f"{'approximation only' if args.approx_only else f'base answers: {args.max_new_tokens} tokens'}")
    print(f"{'trait':<14}{'block':>6}{'mean dP':>10}{'mean approx':>12}{'response':>10}{'base':>10}")
    for t, r in summary["traits"].items():
        print(f"{t:<14}{r['layer']:>6}{_fmt(r['dP']['mean'])}{_fmt(r['approx']['mean'], 12)}"
              f"{_fmt(r['response']['mean'])}{_fmt(r['base']['mean'])}")
    rank_col = summary["ranked_by"]
    print(f"\nhighest {rank_col}:")
    with open(summary["outputs"]["ranked_jsonl"], encoding="utf-8") as f:
        for _, line in zip(range(args.top), f):
            row = json.loads(line)
            print(f"  #{row['rank']:<4} line {row['line']:<6} {row['id'][:24]:<24} {_fmt(row[rank_col])}")
    print("\nwrote " + ", ".join(summary["outputs"].values()))
    return 0


def cmd_shift(args):
    from personakern import VectorSet
    from personakern import distributed as dist
    from personakern.screening.shift import default_prompts, fine_tuning_shift, read_prompts
    from personakern.utils import atomic_write_json
    if args.batch_size < 1:  # before two models load
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    dist.init()
    ok = False
    try:
        base = _load_on_device(args.base)
        ft = _load_on_device(args.finetuned)
        vs = VectorSet.load(args.vectors, model=base[0])
        traits = args.traits or vs.traits
        prompts = read_prompts(args.questions) if args.questions else default_prompts(traits)
        res = fine_tuning_shift(base, ft, vs, prompts, traits, args.batch_size, progress=dist.is_main())
        main_rank = dist.is_main()  # asked before finish(): after it every process looks like rank 0
        ok = True
    finally:
        dist.finish(ok)
    if not main_rank:
        return 0
    res.update(base=args.base, finetuned=args.finetuned, vectors=str(args.vectors),
               questions=args.questions or "evaluation questions of the traits' specs")
    print(f"\nfine-tuning shift over {res['prompts']} prompts (last prompt token, finetuned − base, "
          f"projected on the unit vector)")
    print(f"{'trait':<14}{'block':>6}{'shift':>10}{'base':>10}{'finetuned':>10}")
    for t, r in res["traits"].items():
        print(f"{t:<14}{'—' if r['layer'] is None else r['layer']:>6}{_fmt(r['shift'])}{_fmt(r['base_projection'])}"
              f"{_fmt(r['finetuned_projection'])}")
    if args.out:
        atomic_write_json(args.out, res)
        print(f"\nwrote {args.out} (per-layer shifts)")
    return 0


def register(sub) -> None:
    s = sub.add_parser("screen", help="rank a training set's samples by projection difference on persona vectors")
    s.add_argument("--data", required=True, help="JSONL: {'messages': [...]} or {'prompt', 'response'} per line")
    s.add_argument("--vectors", required=True, help="persona vector file (.safetensors)")
    s.add_argument("--model", default="smollm2", help="the base model (default: smollm2)")
    s.add_argument("--traits", nargs="+", default=None, help="traits of the file to screen (default: all)")
    s.add_argument("--layer", type=int, default=None, help="block, 0-based (default: each trait's recommended block)")
    s.add_argument("--out", default=None, help="output folder (default screen-DATASTEM); reruns resume")
    s.add_argument("--on-error", default="skip", choices=["skip", "stop"], help="malformed lines: skip and list (default) or stop")
    s.add_argument("--approx-only", action="store_true", help="only the last-prompt-token approximation (no generation)")
    s.add_argument("--rank-by", default=None, help="trait to rank by (default: the first)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--chunk-batches", type=int, default=8, help="batches per chunk (the unit of resumption and sharding)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="length of the base model's answers")
    s.add_argument("--temperature", type=float, default=0.0, help="base answers: 0 = greedy (default)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                   help="what generates the base answers and runs the projections: hf (default) or vllm "
                        "(one vLLM engine on the model folder; one process)")
    s.add_argument("--top", type=int, default=5, help="samples to print")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_screen)

    f = sub.add_parser("shift", help="projection shift of a fine-tuned model's last-prompt activations vs its base")
    f.add_argument("--base", required=True, help="base model: local path or 'smollm2'")
    f.add_argument("--finetuned", required=True, help="fine-tuned model: local path")
    f.add_argument("--vectors", required=True, help="persona vector file (.safetensors)")
    f.add_argument("--traits", nargs="+", default=None)
    f.add_argument("--questions", default=None, help="prompts: JSONL or one per line (default: the traits' evaluation questions)")
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--out", default=None, help="write the per-layer shifts to this JSON file")
    f.set_defaults(func=cmd_shift)

