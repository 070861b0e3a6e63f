"""Clinical red-flag triage: an emergency-care notice before any model text, from files a clinic can edit.

The packaged defaults are care/data/safety/red_flags.yaml; a clinic's <config dir>/safety.yaml is merged
over them (same rule id replaces, `enabled: false` switches a rule off, `always_flag: true` makes a rule
uncancellable, new ids add rules or categories, `categories: {X: {enabled: false}}` switches a category
off for the rules and the classifier). Patterns of every language are always checked; notices are worded
in the languages the clinic configures. The decision itself (normalisation, typo tolerance, negation /
past history / general question / idiom checks, the learned classifier, conversation context) is
care/runtime/triage.py; `SafetyRules.assess()` combines them, `check()` turns the result into notices.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from care.errors import ConfigError
from care.runtime import triage

log = logging.getLogger(__name__)

OVERRIDE_NAME = "safety.yaml"


# P(emergency) the classifier needs to flag a category whose lexicon phrases were all cancelled. A fixed
# design choice (not fitted): the rules' context checks outrank a middling classifier score.
CANCELLED_BAR = 0.9


@dataclass
class SafetyNotice:
    """Shown before any model text."""

    rule_id: str  # the lexicon rule, or "classifier"
    category: str  # e.g. "chest_pain", "suicidal_thoughts"
    message: str  # emergency-care message in the configured language(s)
    score: float | None = None  # the classifier's P(emergency), when it ran


@dataclass
class Assessment:
    """What the triage layer decided for one message (in its context)."""

    emergency: bool
    category: str | None
    score: float  # the classifier's P(emergency) (enabled categories); 1.0 for an always-flag phrase
    source: str  # "lexicon", "always_flag", "classifier", "+context" suffix when earlier turns decided it
    hits: list[SafetyRule] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)  # every flagged category, most likely first


@dataclass
class SafetyRule:
    id: str
    category: str
    patterns: dict[str, list[re.Pattern[str]]]  # language -> compiled patterns (phrases included)
    enabled: bool = True
    always_flag: bool = False  # nothing cancels it: no negation/past/general check, no classifier veto
    # Words a phrase pattern needs in the text: a substring test skips most patterns cheaply (speed).
    needs: dict[re.Pattern[str], tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Patterns by the longest word they need, so a message is tested against the few patterns whose
        # word it holds (a Python loop over all ~1,300 patterns a message was the profiled cost of assess()).
        self._free: list[re.Pattern[str]] = []  # patterns with no needed words: always tried
        self._by_word: dict[str, list[tuple[re.Pattern[str], tuple[str, ...]]]] = {}
        for pats in self.patterns.values():
            for pat in pats:
                needs = self.needs.get(pat, ())
                if needs:
                    self._by_word.setdefault(max(needs, key=len), []).append((pat, needs))
                else:
                    self._free.append(pat)
        self.words = frozenset(self._by_word)

    def scan(self, text: str, context: triage.Context | None, original: str | None = None,
             present: frozenset[str] | set[str] | None = None) -> tuple[bool, bool]:
        """(some pattern matched, a match counted: not cancelled by `context`). `present`: the words of
        `self.words` that occur in `text` (substrings), when the caller computed them already."""
        if present is None:
            present = {w for w in self.words if w in text}
        cands = list(self._free)
        for w in self.words & present:
            cands.extend(pat for pat, needs in self._by_word[w] if all(n in text for n in needs))
        seen = False
        for pat in cands:
            for m in pat.finditer(text):
                seen = True
                if self.always_flag or context is None or context.cancels(text, m, original) is None:
                    return True, True
        return seen, False

    def search(self, text: str, context: triage.Context | None, original: str | None = None) -> bool:
        return self.scan(text, context, original)[1]


@dataclass
class SafetyRules:
    rules: list[SafetyRule]
    messages: dict[str, dict[str, str]]  # category (or "default") -> language -> text
    languages: tuple[str, ...] = ("en",)
    emergency_number: str | dict[str, str] = "your local emergency number"
    context: triage.Context | None = None
    disclaimer: dict[str, str] = field(default_factory=dict)
    not_a_doctor: dict[str, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    model: triage.LinearModel | None = None  # the classifier; None: lexicon only
    disabled: frozenset[str] = frozenset()  # categories switched off (rules and classifier)
    typo: triage.TypoIndex | None = None

    def check(self, text: str, languages: tuple[str, ...] | None = None,
              context: Sequence[str] = ()) -> list[SafetyNotice]:
        """One notice per flagged category, most likely first. `context`: the earlier user turns."""
        langs = tuple(languages or self.languages)
        result = self.assess(text, context)
        if not result.emergency:
            return []
        by_cat = {r.category: r.id for r in result.hits}
        return [SafetyNotice(by_cat.get(cat, "classifier"), cat, self.message(cat, langs), round(result.score, 4))
                for cat in result.categories]

    def assess(self, text: str, context: Sequence[str] = ()) -> Assessment:
        """The triage decision for `text`, with facts (age, pregnancy) from earlier user turns."""
        norm = triage.normalize(text)
        result = self._assess_norm(norm)
        if context and self.context is not None:
            # With the facts in front, the decision (and the category: a fever at 3 weeks is young_infant)
            # can change.
            facts = self.context.carried_facts(context)
            if facts:
                alone = self._assess_norm(facts)
                with_facts = self._assess_norm(facts + " . " + norm)
                if result.emergency:  # flagged anyway: the facts may only name the category better
                    use = with_facts.emergency and with_facts.category != result.category and not result.hits
                else:  # the message must add to what the facts say by themselves ("thanks" does not);
                    # the facts' own score counts even though they never flag alone (no symptom in them).
                    use = with_facts.emergency and with_facts.score > alone.score
                if use:
                    with_facts.source += "+context"
                    return with_facts
        return result

    @cached_property
    def _words(self) -> frozenset[str]:
        return frozenset().union(*(r.words for r in self.rules))

    def _assess_norm(self, norm: str) -> Assessment:
        variants = [norm]
        if self.typo is not None:
            fixed = self.typo.text(norm)
            if fixed != norm:
                variants.append(fixed)
        hits: list[SafetyRule] = []
        # Categories whose phrases are present but were cancelled (negation, history, question, idiom):
        # the classifier needs CANCELLED_BAR to flag them anyway ("I don't have any chest pain").
        cancelled: set[str] = set()
        present = {v: {w for w in self._words if w in v} for v in variants}
        for r in self.rules:
            if not r.enabled or r.category in self.disabled:
                continue
            for v in variants:
                seen, counted = r.scan(v, self.context, norm, present[v])
                if counted:
                    hits.append(r)
                    break
                if seen:
                    cancelled.add(r.category)
        cues = self.context.cues(norm) if self.context is not None else []
        proba = self.model.proba(norm, cues) if self.model is not None else {}
        cats = {c: p for c, p in proba.items() if c != triage.NULL and c not in self.disabled}
        score = float(sum(cats.values()))
        if hits:
            order = {c: i for i, c in enumerate(dict.fromkeys(r.category for r in hits))}
            # A clinic's own categories (unknown to the classifier) first, then the most likely.
            ranked = sorted(order, key=lambda c: (-cats.get(c, 2.0), order[c]))
            always = any(r.always_flag for r in hits)
            return Assessment(True, ranked[0], 1.0 if always else score, "always_flag" if always else "lexicon",
                              hits, ranked)
        # The classifier alone needs a word that could be a symptom: "and now?" or "my baby is 3 weeks old"
        # says nothing of one (context facts count only with a symptom, see assess()).
        evident = self.context is None or bool(self.context.evidence(norm))
        if cats and evident and score >= self.model.threshold:  # type: ignore[union-attr]
            best = max(cats, key=cats.__getitem__)
            if best not in cancelled or score >= CANCELLED_BAR:
                return Assessment(True, best, score, "classifier", [], [best])
        return Assessment(False, None, score, "classifier" if cats else "lexicon")

    def message(self, category: str, languages: tuple[str, ...]) -> str:
        texts = self.messages.get(category) or self.messages.get("default", {})
        return self._localized(texts, languages, self.messages.get("default", {}))

    def disclaimer_text(self, languages: tuple[str, ...] | None = None) -> str:
        return self._localized(self.disclaimer, tuple(languages or self.languages))

    def not_a_doctor_text(self, languages: tuple[str, ...] | None = None) -> str:
        return self._localized(self.not_a_doctor, tuple(languages or self.languages))

    def _localized(self, texts: dict[str, str], languages: tuple[str, ...],
                   fallback: dict[str, str] | None = None) -> str:
        parts = []
        for lang in languages:
            text = texts.get(lang) or (fallback or {}).get(lang)
            if text:
                parts.append(text.replace("{emergency_number}", self._number(lang)))
        if not parts:  # a language the file has no text for: English rather than nothing
            text = texts.get("en") or (fallback or {}).get("en") or next(iter(texts.values()), "")
            parts.append(text.replace("{emergency_number}", self._number("en")))
        return "\n".join(parts)

    def message_number(self, languages: tuple[str, ...] | None = None) -> str:
        """The emergency number as shown in the first configured language."""
        return self._number((tuple(languages or self.languages) or ("en",))[0])

    def numbers(self) -> set[str]:
        """Every configured emergency number (all languages)."""
        num = self.emergency_number
        return {str(v) for v in (num.values() if isinstance(num, dict) else [num]) if v}

    def _number(self, lang: str) -> str:
        num = self.emergency_number
        if isinstance(num, dict):
            return str(num.get(lang) or num.get("en") or next(iter(num.values()), ""))
        return str(num)


# Replies that present the assistant as a clinician (small models do this despite the system prompt).
_CLAIMS_CLINICIAN = re.compile(
    r"\b(?:i\s*(?:'m|am)\s+(?:a|your)\s+(?:\w+\s+)?(?:doctor|physician|nurse|gp|pharmacist)"
    r"|as\s+(?:a|your)\s+(?:\w+\s+)?(?:doctor|physician|nurse)\b(?!\s+(?:would|will|may|might|can)))",
    re.IGNORECASE,
)


def claims_clinician(text: str) -> bool:
    """True when a reply presents the assistant as a doctor/nurse ("I am a doctor", "as your physician")."""
    return bool(_CLAIMS_CLINICIAN.search(text))


def packaged_rules_path() -> Path:
    return Path(str(resources.files("care") / "data" / "safety" / "red_flags.yaml"))


def override_path() -> Path:
    from care.paths import config_dir

    return config_dir() / OVERRIDE_NAME


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Safety rules file is not valid YAML: {exc}".replace("\n", " "), path=path,
                          hint="Fix the YAML or delete the file to use the packaged rules") from exc
    if not isinstance(data, dict):
        raise ConfigError("Safety rules file must be a mapping", path=path,
                          hint="Start from care/data/safety/red_flags.yaml")
    return data


def _compile(pattern: str, path: Path, rule_id: str) -> re.Pattern[str]:
    # Matched against triage.normalize()d text, so accents are stripped from the pattern too.
    try:
        return re.compile(triage.strip_accents(pattern), re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"Safety rule '{rule_id}' has a bad pattern {pattern!r}: {exc}", path=path,
                          hint="Fix the regular expression (Python syntax)") from exc


# Sections merged key by key (a clinic's list replaces the packaged one).
_CONTEXT_KEYS = ("negation", "past", "present", "general", "personal", "idioms", "facts", "filler")


def merge_rule_data(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """The clinic file over the packaged one (see the module docstring)."""
    merged = dict(base)
    for key in ("languages", "emergency_number", "classifier", *_CONTEXT_KEYS):
        if key in override:
            merged[key] = override[key]
    for key in ("messages", "categories"):
        msgs = {k: dict(v) for k, v in (base.get(key) or {}).items()}
        for cat, texts in (override.get(key) or {}).items():
            msgs.setdefault(cat, {}).update(texts or {})
        merged[key] = msgs
    for key in ("disclaimer", "not_a_doctor"):
        merged[key] = {**(base.get(key) or {}), **(override.get(key) or {})}
    rules = {r["id"]: r for r in base.get("rules") or []}
    for rule in override.get("rules") or []:
        if not isinstance(rule, dict) or "id" not in rule:
            raise ConfigError("A rule in the clinic safety file has no id", hint="Give every rule an `id:`")
        if rule["id"] in rules and "patterns" not in rule and "phrases" not in rule:
            rules[rule["id"]] = {**rules[rule["id"]], **rule}  # e.g. only `enabled: false` or `always_flag`
        else:
            rules[rule["id"]] = rule
    merged["rules"] = list(rules.values())
    return merged


def _by_language(value: Any) -> dict[str, list[str]]:
    if isinstance(value, list):  # a plain list: English
        return {"en": [str(v) for v in value]}
    return {str(k): [str(v) for v in vs or []] for k, vs in (value or {}).items()}


def build_rules(data: dict[str, Any], path: Path, sources: tuple[str, ...] = (),
                model: triage.LinearModel | None = None) -> SafetyRules:
    rules = []
    words: list[str] = []
    for raw in data.get("rules") or []:
        rid = str(raw.get("id", "?"))
        if not raw.get("category"):
            raise ConfigError(f"Safety rule '{rid}' has no category", path=path, hint="Add `category:`")
        patterns = _by_language(raw.get("patterns"))
        phrases = _by_language(raw.get("phrases"))
        compiled: dict[str, list[re.Pattern[str]]] = {}
        needs: dict[re.Pattern[str], tuple[str, ...]] = {}
        for lang, pats in patterns.items():
            compiled.setdefault(lang, []).extend(_compile(p, path, rid) for p in pats)
            words.extend(pats)
        for lang, phr in phrases.items():
            for p in phr:
                pat = _compile(triage.phrase_regex(p), path, rid)
                compiled.setdefault(lang, []).append(pat)
                needs[pat] = tuple(w for w, _ in triage.phrase_words(p))
            words.extend(phr)
        rules.append(SafetyRule(id=rid, category=str(raw["category"]), enabled=bool(raw.get("enabled", True)),
                                always_flag=bool(raw.get("always_flag", False)), patterns=compiled, needs=needs))
    langs = data.get("languages") or ["en"]
    if isinstance(langs, str):
        langs = [langs]
    ctx = {key: [_compile(p, path, key) for p in data.get(key) or []] for key in _CONTEXT_KEYS}
    # A category is off when the clinic says so, or when every rule of it is switched off.
    disabled = {c for c, v in (data.get("categories") or {}).items() if not (v or {}).get("enabled", True)}
    by_cat: dict[str, list[bool]] = {}
    for r in rules:
        by_cat.setdefault(r.category, []).append(r.enabled)
    disabled |= {c for c, flags in by_cat.items() if not any(flags)}
    classifier = data.get("classifier") or {}
    if model is not None and classifier.get("threshold") is not None:
        model = dataclasses.replace(model, threshold=float(classifier["threshold"]))
    if classifier.get("enabled", True) is False:
        model = None
    return SafetyRules(
        rules=rules,
        messages=data.get("messages") or {},
        languages=tuple(langs),
        emergency_number=data.get("emergency_number") or "your local emergency number",
        context=triage.Context(**ctx),
        disclaimer=data.get("disclaimer") or {},
        not_a_doctor=data.get("not_a_doctor") or {},
        sources=sources,
        model=model,
        disabled=frozenset(disabled),
        typo=triage.TypoIndex(triage.pattern_words(words)),
    )


def load_rules(override: Path | None = None, classifier: bool = True) -> SafetyRules:
    """Packaged rules merged with the clinic file (default: <config dir>/safety.yaml, if present),
    with the packaged classifier unless `classifier=False` (lexicon only)."""
    override = override if override is not None else override_path()
    packaged = packaged_rules_path()
    stamp = override.stat().st_mtime_ns if override.is_file() else None
    return _load_cached(str(packaged), str(override), stamp, classifier)


@lru_cache(maxsize=8)
def _load_cached(packaged: str, override: str, stamp: int | None, classifier: bool = True) -> SafetyRules:
    data = _read_yaml(Path(packaged))
    sources = [packaged]
    if stamp is not None:
        data = merge_rule_data(data, _read_yaml(Path(override)))
        sources.append(override)
        log.info("safety rules: packaged + clinic file %s", override)
    model = triage.packaged_model() if classifier else None
    if classifier and model is None:  # lexicon alone catches half the emergencies: never fall back silently
        raise ConfigError("The triage classifier is missing", path=triage.model_path(),
                          hint="Build it with `make setup` (or `python scripts/train_triage.py`)")
    return build_rules(data, Path(sources[-1]), tuple(sources), model)


def check(text: str, languages: tuple[str, ...] | None = None, context: Sequence[str] = ()) -> list[SafetyNotice]:
    """Red-flag notices for one user message (earlier user turns in `context`) with the current rules."""
    return load_rules().check(text, languages, context)
