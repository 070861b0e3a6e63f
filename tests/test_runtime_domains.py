"""Domain detection on hand-written messages and on real public queries (Banking77, MedQuAD, MedMCQA)."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections import Counter

import pytest

from care.runtime.domains import detect_domain


@pytest.mark.parametrize(("text", "domain"), [
    ("I lost my debit card, how do I block it?", "banking"),
    ("Why was I charged a fee on my transfer?", "banking"),
    ("My mobile data stopped working after I changed SIM", "telecom"),
    ("The wifi router keeps disconnecting", "telecom"),
    ("How do I top up airtime on my phone?", "telecom"),
    ("My child has a fever and a rash", "medical"),
    ("What are the symptoms of malaria?", "medical"),
    ("Hello!", "general"),
    ("Where is my order? It hasn't been delivered", "general"),
])
def test_detect_domain_examples(text, domain):
    assert detect_domain(text) == domain


def _rates(texts, want):
    got = Counter(detect_domain(t) for t in texts)
    n = len(texts)
    return got[want] / n, sum(v for k, v in got.items() if k not in (want, "general")) / n


@pytest.mark.parametrize("step", [4, pytest.param(1, marks=pytest.mark.slow)])  # default suite: a fixed quarter
def test_banking77_test_split(shared_data, step):
    rows = list(csv.DictReader(io.StringIO((shared_data / "banking77" / "test.csv").read_text(encoding="utf-8"))))
    rows = rows[::step]
    acc, wrong = _rates([r["text"] for r in rows], "banking")
    print(f"banking77 test n={len(rows)}: banking {acc:.3f}, wrong specific domain {wrong:.3f}")
    assert acc >= 0.75 and wrong <= 0.02  # measured 0.803 / 0.010; the rest falls back to "general"


@pytest.mark.parametrize("step", [4, pytest.param(1, marks=pytest.mark.slow)])  # default suite: a fixed subset
def test_medical_questions(shared_data, step):
    with gzip.open(shared_data / "medquad" / "medquad.normalized.jsonl.gz", "rt", encoding="utf-8") as fh:
        medquad = [json.loads(line)["query"] for line in fh][:: 8 * step]  # the triage runs first (~ms each)
    mcqa = [json.loads(line)["question"]
            for line in (shared_data / "medmcqa" / "dev.json").read_text(encoding="utf-8").splitlines()][:: 4 * step]
    acc, wrong = _rates(medquad, "medical")
    print(f"medquad n={len(medquad)}: medical {acc:.3f}, wrong {wrong:.3f}")
    assert acc >= 0.95 and wrong <= 0.01  # keyword rules alone: 0.880; with the domain model see bench/triage.py
    acc, wrong = _rates(mcqa, "medical")
    print(f"medmcqa dev n={len(mcqa)}: medical {acc:.3f}, wrong {wrong:.3f}")
    assert acc >= 0.45 and wrong <= 0.02  # exam stems ("Cold agglutinin is") are hard: measured 0.504 / 0.0067


@pytest.mark.parametrize("text", [
    "my 2 year old drank some of the bleach under the sink, what do I do",
    "he collapsed at the bank and isn't responding",
])
def test_emergency_routes_to_medical(text):
    assert detect_domain(text) == "medical"


def test_tui_new_chat_detects_its_own_domain(tmp_path):
    import asyncio

    from test_tui_app import SIZE, send_and_wait

    from care.domains import SYSTEM_PROMPTS
    from care.tui.app import create_app
    from care.tui.store import ChatStore
    from care.tui.testing import FakeEngine

    store = ChatStore(tmp_path / "chats.sqlite3")
    engine = FakeEngine(["Restart the router.", "Rest and drink water."])

    async def run():
        app = create_app(engine, store=store, resume=False, domain="auto")
        async with app.run_test(size=SIZE) as pilot:
            await send_and_wait(pilot, "My wifi router keeps disconnecting")
            first = app.domain
            await pilot.press("ctrl+n")
            await send_and_wait(pilot, "What are the symptoms of malaria?")
            return first, app.domain

    assert asyncio.run(run()) == ("telecom", "medical")
    assert engine.calls[1][0]["content"] == SYSTEM_PROMPTS["medical"]
    store.close()
