"""The export manifest shared by `care export gguf` and `care export onnx`: file sizes and hashes, and the
model's provenance as names and hashes, never the absolute paths of the machine that made it.

A GGUF or ONNX folder is meant to be copied to other machines; its metadata must not leak where the training
ran (`/home/<user>/...`). care_merge.json, which stays beside the merged model, keeps the local paths.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from care.io import sha256_file

# care_merge.json keys that may hold a local path; they are reduced to the last path component.
PATH_KEYS = ("base_model", "base_model_path", "adapter", "adapter_path", "recipe_path", "out_dir", "model_dir")


def public_name(value: Any) -> Any:
    """A path of this machine -> its last component; anything else (a hub id, a hash) unchanged."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    if value.startswith(("/", "~", "\\")) or (len(value) > 2 and value[1] == ":") or path.exists():
        return path.name or value
    return value


def public_provenance(provenance: dict[str, Any] | None) -> dict[str, Any]:
    """care_merge.json without local paths (nested dicts too); names, hashes and numbers are kept."""
    out: dict[str, Any] = {}
    for key, value in (provenance or {}).items():
        if isinstance(value, dict):
            out[key] = public_provenance(value)
        elif key in PATH_KEYS:
            out[key] = public_name(value)
        else:
            out[key] = value
    return out


def source_record(path: Path, architecture: str, provenance: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's `source`: the merged model's folder name, architecture and public provenance."""
    return {"name": Path(path).resolve().name, "architecture": architecture,
            "provenance": public_provenance(provenance) or None}


def file_records(paths: Iterable[Path], **extra: dict[str, Any]) -> list[dict[str, Any]]:
    """{"file", "size", "sha256"} for each file (+ extra[name] fields), the part a user checks after copying."""
    return [{"file": p.name, "size": p.stat().st_size, "sha256": sha256_file(p), **extra.get(p.name, {})}
            for p in paths]


def manifest(fmt: str, source: dict[str, Any], files: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"format": fmt, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": source,
            "files": files, **fields}
