"""The clinic-editable triage files, read into one `Rules` object (one builder, one validating reader).

Packaged: care/data/safety/red_flags.yaml (settings, rules, notices, EN/FR/ES context patterns),
care/data/safety/cards.yaml (the first-aid cards, English, each step with its source) and
care/data/safety/lang/<lang>.yaml (per language: phrases, context cues, SMS spellings, notices, card steps).
A clinic's <config dir>/safety.yaml (or `--rules FILE`) is merged over them with the same keys:
- `languages: [sw, en]`: the languages the clinic serves (notices and cards are shown in the user's
  language when it is one of them, else in all of them); `emergency_number: "112"` (or one per language);
- `rules:` a rule with a known id replaces it (`enabled: false` switches it off, `always_flag: true` makes
  it uncancellable), a new id adds one; `categories: {X: {enabled: false}}` switches a category off;
- `messages:` (notices) and `cards:` (`{category: {steps: [{source, en, sw, ...}]}}`) replace per category;
- the context keys (`negation`, `past`, `general`, ...: regular expressions) replace the packaged lists.
Errors name the file and the key.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import regex

from care.errors import ConfigError
from care.runtime.triage import classifier
from care.runtime.triage.lexicon import (
    CUE_KINDS,
    Context,
    TypoIndex,
    compile_cue,
    compiled,
    pattern_words,
    phrase_regex,
    phrase_words,
)
from care.runtime.triage.normalize import MIXES_ENGLISH, sms_table, strip_accents

log = logging.getLogger(__name__)

OVERRIDE_NAME = "safety.yaml"
LANGUAGES = ("en", "fr", "es", "pt", "sw", "hi", "bn")


@dataclass
class Rule:
    id: str
    category: str
    patterns: list[regex.Pattern[str]]
    sources: list[str]  # the phrase or pattern text of each pattern (for `why`)
    enabled: bool = True
    always_flag: bool = False  # nothing cancels it: no negation/past/general check, no classifier veto
    needs: dict[int, tuple[str, ...]] = field(default_factory=dict)  # pattern index -> words it needs

    def __post_init__(self) -> None:
        # Patterns by the longest word they need, so a message is tested against the few patterns whose word
        # it holds (a Python loop over every pattern was the profiled cost of a message).
        self._free: list[int] = []
        self._by_word: dict[str, list[int]] = {}
        for i in range(len(self.patterns)):
            needs = self.needs.get(i, ())
            if needs:
                self._by_word.setdefault(max(needs, key=len), []).append(i)
            else:
                self._free.append(i)
        self.words = frozenset(self._by_word)

    def scan(self, text: str, context: Context | None, original: str | None, present: set[str]
             ) -> tuple[str | None, str | None]:
        """(the text a pattern matched, where the match counts; the reason the last match was cancelled)."""
        cands = list(self._free)
        for w in self.words & present:
            cands.extend(i for i in self._by_word[w] if all(n in text for n in self.needs.get(i, ())))
        cancelled = None
        for i in cands:
            for m in self.patterns[i].finditer(text):
                reason = None if self.always_flag or context is None else context.cancels(text, m, original)
                if reason is None:
                    return m.group(0), None
                cancelled = reason
        return None, cancelled


@dataclass
class Rules:
    rules: list[Rule]
    messages: dict[str, dict[str, str]]  # category (or "default") -> language -> notice text
    cards: dict[str, list[dict[str, str]]]  # category -> steps: {"source", "<lang>": text, ...}
    card_title: dict[str, str]
    languages: tuple[str, ...] = ("en",)  # served by the clinic
    emergency_number: str | dict[str, str] = "your local emergency number"
    context: Context = field(default_factory=Context)
    disclaimer: dict[str, str] = field(default_factory=dict)
    not_a_doctor: dict[str, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()
    model: classifier.LinearModel | None = None  # the triage classifier; None: lexicon only
    lang_model: classifier.LinearModel | None = None
    disabled: frozenset[str] = frozenset()
    typo: TypoIndex | None = None
    sms: dict[str, dict[str, str]] = field(default_factory=dict)  # language -> the language files' spellings
    shared_cues: dict[str, list[regex.Pattern[str]]] | None = None  # cue regexes for every language
    lang_cues: dict[str, dict[str, list[regex.Pattern[str]]]] = field(default_factory=dict)  # lang -> kind -> cues

    def __post_init__(self) -> None:
        self.words = frozenset().union(*(r.words for r in self.rules)) if self.rules else frozenset()
        self._sms_cache: dict[str, dict[str, str]] = {}
        self._context_cache: dict[str, Context] = {}

    def context_for(self, lang: str) -> Context:
        """The context cues a message in `lang` is read with: the shared regexes, the cues of `lang`, and
        English's where the language mixes English in (normalize.MIXES_ENGLISH: hi, bn, sw; not pt, whose "no"
        is "in the"). `context` holds every language's."""
        if self.shared_cues is None:
            return self.context
        if lang not in self._context_cache:
            own = [self.lang_cues.get(x, {}) for x in dict.fromkeys((lang, "en") if lang in MIXES_ENGLISH else (lang,))]
            self._context_cache[lang] = Context({k: [*self.shared_cues.get(k, ()), *(p for o in own for p in o.get(k, ()))]
                                                 for k in CUE_KINDS})
        return self._context_cache[lang]

    def sms_for(self, lang: str) -> dict[str, str]:
        """The SMS spellings a message in `lang` is read with (normalize.sms_table)."""
        if lang not in self._sms_cache:
            self._sms_cache[lang] = sms_table(lang, self.sms)
        return self._sms_cache[lang]

    def number(self, lang: str) -> str:
        num = self.emergency_number
        if isinstance(num, dict):
            return str(num.get(lang) or num.get("en") or next(iter(num.values()), ""))
        return str(num)

    def numbers(self) -> set[str]:
        num = self.emergency_number
        return {str(v) for v in (num.values() if isinstance(num, dict) else [num]) if v}

    def localized(self, texts: dict[str, str], languages: tuple[str, ...]) -> str:
        """`texts` in each of `languages` that it has (one per line), English when it has none of them."""
        parts = [texts[lang].replace("{emergency_number}", self.number(lang)) for lang in languages if texts.get(lang)]
        if not parts and texts:
            lang = "en" if "en" in texts else next(iter(texts))
            parts.append(texts[lang].replace("{emergency_number}", self.number(lang)))
        return "\n".join(parts)


def packaged_dir() -> Path:
    return Path(str(resources.files("care") / "data" / "safety"))


def packaged_rules_path() -> Path:
    return packaged_dir() / "red_flags.yaml"


def override_path() -> Path:
    from care.paths import config_dir

    return config_dir() / OVERRIDE_NAME


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except OSError as exc:
        raise ConfigError(f"Cannot read the safety rules file: {exc.strerror}", path=path,
                          hint="Check the path (care triage --rules FILE)") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"Safety rules file is not valid YAML: {exc}".replace("\n", " "), path=path,
                          hint="Fix the YAML or delete the file to use the packaged rules") from exc
    if not isinstance(data, dict):
        raise ConfigError("Safety rules file must be a mapping", path=path,
                          hint="Start from care/data/safety/red_flags.yaml")
    return data


def _compile(pattern: str, path: Path, key: str) -> regex.Pattern[str]:
    # Matched against normalize()d text, so Latin accents are stripped from the pattern too.
    try:
        return compiled(strip_accents(pattern))
    except regex.error as exc:
        raise ConfigError(f"`{key}` has a bad pattern {pattern!r}: {exc}", path=path,
                          hint="Fix the regular expression (Python syntax)") from exc


def _by_language(value: Any) -> dict[str, list[str]]:
    if isinstance(value, list):  # a plain list: English
        return {"en": [str(v) for v in value]}
    return {str(k): [str(v) for v in vs or []] for k, vs in (value or {}).items()}


def language_files() -> list[Path]:
    return sorted((packaged_dir() / "lang").glob("*.yaml"))


def packaged_data() -> dict[str, Any]:
    """red_flags.yaml + cards.yaml + every lang/<lang>.yaml, as one mapping of the clinic file's schema."""
    data = read_yaml(packaged_rules_path())
    cards_file = packaged_dir() / "cards.yaml"
    if cards_file.is_file():
        cards = read_yaml(cards_file)
        data["cards"] = {k: {"steps": [dict(s) for s in v.get("steps", [])]} for k, v in (cards.get("cards") or {}).items()}
        data["card_title"] = dict(cards.get("title") or {})
    for path in language_files():
        add_language(data, read_yaml(path), path)
    return data


def add_language(data: dict[str, Any], lang_data: dict[str, Any], path: Path) -> None:
    """Merge one language file: its phrases become rules `<category>_<lang>`, its cues add to the context
    (as plain phrases), its notices and card steps join the others."""
    lang = str(lang_data.get("lang") or path.stem)
    rules = data.setdefault("rules", [])
    for cat, phrases in (lang_data.get("phrases") or {}).items():
        if phrases:
            rules.append({"id": f"{cat}_{lang}", "category": str(cat), "phrases": {lang: [str(p) for p in phrases]}})
    cues = data.setdefault("cue_phrases", {})
    for kind, items in (lang_data.get("context") or {}).items():
        if kind not in CUE_KINDS:
            raise ConfigError(f"`context.{kind}` is not a cue kind", path=path, hint=f"Use one of: {', '.join(CUE_KINDS)}")
        cues.setdefault(kind, {}).setdefault(lang, []).extend(str(i) for i in items or [])
    data.setdefault("sms", {}).setdefault(lang, {}).update(
        {str(k): str(v) for k, v in (lang_data.get("sms") or {}).items()})
    # `<key>_latin`: the romanised variant (Hinglish, Banglish), read by writers who type that way ("hi-Latn").
    for suffix, key_lang in (("", lang), ("_latin", f"{lang}-Latn")):
        for cat, text in (lang_data.get("notices" + suffix) or {}).items():
            data.setdefault("messages", {}).setdefault(str(cat), {})[key_lang] = str(text)
        for key in ("disclaimer", "not_a_doctor", "card_title"):
            if lang_data.get(key + suffix) is not None:
                data.setdefault(key, {})[key_lang] = str(lang_data[key + suffix])
        for cat, steps in (lang_data.get("cards" + suffix) or {}).items():
            card = data.setdefault("cards", {}).get(str(cat))
            if card is None or len(card["steps"]) != len(steps):
                raise ConfigError(f"`cards{suffix}.{cat}` has {len(steps)} steps, the English card "
                                  f"{len(card['steps']) if card else 0}", path=path,
                                  hint="Translate every step of care/data/safety/cards.yaml, in order")
            for step, text in zip(card["steps"], steps, strict=True):
                step[key_lang] = str(text)


def merge(base: dict[str, Any], override: dict[str, Any], path: Path) -> dict[str, Any]:
    """The clinic file over the packaged data (see the module docstring)."""
    merged = dict(base)
    for key in ("languages", "emergency_number", "classifier", *CUE_KINDS):
        if key in override:
            merged[key] = override[key]
    for key in ("messages", "categories"):
        msgs = {k: dict(v) for k, v in (base.get(key) or {}).items()}
        for cat, texts in (override.get(key) or {}).items():
            msgs.setdefault(cat, {}).update(texts or {})
        merged[key] = msgs
    cards = {k: {"steps": [dict(s) for s in v["steps"]]} for k, v in (base.get("cards") or {}).items()}
    for cat, card in (override.get("cards") or {}).items():
        steps = (card or {}).get("steps")
        if not isinstance(steps, list) or not all(isinstance(s, dict) and s.get("source") for s in steps):
            raise ConfigError(f"`cards.{cat}.steps` must be a list of {{source: ..., en: ...}} steps", path=path,
                              hint="Every first-aid step names its source")
        cards[str(cat)] = {"steps": [dict(s) for s in steps]}
    merged["cards"] = cards
    for key in ("disclaimer", "not_a_doctor", "card_title"):
        merged[key] = {**(base.get(key) or {}), **(override.get(key) or {})}
    rules = {r["id"]: r for r in base.get("rules") or []}
    for i, rule in enumerate(override.get("rules") or []):
        if not isinstance(rule, dict) or "id" not in rule:
            raise ConfigError(f"`rules[{i}]` has no id", path=path, hint="Give every rule an `id:`")
        if rule["id"] in rules and "patterns" not in rule and "phrases" not in rule:
            rules[rule["id"]] = {**rules[rule["id"]], **rule}  # e.g. only `enabled: false` or `always_flag`
        else:
            rules[rule["id"]] = rule
    merged["rules"] = list(rules.values())
    return merged


def build(data: dict[str, Any], path: Path, sources: tuple[str, ...] = (),
          model: classifier.LinearModel | None = None, lang_model: classifier.LinearModel | None = None) -> Rules:
    rules, words = [], {}  # words: language -> the pattern and phrase sources (the typo vocabulary)
    sms = {str(k): {str(a): str(b) for a, b in (v or {}).items()} for k, v in (data.get("sms") or {}).items()}
    for i, raw in enumerate(data.get("rules") or []):
        rid = str(raw.get("id", f"rules[{i}]"))
        if not raw.get("category"):
            raise ConfigError(f"`rules.{rid}` has no category", path=path, hint="Add `category:`")
        pats: list[regex.Pattern[str]] = []
        srcs: list[str] = []
        needs: dict[int, tuple[str, ...]] = {}
        for lang, items in _by_language(raw.get("patterns")).items():
            for p in items:
                pats.append(_compile(p, path, f"rules.{rid}.patterns"))
                srcs.append(p)
                words.setdefault(lang, []).append(p)
        for lang, items in _by_language(raw.get("phrases")).items():
            for p in items:
                table = sms_table(lang, sms)  # a phrase is spelt as a message in its language is read
                needs[len(pats)] = tuple(w for w, _ in phrase_words(p, table))
                pats.append(_compile(phrase_regex(p, table=table), path, f"rules.{rid}.phrases"))
                srcs.append(p)
                words.setdefault(lang, []).append(p)
        rules.append(Rule(rid, str(raw["category"]), pats, srcs, bool(raw.get("enabled", True)),
                          bool(raw.get("always_flag", False)), needs))
    langs = data.get("languages") or ["en"]
    langs = [langs] if isinstance(langs, str) else [str(x) for x in langs]
    # The top-level regexes (red_flags.yaml, a clinic's file) hold for every message; the language files' cue
    # phrases only for their own language (and English, mixed into every language): Swahili "na" is "and",
    # not Hindi "no"; Portuguese "sem" (without) is a French "sem" (semaines).
    shared_cues: dict[str, list[regex.Pattern[str]]] = {}
    lang_cues: dict[str, dict[str, list[regex.Pattern[str]]]] = {}
    for kind in CUE_KINDS:
        raw_cues = data.get(kind) or []
        shared_cues[kind] = [_compile(p, path, kind) for p in raw_cues] if isinstance(raw_cues, list) else []
        if isinstance(raw_cues, dict):  # regexes by language
            for lang, items in _by_language(raw_cues).items():
                lang_cues.setdefault(lang, {}).setdefault(kind, []).extend(
                    _compile(p, path, f"{kind}.{lang}") for p in items)
        for lang, items in _by_language((data.get("cue_phrases") or {}).get(kind)).items():
            lang_cues.setdefault(lang, {}).setdefault(kind, []).extend(
                compile_cue(p, is_regex=False, table=sms_table(lang, sms)) for p in items)
    cues = {kind: shared_cues[kind] + [p for by_kind in lang_cues.values() for p in by_kind.get(kind, ())]
            for kind in CUE_KINDS}
    disabled = {c for c, v in (data.get("categories") or {}).items() if not (v or {}).get("enabled", True)}
    by_cat: dict[str, list[bool]] = {}
    for r in rules:
        by_cat.setdefault(r.category, []).append(r.enabled)
    disabled |= {c for c, flags in by_cat.items() if not any(flags)}
    settings = data.get("classifier") or {}
    if model is not None and settings.get("threshold") is not None:
        model = dataclasses.replace(model, threshold=float(settings["threshold"]))
    if settings.get("enabled", True) is False:
        model = None
    return Rules(rules=rules, messages=data.get("messages") or {},
                 cards={k: v["steps"] for k, v in (data.get("cards") or {}).items()},
                 card_title=data.get("card_title") or {}, languages=tuple(langs),
                 emergency_number=data.get("emergency_number") or "your local emergency number",
                 context=Context(cues), shared_cues=shared_cues, lang_cues=lang_cues,
                 disclaimer=data.get("disclaimer") or {},
                 not_a_doctor=data.get("not_a_doctor") or {}, sources=sources, model=model,
                 lang_model=lang_model, disabled=frozenset(disabled), typo=TypoIndex({k: pattern_words(v) for k, v in words.items()}),
                 sms=sms)


def load_rules(override: Path | None = None, classifier_on: bool = True) -> Rules:
    """Packaged rules merged with the clinic file (default: <config dir>/safety.yaml, if present), with the
    packaged classifiers unless `classifier_on=False` (lexicon only)."""
    override = override if override is not None else override_path()
    stamp = override.stat().st_mtime_ns if override.is_file() else None
    if stamp is None and override != override_path():
        read_yaml(override)  # a --rules FILE that does not exist: one line naming it
    # No clinic file: the packaged rules, whatever the config dir (built once a process, ~3 s on 2 cores).
    return _load_cached(str(override) if stamp is not None else "", stamp, classifier_on)


def packaged_rules(classifier_on: bool = True) -> Rules:
    """The packaged rules alone, without any clinic file (training, benchmarks)."""
    return _load_cached("", None, classifier_on)


@lru_cache(maxsize=8)
def _load_cached(override: str, stamp: int | None, classifier_on: bool) -> Rules:
    data = packaged_data()
    sources = [str(packaged_rules_path())]
    if stamp is not None:
        data = merge(data, read_yaml(Path(override)), Path(override))
        sources.append(override)
        log.info("safety rules: packaged + clinic file %s", override)
    model = classifier.packaged_model() if classifier_on else None
    if classifier_on and model is None:  # lexicon alone misses half the emergencies: never fall back silently
        raise ConfigError("The triage classifier is missing", path=classifier.model_path(),
                          hint="Build it with `make setup` (or `python scripts/train_triage.py`)")
    return build(data, Path(sources[-1]), tuple(sources), model, classifier.packaged_model("lang.npz"))
