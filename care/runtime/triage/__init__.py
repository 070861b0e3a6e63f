"""Clinical triage: does a user message, in its conversation, describe an emergency, and which one?

One entry point, used by the chat session, the server (and its llama-server gateway) and `care triage`:

    from care.runtime.triage import assess, load_rules
    verdict = assess([{"role": "user", "content": "my baby is 3 weeks old and has a fever"}])
    verdict.emergency, verdict.category, verdict.language, verdict.score, verdict.why

The parts, each a module of this package: normalize (one spelling in every script), lexicon (phrases and
their context checks), classifier (hashed n-grams, numpy), rules (the clinic-editable files), decide (the
verdict, the user's language), present (the notice and the first-aid card in that language), reply_check
(the model's reply to a flagged turn, when a user asks for it), data (the labelled sets, for training and
bench/triage.py). No torch, no sklearn on the chat path.
"""

from __future__ import annotations

from collections.abc import Sequence

from care.runtime.triage.decide import CANCELLED_BAR, Verdict, detect_language
from care.runtime.triage.present import Card, card, display_languages, framing, notice_text
from care.runtime.triage.reply_check import claims_clinician
from care.runtime.triage.rules import (
    LANGUAGES,
    Rules,
    load_rules,
    override_path,
    packaged_rules,
    packaged_rules_path,
)


def assess(messages: Sequence[object], rules: Rules | None = None) -> Verdict:
    """The verdict for the last user message of `messages` ({"role", "content"} dicts, or plain strings,
    the earlier ones being the conversation so far)."""
    from care.runtime.triage import decide

    return decide.assess(messages, rules or load_rules())


__all__ = ["CANCELLED_BAR", "LANGUAGES", "Card", "Rules", "Verdict", "assess", "card", "claims_clinician",
           "detect_language", "display_languages", "framing", "load_rules", "notice_text", "override_path",
           "packaged_rules", "packaged_rules_path"]
