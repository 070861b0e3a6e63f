"""`care chat`: the Textual terminal chat app for offline clinics.

The window shows at once; the model loads in a thread worker behind a progress line. Replies are
generated in a thread worker that posts each chunk to the UI as a message (thread-safe, in order), so typing, Esc
and the status bar stay live. Every message is written to SQLite (care.tui.store) as it completes, and
a reply in progress is flushed while it streams, so a crash or Ctrl-C loses nothing.

`create_app(...)` builds the app for the CLI and the tests alike (tests pass a fake engine).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Footer, ProgressBar, Static

from care.domains import DOMAINS, system_prompt
from care.errors import CareError
from care.runtime.loader import engine_config_from_args, load_engine, parse_languages
from care.tui.screens import (
    EMBEDDED,
    ChatDeleted,
    DomainScreen,
    HelpScreen,
    HistoryScreen,
    ModelScreen,
    local_gguf_files,
)
from care.tui.store import ChatStore
from care.tui.widgets import (
    AssistantMessage,
    CardMessage,
    ChatInput,
    ErrorMessage,
    NoteMessage,
    SafetyMessage,
    StatusBar,
    UserMessage,
)

log = logging.getLogger(__name__)

WELCOME = ("Ask a question below and press Enter. Everything stays on this computer.\n"
           "F1 keys · F2 history · F3 domain · F4 model · Esc stops a reply")

EngineLoader = Callable[[str | None], Any]  # model spec (None: the default) -> a loaded engine


def make_session(engine: Any, domain: str, system: str | None, sampling: Any = None,
                 languages: tuple[str, ...] | None = None) -> Any:
    from care.runtime.session import ChatSession

    return ChatSession(engine, domain=domain, system=system, sampling=sampling, languages=languages)


def _kind(item: Any) -> str:
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


class CareChatApp(App[int]):
    CSS_PATH = "care.tcss"
    TITLE = "CARE Edge"
    ENABLE_COMMAND_PALETTE = False

    BINDINGS = [
        Binding("escape", "stop", "Stop", show=False),
        Binding("f1", "help", "Help"),
        Binding("f2,ctrl+o", "history", "History"),
        Binding("f3,ctrl+t", "domain", "Domain"),
        Binding("f4,ctrl+l", "model", "Model"),
        Binding("ctrl+n", "new_chat", "New"),
        # After a flagged turn (notice + first-aid card), the model's own reply, labelled and checked.
        Binding("f5", "ask_anyway", "Ask anyway"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
        # Ctrl+C quits too (after saving), as a clinic worker expects; Textual would only show a hint.
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self,
        *,
        engine: Any = None,
        engine_loader: EngineLoader | None = None,
        model: str | None = None,
        store: ChatStore | None = None,
        domain: str = "general",
        system: str | None = None,
        sampling: Any = None,
        languages: tuple[str, ...] | None = None,
        resume: bool = True,
        flush_interval_s: float = 0.5,
        model_folders: list[Path] | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.engine_loader = engine_loader
        self.model_spec = model
        self.store = store if store is not None else ChatStore()
        # "auto": the session picks the domain from the first message; then it is shown and saved.
        self.domain = domain if domain in (*DOMAINS, "auto") else "general"
        self._auto_domain = self.domain == "auto"  # Ctrl+N detects the new chat's domain again
        self.languages = languages
        self.system = system
        self.sampling = sampling
        self.resume = resume
        self.flush_interval_s = flush_interval_s
        self.model_folders = model_folders
        self.flagged_turn = False  # the last turn was answered with a first-aid card (F5 asks anyway)
        self.session: Any = None
        self.chat_id: int | None = None
        self.generating = False
        self.last_tokens_per_s: float | None = None
        self.load_error: str | None = None
        self.loading = False
        self._queued: str | None = None  # a message sent while the model was loading
        self._reply_id: int | None = None
        self._reply_parts: list[str] = []
        self._reply_widget: AssistantMessage | None = None
        self._stream: Any = None
        self._last_flush = 0.0
        self._finish_reason: str | None = None
        self._following = True

    # -- layout ------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusBar(id="status")
        with VerticalScroll(id="conversation"):
            yield Static(WELCOME, id="welcome", markup=False)
            yield Static("", id="loading")
            yield ProgressBar(total=None, show_eta=False, show_percentage=False, id="load-progress")
        yield ChatInput(id="input", placeholder="Type a message · Enter send · Shift+Enter / Ctrl+J new line")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#input", ChatInput).focus()
        # Re-check following whenever the text grows (Markdown lays out after our handlers return).
        self.watch(self.conversation, "virtual_size", lambda _size: self._follow(), init=False)
        self.watch(self.conversation, "scroll_y", self._scrolled, init=False)
        if self.resume:
            last = self.store.last_chat_id()
            if last is not None:
                self._show_chat(last)
        if self.engine is not None:
            self._engine_ready(self.engine, self.model_spec, restore=True)
        elif self.engine_loader is not None:
            self._start_load(self.model_spec)
        self.update_status()

    # -- status ------------------------------------------------------------------------------------
    def update_status(self) -> None:
        engine = self.engine
        if engine is None:
            model, quant, n_ctx = ("loading…" if self.loading else "no model"), "", 0
        else:
            model, quant, n_ctx = engine.model_name, engine.quant_type, engine.n_ctx
            names = getattr(engine, "adapter_names", ())
            if names:  # --adapters: the LoRA adapter the current domain uses (the domain picker switches it)
                domain = self.session.domain if self.session is not None else self.domain
                model = f"{model}+{domain if domain in names else 'base'}"
        used = self.session.context_used() if self.session is not None else 0
        state = "writing… Esc stops" if self.generating else "offline"
        self.query_one("#status", StatusBar).show(model=model, quant=quant, domain=self.domain, used=used,
                                                  n_ctx=n_ctx, tokens_per_s=self.last_tokens_per_s,
                                                  state=state)

    # -- model loading -----------------------------------------------------------------------------
    def _start_load(self, spec: str | None) -> None:
        self.loading = True
        label = "the embedded SmolLM2-135M-Instruct" if spec in (None, EMBEDDED) else spec
        self.query_one("#loading", Static).update(f"Loading {label} … you can type meanwhile.")
        self.query_one("#loading").display = True
        self.query_one("#load-progress").display = True
        self.update_status()
        self._load_worker(spec)

    @work(thread=True, exclusive=True, group="load")
    def _load_worker(self, spec: str | None) -> None:
        assert self.engine_loader is not None
        try:
            engine = self.engine_loader(None if spec == EMBEDDED else spec)
        except CareError as exc:
            self.call_from_thread(self._load_failed, exc.one_line())
            return
        except Exception as exc:  # llama.cpp can raise anything on a damaged file; the app must live on
            log.exception("model load failed")
            self.call_from_thread(self._load_failed, f"Could not load the model: {exc}")
            return
        self.call_from_thread(self._engine_ready, engine, spec, False)

    def _hide_loading(self) -> None:
        self.loading = False
        self.query_one("#loading").display = False
        self.query_one("#load-progress").display = False

    def _engine_ready(self, engine: Any, spec: str | None, restore: bool) -> None:
        old = self.engine
        self.engine = engine
        self.load_error = None
        self._hide_loading()
        if old is not None and old is not engine:
            old.close()
        self.session = make_session(engine, self.domain, self.system, self.sampling, self.languages)
        if self.chat_id is not None:
            self.session.load_messages(self.store.conversation(self.chat_id))
        path = getattr(engine, "path", None)
        if path is not None:
            self.store.touch_model(str(path))
        if self.chat_id is not None:
            self.store.set_model(self.chat_id, engine.model_name)
        load_s = getattr(engine, "load_s", None)
        if old is not None and old is not engine and load_s is not None:
            # Only on a switch from the picker: at start the status bar already says which model is up.
            self.notify(f"{engine.model_name} loaded in {load_s:.1f} s", timeout=3)
        self.update_status()
        queued, self._queued = self._queued, None
        if queued:
            self.on_chat_input_submitted(ChatInput.Submitted(queued))

    def _load_failed(self, message: str) -> None:
        self._hide_loading()
        self.load_error = message
        self._mount_block(ErrorMessage(message + "\nPress F4 to choose another model; the app stays usable."))
        self.notify("See the message above. F4 chooses another model.", title="Model not loaded",
                    severity="error", timeout=8)
        self.update_status()

    # -- conversation view -------------------------------------------------------------------------
    @property
    def conversation(self) -> VerticalScroll:
        return self.query_one("#conversation", VerticalScroll)

    def _mount_block(self, widget: Any) -> None:
        self.query_one("#welcome").display = False
        self.conversation.mount(widget)
        self._following = True  # a new message brings the view back to the end
        self.call_after_refresh(self._follow)

    # Follow the end of the conversation while it grows, unless the user scrolled up to read. (Not
    # Widget.anchor(): it bottom-aligns content shorter than the view, and its timing made snapshots flaky.)
    def _follow(self) -> None:
        if self._following:
            self.conversation.scroll_end(animate=False, immediate=True)

    def _scrolled(self, _y: float) -> None:
        view = self.conversation
        self._following = view.scroll_y >= view.max_scroll_y - 1

    def _clear_conversation(self) -> None:
        for child in list(self.conversation.children):
            if child.id not in ("welcome", "loading", "load-progress"):
                child.remove()
        self.query_one("#welcome").display = True

    def _show_chat(self, chat_id: int) -> None:
        chat = self.store.get_chat(chat_id)
        if chat is None:
            return
        self._clear_conversation()
        self.chat_id = chat_id
        if chat.domain in DOMAINS:
            self.domain = chat.domain
        for m in self.store.messages(chat_id):
            if m.role == "user":
                self._mount_block(UserMessage(m.content))
            elif m.role == "assistant":
                self._mount_block(AssistantMessage(m.content))
                if m.finish_reason == "cancelled":
                    self._mount_block(NoteMessage("Reply stopped."))
                elif not m.complete:
                    self._mount_block(NoteMessage("Reply interrupted (the app closed); the part above was saved."))
            elif m.role == "safety":
                category, _, text = m.content.partition("\n")
                self._mount_block(SafetyMessage(text, category))
            elif m.role == "card":
                self._mount_block(CardMessage(m.content))
            elif m.role == "note":
                self._mount_block(NoteMessage(m.content))
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

    # -- sending -----------------------------------------------------------------------------------
    def on_chat_input_submitted(self, event: ChatInput.Submitted) -> None:
        if self.generating:
            self.notify("Wait for the reply, or press Esc to stop it.", timeout=3)
            return
        if self.session is None and self.loading and event.text.strip():
            # Sent as soon as the model is in: on a slow phone an emergency typed during the load is not lost.
            self._queued = event.text
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
        self._mount_block(UserMessage(text))
        self.generating = True
        self._reply_id = None
        self._reply_parts = []
        self._reply_widget = None
        self._finish_reason = None
        self.flagged_turn = False
        self.refresh_bindings()
        self.update_status()
        self._generate(text)

    def action_ask_anyway(self) -> None:
        """The model's own reply to the last (flagged) message, under its label."""
        if self.generating or self.session is None or not self.flagged_turn:
            self.notify("Ask anyway is for the last message, after an emergency notice and first aid.", timeout=4)
            return
        self.flagged_turn = False
        self.refresh_bindings()
        self.generating = True
        self._reply_id = None
        self._reply_parts = []
        self._reply_widget = None
        self._finish_reason = None
        self.update_status()
        self._generate(None)

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, text: str | None) -> None:
        # post_message rather than call_from_thread: call_from_thread waits for the UI to handle each chunk,
        # so a slow Markdown re-layout (long lists) would stall llama.cpp itself. Messages queue in order and
        # the Markdown stream merges whatever piled up into one update.
        try:
            events = self.session.send(text) if text is not None else self.session.answer_anyway()
            for item in events:
                self.post_message(GenEvent(_kind(item), item))
        except CareError as exc:
            self.post_message(GenEvent("error", exc.one_line()))
        except Exception as exc:
            log.exception("generation failed")
            self.post_message(GenEvent("error", f"Generation failed: {exc}"))
        finally:
            self.post_message(GenEvent("done", None))

    async def on_gen_event(self, event: GenEvent) -> None:
        if event.kind == "safety":
            self._on_safety(event.item)
        elif event.kind == "card":
            self._on_card(event.item)
        elif event.kind == "anyway":
            self._on_note(event.item.text.strip(), "unvetted")
        elif event.kind == "context":
            self._on_context(event.item)
        elif event.kind == "chunk":
            await self._on_chunk(event.item)
        elif event.kind == "error":
            self._on_error(event.item)
        elif event.kind == "done":
            await self._on_done()

    def _on_safety(self, notice: Any) -> None:
        if self.chat_id is not None:
            self.store.add_message(self.chat_id, "safety", f"{notice.category}\n{notice.message}")
        self._mount_block(SafetyMessage(notice.message, notice.category))

    def _on_card(self, card: Any) -> None:
        if self.chat_id is not None:
            self.store.add_message(self.chat_id, "card", card.text)
        self._mount_block(CardMessage(card.text))
        self.flagged_turn = True
        self.refresh_bindings()
        self.notify("First aid shown. F5: ask the assistant anyway (its reply is not vetted).", timeout=6)

    def _on_context(self, note: Any) -> None:
        text = note.message
        if getattr(note, "summary", None):
            text += f"\nWhat the model keeps of them: {note.summary}"
        self._on_note(text)

    def _on_note(self, text: str, classes: str = "") -> None:
        if self.chat_id is not None:  # saved with the chat, so a reopened conversation shows it too
            self.store.add_message(self.chat_id, "note", text)
        note = NoteMessage(text)
        if classes:
            note.add_class(classes)
        self._mount_block(note)

    async def _on_chunk(self, chunk: Any) -> None:
        if self._reply_widget is None and chunk.text:  # no empty box for a reply stopped before its first word
            self._reply_widget = AssistantMessage("")
            self._mount_block(self._reply_widget)
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
        self._mount_block(ErrorMessage(message))

    async def _on_done(self) -> None:
        if self._reply_id is not None and self._finish_reason is None:
            # The worker ended without a final chunk (error or quit): keep what was shown.
            self._finish_reason = "cancelled"
            self._save_reply(complete=True)
        if self._stream is not None:
            await self._stream.stop()  # waits for the last Markdown fragment to be laid out
            self._stream = None
        if self._finish_reason == "cancelled":
            self._mount_block(NoteMessage("Reply stopped."))
        elif self._finish_reason == "length":
            self._mount_block(NoteMessage("Reply cut at the token limit (--max-tokens)."))
        self.generating = False
        if self.domain == "auto" and self.session is not None:
            self.domain = self.session.domain
            if self.chat_id is not None:
                self.store.set_domain(self.chat_id, self.domain)
        self.update_status()

    # -- actions -----------------------------------------------------------------------------------
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
        self._clear_conversation()
        self.chat_id = None
        self.domain = "auto" if self._auto_domain else self.domain
        if self.session is not None:
            self.session.reset(auto=self._auto_domain)
        self.update_status()

    def action_domain(self) -> None:
        def chosen(domain: str | None) -> None:
            if domain and domain != self.domain:
                self.set_domain(domain)

        self.push_screen(DomainScreen(self.domain), chosen)

    def set_domain(self, domain: str) -> None:
        self.domain = domain
        self._auto_domain = False  # the user chose
        if self.session is not None:
            self.session.domain = domain
        note = f"Domain: {domain}. {system_prompt(domain)}"
        if self.chat_id is not None:
            self.store.set_domain(self.chat_id, domain)
            self.store.add_message(self.chat_id, "note", note)
        self._mount_block(NoteMessage(note))
        self.update_status()

    def action_history(self) -> None:
        if self.generating:
            self.notify("Stop the reply first (Esc).", timeout=3)
            return
        from care.paths import data_dir

        def chosen(chat_id: int | None) -> None:
            if chat_id is not None:
                self._show_chat(chat_id)
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
                self._start_load(spec)

        current = str(getattr(self.engine, "path", ""))
        self.push_screen(ModelScreen(self.store.recent_models(), local_gguf_files(folders), current), chosen)

    async def action_quit(self) -> None:
        self._stop_and_save()
        self.exit(0)

    def _stop_and_save(self) -> None:
        if self.generating and self.session is not None:
            self.session.cancel()
            self._finish_reason = self._finish_reason or "cancelled"
            self._save_reply(complete=True)

    def on_unmount(self) -> None:
        self._stop_and_save()


def create_app(
    engine: Any = None,
    *,
    engine_loader: EngineLoader | None = None,
    model: str | None = None,
    store: ChatStore | None = None,
    db_path: str | Path | None = None,
    domain: str = "general",
    system: str | None = None,
    sampling: Any = None,
    languages: tuple[str, ...] | None = None,
    resume: bool = True,
    flush_interval_s: float = 0.5,
    model_folders: list[Path] | None = None,
) -> CareChatApp:
    """The chat app over a loaded `engine`, or one `engine_loader(model)` loads in a thread after start."""
    if store is None:
        store = ChatStore(db_path)
    return CareChatApp(engine=engine, engine_loader=engine_loader, model=model, store=store, domain=domain,
                       system=system, sampling=sampling, languages=languages, resume=resume,
                       flush_interval_s=flush_interval_s,
                       model_folders=model_folders)


def loader_from_args(args: argparse.Namespace) -> EngineLoader:
    """Load engines with the command line's --n-ctx/--threads/sampling options (runs in a worker thread)."""

    def load(spec: str | None) -> Any:
        return load_engine(spec, engine_config_from_args(args))

    return load


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of `care chat` without --once."""
    domain = getattr(args, "domain", None) or "auto"
    app = create_app(engine_loader=loader_from_args(args), model=getattr(args, "model", None),
                     domain=domain, system=getattr(args, "system", None),
                     languages=parse_languages(getattr(args, "lang", None)))
    try:
        code = app.run()
    finally:
        if app.engine is not None:
            app.engine.close()
        app.store.close()
    return int(code or 0)
