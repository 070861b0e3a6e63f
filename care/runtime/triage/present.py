"""What a flagged turn shows, in the user's language: the notice, then the first-aid card.

The clinic serves `Rules.languages`; the user's language (Verdict.language) is used when it is one of them,
else every served language is shown. A romanised Hindi or Bangla writer (Verdict.script == "latin") gets the
romanised text ("hi-Latn", "bn-Latn" keys) where the files have it, else the native script.
"""

from __future__ import annotations

from dataclasses import dataclass

from care.runtime.triage.decide import Verdict
from care.runtime.triage.rules import Rules


@dataclass
class Card:
    """The vetted first-aid steps for one category, in one or more languages."""

    category: str
    steps: list[str]  # numbered lines, already in the display language(s)
    sources: list[str]  # one per step (the same in every language)
    text: str  # the whole card as shown: title, then "1. ...", "2. ..."


def display_languages(verdict: Verdict, rules: Rules, languages: tuple[str, ...] | None = None) -> tuple[str, ...]:
    served = tuple(languages or rules.languages)
    return (verdict.language,) if verdict.language in served else served


def _keys(texts: dict[str, str], langs: tuple[str, ...], script: str) -> list[str]:
    """One key of `texts` per language: the romanised variant for a romanised writer, else the language;
    English when `texts` has none of them."""
    keys = []
    for lang in langs:
        for key in ((f"{lang}-Latn", lang) if script == "latin" else (lang,)):
            if texts.get(key):
                keys.append(key)
                break
    if not keys and texts:
        keys.append("en" if "en" in texts else next(iter(texts)))
    return keys


def _number(rules: Rules, key: str) -> str:
    return rules.number(key.split("-")[0])


def localized(texts: dict[str, str], rules: Rules, langs: tuple[str, ...], script: str = "native") -> str:
    return "\n".join(texts[k].replace("{emergency_number}", _number(rules, k)) for k in _keys(texts, langs, script))


def notice_text(verdict: Verdict, rules: Rules, languages: tuple[str, ...] | None = None) -> str:
    default = rules.messages.get("default", {})
    texts = {**default, **rules.messages.get(verdict.category or "", {})}
    return localized(texts, rules, display_languages(verdict, rules, languages), verdict.script)


def card(verdict: Verdict, rules: Rules, languages: tuple[str, ...] | None = None) -> Card | None:
    """The category's first-aid card, or None when the files have none for it (a clinic's own category)."""
    steps = rules.cards.get(verdict.category or "")
    if not steps:
        return None
    langs = display_languages(verdict, rules, languages)
    blocks, lines = [], []
    for key in _keys(steps[0], langs, verdict.script):
        title = rules.card_title.get(key) or rules.card_title.get(key.split("-")[0]) or rules.card_title.get("en", "")
        numbered = [f"{i}. {s.get(key) or s.get('en', '')}".replace("{emergency_number}", _number(rules, key))
                    for i, s in enumerate(steps, 1)]
        lines.extend(numbered)
        blocks.append("\n".join([title, *numbered] if title else numbered))
    return Card(verdict.category or "", lines, [s.get("source", "") for s in steps], "\n\n".join(blocks))


def framing(rules: Rules, key: str, languages: tuple[str, ...]) -> str:
    """The disclaimer / not-a-doctor line in the served languages."""
    texts = getattr(rules, key)
    return localized(texts, rules, languages) if texts else ""
