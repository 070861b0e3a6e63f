"""Runtime: the chat engines (llama.cpp, ONNX), domains and safety, the local server and device benchmarks.

No torch or transformers here: this is what a chat-only laptop installs (care[runtime]). Names are loaded
on first use, so `import care.runtime` does not load llama.cpp.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ChatBackend": "care.runtime.backend",
    "ContextBudget": "care.runtime.backend",
    "EngineConfig": "care.runtime.backend",
    "GenerationResponse": "care.runtime.backend",
    "ModelInfo": "care.runtime.backend",
    "SamplingConfig": "care.runtime.backend",
    "ChatEngine": "care.runtime.engine",
    "OnnxChatEngine": "care.runtime.onnx_engine",
    "ChatSession": "care.runtime.session",
    "load_engine": "care.runtime.loader",
    "EngineOptions": "care.runtime.loader",
    "engine_config": "care.runtime.loader",
    "is_onnx_folder": "care.runtime.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'care.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
