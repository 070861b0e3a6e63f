"""care.runtime.llama_compat: the named door to llama-cpp-python's internals, on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest

from care.gguf_file import read_header
from care.runtime import llama_compat


@pytest.fixture()
def llm(smollm_engine):
    llm = smollm_engine.llm
    llm.reset()
    yield llm
    llm.reset()


def test_model_facts_agree_with_the_gguf_header(llm, smollm_engine, embedded_gguf):
    meta = read_header(embedded_gguf).metadata
    assert llama_compat.n_ctx_train(llm) == meta["llama.context_length"]
    eos = meta["tokenizer.ggml.eos_token_id"]
    assert llama_compat.is_eog(llm, eos) and not llama_compat.is_eog(llm, llm.tokenize(b"Hello", add_bos=False)[0])
    eot = llama_compat.token_eot(llm)
    assert eot == -1 or (0 <= eot < llm.n_vocab() and llama_compat.is_eog(llm, eot))
    assert llama_compat.model_handle(llm) and llama_compat.vocab(llm) and llama_compat.ctx_handle(llm)


def test_saved_kv_state_gives_the_same_next_logits(llm):
    prompt = llm.tokenize(b"The clinic opens at eight and", add_bos=True)
    llm.eval(prompt[:-1])
    state = llama_compat.state_get(llm)
    llm.eval(prompt[-1:])
    want = np.array(llama_compat.logits_ith(llm, -1))
    assert want.shape == (llm.n_vocab(),) and np.isfinite(want).all()
    llm.reset()
    llama_compat.clear_kv(llm)
    assert llama_compat.state_set(llm, state)
    llama_compat.mark_evaluated(llm, prompt[:-1])
    assert llm.n_tokens == len(prompt) - 1
    llm.eval(prompt[-1:])
    got = np.array(llama_compat.logits_ith(llm, -1))
    assert int(got.argmax()) == int(want.argmax()) and np.allclose(got, want, atol=1e-3)
    assert not llama_compat.state_set(llm, b"not a llama.cpp state")  # refused, and the KV cache cleared


def test_log_callback_takes_llama_cpp_log_then_gives_it_back(embedded_gguf):
    llama_cpp = llama_compat.load()
    seen: list[str] = []
    with llama_compat.log_callback(seen.append):
        llama_cpp.Llama(model_path=str(embedded_gguf), n_ctx=64, n_threads=1, verbose=False).close()
    assert any("llama_model_loader" in text or "print_info" in text for text in seen)
    n = len(seen)
    llama_cpp.Llama(model_path=str(embedded_gguf), n_ctx=64, n_threads=1, verbose=False).close()
    assert len(seen) == n
