"""Triage notices in the chat app: the red-flag notice, the first-aid card, the label of an unvetted reply and
the context notes, each saved with the chat as it is shown (so a reopened conversation shows it too).

A notice is saved as a "safety" message whose content is its category, a newline, then its text:
`safety_row` writes that and `safety_block` reads it back into the widget.

`TriageNotices` is a mixin of care.tui.app.CareChatApp: it uses the app's store and chat_id, and
care.tui.conversation's mount_block().
"""

from __future__ import annotations

from typing import Any

from care.tui.widgets import CardMessage, NoteMessage, SafetyMessage


def safety_row(category: str, message: str) -> str:
    """The stored content of a red-flag notice."""
    return f"{category}\n{message}"


def safety_block(content: str) -> SafetyMessage:
    """The widget of a stored red-flag notice (`safety_row`'s content)."""
    category, _, text = content.partition("\n")
    return SafetyMessage(text, category)


class TriageNotices:
    def show_safety(self, notice: Any) -> None:
        if self.chat_id is not None:
            self.store.add_message(self.chat_id, "safety", safety_row(notice.category, notice.message))
        self.mount_block(SafetyMessage(notice.message, notice.category))

    def show_card(self, card: Any) -> None:
        if self.chat_id is not None:
            self.store.add_message(self.chat_id, "card", card.text)
        self.mount_block(CardMessage(card.text))
        self.flagged_turn = True
        self.refresh_bindings()
        self.notify("First aid shown. F5: ask the assistant anyway (its reply is not vetted).", timeout=6)

    def show_context(self, note: Any) -> None:
        text = note.message
        if getattr(note, "summary", None):
            text += f"\nWhat the model keeps of them: {note.summary}"
        self.show_note(text)

    def show_note(self, text: str, classes: str = "") -> None:
        if self.chat_id is not None:  # saved with the chat, so a reopened conversation shows it too
            self.store.add_message(self.chat_id, "note", text)
        note = NoteMessage(text)
        if classes:
            note.add_class(classes)
        self.mount_block(note)
