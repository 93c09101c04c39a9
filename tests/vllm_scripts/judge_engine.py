"""The vLLM likelihood judge on the engine it starts itself (``judge_engine``), as
``--judge-engine vllm`` runs it: reads {"model", "questions", "answers"} from $PK_JOB, prints one
JSON line with whether the engine takes scoring requests, the margins and coherence lps, and the
spare-columns variable after the start."""
import json
import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main():
    from personakern.extraction.spec import load_spec
    from personakern.judges import make_judge, vllm_engine
    from personakern.vllm.vectors import SPARE_ENV

    job = json.loads(os.environ["PK_JOB"])
    judge = make_judge("likelihood", engine="vllm", model_path=job["model"])
    spec = load_spec("evil")
    out = {"scores_in_engine": vllm_engine.engine_scores(judge.llm),
           "margins": judge.margins(spec, job["questions"], job["answers"]),
           "neutral": judge.neutral_logprobs(job["questions"], job["answers"]),
           "spare_env_after": os.environ.get(SPARE_ENV)}
    print(json.dumps({"results": out}), flush=True)
    os._exit(0)   # skip vLLM's slow interpreter shutdown


if __name__ == "__main__":
    main()
