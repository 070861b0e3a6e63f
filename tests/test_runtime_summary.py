"""context="summarize": turns that no longer fit are folded into a rolling summary the model writes.

The bookkeeping (what is summarised, what the model then sees, reuse, fallbacks) is checked on the scripted
FakeEngine, whose replies are known; one test runs the real SmolLM2 GGUF end to end at a small n_ctx.
"""

from __future__ import annotations

import pytest

from care.runtime import summary as summary_mod
from care.runtime.backend import EngineConfig, GenerationResponse, SamplingConfig
from care.runtime.engine import ChatEngine
from care.runtime.session import ChatSession, ContextNote
from care.runtime.summary import SUMMARY_HEADER
from care.tui.testing import FakeEngine

SAMPLING = SamplingConfig(temperature=0.0, max_tokens=10)


@pytest.fixture(autouse=True)
def _fresh_cache():
    summary_mod.clear_cache()
    yield
    summary_mod.clear_cache()


def history(n: int) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"question {i} about account A{i}"},
                {"role": "assistant", "content": f"answer {i} for account A{i}"}]
    return out


def fake(replies, n_ctx=200) -> FakeEngine:
    engine = FakeEngine(replies=replies, n_ctx=n_ctx)
    engine.config.context_policy = "summarize"
    engine.config.summary_tokens = 8
    return engine


def test_dropped_turns_are_summarised_into_the_system_prompt():
    engine = fake(["SUM-ONE covers the first turns", "the reply"])
    s = ChatSession(engine, domain="banking", system="Be brief.", sampling=SAMPLING)
    s.load_messages(history(20))
    events = list(s.send("what about A9?"))
    (note,) = [e for e in events if isinstance(e, ContextNote)]
    assert note.summary == "SUM-ONE covers the first turns" and "summarised" in note.message
    summary_call, reply_call = engine.calls
    # The summariser saw exactly the turns that were left out, and nothing newer.
    asked = summary_call[-1]["content"]
    dropped_turns = history(20)[: note.dropped]
    assert all(m["content"] in asked for m in dropped_turns)
    assert history(20)[note.dropped]["content"] not in asked
    # The reply call: the system prompt carries the summary; the dropped turns themselves are gone.
    assert reply_call[0]["role"] == "system" and SUMMARY_HEADER in reply_call[0]["content"]
    assert reply_call[0]["content"].endswith("SUM-ONE covers the first turns")
    assert not any(m["content"] == dropped_turns[0]["content"] for m in reply_call)
    assert reply_call[-1] == {"role": "user", "content": "what about A9?"}
    assert events[-1].finish_reason == "stop" and events[-1].dropped_turns == note.dropped
    # Everything said is still kept for saving; the summary is the session's, not the history's.
    assert len(s.messages) == 1 + 40 + 2 and s.summary == note.summary
    assert s.messages[0] == {"role": "system", "content": "Be brief."}


def test_rolling_summary_only_adds_the_newly_dropped_turns():
    engine = fake(["SUM-ONE", "reply one", "SUM-TWO", "reply two"])
    s = ChatSession(engine, sampling=SAMPLING)
    s.load_messages(history(20))
    first = [e for e in s.send("next question please") if isinstance(e, ContextNote)][0]
    second = [e for e in s.send("and another question " + "please " * 30) if isinstance(e, ContextNote)][0]
    assert second.dropped > first.dropped and second.summary == "SUM-TWO"
    rolling = engine.calls[2][-1]["content"]
    assert "Summary so far: SUM-ONE" in rolling
    assert history(20)[0]["content"] not in rolling  # already in SUM-ONE, not summarised again
    assert SUMMARY_HEADER in engine.calls[3][0]["content"] and engine.calls[3][0]["content"].endswith("SUM-TWO")


def test_a_new_session_on_the_same_turns_reuses_the_summary():
    """The server builds a session per request from the whole history: the same turns are summarised once."""
    engine = fake(["SUM-ONE", "reply"])
    for _ in range(2):
        s = ChatSession(engine, sampling=SAMPLING)
        s.load_messages(history(20))
        list(s.send("what about A9?"))
    assert len(engine.calls) == 3  # one summary, two replies
    assert engine.calls[2][0]["content"].endswith("SUM-ONE")


def test_no_summary_call_when_everything_fits():
    engine = fake(["the reply"], n_ctx=400)
    s = ChatSession(engine, sampling=SAMPLING)
    s.load_messages(history(2))
    events = list(s.send("short"))
    assert not any(isinstance(e, ContextNote) for e in events) and len(engine.calls) == 1
    assert s.summary is None


def test_summary_too_long_to_fit_falls_back_to_dropping():
    engine = fake([" ".join(["word"] * 80), "the reply"])
    s = ChatSession(engine, sampling=SAMPLING)
    s.load_messages(history(20))
    events = list(s.send("what about A9 and the rest of my questions today? " + "please " * 100))
    (note,) = [e for e in events if isinstance(e, ContextNote)]
    assert note.summary is None and "left out" in note.message
    assert SUMMARY_HEADER not in engine.calls[-1][0]["content"]
    assert events[-1].finish_reason == "stop"


def test_empty_summary_keeps_the_users_own_words():
    engine = fake(["", "the reply"])
    engine.config.summary_tokens = 20
    s = ChatSession(engine, sampling=SAMPLING)
    s.load_messages(history(20))
    (note,) = [e for e in s.send("what about A9?") if isinstance(e, ContextNote)]
    assert note.summary and note.summary.startswith("The user said: question 0 about account A0")


def test_reset_forgets_the_summary():
    engine = fake(["SUM-ONE", "reply", "reply"])
    s = ChatSession(engine, sampling=SAMPLING)
    s.load_messages(history(20))
    list(s.send("what about A9?"))
    s.reset()
    assert s.summary is None
    list(s.send("hello"))
    assert SUMMARY_HEADER not in engine.calls[-1][0]["content"]


def test_unknown_policy_is_a_usage_error():
    from care.errors import UsageError

    with pytest.raises(UsageError, match="context policy"):
        ChatSession(FakeEngine(), context="forget")


class RecordingEngine(ChatEngine):
    """The real llama.cpp engine, noting what each generation was asked (a spy, not a stand-in)."""

    def stream(self, messages, sampling=None):
        self.asked = [*getattr(self, "asked", []), [dict(m) for m in messages]]
        return super().stream(messages, sampling)


def test_real_model_summarises_at_a_small_context(embedded_gguf):
    engine = RecordingEngine(embedded_gguf, EngineConfig(n_ctx=384, n_threads=1, context_policy="summarize",
                                                         summary_tokens=48))
    try:
        s = ChatSession(engine, domain="banking", sampling=SamplingConfig(temperature=0.0, seed=0, max_tokens=24))
        turns = []
        for i in range(8):
            turns += [{"role": "user", "content": f"My card ending {4410 + i} was charged twice at shop {i}."},
                      {"role": "assistant", "content": f"I can help with the double charge on card {4410 + i}. "
                                                       "Please check the statement and contact support."}]
        s.load_messages(turns)
        assert s.context_used() > engine.n_ctx
        events = list(s.send("Can you refund the last one?"))
        (note,) = [e for e in events if isinstance(e, ContextNote)]
        assert note.summary and note.summary == s.summary
        final = events[-1]
        assert isinstance(final, GenerationResponse) and final.finish_reason in ("stop", "length")
        *summary_requests, reply_request = engine.asked
        assert summary_requests and "4410" in summary_requests[0][-1]["content"]  # the oldest turn went there
        assert reply_request[0]["content"].endswith(note.summary)
        assert final.prompt_tokens + 24 <= engine.n_ctx
        assert s.context_used() <= engine.n_ctx
    finally:
        engine.close()
