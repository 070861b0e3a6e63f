"""SVG snapshots of the chat app (pytest-textual-snapshot): main screen, history, a model error.

Deterministic on purpose: a scripted fake engine, a fixed clock for stored chats, UTC, 80x24.
Update after an intended change with: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import time

import pytest

from care.tui.app import create_app
from care.tui.store import ChatStore
from care.tui.testing import FakeEngine
from care.tui.widgets import ChatInput

SIZE = (80, 24)
T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC


@pytest.fixture
def fixed_store(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    ticks = iter(range(10_000))
    store = ChatStore(tmp_path / "chats.sqlite3", clock=lambda: T0 + 60 * next(ticks))
    yield store
    store.close()
    monkeypatch.delenv("TZ")
    time.tzset()


async def _wait(pilot, cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting for the app"
        await pilot.pause(0.02)


async def _steady(pilot) -> None:
    """No blinking cursor in a snapshot (the app blinks for users; a screenshot would catch either phase)."""
    for box in pilot.app.query(ChatInput):
        box.cursor_blink = False
    # The footer shows a key once check_action allows it ("f5 Ask anyway" after a flagged turn); on a loaded
    # machine its refresh can land after the screenshot, so ask for it and let it render.
    pilot.app.refresh_bindings()
    await pilot.pause(0.15)


async def _send(pilot, text: str) -> None:
    app = pilot.app
    await _wait(pilot, lambda: app.session is not None)
    app.query_one(ChatInput).focus()
    await pilot.press(*list(text), "enter")
    await _wait(pilot, lambda: app.chat_id is not None and not app.generating)
    await pilot.pause(0.1)


def test_main_screen_with_safety_notice_and_first_aid_card(snap_compare, fixed_store):
    engine = FakeEngine(["While you wait for help:\n\n- **Sit down** and rest\n- Loosen tight clothing"])
    app = create_app(engine, store=fixed_store, resume=False, domain="medical")

    async def run_before(pilot) -> None:
        await _send(pilot, "I have chest pain and feel dizzy")
        await _steady(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_history_screen(snap_compare, fixed_store):
    for title, domain, question, answer in [
        ("", "telecom", "My internet is down since this morning", "Restart the router."),
        ("Blocked card, Mrs K.", "banking", "I lost my card", "Block it in the app."),
        ("", "medical", "Child has a mild fever", "Give fluids and watch."),
    ]:
        chat = fixed_store.new_chat(domain, "FakeModel-1M", title=title)
        fixed_store.add_message(chat, "user", question)
        fixed_store.add_message(chat, "assistant", answer)
    app = create_app(FakeEngine(), store=fixed_store, resume=False)

    async def run_before(pilot) -> None:
        await _steady(pilot)
        await pilot.press("f2")
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_error_state_missing_model(snap_compare, fixed_store):
    def loader(spec):
        from care.models import resolve_gguf

        return resolve_gguf(spec)  # raises ModelNotFoundError, as the real loader would

    app = create_app(engine_loader=loader, model="/clinic/models/care-phi35-q4.gguf", store=fixed_store,
                     resume=False)

    async def run_before(pilot) -> None:
        await _wait(pilot, lambda: app.load_error is not None)
        await _steady(pilot)
        await pilot.pause(0.1)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
