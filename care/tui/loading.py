"""Model loading for the chat app: a thread worker behind a progress line, so the window shows at once.

A message sent while the model loads is kept (`queue_message`) and sent as soon as the engine is ready: on a
slow phone an emergency typed during the load is not lost. A failed load leaves the app usable (F4 picks
another model).

`ModelLoading` is a mixin of care.tui.app.CareChatApp: it uses the app's engine, engine_loader, model_spec,
store, session, chat_id, domain, system, sampling and languages, and its update_status().
"""

from __future__ import annotations

import logging
from typing import Any

from textual import work
from textual.widgets import Static

from care.errors import CareError
from care.tui.screens import EMBEDDED
from care.tui.widgets import ChatInput, ErrorMessage

log = logging.getLogger(__name__)


def make_session(engine: Any, domain: str, system: str | None, sampling: Any = None,
                 languages: tuple[str, ...] | None = None) -> Any:
    from care.runtime.session import ChatSession

    return ChatSession(engine, domain=domain, system=system, sampling=sampling, languages=languages)


class ModelLoading:
    def __init__(self) -> None:
        super().__init__()
        self.load_error: str | None = None
        self.loading = False
        self._queued: str | None = None  # a message sent while the model was loading

    def queue_message(self, text: str) -> None:
        """Send `text` as soon as the model is in."""
        self._queued = text

    def start_load(self, spec: str | None) -> None:
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
        self.call_from_thread(self.engine_ready, engine, spec, False)

    def _hide_loading(self) -> None:
        self.loading = False
        self.query_one("#loading").display = False
        self.query_one("#load-progress").display = False

    def engine_ready(self, engine: Any, spec: str | None, restore: bool) -> None:
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
        self.mount_block(ErrorMessage(message + "\nPress F4 to choose another model; the app stays usable."))
        self.notify("See the message above. F4 chooses another model.", title="Model not loaded",
                    severity="error", timeout=8)
        self.update_status()
