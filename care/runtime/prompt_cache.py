"""A persistent prompt cache: the KV state of the tokens every chat of a domain starts with.

A new chat starts with the same tokens every time -- BOS, the chat template's opening, the domain's system
prompt and the opening of the user turn. They are evaluated once, their KV state (llama.cpp's per-sequence
state, `llama_state_seq_get_data`) is written to a file next to the model (or in the care cache when that
folder is read-only or part of an installed package), and every later chat loads it instead of prefilling.

The file is keyed by what makes a KV state valid: the model's sha256, the exact prefix tokens, the K/V cache
types, flash attention (it changes the V layout), n_ctx, a LoRA adapter and the llama-cpp-python version.
Its header carries that key and the payload's sha256, so a stale, truncated or foreign file is ignored and
rebuilt, never trusted. Writes go to a temp file that is renamed into place.

Follow-up turns need none of this: llama-cpp-python keeps the conversation's tokens and re-evaluates only
past the longest common prefix of its previous input and the new prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from care.io import atomic_path, write_text
from care.runtime import llama_compat
from care.system import sha256_file

if TYPE_CHECKING:
    from care.runtime.backend import Message
    from care.runtime.engine import ChatEngine

log = logging.getLogger(__name__)

MAGIC = b"CAREKV01"
FORMAT = 1
MAX_FILES = 16  # per folder and model: domains x KV settings; the least recently used go first
_SENTINEL = "\u2063care-prompt-cache\u2063"  # user content no real message starts with
_HASH_LOCK = threading.Lock()


# -- model identity ---------------------------------------------------------------------------------
def model_sha256(path: Path) -> str:
    """The GGUF's sha256, remembered by (path, size, mtime) in the care cache: hashing a 2.4 GB file takes
    seconds, which a chat start must not pay each time."""
    from care.paths import cache_dir

    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_dir() / "model-sha256.json"
    with _HASH_LOCK:
        try:
            known = json.loads(index.read_text(encoding="utf-8"))
            if not isinstance(known, dict):
                known = {}
        except (OSError, ValueError):
            known = {}
        if isinstance(known.get(ident), str):
            return known[ident]
        digest = sha256_file(path)
        known[ident] = digest
        try:
            write_text(index, json.dumps(known, indent=1))
        except OSError as exc:  # a read-only cache only costs the next start another hash
            log.warning("could not remember the model hash in %s: %s", index, exc)
        return digest


def cache_folder(model: Path) -> Path:
    """Next to the model when that folder is writable and not inside a Python installation (the embedded
    model ships in a package); otherwise the care cache."""
    from care.paths import cache_dir

    folder = model.resolve().parent
    installed = any(folder.is_relative_to(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix})
    if not installed and os.access(folder, os.W_OK):
        return folder / f"{model.name}.prompt-cache"
    return cache_dir() / "prompt-cache"


# -- the file ---------------------------------------------------------------------------------------
def write_state(path: Path, key: dict[str, Any], tokens: list[int], payload: bytes) -> None:
    header = json.dumps({"format": FORMAT, "key": key, "tokens": tokens, "payload_len": len(payload),
                         "payload_sha256": hashlib.sha256(payload).hexdigest()}).encode("utf-8")
    with atomic_path(path) as tmp:
        tmp.write_bytes(MAGIC + struct.pack("<I", len(header)) + header + payload)


def read_state(path: Path, key: dict[str, Any], tokens: list[int]) -> bytes | None:
    """The payload if the file is complete and was written for exactly this key and these tokens."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    why = None
    if data[:8] != MAGIC or len(data) < 12:
        why = "not a prompt-cache file"
    else:
        (n,) = struct.unpack("<I", data[8:12])
        try:
            header = json.loads(data[12:12 + n].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            header = None
        payload = data[12 + n:]
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            why = "unreadable header"
        elif header.get("key") != key or header.get("tokens") != tokens:
            why = "written for another model, prompt or setting"
        elif header.get("payload_len") != len(payload) or \
                header.get("payload_sha256") != hashlib.sha256(payload).hexdigest():
            why = "truncated or corrupt"
    if why:
        log.warning("ignoring prompt cache %s (%s); rebuilding it", path, why)
        return None
    return payload


# -- the engine hook --------------------------------------------------------------------------------
class PromptCache:
    """Loads or builds the saved KV state of a conversation's fixed opening for one ChatEngine."""

    def __init__(self, engine: ChatEngine, folder: Path | None = None) -> None:
        self.engine = engine
        self.folder = folder or cache_folder(engine.path)
        self._prefixes: dict[str, list[int]] = {}
        self._key_base: dict[str, Any] | None = None
        self.last: str = "none"  # what the last prepare() did: "none", "hit", "built", "live"

    def key_base(self) -> dict[str, Any]:
        if self._key_base is None:
            cfg = self.engine.config
            lora = None
            if cfg.lora_path:
                st = Path(cfg.lora_path).stat()
                lora = f"{Path(cfg.lora_path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
            self._key_base = {
                "model_sha256": model_sha256(self.engine.path), "n_ctx": self.engine.n_ctx,
                "type_k": cfg.type_k or "f16", "type_v": cfg.type_v or "f16",
                "flash_attn": cfg.flash_attn, "lora": lora, "llama_cpp": llama_compat.version(),
            }
        return self._key_base

    def prefix_tokens(self, messages: list[Message]) -> list[int]:
        """Tokens of the conversation's opening up to where the first user message's text begins."""
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        cache_id = system if system is not None else "\0no-system"
        if cache_id not in self._prefixes:
            opening = [{"role": "system", "content": system}] if system is not None else []
            probe = self.engine.render([*opening, {"role": "user", "content": _SENTINEL}])
            cut = probe.find(_SENTINEL)
            tokens = self.engine.tokenize(probe[:cut]) if cut > 0 else []
            # The last token may merge with the user's first characters in the full prompt: the shared
            # prefix of two different questions is what every chat really starts with.
            a = self.engine.tokenize(probe.replace(_SENTINEL, "Hello"))
            b = self.engine.tokenize(probe.replace(_SENTINEL, "? 1"))
            self._prefixes[cache_id] = tokens[:_common(_common_list(a, b), tokens)]
        return self._prefixes[cache_id]

    def path_for(self, tokens: list[int]) -> tuple[Path, dict[str, Any]]:
        key = {**self.key_base(), "prefix_sha256": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()}
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.folder / f"{name}.kv", key

    def prepare(self, messages: list[Message], prompt: list[int]) -> int:
        """Make the model's state start with the conversation's opening; returns the tokens evaluated here.

        Nothing to do when the live state already covers it (a follow-up turn); else the saved state is
        loaded, or evaluated and saved for the next chat."""
        llm = self.engine.llm
        prefix = self.prefix_tokens(messages)
        if len(prefix) < 2 or prompt[:len(prefix)] != prefix:
            self.last = "none"
            return 0
        live = _common(llm.input_ids[:llm.n_tokens].tolist(), prompt)
        if live >= len(prefix):
            self.last = "live"
            return 0
        path, key = self.path_for(prefix)
        payload = read_state(path, key, prefix)
        if payload is not None and self._load(payload, prefix):
            self.last = "hit"
            with contextlib.suppress(OSError):
                os.utime(path)  # least recently used goes first in _evict
            return 0
        llm.reset()
        llm.eval(prefix)
        self._save(path, key, prefix)
        self.last = "built"
        return len(prefix)

    def _load(self, payload: bytes, tokens: list[int]) -> bool:
        llm = self.engine.llm
        llm.reset()
        llama_compat.clear_kv(llm)
        if not llama_compat.state_set(llm, payload):
            log.warning("llama.cpp refused the saved prompt state; rebuilding it")
            return False
        llama_compat.mark_evaluated(llm, tokens)  # no live logits: the next prompt token is decoded
        return True

    def _save(self, path: Path, key: dict[str, Any], tokens: list[int]) -> None:
        payload = llama_compat.state_get(self.engine.llm)
        try:
            write_state(path, key, tokens, payload)
            self._evict()
        except OSError as exc:  # a full or read-only disk costs the next chat a prefill, nothing more
            log.warning("could not save the prompt cache %s: %s", path, exc)

    def _evict(self) -> None:
        files = sorted(self.folder.glob("*.kv"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in files[MAX_FILES:]:
            with contextlib.suppress(OSError):
                old.unlink()


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _common_list(a: list[int], b: list[int]) -> list[int]:
    return a[:_common(a, b)]
