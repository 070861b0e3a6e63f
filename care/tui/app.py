"""`care chat`: the Textual terminal chat app for offline clinics.

The window shows at once; the model loads in a thread worker behind a progress line. Replies are
generated in a thread worker that posts each chunk to the UI as a message (thread-safe, in order), so typing, Esc
and the status bar stay live. Every message is written to SQLite (care.tui.store) as it completes, and
a reply in progress is flushed while it streams, so a crash or Ctrl-C loses nothing.

`create_app(...)` builds the app for the CLI and the tests alike (tests pass a fake engine).

`CareChatApp` is one Textual app put together from mixins, one concern each (Textual finds message handlers,
actions and workers along the class's MRO): care.tui.loading (the model load worker), care.tui.conversation
(the message view), care.tui.notices (triage notices, saved and shown), care.tui.turns (sending and the reply
worker) and care.tui.actions (what the keys do). This module keeps the bindings (Textual reads BINDINGS from
App classes only), the layout, the status bar and the shared state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer, ProgressBar, Static

from care.domains import DOMAINS
from care.runtime.loader import EngineOptions, engine_config, load_engine
from care.tui.actions import ChatActions
from care.tui.conversation import ConversationView
from care.tui.loading import ModelLoading
from care.tui.notices import TriageNotices
from care.tui.store import ChatStore
from care.tui.turns import ChatTurns
from care.tui.widgets import ChatInput, StatusBar

WELCOME = ("Ask a question below and press Enter. Everything stays on this computer.\n"
           "F1 keys · F2 history · F3 domain · F4 model · Esc stops a reply")

EngineLoader = Callable[[str | None], Any]  # model spec (None: the default) -> a loaded engine


class CareChatApp(ChatActions, ChatTurns, TriageNotices, ConversationView, ModelLoading, App[int]):
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
        super().__init__()  # App, and each mixin's own state
        self.engine = engine
        self.engine_loader = engine_loader
        self.model_spec = model
        self.store = store if store is not None else ChatStore()
        # "auto": the session picks the domain from the first message; then it is shown and saved.
        self.domain = domain if domain in (*DOMAINS, "auto") else "general"
        self.auto_domain = self.domain == "auto"  # Ctrl+N detects the new chat's domain again
        self.languages = languages
        self.system = system
        self.sampling = sampling
        self.resume = resume
        self.flush_interval_s = flush_interval_s
        self.model_folders = model_folders
        self.session: Any = None
        self.chat_id: int | None = None

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
        self.start_following()
        if self.resume:
            last = self.store.last_chat_id()
            if last is not None:
                self.show_chat(last)
        if self.engine is not None:
            self.engine_ready(self.engine, self.model_spec, restore=True)
        elif self.engine_loader is not None:
            self.start_load(self.model_spec)
        self.update_status()

    def on_unmount(self) -> None:
        self.stop_and_save()

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


def loader_for(options: EngineOptions) -> EngineLoader:
    """Load engines with `options`' device, context and sampling settings (runs in a worker thread); the
    spec it is called with (the options' model, or one picked with F4) is the model."""

    def load(spec: str | None) -> Any:
        return load_engine(spec, engine_config(options))

    return load


def run_app(options: EngineOptions, *, domain: str = "auto", system: str | None = None,
            languages: tuple[str, ...] | None = None) -> int:
    """Run the chat app until it quits, loading `options.model` with `options` (care.commands.chat builds them
    from the command line); the exit code."""
    app = create_app(engine_loader=loader_for(options), model=options.model, domain=domain or "auto",
                     system=system, languages=languages)
    try:
        code = app.run()
    finally:
        if app.engine is not None:
            app.engine.close()
        app.store.close()
    return int(code or 0)
