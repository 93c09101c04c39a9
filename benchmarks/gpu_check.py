"""GPU end-to-end check: eager and CUDA-graph decode of a 1B-class Llama built from a config
(random weights, bf16): unpatched vs patched idle vs steering all layers vs steering + monitoring
8 traits, per usable backend; and that new alphas take effect under CUDA-graph replay.

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


def build():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CONFIG)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return model


def decode_time(model, ids, new_tokens, **gen):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **gen)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / new_tokens, out


def main():
    out_dir = Path(os.environ.get("OUT", "gpu-results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build()
    L, D = CONFIG["num_hidden_layers"], CONFIG["hidden_size"]
    vecs = torch.nn.functional.normalize(torch.randn(8, L, D), dim=-1)
    ids = torch.randint(100, 32000, (1, 32), device="cuda")
    backends = ops.available_backends("cuda")
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "transformers": transformers.__version__, "backends": backends, "rows": []}

    def variants():
        yield "unpatched", None, {}
        for b in backends:
            yield f"{b} idle", b, {}
            yield f"{b} steer all", b, {"steer": True}
            yield f"{b} steer+monitor8", b, {"steer": True, "monitor": True}

    for mode, gen in (("eager", {}), ("cuda-graph", {"cache_implementation": "static"})):
        times = {}
        for _ in range(3):  # interleaved rounds
            for name, backend, kw in variants():
                try:
                    h = personakern.patch(model, backend=backend) if backend else None
                    if h and kw.get("steer"):
                        h.steer(vecs[0], 0.5, layers="all")
                    if h and kw.get("monitor"):
                        h.monitor({f"t{i}": vecs[i] for i in range(8)}, layers="all")
                    decode_time(model, ids, 4, **gen)  # warm-up / capture
                    t, _ = decode_time(model, ids, 64, **gen)
                    times.setdefault(name, []).append(t)
                except Exception as e:
                    times.setdefault(name, []).append(float("nan"))
                    results.setdefault("errors", {})[f"{mode} {name}"] = f"{type(e).__name__}: {e}"[:300]
                finally:
                    if h:
                        h.unpatch()
        base = statistics.median(times["unpatched"])
        for name, ts in times.items():
            med = statistics.median(ts)
            results["rows"].append({"mode": mode, "variant": name, "ms_per_token": med * 1e3, "ratio": med / base})

    # new alphas take effect under CUDA-graph replay
    try:
        with personakern.patch(model) as h:
            h.steer(vecs[0], 0.0, layers="all")
            _, a = decode_time(model, ids, 8, cache_implementation="static")
            h.steer(vecs[0], 8.0, layers="all")
            _, b = decode_time(model, ids, 8, cache_implementation="static")
            h.steer(vecs[0], 0.0, layers="all")
            _, c = decode_time(model, ids, 8, cache_implementation="static")
        results["cuda_graph_alpha_takes_effect"] = bool(not torch.equal(a, b) and torch.equal(a, c))
    except Exception as e:
        results["cuda_graph_alpha_takes_effect"] = f"error: {type(e).__name__}: {e}"[:300]

    print(f"\n{results['gpu']} | torch {results['torch']} | transformers {results['transformers']}")
    print(f"{'mode':11s} {'variant':24s} {'ms/token':>9s} {'ratio':>7s}")
    for r in results["rows"]:
        print(f"{r['mode']:11s} {r['variant']:24s} {r['ms_per_token']:9.2f} {r['ratio']:7.3f}")
    print("new alphas take effect under CUDA-graph replay:", results["cuda_graph_alpha_takes_effect"])
    for k, v in results.get("errors", {}).items():
        print("error", k, v)
    (out_dir / "gpu_e2e.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
