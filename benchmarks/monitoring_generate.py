"""Generation for benchmarks/monitoring_experiment.py: answers and their last-prompt-token
projections, on a patched Hugging Face model or on a vLLM engine."""
from __future__ import annotations

import torch


@torch.no_grad()
def generate_monitored(model, tok, handle, messages, settings, seed):
    """Answers and ``[B, L, M]`` last-prompt-token projections for chat ``messages`` (one list of
    messages per row, ending with the user turn), in one monitored ``generate``."""
    from personakern.extraction.generate import decode_answer, eos_ids, left_pad

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seqs = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for m in messages]
    ids, mask = left_pad(seqs, pad, "cpu")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens, do_sample=True,
                             temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                             repetition_penalty=settings.repetition_penalty, pad_token_id=pad)
    readings = handle.readings
    # left padding: every row's prompt ends at the same absolute column, the batch width
    assert bool((readings.prompt_lengths == ids.shape[1]).all()), readings.prompt_lengths
    eos = eos_ids(model, tok)
    answers = [decode_answer(tok, row, eos) for row in out[:, ids.shape[1]:].tolist()]
    return answers, readings.last_prompt_token(), [len(s) for s in seqs]


def generate_monitored_vllm(llm, model, tok, trait, messages, settings, seed):
    """:func:`generate_monitored` on a vLLM engine: one request per row, each monitoring ``trait``
    at every block with its own seed; ``[B, L, 1]`` last-prompt-token projections."""
    from vllm import TokensPrompt
    from personakern.extraction.generate import batch_seed, decode_answer, eos_ids
    from personakern.extraction.vllm_generate import sampling_params
    from personakern.vllm import readings
    from personakern.vllm.nucleus import engine_has_nucleus
    seqs = [tok(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for m in messages]
    eos = eos_ids(model, tok)
    spec = {"monitor": {"traits": [trait], "layers": "all"}}
    nucleus = engine_has_nucleus(llm)
    outs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs],
                        [sampling_params(settings, eos, batch_seed(seed, i), spec, nucleus=nucleus)
                         for i in range(len(seqs))],
                        use_tqdm=False)
    answers = [decode_answer(tok, o.outputs[0].token_ids, eos) for o in outs]
    lpt = [readings(o).values[0, len(s) - 1] for s, o in zip(seqs, outs)]      # [L, 1] each
    return answers, torch.stack(lpt), [len(s) for s in seqs]
