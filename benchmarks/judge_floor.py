"""How much work the likelihood judge must do, per engine, on the answers of an ``extract`` run:
the floor under any engine's judge on a CPU where both engines' matrix multiplications run at
the same rate (docs/extraction.md, "Where the ceiling is on a CPU").

    python benchmarks/judge_floor.py RUN_FOLDER [--answers extract|sweep] [--trait evil] [--block-size 32 16]

The judge scores every answer under the trait's 10 instruction prompts and the neutral prompt
(the same token sequences on every engine: ``likelihood.answer_sequences``). Counted per
engine, in the model's linear layers (SmolLM2-135M: 2 x 106.2 M FLOP a token through the
blocks, 2 x 28.3 M for a row's vocabulary projection; attention's own few per cent left out):

- Hugging Face: every token of every sequence through the blocks, the vocabulary projection for
  the answer rows only (``logits_to_keep``);
- vLLM with prefix caching in blocks of B tokens: the tokens the cache cannot serve (simulated in
  the judge's submission order, nothing evicted), the vocabulary projection for the answer rows
  (the scoring requests);
- the floor: the answer tokens alone, through the blocks and the vocabulary projection. The
  answer's tokens depend on the system prompt at every layer, so no exact engine computes less.

Prints the counts and ``HF / floor``: the most any engine's judge can gain over Hugging Face's
at equal FLOP rates.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK_FLOP = 2 * 106.2e6     # SmolLM2-135M: q, k, v, o and the MLP of 30 blocks, per token
HEAD_FLOP = 2 * 28.3e6       # 576 x 49 152 vocabulary projection, per row


def records(run: Path, which: str = "extract") -> list:
    """(question, answer) of every answer the run judged: the extraction's (answer and held-out
    caches) or the steering sweep's."""
    out = []
    if which == "sweep":
        files = [f for f in sorted(run.glob("sweep-*.jsonl")) if not f.name.startswith("sweep-judged-")]
    else:
        files = sorted(run.glob("answers-*.jsonl")) + sorted(run.glob("heldout-*.jsonl"))
    for f in files:
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                for rec in r if isinstance(r, list) else [r]:
                    if isinstance(rec, dict) and "answer" in rec:
                        out.append((rec["question"], rec["answer"]))
    return out


def computed_with_cache(seqs, block: int) -> int:
    """Tokens a prefix cache of ``block``-token blocks cannot serve, sequences in order."""
    seen, total = set(), 0
    for ids in seqs:
        h, cached, hashes = b"", 0, []
        for b in range(len(ids) // block):
            h = hashlib.sha1(h + json.dumps(ids[b * block:(b + 1) * block]).encode()).digest()
            hashes.append(h)
        for h in hashes:
            if h not in seen:
                break
            cached += block
        cached = min(cached, len(ids) - 1)   # the last token is always computed
        total += len(ids) - cached
        seen.update(hashes)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--answers", choices=["extract", "sweep"], default="extract")
    ap.add_argument("--trait", default="evil")
    ap.add_argument("--block-size", type=int, nargs="*", default=[32, 16])
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer
    from personakern import models
    from personakern.extraction.spec import load_spec
    from personakern.judges.likelihood import NEUTRAL_SYSTEM, answer_sequences

    tok = AutoTokenizer.from_pretrained(models.resolve("smollm2"))
    spec = load_spec(args.trait)
    recs = records(args.run, args.answers)
    if not recs:
        raise SystemExit(f"no {args.answers} answers in {args.run}")
    # the judge's order: per answer its 10 instruction prompts (score), then the neutral one (coherence)
    samples = [(s, q, a) for q, a in recs for pair in spec.instructions for s in pair]
    samples += [(NEUTRAL_SYSTEM, q, a) for q, a in recs]
    seqs = answer_sequences(tok, samples)
    tokens = sum(len(s) for s, _ in seqs)
    answer = sum(len(s) - p for s, p in seqs)
    hf = tokens * BLOCK_FLOP + answer * HEAD_FLOP
    floor = answer * (BLOCK_FLOP + HEAD_FLOP)
    report = {"answers": len(recs), "sequences": len(seqs), "tokens": tokens, "answer_tokens": answer,
              "mean_prefix": (tokens - answer) / len(seqs), "mean_answer": answer / len(seqs),
              "hf_tflop": hf / 1e12, "floor_tflop": floor / 1e12, "hf_over_floor": hf / floor}
    for b in args.block_size:
        c = computed_with_cache([s for s, _ in seqs], b)
        v = c * BLOCK_FLOP + answer * HEAD_FLOP
        report[f"vllm_block{b}"] = {"computed_tokens": c, "tflop": v / 1e12, "hf_over_vllm": hf / v}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
