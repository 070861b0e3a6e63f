"""The conversation view of the chat app: message blocks, following the end, scrolling, and a saved chat shown
again.

The view follows the end of the conversation while it grows, unless the user scrolled up to read. (Not
Widget.anchor(): it bottom-aligns content shorter than the view, and its timing made snapshots flaky.)

`ConversationView` is a mixin of care.tui.app.CareChatApp: it uses the app's store, session, chat_id and domain.
"""

from __future__ import annotations

from typing import Any

from textual.containers import VerticalScroll

from care.domains import DOMAINS
from care.tui.notices import safety_block
from care.tui.widgets import AssistantMessage, CardMessage, ChatInput, NoteMessage, UserMessage

# The children of #conversation that stay when a chat is cleared.
FIXED_BLOCKS = ("welcome", "loading", "load-progress")


class ConversationView:
    def __init__(self) -> None:
        super().__init__()
        self._following = True

    @property
    def conversation(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    def start_following(self) -> None:
        """Re-check following whenever the text grows (Markdown lays out after our handlers return)."""
        self.watch(self.conversation, "virtual_size", lambda _size: self._follow(), init=False)
        self.watch(self.conversation, "scroll_y", self._scrolled, init=False)

    def mount_block(self, widget: Any) -> None:
        self.query_one("#welcome").display = False
        self.conversation.mount(widget)
        self._following = True  # a new message brings the view back to the end
        self.call_after_refresh(self._follow)

    def _follow(self) -> None:
        if self._following:
            self.conversation.scroll_end(animate=False, immediate=True)

    def _scrolled(self, _y: float) -> None:
        view = self.conversation
        self._following = view.scroll_y >= view.max_scroll_y - 1

    def clear_conversation(self) -> None:
        for child in list(self.conversation.children):
            if child.id not in FIXED_BLOCKS:
                child.remove()
        self.query_one("#welcome").display = True

    def show_chat(self, chat_id: int) -> None:
        chat = self.store.get_chat(chat_id)
        if chat is None:
            return
        self.clear_conversation()
        self.chat_id = chat_id
        if chat.domain in DOMAINS:
            self.domain = chat.domain
        for m in self.store.messages(chat_id):
            if m.role == "user":
                self.mount_block(UserMessage(m.content))
            elif m.role == "assistant":
                self.mount_block(AssistantMessage(m.content))
                if m.finish_reason == "cancelled":
                    self.mount_block(NoteMessage("Reply stopped."))
                elif not m.complete:
                    self.mount_block(NoteMessage("Reply interrupted (the app closed); the part above was saved."))
            elif m.role == "safety":
                self.mount_block(safety_block(m.content))
            elif m.role == "card":
                self.mount_block(CardMessage(m.content))
            elif m.role == "note":
                self.mount_block(NoteMessage(m.content))
        if self.session is not None:
            # The setter also drops a --system prompt: only on a real change.
            if self.domain in DOMAINS and self.session.domain != self.domain:
                self.session.domain = self.domain
            self.session.load_messages(self.store.conversation(chat_id))

    def on_chat_input_scroll_conversation(self, event: ChatInput.ScrollConversation) -> None:
        view = self.conversation
        if event.where == "page_up":
            view.scroll_page_up(animate=False)
        elif event.where == "page_down":
            view.scroll_page_down(animate=False)
        else:
            self._following = True
            view.scroll_end(animate=False)
