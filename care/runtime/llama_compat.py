"""The one door to llama-cpp-python: `load()` imports it after the CPU guard chose the CPU module.

Every care module, bench script and test that needs llama_cpp calls `llama_compat.load()` instead of
`import llama_cpp` (tests/test_layers.py checks that), so no process can load a ggml CPU module that was
not proven to run on this machine (care/runtime/cpu_guard.py). The children of the guard itself
(care/runtime/cpu_probe.py) are the one exception: they are the proof.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from care.errors import require


def load() -> ModuleType:
    """`llama_cpp`, with the CPU module checked for this machine (a one-line error if none runs here)."""
    require("llama_cpp", "runtime")
    from care.runtime import cpu_guard

    cpu_guard.ensure()
    return importlib.import_module("llama_cpp")


def submodule(name: str) -> ModuleType:
    """A llama_cpp submodule (e.g. "llama_chat_format", "llama_grammar", "llama_cpp") behind the same guard."""
    load()
    return importlib.import_module(f"llama_cpp.{name}")
