"""CARE Edge: QLoRA fine-tuning to offline chat on small devices.

The public API, for use as a library::

    from care import ChatSession, load_engine

    engine = load_engine()  # the embedded SmolLM2; or a .gguf path, a known name, an ONNX folder
    session = ChatSession(engine, domain="banking")
    ...

Keep this module light: `care --help`, `care chat` and the TUI import it, and must not pull in torch. The names
below are imported on first use (PEP 562), so `import care` loads none of llama.cpp, torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    # runtime (care[runtime]: llama.cpp, no torch)
    "ChatBackend": "care.runtime.backend",
    "ChatEngine": "care.runtime.engine",
    "ChatSession": "care.runtime.session",
    "EngineConfig": "care.runtime.backend",
    "GenerationResponse": "care.runtime.backend",
    "SamplingConfig": "care.runtime.backend",
    "load_engine": "care.runtime.loader",
    # training and export (care[train], care[export]: torch)
    "Recipe": "care.train.config",
    "load_recipe": "care.train.config",
    "train": "care.train",  # the package is callable: care.train(recipe, out_dir) runs care.train.sft.train
    "merge_adapter": "care.train.merge",
    "export_gguf": "care.export.gguf",
    "verify_gguf": "care.export.verify",
}

__all__ = [  # noqa: RUF022 - grouped as _EXPORTS is
    "__version__",
    "ChatBackend", "ChatEngine", "ChatSession", "EngineConfig", "GenerationResponse", "SamplingConfig", "load_engine",
    "Recipe", "load_recipe", "train", "merge_adapter", "export_gguf", "verify_gguf",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on first use
    from care.export.gguf import export_gguf
    from care.export.verify import verify_gguf
    from care.runtime.backend import ChatBackend, EngineConfig, GenerationResponse, SamplingConfig
    from care.runtime.engine import ChatEngine
    from care.runtime.loader import load_engine
    from care.runtime.session import ChatSession
    from care.train.config import Recipe, load_recipe
    from care.train.merge import merge_adapter
    from care.train.sft import train  # at run time: the callable package care.train


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'care' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module == f"care.{name}" else getattr(imported, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
