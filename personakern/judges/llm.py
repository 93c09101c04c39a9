"""The paper's judge: a local causal LM reads the rubric and its probabilities of the replies
"0" ... "100" give the score.

How a reply's probability is computed
-------------------------------------
The rubric (``spec.judge_prompt(question, answer)``, or :data:`COHERENCE_RUBRIC`) is sent as one
user message through the model's chat template, with the generation prompt. The reply ``k`` is
scored by the probability of its **full token sequence followed by a terminator**:

    p_k = P(tokens of str(k), then one of the end tokens)

where the end tokens are the model's end-of-turn / EOS tokens (``<|im_end|>`` for SmolLM2; all
of ``generation_config.eos_token_id`` and the tokenizer's EOS). Many tokenizers have single
tokens only for 0-9 (SmolLM2 writes "75" as "7", "5"), so without the terminator P("7") would
include P("75"), P("70"), ... and the weighted mean would be biased toward single digits;
with it, the 101 events are disjoint and ``sum_k p_k <= 1``. The price: mass that the model puts
on "75 because ..." or " 75" is not counted (``end="nondigit"`` counts "k followed by any token
that does not start with a digit" instead, see :class:`LLMJudge`).

The score is ``sum_k k p_k / sum_k p_k``, or None when ``sum_k p_k < min_mass`` (0.25): a
model that mostly wants to write something else has not given a number.

Efficiency: the integers' token sequences form a trie (SmolLM2: 10 one-digit nodes, 90 two-digit
nodes and "100"). One forward over the left-padded prompts fills the KV cache and gives the
first-token distribution; one more forward feeds all trie nodes of every prompt *at once*, as a
tree: each node attends to its prompt and to its own ancestors only (a custom 4-D attention mask),
at position ``prompt_length + depth - 1``. Its logits are the next-token distribution after that
prefix, so the two forwards give every conditional needed (1 + 101 positions per prompt).
This needs an attention implementation that takes a 4-D mask (eager, sdpa; not flash-attention).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .base import (COHERENCE_RUBRIC, Judge, JudgeError, batches, check_lengths, fill, progress_bar,
                   weighted_score)

MAX_VALUE = 100
END_TOKEN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
                   "<|endoftext|>", "</s>")


def model_id(model) -> str:
    cfg = getattr(model, "config", None)
    name = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or ""
    return str(name) or getattr(cfg, "model_type", "model")


def end_token_ids(model, tok) -> List[int]:
    """The ids that end a reply: generation_config's EOS ids and the tokenizer's EOS."""
    ids = set()
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if eos is not None:
        ids.update([eos] if isinstance(eos, int) else list(eos))
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    if not ids:  # no declared EOS: fall back to well-known end-of-turn token names
        unk = tok.unk_token_id
        for name in END_TOKEN_NAMES:
            i = tok.convert_tokens_to_ids(name)
            if isinstance(i, int) and i != unk and i >= 0:
                ids.add(i)
    if not ids:
        raise JudgeError("the judge model's tokenizer has no EOS / end-of-turn token; pass end_ids=")
    return sorted(ids)


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache``, earlier ``past_key_values``."""
    import inspect
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


class IntegerTrie:
    """The token sequences of "0" ... "max_value" as a prefix tree.

    ``token[i]``, ``parent[i]`` (-1 = the prompt), ``depth[i]`` (1-based) for each node ``i``
    (parents come before children); ``node_of[k]`` is the node where integer ``k`` ends;
    ``ancestors`` is ``[N, N]`` bool, True where column j is row i or one of its ancestors."""

    def __init__(self, tok, max_value: int = MAX_VALUE):
        index: Dict[Tuple[int, ...], int] = {}
        self.token, self.parent, self.depth, self.node_of = [], [], [], []
        for k in range(max_value + 1):
            seq = tuple(tok(str(k), add_special_tokens=False)["input_ids"])
            if not seq:
                raise JudgeError(f"the tokenizer encodes {k!r} as no tokens")
            for d in range(1, len(seq) + 1):
                if seq[:d] not in index:
                    index[seq[:d]] = len(self.token)
                    self.token.append(seq[d - 1])
                    self.parent.append(index[seq[:d - 1]] if d > 1 else -1)
                    self.depth.append(d)
            self.node_of.append(index[seq])
        n = len(self.token)
        anc = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                anc[i, j] = True
                j = self.parent[j]
        self.ancestors = anc

    def __len__(self) -> int:
        return len(self.token)


class LLMJudge(Judge):
    """Judge with a local Hugging Face causal LM (see the module docstring for the method).

    ``model``/``tokenizer``: a loaded pair; or ``model_path`` (any name ``personakern.load_model``
    takes; default SmolLM2-135M-Instruct). ``min_mass``: below this total probability of the
    integers the score is None. ``end``: ``"eos"`` (default; reply = digits then an end token) or
    ``"nondigit"`` (reply = digits then any token that does not start with a digit).
    ``batch_size``: prompts per forward. ``cache_distributions``: keep each prompt's
    distribution in ``self.cache`` (to re-score with another ``min_mass`` for free).
    """

    def __init__(self, model=None, tokenizer=None, model_path: Optional[str] = None, batch_size: int = 8,
                 min_mass: float = 0.25, end: str = "eos", coherence_rubric: str = COHERENCE_RUBRIC,
                 end_ids: Optional[Sequence[int]] = None, name: Optional[str] = None,
                 cache_distributions: bool = False):
        if model is None:
            from ..models import DEFAULT_MODEL, load_model
            model, tokenizer = load_model(model_path or DEFAULT_MODEL)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer with the model")
        if end not in ("eos", "nondigit"):
            raise ValueError(f"end must be 'eos' or 'nondigit', got {end!r}")
        impl = str(getattr(model.config, "_attn_implementation", "") or "")
        if "flash" in impl:
            raise JudgeError(f"the LLM judge feeds the number trie with a 4-D attention mask, which "
                             f"{impl} ignores; load the judge model with attn_implementation='sdpa'")
        self.model = model
        self._configure(tokenizer, model, batch_size, min_mass, end, coherence_rubric, end_ids,
                        cache_distributions)
        self.name = name or f"llm:{model_id(model)}" + ("" if end == "eos" else f"+end={end}")

    def _configure(self, tokenizer, eos_source, batch_size, min_mass, end, coherence_rubric, end_ids,
                   cache_distributions) -> None:
        """The settings every engine shares (the vLLM one: :mod:`.vllm_engine`); ``eos_source``
        is anything with the model's ``generation_config`` (for :func:`end_token_ids`)."""
        self.tok = tokenizer
        self.batch_size, self.min_mass, self.end = batch_size, min_mass, end
        self.coherence_rubric = coherence_rubric
        self.end_ids = sorted(end_ids) if end_ids is not None else end_token_ids(eos_source, tokenizer)
        self.trie = IntegerTrie(tokenizer)
        self._digit_tokens: Optional[torch.Tensor] = None
        # prompt -> distribution, when asked for (re-scoring the same prompts with another min_mass)
        self.cache: Optional[Dict[str, torch.Tensor]] = {} if cache_distributions else None
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_ids[0]

    # -- prompts ---------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> List[int]:
        """Token ids of ``prompt`` as a user message in the chat template, generation prompt on."""
        tok = self.tok
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
        return tok(prompt + "\n", add_special_tokens=True)["input_ids"]  # base model: plain text

    def _digit_start_tokens(self) -> torch.Tensor:
        """Vocabulary ids whose text starts with a digit (for ``end="nondigit"``)."""
        if self._digit_tokens is None:
            n = self.model.get_output_embeddings().weight.shape[0]
            texts = self.tok.convert_ids_to_tokens(list(range(min(n, len(self.tok)))))
            ids = [i for i, t in enumerate(texts) if t and t[0].isdigit()]
            self._digit_tokens = torch.tensor(ids, dtype=torch.long)
        return self._digit_tokens

    # -- the distribution ------------------------------------------------------------------
    @torch.inference_mode()
    def integer_distributions(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[len(prompts), 101]`` float64: p_k for k = 0..100 (see the module docstring);
        each row sums to at most 1. All prompts go through in one batch: see :meth:`score`."""
        model, trie = self.model, self.trie
        device = next(model.parameters()).device
        seqs = [self.prompt_ids(p) for p in prompts]
        B, T, N = len(seqs), max(len(s) for s in seqs), len(trie)
        ids = torch.full((B, T), self._pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
        ids, mask = ids.to(device), mask.to(device)
        lens = mask.sum(1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                    use_cache=True, logits_to_keep=1)
        root = torch.log_softmax(out.logits[:, -1].double(), -1)                    # [B, V]

        # the trie as one tree-shaped continuation per prompt
        depth = torch.tensor(trie.depth, device=device)
        tree_ids = torch.tensor(trie.token, device=device).expand(B, N)
        tree_pos = lens[:, None] - 1 + depth[None, :]
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        allow = torch.cat([mask.bool()[:, None, :].expand(B, N, T),
                           trie.ancestors.to(device)[None].expand(B, N, N)], dim=-1)   # [B, N, T+N]
        mask4d = torch.zeros(allow.shape, dtype=dtype, device=device)
        mask4d.masked_fill_(~allow, torch.finfo(dtype).min)
        cache = getattr(out, "cache", None) or out.past_key_values
        out2 = model(input_ids=tree_ids, attention_mask=mask4d[:, None], position_ids=tree_pos,
                     use_cache=True, **{_cache_kwarg(model): cache})
        logits = out2.logits.double()                                               # [B, N, V]
        lse = logits.logsumexp(-1)                                                  # [B, N]

        def ctx_logp(node: int, cols) -> torch.Tensor:
            """log P(cols | prompt + prefix of ``node``) (node -1 = the prompt alone)."""
            if node < 0:
                return root[:, cols]
            return logits[:, node, cols] - lse[:, node, None]

        cum = torch.empty(B, N, dtype=torch.float64, device=device)                # log P(prefix)
        for i, (t, par) in enumerate(zip(trie.token, trie.parent)):
            cum[:, i] = ctx_logp(par, [t])[:, 0] + (cum[:, par] if par >= 0 else 0.0)
        if self.end == "eos":
            end = torch.stack([ctx_logp(n, self.end_ids).logsumexp(-1) for n in trie.node_of], 1)
        else:
            digits = self._digit_start_tokens().to(device)
            end = torch.stack([torch.log1p(-ctx_logp(n, digits).exp().sum(-1).clamp(max=1.0))
                               for n in trie.node_of], 1)
        nodes = torch.tensor(trie.node_of, device=device)
        return (cum[:, nodes] + end).exp().cpu()

    def integer_distribution(self, prompt: str) -> torch.Tensor:
        """``[101]`` float64: the probability of each reply "0" ... "100" to ``prompt``."""
        return self.integer_distributions([prompt])[0]

    # -- the interface ---------------------------------------------------------------------
    def scores_for_prompts(self, prompts: Sequence[str], progress: bool = False,
                           desc: str = "judge") -> List[Optional[float]]:
        dists: Dict[int, torch.Tensor] = {}
        todo = list(range(len(prompts)))
        if self.cache is not None:
            dists = {i: self.cache[p] for i, p in enumerate(prompts) if p in self.cache}
            todo = [i for i in todo if i not in dists]
        with progress_bar(len(prompts), desc, progress) as bar:
            bar.update(len(dists))
            for idx in batches(len(todo), self.batch_size):
                rows = [todo[i] for i in idx]
                for i, row in zip(rows, self.integer_distributions([prompts[i] for i in rows])):
                    dists[i] = row
                    if self.cache is not None:
                        self.cache[prompts[i]] = row
                bar.update(len(rows))
        return [weighted_score(dists[i], self.min_mass) for i in range(len(prompts))]

    def score(self, spec, questions, answers, progress=False):
        check_lengths(questions, answers)
        prompts = [spec.judge_prompt(q, a) for q, a in zip(questions, answers)]
        return self.scores_for_prompts(prompts, progress, f"judge {spec.name}")

    def coherence(self, questions, answers, progress=False):
        check_lengths(questions, answers)
        prompts = [fill(self.coherence_rubric, q, a) for q, a in zip(questions, answers)]
        return self.scores_for_prompts(prompts, progress, "judge coherence")
