"""Widgets of the chat screen: the input box, the status bar and the message blocks."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import Markdown, Static, TextArea


class ChatInput(TextArea):
    """Multi-line input: Enter sends, Shift+Enter or Ctrl+J inserts a newline."""

    @dataclass
    class Submitted(Message):
        text: str

    @dataclass
    class ScrollConversation(Message):
        """PageUp/PageDown/Ctrl+End pressed in the input: move the conversation, keep typing here."""

        where: str  # "page_up", "page_down" or "end"

    # The input is a few lines tall, so paging inside it is useless; the conversation is what one reads back.
    SCROLL_KEYS = {"pageup": "page_up", "pagedown": "page_down", "ctrl+end": "end"}

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            text = self.text
            if text.strip():
                self.post_message(self.Submitted(text))
            return
        if event.key in self.SCROLL_KEYS:
            event.stop()
            event.prevent_default()
            self.post_message(self.ScrollConversation(self.SCROLL_KEYS[event.key]))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            # Terminals send Ctrl+J for a newline; Shift+Enter arrives where the terminal reports it.
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


class StatusBar(Static):
    """One line: model, quant, domain, context used, speed of the last reply, offline."""

    def show(self, *, model: str, quant: str, domain: str, used: int, n_ctx: int,
             tokens_per_s: float | None, state: str) -> None:
        speed = f"{tokens_per_s:.1f} tok/s" if tokens_per_s else "– tok/s"
        ctx = f"ctx {used}/{n_ctx}" if n_ctx else "ctx –"
        rest = f" {quant} │ {domain} │ {ctx} │ {speed} │ {state}"
        # The model name gives way first so the state always fits (80 columns over SSH).
        room = max(8, (self.size.width or 80) - len(rest) - 2)
        name = model if len(model) <= room else model[: room - 1] + "…"
        self.update(f" {name}{rest}")

    def on_resize(self) -> None:
        self.app.call_later(getattr(self.app, "update_status", lambda: None))


class UserMessage(Static):
    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False, classes="user")
        self.border_title = "You"


class AssistantMessage(Markdown):
    """A reply, streamed as Markdown."""

    def __init__(self, text: str = "", label: str = "CARE") -> None:
        super().__init__(text, classes="assistant")
        self.border_title = label


class SafetyMessage(Static):
    """A red-flag notice from the runtime's safety rules, shown before the model's reply."""

    def __init__(self, text: str, category: str = "") -> None:
        super().__init__(text, markup=False, classes="safety")
        self.border_title = f"⚠ Safety: {category}" if category else "⚠ Safety"


class CardMessage(Static):
    """The vetted first-aid card of a flagged turn, right after the notice (care/data/safety/cards.yaml)."""

    def __init__(self, text: str) -> None:
        title, _, steps = text.partition("\n")
        super().__init__(steps or title, markup=False, classes="card")
        self.border_title = f"✚ {title.rstrip(':')}" if steps else "✚ First aid"


class NoteMessage(Static):
    """Small grey lines: domain changed, older turns dropped, reply stopped."""

    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False, classes="note")


class ErrorMessage(Static):
    def __init__(self, text: str) -> None:
        super().__init__(text, markup=False, classes="error")
        self.border_title = "Error"
