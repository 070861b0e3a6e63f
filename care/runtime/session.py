"""A conversation over the engine: domain system prompt, red-flag notices, context notes, medical framing.

Front ends (the `--once` CLI, the Textual app, the server) drive a `ChatSession` and render what
`send()` yields, in order: `SafetyNotice`s (before any model text), a `ContextNote` when older turns had
to be left out, then the engine's streamed `GenerationResponse` chunks (the last has finish_reason).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from care.domains import DOMAINS, system_prompt
from care.errors import UsageError
from care.runtime.engine import ChatEngine, GenerationResponse, Message, SamplingConfig
from care.runtime.safety import SafetyNotice, claims_clinician, load_rules

log = logging.getLogger(__name__)

__all__ = ["ChatSession", "ContextNote", "SafetyNotice", "SessionEvent"]


@dataclass
class ContextNote:
    """Older turns were dropped to fit n_ctx."""

    dropped: int
    message: str


SessionEvent = SafetyNotice | ContextNote | GenerationResponse


class ChatSession:
    """One conversation. `messages` holds everything said (system prompt first), for saving/restoring.

    domain="auto" picks the domain from the first user message (care.runtime.domains.detect_domain).
    `languages=None` uses the languages configured in the safety rules (clinic file, else English).
    """

    def __init__(self, engine: ChatEngine, domain: str = "general", system: str | None = None,
                 safety: bool = True, languages: tuple[str, ...] | None = None,
                 sampling: SamplingConfig | None = None) -> None:
        self.engine = engine
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
        # Raises GenerationError (on the first next()) for a message that cannot fit; nothing is recorded.
        kept, _, dropped = self.engine.fit(self._prompt_messages(history), s.max_tokens)
        yield from notices
        if dropped and dropped != self._last_dropped:
            yield ContextNote(dropped, f"{dropped} older message{'s' if dropped != 1 else ''} left out to fit "
                                       f"the {self.engine.n_ctx}-token context.")
        self._last_dropped = dropped
        self.messages.append({"role": "user", "content": text})
        parts: list[str] = []
        last: GenerationResponse | None = None
        stream = self.engine.stream(kept, s)
        try:
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
            stream.close()  # releases the engine's lock now, not when the generator is collected
            # Recorded even when the consumer stops iterating (cancel in a UI, a closed HTTP stream).
            self.messages.append({"role": "assistant", "content": "".join(parts)})

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
        """Prompt tokens of the current history (with the generation prompt)."""
        return len(self.engine.tokenize(self.engine.render(self._prompt_messages(self.messages))))

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

    def reset(self) -> None:
        """A new conversation with the same domain and system prompt."""
        self.messages = self.messages[:1]
        self._last_dropped = 0


def _check_domain(domain: str) -> str:
    name = (domain or "general").lower()
    if name not in DOMAINS:
        raise UsageError(f"Unknown domain '{domain}'", hint=f"Choose one of: {', '.join(DOMAINS)}, auto")
    return name
