"""Engines one after another in one interpreter, in-process (vLLM calls the plugin's entry point
once per process): $PK_JOB = {"model", "ids", "spec", "stages": [vector file or null, ...]}.
Per stage: the model class, the greedy tokens of a plain request, the steered tokens and readings
of a request with the SPEC, or the error that refused it. Prints one JSON line."""
import gc
import json
import os


def main():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams, TokensPrompt
    from personakern.vllm import readings

    job = json.loads(os.environ["PK_JOB"])
    prompt = TokensPrompt(prompt_token_ids=job["ids"])
    results = []
    for vectors in job["stages"]:
        if vectors is None:
            os.environ.pop("PERSONAKERN_VECTORS", None)
        else:
            os.environ["PERSONAKERN_VECTORS"] = vectors
        llm = LLM(job["model"], dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                  max_num_seqs=4, distributed_executor_backend="uni")
        stage = {"class": llm.apply_model(lambda m: type(m).__name__)[0]}
        sp = dict(max_tokens=12, temperature=0, ignore_eos=True)
        stage["plain"] = list(llm.generate([prompt], SamplingParams(**sp), use_tqdm=False)[0].outputs[0].token_ids)
        try:
            out = llm.generate([prompt], SamplingParams(**sp, extra_args={"personakern": job["spec"]}),
                               use_tqdm=False)[0]
            r = readings(out)
            stage["steered"] = list(out.outputs[0].token_ids)
            stage["readings"] = None if r is None else list(r.values.shape)
        except ValueError as e:
            stage["refused"] = f"{type(e).__name__}: {e}"
        # the engine still serves after a refused request
        stage["plain_after"] = list(llm.generate([prompt], SamplingParams(**sp), use_tqdm=False)[0].outputs[0].token_ids)
        results.append(stage)
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
