"""Replies agree with the emergency notice: the per-turn instruction, the sentence filter, and the notice-first
order through the session, `care chat --once`, the TUI and `care serve` (scripted FakeEngine replies that
contradict the notice)."""

from __future__ import annotations

import asyncio
import json

import pytest

from care.runtime import reply_check
from care.runtime.engine import GenerationResponse
from care.runtime.session import ChatSession, ReplyCheckNote, SafetyNotice
from care.tui.testing import FakeEngine

BAD_REPLY = ("It is probably just a chest infection. Sit down and rest while help comes. "
             "There is nothing to worry about. Call 911 if it gets worse. Loosen tight clothing.")
EMERGENCY = "My father has crushing chest pain and is sweating"


@pytest.mark.parametrize(("sentence", "why"), [
    ("It is a sign of a chest infection.", "reassurance"),
    ("Nothing to worry about.", "reassurance"),
    ("Wait and see if it gets better.", "reassurance"),
    ("There is no need to see a doctor.", "reassurance"),
    ("Ne vous inquiétez pas, ce n'est rien.", "reassurance"),
    ("No se preocupe, es probablemente un resfriado.", "reassurance"),
    ("Call 999 now.", "other number"),
    ("Llame al 061.", "other number"),
    ("Call 112 now.", None),
    ("Press on the wound for 10 minutes and call for help.", None),
    ("Keep him sitting upright.", None),
])
def test_contradiction(sentence, why):
    assert reply_check.contradiction(sentence, {"112"}) == why


def test_guard_streams_sentences_and_drops_contradictions():
    guard = reply_check.ReplyGuard({"112"})
    shown = "".join(guard.feed(w + " ") for w in ["Sit", "down.", "Nothing", "to", "worry", "about.", "Call", "112"])
    shown += guard.flush()
    assert shown.split() == ["Sit", "down.", "Call", "112"]
    assert guard.removed == ["Nothing to worry about."] and guard.reasons == ["reassurance"]


def _events(session, text):
    return list(session.send(text))


def test_session_flagged_turn(_user_dirs):
    from care.paths import config_dir

    (config_dir() / "safety.yaml").write_text("emergency_number: '112'\n", encoding="utf-8")
    engine = FakeEngine([BAD_REPLY, "Fine."])
    session = ChatSession(engine, domain="auto")
    events = _events(session, EMERGENCY)
    assert isinstance(events[0], SafetyNotice) and events[0].category == "chest_pain"
    text = "".join(e.text for e in events if isinstance(e, GenerationResponse) and e.finish_reason is None)
    assert "chest infection" not in text and "nothing to worry" not in text and "911" not in text
    assert "Sit down and rest while help comes." in text and "Loosen tight clothing." in text
    notes = [e for e in events if isinstance(e, ReplyCheckNote)]
    assert len(notes) == 1 and notes[0].reasons == ["reassurance", "reassurance", "other number"]
    assert "3 sentence(s) removed" in notes[0].text
    assert events[-1].finish_reason == "stop"
    # The model was told, for this turn only; the saved history holds the checked reply, not the instruction.
    sent_system = engine.calls[0][0]["content"]
    assert "emergency was flagged (chest pain)" in sent_system and "112" in sent_system
    assert "SAFETY FOR THIS MESSAGE" not in session.messages[0]["content"]
    assert session.domain == "medical"
    assert "911" not in session.messages[-1]["content"]
    # A harmless follow-up is neither flagged nor filtered, and the instruction is gone.
    events = _events(session, "thank you, we are waiting now")
    assert not any(isinstance(e, SafetyNotice) for e in events)
    assert "SAFETY FOR THIS MESSAGE" not in engine.calls[1][0]["content"]


def test_unflagged_turn_streams_unchanged():
    engine = FakeEngine(["Nothing to worry about. Block the card in the app."])
    events = _events(ChatSession(engine, domain="banking"), "I lost my card")
    chunks = [e for e in events if e.finish_reason is None]
    assert "".join(c.text for c in chunks) == "Nothing to worry about. Block the card in the app."
    assert len(chunks) == 10  # word by word, not held back a sentence at a time


def test_chat_once_notice_first_and_checked(capsys, monkeypatch):
    from care.cli import main
    from care.commands import chat

    monkeypatch.setattr(chat, "load_engine", lambda args: FakeEngine([BAD_REPLY]))
    assert main(["chat", "--once", EMERGENCY]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[SAFETY chest_pain]")
    assert "chest infection" not in out and "911" not in out and "sentence(s) removed" in out
    assert out.index("[SAFETY") < out.index("Sit down")


def test_server_streaming_and_json_notice_first():
    from starlette.testclient import TestClient

    from care.runtime.server import create_app

    client = TestClient(create_app(FakeEngine([BAD_REPLY]), domain="auto"))
    body = {"model": "care", "messages": [{"role": "user", "content": EMERGENCY}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    deltas = [json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in lines[:-1]]
    text = "".join(deltas)
    assert next(d for d in deltas if d).startswith("[SAFETY chest_pain]")
    assert "chest infection" not in text and "911" not in text and "sentence(s) removed" in text
    # Non-streaming, with the age in an earlier turn: the context counts on the server too.
    body = {"model": "care", "messages": [{"role": "user", "content": "my baby is 3 weeks old"},
                                          {"role": "assistant", "content": "How can I help?"},
                                          {"role": "user", "content": "she has a fever and feels hot"}]}
    data = client.post("/v1/chat/completions", json=body).json()
    assert [n["category"] for n in data["care_safety"]] == ["young_infant"]
    assert data["choices"][0]["message"]["content"].startswith("[SAFETY young_infant]")


def test_tui_notice_first_and_checked(tmp_path):
    from test_tui_app import SIZE, send_and_wait

    from care.tui.app import create_app
    from care.tui.store import ChatStore
    from care.tui.widgets import AssistantMessage, SafetyMessage

    store = ChatStore(tmp_path / "chats.sqlite3")
    engine = FakeEngine([BAD_REPLY])

    async def run():
        app = create_app(engine, store=store, resume=False, domain="auto")
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "my 2 year old drank some of the bleach under the sink, what do I do")
            kinds = [type(w).__name__ for w in app.query("#conversation > *") if w.display and w.id is None]
            assert kinds.index("SafetyMessage") < kinds.index("AssistantMessage")
            assert "overdose_poisoning" in str(app.query_one(SafetyMessage).border_title)
            reply = app.query(AssistantMessage).last().source
            assert "chest infection" not in reply and "sentence(s) removed" in reply
            return app.domain

    assert asyncio.run(run()) == "medical"
    store.close()
