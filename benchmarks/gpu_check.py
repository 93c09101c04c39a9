"""GPU end-to-end check on a 1B-class Llama built from a config (random weights, bf16, batch 1).

Eager: HF ``generate()`` per token, unpatched vs patched idle vs steering all layers vs steering
+ monitoring 8 traits, per usable backend, interleaved rounds.
CUDA graph: one decode step (static cache) captured with ``torch.cuda.CUDAGraph`` and replayed,
the same variants; and a new alpha written between replays must change the logits (the
coefficients are buffers the graph reads) and the old alpha must give them back bit for bit.
The graph is captured by hand rather than through ``torch.compile(mode="reduce-overhead")``,
which would compile the model again for every variant (minutes each). Replays repeat the
captured step at one position, so their readings are not a sequence (timing and steering only).

Prints a short table and writes JSON to $OUT (or ./gpu-results)."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import personakern
from personakern import ops

CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
              num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)  # TinyLlama-1.1B shape
PROMPT, NEW, ROUNDS, REPLAYS = 32, 32, 3, 50


def build():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CONFIG)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def eager_time(model, ids):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / NEW


def rewind(cache):
    """Point the static cache back at PROMPT. Recent transformers count the cache length in a
    device tensor that every forward advances in place (a replayed graph would walk off the
    end); older ones keep a Python int."""
    for layer in getattr(cache, "layers", ()):
        n = getattr(layer, "cumulative_length", None)
        if isinstance(n, torch.Tensor):
            n.fill_(PROMPT)
        elif isinstance(n, int):
            layer.cumulative_length = PROMPT


class GraphStep:
    """One decode step at position PROMPT against a static cache, captured once."""

    def __init__(self, model):
        self.cache = transformers.StaticCache(config=model.config, max_cache_len=PROMPT + 8)
        self.tok = torch.randint(100, 32000, (1, 1), device="cuda")
        self.pos = torch.tensor([PROMPT], device="cuda")
        self.mask = torch.ones(1, PROMPT + 1, dtype=torch.long, device="cuda")
        kw = dict(past_key_values=self.cache, cache_position=self.pos, position_ids=self.pos[None],
                  attention_mask=self.mask, use_cache=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):
                rewind(self.cache)
                model(self.tok, **kw)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            rewind(self.cache)  # captured too: every replay writes the same slot
            self.logits = model(self.tok, **kw).logits

    def time(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.graph.replay()
        start.record()
        for _ in range(REPLAYS):
            self.graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / REPLAYS

    def logits_now(self):
        self.graph.replay()
        torch.cuda.synchronize()
        return self.logits.clone()


def configure(h, kw, vecs):
    if kw.get("steer"):
        h.steer(vecs[0], 0.5, layers="all")
    if kw.get("monitor"):
        h.monitor({f"t{i}": vecs[i] for i in range(8)}, layers="all")


def main():
    out_dir = Path(os.environ.get("OUT", "gpu-results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build()
    L, D = CONFIG["num_hidden_layers"], CONFIG["hidden_size"]
    vecs = torch.nn.functional.normalize(torch.randn(8, L, D), dim=-1)
    ids = torch.randint(100, 32000, (1, PROMPT), device="cuda")
    backends = ops.available_backends("cuda")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "backends": backends, "rows": [], "errors": {}}

    variants = [("unpatched", None, {})]
    for b in backends:
        variants += [(f"{b} idle", b, {}), (f"{b} steer all", b, {"steer": True}),
                     (f"{b} steer+monitor8", b, {"steer": True, "monitor": True})]

    def measure(mode, fn):
        times = {}
        for _ in range(ROUNDS):  # interleaved rounds
            for name, backend, kw in variants:
                h = None
                try:
                    h = personakern.patch(model, backend=backend) if backend else None
                    if h:
                        configure(h, kw, vecs)
                    times.setdefault(name, []).append(fn())
                except Exception as e:
                    times.setdefault(name, []).append(float("nan"))
                    results["errors"][f"{mode} {name}"] = f"{type(e).__name__}: {e}"[:400]
                finally:
                    if h:
                        h.unpatch()
        base = statistics.median(times["unpatched"])
        for name, ts in times.items():
            med = statistics.median(ts)
            results["rows"].append({"mode": mode, "variant": name, "ms_per_token": med * 1e3,
                                    "ratio": med / base, "rounds_ms": [t * 1e3 for t in ts]})

    def eager():
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
        return eager_time(model, ids)

    measure("eager", eager)
    measure("cuda-graph", lambda: GraphStep(model).time())

    # a new alpha is seen by the captured graph; the old one gives the old logits back
    for b in backends:
        try:
            with personakern.patch(model, backend=b) as h:
                h.steer(vecs[0], 0.0, layers="all")
                g = GraphStep(model)
                a = g.logits_now()
                h.steer(vecs[0], 8.0, layers="all")
                s = g.logits_now()
                h.steer(vecs[0], 0.0, layers="all")
                c = g.logits_now()
            results[f"cuda_graph_alpha_takes_effect_{b}"] = bool(not torch.equal(a, s) and torch.equal(a, c))
        except Exception as e:
            results[f"cuda_graph_alpha_takes_effect_{b}"] = f"error: {type(e).__name__}: {e}"[:400]

    print(f"\n{results['gpu']} | torch {results['torch']} | transformers {results['transformers']}")
    print(f"{'mode':11s} {'variant':24s} {'ms/token':>9s} {'ratio':>7s}")
    for r in results["rows"]:
        print(f"{r['mode']:11s} {r['variant']:24s} {r['ms_per_token']:9.3f} {r['ratio']:7.3f}")
    for k, v in results.items():
        if k.startswith("cuda_graph_alpha"):
            print(k, v)
    for k, v in results["errors"].items():
        print("error", k, v)
    (out_dir / "gpu_e2e.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
