"""Shared fixtures. Every test runs offline, with user folders pointed at its own tmp_path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two cores, several llama.cpp/torch users: one thread each keeps the suite from spin-waiting on itself.
os.environ.setdefault("CARE_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parent.parent
# llama.cpp's converter (care export setup) is fetched once per checkout, not once per test's CARE_HOME.
os.environ.setdefault("CARE_CONVERTER_DIR", str(REPO / ".cache" / "tests" / "llama.cpp-converter"))
# The CPU guard's choice and probe models: once per checkout and machine, not once per test's CARE_HOME.
os.environ.setdefault("CARE_CPU_GUARD_CACHE", str(REPO / ".cache" / "tests" / "cpu-guard"))
# Cached llama.cpp builds (portable wheel, aarch64 tools): the same folder `make setup` fills.
os.environ.setdefault("CARE_LLAMA_CPP_CACHE", str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                                  / "care" / "llama.cpp"))


@pytest.fixture(autouse=True)
def _user_dirs(tmp_path, monkeypatch):
    """simonw/llm style: no test reads or writes the real user's data, config or cache."""
    home = tmp_path / "care-home"
    monkeypatch.setenv("CARE_HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    return home


@pytest.fixture(scope="session")
def embedded_gguf() -> Path:
    from care.errors import ModelNotFoundError
    from care.models import embedded_gguf as find

    try:
        return find()
    except ModelNotFoundError as exc:  # pragma: no cover - setup problem, not a test result
        pytest.fail(f"embedded model missing: {exc.one_line()}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    from care.paths import shared_data_dir

    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (the public datasets beside the checkout); set CARE_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def smollm_tokenizer() -> Path:
    from tiny_models import smollm_tokenizer_dir

    return smollm_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm_tokenizer) -> Path:
    from tiny_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm_tokenizer)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory, smollm_tokenizer) -> Path:
    from tiny_models import build_tiny_phi3

    return build_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3"), smollm_tokenizer)


@pytest.fixture(scope="session")
def smollm_engine(embedded_gguf):
    """One real llama.cpp engine on the embedded GGUF, shared by the runtime tests."""
    from care.runtime.backend import EngineConfig, SamplingConfig
    from care.runtime.engine import ChatEngine

    engine = ChatEngine(embedded_gguf, EngineConfig(n_ctx=2048, n_threads=1,
                                                    sampling=SamplingConfig(temperature=0.0, seed=0,
                                                                            max_tokens=32)))
    yield engine
    engine.close()


def pytest_collection_modifyitems(items):
    """A test that uses the shared_data fixture carries the `shared_data` marker (`-m "not shared_data"`)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_data)
