"""One way to load a chat model: `load_engine(spec, config)` for the CLI, the TUI, the server, eval and bench.

A spec is None (the embedded model), a known name (`care models`), a .gguf file, a folder holding one, or an
onnxruntime-genai folder from `care export onnx`. The llama.cpp engine serves GGUFs, the ONNX engine folders.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from care.artifacts import is_onnx_folder
from care.runtime.backend import ChatBackend, EngineConfig, SamplingConfig


def load_engine(spec: str | os.PathLike[str] | None = None, config: EngineConfig | None = None) -> ChatBackend:
    """A loaded engine for `spec` (see the module docstring); raises a CareError naming the file and the fix."""
    if is_onnx_folder(spec):
        from care.runtime.onnx_engine import OnnxChatEngine

        return OnnxChatEngine(spec, config)  # type: ignore[arg-type]
    from care.models import resolve_gguf
    from care.runtime.engine import ChatEngine

    return ChatEngine(resolve_gguf(spec), config)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from the command line's engine and sampling options (care chat / serve / the TUI)."""
    from care.runtime.profiles import resolve

    template = getattr(args, "chat_template", None)
    if template and Path(template).is_file():
        template = Path(template).read_text(encoding="utf-8")
    prof = resolve(getattr(args, "profile", None) or "laptop", kv_type=getattr(args, "kv_type", None))
    return EngineConfig(
        n_ctx=getattr(args, "n_ctx", None) or prof["n_ctx"],
        n_threads=getattr(args, "threads", None) or prof["threads"],
        type_k=prof["type_k"],
        type_v=prof["type_v"],
        flash_attn=prof["flash_attn"],
        repack=prof["repack"],
        use_mmap=prof["use_mmap"],
        context_policy=getattr(args, "context", None) or "drop",
        chat_template=template,
        lora_path=getattr(args, "lora", None),
        adapters=_adapters(getattr(args, "adapters", None)),
        sampling=SamplingConfig(
            temperature=getattr(args, "temperature", 0.7),
            top_p=getattr(args, "top_p", 0.9),
            top_k=getattr(args, "top_k", 40),
            repeat_penalty=getattr(args, "repeat_penalty", 1.1),
            seed=getattr(args, "seed", None),
            max_tokens=getattr(args, "max_tokens", 512),
        ),
    )


def _adapters(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    from care.runtime.adapters import parse_adapters

    return parse_adapters(value) or None


def load_from_args(args: argparse.Namespace, spec: str | None = None) -> ChatBackend:
    """load_engine for `--model` (or `spec`, e.g. a model picked in the TUI) with the command line's options."""
    return load_engine(spec if spec is not None else getattr(args, "model", None), engine_config_from_args(args))


def parse_languages(value: str | None) -> tuple[str, ...] | None:
    """`--lang en,fr` -> ("en", "fr"); None or empty: the safety rules' own languages."""
    if not value:
        return None
    return tuple(code.strip().lower() for code in value.split(",") if code.strip())
