"""A conversation over the engine: domain system prompt, red-flag notices, context notes, medical framing.

Front ends (the `--once` CLI, the Textual app, the server) drive a `ChatSession` and render what
`send()` yields, in order: `SafetyNotice`s (before any model text), a `ContextNote` when older turns had
to be left out, then the engine's streamed `GenerationResponse` chunks (the last has finish_reason).

Turns that no longer fit the context are dropped, oldest first, or with `context="summarize"` folded into a
rolling summary that the model writes and that rides in the system prompt (`ContextNote.summary`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from care.domains import DOMAINS, system_prompt
from care.errors import GenerationError, UsageError
from care.runtime.backend import ChatBackend, GenerationResponse, Message, SamplingConfig, collect
from care.runtime.safety import SafetyNotice, claims_clinician, load_rules

log = logging.getLogger(__name__)

__all__ = ["CONTEXT_POLICIES", "ChatSession", "ContextNote", "SafetyNotice", "SessionEvent"]

CONTEXT_POLICIES = ("drop", "summarize")

SUMMARY_SYSTEM = "You write short, factual summaries of support conversations."
SUMMARY_INSTRUCTION = (
    "Write a summary of the conversation above in at most {words} words, as notes for the assistant who "
    "continues it. Keep names, numbers, dates, symptoms, medicines, doses, accounts, plans and what was "
    "already advised or decided. Write only the summary."
)
SUMMARY_HEADER = "Summary of the earlier part of this conversation (those messages no longer fit):"
_ROLE_NAMES = {"user": "User", "assistant": "Assistant"}
# Summaries by (model, conversation prefix), so the server, which gets the whole history with every request
# and builds a new session for it, does not summarise the same turns again each time.
_SUMMARY_CACHE: OrderedDict[str, str] = OrderedDict()
_SUMMARY_CACHE_SIZE = 256
_SUMMARY_CACHE_LOCK = threading.Lock()  # the server's worker threads share the cache


@dataclass
class ContextNote:
    """Older turns were left out to fit n_ctx: dropped, or (context="summarize") replaced by `summary`."""

    dropped: int
    message: str
    summary: str | None = None


SessionEvent = SafetyNotice | ContextNote | GenerationResponse


class ChatSession:
    """One conversation. `messages` holds everything said (system prompt first), for saving/restoring.

    domain="auto" picks the domain from the first user message (care.runtime.domains.detect_domain).
    `languages=None` uses the languages configured in the safety rules (clinic file, else English).
    """

    def __init__(self, engine: ChatBackend, domain: str = "general", system: str | None = None,
                 safety: bool = True, languages: tuple[str, ...] | None = None,
                 sampling: SamplingConfig | None = None, context: str | None = None) -> None:
        self.engine = engine
        config = getattr(engine, "config", None)
        self.context = (context or getattr(config, "context_policy", None) or "drop").lower()
        if self.context not in CONTEXT_POLICIES:
            raise UsageError(f"Unknown context policy '{context}'", hint=f"Choose one of: {', '.join(CONTEXT_POLICIES)}")
        self.summary_tokens = int(getattr(config, "summary_tokens", 160) or 160)
        self.safety = safety
        self.sampling = sampling
        self.rules = load_rules()
        self.languages = tuple(languages) if languages else self.rules.languages
        self._auto = domain == "auto"
        self._domain = "general" if self._auto else _check_domain(domain)
        self._custom_system = system
        self.messages: list[Message] = [{"role": "system", "content": system or system_prompt(self._domain)}]
        self._cancelled = threading.Event()
        self._last_dropped = 0
        self._forget_summary()

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

    def _set_system(self, text: str) -> None:
        if self.messages and self.messages[0]["role"] == "system":
            self.messages[0] = {"role": "system", "content": text}
        else:
            self.messages.insert(0, {"role": "system", "content": text})

    # -- conversation --------------------------------------------------------------------------------
    def send(self, text: str) -> Iterator[SessionEvent]:
        """Notices, then the streamed reply. The user turn and the (possibly partial) reply are kept."""
        self._cancelled.clear()
        if self._auto and not any(m["role"] == "user" for m in self.messages):
            from care.runtime.domains import detect_domain

            self._domain = detect_domain(text)
            if self._custom_system is None:
                self._set_system(system_prompt(self._domain))
            log.info("domain detected from the first message: %s", self._domain)
        notices = self.rules.check(text, self.languages) if self.safety else []
        history = [*self.messages, {"role": "user", "content": text}]
        s = self.sampling or self.engine.config.sampling
        prompt_history = self._prompt_messages(history)
        # Raises GenerationError (on the first next()) for a message that cannot fit; nothing is recorded.
        kept, _, dropped = self.engine.fit(prompt_history, s.max_tokens)
        yield from notices
        self.messages.append({"role": "user", "content": text})
        parts: list[str] = []
        last: GenerationResponse | None = None
        stream: Iterator[GenerationResponse] | None = None
        try:
            summary = None
            if dropped and self.context == "summarize":
                kept, dropped, summary = self._summarized(prompt_history, s.max_tokens, fallback=(kept, dropped))
            if self._cancelled.is_set():  # stopped while summarising: no reply
                last = GenerationResponse(text="", finish_reason="cancelled")
                yield last
                return
            if dropped and dropped != self._last_dropped:
                what = "summarised" if summary else "left out"
                yield ContextNote(dropped, f"{dropped} older message{'s' if dropped != 1 else ''} {what} to fit "
                                           f"the {self.engine.n_ctx}-token context.", summary)
            self._last_dropped = dropped
            stream = self.engine.stream(kept, s)
            for chunk in stream:
                if self._cancelled.is_set() and chunk.finish_reason is None:
                    self.engine.cancel()
                if chunk.finish_reason is not None:
                    last = chunk
                    break
                parts.append(chunk.text)
                yield chunk
            if last is None:  # the engine stream ended without a final chunk (should not happen)
                last = GenerationResponse(text="", finish_reason="cancelled")
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

    # -- summaries of turns that no longer fit ---------------------------------------------------------
    def _forget_summary(self) -> None:
        self._summary: str | None = None  # rolling summary of the first `_summary_covered` non-system messages
        self._summary_covered = 0
        self._summary_key = ""  # _prefix_keys() of those messages, to notice a history changed under us

    @property
    def summary(self) -> str | None:
        """The rolling summary of the turns left out so far (context="summarize"), if any."""
        return self._summary

    def _summarized(self, history: list[Message], max_tokens: int,
                    fallback: tuple[list[Message], int]) -> tuple[list[Message], int, str | None]:
        """Fit `history` by folding its oldest turns into the rolling summary.

        Returns (messages for the model, number of messages summarised, summary). The summary rides in the
        system message; when the summary and the newest turn cannot fit together, it falls back to dropping."""
        system = history[0] if history and history[0]["role"] == "system" else None
        rest = history[1:] if system else list(history)
        keys = _prefix_keys(getattr(self.engine, "path", ""), rest)
        if self._summary_covered > len(rest) or keys[self._summary_covered] != self._summary_key:
            self._forget_summary()  # the history changed under us
        summary, covered = self._summary, self._summary_covered
        try:
            while True:
                messages = [*_with_summary(system, summary), *rest[covered:]]
                kept, _, more = self.engine.fit(messages, max_tokens)
                if more == 0:
                    break
                # fit() keeps the system message, so what it left out are the oldest turns not yet summarised.
                # Leave room for the new summary at its longest, so that one model call is usually enough.
                try:
                    reserve = _with_summary(system, "x " * self.summary_tokens)
                    more = max(more, self.engine.fit([*reserve, *rest[covered:]], max_tokens)[2])
                except GenerationError:
                    pass  # no room for a full-length summary: summarise what must go, and see
                target = covered + more
                # A summary made earlier, here or by another session on the same turns, is reused.
                with _SUMMARY_CACHE_LOCK:
                    for n in range(target, covered, -1):
                        if keys[n] in _SUMMARY_CACHE:
                            summary, covered = _SUMMARY_CACHE[keys[n]], n
                            _SUMMARY_CACHE.move_to_end(keys[n])
                            break
                if covered < target:
                    summary = self._summarize(summary, rest[covered:target])
                    if self._cancelled.is_set():
                        return fallback[0], fallback[1], None
                    covered = target
                    with _SUMMARY_CACHE_LOCK:
                        _SUMMARY_CACHE[keys[covered]] = summary
                        while len(_SUMMARY_CACHE) > _SUMMARY_CACHE_SIZE:
                            _SUMMARY_CACHE.popitem(last=False)
        except GenerationError as exc:
            log.warning("the summary and the newest message do not fit together (%s); dropping instead", exc)
            self._forget_summary()
            return fallback[0], fallback[1], None
        self._summary, self._summary_covered, self._summary_key = summary, covered, keys[covered]
        return kept, covered, summary

    def _summarize(self, previous: str | None, turns: Sequence[Message]) -> str:
        """One model call: the previous summary plus `turns`, condensed to at most summary_tokens tokens."""
        words = max(5, int(self.summary_tokens * 0.6))  # ~0.6 words a token leaves room in summary_tokens
        transcript = "\n".join(f"{_ROLE_NAMES.get(m['role'], m['role'])}: {m['content'].strip()}" for m in turns)
        sampling = SamplingConfig(temperature=0.0, top_p=1.0, top_k=1, repeat_penalty=1.1, seed=0,
                                  max_tokens=self.summary_tokens)
        budget = self.engine.n_ctx - self.summary_tokens

        def request(transcript: str) -> list[Message]:
            head = f"Summary so far: {previous}\n\n" if previous else ""
            return [{"role": "system", "content": SUMMARY_SYSTEM},
                    {"role": "user", "content": f"{head}Conversation:\n{transcript}\n\n"
                                                f"{SUMMARY_INSTRUCTION.format(words=words)}"}]

        def n_tokens(messages: list[Message]) -> int:
            return len(self.engine.tokenize(self.engine.render(messages)))

        overhead = n_tokens(request(""))
        for _ in range(6):  # a transcript longer than the context is cut from its start until it fits
            messages = request(transcript)
            n = n_tokens(messages)
            if n <= budget:
                break
            room = (budget - overhead) / max(1, n - overhead)  # the share of the transcript that fits
            keep = int(len(transcript) * room * 0.9)
            transcript = "…" + transcript[-keep:] if keep > 0 else ""
        else:
            return previous or _digest(turns, words)
        result = collect(self.engine.stream(messages, sampling))
        text = result.text.strip()
        for label in ("Summary:", "Conversation:"):  # small models start by echoing the request's labels
            if text.startswith(label):
                text = text[len(label):].strip()
        if result.finish_reason == "length":  # cut at summary_tokens: end at the last whole sentence or line
            end = max(text.rfind(". "), text.rfind(".\n"), text.rfind("\n"))
            if end >= len(text) // 2:
                text = text[: end + 1].strip()
        # A model that answers with nothing (tiny ones do) still leaves the user's own words behind.
        return text or _digest(turns, words, previous)

    def _framing(self, reply: str) -> list[str]:
        """Medical answers end with the not-a-diagnosis line; a reply posing as a clinician is corrected."""
        extras = []
        if self.safety and claims_clinician(reply):
            extras.append("\n\n" + self.rules.not_a_doctor_text(self.languages))
        if self.safety and self._domain == "medical":
            disclaimer = self.rules.disclaimer_text(self.languages)
            if disclaimer and disclaimer not in reply:
                extras.append("\n\n" + disclaimer)
        return extras

    def _prompt_messages(self, messages: list[Message]) -> list[Message]:
        """The history as the model sees it: without the fixed framing lines we appended (saves context)."""
        tails = [self.rules.disclaimer_text(self.languages), self.rules.not_a_doctor_text(self.languages)]
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
        if self._summary and self._summary_covered <= len(rest):
            history = [*_with_summary(system, self._summary), *rest[self._summary_covered:]]
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
        self._forget_summary()

    def reset(self) -> None:
        """A new conversation with the same domain and system prompt."""
        self.messages = self.messages[:1]
        self._last_dropped = 0
        self._forget_summary()


def _check_domain(domain: str) -> str:
    name = (domain or "general").lower()
    if name not in DOMAINS:
        raise UsageError(f"Unknown domain '{domain}'", hint=f"Choose one of: {', '.join(DOMAINS)}, auto")
    return name


def _with_summary(system: Message | None, summary: str | None) -> list[Message]:
    if not summary:
        return [system] if system else []
    head = (system["content"] + "\n\n") if system else ""
    return [{"role": "system", "content": f"{head}{SUMMARY_HEADER}\n{summary}"}]


def _prefix_keys(model: object, messages: Sequence[Message]) -> list[str]:
    """keys[n] identifies (model, messages[:n]); a chained hash, so all of them cost one pass."""
    h = hashlib.sha256(str(model).encode("utf-8"))
    keys = [h.hexdigest()]
    for m in messages:
        h.update(json.dumps([m["role"], m["content"]], ensure_ascii=False).encode("utf-8"))
        keys.append(h.copy().hexdigest())
    return keys


def _digest(turns: Sequence[Message], words: int, previous: str | None = None) -> str:
    """A summary without the model: the user's own words, shortened (used when the model writes nothing)."""
    said = [" ".join(m["content"].split()[:24]) for m in turns if m["role"] == "user" and m["content"].strip()]
    text = " ".join(filter(None, [previous, *(f"The user said: {t}." for t in said)]))
    return " ".join(text.split()[:words])
