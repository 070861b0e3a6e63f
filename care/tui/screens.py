"""Pop-up and full screens: help, domain switcher, model picker, history, text prompt."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from care.domains import DOMAINS
from care.tui.store import ChatStore, format_time

HELP_TEXT = """\
 Enter            send the message
 Shift+Enter      new line (Ctrl+J in any terminal)
 Esc              stop the reply being written
 PageUp/PageDown  scroll the conversation (Ctrl+End: back to the newest)
 F1               this help
 F2 / Ctrl+O      history: open, rename, delete, export chats
 F3 / Ctrl+T      switch domain (banking, telecom, medical, general)
 F4 / Ctrl+L      choose the model (GGUF file)
 Ctrl+N           new chat
 Ctrl+Q / Ctrl+C  quit (the chat is already saved)
 Tab              move between the input and the conversation

 In the history:  Enter open · r rename · d delete · e export · Esc back
 Everything stays on this computer: CARE works offline.
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="help"):
            yield Label("Keys", classes="dialog-title")
            yield Static(HELP_TEXT, markup=False)
            yield Label("Esc to close", classes="dialog-hint")


class DomainScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="domains"):
            yield Label("Domain (sets the assistant's instructions)", classes="dialog-title")
            yield OptionList(*[Option(("● " if d == self.current else "  ") + d, id=d) for d in DOMAINS])
            yield Label("Enter to choose · Esc to cancel", classes="dialog-hint")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = DOMAINS.index(self.current) if self.current in DOMAINS else 0

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class PromptScreen(ModalScreen[str | None]):
    """Ask for one line of text (rename a chat, export path, model path)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str, value: str = "", placeholder: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.value = value
        self.placeholder = placeholder

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="prompt"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(self.value, placeholder=self.placeholder)
            yield Label("Enter to confirm · Esc to cancel", classes="dialog-hint")

    def on_mount(self) -> None:
        box = self.query_one(Input)
        box.focus()
        box.select_all()  # typing replaces the suggestion; arrows keep and edit it

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "dismiss(True)", "Yes"), Binding("n,escape", "dismiss(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm"):
            yield Label(self.question, classes="dialog-title")
            yield Label("y: yes · n / Esc: no", classes="dialog-hint")


EMBEDDED = "embedded"


def local_gguf_files(folders: list[Path], limit: int = 20) -> list[Path]:
    """GGUF files directly in the given folders and one level below (e.g. exports/<run>/model.gguf), and ONNX
    folders from `care export onnx` (the folder holding genai_config.json): the runtime loads both."""
    found: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for pattern in ("*.gguf", "*/*.gguf", "*/genai_config.json", "*/*/genai_config.json"):
            try:
                found += sorted(p.parent if p.name == "genai_config.json" else p
                                for p in folder.glob(pattern) if p.is_file())
            except OSError:
                continue
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique[:limit]


class ModelScreen(ModalScreen[str | None]):
    """Pick the embedded model, a recent one, a GGUF found nearby, or type a path."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("p", "path", "Type a path")]

    def __init__(self, recent: list[str], local: list[Path], current: str = "") -> None:
        super().__init__()
        self.recent = recent
        self.local = local
        self.current = current

    def compose(self) -> ComposeResult:
        options: list[Option | None] = [Option("Embedded default: SmolLM2-135M-Instruct", id=EMBEDDED)]
        seen = {EMBEDDED}
        rows = [(p, "recent") for p in self.recent] + [(str(p), "found") for p in self.local]
        for path, kind in rows:
            if path in seen:
                continue
            seen.add(path)
            mark = "" if Path(path).is_file() else " (missing)"
            options.append(Option(f"{kind:<6} {_short(path)}{mark}", id=path))
        options.append(Option("Type a path to a .gguf file…", id="__path__"))
        with Vertical(classes="dialog", id="models"):
            yield Label("Model", classes="dialog-title")
            yield OptionList(*options)
            yield Label("Enter to load · p type a path · Esc to cancel", classes="dialog-hint")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id == "__path__":
            self.action_path()
        else:
            self.dismiss(event.option.id)

    def action_path(self) -> None:
        def done(value: str | None) -> None:
            if value:
                self.dismiss(value)

        self.app.push_screen(PromptScreen("Path to a .gguf file", placeholder="/path/to/model.gguf"), done)


def _short(path: str, width: int = 58) -> str:
    return path if len(path) <= width else "…" + path[-(width - 1):]


class HistoryScreen(Screen[int | None]):
    """Past chats: open, rename, delete, export. Dismisses with the chat id to open."""

    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("r", "rename", "Rename"),
        Binding("d", "delete", "Delete"),
        Binding("e", "export", "Export"),
    ]

    def __init__(self, store: ChatStore, export_dir: Path) -> None:
        super().__init__()
        self.store = store
        self.export_dir = export_dir

    def compose(self) -> ComposeResult:
        yield Static(" History · Enter open · r rename · d delete · e export · Esc back", id="history-title")
        yield OptionList(id="chats")
        yield Static("", id="history-empty")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_list()

    def refresh_list(self, keep: int | None = None) -> None:
        options = self.query_one("#chats", OptionList)
        chats = self.store.list_chats()
        options.clear_options()
        for chat in chats:
            title = chat.title or "(untitled)"
            title = title if len(title) <= 40 else title[:39] + "…"
            options.add_option(Option(f"{format_time(chat.updated)}  {chat.domain:<8} {title:<40} "
                                      f"{chat.n_messages:>3}", id=str(chat.id)))
        self.query_one("#history-empty", Static).update("" if chats else " No saved chats yet.")
        if chats:
            ids = [c.id for c in chats]
            options.highlighted = ids.index(keep) if keep in ids else 0
        options.focus()

    def _selected(self) -> int | None:
        options = self.query_one("#chats", OptionList)
        if options.highlighted is None or options.option_count == 0:
            return None
        return int(options.get_option_at_index(options.highlighted).id or 0)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(event.option.id or 0))

    def action_back(self) -> None:
        self.dismiss(None)

    def action_rename(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return
        chat = self.store.get_chat(chat_id)

        def done(value: str | None) -> None:
            if value:
                self.store.rename(chat_id, value)
                self.refresh_list(keep=chat_id)

        self.app.push_screen(PromptScreen("Rename chat", value=chat.title if chat else ""), done)

    def action_delete(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return
        chat = self.store.get_chat(chat_id)

        def done(yes: bool | None) -> None:
            if yes:
                self.store.delete(chat_id)
                self.app.post_message(ChatDeleted(chat_id))
                self.refresh_list()

        self.app.push_screen(ConfirmScreen(f"Delete “{chat.title if chat else chat_id}”?"), done)

    def action_export(self) -> None:
        chat_id = self._selected()
        if chat_id is None:
            return
        from care.tui.store import slug

        chat = self.store.get_chat(chat_id)
        default = self.export_dir / f"chat-{chat_id}-{slug(chat.title if chat else '')}.md"

        def done(value: str | None) -> None:
            if not value:
                return
            from care.errors import CareError

            try:
                path = self.store.export_markdown(chat_id, value)
            except CareError as exc:
                self.app.notify(exc.one_line(), title="Export failed", severity="error", timeout=10)
                return
            self.app.notify(str(path), title="Exported", timeout=8)

        self.app.push_screen(PromptScreen("Export as Markdown to", value=str(default)), done)


class ChatDeleted(Message):
    def __init__(self, chat_id: int) -> None:
        super().__init__()
        self.chat_id = chat_id
