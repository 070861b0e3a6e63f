"""Rolling summaries of the turns that no longer fit the context (`context="summarize"` of a ChatSession).

The oldest turns are folded into a summary that the model writes and that rides in the system prompt.
Summaries are cached by (model, conversation prefix), so the server, which gets the whole history with
every request and builds a new session for it, does not summarise the same turns again each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence

from care.errors import GenerationError
from care.runtime.backend import ChatBackend, Message, SamplingConfig, collect

log = logging.getLogger(__name__)

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



def clear_cache() -> None:
    """Forget every cached summary (tests; a server never needs it)."""
    with _SUMMARY_CACHE_LOCK:
        _SUMMARY_CACHE.clear()


class Summarizer:
    """The rolling summary of one conversation: `summary` covers its first `covered` non-system messages."""

    def __init__(self, engine: ChatBackend, summary_tokens: int, cancelled: threading.Event) -> None:
        self.engine = engine
        self.summary_tokens = summary_tokens
        self.cancelled = cancelled
        self.forget()

    def forget(self) -> None:
        self.summary: str | None = None
        self.covered = 0
        self.key = ""  # prefix_keys() of those messages, to notice a history changed under us

    def fit(self, history: list[Message], max_tokens: int,
                    fallback: tuple[list[Message], int]) -> tuple[list[Message], int, str | None]:
        """Fit `history` by folding its oldest turns into the rolling summary.

        Returns (messages for the model, number of messages summarised, summary). The summary rides in the
        system message; when the summary and the newest turn cannot fit together, it falls back to dropping."""
        system = history[0] if history and history[0]["role"] == "system" else None
        rest = history[1:] if system else list(history)
        keys = prefix_keys(getattr(self.engine, "path", ""), rest)
        if self.covered > len(rest) or keys[self.covered] != self.key:
            self.forget()  # the history changed under us
        summary, covered = self.summary, self.covered
        try:
            while True:
                messages = [*with_summary(system, summary), *rest[covered:]]
                kept, _, more = self.engine.fit(messages, max_tokens)
                if more == 0:
                    break
                # fit() keeps the system message, so what it left out are the oldest turns not yet summarised.
                # Leave room for the new summary at its longest, so that one model call is usually enough.
                try:
                    reserve = with_summary(system, "x " * self.summary_tokens)
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
                    if self.cancelled.is_set():
                        return fallback[0], fallback[1], None
                    covered = target
                    with _SUMMARY_CACHE_LOCK:
                        _SUMMARY_CACHE[keys[covered]] = summary
                        while len(_SUMMARY_CACHE) > _SUMMARY_CACHE_SIZE:
                            _SUMMARY_CACHE.popitem(last=False)
        except GenerationError as exc:
            log.warning("the summary and the newest message do not fit together (%s); dropping instead", exc)
            self.forget()
            return fallback[0], fallback[1], None
        self.summary, self.covered, self.key = summary, covered, keys[covered]
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
            return previous or digest(turns, words)
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
        return text or digest(turns, words, previous)


def with_summary(system: Message | None, summary: str | None) -> list[Message]:
    if not summary:
        return [system] if system else []
    head = (system["content"] + "\n\n") if system else ""
    return [{"role": "system", "content": f"{head}{SUMMARY_HEADER}\n{summary}"}]


def prefix_keys(model: object, messages: Sequence[Message]) -> list[str]:
    """keys[n] identifies (model, messages[:n]); a chained hash, so all of them cost one pass."""
    h = hashlib.sha256(str(model).encode("utf-8"))
    keys = [h.hexdigest()]
    for m in messages:
        h.update(json.dumps([m["role"], m["content"]], ensure_ascii=False).encode("utf-8"))
        keys.append(h.copy().hexdigest())
    return keys


def digest(turns: Sequence[Message], words: int, previous: str | None = None) -> str:
    """A summary without the model: the user's own words, shortened (used when the model writes nothing)."""
    said = [" ".join(m["content"].split()[:24]) for m in turns if m["role"] == "user" and m["content"].strip()]
    text = " ".join(filter(None, [previous, *(f"The user said: {t}." for t in said)]))
    return " ".join(text.split()[:words])
