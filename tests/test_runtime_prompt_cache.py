"""The persistent prompt cache and prefix reuse, counted in tokens llama.cpp really evaluated."""

from __future__ import annotations

import hashlib

import pytest

from care.domains import system_prompt
from care.runtime.backend import EngineConfig, SamplingConfig
from care.runtime.engine import ChatEngine
from care.runtime.prompt_cache import model_sha256, read_state, write_state

QUESTION = "What helps a mild headache?"


def _engine(gguf, folder, n_ctx=1024):
    return ChatEngine(gguf, EngineConfig(n_ctx=n_ctx, n_threads=1, prompt_cache=True, prompt_cache_dir=str(folder),
                                         sampling=SamplingConfig(temperature=0.0, seed=0, max_tokens=6)))


def _chat(domain="general", question=QUESTION):
    return [{"role": "system", "content": system_prompt(domain)}, {"role": "user", "content": question}]


def test_new_chat_loads_the_saved_opening_instead_of_prefilling(embedded_gguf, tmp_path):
    first = _engine(embedded_gguf, tmp_path)
    try:
        prefix = first.prompt_cache.prefix_tokens(_chat())
        cold = first.chat(_chat())
    finally:
        first.close()
    assert cold.prompt_cache == "built"
    assert cold.prefill_tokens == cold.prompt_tokens
    assert len(list(tmp_path.glob("*.kv"))) == 1

    second = _engine(embedded_gguf, tmp_path)
    try:
        warm = second.chat(_chat())
    finally:
        second.close()
    assert warm.prompt_cache == "hit"
    assert warm.prefill_tokens == warm.prompt_tokens - len(prefix)
    assert len(prefix) > 10  # the template and the system prompt, not just BOS
    assert warm.text == cold.text  # greedy: the loaded state is the evaluated one


def test_follow_up_turn_prefills_only_its_new_tokens(embedded_gguf, tmp_path):
    engine = _engine(embedded_gguf, tmp_path)
    try:
        one = engine.chat(_chat())
        in_context = engine.llm.n_tokens  # prompt + the reply tokens evaluated (the last sampled one is not)
        assert in_context == one.prompt_tokens + one.completion_tokens - 1
        history = [*_chat(), {"role": "assistant", "content": one.text}, {"role": "user", "content": "And a fever?"}]
        two = engine.chat(history)
    finally:
        engine.close()
    # The re-rendered conversation starts with exactly the tokens already in the context (no duplicated BOS,
    # the reply re-tokenized the same), so only the end of the reply's turn and the new question are new.
    assert two.prompt_cache == "live"
    assert two.prefill_tokens == two.prompt_tokens - in_context
    assert 0 < two.prefill_tokens < 20
    assert two.prompt_tokens > one.prompt_tokens + 10


@pytest.mark.parametrize("damage", ["flip", pytest.param("truncate", marks=pytest.mark.slow),
                                    pytest.param("garbage", marks=pytest.mark.slow)])
def test_corrupt_cache_is_ignored_and_rebuilt(embedded_gguf, tmp_path, damage):
    engine = _engine(embedded_gguf, tmp_path)
    try:
        reference = engine.chat(_chat()).text
    finally:
        engine.close()
    (path,) = tmp_path.glob("*.kv")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-100] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a cache at all")
    path.write_bytes(bytes(data))

    for expected in ("built", "hit"):  # rebuilt once, then trusted again
        engine = _engine(embedded_gguf, tmp_path)
        try:
            reply = engine.chat(_chat())
        finally:
            engine.close()
        assert reply.prompt_cache == expected
        assert reply.text == reference


@pytest.mark.slow
def test_key_covers_context_and_kv_settings(embedded_gguf, tmp_path):
    for n_ctx in (512, 1024):
        engine = _engine(embedded_gguf, tmp_path, n_ctx=n_ctx)
        try:
            assert engine.chat(_chat()).prompt_cache == "built"
        finally:
            engine.close()
    assert len(list(tmp_path.glob("*.kv"))) == 2


def test_state_file_checks_key_tokens_and_payload(tmp_path):
    path = tmp_path / "x.kv"
    key = {"model_sha256": "a" * 64, "n_ctx": 4096}
    write_state(path, key, [1, 2, 3], b"payload")
    assert read_state(path, key, [1, 2, 3]) == b"payload"
    assert read_state(path, {**key, "n_ctx": 2048}, [1, 2, 3]) is None
    assert read_state(path, key, [1, 2, 4]) is None
    assert read_state(tmp_path / "missing.kv", key, [1]) is None


def test_model_hash_is_remembered_by_path_size_and_mtime(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 1000)
    digest = model_sha256(model)
    assert digest == hashlib.sha256(model.read_bytes()).hexdigest()
    model.write_bytes(b"GGUF" + b"\1" * 1000)  # same size; the new mtime makes it hash again
    import os

    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    assert model_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest() != digest


def test_session_follow_up_reuses_the_conversation(embedded_gguf, tmp_path):
    """Through the chat path: the session's added disclaimer is stripped again, so the prefix holds."""
    from care.runtime.session import ChatSession

    engine = _engine(embedded_gguf, tmp_path)
    try:
        session = ChatSession(engine, domain="medical")
        finals = []
        for text in ("I have a mild headache.", "It started this morning."):
            finals.append([e for e in session.send(text) if getattr(e, "finish_reason", None)][-1])
            in_context = engine.llm.n_tokens
    finally:
        engine.close()
    first, second = finals
    assert first.prompt_cache == "built"
    assert second.prompt_cache == "live"
    assert second.prefill_tokens < 20 < second.prompt_tokens - second.prefill_tokens
    assert in_context >= second.prompt_tokens


def test_unwritable_cache_folder_costs_only_the_saving(embedded_gguf, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    engine = _engine(embedded_gguf, blocker)
    try:
        reply = engine.chat(_chat())
    finally:
        engine.close()
    assert reply.finish_reason in ("stop", "length") and reply.text
    assert reply.prefill_tokens == reply.prompt_tokens
    assert blocker.read_text().startswith("a file")
