"""The one engine interface: ChatBackend, the shared context budget (fit), load_engine, no tui -> commands cycle.

fit() must cost linear time: these tests count tokenisations (calls and text tokenised), never seconds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from care.errors import GenerationError
from care.runtime.backend import ChatBackend, ContextBudget, EngineConfig, SamplingConfig
from care.tui.testing import FakeEngine

LONG = "word " * 3000


class CountingFake(FakeEngine):
    """The test engine, counting how much text goes through tokenize()."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.calls_tokenize = 0
        self.words_tokenized = 0

    def tokenize(self, text: str) -> list[int]:
        self.calls_tokenize += 1
        self.words_tokenized += len(text.split())
        return super().tokenize(text)


def _history(turns: int, content: str = LONG) -> list[dict[str, str]]:
    out = [{"role": "system", "content": "You help."}]
    for i in range(turns):
        out.append({"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} {content}"})
    return out


def _assert_minimal(engine, messages, max_tokens, kept, tokens, dropped) -> None:
    """The kept prompt fits, and keeping one more of the dropped turns would not (checked with the engine)."""
    assert len(tokens) + max_tokens <= engine.n_ctx
    assert tokens == engine.tokenize(engine.render(kept))
    assert kept[-1] == messages[-1] and kept[0] == messages[0]
    assert kept[1:] == messages[len(messages) - (len(kept) - 1):]  # the newest turns, in order
    if dropped:
        one_more = [messages[0], messages[dropped], *kept[1:]]  # the newest dropped turn back
        assert len(engine.tokenize(engine.render(one_more))) + max_tokens > engine.n_ctx


def test_fit_is_linear_in_the_history():
    engine = CountingFake(n_ctx=8192)
    messages = _history(20)
    total_words = sum(len(m["content"].split()) for m in messages)
    kept, tokens, dropped = engine.fit(messages, 64)
    assert dropped == 18 and len(kept) == 3
    _assert_minimal(engine, messages, 64, kept, tokens, dropped)
    engine.calls_tokenize = engine.words_tokenized = 0
    engine._token_counts.clear()
    engine.fit(messages, 64)
    # One tokenisation per message plus a few of the (n_ctx-sized) kept prompt; the old loop re-tokenised the
    # whole remaining history once per dropped message (~19 x 60,000 words here).
    assert engine.calls_tokenize <= len(messages) + 4
    assert engine.words_tokenized <= total_words + 4 * engine.n_ctx


def test_fit_caches_message_counts_across_calls():
    engine = CountingFake(n_ctx=8192)
    messages = _history(20)
    engine.fit(messages, 64)
    engine.calls_tokenize = 0
    more = [*messages, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}]
    kept, tokens, dropped = engine.fit(more, 64)
    assert engine.calls_tokenize <= 2 + 4  # the two new messages, then the kept prompt
    _assert_minimal(engine, more, 64, kept, tokens, dropped)


@pytest.mark.parametrize("sizes", [[5] * 300, [1, 2000, 3, 1500, 7, 40, 3000, 2], [700] * 12])
def test_fit_keeps_every_turn_that_fits(sizes):
    engine = FakeEngine(n_ctx=4096)
    messages = [{"role": "system", "content": "sys"}]
    for i, n in enumerate(sizes):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": "w " * n})
    messages.append({"role": "user", "content": "the question"})
    kept, tokens, dropped = engine.fit(messages, 100)
    _assert_minimal(engine, messages, 100, kept, tokens, dropped)


def test_fit_errors_name_the_problem():
    engine = FakeEngine(n_ctx=512)
    with pytest.raises(GenerationError, match="too long"):
        engine.fit([{"role": "system", "content": "s"}, {"role": "user", "content": LONG}], 64)
    with pytest.raises(GenerationError, match="--max-tokens 600 leaves no room"):
        engine.fit([{"role": "user", "content": "hi"}], 600)


def test_engines_share_one_budget_and_are_backends(smollm_engine):
    from care.runtime.engine import ChatEngine
    from care.runtime.onnx_engine import OnnxChatEngine

    assert ChatEngine.fit is ContextBudget.fit and OnnxChatEngine.fit is ContextBudget.fit
    assert FakeEngine.fit is ContextBudget.fit
    assert isinstance(smollm_engine, ChatBackend) and isinstance(FakeEngine(), ChatBackend)
    info = smollm_engine.info()
    assert info.backend == "llama.cpp" and info.n_ctx == 2048 and info.quant


def test_real_engine_fits_a_long_history_with_few_tokenisations(smollm_engine, monkeypatch):
    calls = {"tokenize": 0, "count": 0}
    real_tokenize, real_count = smollm_engine.tokenize, smollm_engine.count_tokens

    def tokenize(text):
        calls["tokenize"] += 1
        return real_tokenize(text)

    def count(text):
        calls["count"] += 1
        return real_count(text)

    monkeypatch.setattr(smollm_engine, "tokenize", tokenize)
    monkeypatch.setattr(smollm_engine, "count_tokens", count)
    messages = _history(20, "The patient reports a mild headache since yesterday. " * 60)
    kept, tokens, dropped = smollm_engine.fit(messages, 32)
    assert calls["count"] <= len(messages) and calls["tokenize"] <= 4
    monkeypatch.undo()
    _assert_minimal(smollm_engine, messages, 32, kept, tokens, dropped)


def test_load_engine_picks_the_backend(embedded_gguf, tmp_path):
    from care.errors import CareError
    from care.runtime.loader import load_engine

    engine = load_engine(embedded_gguf, EngineConfig(n_ctx=256, n_threads=1, sampling=SamplingConfig(max_tokens=4)))
    try:
        assert engine.info().backend == "llama.cpp" and engine.n_ctx == 256
    finally:
        engine.close()
    (tmp_path / "genai_config.json").write_text("{}")
    with pytest.raises(CareError):  # an ONNX folder goes to the ONNX engine, which says what is wrong
        load_engine(tmp_path)


def test_tui_does_not_import_the_cli():
    code = ("import sys, care.tui.app; bad = [m for m in sys.modules if m.startswith('care.commands')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
