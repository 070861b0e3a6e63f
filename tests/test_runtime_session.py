"""ChatSession: notices before model text, context notes, medical framing, cancel, restore."""

from __future__ import annotations

import threading

import pytest

from care.domains import system_prompt
from care.errors import GenerationError, UsageError
from care.runtime import triage
from care.runtime.backend import EngineConfig, GenerationResponse, SamplingConfig
from care.runtime.engine import ChatEngine
from care.runtime.session import AnywayNote, ChatSession, ContextNote, SafetyNotice

GREEDY = SamplingConfig(temperature=0.0, seed=0, max_tokens=16)


def test_red_flag_notice_and_card_then_the_model_only_when_asked(smollm_engine):
    s = ChatSession(smollm_engine, domain="auto", sampling=GREEDY)
    events = list(s.send("My wife has sudden chest pain and can't breathe"))
    assert [type(e).__name__ for e in events] == ["SafetyNotice", "FirstAidCard", "GenerationResponse"]
    assert events[0].category in ("chest_pain", "difficulty_breathing") and events[1].category == events[0].category
    assert set(s.last_verdict.categories) >= {"chest_pain", "difficulty_breathing"}
    assert s.domain == "medical" and s.messages[0]["content"] == system_prompt("medical")
    assert s.messages[-2] == {"role": "user", "content": "My wife has sudden chest pain and can't breathe"}
    asked = list(s.answer_anyway())  # the real model, under the turn's instruction
    assert isinstance(asked[0], AnywayNote) and asked[-1].finish_reason in ("stop", "length")
    reply = s.messages[-1]
    assert reply["role"] == "assistant" and reply["content"].startswith(events[0].message)
    assert reply["content"].rstrip().endswith(triage.framing(s.rules, "disclaimer", s.languages))


def test_banking_message_no_notice_no_disclaimer(smollm_engine):
    s = ChatSession(smollm_engine, domain="auto", sampling=GREEDY)
    events = list(s.send("My card payment bounced, what can I do?"))
    assert not any(isinstance(e, SafetyNotice) for e in events)
    assert s.domain == "banking" and "not a diagnosis" not in s.messages[-1]["content"]
    # The domain is fixed after the first message.
    list(s.send("Also I have a headache and fever"))
    assert s.domain == "banking"


def test_domain_setter_and_bad_domain(smollm_engine):
    s = ChatSession(smollm_engine, domain="telecom", sampling=GREEDY)
    assert s.messages[0]["content"] == system_prompt("telecom")
    s.domain = "medical"
    assert s.messages[0]["content"] == system_prompt("medical") and len(s.messages) == 1
    with pytest.raises(UsageError):
        ChatSession(smollm_engine, domain="cooking")
    custom = ChatSession(smollm_engine, domain="banking", system="Be terse.")
    assert custom.messages[0]["content"] == "Be terse."


def test_disclaimer_not_fed_back_to_the_model(smollm_engine):
    s = ChatSession(smollm_engine, domain="medical", sampling=GREEDY)
    list(s.send("What helps a sore throat?"))
    before = s.context_used()
    prompt = smollm_engine.render(s._prompt_messages(s.messages))
    assert "not a diagnosis" not in prompt and "not a diagnosis" in s.messages[-1]["content"]
    list(s.send("And for a cough?"))
    assert s.context_used() > before


def test_context_note_when_old_turns_are_dropped(embedded_gguf):
    engine = ChatEngine(embedded_gguf, EngineConfig(n_ctx=256, n_threads=1, sampling=GREEDY))
    try:
        s = ChatSession(engine, domain="general", sampling=GREEDY)
        history = []
        for i in range(10):
            history += [{"role": "user", "content": f"Tell me fact number {i} about the sea and the sky."},
                        {"role": "assistant", "content": f"Fact {i}: the sea and the sky are both blue often."}]
        s.load_messages(history)
        assert s.messages[0]["role"] == "system" and len(s.messages) == 21
        assert s.context_used() > engine.n_ctx  # the history alone no longer fits
        events = list(s.send("One more?"))
        notes = [e for e in events if isinstance(e, ContextNote)]
        assert len(notes) == 1 and notes[0].dropped > 0 and "256" in notes[0].message
        assert events[-1].dropped_turns == notes[0].dropped
        assert len(s.messages) == 23  # the full history is kept for saving; only the prompt is trimmed
        assert s.context_used() <= engine.n_ctx  # the status bar counts what the model still sees
        with pytest.raises(GenerationError):
            list(s.send("long " * 500))
        assert s.messages[-1]["content"] != "long " * 500  # the refused message was not recorded
    finally:
        engine.close()


def test_cancel_keeps_partial_reply(smollm_engine):
    s = ChatSession(smollm_engine, domain="general",
                    sampling=SamplingConfig(temperature=0.0, max_tokens=200))
    texts = []
    last = None
    for ev in s.send("Write a long story about a lighthouse keeper."):
        if isinstance(ev, GenerationResponse) and ev.finish_reason is None:
            texts.append(ev.text)
            if len(texts) == 4:
                threading.Thread(target=s.cancel).start()
        elif isinstance(ev, GenerationResponse):
            last = ev
    assert last is not None and last.finish_reason == "cancelled"
    assert s.messages[-1] == {"role": "assistant", "content": "".join(texts)}
    assert len(texts) < 100
    # The session and the engine carry on.
    s.sampling = GREEDY
    assert list(s.send("Thanks!"))[-1].finish_reason in ("stop", "length")


def test_consumer_stopping_early_records_partial_and_frees_engine(smollm_engine):
    s = ChatSession(smollm_engine, sampling=SamplingConfig(temperature=0.0, max_tokens=100))
    gen = s.send("Count from one to fifty in words.")
    got = [next(gen).text for _ in range(3)]
    gen.close()
    assert s.messages[-1]["content"] == "".join(got)
    assert smollm_engine._lock.acquire(timeout=5)
    smollm_engine._lock.release()


def test_load_messages_rejects_bad_roles(smollm_engine):
    s = ChatSession(smollm_engine)
    with pytest.raises(UsageError, match="role"):
        s.load_messages([{"role": "wizard", "content": "x"}])
    s.load_messages([{"role": "system", "content": "Saved prompt"}, {"role": "user", "content": "hi"}])
    assert s.messages[0]["content"] == "Saved prompt"
