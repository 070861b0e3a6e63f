"""The `care chat` Textual app driven with Pilot at 80x24: against a scripted fake engine (the UI is the
thing under test) and once against the real embedded GGUF."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
from pathlib import Path

import pytest

from care.commands.chat import loader_from_args
from care.domains import SYSTEM_PROMPTS
from care.tui.app import create_app
from care.tui.store import ChatStore
from care.tui.testing import FakeEngine
from care.tui.widgets import (
    AssistantMessage,
    CardMessage,
    ChatInput,
    ErrorMessage,
    NoteMessage,
    SafetyMessage,
    UserMessage,
)

SIZE = (80, 24)
REPLY = "Open the app, go to **Cards** and press *Block card*. Then call the bank."


async def wait_for(pilot, cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


async def wait_threading_event(pilot, event, timeout: float = 10.0) -> None:
    await wait_for(pilot, event.is_set, timeout)


async def send(pilot, text: str) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.session is not None)
    app.query_one(ChatInput).focus()
    await pilot.press(*list(text))
    await pilot.press("enter")
    # A flagged turn answers with a first-aid card at once, and no assistant message.
    await wait_for(pilot, lambda: app.generating or app.query(AssistantMessage) or app.query(CardMessage))


async def send_and_wait(pilot, text: str, timeout: float = 10.0) -> None:
    await send(pilot, text)
    await wait_for(pilot, lambda: not pilot.app.generating, timeout)
    await pilot.pause(0.05)


def screen_text(app) -> str:
    """What the widgets currently display, for assertions on visible text."""
    parts = []
    for w in app.screen.query("*"):
        if isinstance(w, AssistantMessage):
            parts.append(w.source)
        elif hasattr(w, "render") and w.__class__.__name__ in ("Static", "StatusBar", "UserMessage",
                                                                "SafetyMessage", "NoteMessage", "ErrorMessage",
                                                                "Label"):
            parts.append(str(w.render()))
    return "\n".join(parts)


@pytest.fixture
def store(tmp_path):
    s = ChatStore(tmp_path / "chats.sqlite3")
    yield s
    s.close()


def test_send_streams_markdown_reply_and_saves_it(store):
    engine = FakeEngine([REPLY])

    async def run():
        app = create_app(engine, store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "How do I block my card?")
            replies = app.query(AssistantMessage)
            assert len(replies) == 1 and replies[0].source == REPLY
            assert [w.render().plain for w in app.query(UserMessage)] == ["How do I block my card?"]
            status = str(app.query_one("#status").render())
            assert "FakeModel-1M" in status and "Q4_1" in status and "offline" in status
            assert "42.0 tok/s" in status and "/2048" in status
            assert not app.query_one(ChatInput).text  # the input was cleared
            assert app.focused is app.query_one(ChatInput)  # ready for the next question
            return app.chat_id

    chat_id = asyncio.run(run())
    rows = store.messages(chat_id)
    assert [(m.role, m.content, m.complete) for m in rows] == [
        ("user", "How do I block my card?", True), ("assistant", REPLY, True)]
    assert engine.calls[0][0] == {"role": "system", "content": SYSTEM_PROMPTS["general"]}
    assert store.get_chat(chat_id).title == "How do I block my card?"


def test_ctrl_j_inserts_newline_and_enter_sends_both_lines(store):
    engine = FakeEngine(["ok"])

    async def run():
        app = create_app(engine, store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.session is not None)
            await pilot.press("a", "ctrl+j", "b")
            assert app.query_one(ChatInput).text == "a\nb"
            assert not engine.calls  # nothing sent yet
            await pilot.press("enter")
            await wait_for(pilot, lambda: engine.calls and not app.generating)

    asyncio.run(run())
    assert engine.calls[0][-1] == {"role": "user", "content": "a\nb"}


def test_esc_stops_a_reply_mid_stream_and_keeps_the_part_shown(store):
    engine = FakeEngine(["one two three four five six seven"], hold_after=3)

    async def run():
        app = create_app(engine, store=store, resume=False, flush_interval_s=0)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "hello")
            await wait_threading_event(pilot, engine.holding)
            await pilot.pause(0.1)
            assert app.generating
            assert "writing" in str(app.query_one("#status").render())
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.generating)
            await pilot.pause(0.05)
            assert app.query(AssistantMessage)[0].source == "one two three"
            assert any("stopped" in str(n.render()) for n in app.query(NoteMessage))
            # The UI is still usable: the next message goes through.
            engine.hold_after = None
            await send_and_wait(pilot, "again")
            return app.chat_id

    chat_id = asyncio.run(run())
    rows = store.messages(chat_id)
    assert (rows[1].role, rows[1].content, rows[1].finish_reason) == ("assistant", "one two three", "cancelled")
    assert len(rows) == 4 and rows[3].complete


def test_domain_switch_sets_system_prompt_and_status(store):
    engine = FakeEngine(["Drink water."])

    async def run():
        app = create_app(engine, store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.session is not None)
            await pilot.press("f3")
            await pilot.pause(0.05)
            # The list opens on the current domain (general, last); medical is just above it.
            await pilot.press("up", "enter")
            await pilot.pause(0.05)
            assert app.domain == "medical"
            assert "medical" in str(app.query_one("#status").render())
            await send_and_wait(pilot, "I have a mild headache")
            return app.chat_id

    chat_id = asyncio.run(run())
    assert engine.calls[0][0] == {"role": "system", "content": SYSTEM_PROMPTS["medical"]}
    assert store.get_chat(chat_id).domain == "medical"


def test_red_flag_notice_and_card_are_saved_and_reopen(store):
    engine = FakeEngine(["Please rest."])

    async def run():
        app = create_app(engine, store=store, resume=False, domain="medical")
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "I have crushing chest pain since an hour")
            blocks = [w for w in app.query("#conversation > *") if w.display and w.id is None]
            kinds = [type(w).__name__ for w in blocks]
            assert kinds[-2:] == ["SafetyMessage", "CardMessage"]
            notice = app.query_one(SafetyMessage)
            assert "chest_pain" in str(notice.border_title)
            return app.chat_id

    chat_id = asyncio.run(run())
    roles = [m.role for m in store.messages(chat_id)]
    assert roles == ["user", "safety", "card"]
    # Reopened, the card is the assistant's turn of the conversation the model sees next.
    assert [m["role"] for m in store.conversation(chat_id)] == ["user", "assistant"]


def test_history_reopens_a_saved_chat_and_continues_it(tmp_path):
    db = tmp_path / "chats.sqlite3"
    first = FakeEngine(["Restart the router.", "Call the bank."])

    async def make_two_chats():
        store = ChatStore(db)
        app = create_app(first, store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "My internet is down")
            await pilot.press("ctrl+n")
            await send_and_wait(pilot, "Lost card")
        store.close()

    asyncio.run(make_two_chats())
    engine = FakeEngine(["Is the light green?"])

    async def reopen():
        store = ChatStore(db)
        app = create_app(engine, store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.session is not None)
            assert not app.query(UserMessage)  # a fresh chat
            await pilot.press("f2")
            await pilot.pause(0.1)
            from textual.widgets import OptionList

            options = app.screen.query_one("#chats", OptionList)
            labels = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
            assert len(labels) == 2 and "Lost card" in labels[0] and "My internet is down" in labels[1]
            await pilot.press("down", "enter")
            await pilot.pause(0.1)
            assert [str(w.render()) for w in app.query(UserMessage)] == ["My internet is down"]
            assert app.query(AssistantMessage)[0].source == "Restart the router."
            await send_and_wait(pilot, "Still down")
        store.close()

    asyncio.run(reopen())
    # The model saw the reopened conversation before the new question.
    assert [m["content"] for m in engine.calls[0][1:]] == ["My internet is down", "Restart the router.",
                                                           "Still down"]


def test_history_rename_export_delete(tmp_path, monkeypatch):
    db = tmp_path / "chats.sqlite3"
    store = ChatStore(db)
    export = tmp_path / "out" / "chat.md"

    async def run():
        app = create_app(FakeEngine(["Try **airplane mode** off."]), store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "No signal")
            chat_id = app.chat_id
            await pilot.press("f2")
            await pilot.pause(0.05)
            await pilot.press("r")
            await pilot.pause(0.05)
            await pilot.press(*list("Signal case"), "enter")  # the old title is selected: typing replaces it
            await pilot.pause(0.05)
            assert store.get_chat(chat_id).title == "Signal case"
            await pilot.press("e")
            await pilot.pause(0.05)
            app.screen.query_one("Input").value = str(export)
            await pilot.press("enter")
            await pilot.pause(0.05)
            await pilot.press("d")
            await pilot.pause(0.05)
            await pilot.press("y")
            await pilot.pause(0.1)
            assert store.get_chat(chat_id) is None
            await pilot.press("escape")
            await pilot.pause(0.05)
            assert app.chat_id is None and not app.query(UserMessage)  # the open chat was the deleted one

    asyncio.run(run())
    text = export.read_text(encoding="utf-8")
    assert text.startswith("# Signal case") and "No signal" in text and "**airplane mode**" in text
    assert not list(export.parent.glob(".*.part"))  # atomic write left no temp file
    store.close()


def test_kill_mid_reply_then_resume_with_history_intact(tmp_path):
    db = tmp_path / "chats.sqlite3"
    crash = tmp_path / "crash"
    crash.mkdir()
    engine = FakeEngine(["Hi.", "Rest and drink water. If the fever stays, see the nurse."])

    async def run_until_crash():
        store = ChatStore(db)
        app = create_app(engine, store=store, resume=False, flush_interval_s=0)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "hello")
            engine.hold_after = 4  # the second reply stops after 4 words: the "crash" point
            await send(pilot, "I have a fever")
            await wait_threading_event(pilot, engine.holding)
            await pilot.pause(0.2)
            # The files as a killed process leaves them: copied while the app is mid-reply and never closed.
            for f in tmp_path.glob("chats.sqlite3*"):
                shutil.copy(f, crash / f.name)
            engine.gate.set()
            await wait_for(pilot, lambda: not app.generating)
        store.close()

    asyncio.run(run_until_crash())
    engine2 = FakeEngine(["Yes, paracetamol helps."])

    async def resume():
        store = ChatStore(crash / "chats.sqlite3")
        app = create_app(engine2, store=store)  # resume=True: the last chat comes back
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.session is not None)
            users = [str(w.render()) for w in app.query(UserMessage)]
            assert users == ["hello", "I have a fever"]
            replies = [w.source for w in app.query(AssistantMessage)]
            assert replies == ["Hi.", "Rest and drink water."]
            assert any("interrupted" in str(n.render()) for n in app.query(NoteMessage))
            await send_and_wait(pilot, "Can I take paracetamol?")
        store.close()

    asyncio.run(resume())
    history = [m["content"] for m in engine2.calls[0][1:]]
    assert history == ["hello", "Hi.", "I have a fever", "Rest and drink water.", "Can I take paracetamol?"]


def _loader(spec):
    """Real model resolution (missing/corrupt files fail like in the CLI); a fake engine for the default."""
    from care.models import check_gguf

    if spec is None:
        return FakeEngine(["Hello from the default."])
    check_gguf(Path(spec))
    raise AssertionError("a valid file was not expected in this test")


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_bad_model_file_shows_error_and_app_stays_usable(tmp_path, store, kind):
    bad = tmp_path / "clinic.gguf"
    if kind == "corrupt":
        bad.write_bytes(b"this is not a gguf file" * 100)

    async def run():
        app = create_app(engine_loader=_loader, model=str(bad), store=store, resume=False,
                         model_folders=[])
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.query(ErrorMessage))
            error = str(app.query_one(ErrorMessage).render())
            assert str(bad) in error
            assert ("not found" in error) if kind == "missing" else ("Not a GGUF" in error)
            assert "no model" in str(app.query_one("#status").render())
            # Sending without a model warns instead of crashing.
            await pilot.press("h", "i", "enter")
            await pilot.pause(0.05)
            assert not app.query(UserMessage)
            # Pick the embedded default from the model picker: it loads and chat works.
            await pilot.press("f4")
            await pilot.pause(0.05)
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.session is not None)
            await pilot.press("ctrl+a")
            await send_and_wait(pilot, "hello")
            assert app.query(AssistantMessage)[-1].source == "Hello from the default."

    asyncio.run(run())


def test_help_screen_lists_the_keys(store):
    async def run():
        app = create_app(FakeEngine(), store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f1")
            await pilot.pause(0.05)
            text = screen_text(app)
            for key in ("Enter", "Shift+Enter", "Ctrl+J", "Esc", "F2", "F3", "F4", "Ctrl+N", "Ctrl+Q"):
                assert key in text
            await pilot.press("escape")
            await pilot.pause(0.05)
            assert "Shift+Enter      new line" not in screen_text(app)

    asyncio.run(run())


def test_real_embedded_gguf_loads_in_a_worker_and_answers(embedded_gguf, store):
    args = argparse.Namespace(model=None, n_ctx=1024, threads=1, chat_template=None, lora=None, max_tokens=12,
                              temperature=0.0, top_p=0.9, top_k=40, repeat_penalty=1.1, seed=0)

    async def run():
        app = create_app(engine_loader=loader_from_args(args), store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            # The window is up and takes input before the model is there: the input has focus at once, and the
            # loading line is hidden once the engine is in.
            assert app.focused is app.query_one("#input")
            await wait_for(pilot, lambda: app.session is not None, timeout=60)
            assert not app.query_one("#loading").display and not app.loading
            status = str(app.query_one("#status").render())
            assert "Q4_1" in status and "/1024" in status
            await send_and_wait(pilot, "What is the capital of France?", timeout=120)
            reply = app.query(AssistantMessage)[0].source
            assert reply.strip()
            assert "tok/s" in str(app.query_one("#status").render())
            stored = store.messages(app.chat_id)
            assert stored[-1].role == "assistant" and stored[-1].content == reply and stored[-1].complete
            await app.action_quit()
            return app

    app = asyncio.run(run())
    assert app.engine.path == embedded_gguf
    app.engine.close()


def test_app_module_imports_no_torch_transformers_or_llama_cpp():
    import subprocess
    import sys

    code = ("import sys, care.tui.app, care.commands.chat; "
            "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ctrl_c_mid_reply_quits_and_keeps_the_partial_reply(store):
    engine = FakeEngine(["alpha beta gamma delta epsilon"], hold_after=2)

    async def run():
        app = create_app(engine, store=store, resume=False, flush_interval_s=60)  # no flush before Ctrl+C
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "hi")
            await wait_threading_event(pilot, engine.holding)
            await pilot.pause(0.1)
            await pilot.press("ctrl+c")
            await pilot.pause(0.1)
            assert not app.is_running
            return app.chat_id

    chat_id = asyncio.run(run())
    rows = store.messages(chat_id)
    assert [(m.role, m.content) for m in rows] == [("user", "hi"), ("assistant", "alpha beta")]
    assert rows[1].finish_reason == "cancelled"


def test_model_picker_lists_recent_files_and_a_missing_one_keeps_the_current_model(tmp_path, store):
    gone = tmp_path / "deleted-model.gguf"
    store.touch_model(str(gone))

    async def run():
        app = create_app(engine_loader=_loader, store=store, resume=False, model_folders=[])
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.session is not None)
            first = app.engine
            await pilot.press("f4")
            await pilot.pause(0.1)
            from textual.widgets import OptionList

            options = app.screen.query_one(OptionList)
            labels = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
            assert labels[0].startswith("Embedded default")
            assert any("deleted-model.gguf (missing)" in label for label in labels)
            await pilot.press("down", "down", "enter")  # the recent, now missing file (after the current one)
            await wait_for(pilot, lambda: app.query(ErrorMessage))
            assert "Model file not found" in str(app.query_one(ErrorMessage).render())
            assert app.engine is first and not first.closed  # the loaded model is kept
            await send_and_wait(pilot, "still there?")
            assert app.query(AssistantMessage)[-1].source == "Hello from the default."

    asyncio.run(run())


def test_auto_domain_is_detected_from_the_first_message_and_saved(store):
    engine = FakeEngine(["Keep the card blocked."])

    async def run():
        app = create_app(engine, store=store, resume=False, domain="auto")
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.session is not None)
            assert "auto" in str(app.query_one("#status").render())
            await send_and_wait(pilot, "I lost my credit card")
            assert app.domain == "banking"
            assert "banking" in str(app.query_one("#status").render())
            return app.chat_id

    chat_id = asyncio.run(run())
    assert engine.calls[0][0] == {"role": "system", "content": SYSTEM_PROMPTS["banking"]}
    assert store.get_chat(chat_id).domain == "banking"


def test_a_long_reply_keeps_its_end_in_view(store):
    long_reply = "Steps:\n\n" + "\n".join(f"{i}. step number {i}" for i in range(1, 31))
    engine = FakeEngine([long_reply])

    async def run():
        app = create_app(engine, store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "How do I reset the phone?")
            await pilot.pause(0.2)
            view = app.query_one("#conversation")
            assert view.max_scroll_y > 5  # it overflows the 24-line screen
            assert view.scroll_y == view.max_scroll_y  # and the last step is what the user sees

    asyncio.run(run())


def test_esc_before_the_first_word_leaves_no_empty_reply(store):
    engine = FakeEngine(["never shown"], hold_after=0)

    async def run():
        app = create_app(engine, store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await send(pilot, "hello")
            await wait_threading_event(pilot, engine.holding)
            await pilot.press("escape")
            await wait_for(pilot, lambda: not app.generating)
            await pilot.pause(0.05)
            assert not app.query(AssistantMessage)
            assert any("stopped" in str(n.render()) for n in app.query(NoteMessage))
            return app.chat_id

    chat_id = asyncio.run(run())
    assert [m.role for m in store.messages(chat_id)] == ["user"]


def test_summarised_turns_show_a_note_that_is_saved_with_the_chat(store):
    """--context summarize: the older turns of a resumed long chat are summarised, and the note says so."""
    chat_id = store.new_chat("general", "FakeModel-1M")
    for i in range(30):
        store.add_message(chat_id, "user", f"question {i} about card {4410 + i}")
        store.add_message(chat_id, "assistant", f"answer {i} about card {4410 + i}")
    engine = FakeEngine(["card 4410 was charged twice", "Here is the answer."], n_ctx=300)
    engine.config.context_policy = "summarize"
    engine.config.summary_tokens = 20

    async def run():
        app = create_app(engine, store=store, resume=True)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "what about the other one?")  # not flagged by the triage
            notes = [w.render().plain for w in app.query(NoteMessage)]
            assert any("summarised" in n and "card 4410 was charged twice" in n for n in notes), notes
            assert app.query(AssistantMessage)[-1].source == "Here is the answer."

    asyncio.run(run())
    summary_call, reply_call = engine.calls
    assert "question 0 about card 4410" in summary_call[-1]["content"]
    assert reply_call[0]["content"].endswith("card 4410 was charged twice")
    saved = [m.content for m in store.messages(chat_id) if m.role == "note"]
    assert len(saved) == 1 and "card 4410 was charged twice" in saved[0]


def test_page_keys_in_the_input_scroll_the_conversation(store):
    long_reply = "\n\n".join(f"Step {i}: do the thing number {i}." for i in range(40))
    engine = FakeEngine([long_reply])

    async def run():
        app = create_app(engine, store=store, resume=False)
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "Tell me all the steps")
            view = app.conversation
            await wait_for(pilot, lambda: view.max_scroll_y > 0 and view.scroll_y == view.max_scroll_y)
            bottom = view.scroll_y
            await pilot.press("pageup")
            await pilot.pause(0.05)
            assert view.scroll_y < bottom and app.focused is app.query_one(ChatInput)
            await pilot.press("h", "i")  # typing still goes to the input
            assert app.query_one(ChatInput).text == "hi"
            await pilot.press("pagedown")
            await pilot.pause(0.05)
            assert view.scroll_y > bottom - view.size.height
            await pilot.press("pageup", "pageup", "ctrl+end")
            await wait_for(pilot, lambda: view.scroll_y == view.max_scroll_y)

    asyncio.run(run())


def test_a_message_sent_while_the_model_loads_goes_when_it_is_ready(store):
    import threading

    release = threading.Event()

    def slow_loader(spec):
        release.wait(30)  # a phone loading a 2 GB model
        return FakeEngine(["Block it in the app."])

    async def run():
        app = create_app(engine_loader=slow_loader, store=store, resume=False, model_folders=[])
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.loading)
            app.query_one(ChatInput).focus()
            await pilot.press(*list("my card was stolen"))
            await pilot.press("enter")
            await pilot.pause(0.2)
            assert app.session is None and not app.query(UserMessage)  # not lost, not sent yet
            release.set()
            await wait_for(pilot, lambda: app.query(AssistantMessage) and not app.generating)
            assert [m.content for m in store.messages(app.chat_id)] == ["my card was stolen", "Block it in the app."]
            await app.action_quit()

    asyncio.run(run())
