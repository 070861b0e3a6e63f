"""The merged Hugging Face folder an export starts from: the checks before converting, and what its tokenizer and
config say (the tokenizer, the chat template's end-of-turn token, the LongRoPE factors).

Used by the GGUF converter, verification (GGUF, ONNX and LoRA) and the imatrix calibration alike.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from care.artifacts import MERGE_INFO, read_if_present, read_merge_info
from care.errors import ExportError, InvalidModelError, ModelNotFoundError

log = logging.getLogger(__name__)

# What we test end to end. llama.cpp's script knows many more, but an untested path is not offered.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Phi3ForCausalLM": "phi3",
}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class ModelSource:
    """What we learned about a merged HF model folder before converting it."""

    path: Path
    config: dict[str, Any]
    architecture: str
    llama_arch: str
    provenance: dict[str, Any] = field(default_factory=dict)  # care_merge.json, when present
    weight_bytes: int = 0


def inspect_model_dir(model_dir: str | os.PathLike[str]) -> ModelSource:
    """Check that `model_dir` is a full HF causal-LM folder we can convert; one-line errors otherwise."""
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise ModelNotFoundError("Model folder not found", path=path, hint="Pass the folder `care merge` wrote")
    if path.is_file():
        raise InvalidModelError("Expected a model folder, got a file", path=path,
                                hint="Pass the Hugging Face folder (config.json + *.safetensors)")
    weights = [p for pat in WEIGHT_PATTERNS for p in path.glob(pat) if not p.name.startswith("adapter_model")]
    if (path / "adapter_config.json").is_file() and not weights:
        raise InvalidModelError("This is a LoRA adapter folder, not a merged model", path=path,
                                hint="run `care merge` first and export the merged folder")
    if not (path / "config.json").is_file():
        raise InvalidModelError("Not a Hugging Face model folder (no config.json)", path=path,
                                hint="Pass the folder `care merge` wrote")
    if not weights:
        raise InvalidModelError("Model folder has no weights (*.safetensors)", path=path,
                                hint="Pass a complete merged model folder (`care merge` writes one)")
    for w in weights:
        check_safetensors(w)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"config.json is unreadable: {exc}", path=path / "config.json") from exc
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ExportError(
            f"Unsupported architecture {', '.join(archs) or config.get('model_type', '?')}",
            path=path, hint=f"Supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise InvalidModelError("Model folder has no tokenizer (tokenizer.json / tokenizer.model)", path=path,
                                hint="Save the tokenizer next to the model (`care merge` does)")
    provenance = read_if_present(read_merge_info, path, MERGE_INFO, otherwise="no provenance in the GGUF")
    return ModelSource(path=path, config=config, architecture=arch, llama_arch=SUPPORTED_ARCHITECTURES[arch],
                       provenance=provenance, weight_bytes=sum(p.stat().st_size for p in weights))


def check_safetensors(path: Path) -> None:
    """Header check (8-byte length + JSON + data of the sizes it declares), so a truncated or foreign weights
    file fails here in one line instead of deep inside the converter."""
    if path.suffix != ".safetensors":
        return
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= min(size - 8, 100 * 2**20):
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise InvalidModelError(f"Weights file is not valid safetensors ({exc})", path=path,
                                hint="Re-run `care merge` to write the merged model again") from exc
    if 8 + n + end > size:
        raise InvalidModelError("Weights file is truncated", path=path,
                                hint="Re-run `care merge` to write the merged model again")


def tokenizer_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_byte_level_bpe(tok: dict[str, Any]) -> bool:
    """GPT-2 style BPE (ByteLevel pre-tokenizer), as opposed to SentencePiece-style BPE with byte fallback."""
    text = json.dumps(tok.get("pre_tokenizer") or {}) + json.dumps(tok.get("decoder") or {})
    return (tok.get("model") or {}).get("type") == "BPE" and "ByteLevel" in text


def vocab_strings(path: Path) -> set[str]:
    tok = tokenizer_json(path)
    vocab = set((tok.get("model") or {}).get("vocab") or {})
    vocab.update(t.get("content", "") for t in tok.get("added_tokens") or [])
    return vocab


def expected_rope_factors(model_dir: Path) -> dict[str, list[float]]:
    """LongRoPE long/short factors the HF model uses (as transformers reads its config), or {}."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    for key in ("rope_parameters", "rope_scaling"):
        params = config.get(key)
        if isinstance(params, dict) and params.get("long_factor"):
            return {"long": list(params["long_factor"]), "short": list(params.get("short_factor") or [])}
    return {}


def hf_tokenizer(model_dir: str | os.PathLike[str]):
    """The HF tokenizer of a model folder, loaded once per process per folder state (export, the Modelfile
    and verification all need it, and a load costs seconds)."""
    path = Path(model_dir).resolve()
    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted([*path.glob("tokenizer*"), *path.glob("chat_template*")]) if p.is_file())
    return _load_tokenizer(str(path), stamp)


@functools.lru_cache(maxsize=4)
def _load_tokenizer(path: str, stamp: tuple) -> Any:  # noqa: ARG001 - stamp is the cache key
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def end_of_turn_token(model_dir: Path) -> tuple[int, str] | None:
    """The token that ends an assistant turn in the model's chat template (<|end|> for Phi-3.5,
    <|im_end|> for ChatML), found by rendering a turn: the first special token after the reply."""
    try:
        tok = hf_tokenizer(model_dir)
        marker = "Zebra-reply-marker"
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception as exc:  # no template, or a template needing other roles: no EOT to add
        log.info("No end-of-turn token found (%s)", exc)
        return None
    after = text[text.find(marker) + len(marker):] if marker in text else ""
    specials = sorted(set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values()
                                                      if t.special}, key=len, reverse=True)
    for i in range(len(after)):
        for s in specials:
            if s and after.startswith(s, i):
                tid = tok.convert_tokens_to_ids(s)
                return (int(tid), s) if isinstance(tid, int) else None
    return None
