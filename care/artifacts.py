"""The files one stage writes and another reads: one builder and one validating reader for each.

- care_adapter.json (`care train` -> `care merge`, `care export gguf-lora`): `adapter_info` / `read_adapter_info`
- care_merge.json (`care merge` -> `care export`): `merge_info` / `read_merge_info`
- manifest.json of `care export gguf` and `care export gguf-lora`, care_onnx.json of `care export onnx`
  (export -> the runtime, `--adapters DIR`): `gguf_manifest` / `read_gguf_manifest`, `lora_manifest` /
  `read_lora_manifest`, `onnx_manifest` / `read_onnx_manifest`; `is_onnx_folder` tells an ONNX folder apart.

A reader refuses a missing file, bad JSON, a missing key or a key of the wrong type with one line naming the file
and the key; a builder checks what it built with the same rules, so what a stage writes its reader accepts.
Keys beyond the checked ones are kept as they are (a newer writer may add some).

The public-provenance helpers live here too: an export folder is copied to other machines, so its manifest names
the model by names and hashes, never by this machine's paths (`/home/<user>/...`); care_merge.json, which stays
beside the merged model, keeps the local paths.

Standard library only (the runtime reads manifests on the chat path, where torch and llama.cpp must not load);
the checks are a few typed keys per file, which is why no schema library is pulled into the core install.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from care.errors import CareError, InvalidModelError, ModelNotFoundError
from care.system import sha256_file

log = logging.getLogger(__name__)

ADAPTER_INFO = "care_adapter.json"
MERGE_INFO = "care_merge.json"
MANIFEST = "manifest.json"  # `care export gguf` and `care export gguf-lora`
ONNX_MANIFEST = "care_onnx.json"  # `care export onnx` (manifest.json would clash with nothing, but marks the folder)
GGUF_FORMAT = "care-export-gguf/1"
LORA_FORMAT = "care-export-gguf-lora/1"
ONNX_FORMAT = "care-export-onnx/1"

_NONE = type(None)
_NUM = (int, float)
# A key's expected types; "a.b" is a nested key, "files[].file" a key of every item of a list.
Spec = Sequence[tuple[str, tuple[type, ...], bool]]  # (key, types, required)

ADAPTER_INFO_SPEC: Spec = (
    ("base_model", (str,), True),
    ("recipe_base", (str, _NONE), False),
    ("recipe_name", (str, _NONE), False),
    ("recipe_hash", (str, _NONE), False),
    ("recipe_path", (str, _NONE), False),
    ("quantized", (bool, _NONE), False),
    ("quant", (str, dict, _NONE), False),
    ("stage", (str, int, _NONE), False),
    ("chat_template", (str, _NONE), False),
    ("saved_at", (str, _NONE), False),
)
MERGE_INFO_SPEC: Spec = (
    ("base_model", (str,), True),
    ("adapter", (str, _NONE), False),
    ("recipe_hash", (str, _NONE), False),
    ("recipe_name", (str, _NONE), False),
    ("recipe_path", (str, _NONE), False),
    ("trained_quantized", (bool, _NONE), False),
    ("eos_token_id", (int, list, _NONE), False),
    ("merge", (dict, _NONE), False),
)
_SOURCE_SPEC: Spec = (
    ("source", (dict,), True),
    ("source.name", (str,), True),
    ("source.architecture", (str,), True),
    ("source.provenance", (dict, _NONE), False),
)
_FILES_SPEC: Spec = (
    ("files", (list,), True),
    ("files[].file", (str,), True),
    ("files[].size", (int,), True),
    ("files[].sha256", (str,), True),
)
GGUF_MANIFEST_SPEC: Spec = (
    ("format", (str,), True), ("created", (str,), True), *_SOURCE_SPEC, *_FILES_SPEC,
    ("files[].quant", (str,), True),
    ("name", (str,), True),
    ("primary", (str,), True),
    ("end_of_turn", (dict, _NONE), False),
    ("notes", (list,), True),
    ("verified", (bool, _NONE), True),
    ("verify_report", (str, _NONE), False),
    ("imatrix", (dict, _NONE), False),
)
ONNX_MANIFEST_SPEC: Spec = (
    ("format", (str,), True), ("created", (str,), True), *_SOURCE_SPEC, *_FILES_SPEC,
    ("precision", (str,), True),
    ("int4_algo", (str, _NONE), False),
    ("verified", (bool, _NONE), True),
)
LORA_MANIFEST_SPEC: Spec = (
    ("format", (str,), True), ("created", (str,), True),
    ("name", (str,), True),
    ("adapter", (dict,), True),
    ("adapter.file", (str,), True),
    ("adapter.type", (str,), True),
    ("adapter.size", (int,), True),
    ("adapter.sha256", (str,), True),
    ("lora", (dict,), True),
    ("lora.rank", (int,), True),
    ("lora.alpha", _NUM, True),
    ("lora.rslora", (bool,), True),
    ("lora.scale", _NUM, True),
    ("base", (dict,), True),
    ("base.model", (str,), True),
    ("base.verified_on", (dict, _NONE), False),
    ("notes", (list,), True),
    ("verified", (bool, _NONE), True),
    ("verify_report", (str, _NONE), False),
)


# --------------------------------------------------------------------------------------------------------
# Checking


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "an object",
             list: "a list", _NONE: "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:  # JSON true is not a count
        return False
    return isinstance(value, types)


def check(data: Any, spec: Spec, path: Path, hint: str) -> dict[str, Any]:
    """`data` if it is an object with every required key of `spec` of its type; else InvalidModelError naming
    `path` and the key."""
    if not isinstance(data, dict):
        raise InvalidModelError(f"{path.name} holds {_type_names((type(data),))}, not an object", path=path,
                                hint=hint)
    for key, types, required in spec:
        for where, value, present in _lookup(data, key):
            if not present:
                if required:
                    raise InvalidModelError(f"{path.name} has no key '{where}'", path=path, hint=hint)
            elif not _is(value, types):
                raise InvalidModelError(f"{path.name}: key '{where}' must be {_type_names(types)}, not "
                                        f"{json.dumps(value)[:40]}", path=path, hint=hint)
    return data


def _lookup(data: dict[str, Any], key: str) -> list[tuple[str, Any, bool]]:
    """(key as shown, value, present) for a dotted key; "a[]" walks every item of the list a."""
    found: list[tuple[str, Any, bool]] = [("", data, True)]
    for part in key.split("."):
        each = part.endswith("[]")
        name = part.removesuffix("[]")
        nxt: list[tuple[str, Any, bool]] = []
        for where, obj, present in found:
            if not present or not isinstance(obj, dict):
                continue  # the parent's own check reports it
            label = f"{where}.{name}" if where else name
            if name not in obj:
                nxt.append((label, None, False))
            elif each:
                if isinstance(obj[name], list):
                    nxt += [(f"{label}[{i}]", item, True) for i, item in enumerate(obj[name])]
            else:
                nxt.append((label, obj[name], True))
        found = nxt
    return found


def read_json(path: str | os.PathLike[str], hint: str) -> Any:
    """The JSON in `path`: ModelNotFoundError if there is no such file, InvalidModelError if it is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path.name} not found", path=path, hint=hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidModelError(f"{path.name} is not valid JSON ({exc})", path=path, hint=hint) from exc


def _file(folder_or_file: str | os.PathLike[str], name: str) -> Path:
    p = Path(folder_or_file).expanduser()
    return p / name if p.is_dir() or p.name != name else p


# --------------------------------------------------------------------------------------------------------
# care_adapter.json and care_merge.json

ADAPTER_HINT = "Re-run `care train`, or delete care_adapter.json and pass --base"
MERGE_HINT = "Re-run `care merge` to write it again"


def adapter_info(**fields: Any) -> dict[str, Any]:
    """care_adapter.json as `care train` writes it beside the adapter (see ADAPTER_INFO_SPEC for the keys)."""
    return check(dict(fields), ADAPTER_INFO_SPEC, Path(ADAPTER_INFO), ADAPTER_HINT)


def read_adapter_info(adapter_dir: str | os.PathLike[str], *,
                      required: Sequence[str] | None = None) -> dict[str, Any]:
    """care_adapter.json of an adapter folder (or the file itself), checked. `required` narrows the keys that
    must be present to those the caller needs (types are checked either way)."""
    return _read_record(adapter_dir, ADAPTER_INFO, ADAPTER_INFO_SPEC, ADAPTER_HINT, required)


def merge_info(*, base_model: str, adapter: str, recipe_hash: str | None, recipe_name: str | None,
               recipe_path: str | None, trained_quantized: bool | None, eos_token_id: int | list[int] | None,
               merge: dict[str, Any]) -> dict[str, Any]:
    """care_merge.json as `care merge` writes it beside the merged model: this machine's paths kept."""
    info = {"base_model": base_model, "adapter": adapter, "recipe_hash": recipe_hash, "recipe_name": recipe_name,
            "recipe_path": recipe_path, "trained_quantized": trained_quantized, "eos_token_id": eos_token_id,
            "merge": merge}
    return check(info, MERGE_INFO_SPEC, Path(MERGE_INFO), MERGE_HINT)


def read_merge_info(model_dir: str | os.PathLike[str], *, required: Sequence[str] | None = None) -> dict[str, Any]:
    """care_merge.json of a merged model folder (or the file itself), checked. `required` narrows the keys that
    must be present to those the caller needs (types are checked either way)."""
    return _read_record(model_dir, MERGE_INFO, MERGE_INFO_SPEC, MERGE_HINT, required)


def _read_record(folder: str | os.PathLike[str], name: str, spec: Spec, hint: str,
                 required: Sequence[str] | None) -> dict[str, Any]:
    path = _file(folder, name)
    if required is not None:
        spec = [(k, t, k in required) for k, t, _ in spec]
    return check(read_json(path, hint), spec, path, hint)


def read_if_present(read: Callable[..., dict[str, Any]], folder: str | os.PathLike[str], name: str, *,
                    otherwise: str, **kwargs: Any) -> dict[str, Any]:
    """An optional record (`read_merge_info`, `read_adapter_info`, ...): {} when `folder` has no `name`; a bad
    one is logged in one line, naming the key, with what happens `otherwise`, and read as {}."""
    if not (Path(folder) / name).is_file():
        return {}
    try:
        return read(folder, **kwargs)
    except CareError as exc:
        log.warning("%s; %s", exc.one_line(), otherwise)
        return {}


# --------------------------------------------------------------------------------------------------------
# Public provenance

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


# --------------------------------------------------------------------------------------------------------
# Export manifests


def _created() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_manifest(path: Path, fmt: str, spec: Spec, command: str) -> dict[str, Any]:
    hint = f"Re-run `{command}`"
    data = read_json(path, hint)
    if isinstance(data, dict) and data.get("format") != fmt:
        raise InvalidModelError(f"{path.name}: key 'format' is {json.dumps(data.get('format'))[:40]}, not a "
                                f"`{command}` manifest ({fmt})", path=path, hint=hint)
    return check(data, spec, path, hint)


def gguf_manifest(*, source: dict[str, Any], files: list[dict[str, Any]], name: str, converter: dict[str, Any],
                  primary: str, end_of_turn: dict[str, Any] | None, notes: list[str], verified: bool | None,
                  verify_report: str | None, imatrix: dict[str, Any] | None,
                  seconds: dict[str, float]) -> dict[str, Any]:
    """manifest.json of `care export gguf` (written last: a folder without it is an unfinished export)."""
    data = {"format": GGUF_FORMAT, "created": _created(), "source": source, "files": files, "name": name,
            "converter": converter, "primary": primary, "end_of_turn": end_of_turn, "notes": notes,
            "verified": verified, "verify_report": verify_report, "imatrix": imatrix, "seconds": seconds}
    return check(data, GGUF_MANIFEST_SPEC, Path(MANIFEST), "Report this: the GGUF manifest is malformed")


def read_gguf_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return _read_manifest(_file(out_dir, MANIFEST), GGUF_FORMAT, GGUF_MANIFEST_SPEC, "care export gguf")


def onnx_manifest(*, source: dict[str, Any], files: list[dict[str, Any]], precision: str, int4_algo: str | None,
                  builder: dict[str, Any], verified: bool | None, seconds: dict[str, float]) -> dict[str, Any]:
    """care_onnx.json of `care export onnx`."""
    data = {"format": ONNX_FORMAT, "created": _created(), "source": source, "files": files,
            "precision": precision, "int4_algo": int4_algo, "builder": builder, "verified": verified,
            "seconds": seconds}
    return check(data, ONNX_MANIFEST_SPEC, Path(ONNX_MANIFEST), "Report this: the ONNX manifest is malformed")


def read_onnx_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    return _read_manifest(_file(out_dir, ONNX_MANIFEST), ONNX_FORMAT, ONNX_MANIFEST_SPEC, "care export onnx")


def lora_manifest(*, name: str, adapter: dict[str, Any], lora: dict[str, Any], base: dict[str, Any],
                  recipe: dict[str, Any] | None, converter: dict[str, Any], notes: list[str], verified: bool | None,
                  verify_report: str | None, figures: dict[str, Any] | None,
                  seconds: dict[str, float]) -> dict[str, Any]:
    """manifest.json of `care export gguf-lora` (what `--adapters DIR` reads)."""
    data = {"format": LORA_FORMAT, "name": name, "created": _created(), "adapter": adapter, "lora": lora,
            "base": base, "recipe": recipe, "converter": converter, "notes": notes, "verified": verified,
            "verify_report": verify_report, "figures": figures, "seconds": seconds}
    return check(data, LORA_MANIFEST_SPEC, Path(MANIFEST), "Report this: the adapter manifest is malformed")


def read_lora_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    return _read_manifest(_file(folder, MANIFEST), LORA_FORMAT, LORA_MANIFEST_SPEC, "care export gguf-lora")


def is_onnx_folder(path: str | os.PathLike[str] | None) -> bool:
    """An onnxruntime-genai model folder (what `care export onnx` writes): it has genai_config.json."""
    if path is None:
        return False
    p = Path(path)
    return p.is_dir() and (p / "genai_config.json").is_file()
