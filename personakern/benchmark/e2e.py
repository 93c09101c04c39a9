"""End-to-end cost of steering and monitoring on a real model, against hooks and peers.

Each *variant* is a context manager that puts the model in a state (patched, hooked, wrapped by
a peer library) and yields a ``run(kind)`` callable; rounds are interleaved (every variant once
per round, in turn) so drift on a shared machine hits all variants alike, and each variant's
median is divided by the unpatched model's median of the same run.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterator

import torch

N_TRAITS = 8


def _vectors(model, seed=0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(N_TRAITS, cfg.num_hidden_layers, cfg.hidden_size, generator=g)
    return v / v.norm(dim=-1, keepdim=True)  # unit rows: alpha is the step length


def make_inputs(tok, decode_prompt_tokens=32, prefill=(8, 256), seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = min(tok.vocab_size, 40000)
    decode = {"input_ids": torch.randint(100, vocab, (1, decode_prompt_tokens), generator=g)}
    decode["attention_mask"] = torch.ones_like(decode["input_ids"])
    b, t = prefill
    pre = {"input_ids": torch.randint(100, vocab, (b, t), generator=g)}
    pre["attention_mask"] = torch.ones_like(pre["input_ids"])
    return decode, pre


def runner(model, tok, inputs, new_tokens, generate: Callable = None) -> Callable[[str], None]:
    decode, pre = inputs

    def run(kind):
        with torch.no_grad():
            if kind == "decode":
                (generate or model.generate)(**decode, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False, pad_token_id=tok.pad_token_id)
            else:
                model(**pre, use_cache=False)
    return run


# ---------------------------------------------------------------------------- variants
@contextlib.contextmanager
def unpatched(model, tok, inputs, new_tokens, **_) -> Iterator:
    yield runner(model, tok, inputs, new_tokens)


@contextlib.contextmanager
def personakern_variant(model, tok, inputs, new_tokens, backend=None, steer=False, monitor=False, **_):
    import personakern
    vecs = _vectors(model)
    with personakern.patch(model, backend=backend) as h:
        if steer:
            h.steer(vecs[0], 0.5, layers="all")
        if monitor:
            h.monitor({f"trait{i}": vecs[i] for i in range(N_TRAITS)}, layers="all")
        yield runner(model, tok, inputs, new_tokens)


@contextlib.contextmanager
def forward_hooks(model, tok, inputs, new_tokens, read=False, **_):
    """What users write by hand: a hook per layer adding alpha*v; optionally reading one
    projection per layer to the host with ``.tolist()``."""
    vecs = _vectors(model)
    handles = []
    for i, layer in enumerate(model.model.layers):
        add = 0.5 * vecs[0, i]
        unit = vecs[1, i]

        def hook(mod, args, out, add=add, unit=unit):
            h = out[0] if isinstance(out, tuple) else out
            h = h + add.to(h.dtype)
            if read:
                (h[:, -1].float() @ unit).tolist()
            return (h, *out[1:]) if isinstance(out, tuple) else h
        handles.append(layer.register_forward_hook(hook))
    try:
        yield runner(model, tok, inputs, new_tokens)
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def repeng_variant(model, tok, inputs, new_tokens, **_):
    from repeng import ControlModel, ControlVector
    vecs = _vectors(model)
    layers = list(range(model.config.num_hidden_layers))
    cm = ControlModel(model, layers)
    try:
        cm.set_control(ControlVector(model_type=model.config.model_type,
                                     directions={i: vecs[0, i].numpy() for i in layers}), 0.5)
        yield runner(cm, tok, inputs, new_tokens, generate=cm.generate)
    finally:
        cm.reset()
        cm.unwrap()


@contextlib.contextmanager
def steering_vectors_variant(model, tok, inputs, new_tokens, **_):
    from steering_vectors import SteeringVector
    vecs = _vectors(model)
    sv = SteeringVector({i: vecs[0, i] for i in range(model.config.num_hidden_layers)}, "decoder_block")
    handle = sv.patch_activations(model, multiplier=0.5)
    try:
        yield runner(model, tok, inputs, new_tokens)
    finally:
        handle.remove()


@contextlib.contextmanager
def nnsight_variant(model, tok, inputs, new_tokens, **_):
    from nnsight import LanguageModel
    vecs = _vectors(model)
    lm = LanguageModel(model, tokenizer=tok)
    decode, pre = inputs
    n_layers = model.config.num_hidden_layers

    def steer_all():
        for i in range(n_layers):
            out = lm.model.layers[i].output
            h = out[0] if isinstance(out, tuple) else out
            h[:] += 0.5 * vecs[0, i]

    def run(kind):
        with torch.no_grad():
            if kind == "decode":
                with lm.generate(decode["input_ids"], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id) as tracer:
                    with tracer.all():
                        steer_all()
            else:
                with lm.trace(pre["input_ids"], use_cache=False):
                    steer_all()
    yield run


def variants(backends, peers: bool):
    out = [("unpatched", unpatched, {}),
           ("hooks: steer all layers", forward_hooks, {}),
           ("hooks: steer + .tolist() read", forward_hooks, {"read": True})]
    for b in backends:
        out += [(f"personakern[{b}] idle", personakern_variant, {"backend": b}),
                (f"personakern[{b}] steer all layers", personakern_variant, {"backend": b, "steer": True}),
                (f"personakern[{b}] steer + monitor {N_TRAITS}", personakern_variant,
                 {"backend": b, "steer": True, "monitor": True})]
    if peers:
        out += [("repeng", repeng_variant, {}), ("steering-vectors", steering_vectors_variant, {}),
                ("nnsight", nnsight_variant, {})]
    return out


def run_e2e(model, tok, backends=("native",), peers=False, rounds=5, new_tokens=64, prefill=(8, 256),
            kinds=("decode", "prefill"), log=print) -> dict:
    """Interleaved rounds; returns ``{kind: {variant: {median_s, ratio, runs|error}}}``."""
    inputs = make_inputs(tok, prefill=prefill)
    table = variants(backends, peers)
    results = {k: {name: {"runs": []} for name, _, _ in table} for k in kinds}
    for kind in kinds:
        for name, factory, kw in table:  # warm-up: compiles/builds, caches, first-call costs
            try:
                with factory(model, tok, inputs, new_tokens, **kw) as run:
                    run(kind)
            except Exception as e:  # a peer that cannot run is a result, reported as such
                results[kind][name]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        for r in range(rounds):
            for name, factory, kw in table:
                if "error" in results[kind][name]:
                    continue
                with factory(model, tok, inputs, new_tokens, **kw) as run:
                    t0 = time.perf_counter()
                    run(kind)
                    results[kind][name]["runs"].append(time.perf_counter() - t0)
            log(f"  {kind}: round {r + 1}/{rounds} done")
        base = statistics.median(results[kind]["unpatched"]["runs"])
        for name, res in results[kind].items():
            if res["runs"]:
                res["median_s"] = statistics.median(res["runs"])
                res["ratio"] = res["median_s"] / base
    return results
