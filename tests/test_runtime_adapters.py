"""Per-domain LoRA adapters over one base at run time: switching without reloading, the KV/prefix cache
invalidated on every switch, the session's domain picking the adapter, and the server's model selection."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import make_adapter

from care.errors import ModelNotFoundError, UsageError
from care.export.gguf import export_gguf
from care.export.lora import export_gguf_lora
from care.runtime.adapters import parse_adapters
from care.runtime.backend import EngineConfig, SamplingConfig
from care.runtime.engine import ChatEngine

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [{"role": "user", "content": "My card was blocked, what should I do?"}]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama) -> tuple[Path, dict[str, Path], Path]:
    """An f16 tiny-Llama base and two strong, different adapters exported into one folder (as for --adapters DIR)."""
    root = tmp_path_factory.mktemp("adapters")
    base = export_gguf(tiny_llama, root / "base", quants=("f16",), verify=False).files["f16"]
    files = {}
    for seed, name in enumerate(("medical", "banking")):
        hf = make_adapter(tiny_llama, tmp_path_factory.mktemp("hf") / name, targets=TARGETS, b_std=0.3, seed=10 + seed)
        files[name] = export_gguf_lora(hf, root / name, base=tiny_llama, verify=False, name=name).adapter
    return base, files, root


def _engine(base: Path, files: dict[str, Path]) -> ChatEngine:
    return ChatEngine(base, EngineConfig(n_ctx=256, n_threads=1, adapters={k: str(v) for k, v in files.items()},
                                         sampling=SamplingConfig(temperature=0.0, seed=0, max_tokens=10,
                                                                 repeat_penalty=1.0)))


def _reply(engine: ChatEngine, adapters: tuple[tuple[str, float], ...]) -> str:
    s = SamplingConfig(temperature=0.0, seed=0, max_tokens=10, repeat_penalty=1.0, adapters=adapters)
    return engine.generate(PROMPT, s).text


@pytest.fixture(scope="module")
def fresh(adapters) -> dict[str, str]:
    """Each adapter's greedy reply from an engine that never ran anything else."""
    base, files, _ = adapters
    out = {}
    for name in ("medical", "banking", ""):
        engine = _engine(base, {name: files[name]} if name else {})
        try:
            out[name] = _reply(engine, ((name, 1.0),) if name else ())
        finally:
            engine.close()
    assert len(set(out.values())) == 3, out  # the adapters really change the output (else the test proves nothing)
    return out


def test_switching_reuses_the_base_and_never_a_prefix_from_another_adapter(adapters, fresh):
    base, files, _ = adapters
    engine = _engine(base, files)
    try:
        llm = engine.llm
        # Same prompt each time: llama-cpp-python would reuse all but one prompt token of the KV cache.
        for name in ("medical", "banking", "", "banking", "medical"):
            assert _reply(engine, ((name, 1.0),) if name else ()) == fresh[name], name
            assert engine.active_adapter == name
        assert engine.llm is llm and engine.adapters.switches == 5  # switched in place, never reloaded
        assert engine.adapters.last_switch_s < 1.0
        # Same adapter twice: nothing to switch, the prefix cache stays usable.
        _reply(engine, (("medical", 1.0),))
        assert engine.adapters.switches == 5
        with pytest.raises(UsageError, match="Unknown adapter 'legal'"):
            _reply(engine, (("legal", 1.0),))
    finally:
        engine.close()


def test_session_domain_picks_the_adapter(adapters):
    from care.runtime.session import ChatSession

    base, files, _ = adapters
    engine = _engine(base, files)
    try:
        session = ChatSession(engine, domain="banking", safety=False)
        list(session.send("Hello"))
        assert engine.active_adapter == "banking"
        session.domain = "medical"
        list(session.send("And a fever?"))
        assert engine.active_adapter == "medical"
        session.domain = "telecom"  # no adapter for it: the base alone
        list(session.send("My SIM?"))
        assert engine.active_adapter == ""
    finally:
        engine.close()


def test_server_lists_one_model_per_adapter_and_picks_by_model_or_lora(adapters, fresh):
    from starlette.testclient import TestClient

    from care.runtime.server import create_app

    base, files, _ = adapters
    engine = _engine(base, files)
    try:
        client = TestClient(create_app(engine, domain="general", model_id="tiny-base"))
        data = client.get("/v1/models").json()["data"]
        assert [m["id"] for m in data] == ["tiny-base", "medical", "banking"]
        assert [m.get("lora_id") for m in data] == [None, 0, 1]

        def ask(**kw) -> str:
            body = {"messages": PROMPT, "temperature": 0, "max_tokens": 10, "seed": 0, "repeat_penalty": 1.0, **kw}
            r = client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        by_model = ask(model="banking")
        assert engine.active_adapter == "banking"
        assert ask(lora=[{"id": 0, "scale": 1.0}]) != by_model and engine.active_adapter == "medical"
        assert ask(lora=[{"id": 1, "scale": 1.0}]) == by_model
        ask(model="tiny-base")
        assert engine.active_adapter == ""
        bad = client.post("/v1/chat/completions", json={"messages": PROMPT, "lora": [{"id": 7}]})
        assert bad.status_code == 400 and "lora[0].id" in bad.json()["error"]["message"]
    finally:
        engine.close()


def test_parse_adapters_pairs_folder_and_errors(adapters, tmp_path):
    _, files, root = adapters
    assert parse_adapters(f"medical={files['medical']},banking={files['banking']}") == {
        k: str(v) for k, v in files.items()}
    # A folder of `care export gguf-lora` outputs; the merged-export manifest in base/ is not an adapter.
    assert parse_adapters(root) == {k: str(v) for k, v in files.items()}
    with pytest.raises(UsageError, match="NAME=FILE"):
        parse_adapters("medical")
    with pytest.raises(ModelNotFoundError, match="'banking'"):
        parse_adapters(f"banking={tmp_path / 'missing.gguf'}")
