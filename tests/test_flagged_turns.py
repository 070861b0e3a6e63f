"""A flagged turn answers with the emergency notice and the vetted first-aid card, and by default nothing else:
the model is not called, in the session, `care chat --once`, `care serve` (streaming and not) and the TUI (the
gateway in front of llama-server: tests/test_upstream.py). Asked for anyway, the model's reply is labelled, under
the turn's instruction, and checked a sentence at a time (scripted FakeEngine replies that contradict the
notice)."""

from __future__ import annotations

import asyncio
import json

import pytest

from care.runtime.backend import GenerationResponse
from care.runtime.session import (
    AnywayNote,
    ChatSession,
    FirstAidCard,
    ReplyCheckNote,
    SafetyNotice,
    shown_text,
)
from care.runtime.triage import reply_check
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


def _events(session, text, **kw):
    return list(session.send(text, **kw))


def _clinic_number(_user_dirs) -> None:
    from care.paths import config_dir

    (config_dir() / "safety.yaml").write_text("emergency_number: '112'\n", encoding="utf-8")


def test_session_flagged_turn_is_the_notice_and_the_card_only(_user_dirs):
    _clinic_number(_user_dirs)
    engine = FakeEngine([BAD_REPLY])
    session = ChatSession(engine, domain="auto")
    events = _events(session, EMERGENCY)
    notice, card, last = events
    assert isinstance(notice, SafetyNotice) and notice.category == "chest_pain" and "112" in notice.message
    assert isinstance(card, FirstAidCard) and card.category == "chest_pain" and card.text.startswith("While help comes:")
    assert "112" in card.text and len(card.sources) == len(card.steps)
    assert isinstance(last, GenerationResponse) and last.finish_reason == "stop" and last.text == ""
    assert engine.calls == []  # the model wrote nothing: nothing can contradict the notice
    assert session.messages[-1] == {"role": "assistant", "content": shown_text(notice, card)}
    assert session.domain == "medical"


def test_ask_anyway_is_labelled_instructed_and_checked(_user_dirs):
    _clinic_number(_user_dirs)
    engine = FakeEngine([BAD_REPLY, BAD_REPLY, "Fine."])
    session = ChatSession(engine, domain="auto")
    for events in (_events(session, EMERGENCY, emergency_reply="model"), None):
        if events is None:  # the same, asked after the card was shown (the TUI's key)
            session2 = ChatSession(engine, domain="auto")
            first = _events(session2, EMERGENCY)
            events = list(session2.answer_anyway())
            assert session2.messages[-1]["content"].startswith(shown_text(first[0], first[1]))
            assert not any(isinstance(e, (SafetyNotice, FirstAidCard)) for e in events)
        labels = [e for e in events if isinstance(e, AnywayNote)]
        assert len(labels) == 1 and "not vetted" in labels[0].text
        text = "".join(e.text for e in events if isinstance(e, GenerationResponse) and e.finish_reason is None)
        assert "chest infection" not in text and "nothing to worry" not in text and "911" not in text
        assert "Sit down and rest while help comes." in text and "Loosen tight clothing." in text
        notes = [e for e in events if isinstance(e, ReplyCheckNote)]
        assert len(notes) == 1 and notes[0].reasons == ["reassurance", "reassurance", "other number"]
    sent_system = engine.calls[0][0]["content"]
    assert "emergency was flagged (chest pain)" in sent_system and "112" in sent_system
    assert "SAFETY FOR THIS MESSAGE" not in session.messages[0]["content"]
    # A harmless follow-up is neither flagged nor filtered, and the instruction is gone.
    events = _events(session, "thank you, we are waiting now")
    assert not any(isinstance(e, SafetyNotice) for e in events)
    assert "SAFETY FOR THIS MESSAGE" not in engine.calls[-1][0]["content"]


def test_unflagged_turn_streams_unchanged():
    engine = FakeEngine(["Nothing to worry about. Block the card in the app."])
    events = _events(ChatSession(engine, domain="banking"), "I lost my card")
    chunks = [e for e in events if e.finish_reason is None]
    assert "".join(c.text for c in chunks) == "Nothing to worry about. Block the card in the app."
    assert len(chunks) == 10  # word by word, not held back a sentence at a time


def _expected(text: str, languages=None) -> tuple[SafetyNotice, FirstAidCard]:
    from care.runtime import triage
    from care.runtime.session import flagged

    return flagged(triage.assess([text]), triage.load_rules(), languages)


def test_chat_once_prints_the_notice_and_card_without_loading_the_model(capsys, monkeypatch):
    from care.cli import main
    from care.commands import chat

    def no_model(args):
        raise AssertionError("a flagged --once message needs no model")

    monkeypatch.setattr(chat, "load_engine", no_model)
    assert main(["chat", "--once", EMERGENCY]) == 0
    notice, card = _expected(EMERGENCY)
    assert capsys.readouterr().out == f"[SAFETY chest_pain] {notice.message}\n\n{card.text}\n"
    monkeypatch.setattr(chat, "load_engine", lambda args: FakeEngine([BAD_REPLY]))
    assert main(["chat", "--once", EMERGENCY, "--ask-anyway"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[SAFETY chest_pain]") and card.text in out and "not vetted" in out
    assert "chest infection" not in out and "911" not in out and "sentence(s) removed" in out
    assert out.index(card.text) < out.index("Sit down and rest while help comes.")


def _sse_content(client, body) -> tuple[str, list[dict]]:
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in lines), lines


def test_server_flagged_turn_is_the_notice_and_card_streaming_and_not():
    from starlette.testclient import TestClient

    from care.runtime.server import card_text, create_app, notice_text

    engine = FakeEngine([BAD_REPLY])
    client = TestClient(create_app(engine, domain="auto"))
    notice, card = _expected(EMERGENCY)
    exact = notice_text(notice) + card_text(card)
    body = {"model": "care", "messages": [{"role": "user", "content": EMERGENCY}], "stream": True}
    content, events = _sse_content(client, body)
    assert content == exact
    assert any("care_safety" in e for e in events) and any(e.get("care_card", {}).get("category") == "chest_pain"
                                                            for e in events)
    data = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert data["choices"][0]["message"]["content"] == exact
    assert data["care_card"][0]["steps"] == card.steps and data["care_safety"][0]["category"] == "chest_pain"
    assert engine.calls == []
    # With the age in an earlier turn: the context counts on the server too.
    body = {"model": "care", "messages": [{"role": "user", "content": "my baby is 3 weeks old"},
                                          {"role": "assistant", "content": "How can I help?"},
                                          {"role": "user", "content": "she has a fever and feels hot"}]}
    data = client.post("/v1/chat/completions", json=body).json()
    assert [n["category"] for n in data["care_safety"]] == ["young_infant"]
    assert data["choices"][0]["message"]["content"].startswith("[SAFETY young_infant]")


def test_server_model_reply_per_request_and_per_server():
    from starlette.testclient import TestClient

    from care.runtime.server import create_app

    body = {"model": "care", "messages": [{"role": "user", "content": EMERGENCY}], "stream": True,
            "care_emergency_reply": "model"}
    client = TestClient(create_app(FakeEngine([BAD_REPLY]), domain="auto"))
    content, events = _sse_content(client, body)
    assert content.startswith("[SAFETY chest_pain]") and "not vetted" in content
    assert "chest infection" not in content and "911" not in content and "sentence(s) removed" in content
    assert any(e.get("care_unvetted") for e in events)
    bad = client.post("/v1/chat/completions", json={**body, "care_emergency_reply": "maybe"})
    assert bad.status_code == 400 and "care_emergency_reply" in bad.json()["error"]["message"]
    server_wide = TestClient(create_app(FakeEngine([BAD_REPLY]), domain="auto", emergency_reply="model"))
    data = server_wide.post("/v1/chat/completions", json={**body, "stream": False, "care_emergency_reply": None}).json()
    assert "not vetted" in data["choices"][0]["message"]["content"]


def test_tui_flagged_turn_is_notice_then_card_and_f5_asks_anyway(tmp_path):
    from test_tui_app import SIZE, send_and_wait, wait_for

    from care.tui.app import create_app
    from care.tui.store import ChatStore
    from care.tui.widgets import AssistantMessage, CardMessage, SafetyMessage

    store = ChatStore(tmp_path / "chats.sqlite3")
    engine = FakeEngine([BAD_REPLY])

    async def run():
        app = create_app(engine, store=store, resume=False, domain="auto")
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "my 2 year old drank some of the bleach under the sink, what do I do")
            kinds = [type(w).__name__ for w in app.query("#conversation > *") if w.display and w.id is None]
            assert kinds[-3:] == ["UserMessage", "SafetyMessage", "CardMessage"], kinds
            assert "overdose_poisoning" in str(app.query_one(SafetyMessage).border_title)
            assert "While help comes" in str(app.query_one(CardMessage).border_title)
            assert engine.calls == [] and not list(app.query(AssistantMessage))
            await pilot.press("f5")
            await wait_for(pilot, lambda: not app.generating and list(app.query(AssistantMessage)))
            reply = app.query(AssistantMessage).last().source
            assert "chest infection" not in reply and "sentence(s) removed" in reply
            notes = [str(w.render()) for w in app.query(".unvetted")]
            assert notes and "not vetted" in notes[0]
            return app.domain

    assert asyncio.run(run()) == "medical"
    store.close()
