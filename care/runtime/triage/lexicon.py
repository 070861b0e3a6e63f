"""The rules part of triage: clinic-editable phrases and patterns, typo tolerance, and the context checks
that cancel a hit ("no chest pain", "had a stroke in 2019", "what if my child...", "he's fine now").

Patterns are matched on normalize()d text with the `regex` library (Unicode word boundaries in every script).
A plain phrase's words must come in order, with up to 2 other words between them, never across a sentence
end; a trailing `*` on a Latin word allows any ending ("bleed*").

Context cues, per language (care/data/safety/lang/<lang>.yaml `context:`, plus red_flags.yaml's regexes):
- `negation` before the hit ("no", "sin", "sem", "bila"); `negation_after` right after it, for languages
  that put it there (Hindi "bukhar nahi hai", Bangla "jor nei");
- in the hit's sentence: `past` (own history), `general` (a question about a condition, unless a
  `personal` cue shows a real person), `hypothetical` ("what if", "in case"), `news` (a story, the
  news, a film), each overruled by a `present` cue ("now", "right now", "since this morning"); and
  `resolved` ("he's fine now", "back from hospital"), overruled by `again` ("it started again"). Resolved is
  never read for the whole message: "imeisha" (Swahili "it is over") also means "it ran out", as an inhaler;
- for the whole message: a `general` or `hypothetical` question (its title line too: "Sepsis. Can sepsis be
  prevented?") when no sentence has a `personal` or `present` cue;
- `idioms` overlapping the hit ("this exam is killing me").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache

import regex

from care.runtime.triage.normalize import normalize, strip_accents

SENTENCE = regex.compile(r"[.!?;\n\u0964\u0965]+")  # also the danda (।) of Devanagari and Bengali
CUE_KINDS = ("negation", "negation_after", "past", "present", "general", "personal", "hypothetical", "news",
             "resolved", "again", "idioms", "facts", "filler")
# Cues that cancel, in the order they are reported ("cancelled: hypothetical").
CANCELLING = ("hypothetical", "news", "past", "general", "resolved")


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
    """Reads a word within one edit of a lexicon word (5+ Latin letters) as that word (SymSpell-style).

    The vocabulary is kept by language, and a message is corrected only toward the words of its own language
    and English (English words turn up in every code-mixed message). Across languages a real word is often one
    edit from another language's lexicon word: English "response" is not a typo of Spanish "responde"."""

    MIN_LEN = 5

    def __init__(self, vocabulary: Iterable[str] | dict[str, Iterable[str]]) -> None:
        by_lang = vocabulary if isinstance(vocabulary, dict) else {"en": vocabulary}
        self.vocab: dict[str, set[str]] = {
            lang: {w for w in words if len(w) >= self.MIN_LEN and w.isascii() and w.isalpha()}
            for lang, words in by_lang.items()}
        self.index: dict[str, dict[str, set[str]]] = {}  # delete-key -> word -> its languages
        for lang, words in self.vocab.items():
            for w in words:
                for key in (w, *_deletes(w)):
                    self.index.setdefault(key, {}).setdefault(w, set()).add(lang)
        self._cache: dict[tuple[str, str], str] = {}

    def correct(self, word: str, lang: str = "en") -> str:
        langs = {lang, "en"}
        if (len(word) < self.MIN_LEN or not (word.isascii() and word.isalpha())
                or any(word in self.vocab.get(x, ()) for x in langs)):
            return word
        hit = self._cache.get((word, lang))
        if hit is None:
            cands: set[str] = set()
            for key in (word, *_deletes(word)):
                cands |= {w for w, ls in self.index.get(key, {}).items() if ls & langs}
            # Typos rarely touch the first letter: "clicked" is not a typo of "licked".
            good = sorted(c for c in cands if c[0] == word[0] and within_one_edit(word, c))
            hit = good[0] if len(good) == 1 else word  # ambiguous: leave it
            if len(self._cache) < 50_000:
                self._cache[(word, lang)] = hit
        return hit

    def text(self, norm: str, lang: str = "en") -> str:
        return " ".join(self.correct(w, lang) for w in norm.split(" "))


_WORDS = regex.compile(r"[a-z]{5,}")


def pattern_words(sources: Iterable[str]) -> set[str]:
    """Literal Latin words (5+ letters) in regex or phrase sources: the typo index's vocabulary."""
    words: set[str] = set()
    for src in sources:
        cleaned = regex.sub(r"\\[a-zA-Z]", " ", src)  # \b, \s, \w are not letters of a word
        words.update(_WORDS.findall(strip_accents(cleaned)))
    return words


def phrase_words(phrase: str, table: Mapping[str, str] | None = None) -> list[tuple[str, bool]]:
    """(normalised word, is a stem) for each word of a phrase; "bleed*" is the stem "bleed". `table`: the SMS
    spellings of the phrase's language (normalize)."""
    out = []
    for raw in phrase.split():
        stem = raw.endswith("*")
        out.extend((w, stem and i == len(ws) - 1)
                   for ws in [normalize(raw.rstrip("*"), table).split()] for i, w in enumerate(ws))
    return out


def phrase_regex(phrase: str, gap: int = 2, table: Mapping[str, str] | None = None) -> str:
    """A plain phrase -> a regex on normalised text: its words in order, up to `gap` other words between them
    (never across a sentence end); a trailing '*' allows any ending."""
    parts = [regex.escape(w) + (r"\w*" if stem else "") for w, stem in phrase_words(phrase, table)]
    joiner = (r"(?:\s+[^\s.!?;\u0964]+){0," + str(gap) + r"}?\s+") if gap else r"\s+"
    return r"(?<![\w'])" + joiner.join(parts) + r"(?![\w'])"


def sentence_of(text: str, start: int, end: int) -> str:
    left = max((m.end() for m in SENTENCE.finditer(text, 0, start)), default=0)
    right_m = SENTENCE.search(text, end)
    return text[left : right_m.start() if right_m else len(text)]


@cache
def compiled(pattern: str) -> regex.Pattern[str]:
    """Every triage pattern, compiled once a process (case-blind). The packaged data holds ~3,400 of them and
    a clinic file, a test or a reload builds the rules again: recompiling took ~3 s each time."""
    return regex.compile(pattern, regex.IGNORECASE)


def compile_cue(source: str, is_regex: bool, table: Mapping[str, str] | None = None) -> regex.Pattern[str]:
    return compiled(strip_accents(source) if is_regex else phrase_regex(source, gap=0, table=table))


@dataclass
class Context:
    """Cue patterns by kind (CUE_KINDS), all languages together (a person may write in any of them)."""

    cues: dict[str, list[regex.Pattern[str]]] = field(default_factory=dict)
    _anchored_cache: dict[str, list[regex.Pattern[str]]] = field(default_factory=dict, repr=False)

    NEGATION_WINDOW = 40
    AFTER_WINDOW = 20

    def _any(self, kind: str, text: str) -> bool:
        return any(p.search(text) for p in self.cues.get(kind, ()))

    def cancels(self, text: str, m: regex.Match[str], original: str | None = None) -> str | None:
        """Why a lexicon match does not count here, or None when it does. `original`: the text before typo
        correction (a correction can break an idiom: "these fees" -> "there fees"); positions in it are
        close to those in `text` (one edit a word), so its idioms and sentence are checked too."""
        before = text[max(0, m.start() - self.NEGATION_WINDOW) : m.start()]
        # A long match ("pregnant ... bleeding") can hold its own negation: "pregnant, no bleeding". Its first
        # word is the phrase's own ("not breathing", "no pulse"): a negation there is the danger, not a cancel.
        first = text.find(" ", m.start(), m.end())
        last = text.rfind(" ", m.start(), m.end()) + 1
        inside = text[max(first, last - self.NEGATION_WINDOW) : last] if first >= 0 and last > first else ""
        if any(n.search(before) or (inside and n.search(inside)) for n in self._ends("negation")):
            return "negation"
        after = text[m.end() : m.end() + self.AFTER_WINDOW]
        if any(n.search(after) for n in self._starts("negation_after")):
            return "negation"
        texts = [(text, 0)] if original is None or original == text else [(text, 0), (original, 12)]
        for t, slack in texts:
            if any(i.start() - slack <= m.start() < i.end() + slack or m.start() <= i.start() < m.end()
                   for p in self.cues.get("idioms", ()) for i in p.finditer(t)):
                return "idiom"
            start = min(m.start(), max(0, len(t) - 1))
            reason = self.sentence_cancel(sentence_of(t, start, min(max(m.end(), start), len(t))))
            if reason:
                return reason
        return self.message_cancel(text)

    def sentence_cancel(self, sent: str) -> str | None:
        """The cue that makes this sentence not a present emergency, if any."""
        if self._any("resolved", sent) and not self._any("again", sent):
            return "resolved"
        if self._any("present", sent):
            return None
        for kind in ("hypothetical", "news", "past"):
            if self._any(kind, sent):
                return kind
        if self._any("general", sent) and not self._any("personal", sent):
            return "general"
        return None

    def resolved_followup(self, text: str) -> bool:
        """A follow-up after the danger has passed ("he's fine now"): earlier turns' facts do not count then."""
        return self._any("resolved", text) and not self._any("again", text)

    def message_cancel(self, text: str) -> str | None:
        """What holds for the whole message: a general or hypothetical question where nobody real is in
        danger now (no personal, no present cue anywhere)."""
        if not self._any("present", text) and not self._any("personal", text):
            for kind in ("hypothetical", "general"):
                if self._any(kind, text):
                    return kind
        return None

    def all_sentences_cancelled(self, text: str) -> str | None:
        """The classifier's view: the message is cancelled when every sentence with content is (the first
        reason found), or the whole message is a general or hypothetical question (message_cancel)."""
        reason = self.message_cancel(text)
        if reason:
            return reason
        found = None
        for sent in SENTENCE.split(text):
            if not self.evidence(sent):
                continue
            why = self.sentence_cancel(sent)
            if why is None:
                return None
            found = found or why
        return found

    def _ends(self, kind: str) -> list[regex.Pattern[str]]:
        """Negation cues anchored at the end of the window before a hit."""
        return self._anchored(kind, r"(?:{})\s+(?:\S+\s+)?$")

    def _starts(self, kind: str) -> list[regex.Pattern[str]]:
        return self._anchored(kind, r"^\s*(?:\S+\s+)?(?:{})")

    def _anchored(self, kind: str, shape: str) -> list[regex.Pattern[str]]:
        key = kind + shape
        if key not in self._anchored_cache:
            pats = []
            for p in self.cues.get(kind, ()):
                src = p.pattern
                pats.append(p if src.endswith("$") or src.startswith("^") else compiled(shape.replace("{}", src)))
            self._anchored_cache[key] = pats
        return self._anchored_cache[key]

    def cue_names(self, text: str) -> list[str]:
        """Which context cues occur anywhere in `text` (features for the classifier)."""
        found = [k for k in ("past", "present", "general", "personal", "hypothetical", "news", "resolved",
                             "again", "idioms", "facts") if self._any(k, text)]
        if self._any("negation", text) or self._any("negation_after", text):
            found.append("negation")
        return found

    def evidence(self, norm: str) -> list[str]:
        """The words of `norm` that could be evidence of an emergency: what is left once `filler` words and
        `facts` (an age, a pregnancy) are taken out. The classifier alone needs at least one."""
        for pat in (*self.cues.get("facts", ()), *self.cues.get("filler", ())):
            norm = pat.sub(" ", norm)
        return regex.findall(r"[\p{L}\p{M}][\p{L}\p{M}']+", norm)

    def carried_facts(self, earlier: Sequence[str], table: Mapping[str, str] | None = None) -> str:
        """The sentences of earlier user turns that state an age, a pregnancy, ... (normalised with `table`)."""
        out = []
        for turn in earlier[-6:]:
            for sent in SENTENCE.split(normalize(turn, table)):
                if self._any("facts", sent):
                    out.append(sent.strip())
        return " . ".join(s for s in out if s)
