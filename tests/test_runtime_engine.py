"""The llama.cpp engine on the real embedded SmolLM2 GGUF: templates, stops, streaming, cancel, context."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from care.errors import GenerationError, InvalidModelError, ModelNotFoundError
from care.runtime.backend import EngineConfig, SamplingConfig
from care.runtime.engine import ChatEngine

GREEDY = SamplingConfig(temperature=0.0, seed=0, max_tokens=24)
Q = [{"role": "user", "content": "What is the capital of France?"}]


def test_template_rendering_is_the_gguf_template(smollm_engine):
    text = smollm_engine.render([{"role": "system", "content": "S"}, *Q])
    assert text.startswith("<|im_start|>system\nS<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in smollm_engine.stop_strings and "<|endoftext|>" in smollm_engine.stop_strings
    no_gen = smollm_engine.render(Q, add_generation_prompt=False)
    assert not no_gen.endswith("<|im_start|>assistant\n")


def test_named_phi3_template_stops_on_end(embedded_gguf):
    engine = ChatEngine(embedded_gguf, EngineConfig(n_ctx=256, n_threads=1, chat_template="phi3"))
    try:
        assert engine.render(Q) == "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"
        assert {"<|end|>", "<|endoftext|>"} <= set(engine.stop_strings)
    finally:
        engine.close()


def test_stream_chunks_and_totals(smollm_engine):
    chunks = list(smollm_engine.stream(Q, GREEDY))
    *texts, last = chunks
    assert texts and all(c.finish_reason is None for c in texts)
    assert last.finish_reason in ("stop", "length") and last.text == ""
    assert last.prompt_tokens == len(smollm_engine.tokenize(smollm_engine.render(Q)))
    assert 1 <= last.completion_tokens <= GREEDY.max_tokens
    assert last.ttft_s and last.ttft_s > 0 and last.tokens_per_s > 0
    full = "".join(c.text for c in texts)
    assert full.strip()
    assert all(s not in full for s in smollm_engine.stop_strings)
    # Greedy decoding is deterministic through chat() as well.
    assert smollm_engine.chat(Q, GREEDY).text == full


def test_stop_string_truncates(smollm_engine):
    full = smollm_engine.chat(Q, GREEDY).text
    word = full.split()[2]
    cut = smollm_engine.chat(Q, SamplingConfig(temperature=0.0, max_tokens=24, stop=(word,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full[: full.index(word)]


def test_cancel_mid_generation_and_engine_stays_usable(smollm_engine):
    reference = smollm_engine.chat(Q, GREEDY).text
    long = SamplingConfig(temperature=0.0, max_tokens=200)
    got = []
    result = {}

    def worker():
        for chunk in smollm_engine.stream([{"role": "user", "content": "Write a long story about a cat."}], long):
            got.append(chunk)
            if len(got) == 3:
                threading.Thread(target=smollm_engine.cancel).start()
        result["last"] = got[-1]

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    assert result["last"].finish_reason == "cancelled"
    assert len(got) < 60
    # A cancel left no state behind: the next run is the same greedy text as before.
    assert smollm_engine.chat(Q, GREEDY).text == reference


def test_context_trimming_at_the_limit(embedded_gguf):
    engine = ChatEngine(embedded_gguf, EngineConfig(n_ctx=160, n_threads=1, sampling=GREEDY))
    try:
        history = [{"role": "system", "content": "You are brief."}]
        for i in range(8):
            history += [{"role": "user", "content": f"Question number {i}: tell me about topic {i}."},
                        {"role": "assistant", "content": f"Topic {i} is a fine topic with details."}]
        history.append({"role": "user", "content": "And the last question?"})
        kept, tokens, dropped = engine.fit(history, GREEDY.max_tokens)
        assert dropped > 0 and kept[0]["role"] == "system" and kept[-1] == history[-1]
        assert len(tokens) + GREEDY.max_tokens <= engine.n_ctx
        # One more kept message would not fit: the trim is at the limit, not generous.
        again = [kept[0], history[len(history) - len(kept)], *kept[1:]]
        assert len(engine.tokenize(engine.render(again))) + GREEDY.max_tokens > engine.n_ctx
        last = list(engine.stream(history))[-1]
        assert last.dropped_turns == dropped and last.finish_reason in ("stop", "length")
        # A single over-long message: a clear error, and the engine still works afterwards.
        with pytest.raises(GenerationError, match="too long"):
            list(engine.stream([{"role": "user", "content": "word " * 400}]))
        with pytest.raises(GenerationError, match="no room"):
            engine.fit(Q, 400)
        assert engine.chat(Q).finish_reason in ("stop", "length")
    finally:
        engine.close()


def test_missing_and_truncated_gguf(tmp_path, embedded_gguf):
    with pytest.raises(ModelNotFoundError):
        ChatEngine(tmp_path / "nope.gguf")
    bad = tmp_path / "half.gguf"
    with open(embedded_gguf, "rb") as src:
        bad.write_bytes(src.read(embedded_gguf.stat().st_size // 2))
    with pytest.raises(InvalidModelError, match="could not load"):
        ChatEngine(bad)


def test_gguf_without_template_fails_clearly_unless_named(tmp_path, embedded_gguf):
    plain = tmp_path / "no-template.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(embedded_gguf), str(plain),
                    "--remove-metadata", "tokenizer.chat_template", "--force"],
                   check=True, capture_output=True)
    with pytest.raises(InvalidModelError, match="no chat template") as err:
        ChatEngine(plain, EngineConfig(n_ctx=128, n_threads=1))
    assert "--chat-template" in err.value.one_line()
    engine = ChatEngine(plain, EngineConfig(n_ctx=128, n_threads=1, chat_template="chatml"))
    try:
        assert engine.render(Q).startswith("<|im_start|>user\n")
    finally:
        engine.close()
