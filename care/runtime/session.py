"""A conversation over the engine: domain system prompt, triage, first-aid cards, context notes, framing.

Front ends (the `--once` CLI, the Textual app, the server and its llama-server gateway) drive a
`ChatSession` and render what `send()` yields, in order:
- on a flagged turn (care/runtime/triage): a `SafetyNotice`, then the category's `FirstAidCard` (vetted
  steps, in the user's language), and by default nothing else: the model writes nothing, so nothing can
  contradict the notice. With `emergency_reply="model"` (or `answer_anyway()` afterwards) an `AnywayNote`
  label, then the model's reply under the turn's safety instruction, checked a sentence at a time, and a
  `ReplyCheckNote` when sentences were removed;
- a `ContextNote` when older turns had to be left out (or summarised: care/runtime/summary.py);
- the engine's streamed `GenerationResponse` chunks (the last has finish_reason).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

from care.domains import DOMAINS, system_prompt
from care.errors import UsageError
from care.runtime import triage
from care.runtime.backend import ChatBackend, GenerationResponse, Message, SamplingConfig
from care.runtime.summary import Summarizer, with_summary
from care.runtime.triage import reply_check
from care.runtime.triage.reply_check import ReplyCheckNote

log = logging.getLogger(__name__)

__all__ = ["CONTEXT_POLICIES", "EMERGENCY_REPLIES", "AnywayNote", "ChatSession", "ContextNote", "FirstAidCard",
           "ReplyCheckNote", "SafetyNotice", "SessionEvent"]

CONTEXT_POLICIES = ("drop", "summarize")
EMERGENCY_REPLIES = ("card", "model")


@dataclass
class SafetyNotice:
    """Shown before anything else on a flagged turn."""

    rule_id: str  # the verdict's reason: "lexicon: <phrase>", "classifier", ... (+context)
    category: str  # e.g. "chest_pain", "suicidal_thoughts"
    message: str  # the emergency notice in the user's language (or the clinic's languages)
    score: float | None = None  # the classifier's P(emergency)
    language: str = "en"  # the user's language as detected


@dataclass
class FirstAidCard:
    """The vetted first-aid steps of the flagged category, shown right after the notice."""

    category: str
    text: str  # title and numbered steps, as shown
    steps: list[str]
    sources: list[str]  # where each step comes from (care/data/safety/cards.yaml)


@dataclass
class AnywayNote(GenerationResponse):
    """Heads the model's own reply to a flagged turn (asked for anyway): it is not vetted text."""


@dataclass
class ContextNote:
    """Older turns were left out to fit n_ctx: dropped, or (context="summarize") replaced by `summary`."""

    dropped: int
    message: str
    summary: str | None = None


SessionEvent = SafetyNotice | FirstAidCard | ContextNote | GenerationResponse


def flagged(verdict: triage.Verdict, rules: triage.Rules,
            languages: tuple[str, ...] | None = None) -> tuple[SafetyNotice, FirstAidCard | None]:
    """The notice and the card of a flagged verdict, in the user's language (or the clinic's languages)."""
    notice = SafetyNotice(verdict.why, verdict.category or "", triage.notice_text(verdict, rules, languages),
                          round(verdict.score, 4), verdict.language)
    card = triage.card(verdict, rules, languages)
    return notice, (FirstAidCard(card.category, card.text, card.steps, card.sources) if card else None)


def shown_text(notice: SafetyNotice, card: FirstAidCard | None) -> str:
    """What a flagged turn shows by default, as plain text: the notice, a blank line, the card."""
    return notice.message + (f"\n\n{card.text}" if card else "")


class ChatSession:
    """One conversation. `messages` holds everything said (system prompt first), for saving/restoring.

    domain="auto" picks the domain from the first user message (care.runtime.domains.detect_domain).
    `languages=None` uses the languages configured in the safety rules (clinic file, else English).
    `emergency_reply="card"`: a flagged turn answers with the notice and the first-aid card only;
    "model": the model's reply follows, labelled and checked (see care/runtime/triage/reply_check.py).
    """

    def __init__(self, engine: ChatBackend, domain: str = "general", system: str | None = None,
                 safety: bool = True, languages: tuple[str, ...] | None = None,
                 sampling: SamplingConfig | None = None, context: str | None = None,
                 emergency_reply: str = "card") -> None:
        self.engine = engine
        config = getattr(engine, "config", None)
        self.context = (context or getattr(config, "context_policy", None) or "drop").lower()
        if self.context not in CONTEXT_POLICIES:
            raise UsageError(f"Unknown context policy '{context}'", hint=f"Choose one of: {', '.join(CONTEXT_POLICIES)}")
        if emergency_reply not in EMERGENCY_REPLIES:
            raise UsageError(f"Unknown emergency reply '{emergency_reply}'", hint="Choose card or model")
        self.emergency_reply = emergency_reply
        self.safety = safety
        self.sampling = sampling
        self.rules = triage.load_rules()
        self.languages = tuple(languages) if languages else self.rules.languages
        self._auto = domain == "auto"
        self._domain = "general" if self._auto else _check_domain(domain)
        self._custom_system = system
        self.messages: list[Message] = [{"role": "system", "content": system or system_prompt(self._domain)}]
        self._cancelled = threading.Event()
        self._last_dropped = 0
        self.summarizer = Summarizer(engine, int(getattr(config, "summary_tokens", 160) or 160), self._cancelled)
        self.last_verdict: triage.Verdict | None = None

    # -- domain / system prompt ----------------------------------------------------------------------
    @property
    def domain(self) -> str:
        return self._domain

    @domain.setter
    def domain(self, value: str) -> None:
        self._auto = False
        self._domain = _check_domain(value)
        self._custom_system = None
        self._set_system(system_prompt(self._domain))

    @property
    def system(self) -> str:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else ""

    def _with_domain_adapter(self, s: SamplingConfig) -> SamplingConfig:
        """The domain's LoRA adapter (care.runtime.adapters) unless the request chose adapters itself."""
        pick = getattr(self.engine, "adapters_for", None)
        if s.adapters is not None or pick is None or not getattr(self.engine, "adapter_names", ()):
            return s
        return replace(s, adapters=pick(self._domain))

    def _set_system(self, text: str) -> None:
        if self.messages and self.messages[0]["role"] == "system":
            self.messages[0] = {"role": "system", "content": text}
        else:
            self.messages.insert(0, {"role": "system", "content": text})

    # -- conversation --------------------------------------------------------------------------------
    def send(self, text: str, emergency_reply: str | None = None) -> Iterator[SessionEvent]:
        """The notice and card of a flagged turn, then (unless it answers with the card alone) the streamed
        reply. The user turn and what was shown are kept."""
        self._cancelled.clear()
        earlier = [m["content"] for m in self.messages if m["role"] == "user"]
        # Triage in the context of the earlier user turns ("he's 2 years old" counts).
        verdict = triage.assess([*earlier, text], self.rules) if self.safety else None
        self.last_verdict = verdict
        if self._auto and not earlier:
            from care.runtime.domains import detect_domain

            self._domain = "medical" if verdict is not None and verdict.emergency else detect_domain(text)
            if self._custom_system is None:
                self._set_system(system_prompt(self._domain))
            log.info("domain detected from the first message: %s", self._domain)
        if verdict is None or not verdict.emergency:
            yield from self._reply(text)
            return
        mode = emergency_reply or self.emergency_reply
        if mode not in EMERGENCY_REPLIES:
            raise UsageError(f"Unknown emergency reply '{mode}'", hint="Choose card or model")
        notice, card = self.flagged(verdict)
        shown = shown_text(notice, card)
        if mode == "card":
            yield notice
            if card:
                yield card
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": shown}]
            yield GenerationResponse(text="", finish_reason="stop")
            return
        yield from self._reply(text, verdict, head=[notice, *([card] if card else [])], shown=shown)

    def flagged(self, verdict: triage.Verdict) -> tuple[SafetyNotice, FirstAidCard | None]:
        return flagged(verdict, self.rules, self.languages)

    def answer_anyway(self) -> Iterator[SessionEvent]:
        """The model's own reply to the last turn, which was flagged and answered with its card: labelled,
        under the turn's safety instruction and checked. The notice and card stay where they are."""
        verdict = self.last_verdict
        if (verdict is None or not verdict.emergency or len(self.messages) < 3
                or self.messages[-1]["role"] != "assistant" or self.messages[-2]["role"] != "user"):
            raise UsageError("The last message was not flagged as an emergency", hint="Nothing to ask anyway")
        self._cancelled.clear()
        shown = self.messages.pop()["content"]
        text = self.messages.pop()["content"]
        yield from self._reply(text, verdict, head=[], shown=shown)

    def _reply(self, text: str, verdict: triage.Verdict | None = None, head: list[SessionEvent] | None = None,
               shown: str = "") -> Iterator[SessionEvent]:
        """The model's reply to `text`; for a flagged verdict: `head` (notice, card) first, then the label,
        then the reply under the safety instruction, checked; `shown` starts the recorded reply."""
        history = [*self.messages, {"role": "user", "content": text}]
        s = self.sampling or self.engine.config.sampling
        prompt_history = self._prompt_messages(history)
        guard = None
        if verdict is not None:  # this turn only: the model is told, and its reply is checked sentence by sentence
            number = self.rules.number(triage.display_languages(verdict, self.rules, self.languages)[0])
            prompt_history = reply_check.with_instruction(
                prompt_history, reply_check.turn_instruction(verdict.categories or [verdict.category], number))
            guard = reply_check.ReplyGuard(self.rules.numbers())
        # Raises GenerationError (on the first next()) for a message that cannot fit; nothing is recorded.
        kept, _, dropped = self.engine.fit(prompt_history, s.max_tokens)
        yield from head or []
        self.messages.append({"role": "user", "content": text})
        parts: list[str] = [shown + "\n\n"] if shown else []
        if verdict is not None:
            label = reply_check.localized_label(reply_check.ANYWAY_LABEL,
                                                triage.display_languages(verdict, self.rules, self.languages))
            parts.append(label + "\n")
            yield AnywayNote(text=label + "\n")
        last: GenerationResponse | None = None
        stream: Iterator[GenerationResponse] | None = None
        try:
            summary = None
            if dropped and self.context == "summarize":
                kept, dropped, summary = self.summarizer.fit(prompt_history, s.max_tokens, fallback=(kept, dropped))
            if self._cancelled.is_set():  # stopped while summarising: no reply
                last = GenerationResponse(text="", finish_reason="cancelled")
                yield last
                return
            if dropped and dropped != self._last_dropped:
                what = "summarised" if summary else "left out"
                yield ContextNote(dropped, f"{dropped} older message{'s' if dropped != 1 else ''} {what} to fit "
                                           f"the {self.engine.n_ctx}-token context.", summary)
            self._last_dropped = dropped
            stream = self.engine.stream(kept, self._with_domain_adapter(s))
            for chunk in stream:
                if self._cancelled.is_set() and chunk.finish_reason is None:
                    self.engine.cancel()
                if chunk.finish_reason is not None:
                    last = chunk
                    break
                if guard is not None:
                    checked = guard.feed(chunk.text)
                    if not checked:
                        continue
                    chunk = dataclasses.replace(chunk, text=checked)
                parts.append(chunk.text)
                yield chunk
            if last is None:  # the engine stream ended without a final chunk (should not happen)
                last = GenerationResponse(text="", finish_reason="cancelled")
            if guard is not None:
                yield from self._guard_tail(guard, last, parts)
            if last.finish_reason != "cancelled":
                for extra in self._framing("".join(parts)):
                    parts.append(extra)
                    yield GenerationResponse(text=extra, prompt_tokens=last.prompt_tokens,
                                             completion_tokens=last.completion_tokens, ttft_s=last.ttft_s)
            last.dropped_turns = dropped
            yield last
        finally:
            if stream is not None:
                stream.close()  # releases the engine's lock now, not when the generator is collected
            # Recorded even when the consumer stops iterating (cancel in a UI, a closed HTTP stream).
            self.messages.append({"role": "assistant", "content": "".join(parts)})

    def _guard_tail(self, guard: reply_check.ReplyGuard, last: GenerationResponse,
                    parts: list[str]) -> Iterator[GenerationResponse]:
        tail = guard.flush()
        if tail:
            parts.append(tail)
            yield GenerationResponse(text=tail, prompt_tokens=last.prompt_tokens,
                                     completion_tokens=last.completion_tokens, ttft_s=last.ttft_s)
        if guard.removed:
            log.warning("removed %d reply sentence(s) contradicting the emergency notice: %s",
                        len(guard.removed), guard.reasons)
            note = "\n\n" + reply_check.note_text(len(guard.removed), self.languages)
            parts.append(note)
            yield reply_check.ReplyCheckNote(text=note, removed=list(guard.removed), reasons=list(guard.reasons))

    @property
    def summary(self) -> str | None:
        """The rolling summary of the turns left out so far (context="summarize"), if any."""
        return self.summarizer.summary

    def _framing(self, reply: str) -> list[str]:
        """Medical answers end with the not-a-diagnosis line; a reply posing as a clinician is corrected."""
        extras = []
        if self.safety and triage.claims_clinician(reply):
            extras.append("\n\n" + triage.framing(self.rules, "not_a_doctor", self.languages))
        if self.safety and self._domain == "medical":
            disclaimer = triage.framing(self.rules, "disclaimer", self.languages)
            if disclaimer and disclaimer not in reply:
                extras.append("\n\n" + disclaimer)
        return extras

    def _prompt_messages(self, messages: list[Message]) -> list[Message]:
        """The history as the model sees it: without the fixed framing lines we appended (saves context)."""
        tails = [triage.framing(self.rules, key, self.languages) for key in ("disclaimer", "not_a_doctor")]
        out = []
        for m in messages:
            content = m["content"]
            if m["role"] == "assistant":
                for tail in tails:
                    if tail:
                        content = content.replace("\n\n" + tail, "")
            out.append({"role": m["role"], "content": content})
        return out

    def cancel(self) -> None:
        """Stop the reply in progress (from any thread); what was generated so far is kept."""
        self._cancelled.set()
        self.engine.cancel()

    def context_used(self) -> int:
        """Prompt tokens of the history as the model now sees it (with the generation prompt): after turns
        were left out or summarised, what is still sent, so it never reads more than n_ctx for long."""
        history = self._prompt_messages(self.messages)
        system = history[0] if history and history[0]["role"] == "system" else None
        rest = history[1:] if system else history
        sm = self.summarizer
        if sm.summary and sm.covered <= len(rest):
            history = [*with_summary(system, sm.summary), *rest[sm.covered:]]
        elif self._last_dropped and self._last_dropped <= len(rest):
            history = [*([system] if system else []), *rest[self._last_dropped:]]
        return len(self.engine.tokenize(self.engine.render(history)))

    def load_messages(self, messages: list[Message]) -> None:
        """Restore a saved conversation; one without a system message keeps the current one."""
        clean = [{"role": str(m["role"]), "content": str(m.get("content", ""))} for m in messages]
        bad = [m["role"] for m in clean if m["role"] not in ("system", "user", "assistant")]
        if bad:
            raise UsageError(f"Unknown message role '{bad[0]}' in the saved conversation",
                             hint="Roles must be system, user or assistant")
        if not clean or clean[0]["role"] != "system":
            clean.insert(0, {"role": "system", "content": self.system or system_prompt(self._domain)})
        self.messages = clean
        self._auto = self._auto and not any(m["role"] == "user" for m in clean)
        self._last_dropped = 0
        self.summarizer.forget()

    def reset(self, auto: bool = False) -> None:
        """A new conversation with the same domain and system prompt; `auto=True`: the domain is detected
        again from the new conversation's first message."""
        self.messages = self.messages[:1]
        if auto:
            self._auto = True
        self._last_dropped = 0
        self.summarizer.forget()


def _check_domain(domain: str) -> str:
    name = (domain or "general").lower()
    if name not in DOMAINS:
        raise UsageError(f"Unknown domain '{domain}'", hint=f"Choose one of: {', '.join(DOMAINS)}, auto")
    return name
