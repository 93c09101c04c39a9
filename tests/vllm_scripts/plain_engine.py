"""A plain vLLM engine (no personakern plugin) with forward hooks: the independent oracle.

Reads a JSON job from $PK_JOB: {"model", "vectors", "engine": {...LLM kwargs}, "batches": [[request,
...], ...]} where a request is {"ids", "max_tokens", "steer": [{"trait", "alpha", "layer",
"positions"}], "monitor": {"traits", "layers"}}. Hooks on the decoder layers do the steering (add
alpha * v to a block's output at the chosen positions) and record block outputs; they only support
batches of one request when steering or monitoring (positions are read per row of that request).
Prints one JSON line: per request the tokens, the top-1 logprobs and the readings.
"""
import json
import os

os.environ.pop("PERSONAKERN_VECTORS", None)
os.environ["VLLM_PLUGINS"] = ""  # no general plugin at all: this engine is vLLM as shipped
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main():
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt
    from personakern.vectors import load_vectors

    job = json.loads(os.environ["PK_JOB"])
    vs = load_vectors(job["vectors"]) if job.get("vectors") else None
    args = dict(enforce_eager=True, dtype="float32", max_model_len=1024, max_num_batched_tokens=1024, seed=0,
                distributed_executor_backend="uni", max_num_seqs=32)
    args.update(job.get("engine", {}))
    llm = LLM(job["model"], **args)
    state = {"req": None, "outputs": {}}

    def install(model):
        layers = model.model.layers

        def hook(index):
            def fn(module, inputs, output):
                req = state["req"]
                if req is None:
                    return None
                positions = inputs[0]
                h, res = output
                out = h + res
                steered = False
                for s in req.get("steer") or []:
                    if s["layer"] != index:
                        continue
                    v = vs[s["trait"]].vectors[index].to(out.dtype)
                    plen = len(req["ids"])
                    mask = {"all": torch.ones_like(positions, dtype=torch.bool), "prompt": positions < plen,
                            "response": positions >= plen}[s["positions"]]
                    out = out + s["alpha"] * mask[:, None].to(out.dtype) * v
                    steered = True
                mon = req.get("monitor")
                if mon and index in mon["layers"]:
                    rows = state["outputs"].setdefault(index, {})
                    for p, row in zip(positions.tolist(), out.float()):
                        rows[p] = row.clone()
                # hand the next layer (0, block output): its add then gives exactly the steered
                # block output, rounded as h + res + alpha * v (the order of the fused op)
                return (torch.zeros_like(h), out) if steered else None
            return fn

        for i, layer in enumerate(layers):
            layer.register_forward_hook(hook(i))
        return len(layers)

    llm.apply_model(install)
    results = []
    for batch in job["batches"]:
        hooked = any(r.get("steer") or r.get("monitor") for r in batch)
        assert not hooked or len(batch) == 1, "hooks serve one request at a time"
        state["req"] = batch[0] if hooked else None
        state["outputs"] = {}
        sps = [SamplingParams(max_tokens=r["max_tokens"], temperature=0, logprobs=0,
                              ignore_eos=r.get("ignore_eos", False)) for r in batch]
        outs = llm.generate([TokensPrompt(prompt_token_ids=r["ids"]) for r in batch], sps, use_tqdm=False)
        for r, o in zip(batch, outs):
            c = o.outputs[0]
            item = {"tokens": list(c.token_ids),
                    "logprobs": [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)]}
            mon = r.get("monitor")
            if mon:
                n = len(r["ids"]) + len(c.token_ids) - 1
                item["readings"] = [[[float(state["outputs"][l][t] @ vs[m].unit(l)) for m in mon["traits"]]
                                     for l in mon["layers"]] for t in range(n)]
            results.append(item)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
