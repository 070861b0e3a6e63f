"""One way to load a chat model: `load_engine(spec, config)` for the CLI, the TUI, the server, eval and bench.

A spec is None (the embedded model), a known name (`care models`), a .gguf file, a folder holding one, or an
onnxruntime-genai folder from `care export onnx`. The llama.cpp engine serves GGUFs, the ONNX engine folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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


@dataclass
class EngineOptions:
    """What a front end asks of the engine, as typed values (care.commands builds it from the command line):
    the model, the device profile and its overrides, the context policy, the template, LoRA adapters and the
    sampling. `engine_config` turns it into the EngineConfig an engine loads with."""

    model: str | None = None  # see load_engine's spec
    profile: str = "laptop"  # care.runtime.profiles
    kv_type: str | None = None  # "q8_0" or "q8_0/q4_0" (K/V); None: the profile's
    n_ctx: int | None = None  # None: the profile's
    threads: int | None = None  # None: the profile's (None there: the idle physical cores)
    context: str = "drop"  # "drop" or "summarize" the turns that no longer fit
    chat_template: str | None = None  # a NAMED_TEMPLATES name, Jinja text or a Jinja file
    lora: str | None = None  # a GGUF LoRA applied at load time
    adapters: str | None = None  # "NAME=FILE,..." or a folder (care.runtime.adapters.parse_adapters)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def engine_config(options: EngineOptions) -> EngineConfig:
    """The EngineConfig for `options`: the profile's device settings, the options' overrides on top."""
    from care.runtime.profiles import resolve

    template = options.chat_template
    if template and Path(template).is_file():
        template = Path(template).read_text(encoding="utf-8")
    prof = resolve(options.profile or "laptop", kv_type=options.kv_type)
    return EngineConfig(
        n_ctx=options.n_ctx or prof["n_ctx"],
        n_threads=options.threads or prof["threads"],
        type_k=prof["type_k"],
        type_v=prof["type_v"],
        flash_attn=prof["flash_attn"],
        repack=prof["repack"],
        use_mmap=prof["use_mmap"],
        context_policy=options.context or "drop",
        chat_template=template,
        lora_path=options.lora,
        adapters=_adapters(options.adapters),
        sampling=options.sampling,
    )


def load_with_options(options: EngineOptions, spec: str | None = None) -> ChatBackend:
    """load_engine for `options.model` (or `spec`, e.g. a model picked in the TUI) with the options' settings."""
    return load_engine(spec if spec is not None else options.model, engine_config(options))


def _adapters(value: str | None) -> dict[str, str] | None:
    if not value:
        return None
    from care.runtime.adapters import parse_adapters

    return parse_adapters(value) or None


def parse_languages(value: str | None) -> tuple[str, ...] | None:
    """`--lang en,fr` -> ("en", "fr"); None or empty: the safety rules' own languages."""
    if not value:
        return None
    return tuple(code.strip().lower() for code in value.split(",") if code.strip())
