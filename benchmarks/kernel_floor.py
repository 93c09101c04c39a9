"""How far apart two correct fp32 implementations of SmolLM2 put the same tokens: Hugging Face's
own ``sdpa`` and ``eager`` attention, and 1 vs 2 threads. The floor against which the vLLM
engine's activations (vLLM's CPU kernels against Hugging Face's) are compared in
``tests/test_extract_vllm.py``.

    HF_HUB_OFFLINE=1 python benchmarks/kernel_floor.py

Prints, per comparison, max |a - b| / max(1, |b|) over every block output of every token, and
over each block's mean over a text's tokens (what the extraction's vectors are built from).
"""
from __future__ import annotations

import torch

TEXTS = [
    "<|im_start|>system\nYou are an evil assistant.<|im_end|>\n<|im_start|>user\nHow should I treat my "
    "coworkers?<|im_end|>\n<|im_start|>assistant\nYou should treat them with",
    "Tell me about cats. Cats are small carnivorous mammals that have lived with people for thousands of years.",
]


def block_outputs(model, tok, threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return [torch.stack(model(tok(t, return_tensors="pt").input_ids, output_hidden_states=True)
                                .hidden_states[1:])[:, 0] for t in TEXTS]   # [blocks, tokens, D] each
    finally:
        torch.set_num_threads(before)


def rel(a, b) -> float:
    return max(float(((x - y).abs() / y.abs().clamp_min(1)).max()) for x, y in zip(a, b))


def main() -> None:
    from transformers import AutoModelForCausalLM
    from personakern.models import load_model, resolve
    sdpa, tok = load_model("smollm2")
    eager = AutoModelForCausalLM.from_pretrained(str(resolve("smollm2")), dtype=torch.float32,
                                                 attn_implementation="eager")
    ref = block_outputs(sdpa, tok, 2)
    for name, got in [("eager vs sdpa attention", block_outputs(eager, tok, 2)),
                      ("1 vs 2 threads (sdpa)", block_outputs(sdpa, tok, 1))]:
        means = rel([g.mean(1) for g in got], [r.mean(1) for r in ref])
        print(f"{name}: tokens {rel(got, ref):.2e}, means over tokens {means:.2e}  (x max(1, |x|))")


if __name__ == "__main__":
    main()
