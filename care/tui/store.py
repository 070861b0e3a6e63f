"""Chat history in SQLite (WAL), written as the conversation happens so a crash or Ctrl-C loses nothing.

Each message is a row written when it completes; a reply in progress is one row with `complete = 0`
that is updated while it streams, so after a kill the part already shown is on disk. Only the UI thread
touches a store; the lock guards the rare call from a worker thread.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from care.errors import CareError, DataError

log = logging.getLogger(__name__)

DB_NAME = "chats.sqlite3"

SCHEMA = """
CREATE TABLE IF NOT EXISTS chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL DEFAULT '',
    domain TEXT NOT NULL DEFAULT 'general',
    model TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    complete INTEGER NOT NULL DEFAULT 1,
    finish_reason TEXT,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_chat ON messages(chat_id, id);
CREATE TABLE IF NOT EXISTS recent_models (
    path TEXT PRIMARY KEY,
    used REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ChatSummary:
    id: int
    title: str
    domain: str
    model: str
    created: float
    updated: float
    n_messages: int


@dataclass(frozen=True)
class StoredMessage:
    id: int
    role: str  # user, assistant, safety, card, note
    content: str
    complete: bool
    finish_reason: str | None


def default_db_path() -> Path:
    from care.paths import data_dir

    return data_dir() / DB_NAME


class ChatStore:
    """Conversations, their messages and the recently used model files."""

    def __init__(self, path: str | Path | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock  # tests pass a fixed clock so screens are reproducible
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed row survives a process crash; only a power cut may lose the last.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise DataError(
                f"Chat history database is unreadable: {exc}",
                path=self.path,
                hint="Move the file aside to start a fresh history (nothing else is affected)",
            ) from exc

    # -- chats -------------------------------------------------------------------------------------
    def _exec(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, params)

    def new_chat(self, domain: str = "general", model: str = "", title: str = "") -> int:
        now = self._clock()
        cur = self._exec(
            "INSERT INTO chats (title, domain, model, created, updated) VALUES (?, ?, ?, ?, ?)",
            (title, domain, model, now, now),
        )
        return int(cur.lastrowid)

    def get_chat(self, chat_id: int) -> ChatSummary | None:
        rows = self._summaries("WHERE c.id = ?", (chat_id,))
        return rows[0] if rows else None

    def list_chats(self) -> list[ChatSummary]:
        """Newest first; chats with no message are left out (an empty new chat is not history)."""
        return [c for c in self._summaries("", ()) if c.n_messages]

    def _summaries(self, where: str, params: tuple) -> list[ChatSummary]:
        rows = self._exec(
            "SELECT c.id, c.title, c.domain, c.model, c.created, c.updated, COUNT(m.id) "
            f"FROM chats c LEFT JOIN messages m ON m.chat_id = c.id {where} "
            "GROUP BY c.id ORDER BY c.updated DESC, c.id DESC",
            params,
        ).fetchall()
        return [ChatSummary(*row) for row in rows]

    def last_chat_id(self) -> int | None:
        chats = self.list_chats()
        return chats[0].id if chats else None

    def rename(self, chat_id: int, title: str) -> None:
        self._exec("UPDATE chats SET title = ? WHERE id = ?", (title.strip(), chat_id))

    def set_domain(self, chat_id: int, domain: str) -> None:
        self._exec("UPDATE chats SET domain = ? WHERE id = ?", (domain, chat_id))

    def set_model(self, chat_id: int, model: str) -> None:
        self._exec("UPDATE chats SET model = ? WHERE id = ?", (model, chat_id))

    def delete(self, chat_id: int) -> None:
        self._exec("DELETE FROM chats WHERE id = ?", (chat_id,))

    # -- messages ----------------------------------------------------------------------------------
    def add_message(self, chat_id: int, role: str, content: str, complete: bool = True,
                    finish_reason: str | None = None) -> int:
        now = self._clock()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO messages (chat_id, role, content, complete, finish_reason, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (chat_id, role, content, int(complete), finish_reason, now),
            )
            self._db.execute("UPDATE chats SET updated = ? WHERE id = ?", (now, chat_id))
            if role == "user":
                # The first question names the chat until the user renames it.
                self._db.execute("UPDATE chats SET title = ? WHERE id = ? AND title = ''",
                                 (make_title(content), chat_id))
        return int(cur.lastrowid)

    def update_message(self, message_id: int, content: str, complete: bool = False,
                       finish_reason: str | None = None) -> None:
        self._exec("UPDATE messages SET content = ?, complete = ?, finish_reason = ? WHERE id = ?",
                   (content, int(complete), finish_reason, message_id))

    def messages(self, chat_id: int) -> list[StoredMessage]:
        rows = self._exec(
            "SELECT id, role, content, complete, finish_reason FROM messages WHERE chat_id = ? ORDER BY id",
            (chat_id,),
        ).fetchall()
        return [StoredMessage(r[0], r[1], r[2], bool(r[3]), r[4]) for r in rows]

    def conversation(self, chat_id: int) -> list[dict[str, str]]:
        """The user/assistant turns in the form the chat session takes (notes and notices left out; a first-aid
        card is the assistant's turn, and the reply asked for after it joins that turn)."""
        turns: list[dict[str, str]] = []
        for m in self.messages(chat_id):
            if m.role not in ("user", "assistant", "card") or not m.content:
                continue
            role = "assistant" if m.role == "card" else m.role
            if turns and role == "assistant" and turns[-1]["role"] == "assistant":
                turns[-1]["content"] += "\n\n" + m.content
            else:
                turns.append({"role": role, "content": m.content})
        return turns

    # -- export ------------------------------------------------------------------------------------
    def to_markdown(self, chat_id: int) -> str:
        chat = self.get_chat(chat_id)
        if chat is None:
            raise DataError(f"No chat with id {chat_id}", path=self.path, hint="Open the history to pick one")
        lines = [f"# {chat.title or 'Chat'}", "",
                 f"- Domain: {chat.domain}", f"- Model: {chat.model or 'unknown'}",
                 f"- Started: {format_time(chat.created)}", ""]
        names = {"user": "You", "assistant": "CARE", "safety": "Safety notice", "card": "First aid", "note": "Note"}
        for m in self.messages(chat_id):
            suffix = "" if m.complete else " (interrupted)"
            if m.finish_reason == "cancelled":
                suffix = " (stopped)"
            lines += [f"## {names.get(m.role, m.role)}{suffix}", "", m.content.strip(), ""]
        return "\n".join(lines)

    def export_markdown(self, chat_id: int, target: str | Path) -> Path:
        from care.io import write_text

        target = Path(target).expanduser()
        try:
            return write_text(target, self.to_markdown(chat_id))
        except CareError:
            raise
        except OSError as exc:
            raise DataError(f"Could not write the export: {exc.strerror or exc}", path=target,
                            hint="Choose a folder you can write to") from exc

    # -- recent models -----------------------------------------------------------------------------
    def touch_model(self, path: str | Path) -> None:
        self._exec("INSERT INTO recent_models (path, used) VALUES (?, ?) "
                   "ON CONFLICT(path) DO UPDATE SET used = excluded.used", (str(path), self._clock()))

    def recent_models(self, limit: int = 8) -> list[str]:
        rows = self._exec("SELECT path FROM recent_models ORDER BY used DESC LIMIT ?", (limit,)).fetchall()
        return [r[0] for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def make_title(text: str, width: int = 48) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def format_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "chat"
