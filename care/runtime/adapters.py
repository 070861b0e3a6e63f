"""Per-domain GGUF LoRA adapters over one loaded base model (llama.cpp's adapter API).

Every adapter is loaded once next to the base (a few MB each); switching sets another one on the context, so
the base is never reloaded. A KV cache computed under one adapter is wrong under another: llama-cpp-python
reuses the longest common prefix of the previous prompt, so every change of adapters resets that state and
the next prompt is evaluated from scratch.

`--adapters medical=med.gguf,banking=bank.gguf`, or a folder of `care export gguf-lora` outputs (each a
folder with manifest.json, or the manifest's adapter files side by side), names the adapters; a session uses
the adapter named like its domain, a server request the one its `model` or `lora` field picks.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from care.artifacts import MANIFEST, read_lora_manifest
from care.errors import InvalidModelError, ModelNotFoundError, UsageError
from care.runtime import llama_compat

log = logging.getLogger(__name__)

AdapterSpec = tuple[tuple[str, float], ...]  # (adapter name, scale) pairs; () means the base alone


def parse_adapters(value: str | os.PathLike[str] | None) -> dict[str, str]:
    """`name=file.gguf,name2=file2.gguf`, or a folder of `care export gguf-lora` outputs -> {name: path}."""
    if not value:
        return {}
    text = str(value)
    folder = Path(text).expanduser()
    if "=" not in text and folder.is_dir():
        return _from_folder(folder)
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, path = part.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise UsageError(f"--adapters entry {part!r} is not NAME=FILE.gguf",
                             hint="Write --adapters medical=med.gguf,banking=bank.gguf (or pass a folder)")
        if name in out:
            raise UsageError(f"--adapters names {name!r} twice", hint="Give each adapter its own name")
        p = Path(path).expanduser()
        if not p.is_file():
            raise ModelNotFoundError(f"Adapter file for {name!r} not found", path=p,
                                     hint="Export it with `care export gguf-lora ADAPTER_DIR --out DIR`")
        out[name] = str(p)
    return out


def _from_folder(folder: Path) -> dict[str, str]:
    manifests = [folder / MANIFEST] if (folder / MANIFEST).is_file() else sorted(folder.glob(f"*/{MANIFEST}"))
    out: dict[str, str] = {}
    for path in manifests:
        try:
            manifest = read_lora_manifest(path.parent)
        except InvalidModelError:
            continue  # e.g. a merged `care export gguf` folder beside the adapters
        name = manifest["name"] if path.parent == folder else path.parent.name  # subfolders: named by domain
        out[name] = str(path.parent / manifest["adapter"]["file"])
    if not out:
        raise ModelNotFoundError("No `care export gguf-lora` manifest in the adapters folder", path=folder,
                                 hint="Pass NAME=FILE.gguf pairs, or a folder of gguf-lora export folders")
    return out


class AdapterSet:
    """GGUF LoRA adapters loaded on one llama-cpp-python `Llama`; `apply()` makes a set of them active."""

    def __init__(self, llm: Any, adapters: dict[str, str | os.PathLike[str]]) -> None:
        self.llm = llm
        self.paths: dict[str, Path] = {}
        self._handles: dict[str, Any] = {}
        self.active: AdapterSpec = ()
        self.switches = 0
        self.last_switch_s = 0.0
        try:
            for name, path in adapters.items():
                p = Path(path).expanduser()
                if not p.is_file():
                    raise ModelNotFoundError(f"Adapter {name!r} not found", path=p,
                                             hint="Export it with `care export gguf-lora`")
                handle = llama_compat.lora_init(llm, str(p))
                if not handle:
                    raise InvalidModelError(
                        f"llama.cpp could not load adapter {name!r} on this model", path=p,
                        hint="Use an adapter exported for this base (`care export gguf-lora --verify-base BASE.gguf`)")
                self._handles[name] = handle
                self.paths[name] = p
        except Exception:
            self.close()
            raise

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._handles)

    def sizes(self) -> dict[str, int]:
        return {name: p.stat().st_size for name, p in self.paths.items()}

    def check(self, spec: AdapterSpec) -> AdapterSpec:
        for name, scale in spec:
            if name not in self._handles:
                raise UsageError(f"Unknown adapter {name!r}", hint=f"Loaded adapters: {', '.join(self.names) or 'none'}")
            if not -4.0 <= float(scale) <= 4.0:
                raise UsageError(f"Adapter scale {scale} for {name!r} is outside -4..4")
        return tuple((n, float(s)) for n, s in spec if float(s) != 0.0)

    def apply(self, spec: AdapterSpec) -> bool:
        """Make exactly `spec` active; returns True when that changed anything (and the KV state was reset)."""
        spec = self.check(spec)
        if spec == self.active:
            return False
        t0 = time.perf_counter()
        self._set(spec)
        # The prefix cache was computed under the previous adapters: never reuse it.
        self.llm.reset()
        self.active = spec
        self.switches += 1
        self.last_switch_s = time.perf_counter() - t0
        log.info("adapters now %s (%.1f ms)", ", ".join(f"{n}x{s:g}" for n, s in spec) or "none",
                 self.last_switch_s * 1000)
        return True

    def _set(self, spec: AdapterSpec) -> None:
        if not llama_compat.set_loras(self.llm, [self._handles[name] for name, _ in spec], [s for _, s in spec]):
            raise InvalidModelError("llama.cpp refused to set the adapters " + ", ".join(n for n, _ in spec))

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        if not handles:
            return
        llama_compat.set_loras(self.llm, [], [])  # nothing when the context is gone
        for handle in handles.values():
            llama_compat.lora_free(handle)
        self.active = ()

