"""The actions behind the chat app's key bindings (the bindings themselves are CareChatApp.BINDINGS): stop,
help, new chat, domain, history, model, quit; and which of them the current screen allows.

`ChatActions` is a mixin of care.tui.app.CareChatApp: it uses the app's store, session, engine,
engine_loader, chat_id, domain, auto_domain, model_folders and update_status(), care.tui.conversation's
show_chat() and clear_conversation(), care.tui.loading's start_load(), and care.tui.turns' stop_and_save().
"""

from __future__ import annotations

from pathlib import Path

from care.domains import system_prompt
from care.tui.screens import (
    ChatDeleted,
    DomainScreen,
    HelpScreen,
    HistoryScreen,
    ModelScreen,
    local_gguf_files,
)
from care.tui.widgets import NoteMessage


class ChatActions:
    MAIN_ONLY = frozenset({"history", "domain", "model", "new_chat", "stop", "ask_anyway"})

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Chat actions only from the chat screen (not from the history or a dialog), and hidden there;
        "Ask anyway" only right after a flagged turn."""
        if action == "ask_anyway" and not (self.flagged_turn and not self.generating):
            return False
        return not (action in self.MAIN_ONLY and len(self.screen_stack) > 1)

    def action_stop(self) -> None:
        if self.generating and self.session is not None:
            self.session.cancel()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_new_chat(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc).", timeout=3)
            return
        self.clear_conversation()
        self.chat_id = None
        self.domain = "auto" if self.auto_domain else self.domain
        if self.session is not None:
            self.session.reset(auto=self.auto_domain)
        self.update_status()

    def action_domain(self) -> None:
        def chosen(domain: str | None) -> None:
            if domain and domain != self.domain:
                self.set_domain(domain)

        self.push_screen(DomainScreen(self.domain), chosen)

    def set_domain(self, domain: str) -> None:
        self.domain = domain
        self.auto_domain = False  # the user chose
        if self.session is not None:
            self.session.domain = domain
        note = f"Domain: {domain}. {system_prompt(domain)}"
        if self.chat_id is not None:
            self.store.set_domain(self.chat_id, domain)
            self.store.add_message(self.chat_id, "note", note)
        self.mount_block(NoteMessage(note))
        self.update_status()

    def action_history(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc).", timeout=3)
            return
        from care.paths import data_dir

        def chosen(chat_id: int | None) -> None:
            if chat_id is not None:
                self.show_chat(chat_id)
                self.update_status()

        self.push_screen(HistoryScreen(self.store, data_dir() / "exports"), chosen)

    def on_chat_deleted(self, event: ChatDeleted) -> None:
        if event.chat_id == self.chat_id:
            self.action_new_chat()

    def action_model(self) -> None:
        if self.generating or self.loading:
            self.notify("Wait until the model is idle.", timeout=3)
            return
        if self.engine_loader is None:
            self.notify("This session cannot change the model.", timeout=3)
            return
        folders = self.model_folders
        if folders is None:
            from care.paths import data_dir

            folders = [Path.cwd(), Path.cwd() / "exports", data_dir() / "models"]

        def chosen(spec: str | None) -> None:
            if spec:
                self.start_load(spec)

        current = str(getattr(self.engine, "path", ""))
        self.push_screen(ModelScreen(self.store.recent_models(), local_gguf_files(folders), current), chosen)

    async def action_quit(self) -> None:
        self.stop_and_save()
        self.exit(0)
