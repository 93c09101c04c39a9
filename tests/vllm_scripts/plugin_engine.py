"""A personakern-plugin engine in a fresh interpreter, with vLLM's own processes (the shipped
spawn path): compiled mode, tensor parallelism. Job in $PK_JOB: {"model", "engine": {...LLM
kwargs}, "calls": [[{"ids", "max_tokens", "spec"}, ...], ...]}; $PERSONAKERN_VECTORS names the
vectors. Prints one JSON line: per request its tokens, readings and captured means (or nulls)."""
import json
import os


def main():
    from vllm import LLM, SamplingParams, TokensPrompt
    from personakern.vllm import captured, readings

    job = json.loads(os.environ["PK_JOB"])
    args = dict(dtype="float32", max_model_len=1024, max_num_batched_tokens=1024, seed=0, max_num_seqs=16)
    args.update(job.get("engine", {}))
    llm = LLM(job["model"], **args)
    results = []
    for call in job["calls"]:
        sps = [SamplingParams(max_tokens=r["max_tokens"], temperature=0, ignore_eos=True,
                              extra_args=None if r.get("spec") is None else {"personakern": r["spec"]})
               for r in call]
        outs = llm.generate([TokensPrompt(prompt_token_ids=r["ids"]) for r in call], sps, use_tqdm=False)
        for o in outs:
            r, c = readings(o), captured(o)
            results.append({"tokens": list(o.outputs[0].token_ids),
                            "readings": None if r is None else r.values[0].tolist(),
                            "capture": None if c is None else c["means"].tolist()})
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
