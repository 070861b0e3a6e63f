"""SQLite chat history: WAL, messages written as they happen, rename/delete/export, recent models."""

from __future__ import annotations

import sqlite3

import pytest

from care.errors import DataError
from care.tui.store import ChatStore, default_db_path


def test_default_location_is_the_user_data_dir(_user_dirs):
    assert default_db_path() == _user_dirs / "data" / "chats.sqlite3"


def test_messages_are_committed_as_written_and_visible_to_another_connection(tmp_path):
    store = ChatStore(tmp_path / "c.sqlite3")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    chat = store.new_chat("telecom", "m")
    store.add_message(chat, "user", "  My   router\nblinks red and the internet is gone since this morning  ")
    reply = store.add_message(chat, "assistant", "", complete=False)
    store.update_message(reply, "Restart it", complete=False)
    # A second connection (as a new process after a crash would open) sees it all without a close/commit.
    other = sqlite3.connect(tmp_path / "c.sqlite3")
    rows = other.execute("SELECT role, content, complete FROM messages ORDER BY id").fetchall()
    assert rows[1] == ("assistant", "Restart it", 0)
    reopened = ChatStore(tmp_path / "c.sqlite3")
    chat_row = reopened.get_chat(chat)
    assert chat_row.title == "My router blinks red and the internet is gone s…"  # first question, one line
    assert reopened.conversation(chat) == [
        {"role": "user", "content": "  My   router\nblinks red and the internet is gone since this morning  "},
        {"role": "assistant", "content": "Restart it"}]
    other.close()
    reopened.close()
    store.close()


def test_list_rename_delete_export_and_recent_models(tmp_path):
    clock = iter(range(100))
    store = ChatStore(tmp_path / "c.sqlite3", clock=lambda: 1000.0 + next(clock))
    empty = store.new_chat()
    a = store.new_chat("banking")
    store.add_message(a, "user", "Lost card")
    store.add_message(a, "safety", "fraud\nCall the bank now")
    store.add_message(a, "assistant", "Block it in **the app**.", finish_reason="stop")
    b = store.new_chat("medical")
    store.add_message(b, "user", "Fever")
    assert [c.id for c in store.list_chats()] == [b, a]  # newest first, the empty chat is not history
    assert empty not in [c.id for c in store.list_chats()]
    store.rename(a, " Card case ")
    md = store.export_markdown(a, tmp_path / "exports" / "a.md").read_text(encoding="utf-8")
    assert md.splitlines()[0] == "# Card case"
    assert "- Domain: banking" in md and "## Safety notice" in md and "Block it in **the app**." in md
    store.delete(a)
    assert store.get_chat(a) is None and store.messages(a) == []
    with pytest.raises(DataError):
        store.to_markdown(a)
    store.touch_model("/m/one.gguf")
    store.touch_model("/m/two.gguf")
    store.touch_model("/m/one.gguf")
    assert store.recent_models() == ["/m/one.gguf", "/m/two.gguf"]
    store.close()


def test_unreadable_database_is_a_one_line_error(tmp_path):
    bad = tmp_path / "c.sqlite3"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(DataError) as err:
        ChatStore(bad)
    assert str(bad) in err.value.one_line() and "Move the file aside" in err.value.one_line()
