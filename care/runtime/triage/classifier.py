"""The learned part of triage: hashed n-gram features and a multinomial linear model (numpy only).

One implementation for training (scripts/train_triage.py fits it with scikit-learn) and the chat path (numpy:
no torch, no sklearn). Three models share it: triage (emergency category or "none", model.npz), domain
(banking / general / medical, domain.npz) and language (en, fr, es, pt, sw, hi, bn, lang.npz). Features:
word 1-2-grams and char 3-5-grams within words of the normalised text (any script: a Devanagari or Bengali
word is its own code points, marks included), plus context cues ("past", "hypothetical", ...) weighted x2.
Weights are int8 per class-scaled: 65,536 buckets x classes.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from care.errors import ConfigError

log = logging.getLogger(__name__)

NULL = "none"  # the triage classifier's "not an emergency" class
N_BUCKETS = 1 << 16  # hashed feature space: 65,536 rows x classes int8

def features(norm: str, cues: Sequence[str] = ()) -> dict[int, float]:
    """Hashed word 1-2-grams and char 3-5-grams within words, plus `cues` (Context.cues: "past",
    "general", ... found in the text, so the model can learn what they do); values L2-normalised."""
    toks = [t for t in norm.split() if t not in (".", ",", "!", "?", ";", ":", "-", "(", ")", '"')]
    feats: dict[int, float] = {}

    def add(key: str) -> None:
        h = zlib.crc32(key.encode("utf-8")) & (N_BUCKETS - 1)
        feats[h] = feats.get(h, 0.0) + 1.0

    for cue in cues:
        add("cue:" + cue)
        add("cue:" + cue)  # weight 2: one cue against dozens of n-grams
    for i, tok in enumerate(toks):
        add("w:" + tok)
        if i:
            add("b:" + toks[i - 1] + " " + tok)
        padded = f" {tok} "
        for n in (3, 4, 5):
            for j in range(len(padded) - n + 1):
                add(padded[j : j + n])
    if feats:
        norm2 = sum(v * v for v in feats.values()) ** 0.5
        for k in feats:
            feats[k] /= norm2
    return feats


@dataclass
class LinearModel:
    """logits = bias + sum_i value_i * weights[bucket_i] * scale (weights int8 per class-scaled)."""

    classes: list[str]
    weights: np.ndarray  # (N_BUCKETS, n_classes) int8
    scale: np.ndarray  # (n_classes,) float32
    bias: np.ndarray  # (n_classes,) float32
    threshold: float = 0.5  # P(emergency) at or above which a message is flagged (triage model)
    veto: float = 0.0  # P(emergency) below which a lexicon hit is not flagged (triage model; 0: never)

    def proba(self, norm: str, cues: Sequence[str] = ()) -> dict[str, float]:
        feats = features(norm, cues)
        if not feats:
            logits = self.bias.astype(np.float64)
        else:
            idx = np.fromiter(feats.keys(), dtype=np.int64, count=len(feats))
            val = np.fromiter(feats.values(), dtype=np.float32, count=len(feats))
            logits = self.bias + (val @ self.weights[idx].astype(np.float32)) * self.scale
        logits = logits - logits.max()
        p = np.exp(logits)
        p /= p.sum()
        return dict(zip(self.classes, p.tolist(), strict=True))

    def save(self, path: Path, **extra: object) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, classes=np.array(self.classes), weights=self.weights, scale=self.scale,
                            bias=self.bias, threshold=np.float32(self.threshold), veto=np.float32(self.veto),
                            **{k: np.asarray(v) for k, v in extra.items()})
        tmp.replace(path)

    @classmethod
    def from_float(cls, classes: Sequence[str], coef: np.ndarray, bias: np.ndarray,
                   threshold: float = 0.5, veto: float = 0.0) -> LinearModel:
        """coef: (n_classes, N_BUCKETS) floats, quantised to int8 per class."""
        scale = np.maximum(np.abs(coef).max(axis=1), 1e-8) / 127.0
        q = np.clip(np.round(coef / scale[:, None]), -127, 127).astype(np.int8).T.copy()
        return cls(list(classes), q, scale.astype(np.float32), bias.astype(np.float32), float(threshold),
                   float(veto))


def load_model(path: Path) -> LinearModel:
    try:
        with np.load(path, allow_pickle=False) as z:
            return LinearModel([str(c) for c in z["classes"]], z["weights"], z["scale"], z["bias"],
                               float(z["threshold"]), float(z["veto"]) if "veto" in z.files else 0.0)
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(f"Triage model file is missing or corrupt: {exc}", path=path,
                          hint="Re-run `python scripts/train_triage.py` or reinstall care") from exc


def model_path(name: str = "model.npz") -> Path:
    return Path(str(resources.files("care") / "data" / "triage" / name))


@lru_cache(maxsize=4)
def packaged_model(name: str = "model.npz") -> LinearModel | None:
    """The shipped classifier, or None when it was not built yet (safety.load_rules refuses that for the
    triage model; the domain model falls back to keyword rules)."""
    path = model_path(name)
    if not path.is_file():
        log.info("no classifier at %s (built by make setup)", path)
        return None
    return load_model(path)
