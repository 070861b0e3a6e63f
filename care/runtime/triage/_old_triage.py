"""Clinical triage: does a user message (in the context of the conversation) describe an emergency, and which?

Three parts, all numpy + the standard library (no torch, no sklearn on the chat path):

1. `normalize()`: lowercase, accents stripped, curly quotes unified, letters repeated 3+ times squeezed,
   SMS spellings expanded ("u", "cant", "jsuis", "xq"), so the rules see one spelling.
2. The lexicon: the clinic-editable rules of care/data/safety/red_flags.yaml (regular expressions and plain
   `phrases`, EN/FR/ES). Words of the text within one edit of a lexicon word are read as that word
   (typo tolerance: "breathe" for "breath", "siezure" for "seizure"). A hit is cancelled by a negation just
   before it ("no chest pain"), by past history in its sentence ("had a stroke in 2019"), by a general
   question ("what are the signs of a stroke?") and by idioms ("this bill is killing me") -- except for
   rules marked `always_flag`, which nothing cancels, the classifier included.
3. A linear classifier (multinomial logistic regression on hashed word 1-2-grams and char 3-5-grams of the
   normalised text), trained offline by scripts/train_triage.py and shipped as care/data/triage/model.npz
   (int8 weights). It catches wording nobody listed; its threshold was chosen by cross-validation on the
   training split only.

Why this method (figures from `python bench/triage.py`, dev set never tuned on): the regex rules alone
caught 0.44 of emergencies written outside the project (issue 12); the extended lexicon alone reaches
0.503 dev recall (0.118 false alarms on hard negatives); lexicon + classifier reach 0.980 [0.963, 0.990]
(every category >= 0.926) with 0.1% false alarms on Banking77 + Bitext and 0.0% on MedQuAD questions, at
~1 ms CPU a message and 0.3 MB on disk. A sentence-embedding model would cost tens of MB and ~10 ms a
message on one core before showing any gain on this data, so it was not used.

Evidence: the classifier alone flags a message only when some word of it is neither a filler word (function
words, follow-ups such as "and now?", people, numbers; red_flags.yaml `filler`) nor a context fact (age,
pregnancy: `facts`). A lexicon hit needs no such check.

Context: facts from earlier user turns that change what a message means (an age such as "3 weeks old" or
"2 year old", pregnancy, diabetes) are put before the current message; the turn is flagged when the
message alone is, or when the message with those facts is and the facts alone are not.
"""

from __future__ import annotations

import logging
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from care.errors import ConfigError

log = logging.getLogger(__name__)

NULL = "none"  # the classifier's "not an emergency" class
N_BUCKETS = 1 << 16  # hashed feature space: 65,536 rows x classes int8 ~ 1.2 MB

# SMS / chat spellings -> words the rules know (EN/FR/ES). Tokens only (whole words).
SMS = {
    "u": "you", "ur": "your", "r": "are", "pls": "please", "plz": "please", "plss": "please",
    "cant": "can't", "dont": "don't", "wont": "won't", "isnt": "isn't", "doesnt": "doesn't",
    "didnt": "didn't", "hasnt": "hasn't", "wasnt": "wasn't", "aint": "isn't", "couldnt": "couldn't",
    "im": "i'm", "ive": "i've", "hes": "he's", "shes": "she's", "theyre": "they're", "thats": "that's",
    "whats": "what's", "bc": "because", "cuz": "because", "coz": "because", "bcuz": "because",
    "w/": "with", "w/o": "without", "bby": "baby", "bb": "baby", "dr": "doctor", "2day": "today",
    "gonna": "going to", "wanna": "want to", "gotta": "got to", "yr": "year", "yrs": "years",
    "y/o": "years old", "yo": "years old", "wk": "week", "wks": "weeks", "hr": "hour", "hrs": "hours",
    "min": "minute", "mins": "minutes", "abt": "about", "bcoz": "because", "sth": "something",
    "smth": "something", "ppl": "people", "lil": "little", "hosp": "hospital", "asap": "now",
    "mom": "mum", "mommy": "mum", "meds": "medicine", "b4": "before", "2nite": "tonight", "rn": "right now",
    "idk": "i don't know", "n": "and", "&": "and", "bf": "boyfriend", "gf": "girlfriend",
    # French
    "jsuis": "je suis", "chui": "je suis", "jveux": "je veux", "jpeux": "je peux", "jsais": "je sais",
    "pk": "pourquoi", "pq": "pourquoi", "tt": "tout", "ds": "dans", "bcp": "beaucoup", "svp": "s'il vous plait",
    "stp": "s'il te plait", "qd": "quand", "mtn": "maintenant", "jpp": "je peux plus", "jpe": "je peux",
    "c": "c'est", "ya": "il y a", "koi": "quoi", "ms": "mais",
    # Spanish
    "q": "que", "xq": "porque", "porq": "porque", "tb": "tambien", "tmb": "tambien", "x": "por",
    "d": "de", "k": "que", "ke": "que", "toy": "estoy", "ta": "esta", "pa": "para", "hno": "hermano",
}
_TOKEN = re.compile(r"[a-z0-9&/']+|[^\sa-z0-9]")
_REPEAT = re.compile(r"([a-z])\1{2,}")
_SENT = re.compile(r"[.!?;\n]+")
_NEGATION_CUE = re.compile(r"\b(?:no|not|never|without|denies|don't|doesn't|didn't|isn't|pas|sans|sin|ningun|ninguna|"
                           r"aucun|aucune|ni)\b")


def strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def normalize(text: str) -> str:
    """One spelling for the rules and the classifier (see the module docstring)."""
    t = strip_accents(text.lower())
    t = t.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'").replace("\u00b4", "'")
    t = _REPEAT.sub(r"\1\1", t)
    t = re.sub(r"(?<=[a-z])-(?=[a-z])", " ", t)  # "self-harm" -> "self harm"
    t = re.sub(r"(\d)\s*(?:yo|y/o)\b", r"\1 years old", t)  # "2yo" -> "2 years old"
    t = re.sub(r"(\d)(yrs?|years?|wks?|weeks?|mos|months?|days?|hrs?|mins?)\b", r"\1 \2", t)  # "3wks" -> "3 wks"
    words = []
    for tok in _TOKEN.findall(t):
        words.append(SMS.get(tok, tok))
    return " ".join(words)


# -- hashed features and the linear model (one implementation for training and runtime) ---------------
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
                            bias=self.bias, threshold=np.float32(self.threshold),
                            **{k: np.asarray(v) for k, v in extra.items()})
        tmp.replace(path)

    @classmethod
    def from_float(cls, classes: Sequence[str], coef: np.ndarray, bias: np.ndarray,
                   threshold: float = 0.5) -> LinearModel:
        """coef: (n_classes, N_BUCKETS) floats, quantised to int8 per class."""
        scale = np.maximum(np.abs(coef).max(axis=1), 1e-8) / 127.0
        q = np.clip(np.round(coef / scale[:, None]), -127, 127).astype(np.int8).T.copy()
        return cls(list(classes), q, scale.astype(np.float32), bias.astype(np.float32), float(threshold))


def load_model(path: Path) -> LinearModel:
    try:
        with np.load(path, allow_pickle=False) as z:
            return LinearModel([str(c) for c in z["classes"]], z["weights"], z["scale"], z["bias"],
                               float(z["threshold"]))
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


# -- lexicon: typo tolerance, suppressions -----------------------------------------------------------
def _deletes(word: str) -> set[str]:
    return {word[:i] + word[i + 1 :] for i in range(len(word))}


def within_one_edit(a: str, b: str) -> bool:
    """Damerau distance <= 1 (one insertion, deletion, substitution or swap of neighbours)."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    if la == lb:
        diff = [i for i in range(la) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    if la > lb:
        a, b = b, a
    return any(b[:i] + b[i + 1 :] == a for i in range(len(b)))


class TypoIndex:
    """Reads a word within one edit of a lexicon word (5+ letters) as that word (SymSpell-style index)."""

    MIN_LEN = 5

    def __init__(self, vocabulary: Iterable[str]) -> None:
        self.vocab = {w for w in vocabulary if len(w) >= self.MIN_LEN and w.isalpha()}
        self.index: dict[str, set[str]] = {}
        for w in self.vocab:
            for key in (w, *_deletes(w)):
                self.index.setdefault(key, set()).add(w)
        self._cache: dict[str, str] = {}

    def correct(self, word: str) -> str:
        if len(word) < self.MIN_LEN or word in self.vocab or not word.isalpha():
            return word
        hit = self._cache.get(word)
        if hit is None:
            cands: set[str] = set()
            for key in (word, *_deletes(word)):
                cands |= self.index.get(key, set())
            # Typos rarely touch the first letter: "clicked" is not a typo of "licked".
            good = sorted(c for c in cands if c[0] == word[0] and within_one_edit(word, c))
            hit = good[0] if len(good) == 1 else word  # ambiguous: leave it
            if len(self._cache) < 50_000:
                self._cache[word] = hit
        return hit

    def text(self, norm: str) -> str:
        return " ".join(self.correct(w) for w in norm.split(" "))


_WORDS = re.compile(r"[a-z]{5,}")


def pattern_words(sources: Iterable[str]) -> set[str]:
    """Literal words (5+ letters) in regex or phrase sources: the typo index's vocabulary."""
    words: set[str] = set()
    for src in sources:
        cleaned = re.sub(r"\\[a-zA-Z]", " ", src)  # \b, \s, \w are not letters of a word
        words.update(_WORDS.findall(strip_accents(cleaned.lower())))
    return words


def phrase_words(phrase: str) -> list[tuple[str, bool]]:
    """(normalised word, is a stem) for each word of a phrase; "bleed*" is the stem "bleed"."""
    out = []
    for raw in phrase.split():
        stem = raw.endswith("*")
        out.extend((w, stem and i == len(ws) - 1)
                   for ws in [normalize(raw.rstrip("*")).split()] for i, w in enumerate(ws))
    return out


def phrase_regex(phrase: str) -> str:
    """A plain phrase -> a regex: its normalised words in order, up to 2 other words between them,
    a trailing '*' on a word allows any ending ("bleed*" matches bleeding, bleeds)."""
    parts = [re.escape(w) + (r"\w*" if stem else "") for w, stem in phrase_words(phrase)]
    gap = r"(?:\s+[^\s.!?;]+){0,2}?\s+"  # never across a sentence end
    return r"(?<![\w'])" + gap.join(parts) + r"(?![\w'])"


def sentence_of(text: str, start: int, end: int) -> str:
    left = max((m.end() for m in _SENT.finditer(text, 0, start)), default=0)
    right_m = _SENT.search(text, end)
    return text[left : right_m.start() if right_m else len(text)]


@dataclass
class Context:
    """Regexes (on normalised text) that cancel a lexicon hit; see red_flags.yaml `negation`, ..."""

    negation: list[re.Pattern[str]]
    past: list[re.Pattern[str]]
    present: list[re.Pattern[str]]  # "again", "now": past-history words do not cancel with these
    general: list[re.Pattern[str]]
    personal: list[re.Pattern[str]]  # "my", "he": a general question about a real person is not general
    idioms: list[re.Pattern[str]]
    facts: list[re.Pattern[str]]  # earlier-turn facts carried into the current one (age, pregnancy)
    # Words that are no evidence of an emergency by themselves ("and", "now", "merci", "my son", "4").
    filler: list[re.Pattern[str]] = field(default_factory=list)

    NEGATION_WINDOW = 40

    def cancels(self, text: str, m: re.Match[str], original: str | None = None) -> str | None:
        """Why a lexicon match does not count here, or None when it does. `original`: the text before typo
        correction (a correction can break an idiom: "these fees" -> "there fees"); positions in it are
        close to those in `text` (one edit a word), so its idioms and sentence are checked too."""
        before = text[max(0, m.start() - self.NEGATION_WINDOW) : m.start()]
        # A long match ("pregnant ... bleeding") can hold its own negation: "pregnant, no bleeding".
        last = text.rfind(" ", m.start(), m.end()) + 1
        inside = text[max(m.start(), last - self.NEGATION_WINDOW) : last] if last > m.start() else ""
        if any(n.search(before) or (inside and n.search(inside)) for n in self.negation):
            return "negation"
        texts = [(text, 0)] if original is None or original == text else [(text, 0), (original, 12)]
        for t, slack in texts:
            if any(i.start() - slack <= m.start() < i.end() + slack or m.start() <= i.start() < m.end()
                   for p in self.idioms for i in p.finditer(t)):
                return "idiom"
            start = min(m.start(), max(0, len(t) - 1))
            sent = sentence_of(t, start, min(max(m.end(), start), len(t)))
            if any(p.search(sent) for p in self.past) and not any(p.search(sent) for p in self.present):
                return "past"
            if any(p.search(sent) for p in self.general) and not any(p.search(sent) for p in self.personal):
                return "general"
        return None

    def cues(self, text: str) -> list[str]:
        """Which context patterns occur anywhere in `text` (features for the classifier)."""
        found = [name for name in ("past", "present", "general", "personal", "idioms", "facts")
                 if any(p.search(text) for p in getattr(self, name))]
        if _NEGATION_CUE.search(text):
            found.append("negation")
        return found

    def evidence(self, norm: str) -> list[str]:
        """The words of `norm` that could be evidence of an emergency: what is left once `filler` words and
        `facts` (an age, a pregnancy) are taken out. The classifier alone needs at least one: its hashed
        n-grams score short follow-ups ("and now?") and lone facts ("my baby is 3 weeks old") from what such
        words co-occurred with in training, not from anything the message says."""
        for pat in (*self.facts, *self.filler):
            norm = pat.sub(" ", norm)
        return re.findall(r"[a-z][a-z']+", norm)

    def carried_facts(self, earlier: Sequence[str]) -> str:
        """The sentences of earlier user turns that state an age, a pregnancy, ... (normalised)."""
        out = []
        for turn in earlier[-6:]:
            norm = normalize(turn)
            for sent in _SENT.split(norm):
                if any(p.search(sent) for p in self.facts):
                    out.append(sent.strip())
        return " . ".join(s for s in out if s)
