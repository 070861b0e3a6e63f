"""The portable llama-cpp-python build keeps ggml's "load_backend: loaded CPU backend from ..." line off a
normal `care chat`'s stderr, and shows it with `care -v` (the binding patch in care/toolchain/llamacpp/)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

LINE = "loaded CPU backend from"


def _portable_binding() -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.skip("llama-cpp-python is not installed")
    lib = Path(spec.origin).parent / "lib"
    if not any(lib.glob("libggml-cpu-*.so")):
        pytest.skip(f"the installed llama-cpp-python ({lib.parent}) is not the portable build (no "
                    "libggml-cpu-<variant>.so): `make setup` installs it")
    return lib


def _chat(*top: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "care", *top, "chat", "--once", "Hi", "--max-tokens", "2", "--temperature", "0",
           "--n-ctx", "256"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_chat_stderr_has_no_backend_line_unless_verbose():
    lib = _portable_binding()
    quiet = _chat()
    assert quiet.returncode == 0, quiet.stderr[-1000:]
    assert quiet.stdout.strip()
    assert LINE not in quiet.stderr, quiet.stderr[-1000:]
    verbose = _chat("-v")
    assert verbose.returncode == 0, verbose.stderr[-1000:]
    # one line, through Python logging, naming the module ggml picked from the folder the CPU guard chose: the
    # package's lib/, or (on a CPU where a module is refused, e.g. AMX) its link folder without that module
    from care.runtime import cpu_guard

    choice = cpu_guard.choose(lib)
    folder = choice.lib or str(lib)
    lines = [ln for ln in verbose.stderr.splitlines() if LINE in ln]
    assert len(lines) == 1 and "llama-cpp-python" in lines[0], verbose.stderr[-1000:]
    assert f"{folder}/{choice.variant}" in lines[0], (folder, choice.variant, lines[0])
    if choice.refused:
        assert all(r["variant"] not in lines[0] for r in choice.refused)
