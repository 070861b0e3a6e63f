"""Clinical red-flag rules: an emergency-care notice before any model text, from files a clinic can edit.

The packaged defaults are care/data/safety/red_flags.yaml; a clinic's <config dir>/safety.yaml is merged
over them (same rule id replaces, `enabled: false` switches a rule off, new ids add rules). Patterns of
every language are always checked; notices are worded in the languages the clinic configures.
Regular expressions rather than a model on purpose: a clinic can read, test and change every rule, and
the check costs microseconds before the (slow) model starts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from care.errors import ConfigError

log = logging.getLogger(__name__)

OVERRIDE_NAME = "safety.yaml"
NEGATION_WINDOW = 40  # characters before a match searched for "no", "don't have", ...


@dataclass
class SafetyNotice:
    """Shown before any model text."""

    rule_id: str
    category: str  # e.g. "chest_pain", "suicidal_thoughts"
    message: str  # emergency-care message in the configured language(s)


@dataclass
class SafetyRule:
    id: str
    category: str
    patterns: dict[str, list[re.Pattern[str]]]  # language -> compiled patterns
    enabled: bool = True

    def search(self, text: str, negations: list[re.Pattern[str]]) -> re.Match[str] | None:
        for pats in self.patterns.values():
            for pat in pats:
                for m in pat.finditer(text):
                    before = text[max(0, m.start() - NEGATION_WINDOW) : m.start()]
                    if not any(n.search(before) for n in negations):
                        return m
        return None


@dataclass
class SafetyRules:
    rules: list[SafetyRule]
    messages: dict[str, dict[str, str]]  # category (or "default") -> language -> text
    languages: tuple[str, ...] = ("en",)
    emergency_number: str | dict[str, str] = "your local emergency number"
    negations: list[re.Pattern[str]] = field(default_factory=list)
    disclaimer: dict[str, str] = field(default_factory=dict)
    not_a_doctor: dict[str, str] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def check(self, text: str, languages: tuple[str, ...] | None = None) -> list[SafetyNotice]:
        """One notice per matching category, in rule order."""
        langs = tuple(languages or self.languages)
        notices: list[SafetyNotice] = []
        seen: set[str] = set()
        for rule in self.rules:
            if not rule.enabled or rule.category in seen:
                continue
            if rule.search(text, self.negations):
                seen.add(rule.category)
                notices.append(SafetyNotice(rule.id, rule.category, self.message(rule.category, langs)))
        return notices

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
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"Safety rule '{rule_id}' has a bad pattern {pattern!r}: {exc}", path=path,
                          hint="Fix the regular expression (Python syntax)") from exc


def merge_rule_data(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """The clinic file over the packaged one (see the module docstring)."""
    merged = dict(base)
    for key in ("languages", "emergency_number", "negation"):
        if key in override:
            merged[key] = override[key]
    for key in ("messages",):
        msgs = {k: dict(v) for k, v in (base.get(key) or {}).items()}
        for cat, texts in (override.get(key) or {}).items():
            msgs.setdefault(cat, {}).update(texts or {})
        merged[key] = msgs
    for key in ("disclaimer", "not_a_doctor"):
        merged[key] = {**(base.get(key) or {}), **(override.get(key) or {})}
    rules = {r["id"]: r for r in base.get("rules") or []}
    for rule in override.get("rules") or []:
        if "id" not in rule:
            raise ConfigError("A rule in the clinic safety file has no id", hint="Give every rule an `id:`")
        if rule["id"] in rules and "patterns" not in rule:
            rules[rule["id"]] = {**rules[rule["id"]], **rule}  # e.g. only `enabled: false`
        else:
            rules[rule["id"]] = rule
    merged["rules"] = list(rules.values())
    return merged


def build_rules(data: dict[str, Any], path: Path, sources: tuple[str, ...] = ()) -> SafetyRules:
    rules = []
    for raw in data.get("rules") or []:
        rid = str(raw.get("id", "?"))
        patterns = raw.get("patterns") or {}
        if isinstance(patterns, list):  # a plain list: English
            patterns = {"en": patterns}
        if not raw.get("category"):
            raise ConfigError(f"Safety rule '{rid}' has no category", path=path, hint="Add `category:`")
        rules.append(SafetyRule(
            id=rid, category=str(raw["category"]), enabled=bool(raw.get("enabled", True)),
            patterns={lang: [_compile(p, path, rid) for p in pats or []] for lang, pats in patterns.items()},
        ))
    langs = data.get("languages") or ["en"]
    if isinstance(langs, str):
        langs = [langs]
    return SafetyRules(
        rules=rules,
        messages=data.get("messages") or {},
        languages=tuple(langs),
        emergency_number=data.get("emergency_number") or "your local emergency number",
        negations=[_compile(p, path, "negation") for p in data.get("negation") or []],
        disclaimer=data.get("disclaimer") or {},
        not_a_doctor=data.get("not_a_doctor") or {},
        sources=sources,
    )


def load_rules(override: Path | None = None) -> SafetyRules:
    """Packaged rules merged with the clinic file (default: <config dir>/safety.yaml, if present)."""
    override = override if override is not None else override_path()
    packaged = packaged_rules_path()
    stamp = override.stat().st_mtime_ns if override.is_file() else None
    return _load_cached(str(packaged), str(override), stamp)


@lru_cache(maxsize=8)
def _load_cached(packaged: str, override: str, stamp: int | None) -> SafetyRules:
    data = _read_yaml(Path(packaged))
    sources = [packaged]
    if stamp is not None:
        data = merge_rule_data(data, _read_yaml(Path(override)))
        sources.append(override)
        log.info("safety rules: packaged + clinic file %s", override)
    return build_rules(data, Path(sources[-1]), tuple(sources))


def check(text: str, languages: tuple[str, ...] | None = None) -> list[SafetyNotice]:
    """Red-flag notices for one user message with the current rules."""
    return load_rules().check(text, languages)
