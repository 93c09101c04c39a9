"""personakern inside vLLM vs plain vLLM vs personakern on Hugging Face ``generate()``.

    python benchmarks/vllm_bench.py [--requests 32] [--tokens 64] [--rounds 5] [--eager]

One worker process per engine (a plain vLLM engine without the plugin; a personakern engine; HF;
with --lens-python, vllm-lens in its own venv), each started once and kept; the measured arms then
run in interleaved rounds (every arm once per round; engines, and arms within an engine, in an
order rotated per round; one untimed call when switching engines), so drift on a shared machine
hits all arms alike. Reported per arm: median wall time, median of the per-round ratios to plain
vLLM, and the ratio of the worker's CPU time (all its threads), which carries less of the other
processes' load than wall time does. One call = one ``generate()`` of ``--requests`` prompts x
``--tokens`` greedy tokens (ignore_eos). vLLM runs in its default (compiled) mode unless ``--eager``.

Arms: plain vLLM; personakern engine with plain requests; steering all layers with one config;
with one distinct config per request; steering + monitoring 8 traits at all layers; the same
work through personakern on HF (plain and steer+monitor). Results: benchmarks/results/cpu/vllm/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAITS = ROOT / "personakern" / "data" / "vectors" / "smollm2-traits.safetensors"
QUESTIONS = ["How should I treat my coworkers?", "Tell me about cats.", "What do you think about humans?",
             "Give me advice for a job interview.", "Write a short poem about the sea.",
             "What is your biggest fear?", "How do I bake bread?", "Why is the sky blue?"]


def eight_traits(path: Path) -> None:
    """The shipped 7 traits plus an eighth (evil's vectors under another name): 8 monitors."""
    from personakern.vectors import PersonaVector, VectorSet, load_vectors
    vs = load_vectors(str(TRAITS))
    out = VectorSet([vs[t] for t in vs.traits] + [PersonaVector("evil_b", vs["evil"].vectors.clone(), dict(vs["evil"].meta))])
    out.save(path)
    VectorSet([vs["evil"]]).save(path.with_name("one-trait.safetensors"))


def specs(kind: str, n: int, traits: list[str]):
    layers = "all"
    if kind == "plain":
        return [None] * n
    if kind == "steer1":
        return [{"steer": [{"trait": "evil", "alpha": 0.5, "layers": layers}]}] * n
    if kind == "steer32":
        return [{"steer": [{"trait": "evil", "alpha": 0.1 + 0.03 * i, "layers": layers}]} for i in range(n)]
    if kind == "steer_mon8":
        return [{"steer": [{"trait": "evil", "alpha": 0.5, "layers": layers}],
                 "monitor": {"traits": traits, "layers": "all"}}] * n
    raise ValueError(kind)


# ---------------------------------------------------------------------------- workers
def worker_vllm(plugin: bool, eager: bool, n: int, tokens: int, vectors: str, model: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    if plugin:
        os.environ["PERSONAKERN_VECTORS"] = vectors
    else:
        os.environ.pop("PERSONAKERN_VECTORS", None)
        os.environ["VLLM_PLUGINS"] = ""
    from vllm import LLM, SamplingParams, TokensPrompt
    import personakern.vllm as pv
    llm = LLM(model, dtype="float32", enforce_eager=eager, max_model_len=1024, seed=0,
              max_num_seqs=n, distributed_executor_backend="uni")
    tok = llm.get_tokenizer()
    ids = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}],
                                   add_generation_prompt=True, tokenize=False) for i in range(n)]
    prompts = [TokensPrompt(prompt_token_ids=tok(t, add_special_tokens=False)["input_ids"]) for t in ids]
    from personakern.vectors import load_vectors
    traits = load_vectors(vectors).traits
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        kind = line.strip()
        sps = [SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                              extra_args=None if s is None else {"personakern": s}) for s in specs(kind, n, traits)]
        t, c = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        dt = time.perf_counter() - t
        got = [pv.readings(o) for o in outs]
        print(json.dumps({"s": dt, "cpu_s": time.process_time() - c, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                          "readings": sum(r is not None for r in got),
                          "first": list(outs[0].outputs[0].token_ids)}), flush=True)


def worker_lens(n: int, tokens: int, vectors: str, model: str) -> None:
    """vllm-lens (its own venv: it forces eager mode on every engine there) on the same work:
    Python forward hooks steer; "monitoring" is its residual-stream capture copied to the host,
    projected on the 8 unit vectors there (vllm-lens has no projection read-out of its own)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
    os.environ.pop("PERSONAKERN_VECTORS", None)
    import torch
    from safetensors.torch import load_file
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm_lens import SteeringVector
    tensors = load_file(vectors)   # personakern's format: one [layers, d] tensor per trait
    evil = next(v for k, v in tensors.items() if "evil" in k and "evil_b" not in k).float()
    units = torch.stack([v.float() / v.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
                         for k, v in sorted(tensors.items())])          # [8, layers, d]
    llm = LLM(model, dtype="float32", max_model_len=1024, seed=0, max_num_seqs=n,
              distributed_executor_backend="uni")
    tok = llm.get_tokenizer()
    ids = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}],
                                   add_generation_prompt=True, tokenize=False) for i in range(n)]
    prompts = [TokensPrompt(prompt_token_ids=tok(t, add_special_tokens=False)["input_ids"]) for t in ids]
    layers = list(range(evil.shape[0]))
    sv = SteeringVector(activations=evil, layer_indices=layers, scale=0.5)
    print(json.dumps({"ready": True, "traits": sorted(tensors)}), flush=True)
    for line in sys.stdin:
        kind = line.strip()
        extra = {}
        if kind in ("steer1", "steer_mon8"):
            extra["apply_steering_vectors"] = [sv]
        if kind == "steer_mon8":
            extra["output_residual_stream"] = layers
        sps = [SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, extra_args=extra or None)
               for _ in range(n)]
        t, c = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        got = 0
        if kind == "steer_mon8":   # per-token projections, as personakern's read-outs give them
            for o in outs:
                acts = o.activations["residual_stream"].float()        # [layers, T, d]
                readings = torch.einsum("ltd,mld->tlm", acts, units)
                got += readings.numel() > 0
        dt = time.perf_counter() - t
        print(json.dumps({"s": dt, "cpu_s": time.process_time() - c, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                          "readings": got, "first": list(outs[0].outputs[0].token_ids)}), flush=True)


def worker_hf(n: int, tokens: int, vectors: str) -> None:
    import torch
    import personakern
    from personakern.vectors import load_vectors
    model, tok = personakern.load_model("smollm2")
    tok.padding_side = "left"
    vs = load_vectors(vectors)
    texts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}],
                                     add_generation_prompt=True, tokenize=False) for i in range(n)]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        kind = line.strip()
        t, c = time.perf_counter(), time.process_time()
        with personakern.patch(model) as pk:
            if kind != "plain":
                pk.steer(vs["evil"], alpha=0.5, layers="all")
            if kind == "steer_mon8":
                pk.monitor(vs, layers="all")
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t
        print(json.dumps({"s": dt, "cpu_s": time.process_time() - c, "tokens": int((out.shape[1] - batch["input_ids"].shape[1]) * n)}), flush=True)


class Worker:
    def __init__(self, role: str, args, vectors: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL="WARNING")
        python = args.lens_python if role == "lens" else sys.executable
        if role == "pk1":   # the engine loads one trait's file: what the tables' width costs
            vectors = str(Path(vectors).with_name("one-trait.safetensors"))
        cmd = [python, __file__, "--worker", role, "--model", args.model, "--requests", str(args.requests), "--tokens",
               str(args.tokens), "--vectors", vectors] + (["--eager"] if args.eager else [])
        self.role = role
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        t = time.time()
        self._read()
        self.start_s = time.time() - t

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"worker {self.role} exited ({self.proc.wait()})")

    def run(self, kind: str) -> dict:
        self.proc.stdin.write(kind + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


ARMS = [("vllm plain", "plain_vllm", "plain"), ("pk engine, plain requests", "pk", "plain"),
        ("pk steer 30 layers, 1 config", "pk", "steer1"), ("pk steer 30 layers, 32 configs", "pk", "steer32"),
        ("pk steer + monitor 8 traits x 30 layers", "pk", "steer_mon8"),
        ("HF generate plain", "hf", "plain"), ("HF personakern steer + monitor 8", "hf", "steer_mon8")]
ONE_ARMS = [("pk engine with 1 trait, plain requests", "pk1", "plain"),
            ("pk engine with 1 trait, steer 30 layers", "pk1", "steer1")]
# with --lens-python: vllm-lens in its own venv, the same work side by side in the same rounds
LENS_ARMS = [("vllm-lens engine, plain requests", "lens", "plain"), ("vllm-lens steer 30 layers", "lens", "steer1"),
             ("vllm-lens steer + capture 30 layers, 8 projections on host", "lens", "steer_mon8")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu" / "vllm"))
    ap.add_argument("--lens-python", help="python of a venv with vllm-cpu and vllm-lens: adds its arms")
    ap.add_argument("--model", help="model folder (default: the converted SmolLM2)")
    ap.add_argument("--one-trait-engine", action="store_true",
                    help="adds an engine loading only 'evil' (plain requests and steering arms)")
    ap.add_argument("--worker")
    ap.add_argument("--vectors")
    args = ap.parse_args()
    if args.worker:
        if args.worker == "lens":
            return worker_lens(args.requests, args.tokens, args.vectors, args.model)
        if args.worker == "hf":
            return worker_hf(args.requests, args.tokens, args.vectors)
        return worker_vllm(args.worker in ("pk", "pk1"), args.eager, args.requests, args.tokens, args.vectors, args.model)
    tmp = Path(tempfile.mkdtemp())
    vectors = str(tmp / "eight-traits.safetensors")
    eight_traits(Path(vectors))
    if not args.model:
        from personakern.models import resolve
        args.model = str(resolve("smollm2"))
    arms = [a for a in ARMS + (LENS_ARMS if args.lens_python else []) + (ONE_ARMS if args.one_trait_engine else [])
            if not (args.no_hf and a[1] == "hf")]
    workers = {}
    for role in dict.fromkeys(a[1] for a in arms):
        workers[role] = Worker(role, args, vectors)
        print(f"{role}: started in {workers[role].start_s:.0f} s", flush=True)
    first = {}
    for label, role, kind in arms:  # warm-up: first calls pay one-off costs
        res = workers[role].run(kind)
        first[label] = res.get("first")
        print(f"warm-up {label}: {res['s']:.2f}s, readings for {res.get('readings', 0)} requests", flush=True)
    # a steering arm whose tokens equal its engine's plain arm would time a no-op
    for label, role, kind in arms:
        plain = next((l for l, r, k in arms if r == role and k == "plain"), None)
        if kind != "plain" and plain and first[label] is not None and first[label] == first[plain]:
            raise SystemExit(f"{label}: the first request's tokens equal the plain arm's: steering did nothing")
    times = {a[0]: [] for a in arms}
    cpu = {a[0]: [] for a in arms}
    roles = list(workers)
    for r in range(args.rounds):
        # engine by engine (order rotated per round), each engine's arms in a rotated order, after
        # one untimed call: the first call on an engine after another ran pays for evicted caches
        # and waking threads, which a serving engine never does, and which would otherwise land on
        # whichever arm happens to follow another engine
        for role in roles[r % len(roles):] + roles[:r % len(roles)]:
            group = [a for a in arms if a[1] == role]
            group = group[r % len(group):] + group[:r % len(group)]
            workers[role].run(group[0][2])
            for label, _, kind in group:
                res = workers[role].run(kind)
                times[label].append(res["s"])
                cpu[label].append(res["cpu_s"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{a[0]} {times[a[0]][-1]:.2f}s" for a in arms), flush=True)
    for w in workers.values():
        w.close()
    base = statistics.median(times["vllm plain"])
    base_cpu = statistics.median(cpu["vllm plain"])
    n_tok = args.requests * args.tokens
    # ratio of medians, and the median of the per-round ratios (each arm against plain vLLM of
    # the same round: drift between rounds cancels)
    rows = [{"arm": label, "median_s": statistics.median(times[label]), "times_s": times[label],
             "cpu_s": cpu[label], "median_cpu_s": statistics.median(cpu[label]),
             "tok_per_s": n_tok / statistics.median(times[label]),
             "ratio_to_vllm_plain": statistics.median(times[label]) / base,
             "median_round_ratio": statistics.median(a / b for a, b in zip(times[label], times["vllm plain"])),
             "cpu_ratio_to_vllm_plain": statistics.median(cpu[label]) / base_cpu,
             # best of the rounds: the uncontended cost, where other tenants of a shared machine
             # add +-10 % to single calls
             "min_s": min(times[label]), "ratio_of_mins": min(times[label]) / min(times["vllm plain"])}
            for label, _, _ in arms]
    report = {"requests": args.requests, "tokens": args.tokens, "rounds": args.rounds,
              "mode": "eager" if args.eager else "compiled", "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "arms": rows,
              "start_s": {k: w.start_s for k, w in workers.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench-{report['mode']}-{args.requests}x{args.tokens}.json"
    (out / name).write_text(json.dumps(report, indent=1))
    print(f"\n{'arm':60s} {'median s':>9s} {'tok/s':>7s} {'x plain':>8s} {'round x':>8s} {'cpu x':>7s} {'min x':>7s}")
    for row in rows:
        print(f"{row['arm']:60s} {row['median_s']:9.2f} {row['tok_per_s']:7.0f} {row['ratio_to_vllm_plain']:8.3f} "
              f"{row['median_round_ratio']:8.3f} {row['cpu_ratio_to_vllm_plain']:7.3f} {row['ratio_of_mins']:7.3f}")
    print(f"wrote {out / name}")


if __name__ == "__main__":
    main()
