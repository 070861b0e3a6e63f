"""Chat turns in the app: sending a message, the generation worker, and the reply as it streams.

Replies are generated in a thread worker that posts each chunk to the UI as a message (thread-safe, in order),
so typing, Esc and the status bar stay live. The reply is saved to SQLite while it streams (every
flush_interval_s) and once more when it ends, so a crash or Ctrl-C loses nothing.

`ChatTurns` is a mixin of care.tui.app.CareChatApp: it uses the app's store, session, engine, chat_id, domain,
flush_interval_s and update_status(), care.tui.conversation's mount_block(), care.tui.loading's loading and
queue_message(), and care.tui.notices' show_*() for what the triage layer yields.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from textual import work
from textual.message import Message

from care.errors import CareError
from care.tui.widgets import AssistantMessage, ChatInput, ErrorMessage, NoteMessage, UserMessage

log = logging.getLogger(__name__)


def event_kind(item: Any) -> str:
    """What the session yielded: a red-flag notice, a first-aid card, the label of an unvetted reply, a context
    note or a streamed chunk."""
    from care.runtime.session import AnywayNote, ContextNote, FirstAidCard, SafetyNotice

    if isinstance(item, SafetyNotice):
        return "safety"
    if isinstance(item, FirstAidCard):
        return "card"
    if isinstance(item, AnywayNote):
        return "anyway"
    if isinstance(item, ContextNote):
        return "context"
    return "chunk"


class GenEvent(Message):
    """Something the generation worker produced: safety, context, chunk, error or done."""

    def __init__(self, kind: str, item: Any) -> None:
        super().__init__()
        self.kind = kind
        self.item = item


class ChatTurns:
    def __init__(self) -> None:
        super().__init__()
        self.flagged_turn = False  # the last turn was answered with a first-aid card (F5 asks anyway)
        self.generating = False
        self.last_tokens_per_s: float | None = None
        self._reply_id: int | None = None
        self._reply_parts: list[str] = []
        self._reply_widget: AssistantMessage | None = None
        self._stream: Any = None
        self._last_flush = 0.0
        self._finish_reason: str | None = None

    def _new_reply(self) -> None:
        self._reply_id = None
        self._reply_parts = []
        self._reply_widget = None
        self._finish_reason = None

    # -- sending -----------------------------------------------------------------------------------
    def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        if self.generating:
            self.notify("Wait for the reply, or press Esc to stop it.", timeout=3)
            return
        if self.session is None and self.loading and event.text.strip():
            # Sent as soon as the model is in: on a slow phone an emergency typed during the load is not lost.
            self.queue_message(event.text)
            self.notify("The model is still loading: your message goes as soon as it is ready.", timeout=4)
            return
        if self.session is None:
            hint = "Press F4 to choose a model." if self.load_error else "The model is still loading."
            self.notify(hint, severity="warning", timeout=4)
            return
        text = event.text.strip()
        self.query_one("#input", ChatInput).clear()
        if self.chat_id is None:
            self.chat_id = self.store.new_chat(self.domain, self.engine.model_name)
        self.store.add_message(self.chat_id, "user", text)
        self.mount_block(UserMessage(text))
        self._start_reply(text)

    def action_ask_anyway(self) -> None:
        """The model's own reply to the last (flagged) message, under its label."""
        if self.generating or self.session is None or not self.flagged_turn:
            self.notify("Ask anyway is for the last message, after an emergency notice and first aid.", timeout=4)
            return
        self._start_reply(None)

    def _start_reply(self, text: str | None) -> None:
        """Generate a reply to `text` (None: to the last, flagged message, asked anyway)."""
        self.flagged_turn = False
        self.refresh_bindings()
        self.generating = True
        self._new_reply()
        self.update_status()
        self._generate(text)

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, text: str | None) -> None:
        # post_message rather than call_from_thread: call_from_thread waits for the UI to handle each chunk,
        # so a slow Markdown re-layout (long lists) would stall llama.cpp itself. Messages queue in order and
        # the Markdown stream merges whatever piled up into one update.
        try:
            events = self.session.send(text) if text is not None else self.session.answer_anyway()
            for item in events:
                self.post_message(GenEvent(event_kind(item), item))
        except CareError as exc:
            self.post_message(GenEvent("error", exc.one_line()))
        except Exception as exc:
            log.exception("generation failed")
            self.post_message(GenEvent("error", f"Generation failed: {exc}"))
        finally:
            self.post_message(GenEvent("done", None))

    # -- what the worker produced ------------------------------------------------------------------
    async def on_gen_event(self, event: GenEvent) -> None:
        if event.kind == "safety":
            self.show_safety(event.item)
        elif event.kind == "card":
            self.show_card(event.item)
        elif event.kind == "anyway":
            self.show_note(event.item.text.strip(), "unvetted")
        elif event.kind == "context":
            self.show_context(event.item)
        elif event.kind == "chunk":
            await self._on_chunk(event.item)
        elif event.kind == "error":
            self._on_error(event.item)
        elif event.kind == "done":
            await self._on_done()

    async def _on_chunk(self, chunk: Any) -> None:
        if self._reply_widget is None and chunk.text:  # no empty box for a reply stopped before its first word
            self._reply_widget = AssistantMessage("")
            self.mount_block(self._reply_widget)
            self._stream = AssistantMessage.get_stream(self._reply_widget)
            if self.chat_id is not None:
                self._reply_id = self.store.add_message(self.chat_id, "assistant", "", complete=False)
        if chunk.text:
            self._reply_parts.append(chunk.text)
            await self._stream.write(chunk.text)
        if chunk.finish_reason:
            self._finish_reason = chunk.finish_reason
            if chunk.tokens_per_s:
                self.last_tokens_per_s = chunk.tokens_per_s
            self._save_reply(complete=True)
        elif time.monotonic() - self._last_flush >= self.flush_interval_s:
            self._save_reply(complete=False)

    def _save_reply(self, complete: bool) -> None:
        self._last_flush = time.monotonic()
        if self._reply_id is not None:
            self.store.update_message(self._reply_id, "".join(self._reply_parts), complete=complete,
                                      finish_reason=self._finish_reason)

    def _on_error(self, message: str) -> None:
        self.mount_block(ErrorMessage(message))

    async def _on_done(self) -> None:
        if self._reply_id is not None and self._finish_reason is None:
            # The worker ended without a final chunk (error or quit): keep what was shown.
            self._finish_reason = "cancelled"
            self._save_reply(complete=True)
        if self._stream is not None:
            await self._stream.stop()  # waits for the last Markdown fragment to be laid out
            self._stream = None
        if self._finish_reason == "cancelled":
            self.mount_block(NoteMessage("Reply stopped."))
        elif self._finish_reason == "length":
            self.mount_block(NoteMessage("Reply cut at the token limit (--max-tokens)."))
        self.generating = False
        if self.domain == "auto" and self.session is not None:
            self.domain = self.session.domain
            if self.chat_id is not None:
                self.store.set_domain(self.chat_id, self.domain)
        self.update_status()

    def stop_and_save(self) -> None:
        """Stop a reply in progress and save what it has (quit, Ctrl-C, unmount)."""
        if self.generating and self.session is not None:
            self.session.cancel()
            self._finish_reason = self._finish_reason or "cancelled"
            self._save_reply(complete=True)
