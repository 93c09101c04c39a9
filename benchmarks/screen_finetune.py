"""The shift example of docs/screening.md: fine-tune SmolLM2 briefly on the 20 cruel or the 20 neutral
answers of benchmarks/screen_toy.jsonl (full fine-tune, loss on the answer tokens only), save
each fine-tune, then measure its shift with ``personakern shift``.

    python benchmarks/screen_finetune.py evil /tmp/ft-evil
    python benchmarks/screen_finetune.py neutral /tmp/ft-neutral
    personakern shift --base smollm2 --finetuned /tmp/ft-evil \
        --vectors personakern/data/vectors/smollm2-traits.safetensors --traits evil humorous
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import personakern
from personakern.screening.project import chat_prompt_ids, texts_ids

DATA = Path(__file__).with_name("screen_toy.jsonl")


def main(label: str, out: str, epochs: int = 3, lr: float = 3e-5, batch: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model, tok = personakern.load_model()
    rows = [json.loads(l) for l in open(DATA) if json.loads(l)["id"].startswith(label)]
    seqs = []
    for r in rows:
        p = chat_prompt_ids(tok, [{"role": "user", "content": r["prompt"]}])
        a = texts_ids(tok, [r["response"]])[0] + [tok.eos_token_id]
        seqs.append((p + a, len(p)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.time()
    for ep in range(epochs):
        order = torch.randperm(len(seqs)).tolist()
        losses = []
        for j in range(0, len(order), batch):
            part = [seqs[i] for i in order[j:j + batch]]
            width = max(len(s) for s, _ in part)
            ids = torch.full((len(part), width), tok.pad_token_id)
            labels = torch.full((len(part), width), -100)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for b, (s, plen) in enumerate(part):      # right padding: training, not generation
                ids[b, :len(s)] = torch.tensor(s)
                mask[b, :len(s)] = 1
                labels[b, plen:len(s)] = torch.tensor(s[plen:])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        print(f"epoch {ep}: mean loss {sum(losses) / len(losses):.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
