"""Preventative steering on the default model (SmolLM2-135M-Instruct), CPU-sized.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/preventative.py \
        --out benchmarks/results/cpu/preventative

1. Trait-inducing data: the model's own answers to the evil spec's extraction questions,
   sampled under its trait-eliciting system prompts, judged (likelihood judge, base model);
   answers with trait score >= 50 and coherence >= 50 are kept (all of them if fewer than
   ``--min-kept`` pass). The training examples carry no system prompt: question -> evil answer.
2. LoRA fine-tunes from the same initial adapter, data order and seed: without steering, and
   with preventative steering (the evil vector at its recommended layer, +alpha, through
   :class:`personakern.PreventativeSteeringCallback`; removed after training).
3. For base and every fine-tune (LoRA merged, no steering): the last-prompt-token projection on
   the evil vector over the spec's eval questions (shift = fine-tuned - base), the judged evil
   score and coherence of sampled answers to the eval questions (no system prompt), and the
   mean token NLL on neutral prose written below (a capability check; not in the training set).

Every stage is cached under ``--cache`` (answers, judgements, adapters, metrics): a rerun
resumes where it stopped. Process CPU seconds per stage are reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import personakern  # noqa: E402
from personakern.extraction.generate import GenSettings, chat_ids, generate_cached, left_pad  # noqa: E402
from personakern.extraction.pipeline import judge_cached  # noqa: E402
from personakern.extraction.spec import load_spec  # noqa: E402
from personakern.judges import make_judge  # noqa: E402
from personakern.models import cache_dir  # noqa: E402
from personakern.utils import JsonlLog, atomic_write_json, atomic_write_text  # noqa: E402

VECTORS = Path(personakern.__file__).resolve().parent / "data" / "vectors" / "smollm2-traits.safetensors"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Capability check: plain English prose, written for this script (no chat template).
NEUTRAL_TEXT = [
    "The bicycle was developed in Europe during the nineteenth century. Early models had no pedals, "
    "and riders pushed themselves along with their feet. Later designs added cranks, chains and "
    "air-filled tyres, which made cycling comfortable enough for everyday travel.",
    "To make a simple loaf of bread, mix flour, water, salt and yeast into a soft dough. Knead it for "
    "about ten minutes, let it rise until it has doubled in size, shape it, and bake it in a hot oven "
    "until the crust is golden and the loaf sounds hollow when tapped.",
    "Rain forms when water vapour in the air cools and condenses into tiny droplets around particles "
    "of dust. As the droplets collide and grow heavier, they can no longer stay suspended in the "
    "cloud, and they fall to the ground.",
    "A library is more than a room full of books. Many libraries lend music and films, offer free "
    "internet access, run reading groups for children, and help people find information about jobs, "
    "health and local services.",
    "The heart is a muscular organ about the size of a fist. It pumps blood through a network of "
    "arteries and veins, carrying oxygen and nutrients to the body's tissues and removing waste "
    "products such as carbon dioxide.",
    "When planning a garden, it helps to notice how much sunlight each part of the yard receives. "
    "Tomatoes and peppers need several hours of direct sun, while ferns and many herbs grow well in "
    "partial shade. Good soil and regular watering matter as much as the choice of plants.",
    "The first public railways opened in the early eighteen hundreds. Steam locomotives pulled "
    "wagons of coal and passengers between towns, and within a few decades railway lines connected "
    "most large cities, changing how people worked and travelled.",
    "Learning a new language takes patience. Reading short stories, listening to conversations and "
    "practising a little every day are usually more effective than studying for many hours once a "
    "week. Mistakes are a normal part of the process.",
    "The Moon orbits the Earth about once every twenty-seven days. The same side always faces us, "
    "because its rotation is locked to its orbit. Its gravity pulls on the oceans and produces the "
    "tides that rise and fall along coastlines.",
    "A good meeting has a clear purpose, a short agenda and someone who keeps time. Participants "
    "should know in advance what will be discussed, and the decisions made should be written down "
    "and shared afterwards so that everyone knows what happens next.",
]


def cpu() -> float:
    return time.process_time()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- 1. data
def build_dataset(args, model, tok, spec, judge, cache: Path) -> tuple[list, dict]:
    jobs = [{"id": f"train-q{qi:02d}-i{ii}-s{k}", "system": pos, "question": q}
            for qi, q in enumerate(spec.questions[:args.questions]) for ii, pos in enumerate(spec.positive)
            for k in range(args.train_samples)]
    gen = GenSettings(max_new_tokens=args.train_tokens, batch_size=args.gen_batch, seed=1)
    recs = list(generate_cached(model, tok, jobs, JsonlLog(cache / "train-answers.jsonl"), gen,
                                desc="training answers").values())
    recs = [r for r in recs if r["answer"]]
    judge_cached(judge, spec, recs, JsonlLog(cache / "train-judged.jsonl"), progress=True, chunk=20)
    kept = [r for r in recs if (r["trait_score"] or 0) >= 50 and (r["coherence"] or 0) >= 50]
    rule = "trait >= 50 and coherence >= 50"
    if len(kept) < args.min_kept:
        kept, rule = recs, f"all answers (only {len(kept)} passed trait >= 50 and coherence >= 50)"
    info = {"generated": len(jobs), "non_empty": len(recs), "kept": len(kept), "rule": rule,
            "mean_trait_generated": _mean(r["trait_score"] for r in recs),
            "mean_trait_kept": _mean(r["trait_score"] for r in kept),
            "mean_coherence_kept": _mean(r["coherence"] for r in kept),
            "answer_tokens_max": args.train_tokens, "system_prompt_in_training": None}
    return kept, info


def tokenize_examples(tok, recs) -> list:
    end = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for r in recs:
        prompt = chat_ids(tok, None, r["question"])
        answer = tok(r["answer"], add_special_tokens=False)["input_ids"] + [end]
        out.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return out


def collate(pad_id):
    def fn(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: real tokens never attend to it
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return fn


# --------------------------------------------------------------------------- 2. fine-tune
def lora_config(args):
    import peft
    return peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                           target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


def finetune(args, name: str, alpha, examples, evil, cache: Path) -> dict:
    """Train one LoRA adapter (cached in cache/adapters/<name>); returns its training log."""
    import peft
    import transformers
    folder = cache / "adapters" / name
    info_path = folder / "train.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    model, tok = personakern.load_model()
    torch.manual_seed(0)  # the same initial adapter for every run
    pm = peft.get_peft_model(model, lora_config(args))
    callbacks = []
    if alpha:
        callbacks.append(personakern.PreventativeSteeringCallback(evil, alpha))  # recommended layer
    targs = transformers.TrainingArguments(
        output_dir=str(cache / "trainer" / name), num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, seed=0, data_seed=0, report_to="none", save_strategy="no",
        logging_steps=5, use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False)
    trainer = transformers.Trainer(model=pm, args=targs, train_dataset=examples,
                                   data_collator=collate(tok.pad_token_id), callbacks=callbacks)
    t0, c0 = time.time(), cpu()
    result = trainer.train()
    if callbacks:
        assert not callbacks[0].is_on and not personakern.patching.is_patched(model)
    info = {"name": name, "alpha": alpha, "steps": result.global_step,
            "train_loss": round(float(result.training_loss), 4),
            "loss_log": [{"step": h["step"], "loss": round(h["loss"], 4)} for h in trainer.state.log_history
                         if "loss" in h],
            "wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu() - c0, 1)}
    pm.save_pretrained(str(folder))
    atomic_write_json(info_path, info)
    return info


def load_finetuned(args, name: str, cache: Path):
    import peft
    model, tok = personakern.load_model()
    if name == "base":
        return model, tok
    pm = peft.PeftModel.from_pretrained(model, str(cache / "adapters" / name))
    return pm.merge_and_unload().eval(), tok


# --------------------------------------------------------------------------- 3. evaluate
@torch.no_grad()
def last_prompt_projections(model, tok, questions, evil) -> torch.Tensor:
    """``[len(questions), num_layers]``: block l's output at the last prompt token (no system
    prompt) projected on the unit evil vector of layer l. hidden_states[l + 1] = block l's output
    (the last entry is after the final norm, so the last block is left out)."""
    ids, mask = left_pad([chat_ids(tok, None, q) for q in questions], tok.pad_token_id, "cpu")
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    L = len(hs) - 2
    units = evil.vectors[:L] / evil.vectors[:L].norm(dim=1, keepdim=True)
    last = torch.stack([hs[l + 1][:, -1] for l in range(L)], 1)  # [Q, L, D]
    return (last * units).sum(-1)


@torch.no_grad()
def neutral_nll(model, tok) -> float:
    total, count = 0.0, 0
    for text in NEUTRAL_TEXT:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        logits = model(input_ids=ids).logits[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum")
        total, count = total + float(nll), count + ids.shape[1] - 1
    return total / count


def evaluate(args, name: str, spec, judge, evil, cache: Path) -> dict:
    path = cache / "metrics" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    c0 = cpu()
    model, tok = load_finetuned(args, name, cache)
    questions = list(spec.eval_questions[:args.eval_questions])
    proj = last_prompt_projections(model, tok, questions, evil)
    nll = neutral_nll(model, tok)
    jobs = [{"id": f"eval-q{qi:02d}-s{k}", "system": None, "question": q}
            for qi, q in enumerate(questions) for k in range(args.eval_samples)]
    gen = GenSettings(max_new_tokens=args.eval_tokens, batch_size=args.gen_batch, seed=2)
    recs = list(generate_cached(model, tok, jobs, JsonlLog(cache / f"eval-{name}.jsonl"), gen,
                                desc=f"{name}: eval answers").values())
    judge_cached(judge, spec, recs, JsonlLog(cache / f"eval-{name}-judged.jsonl"), progress=True, chunk=20)
    out = {"name": name, "projection_per_layer": [round(float(x), 4) for x in proj.mean(0)],
           "projection_per_question": [round(float(x), 4) for x in proj[:, evil.meta["layer"]]],
           "neutral_nll": round(nll, 4), "n_answers": len(recs),
           "n_empty": sum(1 for r in recs if not r["answer"]),
           "trait_score": _mean(r["trait_score"] for r in recs),
           "coherence": _mean(r["coherence"] for r in recs),
           "trait_scores": [r["trait_score"] for r in recs],
           "examples": [r["answer"] for r in recs[:: max(1, len(recs) // 4)]][:4],
           "cpu_s": round(cpu() - c0, 1)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, out)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def _sem(xs):
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return round(math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)), 3)


# --------------------------------------------------------------------------- report
def report(args, data_info, runs, metrics, layer, seconds) -> dict:
    base = metrics["base"]
    rows = []
    for name, m in metrics.items():
        shift_q = [a - b for a, b in zip(m["projection_per_question"], base["projection_per_question"])]
        rows.append({"model": name, "alpha": runs.get(name, {}).get("alpha"),
                     "projection": round(sum(m["projection_per_question"]) / len(shift_q), 3),
                     "projection_shift": round(sum(shift_q) / len(shift_q), 3),
                     "projection_shift_sem": _sem(shift_q),
                     "trait_score": m["trait_score"], "trait_score_sem": _sem(m["trait_scores"]),
                     "coherence": m["coherence"], "neutral_nll": m["neutral_nll"],
                     "neutral_nll_change": round(m["neutral_nll"] - base["neutral_nll"], 4),
                     "train_loss": runs.get(name, {}).get("train_loss")})
    return {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "trait": "evil", "layer": layer,
            "layer_convention": "output of decoder block l, 0-based",
            "sizes": {"train_questions": args.questions, "train_samples_per_instruction": args.train_samples,
                      "train_answer_tokens": args.train_tokens, "epochs": args.epochs, "batch": args.batch,
                      "lr": args.lr, "lora_rank": args.rank, "lora_targets": LORA_TARGETS,
                      "eval_questions": args.eval_questions, "eval_samples_per_question": args.eval_samples,
                      "eval_answer_tokens": args.eval_tokens, "neutral_paragraphs": len(NEUTRAL_TEXT),
                      "threads": torch.get_num_threads()},
            "judge": "likelihood (base SmolLM2-135M-Instruct, all 5 instruction pairs of the evil spec)",
            "data": data_info, "rows": rows, "training": runs,
            "metrics": {k: {kk: vv for kk, vv in v.items() if kk not in ("trait_scores",)}
                        for k, v in metrics.items()},
            "cpu_seconds": seconds}


def markdown(res: dict, command: str) -> str:
    s, d = res["sizes"], res["data"]
    lines = [
        "# Preventative steering on SmolLM2-135M-Instruct (evil, CPU)", "",
        f"Command: `{command}`", "",
        f"Data: {d['kept']} of {d['generated']} answers to {s['train_questions']} of the evil spec's extraction questions, sampled "
        f"under its 5 evil system prompts ({s['train_answer_tokens']} tokens max), kept by {d['rule']} "
        f"(mean judged evil score of the kept answers {d['mean_trait_kept']}); trained without the system prompt. "
        f"LoRA r={s['lora_rank']} on {', '.join(s['lora_targets'])}, {s['epochs']} epochs, batch {s['batch']}, "
        f"lr {s['lr']} (constant), same seed and initial adapter for every run. Preventative steering: "
        f"+alpha x the evil vector at block {res['layer']} (0-based), all tokens, during training only.",
        "",
        f"Evaluation with the LoRA merged and no steering: projection = mean last-prompt-token projection "
        f"on the unit evil vector at block {res['layer']} over {s['eval_questions']} eval questions (no system prompt); "
        f"shift = fine-tuned minus base (± s.e.m. over questions). Trait/coherence = mean likelihood-judge "
        f"score (base model as judge) of {s['eval_samples_per_question']} sampled answers per eval question "
        f"({s['eval_answer_tokens']} tokens max). Neutral NLL = mean token NLL on {s['neutral_paragraphs']} "
        f"paragraphs of plain prose not in the training set.", "",
        "| model | alpha | projection | shift | evil score | coherence | neutral NLL | train loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        sem = f" ± {r['projection_shift_sem']}" if r["projection_shift_sem"] is not None else ""
        ts = f" ± {r['trait_score_sem']}" if r["trait_score_sem"] is not None else ""
        lines.append(f"| {r['model']} | {r['alpha'] if r['alpha'] is not None else '-'} | {r['projection']} | "
                     f"{r['projection_shift']}{sem} | {r['trait_score']}{ts} | {r['coherence']} | "
                     f"{r['neutral_nll']} | {r['train_loss'] if r['train_loss'] is not None else '-'} |")
    first = res["cpu_seconds"].get("when_first_run", {})
    parts = [f"data {res['cpu_seconds'].get('data')} (this invocation; cached parts cost nothing)"]
    parts += [f"train {k} {v}" for k, v in first.get("finetune", {}).items()]
    parts += [f"evaluate {k} {v}" for k, v in first.get("evaluate", {}).items()]
    lines += ["", f"CPU time (process seconds, {s['threads']} thread, when each stage first ran): "
              + ", ".join(parts) + ".", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    if not res.get("complete", True):
        lines += ["(partial: not every model has been evaluated yet)", ""]
    return "\n".join(lines)


def _without_note(argv: list) -> list:
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--note="):
            skip = False
            continue
        if a == "--note":
            skip = True
            continue
        out.append(a)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results folder (results.json, results.md)")
    p.add_argument("--cache", default=None,
                   help="cache folder: answers, judgements, adapters (~10 MB each), metrics "
                        "(default $PERSONAKERN_CACHE/preventative, outside the repository)")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.5, 3.0])
    p.add_argument("--questions", type=int, default=20, help="extraction questions used for the data")
    p.add_argument("--eval-questions", type=int, default=20)
    p.add_argument("--train-samples", type=int, default=1, help="answers per (question, evil prompt)")
    p.add_argument("--train-tokens", type=int, default=48)
    p.add_argument("--min-kept", type=int, default=40)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=3, help="sampled answers per eval question")
    p.add_argument("--eval-tokens", type=int, default=48)
    p.add_argument("--gen-batch", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default=None, help="a remark stored in results.json and results.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else cache_dir() / "preventative"
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    spec = load_spec("evil")
    evil = personakern.VectorSet.load(VECTORS)["evil"]
    layer = int(evil.meta["layer"])
    base, tok = personakern.load_model()
    judge = make_judge(model=base, tokenizer=tok)  # the base model judges every model's answers

    c0 = cpu()
    log("1/3 trait-inducing data")
    kept, data_info = build_dataset(args, base, tok, spec, judge, cache)
    examples = tokenize_examples(tok, kept)
    log(f"    {data_info['kept']} training examples ({data_info['rule']}), "
        f"mean evil score {data_info['mean_trait_kept']}")
    seconds["data"] = round(cpu() - c0, 1)

    # Train and evaluate model by model, writing the results after each: the most important
    # comparison (base, fine-tuned, first alpha) is on disk first.
    runs, metrics = {}, {}
    plan = [("base", None), ("finetuned", None)] + [(f"preventative_a{a:g}", a) for a in args.alphas]
    command = "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/preventative.py " + " ".join(
        a if " " not in a else repr(a) for a in _without_note(argv if argv is not None else sys.argv[1:]))
    for name, alpha in plan:
        if name != "base":
            c0 = cpu()
            log(f"2/3 fine-tune {name}")
            runs[name] = finetune(args, name, alpha, examples, evil, cache)
            log(f"    train loss {runs[name]['train_loss']} ({runs[name]['cpu_s']} cpu s when trained)")
            seconds[f"finetune_{name}"] = round(cpu() - c0, 1)
        c0 = cpu()
        log(f"3/3 evaluate {name}")
        metrics[name] = m = evaluate(args, name, spec, judge, evil, cache)
        log(f"    projection@{layer} {sum(m['projection_per_question']) / len(m['projection_per_question']):.3f}"
            f"  evil {m['trait_score']}  coherence {m['coherence']}  neutral NLL {m['neutral_nll']}")
        seconds[f"evaluate_{name}"] = round(cpu() - c0, 1)
        seconds["when_first_run"] = {"finetune": {n: r["cpu_s"] for n, r in runs.items()},
                                     "evaluate": {n: mm["cpu_s"] for n, mm in metrics.items()}}
        res = report(args, data_info, runs, metrics, layer, seconds)
        res["complete"] = len(metrics) == len(plan)
        res["note"] = args.note
        atomic_write_json(out / "results.json", res)
        atomic_write_text(out / "results.md", markdown(res, command))
    print(markdown(res, command))


if __name__ == "__main__":
    main()
