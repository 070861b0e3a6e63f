"""The triage decision: `assess(messages, rules) -> Verdict`, and the user's language.

1. The lexicon (rules.Rule): a phrase or pattern that matches and is not cancelled by its context (negation,
   own past, general question, hypothetical, news, a resolved follow-up, an idiom) flags its category.
2. The classifier (classifier.LinearModel): P(emergency) summed over the enabled categories at or above the
   model's threshold flags the most likely one, if the message has some word that could be a symptom
   (`evidence`). Where the lexicon's phrases of that category were all cancelled, or every sentence with
   content is cancelled by a cue, it needs CANCELLED_BAR.
3. Conversation context: facts of earlier user turns (an age, a pregnancy, diabetes) are put before the
   message; the turn is flagged when the message alone is, or when message + facts are and the facts
   alone score lower.
4. The classifier's veto: a lexicon hit whose categories the classifier knows, scored below the model's `veto`
   (P(emergency) of a message the lexicon flags; chosen by scripts/train_triage.py on out-of-fold training rows
   so that it costs at most MAX_VETO_RECALL_LOSS of recall) is not flagged: the classifier has learned the
   questions, histories and idioms that name an emergency word, which the context patterns cannot list.
`always_flag` rules are never cancelled and never overruled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from care.runtime.triage.classifier import NULL
from care.runtime.triage.normalize import normalize, script_of
from care.runtime.triage.rules import LANGUAGES, Rules

# P(emergency) the classifier needs to flag a message whose own phrases or sentences were cancelled by their
# context. A fixed design choice (not fitted): the rules' context checks outrank a middling classifier score.
CANCELLED_BAR = 0.9
# Signs that DATA.md files under the situation when it has its own category (breathless after drowning is
# drowning; bleeding in pregnancy is pregnancy_emergency; a fit in a young infant is young_infant): among the
# lexicon's categories, these come after any other, so the card shown is the situation's.
GENERIC_SIGNS = frozenset({"difficulty_breathing", "severe_bleeding", "unconscious_or_seizure"})
# The lexicon flags, the classifier names the category when it is this many times surer of another one than of
# the lexicon's (a fixed list was tried on out-of-fold TRAINING rows, scripts/train_triage.py: 2, 4, 8; 4 gave the
# most right categories, 0.794 -> 0.819): a phrase names one sign ("not breathing", "bleeding", "took pills")
# while the whole message says whose and why (a drowning, a pregnancy, a suicide attempt). Not for an always-flag
# rule or a clinic's own category, which the classifier does not know.
CATEGORY_RATIO = 4.0


@dataclass
class Verdict:
    """What the triage layer decided for the last user message, in its conversation."""

    emergency: bool
    category: str | None
    language: str  # the user's language (en, fr, es, pt, sw, hi, bn)
    score: float  # the classifier's P(emergency) over enabled categories; 1.0 for an always-flag rule
    why: str  # "lexicon: <phrase>", "classifier", "cancelled: hypothetical", "+context" when earlier turns decided
    script: str = "latin"  # "native" or "latin" (romanised Hindi / Bangla)
    categories: list[str] = field(default_factory=list)  # every flagged category, most likely first
    source: str = "lexicon"  # "lexicon", "always_flag", "classifier" (+ "+context")


def detect_language(text: str, rules: Rules) -> tuple[str, str]:
    """(language, script) of a message: the script first (Devanagari: hi, Bengali: bn), then the language
    model on the normalised text (romanised Hindi and Bangla are Latin-script hi / bn)."""
    script = script_of(text)
    if script == "deva":
        return "hi", "native"
    if script == "beng":
        return "bn", "native"
    model = rules.lang_model
    if model is None:
        return "en", "native"
    proba = model.proba(normalize(text, {}))  # no SMS table yet: which one is what is being decided
    lang = max(proba, key=proba.__getitem__)
    return lang, "latin" if lang in ("hi", "bn") else "native"


def normalized(text: str, rules: Rules) -> str:
    """The text as the rules and the classifiers read it: normalised with its language's SMS spellings."""
    return normalize(text, rules.sms_for(detect_language(text, rules)[0] if text.strip() else "en"))


def _texts(messages: Sequence[object]) -> tuple[str, list[str]]:
    """The last user message and the earlier user messages, from chat messages or plain strings."""
    users = [m["content"] if isinstance(m, dict) else str(m) for m in messages
             if not isinstance(m, dict) or m.get("role", "user") == "user"]
    if not users:
        return "", []
    return str(users[-1] or ""), [str(u or "") for u in users[:-1]]


def assess(messages: Sequence[object], rules: Rules) -> Verdict:
    """The verdict for the last user message of `messages` ({"role", "content"} dicts, or strings)."""
    text, earlier = _texts(messages)
    lang, script = detect_language(text, rules) if text.strip() else ("en", "native")
    norm = normalize(text, rules.sms_for(lang))
    result = _assess_norm(norm, rules, lang)
    if earlier:
        # With the facts in front, the decision (and the category: a fever at 3 weeks is young_infant) can change.
        facts = rules.context_for(lang).carried_facts(earlier, rules.sms_for(lang))
        if facts:
            alone = _assess_norm(facts, rules, lang)
            with_facts = _assess_norm(facts + " . " + norm, rules, lang)
            if result.emergency:  # flagged anyway: the facts may only name the category better
                use = with_facts.emergency and with_facts.category != result.category and result.source == "classifier"
            else:  # the message must add to what the facts say by themselves ("thanks" does not)
                use = (with_facts.emergency and with_facts.score > alone.score
                       and not rules.context_for(lang).resolved_followup(norm))
            if use:
                with_facts.source += "+context"
                with_facts.why += " +context"
                result = with_facts
    result.language, result.script = lang, script
    return result


def _assess_norm(norm: str, rules: Rules, lang: str = "en") -> Verdict:
    variants = [norm]
    if rules.typo is not None:
        fixed = rules.typo.text(norm, lang)
        if fixed != norm:
            variants.append(fixed)
    ctx = rules.context_for(lang)
    hits: list[tuple[str, str, bool]] = []  # (category, phrase, always_flag)
    cancelled: dict[str, str] = {}  # category -> why its phrases did not count
    present = {v: {w for w in rules.words if w in v} for v in variants}
    for r in rules.rules:
        if not r.enabled or r.category in rules.disabled:
            continue
        for v in variants:
            phrase, reason = r.scan(v, ctx, norm, present[v])
            if phrase is not None:
                hits.append((r.category, phrase, r.always_flag))
                break
            if reason:
                cancelled.setdefault(r.category, reason)
    cues = ctx.cue_names(norm)
    proba = rules.model.proba(norm, cues) if rules.model is not None else {}
    cats = {c: p for c, p in proba.items() if c != NULL and c not in rules.disabled}
    score = float(sum(cats.values()))
    if hits:
        order = {c: i for i, c in enumerate(dict.fromkeys(c for c, _, _ in hits))}
        # The situation's category before a generic sign's; a clinic's own categories (unknown to the
        # classifier) first; then the most likely.
        ranked = sorted(order, key=lambda c: (c in GENERIC_SIGNS, -cats.get(c, 2.0), order[c]))
        always = any(a for _, _, a in hits)
        surest = max(cats, key=cats.__getitem__) if cats else None
        if (not always and surest is not None and surest not in order and ranked[0] in cats
                and cats[surest] > CATEGORY_RATIO * cats[ranked[0]]):
            ranked.insert(0, surest)
        phrase = next(p for c, p, _ in hits if c == next(c for c in ranked if c in order))
        veto = rules.model.veto if rules.model is not None else 0.0
        if not always and veto > 0 and score < veto and all(c in cats for c in ranked):
            return Verdict(False, None, "en", score, f"cancelled: classifier (p={score:.2f}, lexicon: {phrase})",
                           source="veto")
        named = "" if ranked[0] in order else ", category: classifier"
        return Verdict(True, ranked[0], "en", 1.0 if always else score, f"lexicon: {phrase}{named}",
                       categories=ranked, source="always_flag" if always else "lexicon")
    # The classifier alone needs a word that could be a symptom: "and now?" says nothing of one.
    evident = bool(ctx.evidence(norm))
    whole = ctx.all_sentences_cancelled(norm)
    if cats and evident and rules.model is not None and score >= rules.model.threshold:
        best = max(cats, key=cats.__getitem__)
        why = cancelled.get(best) or whole
        if why is None or score >= CANCELLED_BAR:
            return Verdict(True, best, "en", score, "classifier", categories=[best], source="classifier")
        return Verdict(False, None, "en", score, f"cancelled: {why}", source="classifier")
    why = next(iter(cancelled.values()), None) or whole
    return Verdict(False, None, "en", score, f"cancelled: {why}" if why else ("classifier" if cats else "no match"),
                   source="classifier" if cats else "lexicon")


__all__ = ["CANCELLED_BAR", "CATEGORY_RATIO", "GENERIC_SIGNS", "LANGUAGES", "Verdict", "assess", "detect_language"]
