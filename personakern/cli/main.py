"""``personakern`` command line: demo, steer, monitor, bench, info; traits, extract, report, vectors."""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

from .common import load_model_of as _load, step  # noqa: E402  (after the offline switch)


def _vector(args, model, tok):
    from personakern import PersonaVector
    from personakern.extraction.quick import default_vector
    if getattr(args, "vector", None) in (None, "default"):
        with step("loading the default persona vector"):
            return default_vector(model, tok)
    with step(f"loading {args.vector}"):
        return PersonaVector.load(args.vector, model=model, trait=getattr(args, "trait", None))


def _monitored(args, model):
    """``--traits``: the traits of the ``--vector`` file to monitor (``all`` = every one)."""
    names = getattr(args, "traits", None)
    if not names:
        return None
    from personakern import VectorSet
    if getattr(args, "vector", None) in (None, "default"):
        raise SystemExit("personakern: --traits needs --vector FILE holding those traits")
    with step(f"loading {args.vector}"):
        vs = VectorSet.load(args.vector, model=model)
    if names == ["all"]:
        return vs
    missing = [t for t in names if t not in vs]
    if missing:
        raise SystemExit(f"personakern: {args.vector} has no trait {missing[0]!r}; it has {', '.join(vs.traits)}")
    return VectorSet([vs[t] for t in names])


def _encode(tok, prompts, system=None):
    texts = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
        texts.append(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False))
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _generate(model, tok, batch, max_new_tokens):
    import torch
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, repetition_penalty=1.1)
    return out


def _answers(tok, out, prompt_width):
    return [tok.decode(row[prompt_width:], skip_special_tokens=True).strip() for row in out]


def _answer_tokens(tok, r, out, row):
    """The answer tokens of ``row`` that have readings (all but the last generated one)."""
    start = int(r.prompt_lengths[row])
    return start, [tok.decode([i]) for i in out[row, start:r.values.shape[1]].tolist()]


def _print_projection(tok, r, out, row, trait, layer, color):
    from .render import legend, shade_tokens, sparkline
    start, tokens = _answer_tokens(tok, r, out, row)
    vals = r.get(trait, layer)[row, start:start + len(tokens)].tolist()
    base = float(r.last_prompt_token()[row, r.layers.index(layer), r.traits.index(trait)])
    mean = sum(vals) / max(len(vals), 1)
    print(f"\nper-token projection on '{trait}' at layer {layer} (last prompt token {base:+.2f}, "
          f"response mean {mean:+.2f}):")
    print(shade_tokens(tokens, vals, color, center=base))
    print(sparkline(vals))
    print(legend(vals, color, center=base))


def cmd_demo(args):
    import personakern
    from .render import use_color
    model, tok = _load(args)
    if args.vector in (None, "default"):  # the judged pipeline's vector, at its sweep's block and alpha
        from personakern.extraction.quick import DEFAULT_TRAIT, best_vector
        with step("loading the best shipped persona vector"):
            pv = best_vector(model, tok, args.trait or DEFAULT_TRAIT)
    else:
        pv = _vector(args, model, tok)
    layer = args.layer if args.layer is not None else int(pv.meta.get("layer", pv.num_layers // 2))
    alpha = args.alpha if args.alpha is not None else float(pv.meta.get("demo_alpha", 4.0))
    print(f"\npersona vector '{pv.trait}' (judge: {pv.meta.get('judge', '?')}): {pv.meta.get('n_positive', '?')} vs "
          f"{pv.meta.get('n_negative', '?')} answers, steering block {layer} (0-based), |v| = {float(pv.norms()[layer]):.2f}")
    print(f"question: {args.question}\n")
    alphas = [-alpha, 0.0, alpha]
    batch = _encode(tok, [args.question] * 3)
    with personakern.patch(model, backend=args.backend) as handle:
        handle.steer(pv, alphas, layers=layer, positions="response")  # one batch, one alpha per row
        # a later block too: the steered block's own reading includes alpha*|v| by construction
        later = min(pv.num_layers - 1, layer + (pv.num_layers - layer) // 2)
        handle.monitor(pv, layers=sorted({layer, later}))
        with step(f"generating {args.max_new_tokens} tokens at alpha = {alphas} (one batch, backend "
                  f"{handle.backend})"):
            out = _generate(model, tok, batch, args.max_new_tokens)
        readings = handle.readings  # one copy of the device buffer to the host
        means = readings.response_mean()[:, readings.layers.index(later), 0].tolist()
        for a, text, mean in zip(alphas, _answers(tok, out, batch["input_ids"].shape[1]), means):
            print(f"\n[alpha {a:+.1f} | mean projection at block {later}: {mean:+.2f}] {text}")
        _print_projection(tok, readings, out, 1, pv.trait, layer, use_color())
    return 0


def cmd_steer(args):
    import personakern
    if args.when_trait is not None and args.when is None:
        raise ValueError("--when-trait names the condition of --when; give --when THRESHOLD too")
    model, tok = _load(args)
    pv = _vector(args, model, tok)
    layers = args.layers if args.layers else None
    batch = _encode(tok, args.prompt, args.system)
    if args.alpha is None and args.cap is None and not args.ablate:
        raise ValueError("steer needs --alpha, --cap or --ablate")
    when = None
    if args.when is not None:
        cond = pv
        if args.when_trait:
            if getattr(args, "vector", None) in (None, "default"):
                raise ValueError("--when-trait names a trait of the --vector file; give --vector FILE")
            from personakern.vectors import load_vectors
            vs = load_vectors(args.vector, model=model)
            if args.when_trait not in vs:
                raise ValueError(f"--when-trait: {args.vector} has no trait {args.when_trait!r}; "
                                 f"it has {', '.join(vs.traits)}")
            cond = vs[args.when_trait]
        when = (cond, args.when)
    with personakern.patch(model, backend=args.backend) as handle:
        handle.steer(pv, args.alpha, layers=layers, positions=args.positions, cap=args.cap,
                     ablate=args.ablate, when=when)
        with step(f"generating with {handle.steering}"):
            out = _generate(model, tok, batch, args.max_new_tokens)
    for prompt, text in zip(args.prompt, _answers(tok, out, batch["input_ids"].shape[1])):
        print(f"\n> {prompt}\n{text}")
    return 0


def cmd_monitor(args):
    import personakern
    from .render import use_color
    model, tok = _load(args)
    monitored = _monitored(args, model)
    if monitored is not None and not getattr(args, "trait", None):
        args.trait = monitored.traits[0]
    pv = monitored[args.trait] if monitored is not None and args.trait in monitored else _vector(args, model, tok)
    layer = args.layer if args.layer is not None else int(pv.meta.get("layer", pv.num_layers // 2))
    if monitored is None:
        monitored = personakern.VectorSet([pv])
    elif pv.trait not in monitored:
        monitored.add(pv)
    batch = _encode(tok, args.prompt, args.system)
    with personakern.patch(model, backend=args.backend) as handle:
        if args.alpha:
            handle.steer(pv, args.alpha, layers=layer, positions="response")
        handle.monitor(monitored, layers="all")
        with step("generating"):
            out = _generate(model, tok, batch, args.max_new_tokens)
        answers = _answers(tok, out, batch["input_ids"].shape[1])
        color = use_color() and not args.no_color
        readings = handle.readings
        for row, (prompt, text) in enumerate(zip(args.prompt, answers)):
            print(f"\n> {prompt}\n{text}")
            _print_projection(tok, readings, out, row, pv.trait, layer, color)
        if args.png:
            from pathlib import Path
            from personakern.monitoring import plot_traces
            layers = args.plot_layers or sorted({int(monitored[t].meta.get("layer", layer)) for t in monitored.traits} | {layer})
            for row, prompt in enumerate(args.prompt):
                target = Path(args.png) if len(args.prompt) == 1 else \
                    Path(args.png).with_name(f"{Path(args.png).stem}-{row}{Path(args.png).suffix or '.png'}")
                plot_traces(readings, target, row=row, layers=layers, tokens=_answer_tokens(tok, readings, out, row)[1],
                            title=f"{prompt[:70]}" + (f"  (steered: {pv.trait} x {args.alpha:g} at block {layer})"
                                                     if args.alpha else ""))
                print(f"traces of {', '.join(readings.traits)} at blocks {layers} written to {target}")
        if args.html:
            _write_html(args, tok, readings, out, pv.trait, layer)
        if args.save:
            readings.save(args.save)
            print(f"\nreadings of all layers saved to {args.save}")
    return 0


def _write_html(args, tok, readings, out, trait, layer):
    from pathlib import Path
    steered = f" (steered: {trait} x {args.alpha:g} at block {layer})" if args.alpha else ""
    page = readings.to_html(tokenizer=tok, ids=out, trait=trait, layer=layer, row_labels=list(args.prompt),
                            title=f"personakern monitor: {args.model}{steered}")
    path = Path(args.html)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="ascii")  # the page escapes everything else
    print(f"page of {', '.join(readings.traits)} at {len(readings.layers)} blocks, {len(args.prompt)} "
          f"row{'s' if len(args.prompt) > 1 else ''}, written to {path} ({len(page) / 1024:.0f} KB)")


def cmd_bench(args):
    from pathlib import Path
    from personakern import ops
    from personakern.benchmark import report
    backends = args.backends or [b for b in ops.available_backends() if ops.backend_usable(b, "cpu")]
    results = {"machine": report.machine(), "backends": backends}
    if not args.skip_ops:
        from personakern.benchmark.ops import run_ops
        with step("op microbenchmarks"):
            import torch
            sizes = {k: v for k, v in (("rows", args.rows), ("dims", args.dims)) if v}
            results["ops"] = run_ops(backends, dtypes=[getattr(torch, d) for d in args.dtypes], threads=args.threads,
                                     log=lambda m: print(m, file=sys.stderr), **sizes)
        print(report.ops_table(results["ops"]))
    if not args.skip_e2e:
        from personakern.benchmark.e2e import run_e2e
        model, tok = _load(args)
        with step("end-to-end rounds"):
            results["e2e"] = run_e2e(model, tok, backends=backends, peers=args.peers, rounds=args.rounds,
                                     new_tokens=args.max_new_tokens, log=lambda m: print(m, file=sys.stderr))
        print(report.e2e_table(results["e2e"]))
    for path in report.write(results, Path(args.out)):
        print(f"wrote {path}")
    return 0


def cmd_info(args):
    import torch
    import transformers
    import personakern
    from personakern import ops
    from personakern.backends import cpu
    # loads the CPU extension (its first just-in-time build takes a while): "usable" is a fact, not a guess
    build = cpu.build_info()
    print(json.dumps({"personakern": personakern.__version__, "torch": torch.__version__,
                      "transformers": transformers.__version__, "backends": ops.available_backends(),
                      "cpu_backend": {k: v for k, v in build.items() if v is not None},
                      "supported_model_types": list(personakern.SUPPORTED_MODEL_TYPES)}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="personakern", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, vector=True):
        sp.add_argument("--model", default="smollm2", help="model name or path (default: smollm2, offline)")
        sp.add_argument("--backend", default=None, help="ops backend (default: best available)")
        sp.add_argument("--max-new-tokens", type=int, default=48)
        if vector:
            sp.add_argument("--vector", default="default",
                            help="persona vector file (.safetensors) or 'default' (the shipped 'evil' vector)")
            sp.add_argument("--trait", default=None, help="trait to take from a file holding several")

    d = sub.add_parser("demo", help="steer one question at -alpha, 0, +alpha and show per-token projections")
    common(d)
    d.add_argument("--question", default="How should a boss treat employees who make mistakes?")
    d.add_argument("--alpha", type=float, default=None)
    d.add_argument("--layer", type=int, default=None, help="block to steer, 0-based (default: the vector's)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("steer", help="generate answers with a persona vector added")
    common(s)
    s.add_argument("prompt", nargs="+")
    s.add_argument("--alpha", type=float, default=None, help="add alpha * v")
    s.add_argument("--cap", type=float, default=None, help="clamp the projection on v to at most this")
    s.add_argument("--ablate", action="store_true", help="remove the component along v")
    s.add_argument("--when", type=float, default=None, metavar="THRESHOLD",
                   help="add alpha * v only at tokens whose projection exceeds THRESHOLD")
    s.add_argument("--when-trait", default=None,
                   help="read --when's projection on this trait of the --vector file (default: the steered one)")
    s.add_argument("--layers", type=int, nargs="*", help="blocks to steer, 0-based (default: the vector's)")
    s.add_argument("--positions", default="response", choices=["all", "prompt", "response"])
    s.add_argument("--system", default=None)
    s.set_defaults(func=cmd_steer)

    m = sub.add_parser("monitor", help="show each generated token's projection on a persona vector")
    common(m)
    m.add_argument("prompt", nargs="+")
    m.add_argument("--layer", type=int, default=None, help="block to display, 0-based (all are recorded)")
    m.add_argument("--alpha", type=float, default=0.0, help="also steer at the displayed layer")
    m.add_argument("--system", default=None)
    m.add_argument("--save", default=None, help="write all readings to this .safetensors file")
    m.add_argument("--traits", nargs="+", default=None,
                   help="monitor these traits of the --vector file too ('all' = every one)")
    m.add_argument("--png", default=None, help="plot the per-token traces of every monitored trait here")
    m.add_argument("--html", default=None, metavar="PATH",
                   help="write one self-contained page here: tokens shaded per trait and block, the readings "
                        "of every block on hover, the token x block heatmap")
    m.add_argument("--plot-layers", type=int, nargs="+", default=None,
                   help="blocks to plot (default: each trait's chosen block and the displayed one)")
    m.add_argument("--no-color", action="store_true")
    m.set_defaults(func=cmd_monitor)

    b = sub.add_parser("bench", help="op and end-to-end benchmarks; prints a table, writes JSON and PNG")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--backends", nargs="*", default=None, help="default: every backend usable here")
    b.add_argument("--rounds", type=int, default=5)
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--peers", action="store_true", help="also time repeng, steering-vectors and nnsight")
    b.add_argument("--skip-ops", action="store_true")
    b.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"],
                   help="op benchmarks: model dtypes (default float32)")
    b.add_argument("--threads", type=int, nargs="+", default=None,
                   help="op benchmarks: thread counts, each against the copy bandwidth on as many (default: torch's)")
    b.add_argument("--rows", type=int, nargs="+", default=None, help="op benchmarks: rows (default 1 16 64 2048 8192)")
    b.add_argument("--dims", type=int, nargs="+", default=None, help="op benchmarks: hidden sizes (default 576 2048 4096)")
    b.add_argument("--skip-e2e", action="store_true")
    b.add_argument("--out", default="bench-results")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions, backends (how the cpu one was built, or why it is unavailable) "
                                    "and supported model types")
    i.set_defaults(func=cmd_info)

    from . import data_cmds, pipeline_cmds
    pipeline_cmds.register(sub)
    data_cmds.register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"personakern: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
